"""Model weights as safetensors files: the ecosystem's format, which holds tensors and nothing else.

- ``save_safetensors(model_or_state_dict, path, metadata=None)``: atomic (a temporary file, then a
  rename); an expert-parallel model is gathered into its single-process state dict first
  (``moekit.parallel.full_state_dict``), so the file is the same on any number of ranks.
- ``load_safetensors(path)``: the state dict (``model.load_state_dict`` it; for an expert-parallel
  model ``moekit.parallel.load_full_state_dict``).
- ``export_checkpoint(checkpoint, out_dir)``: the model weights a command-line job's checkpoint
  holds (``moekit.train.session``): its run in progress, and its finished runs' weights where the
  job keeps them, one safetensors file each.

Needs the ``safetensors`` package (in the ``moekit[hf]`` extra); loading never runs code.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

# Where finished runs keep their weights in a session checkpoint (the jobs' conventions).
WEIGHT_KEYS = ("weights", "model")


def _safetensors_torch():
    try:
        import safetensors.torch
    except ImportError as e:
        raise ImportError("safetensors files need the safetensors package: pip install safetensors "
                          "(or moekit[hf])") from e
    return safetensors.torch


def _state_dict(model_or_state_dict: nn.Module | dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], bool]:
    """(the single-process state dict, whether this process writes it: not so on ranks > 0 of an
    expert-parallel model, whose ranks all take part in gathering it)."""
    if isinstance(model_or_state_dict, nn.Module):
        from moekit.parallel import expert_parallel_layers, full_state_dict

        model = model_or_state_dict
        if dist.is_available() and dist.is_initialized() and list(expert_parallel_layers(model)):
            return full_state_dict(model), dist.get_rank() == 0
        return model.state_dict(), True
    if isinstance(model_or_state_dict, dict):
        return model_or_state_dict, True
    raise TypeError(f"save_safetensors takes an nn.Module or a state dict, got {type(model_or_state_dict).__name__}")


def _tensors(state: dict[str, Any]) -> dict[str, torch.Tensor]:
    """Contiguous CPU tensors, no two sharing storage: safetensors refuses shared memory, so a tied
    weight (or a slice of a shared buffer) is written once per name and every key loads back."""
    out: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for name, value in state.items():
        if not isinstance(name, str):
            raise TypeError(f"state dict key {name!r} is not a string")
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"state dict entry {name!r} is a {type(value).__name__}, not a tensor")
        t = value.detach().to("cpu").contiguous()
        if t.untyped_storage().data_ptr() in seen:
            t = t.clone()
        seen.add(t.untyped_storage().data_ptr())
        out[name] = t
    return out


def save_safetensors(model_or_state_dict: nn.Module | dict[str, torch.Tensor], path: str | Path,
                     metadata: dict[str, str] | None = None) -> Path:
    """Write a model's weights (or a state dict) to ``path`` as safetensors, atomically; returns ``path``.

    ``metadata``: string keys and values stored in the file's header. For an expert-parallel model
    every rank calls this (the experts are gathered from all of them) and rank 0 writes the file.
    """
    st = _safetensors_torch()
    if metadata is not None:
        bad = [f"{k!r}: {v!r}" for k, v in metadata.items() if not isinstance(k, str) or not isinstance(v, str)]
        if bad:
            raise TypeError(f"safetensors metadata must map str to str; not: {', '.join(bad)}")
    from moekit.train.checkpoint import atomic_write  # not at import: moekit.train is the jobs' package

    state, writes = _state_dict(model_or_state_dict)
    if not writes:
        return Path(path)
    data = st.save(_tensors(state), metadata=metadata)
    return atomic_write(path, lambda f: f.write(data))


def load_safetensors(path: str | Path, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """The state dict stored in the safetensors file ``path`` (tensors on ``device``)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no safetensors file at {str(path)!r}")
    return dict(_safetensors_torch().load_file(str(path), device=str(device)))


def safetensors_metadata(path: str | Path) -> dict[str, str]:
    """The header metadata of a safetensors file (empty when it has none)."""
    _safetensors_torch()  # the clear error when the package is missing
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return dict(f.metadata() or {})


def _is_state_dict(value: Any) -> bool:
    return (isinstance(value, dict) and bool(value)
            and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in value.items()))


def _file_name(run: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", run) or "run"


def export_checkpoint(checkpoint: str | Path, out_dir: str | Path) -> list[Path]:
    """Export the model weights held in a session checkpoint of a moekit job as safetensors files.

    Writes ``<run>.safetensors`` for every finished run whose result keeps its weights (under
    "weights" or "model") and ``<run>.step<N>.safetensors`` for the run in progress (its weights
    after N steps). Each file's metadata names the run, its step and the checkpoint. Returns the
    paths written (none if the checkpoint holds no weights).
    """
    from moekit.train.checkpoint import load_checkpoint

    checkpoint = Path(checkpoint)
    ckpt = load_checkpoint(checkpoint)
    if "finished" not in ckpt or "current" not in ckpt:
        raise ValueError(f"{str(checkpoint)!r} is not a moekit session checkpoint (no finished runs or current run)")
    out_dir = Path(out_dir)
    written = []
    for run, result in ckpt["finished"].items():
        if not isinstance(result, dict):
            continue
        for key in WEIGHT_KEYS:
            if _is_state_dict(result.get(key)):
                meta = {"run": run, "status": "finished", "checkpoint": checkpoint.name}
                written.append(save_safetensors(result[key], out_dir / f"{_file_name(run)}.safetensors", meta))
                break
    current = ckpt["current"]
    if current is not None and _is_state_dict(current.get("model")):
        step = int(current["state"]["step"])
        meta = {"run": current["name"], "status": "in progress", "step": str(step), "checkpoint": checkpoint.name}
        path = out_dir / f"{_file_name(current['name'])}.step{step}.safetensors"
        written.append(save_safetensors(current["model"], path, meta))
    return written
