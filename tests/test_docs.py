"""docs/routing.md: its Python examples run as written, and it maps every family of today's models."""

import re
from pathlib import Path

import pytest
import torch

DOC = Path(__file__).resolve().parents[1] / "docs" / "routing.md"


def test_routing_doc_python_blocks_run(capsys):
    torch.manual_seed(0)
    namespace: dict = {"__name__": "routing_doc"}
    blocks = re.findall(r"^```python\n(.*?)^```", DOC.read_text(encoding="utf-8"), flags=re.M | re.S)
    assert len(blocks) >= 4
    for i, code in enumerate(blocks):  # one session: later blocks use earlier names
        try:
            exec(compile(code, f"docs/routing.md python block {i}", "exec"), namespace)
        except Exception as e:  # pragma: no cover - the message is what matters when it fails
            pytest.fail(f"docs/routing.md python block {i} failed: {type(e).__name__}: {e}")
    printed = capsys.readouterr().out
    assert "tensor([6, 6, 6, 6, 6, 6, 6, 6])" in printed and "tensor([4, 4, 4, 4])" in printed
    assert namespace["moe"].router.expert_bias.abs().sum() > 0


def test_routing_doc_maps_every_family():
    text = DOC.read_text(encoding="utf-8")
    section = text.split("## Routing in today's models")[1].split("\n## ")[0]
    for family in ("Mixtral", "Qwen2-MoE", "Qwen3-MoE", "OLMoE", "DeepSeek-V3", "GPT-OSS", "Llama 4",
                   "SwitchTransformers"):
        assert f"| {family} |" in section, family
