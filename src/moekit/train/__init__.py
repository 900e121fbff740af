"""Training support shared by every job: the one loop, the checkpointed session, the strategy (one
process or expert-parallel ranks), schedules, atomic checkpoints, out-directory handling and plots."""

from moekit.train.checkpoint import capture_rng_state, load_checkpoint, restore_rng_state, save_checkpoint
from moekit.train.loop import LoopConfig, StepOutput, TrainState, train
from moekit.train.outdir import ConfigError, OutDirError, latest_checkpoint, prepare_out_dir
from moekit.train.session import Session
from moekit.train.strategy import SINGLE_PROCESS, ExpertParallel, SingleProcess

__all__ = [
    "SINGLE_PROCESS",
    "ConfigError",
    "ExpertParallel",
    "LoopConfig",
    "OutDirError",
    "Session",
    "SingleProcess",
    "StepOutput",
    "TrainState",
    "capture_rng_state",
    "latest_checkpoint",
    "load_checkpoint",
    "prepare_out_dir",
    "restore_rng_state",
    "save_checkpoint",
    "train",
]
