"""The ``english`` corpus: the English texts of six Debian packages, about 6.5M word-level tokens.

Legend: N tokens in a stream.

| source | package | reader | tokens (about) |
|---|---|---|---:|
| King James Bible | bible-kjv | the ``bible`` program | 0.94M |
| World English Bible | sword-text-web | SWORD module engWEB2015eb | 1.1M |
| Spurgeon, The Treasury of David | sword-comm-tdavid | SWORD module TDavid | 2.6M |
| Matthew Henry's Concise Commentary | sword-comm-mhcc | SWORD module MHCC | 0.84M |
| Scofield Reference Notes (1917) | sword-comm-scofield | SWORD module Scofield | 0.2M |
| the Python 3.11 documentation | python3.11-doc | the prose of its reStructuredText sources | 0.78M |

Four centuries of English prose (the KJV's, Victorian sermons, modern Bible English) and
technical English. The corpus exists to give the language-model job several times the KJV's
training tokens, read offline; a missing package raises ``MissingDataError`` naming every package
to install.

Split: each source's token stream is cut into blocks of ``BLOCK_TOKENS`` tokens; of every
``SPLIT_PERIOD`` consecutive blocks one is validation and one test, the rest training. So every
source is held out in proportion to its size, and held-out text never interleaves with training
text inside a block. The held-out blocks are put in a fixed shuffled order, so that the first
tokens of the validation stream (``--eval-tokens``) mix all sources.
"""

from __future__ import annotations

import random
import re
import shutil
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import NamedTuple

from moekit.data.bible import strip_osis
from moekit.data.corpus import KJV_PACKAGE, KJV_PROGRAM, Corpus, MissingDataError, _stream, load_kjv
from moekit.data.sword import SWORD_PATH, module_dir, read_entries

BLOCK_TOKENS = 2000
SPLIT_PERIOD = 20  # 5% validation, 5% test
VALID_SLOT, TEST_SLOT = 9, 19  # which block of each period is held out
_SHUFFLE_SEED = 20170123  # fixed: the held-out order is part of the corpus, not of a run
PYTHON_DOC_PACKAGE = "python3.11-doc"
PYTHON_DOC_SOURCES = "/usr/share/doc/python3.11/html/_sources"


class Source(NamedTuple):
    name: str
    package: str
    lines: Callable[[], list[str]]  # the source's text, one line per verse, entry or paragraph
    installed: Callable[[], bool]  # a cheap check that ``lines`` will find its files


def _kjv_lines() -> list[str]:
    return [v.text for v in load_kjv()]


def _sword_source(name: str, module: str, package: str) -> Source:
    def lines() -> list[str]:
        return [text for entry in read_entries(module_dir(module, package, SWORD_PATH)) if (text := strip_osis(entry))]

    def installed() -> bool:
        try:
            module_dir(module, package, SWORD_PATH)
        except MissingDataError:
            return False
        return True
    return Source(name, package, lines, installed)


# reStructuredText: directives and comments (".. x::"), section underlines, and :role:`text <target>`.
_RST_DIRECTIVE_RE = re.compile(r"^\.\.(\s|$)")
_RST_RULE_RE = re.compile(r"^([=\-~^*#+`'\":.])\1{2,}\s*$")
_RST_ROLE_RE = re.compile(r":[\w:.-]+:`([^`<]*?)\s*(?:<[^`>]*>)?`")


def rst_paragraphs(text: str) -> list[str]:
    """The prose paragraphs of a reStructuredText file, one line each.

    Indented lines (code samples, directive bodies, block quotes) and directives are dropped;
    roles keep their text (``:func:`len``` -> ``len``); a paragraph's lines are joined.
    """
    paragraphs: list[str] = []
    current: list[str] = []
    for line in text.splitlines():
        if not line.strip() or line[0].isspace() or _RST_DIRECTIVE_RE.match(line) or _RST_RULE_RE.match(line):
            if current:
                paragraphs.append(" ".join(current))
                current = []
            continue
        current.append(_RST_ROLE_RE.sub(r"\1", line.strip()).replace("``", "").replace("`", ""))
    if current:
        paragraphs.append(" ".join(current))
    return paragraphs


