"""The model families the service serves, and which one a name or a folder belongs to.

A family is a module (svd.py, wan.py, ltx.py) with the same members: FAMILY, PIPELINE (the diffusers class every
model of the family loads as), CLASS_NAMES (the `_class_name`s of model_index.json it recognises), NAMES,
TINY_DEFAULTS, describe(name, folder, tiny_defaults) -> ModelInfo, build_tiny(), denoiser(pipe) and
call_arguments(image, params); where loading needs more, loading_parts(model) (from_pretrained's overrides) and
after_loading(pipe, model). Adding a family is one module and one line here.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import ModuleType

from video_diffusion.models import ltx, svd, wan

FAMILIES: dict[str, ModuleType] = {module.FAMILY: module for module in (svd, wan, ltx)}
# A folder saved by save_tiny_pipeline carries this file, so the service knows its output is noise.
TINY_MARKER = "video_diffusion.json"


class UnknownFamily(ValueError):
    """A folder whose model_index.json names a pipeline no family serves; the message is safe to show."""


def family_named(name: str) -> ModuleType | None:
    return next((module for module in FAMILIES.values() if name in module.NAMES), None)


def family_of_folder(folder: Path) -> ModuleType:
    """The family a diffusers folder belongs to, by the pipeline its model_index.json names."""
    try:
        class_name = json.loads((folder / "model_index.json").read_text()).get("_class_name")
    except (OSError, ValueError, AttributeError):
        return svd  # not a diffusers folder: from_pretrained says so when it loads
    for module in FAMILIES.values():
        if class_name in module.CLASS_NAMES:
            return module
    known = ", ".join(name for module in FAMILIES.values() for name in module.CLASS_NAMES)
    raise UnknownFamily(f"the model folder's model_index.json names a pipeline this service does not serve "
                        f"(it serves {known})")


def tiny_defaults(folder: Path) -> dict | None:
    """The defaults our tiny build saved beside a folder, or None for any other folder."""
    try:
        return json.loads((folder / TINY_MARKER).read_text())["defaults"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
