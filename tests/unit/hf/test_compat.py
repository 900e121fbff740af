"""transformers stays optional, and a version outside the supported range gets a message that says so."""

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from moekit.hf import _compat

SRC = str(Path(__file__).resolve().parents[3] / "src")


def _python(code: str, *path: str) -> subprocess.CompletedProcess:
    env_path = ":".join([*path, SRC])
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          env={"PYTHONPATH": env_path, "PATH": "/usr/bin:/bin"}, timeout=120)


def test_moekit_hf_is_imported_on_first_use():
    proc = _python("""
        import sys
        import moekit
        assert "moekit.hf" not in sys.modules and "transformers" not in sys.modules
        moekit.hf.supported_blocks()
        assert "transformers" in sys.modules
        print("ok")
    """)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "ok"


@pytest.mark.parametrize("version, ok", [("5.0.0", True), ("5.23.0", True), ("5.99.1rc1", True), ("4.57.1", False),
                                         ("6.0.0.dev0", False), ("4.0", False)])
def test_version_range(version, ok):
    if ok:
        _compat.check_version(version)
    else:
        with pytest.raises(_compat.UnsupportedTransformersError,
                           match=rf"supports transformers >=5.0,<6.0 \(tested with 5.23.0\); found transformers "
                                 rf"{version}\. Install a supported version: pip install 'moekit\[hf\]'"):
            _compat.check_version(version)


def test_an_old_transformers_is_refused_at_import(tmp_path):
    fake = tmp_path / "transformers"
    fake.mkdir()
    (fake / "__init__.py").write_text('__version__ = "4.46.3"\n')
    proc = _python("""
        import moekit.hf
    """, str(tmp_path))
    assert proc.returncode != 0
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("moekit.hf._compat.UnsupportedTransformersError: moekit.hf supports transformers >=5.0,<6.0")
    assert "found transformers 4.46.3" in last and "AttributeError" not in proc.stderr


def test_a_missing_transformers_is_named():
    proc = _python("""
        import sys
        sys.modules["transformers"] = None  # as if not installed
        import moekit.hf
    """)
    last = proc.stderr.strip().splitlines()[-1]
    assert last == ("moekit.hf._compat.UnsupportedTransformersError: moekit.hf needs transformers >=5.0,<6.0, "
                    "which is not installed: pip install 'moekit[hf]'")


def test_a_missing_api_is_named():
    with pytest.raises(_compat.UnsupportedTransformersError,
                       match=r"has no transformers.integrations.moe.NoSuchThing, which moekit.hf uses; moekit.hf is "
                             r"tested with transformers 5.23.0"):
        _compat.require_attribute("transformers.integrations.moe", "NoSuchThing")
