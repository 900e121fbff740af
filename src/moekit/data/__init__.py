"""Data sources and batching: real corpora read offline (the King James Bible, the World English
Bible, Fashion-MNIST, any text, JSON-lines or .npz file), synthetic sets, one vocabulary, samplers."""

from moekit.data.corpus import (
    KJV_BOOKS,
    KJV_SPLIT,
    Corpus,
    DataFileError,
    MissingDataError,
    Verse,
    eval_batches,
    kjv_corpus,
    lm_batch,
    lm_batches,
    load_kjv,
    parse_bible_output,
    split_verses,
    text_file_corpus,
    tokenize,
)
from moekit.data.vocab import BOS, EOS, PAD, UNK, Vocab

__all__ = [
    "BOS",
    "EOS",
    "KJV_BOOKS",
    "KJV_SPLIT",
    "PAD",
    "UNK",
    "Corpus",
    "DataFileError",
    "MissingDataError",
    "Verse",
    "Vocab",
    "eval_batches",
    "kjv_corpus",
    "lm_batch",
    "lm_batches",
    "load_kjv",
    "parse_bible_output",
    "split_verses",
    "text_file_corpus",
    "tokenize",
]
