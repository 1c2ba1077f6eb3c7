"""The HTTP front: the gunicorn worker, per-request middleware, responses and the OpenAPI document."""
