"""``moekit facts``'s pieces: the value logits, recall by hand, and a model that learns a few facts."""

import pytest
import torch

from moekit.data.facts import make_facts
from moekit.jobs.facts.job import recall, value_logits
from moekit.models.lstm_lm import LSTMLM, LSTMLMConfig


def test_value_logits_are_the_last_key_positions_over_value_symbols():
    facts = make_facts(6, num_symbols=5, num_values=3)
    model = LSTMLM(LSTMLMConfig("moe-4", facts.vocab_size, dim=8, dropout=0.0)).eval()  # no gate noise
    seqs = facts.sequences()
    logits, out = value_logits(model, seqs, facts.num_symbols)
    assert logits.shape == (6, 3)
    full = model(seqs[:, :-1]).logits  # the value token itself is never read
    assert torch.allclose(logits, full[:, -1, 5:])


def test_recall_counts_argmax_hits():
    # A head that only scores value symbol 1 (bias 10): recall is the share of facts whose value is 1.
    facts = make_facts(40, num_symbols=7, num_values=3, seed=2)
    model = LSTMLM(LSTMLMConfig("lstm-4x", facts.vocab_size, dim=4, dropout=0.0))
    torch.nn.init.zeros_(model.head.weight)
    with torch.no_grad():
        model.head.bias.zero_()
        model.head.bias[7 + 1] = 10.0
    r = recall(model, facts, batch_size=16, device=torch.device("cpu"))
    assert r.recall == pytest.approx((facts.values_N == 1).float().mean().item())
    assert r.load_E is None
    # The NLL of the hits is about 0 and of the misses about 10 nats.
    miss = 1 - r.recall
    assert r.nll == pytest.approx(10 * miss, abs=1e-3)


def test_recall_of_an_moe_sums_its_expert_load():
    facts = make_facts(10, num_symbols=4, num_values=2)
    model = LSTMLM(LSTMLMConfig("moe-4", facts.vocab_size, dim=4, k=2, dropout=0.0))
    r = recall(model, facts, batch_size=3, device=torch.device("cpu"))
    assert r.load_E.shape == (4,) and r.load_E.sum().item() == 10 * 2 * 2  # 10 facts x 2 key tokens x k = 2
