"""Role: the one thread that owns all MLX work, the prefix KV cache, MLX's CPU backend choices.
Imports: pensieved.models, conversation, wire, config; never memory, http or service.
"""
