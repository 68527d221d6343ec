"""Role: the Anthropic wire format: request/response structs, errors, the OpenAPI document.
Imports: nothing of pensieved but its version; every other layer may import it.
"""
