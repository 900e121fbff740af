"""Training support: atomic checkpoints, RNG capture, out-directory handling and plots."""

from moekit.train.checkpoint import capture_rng_state, load_checkpoint, restore_rng_state, save_checkpoint
from moekit.train.outdir import OutDirError, latest_checkpoint, prepare_out_dir

__all__ = [
    "OutDirError",
    "capture_rng_state",
    "latest_checkpoint",
    "load_checkpoint",
    "prepare_out_dir",
    "restore_rng_state",
    "save_checkpoint",
]
