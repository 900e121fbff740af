"""Image loaders on small synthetic files: IDX parsing, missing package, .npz validation, digits OOD."""

import gzip
import struct

import numpy as np
import pytest

from moekit.data.images import (
    FASHION_MNIST_FILES,
    DataFileError,
    MissingDataError,
    digits_ood,
    load_fashion_mnist,
    load_npz,
    read_idx,
)


def write_idx(path, array):
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def test_read_idx_round_trip(tmp_path):
    array = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    write_idx(tmp_path / "a.gz", array)
    assert np.array_equal(read_idx(tmp_path / "a.gz"), array)
    (tmp_path / "bad.gz").write_bytes(gzip.compress(b"\x01\x02\x03\x04"))
    with pytest.raises(DataFileError, match="bad.gz.*not an IDX file"):
        read_idx(tmp_path / "bad.gz")


def test_fashion_mnist_missing_names_the_debian_package(tmp_path):
    with pytest.raises(MissingDataError, match="dataset-fashion-mnist"):
        load_fashion_mnist(tmp_path)


def test_fashion_mnist_layout_from_synthetic_idx_files(tmp_path):
    rng = np.random.default_rng(0)
    sizes = {"x_train": (6, 28, 28), "y_train": (6,), "x_test": (4, 28, 28), "y_test": (4,)}
    for key, name in FASHION_MNIST_FILES.items():
        write_idx(tmp_path / name, rng.integers(0, 10 if key.startswith("y") else 256, sizes[key]))
    data = load_fashion_mnist(tmp_path)
    assert data.x_train.shape == (6, 1, 28, 28) and data.x_train.dtype == np.float32
    assert 0 <= data.x_train.min() and data.x_train.max() <= 1
    assert data.y_test.dtype == np.int64 and data.num_classes == 10
    assert data.x_ood.shape == (1797, 1, 28, 28)


def test_digits_ood_is_resized_and_scaled():
    x = digits_ood((12, 16), channels=3)
    assert x.shape == (1797, 3, 12, 16) and x.min() >= 0 and x.max() <= 1 and x.max() > 0.9


def _arrays(n=8, hw=(6, 6), classes=3):
    rng = np.random.default_rng(1)
    return {"x_train": rng.integers(0, 256, (n, *hw), dtype=np.uint8), "y_train": rng.integers(0, classes, n),
            "x_test": rng.integers(0, 256, (n // 2, *hw), dtype=np.uint8), "y_test": np.arange(n // 2) % classes}


def test_npz_round_trip(tmp_path):
    arrays = _arrays()
    arrays["x_ood"] = np.random.default_rng(2).random((3, 6, 6, 1)).astype(np.float32)
    np.savez(tmp_path / "d.npz", **arrays)
    data = load_npz(tmp_path / "d.npz")
    assert data.image_shape == (1, 6, 6) and data.x_ood.shape == (3, 1, 6, 6) and data.num_classes == 3
    np.testing.assert_allclose(data.x_train[:, 0], arrays["x_train"] / 255.0, rtol=1e-6)


@pytest.mark.parametrize("change, message", [
    (lambda a: a.pop("y_test"), r"lacks the array\(s\) 'y_test'"),
    (lambda a: a.update(y_train=a["y_train"][:-1]), r"'y_train' has 7 labels for 8 images"),
    (lambda a: a.update(y_train=a["y_train"].astype(np.float32)), r"'y_train' must be a 1-D integer array"),
    (lambda a: a.update(x_test=a["x_test"][:, :5]), r"'x_test' images have shape \(1, 5, 6\)"),
    (lambda a: a.update(x_train=a["x_train"][:, 0]), r"'x_train' must be \[N, H, W\]"),
    (lambda a: a.update(y_test=-a["y_test"] - 1), r"'y_test' holds a negative label"),
])
def test_malformed_npz_names_the_file_and_the_array(tmp_path, change, message):
    arrays = _arrays()
    change(arrays)
    np.savez(tmp_path / "bad.npz", **arrays)
    with pytest.raises(ValueError, match=r"bad\.npz.*" + message):
        load_npz(tmp_path / "bad.npz")


def test_npz_not_a_zip_or_holding_objects(tmp_path):
    (tmp_path / "junk.npz").write_text("not a zip")
    with pytest.raises(DataFileError, match="junk.npz"):
        load_npz(tmp_path / "junk.npz")
    np.savez(tmp_path / "obj.npz", **_arrays(), extra=np.array([{"a": 1}], dtype=object))
    with pytest.raises(DataFileError, match="obj.npz"):
        load_npz(tmp_path / "obj.npz")
    with pytest.raises(DataFileError, match="missing.npz.*does not exist"):
        load_npz(tmp_path / "missing.npz")


@pytest.mark.parametrize("change, message", [
    # One label of 10^9 would ask for a 10^9-row classifier head (256 GB here): refused, not allocated.
    (lambda a: a["y_train"].__setitem__(0, 10**9), r"1000000001 classes from the largest training label is more "
                                                   r"than the 100000 classes"),
    # A test label of no training class is not silently a new class.
    (lambda a: a["y_test"].__setitem__(0, 5), r"'y_test' holds label 5, beyond the 3 classes from the largest "
                                              r"training label \(labels must be 0\.\.2"),
    (lambda a: a.update(num_classes=np.array(2)), r"'y_train' holds label 2, beyond the num_classes=2 as declared"),
    (lambda a: a.update(num_classes=np.array([3, 4])), r"'num_classes' must be one integer"),
    (lambda a: a.update(num_classes=np.array(200_000)), r"num_classes=200000 as declared is more than the 100000"),
    (lambda a: a.update(y_train=np.zeros(8, np.int64), y_test=np.zeros(4, np.int64)), r"a classifier needs at least 2"),
])
def test_labels_are_checked_against_the_declared_or_inferred_class_count(tmp_path, change, message):
    arrays = _arrays()
    arrays["y_train"] = np.arange(8) % 3  # the largest training label, 2, is present
    change(arrays)
    np.savez(tmp_path / "bad.npz", **arrays)
    with pytest.raises(DataFileError, match=r"bad\.npz.*" + message):
        load_npz(tmp_path / "bad.npz")


def test_a_declared_class_count_covers_classes_the_training_labels_lack(tmp_path):
    arrays = {**_arrays(), "y_train": np.arange(8) % 3, "y_test": np.array([0, 1, 2, 4]), "num_classes": np.array(5)}
    np.savez(tmp_path / "d.npz", **arrays)
    assert load_npz(tmp_path / "d.npz").num_classes == 5


def test_npz_that_is_a_npy_truncated_or_a_directory_is_named(tmp_path):
    np.save(tmp_path / "one.npy", np.zeros(3))
    with pytest.raises(DataFileError, match=r"one\.npy' is a single \.npy array; the image set is an \.npz archive"):
        load_npz(tmp_path / "one.npy")
    np.savez(tmp_path / "whole.npz", **_arrays())
    raw = (tmp_path / "whole.npz").read_bytes()
    for cut in (len(raw) // 2, len(raw) - 30):
        (tmp_path / "cut.npz").write_bytes(raw[:cut])
        with pytest.raises(DataFileError, match=r"cut\.npz' is a damaged or truncated \.npz archive"):
            load_npz(tmp_path / "cut.npz")
    with pytest.raises(DataFileError, match="is a directory"):
        load_npz(tmp_path)
