"""Text corpora for language modelling: the King James Bible and any UTF-8 text file.

Legend: N tokens in a stream, B batch size, S sequence length.

Everything is read from local files or local programs; nothing is downloaded and nothing is
cached on disk (a run keeps what it needs in its own out directory).
"""

from __future__ import annotations

import re
import shutil
import subprocess
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import NamedTuple

import torch

from moekit.data.vocab import EOS

KJV_PACKAGE = "bible-kjv"
KJV_PROGRAM = "bible"
KJV_RANGE = "Gen1:1-Rev22:21"
KJV_NUM_VERSES = 31102

# Canonical order; these are the names the `bible` program prints in its chapter headers.
KJV_BOOKS: tuple[str, ...] = (
    "Genesis", "Exodus", "Leviticus", "Numbers", "Deuteronomy", "Joshua", "Judges", "Ruth",
    "1 Samuel", "2 Samuel", "1 Kings", "2 Kings", "1 Chronicles", "2 Chronicles", "Ezra",
    "Nehemiah", "Esther", "Job", "Psalms", "Proverbs", "Ecclesiastes", "Song of Solomon", "Isaiah",
    "Jeremiah", "Lamentations", "Ezekiel", "Daniel", "Hosea", "Joel", "Amos", "Obadiah", "Jonah",
    "Micah", "Nahum", "Habakkuk", "Zephaniah", "Haggai", "Zechariah", "Malachi",
    "Matthew", "Mark", "Luke", "John", "Acts", "Romans", "1 Corinthians", "2 Corinthians",
    "Galatians", "Ephesians", "Philippians", "Colossians", "1 Thessalonians", "2 Thessalonians",
    "1 Timothy", "2 Timothy", "Titus", "Philemon", "Hebrews", "James", "1 Peter", "2 Peter",
    "1 John", "2 John", "3 John", "Jude", "Revelation",
)  # fmt: skip

# Held-out books (about 2% of the words each). Whole books, so no verse of a held-out chapter
# leaks into training; each set mixes narrative, poetry/wisdom, prophecy and epistles.
KJV_SPLIT: dict[str, tuple[str, ...]] = {
    "valid": ("Ruth", "Ecclesiastes", "Micah", "Galatians", "1 Peter"),
    "test": ("Esther", "Joel", "Habakkuk", "Philippians", "Colossians", "James", "Jude"),
}

# Contiguous split of a generic text file, by token position: train first, then valid, then test.
TEXT_SPLIT_FRACTIONS: dict[str, float] = {"train": 0.9, "valid": 0.05, "test": 0.05}


_HEADER_RE = re.compile(r"^(?P<book>\S(?:.*\S)?) (?P<chapter>\d+)$")
_VERSE_RE = re.compile(r"^\s+(?P<verse>\d+) (?P<text>.*)$")
# Words (letters/digits, with inner apostrophes as in "lord's") and single punctuation marks.
_TOKEN_RE = re.compile(r"\w+(?:'\w+)*|[^\w\s]")


class MissingDataError(FileNotFoundError):
    """A data source is not installed; the message names the package that provides it."""


class DataFileError(ValueError):
    """A user-supplied data file cannot be used; the message names the file."""


class Verse(NamedTuple):
    book: str
    chapter: int
    verse: int
    text: str


class Corpus(NamedTuple):
    """Token streams of one corpus; each line or verse ends with ``<eos>``."""

    train: list[str]
    valid: list[str]
    test: list[str]
    source: str


def parse_bible_output(text: str) -> list[Verse]:
    """Parse the pretty-printed output of the ``bible`` program.

    The output has ``Book N`` chapter headers (preceded by a blank line) and ``  V text`` verse
    lines; a verse longer than the line width continues on unindented lines, which are joined
    back with single spaces.
    """
    books = set(KJV_BOOKS)
    verses: list[Verse] = []
    book: str | None = None
    chapter, number = 0, 0
    parts: list[str] = []

    def flush() -> None:
        if parts and book is not None:
            verses.append(Verse(book, chapter, number, " ".join(parts)))
            parts.clear()

    prev_blank = True
    for line in text.splitlines():
        stripped = line.strip()
        header = _HEADER_RE.match(stripped) if prev_blank else None
        prev_blank = not stripped
        if header and header["book"] in books:
            flush()
            book, chapter = header["book"], int(header["chapter"])
        elif (m := _VERSE_RE.match(line)) and book is not None:
            flush()
            number, parts = int(m["verse"]), [m["text"].strip()]
        elif stripped and parts:
            parts.append(stripped)
        elif stripped:
            raise ValueError(f"unexpected line in bible output: {line!r}")
    flush()
    return verses


def load_kjv(program: str = KJV_PROGRAM) -> list[Verse]:
    """All 31102 verses of the King James Bible, from the ``bible`` program of ``bible-kjv``."""
    exe = shutil.which(program)
    if exe is None:
        raise MissingDataError(
            f"the King James Bible needs the program {program!r} from the Debian package "
            f"{KJV_PACKAGE}: install it with `apt-get install {KJV_PACKAGE}`"
        )
    # A very wide line keeps each verse on one line (the parser copes with wrapping anyway); no
    # stdin, because without complete arguments the program turns interactive.
    cmd = [exe, "-l100000", KJV_RANGE]
    result = subprocess.run(
        cmd, stdin=subprocess.DEVNULL, capture_output=True, text=True, encoding="utf-8", check=False
    )
    if result.returncode != 0:
        raise RuntimeError(f"{exe} {KJV_RANGE} failed ({result.returncode}): {result.stderr.strip()}")
    verses = parse_bible_output(result.stdout)
    found = tuple(dict.fromkeys(v.book for v in verses))
    if found != KJV_BOOKS or len(verses) != KJV_NUM_VERSES:
        raise RuntimeError(
            f"{exe} printed {len(verses)} verses in {len(found)} books; expected "
            f"{KJV_NUM_VERSES} verses in {len(KJV_BOOKS)} books (is {KJV_PACKAGE} complete?)"
        )
    return verses


