"""Data fingerprints: path, size and a content hash that changes with any change of what was loaded."""

import hashlib

import numpy as np
import pytest
import torch

from moekit.data.fingerprint import data_fingerprint


def test_a_file_is_recorded_by_resolved_path_size_and_content(tmp_path, monkeypatch):
    path = tmp_path / "d.txt"
    path.write_text("a b c\n")
    monkeypatch.chdir(tmp_path)
    fp = data_fingerprint("d.txt", ["a", "b", "c"])
    assert fp["path"] == str(path.resolve()) and fp["size"] == 6
    # The hash is of the loaded content, written out here by hand: a JSON line per part.
    assert fp["sha256"] == hashlib.sha256(b'json ["a", "b", "c"]\n').hexdigest()
    elsewhere = data_fingerprint(None, ["a"])  # not read from a file: no path or size, the same hash
    assert elsewhere == {"path": None, "size": None, "sha256": data_fingerprint("x", ["a"])["sha256"]}


def test_the_hash_changes_with_any_change_of_the_content():
    x = np.zeros((2, 3), np.float32)
    base = data_fingerprint(None, x, np.array([0, 1]))["sha256"]
    y = x.copy()
    y[1, 2] = 1e-30  # one pixel, barely
    changed = [data_fingerprint(None, y, np.array([0, 1])),
               data_fingerprint(None, x, np.array([1, 0])),
               data_fingerprint(None, x.reshape(3, 2), np.array([0, 1])),  # same bytes, other shape
               data_fingerprint(None, x.astype(np.float64), np.array([0, 1])),  # same values, other dtype
               data_fingerprint(None, x, np.array([0, 1]), None)]  # an absent part is a part
    assert all(fp["sha256"] != base for fp in changed)
    assert data_fingerprint(None, ["ab"])["sha256"] != data_fingerprint(None, ["a", "b"])["sha256"]
    assert data_fingerprint(None, torch.zeros(2, 3))["sha256"] == data_fingerprint(None, x)["sha256"]


def test_what_cannot_be_hashed_is_refused():
    with pytest.raises(TypeError, match="cannot fingerprint a object"):
        data_fingerprint(None, [object()])
