"""Ensemble losses: the prediction is the mean of the members' probabilities."""

import math

import torch

from moekit.ensemble import (
    ensemble_cross_entropy,
    ensemble_log_probs,
    ensemble_nll,
    ensemble_probs,
)


def test_ensemble_prediction_is_the_mean_of_member_probabilities():
    # One example, two members, two classes. Member 0: logits [0, 0] -> p = [0.5, 0.5];
    # member 1: logits [ln 3, 0] -> p = [0.75, 0.25]. Mean [0.625, 0.375]; NLL(label 0) = -ln 0.625.
    logits = torch.tensor([[0.0, 0.0], [math.log(3.0), 0.0]])
    torch.testing.assert_close(ensemble_probs(logits, 2), torch.tensor([[0.625, 0.375]]))
    torch.testing.assert_close(ensemble_log_probs(logits, 2), torch.tensor([[math.log(0.625), math.log(0.375)]]))
    torch.testing.assert_close(ensemble_nll(logits, torch.tensor([0]), 2), torch.tensor(-math.log(0.625)))
    # Training loss: mean of the members' cross-entropies, (ln 2 + ln(4/3)) / 2 -- not the ensemble NLL.
    expected = (math.log(2.0) + math.log(4.0 / 3.0)) / 2
    torch.testing.assert_close(ensemble_cross_entropy(logits, torch.tensor([0]), 2), torch.tensor(expected))


def test_one_member_losses_are_plain_cross_entropy():
    logits = torch.randn(6, 5)
    labels = torch.randint(0, 5, (6,))
    ce = torch.nn.functional.cross_entropy(logits, labels)
    torch.testing.assert_close(ensemble_cross_entropy(logits, labels, 1), ce)
    torch.testing.assert_close(ensemble_nll(logits, labels, 1), ce)
