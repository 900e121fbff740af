"""``moekit upcycle``'s configuration and schedule, by hand (no training)."""

import math

import pytest

from moekit.cli import build_parser
from moekit.jobs.upcycle.config import PRESETS, command_line, config_from_args
from moekit.jobs.upcycle.job import continuation_schedule
from moekit.train.outdir import ConfigError


def _cfg(*argv):
    return config_from_args(build_parser().parse_args(["upcycle", *argv]))


def test_presets_are_valid_and_options_win():
    for preset in PRESETS:
        cfg = _cfg("--preset", preset)
        assert cfg.dim == PRESETS[preset]["dim"] and cfg.w_importance == 0.01 and cfg.noise == 0.0
    cfg = _cfg("--preset", "tiny", "--k", "1", "--noise", "0.05", "--seed", "3")
    assert (cfg.k, cfg.noise, cfg.seed, cfg.num_experts) == (1, 0.05, 3, PRESETS["tiny"]["num_experts"])


def test_command_line_reproduces_the_config():
    cfg = _cfg("--preset", "tiny", "--k", "1", "--lr", "0.003", "--data", "corpus.txt", "--seed", "2")
    line = command_line(cfg)
    assert line == "moekit upcycle --preset tiny --seed 2 --data corpus.txt --k 1 --lr 0.003"
    assert _cfg(*line.split()[2:]) == cfg
    assert command_line(_cfg()) == "moekit upcycle --preset cpu-small"


@pytest.mark.parametrize("argv, message", [
    (["--dim", "15", "--heads", "2"], "dim=15 is not a multiple of heads=2"),
    (["--dim", "18", "--heads", "6"], "the head width dim/heads=3 must be even"),
    (["--k", "9"], "k=9 exceeds num_experts=8"),
    # Values out of range are refused as the command line is read (moekit.jobs.options).
    (["--continue-steps", "0"], "--continue-steps: must be an integer >= 1, got '0'"),
    (["--lr", "0"], "--lr: must be a finite number > 0, got '0'"),
    (["--noise", "-1"], "--noise: must be a finite number >= 0, got '-1'"),
])
def test_bad_values_are_named(argv, message):
    with pytest.raises(ConfigError, match=message):
        _cfg(*argv)


def test_continuation_schedule_rewarms_to_where_the_dense_schedule_is():
    cfg = _cfg("--preset", "tiny", "--lr", "0.001", "--warmup", "100", "--dense-steps", "400", "--rewarmup", "10")
    rate = continuation_schedule(cfg)
    # The dense schedule at step 400 (0-based) is lr * sqrt(100 / 401); the fresh optimizer starts
    # at a tenth of it and reaches the dense schedule after 10 steps, then follows it.
    assert rate(0) == pytest.approx(1e-3 * math.sqrt(100 / 401) / 10)
    assert rate(4) == pytest.approx(1e-3 * math.sqrt(100 / 405) / 2)
    assert rate(9) == pytest.approx(1e-3 * math.sqrt(100 / 410))
    assert rate(50) == pytest.approx(1e-3 * math.sqrt(100 / 451))
