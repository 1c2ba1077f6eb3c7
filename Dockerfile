# video-diffusion: Stable Video Diffusion behind an HTTP API on port 5013.
#   docker build -t video-diffusion . && docker run -d --gpus all -p 5013:5013 video-diffusion
FROM nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04

ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    HF_HOME=/models \
    VIDEO_OUTPUT_PATH=/data/videos \
    MALLOC_ARENA_MAX=2

# Distribution packages are not pinned: the CUDA base image already fixes the release they come from.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv curl \
    && rm -rf /var/lib/apt/lists/* \
    && python3 -m venv /opt/venv \
    && useradd --create-home --uid 10001 app \
    && mkdir -p /models /data/videos \
    && chown app:app /models /data/videos

WORKDIR /app
COPY requirements.txt .
# torch first and pinned (PyPI's Linux wheel is the CUDA build), then the rest against it.
RUN pip install torch==2.13.0 && pip install -r requirements.txt

COPY *.py ./
COPY static/ ./static/
USER 10001
EXPOSE 5013
# The model cache (Hugging Face downloads) and the videos outlive the container.
VOLUME ["/models", "/data/videos"]
# Loading SVD-XT the first time downloads ~10 GB: give it time before counting failures.
HEALTHCHECK --interval=30s --timeout=5s --start-period=15m --retries=3 \
    CMD ["curl", "-fsS", "-o", "/dev/null", "http://localhost:5013/health"]
CMD ["gunicorn", "--config", "gunicorn.conf.py"]
