"""Synthetic facts: distinct keys, nested sets, the sequence layout, argument errors."""

import pytest
import torch

from moekit.data.facts import make_facts


def test_keys_are_distinct_and_values_in_range():
    f = make_facts(500, num_symbols=30, num_values=7, key_len=2, seed=3)
    assert f.keys_NL.shape == (500, 2) and f.values_N.shape == (500,)
    assert len({tuple(k) for k in f.keys_NL.tolist()}) == 500
    assert 0 <= f.keys_NL.min() and f.keys_NL.max() < 30 and 0 <= f.values_N.min() and f.values_N.max() < 7
    assert f.vocab_size == 37


def test_smaller_sets_are_prefixes_and_seeds_differ():
    small, large = make_facts(10, 16, 8, seed=1), make_facts(100, 16, 8, seed=1)
    assert torch.equal(small.keys_NL, large.keys_NL[:10]) and torch.equal(small.values_N, large.values_N[:10])
    assert not torch.equal(make_facts(100, 16, 8, seed=2).keys_NL, large.keys_NL)


def test_every_key_once_when_all_are_asked_for():
    f = make_facts(27, num_symbols=3, num_values=2, key_len=3)
    codes = (f.keys_NL * torch.tensor([9, 3, 1])).sum(1)
    assert sorted(codes.tolist()) == list(range(27))


def test_sequences_are_the_key_then_the_shifted_value():
    f = make_facts(5, num_symbols=4, num_values=3)
    seqs = f.sequences()
    assert seqs.shape == (5, 3)
    assert torch.equal(seqs[:, :2], f.keys_NL) and torch.equal(seqs[:, 2], f.values_N + 4)


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"n": 17, "num_symbols": 4, "num_values": 2}, "n=17"),
    ({"n": 0, "num_symbols": 4, "num_values": 2}, "n=0"),
    ({"n": 1, "num_symbols": 0, "num_values": 2}, "num_symbols=0"),
    ({"n": 1, "num_symbols": 4, "num_values": 0}, "num_values=0"),
    ({"n": 1, "num_symbols": 4096, "num_values": 2, "key_len": 3}, "2\\*\\*24"),
])
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        make_facts(**kwargs)
