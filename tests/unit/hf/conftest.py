"""moekit.hf's tests need transformers (the ``moekit[hf]`` extra): skipped without it."""

import importlib.util
import sys
from pathlib import Path

if importlib.util.find_spec("transformers") is None:
    collect_ignore_glob = ["test_*.py"]
else:
    # hf_models.py builds the tiny models every test file here uses.
    sys.path.insert(0, str(Path(__file__).parent))
