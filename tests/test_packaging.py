"""The Docker image and compose file: linted and validated here, since no Docker engine runs here."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

import config

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = (ROOT / "Dockerfile").read_text()


def test_hadolint_passes():
    hadolint = Path(sys.executable).parent / "hadolint"
    result = subprocess.run([str(hadolint), "Dockerfile"], cwd=ROOT, capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stdout + result.stderr


def test_dockerfile_serves_on_5013_as_non_root_with_a_healthcheck():
    assert re.findall(r"^FROM (\S+)", DOCKERFILE, re.M) == ["python:3.11-slim-bookworm"]  # one CUDA: torch's own
    assert "nvidia/cuda" not in DOCKERFILE.split("FROM", 1)[1]
    assert "pip install torch==2.13.0 && pip install -r requirements.txt" in DOCKERFILE
    assert re.search(r"^EXPOSE 5013$", DOCKERFILE, re.M)
    assert re.search(r"^USER 10001$", DOCKERFILE, re.M)
    assert 'VOLUME ["/models", "/data/videos"]' in DOCKERFILE
    assert "http://localhost:{load_settings().port}/health" in DOCKERFILE.split("HEALTHCHECK", 1)[1]  # PORT's
    assert DOCKERFILE.rstrip().endswith('CMD ["gunicorn", "--config", "gunicorn.conf.py"]')
    assert "--preload" not in DOCKERFILE


def test_compose_file_is_valid_and_has_the_gpu_profile_service():
    compose = shutil.which("docker-compose")
    assert compose, "docker-compose (Debian package) is installed by `make test`"
    result = subprocess.run([compose, "-f", "docker-compose.yml", "--profile", "gpu", "config"], cwd=ROOT,
                            capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr
    service = yaml.safe_load(result.stdout)["services"]["video-diffusion"]
    assert service["profiles"] == ["gpu"]
    assert service["deploy"]["resources"]["reservations"]["devices"][0]["capabilities"] == ["gpu"]
    assert [(p["published"], p["target"]) for p in service["ports"]] == [(5013, 5013)]
    assert {v.split(":")[1] for v in service["volumes"]} == {"/models", "/data/videos"}


def test_compose_passes_every_setting_but_those_the_image_fixes():
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    settings, redis_settings = compose["x-settings"], compose["x-redis"]
    known = {v.name for v in config.VARIABLES}
    fixed = {"HOST", "PORT", "VIDEO_OUTPUT_PATH", "CUDA_VISIBLE_DEVICES"}  # the image's, or harmful empty
    assert set(settings) | set(redis_settings) == known - fixed
    for name in ("MODEL", "SVD_MODEL", "VAE_TILING", "SVD_OFFLOAD"):  # what picks and fits the model reaches it
        assert name in settings, name


def test_compose_hands_no_empty_cuda_visible_devices_to_the_container():
    """An empty CUDA_VISIBLE_DEVICES is read by CUDA as "no GPU": unset on the host, it must not arrive empty."""
    result = subprocess.run([shutil.which("docker-compose"), "-f", "docker-compose.yml", "--profile", "gpu", "config"],
                            cwd=ROOT, capture_output=True, text=True, check=False, env={"PATH": "/usr/bin:/bin"})
    assert result.returncode == 0, result.stderr
    for name, service in yaml.safe_load(result.stdout)["services"].items():
        assert (service.get("environment") or {}).get("CUDA_VISIBLE_DEVICES", "unset") != "", name


def test_env_example_lists_every_variable():
    example = (ROOT / ".env.example").read_text()
    for var in config.VARIABLES:
        assert re.search(rf"^#? ?{var.name}=", example, re.M), var.name


def test_shell_scripts_pass_shellcheck():
    shellcheck = Path(sys.executable).parent / "shellcheck"
    result = subprocess.run([str(shellcheck), "demo.sh", ".ci/run"], cwd=ROOT, capture_output=True, text=True,
                            check=False)
    assert result.returncode == 0, result.stdout


def test_compose_runs_api_worker_and_redis_by_default():
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]
    default = {name for name, service in compose.items() if "profiles" not in service}
    assert default == {"api", "worker", "redis"}
    assert "deploy" not in compose["api"] and compose["worker"]["deploy"]["resources"]["reservations"]["devices"]
    assert compose["worker"]["command"] == ["python", "worker.py"]
    assert compose["api"]["ports"] == ["5013:5013"]  # one port: the service's


def test_compose_passes_the_hub_token_and_the_workers_metrics_port():
    result = subprocess.run([shutil.which("docker-compose"), "-f", "docker-compose.yml", "--profile", "gpu", "config"],
                            cwd=ROOT, capture_output=True, text=True, check=False,
                            env={"PATH": "/usr/bin:/bin", "HF_TOKEN": "hf_test", "WORKER_METRICS_PORT": "9200"})
    assert result.returncode == 0, result.stderr
    services = yaml.safe_load(result.stdout)["services"]
    for name in ("worker", "video-diffusion"):
        assert services[name]["environment"]["HF_TOKEN"] == "hf_test"
    assert services["worker"]["environment"]["WORKER_METRICS_PORT"] == "9200"
    assert "9200/livez" in " ".join(services["worker"]["healthcheck"]["test"])


def test_the_seed_readmes_requirements_path_installs_the_same_pins():
    result = subprocess.run([sys.executable, "-m", "pip", "install", "--dry-run", "--no-deps", "--quiet",
                             "-r", "app/requirements.txt"], cwd=ROOT, capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr
    assert (ROOT / "app" / "requirements.txt").read_text().strip().endswith("-r ../requirements.txt")


def test_compose_s3_profile_runs_a_minio_and_hands_the_store_settings_to_api_and_workers():
    env = {"PATH": "/usr/bin:/bin", "RESULT_STORE": "s3://videos/vd", "S3_ENDPOINT_URL": "http://minio:9000",
           "AWS_ACCESS_KEY_ID": "vd-user", "AWS_SECRET_ACCESS_KEY": "a-long-test-password"}
    result = subprocess.run([shutil.which("docker-compose"), "-f", "docker-compose.yml", "--profile", "s3", "config"],
                            cwd=ROOT, capture_output=True, text=True, check=False, env=env)
    assert result.returncode == 0, result.stderr
    services = yaml.safe_load(result.stdout)["services"]
    assert services["minio"]["environment"] == {"MINIO_ROOT_USER": "vd-user",
                                                "MINIO_ROOT_PASSWORD": "a-long-test-password"}
    assert "store/videos" in " ".join(services["minio-bucket"]["command"])
    for name in ("api", "worker"):
        environment = services[name]["environment"]
        assert environment["RESULT_STORE"] == "s3://videos/vd" and environment["S3_ENDPOINT_URL"] == "http://minio:9000"
        assert environment["AWS_ACCESS_KEY_ID"] == "vd-user" and environment["AWS_REGION"] == "us-east-1"
    assert config.load_settings({k: v for k, v in env.items() if k in ("RESULT_STORE", "S3_ENDPOINT_URL")},
                                dotenv_path=None).result_store == "s3://videos/vd"
