"""Every entry of a compressed SWORD text or commentary module, read straight from its files.

A compressed SWORD module (drivers zText, zText4, zCom, zCom4: Bibles and commentaries alike)
stores, per testament ``ot``/``nt``:

- ``*.?zs`` the block index: one record ``(offset, compressed size, uncompressed size)`` of three
  little-endian uint32 per zlib-compressed block;
- ``*.?zv`` the entry index: one record per key of the versification (module, testament, book and
  chapter headings included) ``(block, start, size)`` as uint32, uint32 and a uint16 (zText, zCom)
  or a uint32 (the "4" drivers);
- ``*.?zz`` the compressed blocks, back to back.

The ``?`` is ``b``, ``c`` or ``v`` for blocks of a book, a chapter or a verse. A language-model
corpus needs the entries' texts in order, not their verse keys, so this reader needs no
versification table. Commentaries link a range of verses to one entry by repeating its record;
each distinct entry is returned once.
"""

from __future__ import annotations

import re
import struct
import zlib
from pathlib import Path

from moekit.data.corpus import MissingDataError

SWORD_PATH = "/usr/share/sword"
_BLOCK_RECORD = struct.Struct("<III")
_ENTRY_RECORDS = (struct.Struct("<IIH"), struct.Struct("<III"))  # zText/zCom, then zText4/zCom4


class SwordFormatError(ValueError):
    """A module's files are not a compressed SWORD module this reader understands."""


def module_dir(module: str, package: str, sword_path: str | Path = SWORD_PATH) -> Path:
    """The data directory of ``module``, from its ``mods.d/<name>.conf`` (its ``DataPath``).

    ``MissingDataError`` names ``package`` when the module is not installed.
    """
    root = Path(sword_path)
    hint = f"the SWORD module {module!r} comes with the Debian package {package}: `apt-get install {package}`"
    confs = sorted(root.glob("mods.d/*.conf")) if (root / "mods.d").is_dir() else []
    for conf in confs:
        text = conf.read_text(encoding="utf-8", errors="replace")
        if re.search(rf"^\[{re.escape(module)}\]\s*$", text, re.M | re.I):
            m = re.search(r"^DataPath\s*=\s*(\S+)\s*$", text, re.M)
            if m is None:
                raise SwordFormatError(f"{conf} has no DataPath")
            path = (root / m[1]).resolve()
            if not path.is_dir():
                raise MissingDataError(f"{hint} (its data directory {str(path)!r} is missing)")
            return path
    raise MissingDataError(f"{hint} (not found under {str(root)!r})")


def _index_files(directory: Path, testament: str) -> tuple[Path, Path, Path] | None:
    for letter in "bcv":
        files = tuple(directory / f"{testament}.{letter}z{kind}" for kind in "svz")
        if all(f.exists() for f in files):
            return files  # type: ignore[return-value]
    return None


def _entry_records(index: bytes, blocks: list[tuple[int, int, int]], where: Path) -> list[tuple[int, int, int]]:
    """The entry index as ``(block, start, size)`` records, its record width told from the data.

    The .conf's driver name is not reliable for this (Debian's MHCC says zCom4 but has 10-byte
    records), so the width whose every non-empty record points inside its block is taken.
    """
    for record in _ENTRY_RECORDS:
        if len(index) % record.size:
            continue
        rows = [record.unpack_from(index, i) for i in range(0, len(index), record.size)]
        if all(size == 0 or (block < len(blocks) and start + size <= blocks[block][2]) for block, start, size in rows):
            return rows
    raise SwordFormatError(f"{where}: the entry index matches neither 10- nor 12-byte records")


def read_entries(directory: str | Path, encoding: str = "utf-8") -> list[str]:
    """The distinct non-empty entries of the module in ``directory``, Old Testament first, raw markup kept."""
    directory = Path(directory)
    entries: list[str] = []
    found = False
    for testament in ("ot", "nt"):
        files = _index_files(directory, testament)
        if files is None:
            continue
        found = True
        blocks_raw, index, data = (f.read_bytes() for f in files)
        if len(blocks_raw) % _BLOCK_RECORD.size:
            raise SwordFormatError(f"{files[0]}: {len(blocks_raw)} bytes is not a whole number of block records")
        blocks = [_BLOCK_RECORD.unpack_from(blocks_raw, i) for i in range(0, len(blocks_raw), _BLOCK_RECORD.size)]
        seen: set[tuple[int, int, int]] = set()
        cached: tuple[int, bytes] = (-1, b"")
        for block, start, size in _entry_records(index, blocks, files[1]):
            if size == 0 or (block, start, size) in seen:
                continue
            seen.add((block, start, size))
            if cached[0] != block:  # entries come in block order: one decompression per block
                offset, stored, _ = blocks[block]
                try:
                    cached = (block, zlib.decompress(data[offset:offset + stored]))
                except zlib.error as e:
                    raise SwordFormatError(f"{files[2]}: block {block} does not decompress ({e})") from e
            text = cached[1][start:start + size].decode(encoding, errors="replace")
            if text.strip():
                entries.append(text)
    if not found:
        raise SwordFormatError(f"{str(directory)!r} holds no compressed SWORD module (ot/nt .bzv, .czv or .vzv)")
    return entries
