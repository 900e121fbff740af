"""Which transformers moekit.hf works with, checked once, with a message that says what to install.

moekit.hf reads the blocks of transformers' MoE models attribute by attribute, and two of its
features use transformers' extension points (the output-capturing hooks that collect router logits,
and the experts-implementation registry). Those are what changes between major versions, so a
version outside the supported range is refused up front instead of failing later with an
AttributeError deep inside a conversion.
"""

from __future__ import annotations

import importlib
from types import ModuleType

# The supported range (pyproject's ``hf`` extra) and the one version the tests run against.
MIN_VERSION = (5, 0)
MAX_VERSION = (6, 0)  # exclusive
TESTED_VERSION = "5.23.0"
INSTALL_HINT = "pip install 'moekit[hf]'"


class UnsupportedTransformersError(ImportError):
    """transformers is missing, or its version (or its API) is not one moekit.hf supports."""


def _parse(version: str) -> tuple[int, int]:
    """(major, minor) of a version string such as ``5.23.0`` or ``5.0.0rc1`` or ``5.1.dev0``."""
    parts = []
    for piece in version.split(".")[:2]:
        digits = ""
        for ch in piece:
            if not ch.isdigit():
                break
            digits += ch
        parts.append(int(digits) if digits else 0)
    while len(parts) < 2:
        parts.append(0)
    return parts[0], parts[1]


def supported_range() -> str:
    return f">={MIN_VERSION[0]}.{MIN_VERSION[1]},<{MAX_VERSION[0]}.{MAX_VERSION[1]}"


def check_version(version: str) -> None:
    """``UnsupportedTransformersError`` unless ``version`` is in the supported range."""
    if not MIN_VERSION <= _parse(version) < MAX_VERSION:
        raise UnsupportedTransformersError(
            f"moekit.hf supports transformers {supported_range()} (tested with {TESTED_VERSION}); "
            f"found transformers {version}. Install a supported version: {INSTALL_HINT}")


def require_transformers() -> ModuleType:
    """The transformers module, after checking that it is installed and of a supported version."""
    try:
        transformers = importlib.import_module("transformers")
    except ImportError as e:
        raise UnsupportedTransformersError(
            f"moekit.hf needs transformers {supported_range()}, which is not installed: {INSTALL_HINT}") from e
    check_version(str(getattr(transformers, "__version__", "0")))
    return transformers


def require_attribute(module_name: str, name: str):
    """``module_name.name`` from transformers, or ``UnsupportedTransformersError`` saying it is missing."""
    try:
        return getattr(importlib.import_module(module_name), name)
    except (ImportError, AttributeError) as e:
        version = getattr(importlib.import_module("transformers"), "__version__", "?")
        raise UnsupportedTransformersError(
            f"transformers {version} has no {module_name}.{name}, which moekit.hf uses; moekit.hf is tested "
            f"with transformers {TESTED_VERSION}: {INSTALL_HINT}") from e
