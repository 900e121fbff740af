"""Synthetic facts: random key -> value pairs as token sequences, a task bounded by stored knowledge.

Legend: N facts, L key length, S = L + 1 tokens per sequence, A key symbols, V value symbols.

A key is L symbols drawn from A (so there are A**L possible keys); its value is one of V symbols,
drawn uniformly and independently of the key. Nothing about a value can be inferred from its
key or from other facts: a model predicts it only if it has stored it, log2(V) bits per fact.

A sequence is the key's tokens, then the value's token: token ids 0..A-1 are key symbols,
A..A+V-1 value symbols. The fact sets of one seed are nested: the first n facts of a larger set
are the set of n facts, so a sweep over n adds facts to the same ones.
"""

from __future__ import annotations

from typing import NamedTuple

import torch


class FactSet(NamedTuple):
    """``keys_NL`` key symbols in [0, A), ``values_N`` value symbols in [0, V)."""

    keys_NL: torch.Tensor
    values_N: torch.Tensor
    num_symbols: int  # A
    num_values: int  # V

    @property
    def vocab_size(self) -> int:
        return self.num_symbols + self.num_values

    def sequences(self) -> torch.Tensor:
        """[N, L + 1] token ids: the key, then the value (shifted past the key symbols)."""
        return torch.cat([self.keys_NL, (self.values_N + self.num_symbols)[:, None]], dim=1)


def make_facts(n: int, num_symbols: int, num_values: int, key_len: int = 2, seed: int = 0) -> FactSet:
    """The first ``n`` facts of seed ``seed``: distinct random keys, uniform random values.

    Keys are the first ``n`` of a random permutation of all ``num_symbols**key_len`` keys, and the
    values are drawn for the whole key space before any are taken, so a smaller set is a prefix of
    a larger one (same seed and sizes).
    """
    for name, value in (("num_symbols", num_symbols), ("num_values", num_values), ("key_len", key_len)):
        if value < 1:
            raise ValueError(f"{name}={value} must be >= 1")
    space = num_symbols ** key_len
    if not 1 <= n <= space:
        raise ValueError(f"n={n} facts must be in [1, {space}] (num_symbols={num_symbols} ** key_len={key_len})")
    if space > 1 << 24:
        raise ValueError(f"num_symbols={num_symbols} ** key_len={key_len} = {space} keys: at most 2**24 are supported")
    gen = torch.Generator().manual_seed(seed)
    codes_N = torch.randperm(space, generator=gen)[:n]
    values_space = torch.randint(0, num_values, (space,), generator=gen)
    # The key's symbols are the base-A digits of its code, most significant first.
    powers_L = num_symbols ** torch.arange(key_len - 1, -1, -1)
    keys_NL = (codes_N[:, None] // powers_L) % num_symbols
    return FactSet(keys_NL, values_space[codes_N], num_symbols, num_values)
