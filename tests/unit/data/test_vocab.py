"""The one vocabulary: specials first, words by frequency then alphabetically; encode and decode."""

import pytest
import torch

from moekit.data.vocab import BOS, EOS, PAD, SEQ2SEQ_SPECIALS, UNK, Vocab


def test_language_model_vocabulary():
    v = Vocab.build("b a b c b a d".split(), max_size=4)
    # <unk> 0, <eos> 1, then b (3 times), a (twice); c and d (once each) compete for the last place: c wins.
    assert v.itos == [UNK, EOS, "b", "a"]
    assert v.unk_id == 0 and v.eos_id == 1 and len(v) == 4
    assert torch.equal(v.encode(["a", "zz", "b", EOS]), torch.tensor([3, 0, 2, 1]))
    assert v.decode([2, 1, 0]) == ["b", EOS, UNK]
    assert v.decode([2, 1, 0], hide_specials=True) == ["b", UNK]  # <unk> stays visible
    with pytest.raises(ValueError, match="<pad>"):
        _ = v.pad_id


def test_specials_are_never_counted_as_words_and_size_is_checked():
    v = Vocab.build([UNK, UNK, "x", PAD], max_size=10, specials=SEQ2SEQ_SPECIALS)
    assert v.itos == [PAD, UNK, BOS, EOS, "x"] and (v.pad_id, v.bos_id) == (0, 2)
    with pytest.raises(ValueError, match="max_size=3"):
        Vocab.build(["x"], max_size=3, specials=SEQ2SEQ_SPECIALS)
    with pytest.raises(ValueError, match="unique"):
        Vocab([UNK, EOS, "a", "a"])
    with pytest.raises(ValueError, match="<unk>"):
        Vocab(["<s>", "a"], specials=1)


def test_equality_and_round_trip():
    v = Vocab.build("a b".split(), 10)
    assert Vocab(v.to_list()) == v and Vocab(v.to_list(), specials=1) != v
