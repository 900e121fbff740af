"""transformers and safetensors are optional extras: ``import moekit`` (and using its core) imports neither."""

import subprocess
import sys
import textwrap
from pathlib import Path

SRC = str(Path(__file__).resolve().parents[2] / "src")


def test_import_moekit_never_imports_transformers_or_safetensors():
    code = textwrap.dedent("""
        import sys
        import torch
        import moekit
        moekit.MoE(8, 4, 2, 16)(torch.randn(3, 8))
        moekit.upcycle(torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 8)), 4, 2)
        assert "transformers" not in sys.modules, "transformers imported"
        assert "safetensors" not in sys.modules, "safetensors imported"
        assert "moekit.hf" not in sys.modules, "moekit.hf imported"
        print("ok")
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env={"PYTHONPATH": SRC, "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "ok"
