"""Image classification data: Fashion-MNIST from its Debian package, any set from an .npz file.

Legend: N examples, C channels, H x W pixels.

Arrays come back as ``x`` [N, C, H, W] float32 (uint8 pixels scaled to [0, 1]; float pixels kept
as they are) and ``y`` [N] int64. Nothing is downloaded: Fashion-MNIST is read from the IDX files
of the Debian package ``dataset-fashion-mnist``; the out-of-distribution set is scikit-learn's
bundled 8x8 handwritten digits, scaled to [0, 1] (ink bright, as in Fashion-MNIST) and resized to
the in-distribution image size with bilinear interpolation.
"""

from __future__ import annotations

import gzip
import struct
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from moekit.data.corpus import DataFileError, MissingDataError

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_PACKAGE = "dataset-fashion-mnist"
FASHION_MNIST_FILES = {
    "x_train": "train-images-idx3-ubyte.gz",
    "y_train": "train-labels-idx1-ubyte.gz",
    "x_test": "t10k-images-idx3-ubyte.gz",
    "y_test": "t10k-labels-idx1-ubyte.gz",
}
FASHION_MNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker",
                         "Bag", "Ankle boot")
NPZ_REQUIRED = ("x_train", "y_train", "x_test", "y_test")
NPZ_OPTIONAL = ("x_ood",)
NPZ_NUM_CLASSES = "num_classes"  # optional scalar: the class count, when y_train does not show the largest class
# More classes than this is taken for a mistake in the labels (one label of 10^9 would otherwise
# ask for a classifier head of 10^9 rows); ImageNet-21k has 21841.
MAX_CLASSES = 100_000
DIGITS_OOD = "scikit-learn load_digits (1797 8x8 digits, bilinear-resized to the image size)"

# IDX type codes (the third byte of the magic number) and the numpy dtypes they hold, big-endian.
_IDX_DTYPES: dict[int, str | type] = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


@dataclass(frozen=True)
class ImageSplits:
    """Train and test sets, an optional OOD set, and where they came from."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    x_ood: np.ndarray | None
    num_classes: int
    source: str
    ood_source: str | None

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """(C, H, W)."""
        return tuple(self.x_train.shape[1:])


def read_idx(path: str | Path) -> np.ndarray:
    """Read an IDX file (gzip-compressed if its name ends in .gz); ``DataFileError`` names a bad file."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as e:
        raise DataFileError(f"cannot read IDX file {str(path)!r}: {e}") from e
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise DataFileError(f"{str(path)!r} is not an IDX file (bad magic number {raw[:4].hex()})")
    ndim = raw[3]
    dims = struct.unpack(f">{ndim}I", raw[4:4 + 4 * ndim])
    dtype = np.dtype(_IDX_DTYPES[raw[2]])
    data = np.frombuffer(raw, dtype=dtype, offset=4 + 4 * ndim)
    if data.size != int(np.prod(dims)):
        raise DataFileError(f"{str(path)!r} holds {data.size} values for dimensions {dims}")
    return data.reshape(dims).astype(dtype.newbyteorder("="))


def digits_ood(size: tuple[int, int], channels: int = 1) -> np.ndarray:
    """scikit-learn's bundled digits as [1797, channels, *size] float32 in [0, 1]."""
    from sklearn.datasets import load_digits

    images = torch.from_numpy(load_digits().images.astype(np.float32) / 16.0)[:, None]
    resized = F.interpolate(images, size=tuple(size), mode="bilinear", align_corners=False).clamp(0, 1)
    return resized.expand(-1, channels, -1, -1).numpy().copy()


def load_fashion_mnist(root: str | Path = FASHION_MNIST_DIR, ood: bool = True) -> ImageSplits:
    """Fashion-MNIST (60k train, 10k test, 28x28 grey, 10 classes) with the digits as OOD set."""
    root = Path(root)
    missing = [name for name in FASHION_MNIST_FILES.values() if not (root / name).is_file()]
    if missing:
        raise MissingDataError(
            f"Fashion-MNIST not found: {', '.join(str(root / m) for m in missing)} missing; install the Debian "
            f"package {FASHION_MNIST_PACKAGE} (apt-get install {FASHION_MNIST_PACKAGE}), or pass --data FILE.npz")
    arrays = {key: read_idx(root / name) for key, name in FASHION_MNIST_FILES.items()}
    x_train, x_test = (images_to_nchw(arrays[k], k, root) for k in ("x_train", "x_test"))
    y_train, y_test = (arrays[k].astype(np.int64) for k in ("y_train", "y_test"))
    return ImageSplits(x_train, y_train, x_test, y_test, digits_ood(x_train.shape[2:]) if ood else None,
                       len(FASHION_MNIST_CLASSES), f"Fashion-MNIST ({root})", DIGITS_OOD if ood else None)


def images_to_nchw(x: np.ndarray, key: str, path: str | Path) -> np.ndarray:
    """[N, H, W] or channels-last [N, H, W, C] -> float32 [N, C, H, W]; uint8 is scaled to [0, 1]."""
    if x.ndim not in (3, 4) or x.shape[0] == 0 or (x.ndim == 4 and not 1 <= x.shape[3] <= 4):
        raise DataFileError(f"{str(path)!r}: {key!r} must be [N, H, W] or channels-last [N, H, W, C] (C <= 4) "
                            f"with N >= 1, got shape {x.shape}")
    if x.dtype == np.uint8:
        out = x.astype(np.float32) / 255.0
    elif np.issubdtype(x.dtype, np.floating) or np.issubdtype(x.dtype, np.integer):
        out = x.astype(np.float32)
    else:
        raise DataFileError(f"{str(path)!r}: {key!r} has dtype {x.dtype}, expected numbers")
    if not np.isfinite(out).all():
        raise DataFileError(f"{str(path)!r}: {key!r} holds NaN or Inf")
    return out[:, None] if out.ndim == 3 else np.ascontiguousarray(out.transpose(0, 3, 1, 2))


