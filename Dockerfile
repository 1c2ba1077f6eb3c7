# video-diffusion: Stable Video Diffusion behind an HTTP API on port 5013.
#   docker build -t video-diffusion . && docker run -d --gpus all -p 5013:5013 video-diffusion
#
# One CUDA runtime, not two: PyPI's torch wheel for Linux brings its own CUDA and cuDNN libraries (the nvidia-*
# wheels it depends on), so the base is a slim Python image rather than nvidia/cuda; `--gpus all` (the NVIDIA
# container toolkit) adds only the host's driver.
FROM python:3.11-slim-bookworm

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HF_HOME=/models \
    VIDEO_OUTPUT_PATH=/data/videos \
    MALLOC_ARENA_MAX=2 \
    NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility

RUN useradd --create-home --uid 10001 app \
    && mkdir -p /models /data/videos \
    && chown app:app /models /data/videos

WORKDIR /app
COPY requirements.txt .
# torch first and pinned (PyPI's Linux wheel is the CUDA build), then the rest against it.
RUN pip install torch==2.13.0 && pip install -r requirements.txt

COPY *.py ./
COPY video_diffusion/ ./video_diffusion/
COPY static/ ./static/
USER 10001
EXPOSE 5013
# The model cache (Hugging Face downloads) and the videos outlive the container.
VOLUME ["/models", "/data/videos"]
# Loading SVD-XT the first time downloads ~10 GB: give it time before counting failures. Python, not curl:
# nothing else to install. A 503 (loading, draining) raises, so the check fails until the service is ready. The
# port is the service's own PORT (environment or .env), read the way the service reads it.
HEALTHCHECK --interval=30s --timeout=5s --start-period=15m --retries=3 \
    CMD ["python", "-c", "import urllib.request; from config import load_settings; urllib.request.urlopen(f'http://localhost:{load_settings().port}/health', timeout=4)"]
CMD ["gunicorn", "--config", "gunicorn.conf.py"]
