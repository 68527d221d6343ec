"""Role: memory safety: the probe, the guard's levels, admission of a request by its estimate.
Imports: pensieved.engine and the layers below it; never http or service.
"""
