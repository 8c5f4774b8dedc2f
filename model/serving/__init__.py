"""Serving on Ray Serve (`ray_serve`): the server's FastAPI app as replicas. Importing this package imports no Ray."""
