"""``moekit lm``'s training and evaluation pieces: padded evaluation batches and the perplexity pass."""

import math

import pytest
import torch

from moekit.jobs.lm.job import evaluate, padded_batches
from moekit.models.lstm_lm import LSTMLM, LSTMLMConfig


def test_padded_batches_pad_on_the_right_and_mark_real_tokens():
    x = torch.arange(6).view(2, 3)
    y = x + 10
    [(x_BS, y_BS, mask_BS)] = list(padded_batches([(x, y)], batch_size=3, seq_len=4))
    assert x_BS.shape == y_BS.shape == mask_BS.shape == (3, 4)
    assert torch.equal(x_BS[:2, :3], x) and torch.equal(y_BS[:2, :3], y)
    assert mask_BS.sum().item() == 6 and mask_BS[:2, :3].all() and not mask_BS[2].any()


def test_perplexity_of_an_untrained_model_is_near_the_vocabulary_size():
    # Zero-initialised head: uniform predictions, so perplexity = V exactly.
    model = LSTMLM(LSTMLMConfig("moe-4", vocab_size=40, dim=8))
    torch.nn.init.zeros_(model.head.weight)
    torch.nn.init.zeros_(model.head.bias)
    ev = evaluate(model, torch.randint(0, 40, (50,)), batch_size=4, seq_len=6, device=torch.device("cpu"))
    assert ev.nll_N.shape == (49,)
    assert ev.ppl == pytest.approx(40.0)
    assert ev.importance_E.sum().item() == pytest.approx(49.0)  # gates of each real token sum to 1
    assert ev.load_E.sum().item() == 49 * 4 and math.isfinite(ev.ppl)
