"""FLOPs are counted by FlopCounterMode, routed ones included."""

import torch

import moekit
from moekit.metrics.flops import flops_per_example, routed_flops_per_example


def test_flops_are_counted_not_derived():
    # A bias-free Linear(4, 3): 4*3 multiply-adds = 24 FLOPs per example.
    assert flops_per_example(torch.nn.Linear(4, 3, bias=False), torch.randn(5, 4)) == 24
    # A dropless top-1 V-MoE layer (D=4, E=4, F=6) per token: router 2*4*4 = 32, one expert
    # 2*4*6 + 2*6*4 = 96: 128. A dense FFN of the same width would also cost 96 per expert computed.
    # The bmm backend would also be charged for the rows it pads each expert's segment with.
    moe = moekit.MoE(4, 4, k=1, hidden_dim=6, router="vmoe", expert_backend="bmm").eval()
    assert routed_flops_per_example(moe, torch.randn(10, 4)) == 128
    assert moe.experts.backend == "bmm"
