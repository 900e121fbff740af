import random

import numpy as np
import pytest
import torch

# Small shapes everywhere: one thread is fastest and keeps parallel test workers from fighting.
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture(scope="session")
def text_file(tmp_path_factory):
    """Synthetic lines with structure to learn (runs of consecutive words, steps of 1 or 2): a corpus
    for the language-model jobs that needs no Debian package."""
    rng = random.Random(0)
    words = [f"w{i}" for i in range(50)]
    lines = []
    for _ in range(300):
        start, stride = rng.randrange(len(words)), rng.choice((1, 2))
        lines.append(" ".join(words[(start + j * stride) % len(words)] for j in range(8)) + " .")
    path = tmp_path_factory.mktemp("data") / "synthetic.txt"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def tiny_npz(tmp_path_factory):
    """Three classes of 8x8 images, each brightening its own band of rows, plus uniform-noise OOD
    images: an image set for the ensemble job in the ``--data`` .npz format."""
    rng = np.random.default_rng(0)

    def make(n):
        y = rng.integers(0, 3, n)
        x = rng.integers(0, 60, (n, 8, 8)).astype(np.uint8)
        for c in range(3):
            x[y == c, 2 * c:2 * c + 3] += 150
        return x, y

    (x_train, y_train), (x_test, y_test) = make(64), make(20)
    path = tmp_path_factory.mktemp("data") / "tiny.npz"
    np.savez(path, x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test,
             x_ood=rng.integers(0, 256, (8, 8, 8)).astype(np.uint8))
    return path


@pytest.fixture
def stop_during_step(monkeypatch):
    """``stop_during_step(n)``: the training loop behaves as if SIGINT arrived during the n-th training
    step of this process (counted over every run of a job), so the job checkpoints and stops."""
    import moekit.train.loop as loop

    def arm(n: int) -> None:
        seen = {"steps": 0}

        class StopAfter(loop.StopRequest):
            @property
            def requested(self):  # read once at the end of every step
                seen["steps"] += 1
                return seen["steps"] >= n

            @requested.setter
            def requested(self, value):
                pass

        monkeypatch.setattr(loop, "StopRequest", StopAfter)

    return arm
