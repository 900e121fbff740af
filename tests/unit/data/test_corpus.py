"""Corpus loading, tokenisation, vocabulary, splits and batching."""

import shutil
import subprocess

import pytest
import torch

from moekit.data import (
    EOS,
    KJV_BOOKS,
    KJV_SPLIT,
    UNK,
    DataFileError,
    MissingDataError,
    Verse,
    Vocab,
    eval_batches,
    kjv_corpus,
    lm_batches,
    load_kjv,
    parse_bible_output,
    split_verses,
    text_file_corpus,
    tokenize,
)

torch.set_num_threads(1)

HAVE_BIBLE = shutil.which("bible") is not None
needs_bible = pytest.mark.skipif(
    not HAVE_BIBLE, reason="the `bible` program (Debian package bible-kjv) is not installed"
)

# Output of `bible -l40 gen1:1-2 ex40:38-lev1:1`, trimmed: verses wrap onto unindented lines.
WRAPPED = """
Genesis 1

  1 In the beginning God created the
heaven and the earth.
  2 And the earth was without form, and
void; and darkness was upon the face of
the deep.

Exodus 40

  38 For the cloud of the LORD was upon
the tabernacle by day.

Leviticus 1

  1 And the LORD called unto Moses,
"""


def test_parse_joins_wrapped_lines_and_tracks_book_and_chapter():
    assert parse_bible_output(WRAPPED) == [
        Verse("Genesis", 1, 1, "In the beginning God created the heaven and the earth."),
        Verse(
            "Genesis",
            1,
            2,
            "And the earth was without form, and void; and darkness was upon the face of the deep.",
        ),
        Verse("Exodus", 40, 38, "For the cloud of the LORD was upon the tabernacle by day."),
        Verse("Leviticus", 1, 1, "And the LORD called unto Moses,"),
    ]


def test_parse_rejects_text_that_is_not_bible_output():
    with pytest.raises(ValueError, match="unexpected line"):
        parse_bible_output("hello world\n")


def test_missing_program_names_the_package():
    with pytest.raises(MissingDataError, match="bible-kjv"):
        load_kjv(program="no-such-bible-program-moekit")


@pytest.fixture(scope="module")
def kjv():
    return load_kjv()


@needs_bible
def test_kjv_has_every_verse_of_all_66_books(kjv):
    assert len(kjv) == 31102
    assert tuple(dict.fromkeys(v.book for v in kjv)) == KJV_BOOKS
    assert len({(v.book, v.chapter) for v in kjv}) == 1189
    assert kjv[0] == Verse("Genesis", 1, 1, "In the beginning God created the heaven and the earth.")
    assert kjv[-1] == Verse("Revelation", 22, 21, "The grace of our Lord Jesus Christ be with you all. Amen.")
    by_ref = {(v.book, v.chapter, v.verse): v.text for v in kjv}
    assert by_ref["John", 11, 35] == "Jesus wept."
    assert max(v.verse for v in kjv if (v.book, v.chapter) == ("Psalms", 119)) == 176
    assert all(v.text and "\n" not in v.text for v in kjv)


@needs_bible
def test_narrow_wrapped_output_parses_to_the_same_verses():
    def run(width):
        cmd = ["bible", f"-l{width}", "Gen1:1-Exo2:10"]
        return parse_bible_output(subprocess.run(cmd, capture_output=True, text=True, check=True).stdout)

    narrow, wide = run(30), run(100000)
    assert len(wide) == 1533 + 22 + 10  # all of Genesis, Exodus 1 and 2:1-10
    assert narrow == wide


@needs_bible
def test_kjv_split_is_by_whole_books(kjv):
    parts = split_verses(kjv)
    assert sum(len(p) for p in parts.values()) == len(kjv)
    for name in ("valid", "test"):
        assert {v.book for v in parts[name]} == set(KJV_SPLIT[name])
        assert 0.01 < len(parts[name]) / len(kjv) < 0.05
    assert not {v.book for v in parts["train"]} & (set(KJV_SPLIT["valid"]) | set(KJV_SPLIT["test"]))


@needs_bible
def test_kjv_corpus_streams_end_each_verse_with_eos():
    corpus = kjv_corpus()
    assert corpus.train[:11] == [
        "in",
        "the",
        "beginning",
        "god",
        "created",
        "the",
        "heaven",
        "and",
        "the",
        "earth",
        ".",
    ]
    assert corpus.train[11] == EOS
    n_eos = sum(t == EOS for part in (corpus.train, corpus.valid, corpus.test) for t in part)
    assert n_eos == 31102


def test_split_constant_names_real_disjoint_books():
    valid, test = set(KJV_SPLIT["valid"]), set(KJV_SPLIT["test"])
    assert valid <= set(KJV_BOOKS) and test <= set(KJV_BOOKS)
    assert not valid & test
    verses = [Verse(b, 1, 1, "x") for b in KJV_BOOKS]
    parts = split_verses(verses)
    assert [v.book for v in parts["valid"]] == [b for b in KJV_BOOKS if b in valid]
    assert len(parts["train"]) == 66 - len(valid) - len(test)


