"""The scripts of ``benchmarks/`` are not a package: tests import them by file name."""

import importlib.util
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


@pytest.fixture
def load_script():
    """``load_script(name)``: ``benchmarks/<name>.py`` imported as the module ``name``, registered in
    ``sys.modules`` (ranks a script spawns import their worker from it by that name)."""
    def load(name: str):
        spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
        return module

    return load
