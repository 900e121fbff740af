"""Switch routing: the gate is the router's unnormalised probability."""

import torch

import moekit


def test_switch_gate_is_the_unnormalised_router_probability():
    r = moekit.SwitchRouter(6, 4)
    x = torch.randn(8, 6)
    routing = r(x)
    probs = torch.softmax(x @ r.w_gate.detach(), -1)
    assert routing.indices.shape == (8, 1)
    torch.testing.assert_close(routing.weights[:, 0], probs.max(-1).values)
    losses = routing.stats.losses
    torch.testing.assert_close(routing.aux_loss, 0.01 * losses["switch"] + 1e-3 * losses["z"])
