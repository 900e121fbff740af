"""The english corpus: its block split, the reStructuredText cleaner, sources and missing packages."""

import pytest

from moekit.data import EOS, MissingDataError
from moekit.data.english import (
    PACKAGES,
    SOURCES,
    TEST_SLOT,
    VALID_SLOT,
    Source,
    english_corpus,
    missing_packages,
    rst_paragraphs,
    split_blocks,
)


def test_split_deals_every_period_of_blocks_one_to_valid_and_one_to_test():
    # Stream "a": 45 tokens in blocks of 2 -> blocks 0..22 (the last one short); slot 9 and 19 of
    # each period of 20 are held out: blocks 9 (valid) and 19 (test). Stream "b": 3 tokens, 2 blocks.
    a = [f"a{i}" for i in range(45)]
    b = ["b0", "b1", "b2"]
    parts = split_blocks([a, b], block_tokens=2, period=20)
    assert parts["valid"] == ["a18", "a19"]
    assert parts["test"] == ["a38", "a39"]
    assert parts["train"] == [t for t in a if t not in ("a18", "a19", "a38", "a39")] + b
    assert VALID_SLOT == 9 and TEST_SLOT == 19


def test_held_out_blocks_mix_the_sources_in_a_fixed_order():
    streams = [[f"s{s}_{i}" for i in range(400)] for s in range(4)]
    one, two = split_blocks(streams, block_tokens=10), split_blocks(streams, block_tokens=10)
    assert one == two
    first = {t.split("_")[0] for t in one["valid"][:40]}  # the first 4 blocks
    assert len(first) > 1  # not all from the first source, as an ordered split would give
    assert sorted(one["valid"] + one["test"] + one["train"]) == sorted(t for s in streams for t in s)
    with pytest.raises(ValueError, match="block_tokens=0"):
        split_blocks(streams, block_tokens=0)


def test_rst_paragraphs_keep_prose_and_drop_markup_and_code():
    text = """.. _tut-x:

*******
Classes
*******

Classes bundle data and
functionality: see :func:`len` and :ref:`the tutorial <tut-y>`.

::

    x = 1  # code is dropped

.. note::
   Directive bodies too.
Last line with ``literal``.
"""
    assert rst_paragraphs(text) == [
        "Classes",
        "Classes bundle data and functionality: see len and the tutorial.",
        "::",
        "Last line with literal.",
    ]


def test_a_corpus_of_given_sources_and_the_error_for_missing_packages():
    sources = [Source("one", "pkg-one", lambda: ["Hello, world.", "", "Bye."], lambda: True),
               Source("two", "pkg-two", lambda: ["Second source."] * 30, lambda: True)]
    corpus = english_corpus(sources)
    assert corpus.source == "english (one+two)"
    assert corpus.train[:5] == ["hello", ",", "world", ".", EOS]
    assert len(corpus.train) + len(corpus.valid) + len(corpus.test) == 8 + 30 * 4  # 5 + 3, then 4 a line
    gone = [sources[0], Source("gone", "pkg-gone", lambda: [], lambda: False)]
    assert missing_packages(gone) == ["pkg-gone"]
    with pytest.raises(MissingDataError, match="apt-get install pkg-gone"):
        english_corpus(gone)


def test_the_sources_name_their_debian_packages():
    assert PACKAGES == ("bible-kjv", "sword-text-web", "sword-comm-tdavid", "sword-comm-mhcc", "sword-comm-scofield",
                        "python3.11-doc")
    assert [s.name for s in SOURCES] == ["kjv", "web", "tdavid", "mhcc", "scofield", "python-doc"]