def _python_doc_lines() -> list[str]:
    root = Path(PYTHON_DOC_SOURCES)
    files = sorted(root.rglob("*.rst.txt")) if root.is_dir() else []
    if not files:
        raise MissingDataError(f"the Python documentation sources are missing under {PYTHON_DOC_SOURCES!r}: "
                               f"`apt-get install {PYTHON_DOC_PACKAGE}`")
    return [p for f in files for p in rst_paragraphs(f.read_text(encoding="utf-8", errors="replace"))]


SOURCES: tuple[Source, ...] = (
    Source("kjv", KJV_PACKAGE, _kjv_lines, lambda: shutil.which(KJV_PROGRAM) is not None),
    _sword_source("web", "engWEB2015eb", "sword-text-web"),
    _sword_source("tdavid", "TDavid", "sword-comm-tdavid"),
    _sword_source("mhcc", "MHCC", "sword-comm-mhcc"),
    _sword_source("scofield", "Scofield", "sword-comm-scofield"),
    Source("python-doc", PYTHON_DOC_PACKAGE, _python_doc_lines,
           lambda: any(Path(PYTHON_DOC_SOURCES).rglob("*.rst.txt"))),
)
PACKAGES = tuple(s.package for s in SOURCES)


def split_blocks(streams: Iterable[list[str]], block_tokens: int = BLOCK_TOKENS, period: int = SPLIT_PERIOD,
                 ) -> dict[str, list[str]]:
    """Cut each stream into blocks of ``block_tokens`` and deal them to train/valid/test.

    Block i of a stream goes to validation when ``i % period == VALID_SLOT``, to test when it is
    ``TEST_SLOT`` and to training otherwise (a stream's last, shorter block included). Training
    blocks stay in order; the held-out blocks of all streams are shuffled with a fixed seed.
    """
    if block_tokens < 1 or period <= max(VALID_SLOT, TEST_SLOT):
        raise ValueError(f"block_tokens={block_tokens} must be >= 1 and period={period} > {max(VALID_SLOT, TEST_SLOT)}")
    train: list[str] = []
    held: dict[str, list[list[str]]] = {"valid": [], "test": []}
    for stream in streams:
        for i, start in enumerate(range(0, len(stream), block_tokens)):
            block = stream[start:start + block_tokens]
            slot = i % period
            if slot == VALID_SLOT:
                held["valid"].append(block)
            elif slot == TEST_SLOT:
                held["test"].append(block)
            else:
                train.extend(block)
    out = {"train": train}
    for name, blocks in held.items():
        random.Random(_SHUFFLE_SEED).shuffle(blocks)
        out[name] = [t for b in blocks for t in b]
    return out


def missing_packages(sources: Iterable[Source] = SOURCES) -> list[str]:
    """The packages of ``sources`` that are not installed."""
    return [s.package for s in sources if not s.installed()]


def english_corpus(sources: Iterable[Source] = SOURCES) -> Corpus:
    """The ``english`` corpus, split by blocks (``split_blocks``), ``<eos>`` after every line."""
    sources = tuple(sources)
    missing = missing_packages(sources)
    if missing:
        raise MissingDataError(f"the english corpus needs the Debian packages {' '.join(missing)}: "
                               f"`apt-get install {' '.join(missing)}`")
    parts = split_blocks(_stream(s.lines()) for s in sources)
    names = "+".join(s.name for s in sources)
    return Corpus(parts["train"], parts["valid"], parts["test"], source=f"english ({names})")


__all__ = ["BLOCK_TOKENS", "PACKAGES", "SOURCES", "SPLIT_PERIOD", "Source", "english_corpus", "missing_packages",
           "rst_paragraphs", "split_blocks"]
