"""King James Bible -> World English Bible verse pairs: a real one-to-one paraphrase corpus.

The KJV comes from the ``bible`` program of Debian's ``bible-kjv`` (``moekit.data.load_kjv``); the
WEB (``engWEB2015eb``) from Debian's ``sword-text-web``, read with ``pysword`` and stripped of its
OSIS markup (footnotes, psalm titles, Strong's tags). Verses are aligned by (book, chapter, verse)
over the 66 books both share, and split by whole book with the corpus split of ``moekit.data``
(``KJV_SPLIT``), so no test verse shares a chapter with a training verse and the language-model
job holds out the same books.
"""

from __future__ import annotations

import functools
import html
import re
from pathlib import Path

from moekit.data import KJV_BOOKS, KJV_SPLIT, MissingDataError, load_kjv
from moekit.data.pairs import Example

WEB_PACKAGE, WEB_MODULE = "sword-text-web", "engWEB2015eb"
SWORD_PATH = "/usr/share/sword"

_NOTE_RE = re.compile(r"<note\b.*?</note>", re.S)
_TITLE_RE = re.compile(r"<title\b.*?</title>", re.S)
_TAG_RE = re.compile(r"<[^>]*>")
_SPACE_BEFORE_PUNCT_RE = re.compile(r"\s+([,.;:!?)])")
# Curly quotes to ASCII, so "God’s" tokenizes like "God's".
_QUOTES = str.maketrans({"‘": "'", "’": "'", "“": '"', "”": '"'})

Key = tuple[int, int, int]  # (canonical book index, chapter, verse)


def strip_osis(text: str) -> str:
    """Plain verse text from an OSIS fragment: footnotes and titles dropped, tags removed.

    A footnote sits between words with no space of its own ("God<note>..</note>created"), so
    removed markup leaves a space, and spaces that end up before punctuation are taken out.
    """
    text = _TITLE_RE.sub(" ", _NOTE_RE.sub(" ", text))
    text = html.unescape(_TAG_RE.sub(" ", text)).translate(_QUOTES)
    text = " ".join(text.split())
    return _SPACE_BEFORE_PUNCT_RE.sub(r"\1", text)


def load_kjv_verses() -> dict[Key, str]:
    """All KJV verses keyed by (book index, chapter, verse)."""
    index = {book: i for i, book in enumerate(KJV_BOOKS)}
    return {(index[v.book], v.chapter, v.verse): v.text for v in load_kjv()}


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
    if len(canon) != len(KJV_BOOKS):
        raise MissingDataError(f"{hint}: found {len(canon)} of the {len(KJV_BOOKS)} books in {module!r}")
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
    """Aligned KJV -> WEB pairs split by book: ``{"train": [...], "valid": [...], "test": [...]}``.

    ``max_words`` keeps only verses whose KJV and WEB texts both have at most that many words.
    """
    kjv, web = load_kjv_verses(), load_web_verses()
    owner = {KJV_BOOKS.index(book): part for part, books in KJV_SPLIT.items() for book in books}
    out: dict[str, list[Example]] = {"train": [], "valid": [], "test": []}
    for key in sorted(kjv.keys() & web.keys()):
        src, tgt = kjv[key], web[key]
        if max_words is not None and max(len(src.split()), len(tgt.split())) > max_words:
            continue
        out[owner.get(key[0], "train")].append(Example(src, [tgt]))
    return out
