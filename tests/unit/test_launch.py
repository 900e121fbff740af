"""The console script's entry point: Ctrl-C while moekit (and torch) are still being imported."""

import os
import subprocess
import sys
from pathlib import Path

import moekit

SRC = str(Path(moekit.__file__).parents[1])
# A real SIGINT, delivered deterministically while the command line's imports are under way: an
# import hook raises it when torch's first submodule is looked for.
INTERRUPTED_IMPORT = """
import signal, sys
# As in a terminal: Ctrl-C raises KeyboardInterrupt (a test run in the background inherits SIGINT ignored).
signal.signal(signal.SIGINT, signal.default_int_handler)
class Interrupt:
    def find_spec(self, name, path=None, target=None):
        if name.startswith("torch."):
            sys.meta_path.remove(self)
            signal.raise_signal(signal.SIGINT)
        return None
sys.meta_path.insert(0, Interrupt())
import moekit_launch
sys.argv = ["moekit", "demo", "--help"]
raise SystemExit(moekit_launch.main())
"""


def test_ctrl_c_during_the_imports_is_one_line_and_status_130():
    env = {**os.environ, "PYTHONPATH": SRC}
    proc = subprocess.run([sys.executable, "-c", INTERRUPTED_IMPORT], env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 130, proc.stderr
    assert proc.stderr == "moekit: interrupted while starting up\n"  # no traceback


def test_the_entry_point_runs_the_command_line(monkeypatch, capsys):
    import moekit_launch

    monkeypatch.setattr(sys, "argv", ["moekit", "--version"])
    try:
        moekit_launch.main()
    except SystemExit as e:
        assert e.code == 0
    assert capsys.readouterr().out.strip() == f"moekit {moekit.__version__}"


def test_the_console_script_is_the_guarded_entry_point():
    text = (Path(SRC).parent / "pyproject.toml").read_text()
    assert 'moekit = "moekit_launch:main"' in text and 'py-modules = ["moekit_launch"]' in text
