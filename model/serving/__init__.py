"""The HTTP server (`app.create_app`, `app.serve`): scoring, batching and reflective generation over one engine.
Importing this package imports nothing heavy (no FastAPI, no Ray); `model/ray/serve.py` runs the same app as Ray
Serve replicas."""
