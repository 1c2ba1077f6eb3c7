"""Rewrite the parameter and variable tables (docs/api.md, docs/configuration.md: wherever their markers are) and
.env.example from the schemas (`make docs`)."""

from __future__ import annotations

import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import config  # noqa: E402
from video_diffusion import params  # noqa: E402


def env_example() -> str:
    lines = ["# video-diffusion settings. Copy to .env and uncomment what you change; the environment wins.", ""]
    for var in config.VARIABLES:
        default = "" if var.default is None else str(var.default).lower() if isinstance(var.default, bool) \
            else str(var.default)
        lines += [f"# {var.help}", f"# {var.name}={default}", ""]
    return "\n".join(lines)


def documents() -> list[Path]:
    """README and every page under docs/: the files whose generated tables `make docs` keeps."""
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def readme(text: str) -> str:
    for name, table in (("params", params.params_markdown()), ("variables", config.variables_markdown())):
        text = re.sub(rf"(<!-- {name} -->\n).*?(\n<!-- /{name} -->)", lambda m: m.group(1) + table + m.group(2),
                      text, flags=re.S)
    return text


if __name__ == "__main__":
    (ROOT / ".env.example").write_text(env_example())
    for path in documents():
        path.write_text(readme(path.read_text()))
