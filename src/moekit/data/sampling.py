"""Which examples make up training batch number ``step``: pure functions of their arguments.

Being stateless, a sampler needs no checkpointing: a resumed run sees the batches an uninterrupted
run would have seen. Both take ``(step, batch_size, n, seed)``; the token-stream sampler of the
language models is ``moekit.data.corpus.lm_batches``.
"""

from __future__ import annotations

import torch


def epoch_batch(step: int, batch_size: int, n: int, seed: int) -> torch.Tensor:
    """[batch_size] indices into ``n`` examples: epochs of random permutations, read in order
    (every example once per epoch)."""
    pos = torch.arange(step * batch_size, (step + 1) * batch_size)
    epochs = (pos // n).unique().tolist()
    perms = {e: torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + e)) for e in epochs}
    return torch.stack([perms[int(p) // n][int(p) % n] for p in pos])


def random_batch(step: int, batch_size: int, n: int, seed: int) -> list[int]:
    """``min(batch_size, n)`` indices into ``n`` examples, drawn with replacement; the generator is
    seeded by ``(seed, step)`` alone."""
    gen = torch.Generator().manual_seed(seed * 1_000_003 + step)
    return torch.randint(0, n, (min(batch_size, n),), generator=gen).tolist()
