"""video-diffusion's rooms, each a folder by role; the top-level `server.py`, `pipeline.py`, `encoders.py`,
`config.py`, `worker.py` and `gunicorn.conf.py` are the entry points and the design card's three stages.

- `lifecycle/`: the task record and its rules, the generation recipe, Idempotency-Keys
- `backends/`: where tasks run and are stored (one process on disk, or Redis with RQ workers)
- `web/`: the HTTP front (gunicorn worker), middleware, responses, the OpenAPI document
- `models/`: what `pipeline.py` loads onto the model (samplers, speed-ups) and the generator contract
- `media/`: images in, frames post-processed
- `delivery/`: webhooks
"""
