"""The README's Python examples run as written, and it opens with the two setup commands."""

import re
from pathlib import Path

import pytest
import torch

README = Path(__file__).resolve().parents[1] / "README.md"


def _blocks(lang: str) -> list[str]:
    return re.findall(rf"^```{lang}\n(.*?)^```", README.read_text(encoding="utf-8"), flags=re.M | re.S)


def test_readme_opens_with_make_demo_and_make_test():
    lines = [line for line in README.read_text(encoding="utf-8").splitlines() if line.strip()]
    assert lines[0].startswith("# ")  # the title, then a one-line description, then the commands
    assert lines[2].startswith("```") and lines[5] == "```"
    commands = [line.split("#")[0].strip() for line in lines[3:5]]
    assert commands == ["make demo", "make test"]


def test_readme_has_python_examples():
    assert _blocks("python")


def test_readme_python_blocks_run(capsys):
    torch.manual_seed(0)
    namespace: dict = {"__name__": "readme"}
    # The blocks form one session: later blocks use names defined by earlier ones.
    for i, code in enumerate(_blocks("python")):
        try:
            exec(compile(code, f"README.md python block {i}", "exec"), namespace)
        except Exception as e:  # pragma: no cover - the message is what matters when it fails
            pytest.fail(f"README python block {i} failed: {type(e).__name__}: {e}")
    assert "noisy_topk" in capsys.readouterr().out
