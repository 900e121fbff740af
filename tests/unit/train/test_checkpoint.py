"""Atomic checkpoint writes, weights-only loading and RNG state capture."""

import io
import pathlib
import random

import numpy as np
import pytest
import torch

from moekit.train.checkpoint import (
    atomic_write,
    capture_rng_state,
    load_checkpoint,
    restore_rng_state,
    save_checkpoint,
)

torch.set_num_threads(1)


def _state():
    return {
        "step": 7,
        "lr": 0.003,
        "name": "demo",
        "none": None,
        "model": {"w": torch.randn(3, 4), "b": torch.arange(5)},
        "history": {"loss": [3.5, 2.25], "steps": [1, 2]},
        "nested": [{"t": torch.ones(2, dtype=torch.bfloat16)}, (1, "x")],
    }


def _assert_same(a, b):
    assert type(a) is type(b)
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and torch.equal(a, b)
    elif isinstance(a, dict):
        assert a.keys() == b.keys()
        for k in a:
            _assert_same(a[k], b[k])
    elif isinstance(a, list | tuple):
        assert len(a) == len(b)
        for x, y in zip(a, b, strict=True):
            _assert_same(x, y)
    else:
        assert a == b


def test_round_trip(tmp_path):
    state = _state()
    path = save_checkpoint(tmp_path / "sub" / "ckpt.pt", state)
    _assert_same(load_checkpoint(path), state)


def test_save_leaves_only_the_final_file(tmp_path):
    save_checkpoint(tmp_path / "ckpt.pt", _state())
    save_checkpoint(tmp_path / "ckpt.pt", {"step": 8})
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.pt"]
    assert load_checkpoint(tmp_path / "ckpt.pt") == {"step": 8}


def test_failed_save_keeps_the_old_file_and_no_temporary(tmp_path):
    path = save_checkpoint(tmp_path / "ckpt.pt", {"step": 1})
    with pytest.raises(Exception):  # noqa: B017 - pickling a lambda fails; the type is torch's choice
        save_checkpoint(path, {"step": 2, "bad": lambda: None})
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.pt"]
    assert load_checkpoint(path) == {"step": 1}


def test_interrupted_write_keeps_the_old_file_and_no_temporary(tmp_path):
    path = save_checkpoint(tmp_path / "ckpt.pt", {"step": 1})

    def write_half_then_interrupt(f):
        f.write(b"partial data")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic_write(path, write_half_then_interrupt)
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.pt"]
    assert load_checkpoint(path) == {"step": 1}


class _Payload:
    """Unpickling this would create a file: the marker of code run by a load."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (pathlib.Path.touch, (self.marker,))


def test_load_refuses_a_pickled_object_without_running_it(tmp_path):
    marker = tmp_path / "code-was-run"
    path = tmp_path / "evil.pt"
    torch.save({"model": {}, "payload": _Payload(marker)}, path)  # a plain torch.save of an object
    with pytest.raises(ValueError, match="evil.pt"):
        load_checkpoint(path)
    assert not marker.exists()


def test_load_refuses_a_checkpoint_that_is_not_a_dict(tmp_path):
    path = tmp_path / "list.pt"
    torch.save([torch.zeros(1)], path)
    with pytest.raises(ValueError, match="not a dict"):
        load_checkpoint(path)


def _draw():
    return (
        torch.rand(3).tolist(),
        np.random.rand(3).tolist(),
        np.random.randn(),
        [random.random() for _ in range(3)],
    )


def test_rng_state_round_trips_through_a_weights_only_checkpoint(tmp_path):
    torch.manual_seed(1)
    np.random.seed(1)
    random.seed(1)
    np.random.randn()  # leave a cached Gaussian in numpy's state
    save_checkpoint(tmp_path / "rng.pt", {"rng": capture_rng_state()})
    expected = _draw()
    _draw()  # move every generator on
    restore_rng_state(load_checkpoint(tmp_path / "rng.pt")["rng"])
    assert _draw() == expected


def test_rng_state_is_plain_data():
    buf = io.BytesIO()
    torch.save(capture_rng_state(), buf)
    buf.seek(0)
    torch.load(buf, weights_only=True)  # raises if anything but plain data got in