def test_tokenize_lowercases_and_splits_punctuation():
    assert tokenize("And God said, Let there be light: and there was light.") == [
        "and",
        "god",
        "said",
        ",",
        "let",
        "there",
        "be",
        "light",
        ":",
        "and",
        "there",
        "was",
        "light",
        ".",
    ]
    assert tokenize("The LORD's (house)--hear!") == [
        "the",
        "lord's",
        "(",
        "house",
        ")",
        "-",
        "-",
        "hear",
        "!",
    ]
    assert tokenize("  \n ") == []


def test_vocab_orders_by_frequency_caps_size_and_maps_unknowns():
    tokens = ["b", "a", "c", "a", "b", "a", "d", EOS, EOS]
    vocab = Vocab.build(tokens, max_size=4)
    assert vocab.to_list() == [UNK, EOS, "a", "b"]  # a:3, b:2; c and d (1 each) do not fit
    assert len(vocab) == 4 and vocab.unk_id == 0 and vocab.eos_id == 1
    assert vocab.encode(["a", "c", "b", EOS, "zzz"]).tolist() == [2, 0, 3, 1, 0]
    assert vocab.decode([2, 3, 1, 0]) == ["a", "b", EOS, UNK]
    # Ties are broken alphabetically, so the order does not depend on the input order.
    assert Vocab.build(["y", "x", "z"], 10).to_list() == [UNK, EOS, "x", "y", "z"]
    with pytest.raises(ValueError, match="max_size=1"):
        Vocab.build(tokens, max_size=1)


def _write(tmp_path, name, data: bytes):
    path = tmp_path / name
    path.write_bytes(data)
    return path


@pytest.mark.parametrize(
    "name, data, reason",
    [
        ("empty.txt", b"", "empty"),
        ("blank.txt", b"  \n\n \t\n", "empty"),
        ("image.bin", b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR", "binary"),
        ("latin1.txt", "caf\u00e9 au lait\n".encode("latin-1") * 50, "not UTF-8"),
    ],
)
def test_bad_text_files_raise_value_error_naming_the_file(tmp_path, name, data, reason):
    path = _write(tmp_path, name, data)
    with pytest.raises(ValueError, match=reason) as err:
        text_file_corpus(path)
    assert isinstance(err.value, DataFileError)
    assert str(path) in str(err.value)


def test_missing_and_too_short_text_files_raise_value_error(tmp_path):
    missing = tmp_path / "nope.txt"
    with pytest.raises(DataFileError, match="nope.txt"):
        text_file_corpus(missing)
    short = _write(tmp_path, "short.txt", b"just a few words here\n")
    with pytest.raises(DataFileError, match="too short"):
        text_file_corpus(short)


def test_text_file_splits_into_contiguous_blocks_in_file_order(tmp_path):
    lines = [f"line {i} says w{i % 7} and w{i % 11} ." for i in range(400)]
    path = _write(tmp_path, "t.txt", ("\n".join(lines) + "\n").encode())
    corpus = text_file_corpus(path)
    everything = [t for line in lines for t in [*tokenize(line), EOS]]
    assert corpus.train + corpus.valid + corpus.test == everything
    n = len(everything)
    assert len(corpus.valid) == int(0.05 * n) and len(corpus.test) == int(0.05 * n)
    assert corpus.source == str(path)


def test_lm_batches_are_deterministic_shifted_and_resumable():
    ids = torch.arange(1000)
    first = [b for _, b in zip(range(5), lm_batches(ids, 4, 8, seed=3), strict=False)]
    again = [b for _, b in zip(range(5), lm_batches(ids, 4, 8, seed=3), strict=False)]
    other = next(lm_batches(ids, 4, 8, seed=4))
    for (x, y), (x2, y2) in zip(first, again, strict=True):
        assert x.shape == y.shape == (4, 8)
        assert torch.equal(x, x2) and torch.equal(y, y2)
        assert torch.equal(y, x + 1)  # ids are positions, so targets are the next positions
    assert not torch.equal(first[0][0], other[0])
    resumed = next(lm_batches(ids, 4, 8, seed=3, start_step=3))
    assert torch.equal(resumed[0], first[3][0])


def test_eval_batches_cover_every_target_once_in_order():
    ids = torch.arange(103)
    batches = list(eval_batches(ids, batch_size=3, seq_len=10))
    xs = torch.cat([x.flatten() for x, _ in batches])
    ys = torch.cat([y.flatten() for _, y in batches])
    assert torch.equal(xs, ids[:-1]) and torch.equal(ys, ids[1:])
    assert [tuple(x.shape) for x, _ in batches] == [(3, 10), (3, 10), (3, 10), (1, 10), (1, 2)]
    capped = torch.cat([y.flatten() for _, y in eval_batches(ids, 3, 10, max_tokens=25)])
    assert torch.equal(capped, ids[1:26])
