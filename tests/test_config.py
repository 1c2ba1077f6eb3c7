"""Settings: environment over `.env` over defaults, validated at once; the docs' tables stay true to the schemas."""

from __future__ import annotations

import dataclasses
import importlib.util
from pathlib import Path

import pytest

import config
from config import ConfigError, Settings, load_settings
from video_diffusion.params import params_markdown

README = Path(__file__).resolve().parent.parent / "README.md"
_spec = importlib.util.spec_from_file_location("gen_docs", README.parent / "scripts" / "gen_docs.py")
gen_docs = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(gen_docs)


def test_defaults():
    settings = load_settings({}, dotenv_path=None)
    assert (settings.port, settings.max_upload_mb, settings.max_queue) == (5013, 20, 8)
    assert settings.svd_model is None and settings.video_output_path == "./data/videos"
    assert settings.redis is None


def test_dotenv_is_read_and_the_environment_wins(tmp_path):
    dotenv = tmp_path / ".env"
    dotenv.write_text("VIDEO_FRAMES=20\nMAX_QUEUE=3\nREDIS_HOST=redis\n")
    settings = load_settings({"MAX_QUEUE": "5"}, dotenv_path=str(dotenv))
    assert (settings.video_frames, settings.max_queue) == (20, 5)
    assert settings.redis == "redis://redis:6379/0"


@pytest.mark.parametrize("env,needle", [
    ({"PORT": "http"}, "PORT='http': must be a whole number"),
    ({"PORT": "70000"}, "PORT='70000': must be between 1 and 65535"),
    ({"SVD_OFFLOAD": "gpu"}, "SVD_OFFLOAD='gpu': must be one of none, model, sequential, group"),
    ({"SVD_COMPILE": "maybe"}, "SVD_COMPILE='maybe': must be true or false"),
    ({"VIDEO_FRAMES": "1001"}, "VIDEO_FRAMES='1001': must be between 1 and 1000"),  # the model checks the rest
    ({"MODEL": "tiny-wan", "SVD_MODEL": "tiny"}, "MODEL='tiny-wan' and SVD_MODEL='tiny': they are the same"),
    ({"MAX_QUEUE": "0"}, "MAX_QUEUE='0': must be between 1 and 100000"),
    ({"VIDEO_WIDTH": "512"}, "VIDEO_WIDTH and VIDEO_HEIGHT: set both or neither"),
    ({"VIDEO_WIDTH": "500", "VIDEO_HEIGHT": "320"}, "VIDEO_WIDTH=500: must be a multiple of 8"),
])
def test_a_bad_value_names_the_variable_its_value_and_what_is_allowed(env, needle):
    with pytest.raises(ConfigError, match="^" + needle.replace("(", r"\(")):
        load_settings(env, dotenv_path=None)


def test_a_bad_value_from_dotenv_says_so(tmp_path):
    dotenv = tmp_path / ".env"
    dotenv.write_text("MAX_QUEUE=none\n")
    with pytest.raises(ConfigError, match=f"^MAX_QUEUE='none': must be a whole number \\(set in {dotenv}\\)$"):
        load_settings({}, dotenv_path=str(dotenv))


def test_every_setting_has_one_variable():
    assert [f.name for f in dataclasses.fields(Settings)] == [v.name.lower() for v in config.VARIABLES]


def test_readme_tables_and_env_example_are_generated_from_the_schemas():
    """`make docs` regenerates them; this fails when someone changes a schema and forgets."""
    for path in gen_docs.documents():
        assert gen_docs.readme(path.read_text()) == path.read_text(), path.name
    assert config.variables_markdown() in (README.parent / "docs" / "configuration.md").read_text()
    assert params_markdown() in (README.parent / "docs" / "api.md").read_text()
    assert (README.parent / ".env.example").read_text() == gen_docs.env_example()


@pytest.mark.parametrize("env, needle", [
    ({"WEBHOOK_SECRET": "not-a-secret-value"}, "must start with whsec_"),
    ({"WEBHOOK_SECRET": "whsec_c2hvcnQ="}, "at least 16 bytes"),
    ({"WEBHOOK_ALLOW": "hooks.example.com:http"}, "not a host or host:port"),
])
def test_webhook_settings_are_checked_and_a_secret_is_never_echoed(env, needle):
    with pytest.raises(ConfigError) as caught:
        load_settings(env, dotenv_path=None)
    assert needle in str(caught.value)
    for value in env.values():
        if "SECRET" in next(iter(env)):
            assert value not in str(caught.value)
    secret = "whsec_" + "QUJDREVGR0hJSktMTU5PUFFSU1RVVg=="
    assert secret not in repr(load_settings({"WEBHOOK_SECRET": secret}, dotenv_path=None))
