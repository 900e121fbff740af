"""Batch samplers: pure functions of (step, batch_size, n, seed)."""

import torch

from moekit.data.sampling import epoch_batch, random_batch


def test_epoch_batches_cover_every_example_once_per_epoch():
    n, b = 10, 4
    seen = torch.cat([epoch_batch(s, b, n, seed=3) for s in range(5)])  # 20 draws = 2 epochs
    assert sorted(seen[:10].tolist()) == list(range(10)) and sorted(seen[10:].tolist()) == list(range(10))
    assert torch.equal(epoch_batch(7, b, n, 3), epoch_batch(7, b, n, 3))
    assert not torch.equal(seen[:10], seen[10:])  # each epoch its own permutation


def test_random_batches_are_reproducible_from_the_step():
    assert random_batch(5, 8, 20, seed=3) == random_batch(5, 8, 20, seed=3)
    assert random_batch(5, 8, 20, seed=3) != random_batch(6, 8, 20, seed=3)
    assert len(random_batch(0, 50, 20, seed=0)) == 20  # never more than n
    assert all(0 <= i < 20 for i in random_batch(1, 8, 20, seed=0))