def _labels(y: np.ndarray, key: str, path: Path, num: int) -> np.ndarray:
    if y.ndim != 1 or not np.issubdtype(y.dtype, np.integer):
        raise DataFileError(f"{str(path)!r}: {key!r} must be a 1-D integer array, got shape {y.shape} "
                            f"dtype {y.dtype}")
    if len(y) != num:
        raise DataFileError(f"{str(path)!r}: {key!r} has {len(y)} labels for {num} images")
    if (y < 0).any():
        raise DataFileError(f"{str(path)!r}: {key!r} holds a negative label ({int(y.min())})")
    return y.astype(np.int64)


def _num_classes(arrays: dict[str, np.ndarray], y_train: np.ndarray, y_test: np.ndarray, path: Path) -> int:
    """The declared class count (array ``num_classes``), or the largest training label + 1.

    Every label must lie below it, and it must lie in 2..MAX_CLASSES: a test label the classes of
    training do not cover is an error, not a new class.
    """
    where = f"{str(path)!r}"
    if NPZ_NUM_CLASSES in arrays:
        declared = arrays[NPZ_NUM_CLASSES]
        if declared.shape != () or not np.issubdtype(declared.dtype, np.integer):
            raise DataFileError(f"{where}: {NPZ_NUM_CLASSES!r} must be one integer, got shape {declared.shape} "
                                f"dtype {declared.dtype}")
        num_classes, origin = int(declared), f"{NPZ_NUM_CLASSES}={int(declared)} as declared"
    else:
        num_classes = int(y_train.max()) + 1
        origin = f"{num_classes} classes from the largest training label"
    if num_classes > MAX_CLASSES:
        raise DataFileError(f"{where}: {origin} is more than the {MAX_CLASSES} classes moekit accepts; labels "
                            "must be class indices 0..C-1")
    if num_classes < 2:
        raise DataFileError(f"{where}: {origin}; a classifier needs at least 2")
    for key, y in (("y_train", y_train), ("y_test", y_test)):
        if int(y.max()) >= num_classes:
            raise DataFileError(f"{where}: {key!r} holds label {int(y.max())}, beyond the {origin} (labels must be "
                                f"0..{num_classes - 1}; declare {NPZ_NUM_CLASSES} in the file if the training "
                                "labels do not show every class)")
    return num_classes


def _read_npz(path: Path) -> dict[str, np.ndarray]:
    """Every array of an .npz archive; ``DataFileError`` names the file and what is wrong with it."""
    if path.is_dir():
        raise DataFileError(f"data file {str(path)!r} is a directory, not an .npz file")
    if not path.is_file():
        raise DataFileError(f"data file {str(path)!r} does not exist")
    try:
        with open(path, "rb") as f:
            magic = f.read(6)
    except OSError as e:
        raise DataFileError(f"cannot read data file {str(path)!r}: {e.strerror or e}") from e
    if magic.startswith(b"\x93NUMPY"):
        raise DataFileError(f"{str(path)!r} is a single .npy array; the image set is an .npz archive of the arrays "
                            f"{', '.join(NPZ_REQUIRED)} (numpy.savez)")
    if not magic.startswith(b"PK"):  # an .npz is a zip archive
        raise DataFileError(f"{str(path)!r} is not an .npz archive (numpy.savez writes one with the arrays "
                            f"{', '.join(NPZ_REQUIRED)})")
    try:
        with np.load(path, allow_pickle=False) as npz:
            return {key: npz[key] for key in npz.files}
    except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile, zlib.error) as e:
        detail = " ".join(str(e).split())[:200] or type(e).__name__
        raise DataFileError(f"{str(path)!r} is a damaged or truncated .npz archive, or holds more than plain "
                            f"arrays ({detail})") from e


def load_npz(path: str | Path) -> ImageSplits:
    """An image classification set from ``.npz`` arrays ``x_train, y_train, x_test, y_test`` (+ ``x_ood``).

    Images are [N, H, W] or channels-last [N, H, W, C]; labels 0..C-1, where C is the optional
    scalar array ``num_classes`` or else the largest training label + 1 (at most ``MAX_CLASSES``;
    a test label of no training class is an error). ``DataFileError`` (a ``ValueError``) names
    the file and the missing or bad array.
    """
    path = Path(path)
    arrays = _read_npz(path)
    missing = [key for key in NPZ_REQUIRED if key not in arrays]
    if missing:
        raise DataFileError(f"{str(path)!r} lacks the array(s) {', '.join(map(repr, missing))} "
                            f"(found {sorted(arrays)}; need {', '.join(NPZ_REQUIRED)}, optional x_ood)")
    images = {key: images_to_nchw(arrays[key], key, path) for key in ("x_train", "x_test", *NPZ_OPTIONAL)
              if key in arrays}
    for key, x in images.items():
        if x.shape[1:] != images["x_train"].shape[1:]:
            raise DataFileError(f"{str(path)!r}: {key!r} images have shape {x.shape[1:]} (C, H, W), x_train has "
                                f"{images['x_train'].shape[1:]}")
    y_train = _labels(arrays["y_train"], "y_train", path, len(images["x_train"]))
    y_test = _labels(arrays["y_test"], "y_test", path, len(images["x_test"]))
    num_classes = _num_classes(arrays, y_train, y_test, path)
    x_ood = images.get("x_ood")
    return ImageSplits(images["x_train"], y_train, images["x_test"], y_test, x_ood, num_classes,
                       f"{path.name}", "x_ood of the data file" if x_ood is not None else None)
