"""The vocabulary of every text job: special tokens first, then words by falling frequency.

Legend: N tokens.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence

import torch

PAD, UNK, BOS, EOS = "<pad>", "<unk>", "<bos>", "<eos>"
LM_SPECIALS = (UNK, EOS)  # a language model's stream: unknown words and the end of each line
SEQ2SEQ_SPECIALS = (PAD, UNK, BOS, EOS)  # a seq2seq model's batches: padding, start and end of a target


class Vocab:
    """Token <-> id map: the special tokens (ids 0, 1, ... in the order given), then the words.

    Words are ranked by falling frequency, ties alphabetically, so the vocabulary depends only on
    the token counts. Unknown tokens map to ``<unk>``, which every vocabulary holds.

    Args:
        itos: every token, in id order (the special ones first).
        specials: how many of the first tokens of ``itos`` are special (not words).
    """

    def __init__(self, itos: Sequence[str], specials: int = len(LM_SPECIALS)):
        self.itos = list(itos)
        if len(set(self.itos)) != len(self.itos):
            raise ValueError("vocabulary tokens must be unique")
        if UNK not in self.itos[:specials]:
            raise ValueError(f"the {specials} special tokens {self.itos[:specials]} must include {UNK}")
        self.specials = specials
        self.stoi = {t: i for i, t in enumerate(self.itos)}

    @classmethod
    def build(cls, tokens: Iterable[str], max_size: int, specials: Sequence[str] = LM_SPECIALS) -> Vocab:
        """The ``max_size`` tokens: ``specials``, then the most frequent other tokens of ``tokens``."""
        if max_size < len(specials):
            raise ValueError(f"max_size={max_size} leaves no room for the {len(specials)} special tokens "
                             f"{list(specials)}")
        counts = Counter(tokens)
        ranked = sorted((t for t in counts if t not in specials), key=lambda t: (-counts[t], t))
        return cls([*specials, *ranked[: max_size - len(specials)]], len(specials))

    def __len__(self) -> int:
        return len(self.itos)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Vocab) and (self.itos, self.specials) == (other.itos, other.specials)

    def id(self, token: str) -> int:
        """The id of ``token``; ``ValueError`` when it is not in the vocabulary."""
        if token not in self.stoi:
            raise ValueError(f"token {token!r} is not in the vocabulary")
        return self.stoi[token]

    @property
    def unk_id(self) -> int:
        return self.stoi[UNK]

    @property
    def eos_id(self) -> int:
        return self.id(EOS)

    @property
    def pad_id(self) -> int:
        return self.id(PAD)

    @property
    def bos_id(self) -> int:
        return self.id(BOS)

    def encode(self, tokens: Iterable[str]) -> torch.Tensor:
        """[N] long token ids; unknown tokens map to ``<unk>``."""
        get, unk = self.stoi.get, self.unk_id
        return torch.tensor([get(t, unk) for t in tokens], dtype=torch.long)

    def decode(self, ids: Iterable[int], hide_specials: bool = False) -> list[str]:
        """The tokens of ``ids``; ``hide_specials`` drops the structural ones (every special but ``<unk>``,
        which stays visible so that metrics see what was produced)."""
        tokens = [self.itos[int(i)] for i in ids]
        if not hide_specials:
            return tokens
        hidden = set(self.itos[: self.specials]) - {UNK}
        return [t for t in tokens if t not in hidden]

    def to_list(self) -> list[str]:
        return list(self.itos)
