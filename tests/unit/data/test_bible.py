"""KJV -> WEB verse pairs: markup stripping, missing-package errors, alignment on the real modules."""

import shutil
from pathlib import Path

import pytest

from moekit.data import MissingDataError, bible
from moekit.data.bible import load_web_verses, strip_osis


def test_strip_osis_drops_notes_titles_and_tags():
    raw = ('<title type="psalm">A Psalm by David.</title> <w lemma="strong:H0430">In</w> the '
           '<w lemma="x">beginning</w>, God<note placement="foot"><reference>1:1 </reference>Hebrew: '
           '“Elohim”.</note>created the heavens<note>n</note>. <l level="1" sID="x"/>God’s Spirit &amp; “light”')
    assert strip_osis(raw) == "In the beginning, God created the heavens. God's Spirit & \"light\""


def test_a_missing_web_module_names_its_package(tmp_path):
    with pytest.raises(MissingDataError, match="sword-text-web"):
        load_web_verses(sword_path=tmp_path)
    (tmp_path / "mods.d").mkdir()
    with pytest.raises(MissingDataError, match="engWEB2015eb.*sword-text-web"):
        load_web_verses(sword_path=tmp_path)


@pytest.mark.skipif(shutil.which("bible") is None or not Path(bible.SWORD_PATH, "mods.d").is_dir(),
                    reason="needs the bible-kjv and sword-text-web packages")
def test_real_pairs_are_aligned_and_split_by_book():
    parts = bible.kjv_web_examples(max_words=13)
    first = parts["train"][0]
    assert first.source == "In the beginning God created the heaven and the earth."
    assert first.targets == ["In the beginning, God created the heavens and the earth."]
    assert 0 < len(parts["test"]) < len(parts["train"]) / 5 and len(parts["valid"]) > 0
    # Whole books are held out: Joel 1:1 is a test verse, and only there.
    joel = "The word of the LORD that came to Joel the son of Pethuel."
    assert [e.source for e in parts["test"]].count(joel) == 1
    assert joel not in {e.source for e in parts["train"] + parts["valid"]}
    assert all(len(e.source.split()) <= 13 and len(e.targets[0].split()) <= 13 for e in parts["train"])
    # No markup survives.
    assert not any("<" in e.targets[0] for e in parts["train"] + parts["test"])
