"""What a checkpoint records of the data a job loaded, so that a resume on changed data is refused.

A fingerprint is plain data: the file's resolved path and size (None for a source that is not one
file, e.g. the ``bible`` program) and a SHA-256 of what was loaded from it. The hash covers the
loaded content rather than the file's bytes, so it describes exactly what the run trained on, and
it covers the types and shapes too (``["ab"]`` and ``["a", "b"]`` differ).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch


def data_fingerprint(path: str | Path | None, *contents: Any) -> dict[str, Any]:
    """``{"path": str | None, "size": int | None, "sha256": str}`` of data loaded from ``path``.

    Args:
        path: the file the data was read from (None when it came from elsewhere).
        contents: what was loaded: strings, numbers, numpy arrays, tensors, and lists, tuples and
            dicts of them (e.g. token streams, examples, image arrays; None for an absent part).
    """
    digest = hashlib.sha256()
    for part in contents:
        _update(digest, part)
    resolved, size = None, None
    if path is not None:
        resolved = str(Path(path).resolve())
        try:
            size = os.stat(path).st_size
        except OSError:
            size = None
    return {"path": resolved, "size": size, "sha256": digest.hexdigest()}


def _update(digest: Any, part: Any) -> None:
    if isinstance(part, torch.Tensor):
        part = part.detach().cpu().numpy()
    if isinstance(part, np.ndarray):
        # dtype and shape first: the same bytes as another shape are other data.
        digest.update(f"ndarray {part.dtype.str} {part.shape}\n".encode())
        digest.update(np.ascontiguousarray(part).tobytes())
        return
    # Everything else is plain data; JSON is an unambiguous encoding of it (strings are quoted).
    digest.update(b"json ")
    digest.update(json.dumps(part, ensure_ascii=False, default=_unsupported).encode("utf-8"))
    digest.update(b"\n")


def _unsupported(value: Any) -> Any:
    raise TypeError(f"cannot fingerprint a {type(value).__name__}")
