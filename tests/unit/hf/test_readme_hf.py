"""The README's transformers examples (fenced ``python hf``) run as written, in the README's session.

tests/test_readme.py runs the plain ``python`` blocks, which need no optional extra; the ``hf``
blocks need transformers and safetensors, so they are run here, with the plain blocks before them.
"""

import re
from pathlib import Path

import pytest
import torch

README = Path(__file__).resolve().parents[3] / "README.md"
pytest.importorskip("safetensors")


def test_readme_python_and_hf_blocks_run(capsys):
    blocks = re.findall(r"^```(python(?: hf)?)\n(.*?)^```", README.read_text(encoding="utf-8"), flags=re.M | re.S)
    assert sum(kind == "python hf" for kind, _ in blocks) >= 3
    torch.manual_seed(0)
    namespace: dict = {"__name__": "readme"}
    for i, (kind, code) in enumerate(blocks):
        try:
            exec(compile(code, f"README.md {kind} block {i}", "exec"), namespace)
        except Exception as e:  # pragma: no cover - the message is what matters when it fails
            pytest.fail(f"README {kind} block {i} failed: {type(e).__name__}: {e}")
    out = capsys.readouterr().out
    assert "['model.layers.0.mlp', 'model.layers.1.mlp']" in out
    assert namespace["again"].config._experts_implementation != "moekit"
    assert namespace["fast"].config._experts_implementation == "moekit"
