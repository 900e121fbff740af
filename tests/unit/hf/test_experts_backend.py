"""experts_implementation="moekit": moekit's expert compute inside unmodified transformers models.

The model's own router decides; only the experts' computation changes, so the logits and every
gradient equal the eager implementation's, in float32 and, here, to float64 rounding in float64.
"""

import copy

import hf_models as hm
import pytest
import torch

import moekit.hf  # noqa: F401 - registers "moekit"
from moekit.hf.experts_backend import moekit_experts_forward

torch.set_num_threads(1)

# The families whose experts class takes transformers' experts-implementation decorator.
WITH_INTERFACE = ["mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v3", "gpt_oss"]


@pytest.fixture(scope="module", params=WITH_INTERFACE)
def models(request):
    family = request.param
    eager = hm.build(family)
    eager.set_experts_implementation("eager")
    ours = copy.deepcopy(eager)
    ours.set_experts_implementation("moekit")
    assert ours.config._experts_implementation == "moekit"
    return family, eager, ours


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_logits_and_every_gradient_equal_eager(models, dtype):
    family, eager, ours = models
    eager, ours = copy.deepcopy(eager).to(dtype), copy.deepcopy(ours).to(dtype)
    ids, mask, labels = hm.batch(family)
    outs = []
    for model in (eager, ours):
        out = hm.run(model, family, ids, mask, labels, output_router_logits=True)
        out.loss.backward()
        outs.append(out)
    rel = 1e-5 if dtype == torch.float32 else 1e-12
    hm.assert_close(outs[1].logits, outs[0].logits, rel=rel)
    grads = dict(ours.named_parameters())
    for name, p in eager.named_parameters():
        if p.grad is not None:
            hm.assert_close(grads[name].grad, p.grad, rel=10 * rel)
    experts = [n for n, _ in eager.named_parameters() if "experts.gate_up_proj" in n]
    assert experts and all(grads[n].grad.abs().sum() > 0 for n in experts)


def test_from_pretrained_with_experts_implementation_moekit(models, tmp_path):
    family, eager, _ = models
    eager.save_pretrained(tmp_path)
    loaded = type(eager).from_pretrained(tmp_path, experts_implementation="moekit").eval()
    assert loaded.config._experts_implementation == "moekit"
    ids, mask, _ = hm.batch(family, seed=1)
    with torch.no_grad():
        hm.assert_close(hm.run(loaded, family, ids, mask).logits, hm.run(eager, family, ids, mask).logits)


def test_expert_parallel_sentinel_slots_are_skipped():
    """Under transformers' expert parallelism slots of other ranks' experts carry ids >= E and weight 0."""
    experts = hm.build("mixtral").model.layers[0].mlp.experts
    x = torch.randn(6, 32)
    index = torch.tensor([[0, 1], [2, 4], [4, 3], [1, 2], [4, 4], [3, 0]])  # 4 = E: a sentinel
    weights = torch.rand(6, 2) * (index < 4)
    experts._is_expert_parallel = True
    try:
        got = moekit_experts_forward(experts, x, index, weights)
    finally:
        experts._is_expert_parallel = False
    want = torch.zeros_like(x)  # by hand: each token's real slots
    for t in range(6):
        for j in range(2):
            e = int(index[t, j])
            if e < 4:
                gate, up = torch.nn.functional.linear(x[t], experts.gate_up_proj[e]).chunk(2)
                want[t] += weights[t, j] * torch.nn.functional.linear(torch.nn.functional.silu(gate) * up,
                                                                      experts.down_proj[e])
    hm.assert_close(got, want)


def test_experts_moekit_does_not_compute_are_refused():
    model = hm.build("mixtral", hidden_act="gelu")
    ids, mask, _ = hm.batch("mixtral")
    model.set_experts_implementation("moekit")
    with pytest.raises(NotImplementedError, match="MixtralExperts: gated experts with a non-SiLU gate"):
        hm.run(model, "mixtral", ids, mask)
    experts = hm.build("mixtral").model.layers[0].mlp.experts
    experts.has_post_expert_norm = True
    with pytest.raises(NotImplementedError, match="a norm after each expert"):
        moekit_experts_forward(experts, torch.randn(2, 32), torch.zeros(2, 2, dtype=torch.long), torch.ones(2, 2))
