"""Pair data: the JSON-lines reader, the synthetic set, the vocabulary and batching."""

import json

import pytest
import torch

from moekit.data.pairs import (
    SYNTHETIC_RULES,
    Example,
    PairDataError,
    decode_text,
    encode_pairs,
    encode_text,
    make_batch,
    pair_vocab,
    read_jsonl,
    split_examples,
    synthetic_examples,
    write_jsonl,
)
from moekit.data.sampling import random_batch


def _write(tmp_path, lines):
    path = tmp_path / "pairs.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_reads_sources_with_several_targets_and_skips_blank_lines(tmp_path):
    path = _write(tmp_path, [json.dumps({"source": "a b", "targets": ["c", "d e"]}), "",
                             json.dumps({"source": "f", "targets": ["g"]})])
    ex = read_jsonl(path)
    assert [e.source for e in ex] == ["a b", "f"]
    assert ex[0].targets == ["c", "d e"]


@pytest.mark.parametrize("bad, what", [
    ("{not json", "not valid JSON"),
    (json.dumps(["a", "b"]), "expected an object"),
    (json.dumps({"source": "a"}), "'targets'"),
    (json.dumps({"source": "", "targets": ["b"]}), "'source'"),
    (json.dumps({"source": "a", "targets": []}), "'targets'"),
    (json.dumps({"source": "a", "targets": ["b", 3]}), "'targets'"),
])
def test_a_malformed_line_is_named_by_its_number(tmp_path, bad, what):
    good = json.dumps({"source": "a", "targets": ["b"]})
    path = _write(tmp_path, [good, good, bad, good])
    with pytest.raises(PairDataError, match=rf"pairs.jsonl:3: .*{what}"):
        read_jsonl(path)


def test_empty_or_missing_file_is_refused(tmp_path):
    with pytest.raises(PairDataError, match="no example"):
        read_jsonl(_write(tmp_path, [""]))
    with pytest.raises(PairDataError, match="cannot read"):
        read_jsonl(tmp_path / "missing.jsonl")


def test_synthetic_targets_follow_their_rules():
    ex = synthetic_examples(50, 4, seed=1)
    assert SYNTHETIC_RULES[:4] == ("copy", "shift", "shift_back", "reverse")
    for e in ex:
        src = [int(w[1:]) for w in e.source.split()]
        copy, shift, back, rev = ([int(w[1:]) for w in t.split()] for t in e.targets)
        assert copy == src and rev == src[::-1]
        assert shift == [(i + 1) % 16 for i in src] and back == [(i - 1) % 16 for i in src]
        assert len(set(e.targets)) == 4
    assert len({e.source for e in ex}) == 50
    assert synthetic_examples(50, 4, seed=1) == ex
    with pytest.raises(ValueError, match="k=7"):
        synthetic_examples(5, 7)


def test_jsonl_round_trip(tmp_path):
    ex = synthetic_examples(5, 3)
    write_jsonl(tmp_path / "s.jsonl", ex)
    assert read_jsonl(tmp_path / "s.jsonl") == ex


def test_split_keeps_the_order_and_a_nonempty_test_set():
    ex = synthetic_examples(20, 2)
    train, test = split_examples(ex, 0.1)
    assert train + test == ex and len(test) == 2
    with pytest.raises(ValueError, match="at least 2"):
        split_examples(ex[:1])


def test_pair_vocab_ranks_by_frequency_and_keeps_specials():
    v = pair_vocab([Example("b a b", ["c b a"])], max_size=6, extra=["<expert_0>"])
    assert v.itos == ["<pad>", "<unk>", "<bos>", "<eos>", "<expert_0>", "b"]
    assert encode_text(v, "b zz") == [5, v.unk_id]
    assert encode_text(v, "b b b", max_len=2) == [5, 5]
    # Structural tokens vanish when decoding, <unk> stays visible.
    assert decode_text(v, [v.bos_id, 4, 5, v.unk_id, v.eos_id, v.pad_id]) == "b <unk>"
    with pytest.raises(ValueError, match="max_size=3"):
        pair_vocab([Example("a", ["a"])], max_size=3)


def test_batches_are_shifted_padded_and_replayable():
    ex = synthetic_examples(10, 2)
    v = pair_vocab(ex, 100)
    pairs = encode_pairs(ex, v, max_src=5, max_tgt=4)
    assert len(pairs) == 20 and pairs.labels[:4] == [0, 1, 0, 1]
    assert all(len(s) <= 5 and s[-1] == v.eos_id for s in pairs.src)
    b = make_batch(pairs, [0, 1], v)
    assert bool((b.tgt_in[:, 0] == v.bos_id).all())
    for row_in, row_out in zip(b.tgt_in, b.tgt_out, strict=True):
        n = int((row_out != 0).sum())
        assert row_out[n - 1] == v.eos_id and torch.equal(row_in[1:n], row_out[: n - 1])
    assert random_batch(5, 8, 20, seed=3) == random_batch(5, 8, 20, seed=3)
    assert random_batch(5, 8, 20, seed=3) != random_batch(6, 8, 20, seed=3)
