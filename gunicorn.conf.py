"""gunicorn settings, from the same Settings as the app.

One worker process (it holds the one pipeline) with threads for I/O. No preload: the model loads in the
worker after the fork, since CUDA (and multithreaded torch) do not survive a fork.
"""

from config import load_settings

_settings = load_settings()

wsgi_app = "server:create_app()"
bind = f"{_settings.host}:{_settings.port}"
workers = 1
worker_class = "gthread"
# Every waiting synchronous request holds a thread; keep spares for /health and quick answers.
threads = _settings.max_queue + 8
preload_app = False
timeout = 120  # worker heartbeat: the generation runs in its own thread, so long jobs don't trip it
graceful_timeout = _settings.job_timeout  # SIGTERM lets the running generation finish
accesslog = "-"
