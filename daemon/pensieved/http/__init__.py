"""Role: the HTTP layer: Falcon app, resources, middleware (origin, auth, metrics), JSON and SSE.
Imports: pensieved.memory and the layers below it; never the service layer.
"""
