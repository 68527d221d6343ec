"""Role: model names -> loadable weights (registry, GGUF, Ollama) and which stay resident.
Imports: pensieved.wire and pensieved.config only; independent of the conversation.
"""
