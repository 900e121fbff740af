"""The SWORD module reader on modules written here, byte by byte, in both record widths."""

import struct
import zlib
from pathlib import Path

import pytest

from moekit.data import MissingDataError
from moekit.data.bible import strip_osis
from moekit.data.sword import SwordFormatError, module_dir, read_entries


def write_module(directory: Path, testaments: dict[str, list[list[bytes]]], wide: bool, letter: str = "b",
                 links: dict[str, list[int]] | None = None) -> None:
    """A compressed module: per testament a list of blocks, each a list of entries.

    ``links[t]`` lists, in key order, which entry (numbered over the testament) each key shows;
    -1 is an empty key. Without it every entry has one key, preceded by an empty one.
    """
    directory.mkdir(parents=True, exist_ok=True)
    record = struct.Struct("<III" if wide else "<IIH")
    for t, blocks in testaments.items():
        data, block_index, places = b"", b"", []
        for b, entries in enumerate(blocks):
            raw, start = b"", 0
            for e in entries:
                places.append((b, start, len(e)))
                raw += e
                start += len(e)
            packed = zlib.compress(raw)
            block_index += struct.pack("<III", len(data), len(packed), len(raw))
            data += packed
        keys = (links or {}).get(t) or [k for i in range(len(places)) for k in (-1, i)]
        index = b"".join(record.pack(0, 0, 0) if k < 0 else record.pack(*places[k]) for k in keys)
        (directory / f"{t}.{letter}zs").write_bytes(block_index)
        (directory / f"{t}.{letter}zv").write_bytes(index)
        (directory / f"{t}.{letter}zz").write_bytes(data)


@pytest.mark.parametrize("wide", [False, True])
def test_entries_of_both_testaments_in_order(tmp_path, wide):
    write_module(tmp_path, {"ot": [[b"In the beginning", b" God"], [b"created \xe2\x80\x99"]],
                            "nt": [[b"In the beginning was the Word"]]}, wide)
    assert read_entries(tmp_path) == ["In the beginning", " God", "created \u2019", "In the beginning was the Word"]


def test_linked_keys_give_their_entry_once_and_blank_entries_none(tmp_path):
    # Keys 1-3 show entry 0 (a commentary on three verses), key 4 a blank entry, key 5 entry 2.
    write_module(tmp_path, {"ot": [[b"on verses 1-3", b"  ", b"on verse 5"]]}, wide=True, letter="c",
                 links={"ot": [-1, 0, 0, 0, 1, 2]})
    assert read_entries(tmp_path) == ["on verses 1-3", "on verse 5"]


def test_record_width_is_told_from_the_data_not_the_driver_name(tmp_path):
    # 6 records of 10 bytes = 5 of 12 bytes: both divide 60, only the narrow reading points inside the block.
    write_module(tmp_path, {"ot": [[b"a", b"bb", b"ccc"]]}, wide=False)
    assert len((tmp_path / "ot.bzv").read_bytes()) == 60
    assert read_entries(tmp_path) == ["a", "bb", "ccc"]


def test_not_a_module(tmp_path):
    with pytest.raises(SwordFormatError, match="no compressed SWORD module"):
        read_entries(tmp_path)
    write_module(tmp_path, {"ot": [[b"abc"]]}, wide=False)
    (tmp_path / "ot.bzv").write_bytes(struct.pack("<IIH", 7, 0, 3))  # block 7 of 1
    with pytest.raises(SwordFormatError, match="neither 10- nor 12-byte"):
        read_entries(tmp_path)


def test_module_dir_from_conf_and_missing_module_names_its_package(tmp_path):
    (tmp_path / "mods.d").mkdir()
    (tmp_path / "mods.d" / "x.conf").write_text("[MyCom]\nDataPath=./modules/comments/zcom/mycom/\nModDrv=zCom4\n")
    with pytest.raises(MissingDataError, match="sword-comm-mycom"):
        module_dir("MyCom", "sword-comm-mycom", tmp_path)  # the conf is there, its data is not
    (tmp_path / "modules/comments/zcom/mycom").mkdir(parents=True)
    assert module_dir("mycom", "sword-comm-mycom", tmp_path) == (tmp_path / "modules/comments/zcom/mycom").resolve()
    with pytest.raises(MissingDataError, match="apt-get install sword-comm-other"):
        module_dir("Other", "sword-comm-other", tmp_path)


@pytest.mark.skipif(not Path("/usr/share/sword/mods.d/engWEB2015eb.conf").exists(),
                    reason="the World English Bible (Debian package sword-text-web) is not installed")
def test_the_installed_world_english_bible():
    entries = read_entries(module_dir("engWEB2015eb", "sword-text-web"))
    assert len(entries) > 31000  # 31102 verses of the 66 books, plus the deuterocanon, minus headings
    first = [strip_osis(e) for e in entries[:20]]
    assert "In the beginning, God created the heavens and the earth." in first