def tokenize(text: str) -> list[str]:
    """Lower-cased word-level tokens; punctuation marks are tokens of their own."""
    return _TOKEN_RE.findall(text.lower())


def split_verses(verses: Iterable[Verse]) -> dict[str, list[Verse]]:
    """Split verses by book into ``train``, ``valid`` and ``test`` following ``KJV_SPLIT``."""
    owner = {book: name for name, books in KJV_SPLIT.items() for book in books}
    out: dict[str, list[Verse]] = {"train": [], "valid": [], "test": []}
    for v in verses:
        out[owner.get(v.book, "train")].append(v)
    return out


def kjv_corpus(program: str = KJV_PROGRAM) -> Corpus:
    """The KJV as token streams, split by book (``KJV_SPLIT``), ``<eos>`` after every verse."""
    parts = split_verses(load_kjv(program))
    streams = {name: _stream(v.text for v in vs) for name, vs in parts.items()}
    return Corpus(streams["train"], streams["valid"], streams["test"], source=f"kjv ({KJV_PACKAGE})")


def read_text_file(path: str | Path) -> str:
    """The contents of a UTF-8 text file; empty, binary or non-UTF-8 files raise ``DataFileError``."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise DataFileError(f"cannot read data file {str(path)!r}: {e.strerror}") from e
    if b"\x00" in raw:
        raise DataFileError(f"data file {str(path)!r} looks binary (it contains NUL bytes)")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataFileError(f"data file {str(path)!r} is not UTF-8 text (byte {e.start})") from e
    if not text.strip():
        raise DataFileError(f"data file {str(path)!r} is empty")
    return text


def text_file_corpus(path: str | Path) -> Corpus:
    """A UTF-8 text file as token streams, ``<eos>`` at each non-empty line's end.

    The stream is cut into three contiguous blocks by ``TEXT_SPLIT_FRACTIONS`` (train, valid,
    test in file order), so held-out text never interleaves with training text.
    """
    tokens = _stream(read_text_file(path).splitlines())
    n = len(tokens)
    n_valid = int(n * TEXT_SPLIT_FRACTIONS["valid"])
    n_test = int(n * TEXT_SPLIT_FRACTIONS["test"])
    if min(n_valid, n_test) < 2:
        raise DataFileError(f"data file {str(path)!r} is too short to split ({n} tokens)")
    n_train = n - n_valid - n_test
    return Corpus(tokens[:n_train], tokens[n_train : n_train + n_valid], tokens[n_train + n_valid :], source=str(path))


def _stream(lines: Iterable[str]) -> list[str]:
    out: list[str] = []
    for line in lines:
        toks = tokenize(line)
        if toks:
            out.extend(toks)
            out.append(EOS)
    return out


def lm_batch(ids_N: torch.Tensor, batch_size: int, seq_len: int, seed: int, step: int,
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """Random LM batch number ``step``: ``(inputs_BS, targets_BS)``, the targets shifted by one token.

    The windows start at random positions drawn from a generator seeded by ``(seed, step)`` alone,
    so a batch is reproducible from its step number: a resumed run sees the batches an
    uninterrupted run would have seen.
    """
    n_windows = ids_N.numel() - seq_len
    if n_windows < 1:
        raise ValueError(f"token stream of {ids_N.numel()} tokens is too short for seq_len={seq_len}")
    gen = torch.Generator().manual_seed(seed * 1_000_003 + step)
    starts_B = torch.randint(0, n_windows, (batch_size,), generator=gen)
    window_BS1 = ids_N[starts_B[:, None] + torch.arange(seq_len + 1)]
    return window_BS1[:, :-1], window_BS1[:, 1:]


def lm_batches(
    ids_N: torch.Tensor, batch_size: int, seq_len: int, seed: int, start_step: int = 0
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Endless ``lm_batch``es from number ``start_step`` on."""
    step = start_step
    while True:
        yield lm_batch(ids_N, batch_size, seq_len, seed, step)
        step += 1


def eval_batches(
    ids_N: torch.Tensor, batch_size: int, seq_len: int, max_tokens: int | None = None
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Consecutive windows covering the stream once (every target exactly once), in order.

    Full windows come in batches of up to ``batch_size``; a last, shorter window [1, r] covers
    the tail. ``max_tokens`` caps the number of targets (from the start of the stream).
    """
    n_targets = ids_N.numel() - 1
    if max_tokens is not None:
        n_targets = min(n_targets, max_tokens)
    n_full = n_targets // seq_len
    inputs = ids_N[: n_full * seq_len].view(n_full, seq_len)
    targets = ids_N[1 : n_full * seq_len + 1].view(n_full, seq_len)
    for i in range(0, n_full, batch_size):
        yield inputs[i : i + batch_size], targets[i : i + batch_size]
    tail = n_targets - n_full * seq_len
    if tail:
        start = n_full * seq_len
        yield ids_N[start : start + tail][None], ids_N[start + 1 : start + tail + 1][None]
