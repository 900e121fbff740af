"""King James Bible -> World English Bible verse pairs: a real one-to-one paraphrase corpus.

The KJV comes from the ``bible`` program of Debian's ``bible-kjv``; the WEB (``engWEB2015eb``) from
Debian's ``sword-text-web``, read with ``pysword`` and stripped of its OSIS markup (footnotes,
psalm titles, Strong's tags). Verses are aligned by (book, chapter, verse) over the 66 books both
share, and split by whole book so that no test verse shares a chapter with a training verse.
"""

from __future__ import annotations

import functools
import html
import re
import shutil
import subprocess
from pathlib import Path

from moekit.patterns.data import Example

KJV_PACKAGE, KJV_PROGRAM = "bible-kjv", "bible"
WEB_PACKAGE, WEB_MODULE = "sword-text-web", "engWEB2015eb"
SWORD_PATH = "/usr/share/sword"
NUM_BOOKS = 66

# Held-out books, by canonical index (0 = Genesis): a mix of narrative, wisdom, prophecy, gospel
# and epistle, about 6% of the verses.
TEST_BOOKS = (7, 16, 20, 32, 56, 57, 58, 64)  # Ruth, Esther, Ecclesiastes, Micah, Titus, Philemon, Hebrews, Jude

_NOTE_RE = re.compile(r"<note\b.*?</note>", re.S)
_TITLE_RE = re.compile(r"<title\b.*?</title>", re.S)
_TAG_RE = re.compile(r"<[^>]*>")
_SPACE_BEFORE_PUNCT_RE = re.compile(r"\s+([,.;:!?)])")
# Curly quotes to ASCII, so "God’s" tokenizes like "God's".
_QUOTES = str.maketrans({"‘": "'", "’": "'", "“": '"', "”": '"'})
_KJV_LINE_RE = re.compile(r"^(?P<book>\S+?)(?P<chapter>\d+):(?P<verse>\d+) (?P<text>.*)$")

Key = tuple[int, int, int]  # (canonical book index, chapter, verse)


class MissingDataError(FileNotFoundError):
    """A data source is not installed; the message names the package that provides it."""


def strip_osis(text: str) -> str:
    """Plain verse text from an OSIS fragment: footnotes and titles dropped, tags removed.

    A footnote sits between words with no space of its own ("God<note>..</note>created"), so
    removed markup leaves a space, and spaces that end up before punctuation are taken out.
    """
    text = _TITLE_RE.sub(" ", _NOTE_RE.sub(" ", text))
    text = html.unescape(_TAG_RE.sub(" ", text)).translate(_QUOTES)
    text = " ".join(text.split())
    return _SPACE_BEFORE_PUNCT_RE.sub(r"\1", text)


def load_kjv_verses(program: str = KJV_PROGRAM) -> dict[Key, str]:
    """All KJV verses keyed by (book index, chapter, verse), from the ``bible`` program."""
    exe = shutil.which(program)
    if exe is None:
        raise MissingDataError(f"the King James Bible needs the program {program!r} from the Debian package "
                               f"{KJV_PACKAGE}: install it with `apt-get install {KJV_PACKAGE}`")
    result = subprocess.run([exe, "-f", "-l100000", "Gen1:1-Rev22:21"], capture_output=True, text=True,
                            encoding="utf-8", check=False)
    if result.returncode != 0:
        raise RuntimeError(f"{exe} failed ({result.returncode}): {result.stderr.strip()}")
    verses: dict[Key, str] = {}
    books: dict[str, int] = {}
    for line in result.stdout.splitlines():
        m = _KJV_LINE_RE.match(line)
        if m is None:
            continue
        # The program prints the books in canonical order: the order of appearance is the index.
        book = books.setdefault(m["book"], len(books))
        verses[(book, int(m["chapter"]), int(m["verse"]))] = m["text"].strip()
    if len(books) != NUM_BOOKS:
        raise RuntimeError(f"{exe} printed {len(books)} books, expected {NUM_BOOKS} (is {KJV_PACKAGE} complete?)")
    return verses


def _cache_last_block(bible) -> None:
    # pysword decompresses a module's whole book block again for every verse it reads (minutes for
    # the Bible); caching the last block makes reading a book cost one decompression. This leans on
    # a private method: if pysword renames it, reading stays correct, only slow.
    original = getattr(bible, "_decompressed_text", None)
    if original is not None:
        bible._decompressed_text = functools.lru_cache(maxsize=2)(original)


def load_web_verses(sword_path: str | Path = SWORD_PATH, module: str = WEB_MODULE) -> dict[Key, str]:
    """All WEB verses of the 66 shared books, keyed by (book index, chapter, verse), markup stripped."""
    hint = f"the World English Bible needs the SWORD module {module!r} from the Debian package {WEB_PACKAGE}"
    if not (Path(sword_path) / "mods.d").is_dir():
        raise MissingDataError(f"{hint}: no SWORD library at {str(sword_path)!r}; `apt-get install {WEB_PACKAGE}`")
    try:
        from pysword.modules import SwordModules
    except ImportError as e:
        raise MissingDataError(f"{hint}, read with the Python package pysword: `pip install pysword`") from e
    modules = SwordModules(str(sword_path))
    if module not in modules.parse_modules():
        raise MissingDataError(f"{hint}: it is not installed under {str(sword_path)!r}")
    bible = modules.get_bible_from_module(module)
    _cache_last_block(bible)
    structure = bible.get_structure().get_books()
    # The WEB adds the deuterocanon after Malachi; the 39 + 27 books we share come first in each testament.
    canon = structure["ot"][:39] + structure["nt"][:27]
    verses: dict[Key, str] = {}
    for index, book in enumerate(canon):
        texts = iter(bible.get_iter(books=[book.osis_name], clean=False))
        for chapter, length in enumerate(book.chapter_lengths, start=1):
            for verse in range(1, length + 1):
                text = strip_osis(next(texts, ""))
                if text:
                    verses[(index, chapter, verse)] = text
    return verses


def kjv_web_examples(max_words: int | None = None) -> dict[str, list[Example]]:
    """Aligned KJV -> WEB pairs split by book: ``{"train": [...], "test": [...]}``.

    ``max_words`` keeps only verses whose KJV and WEB texts both have at most that many words.
    """
    kjv, web = load_kjv_verses(), load_web_verses()
    out: dict[str, list[Example]] = {"train": [], "test": []}
    for key in sorted(kjv.keys() & web.keys()):
        src, tgt = kjv[key], web[key]
        if max_words is not None and max(len(src.split()), len(tgt.split())) > max_words:
            continue
        out["test" if key[0] in TEST_BOOKS else "train"].append(Example(src, [tgt]))
    return out
