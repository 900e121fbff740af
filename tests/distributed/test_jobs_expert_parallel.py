"""``moekit lm`` and ``moekit ensemble`` with ``--expert-parallel`` on 2 gloo ranks under torchrun.

The convincing check: a run on 2 ranks (the global batch split between them) gives the training
losses, perplexities and predictions of the same command in one process, up to rounding.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from moekit.cli import main
from moekit.jobs.ensemble import job as ensemble_job
from moekit.jobs.lm import job as lm_job
from moekit.jobs.lm.config import config_from_args
from moekit.train.checkpoint import load_checkpoint
from moekit.train.outdir import ConfigError
from moekit.train.strategy import ExpertParallel

torch.set_num_threads(1)

RTOL = 1e-4  # what float32 rounding leaves between a sum over 2 ranks and over 1 (seen: ~2e-7)
INTERRUPTED_RUN = Path(__file__).with_name("interrupted_run.py")
STOPPED_RUN = Path(__file__).with_name("stopped_run.py")
TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")

LM = ["--dim", "8", "--steps", "4", "--batch-size", "4", "--seq-len", "8", "--vocab-size", "60", "--lr", "0.03",
      "--warmup", "2", "--eval-every", "2", "--eval-tokens", "64", "--checkpoint-every", "3", "--device", "cpu",
      "--quiet", "--threads", "1", "--dropout", "0.1", "--models", "lstm-4x,moe-4,moe-16-h"]
ENSEMBLE = ["--steps", "4", "--finetune-steps", "2", "--checkpoint-every", "3", "--device", "cpu", "--quiet",
            "--threads", "1"]


def torchrun(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """``torchrun --standalone --nproc_per_node=2 ARGS`` (the moekit under test is found through PYTHONPATH)."""
    env = {k: v for k, v in os.environ.items() if k not in TORCHRUN_VARS}
    env["OMP_NUM_THREADS"] = "1"
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           *args], env=env, capture_output=True, text=True, timeout=timeout)


def moekit_on_2_ranks(job: str, *args: str) -> subprocess.CompletedProcess:
    return torchrun("-m", "moekit", job, *args, "--expert-parallel")


def ok(proc: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return proc


def metrics(out: Path) -> dict:
    return json.loads((out / "metrics.json").read_text())


def assert_same_lm_results(got: Path, want: Path) -> None:
    a, b = metrics(got)["models"], metrics(want)["models"]
    assert [m["name"] for m in a] == [m["name"] for m in b]
    for x, y in zip(a, b, strict=True):
        assert x["steps"] == y["steps"] and x["history"]["train_step"] == y["history"]["train_step"]
        np.testing.assert_allclose(x["history"]["train_loss"], y["history"]["train_loss"], rtol=RTOL,
                                   err_msg=x["name"])
        np.testing.assert_allclose(x["history"]["valid_ppl"], y["history"]["valid_ppl"], rtol=RTOL, err_msg=x["name"])
        for key in ("test_ppl", "valid_ppl", "params", "ops_per_timestep"):
            assert x[key] == pytest.approx(y[key], rel=RTOL), (x["name"], key)
        for key in ("cv_importance", "cv_load", "train_cv_importance", "train_cv_load"):
            assert (x[key] is None) == (y[key] is None), (x["name"], key)
            if x[key] is not None:
                assert x[key] == pytest.approx(y[key], rel=1e-3, abs=1e-5), (x["name"], key)


# --- fixtures -----------------------------------------------------------------------------------------


def lm_args(out: Path, text_file: Path) -> list[str]:
    return ["--out", str(out), "--data", str(text_file), *LM]


@pytest.fixture(scope="module")
def lm_single(tmp_path_factory, text_file):
    out = tmp_path_factory.mktemp("lm") / "single"
    assert main(["lm", *lm_args(out, text_file)]) == 0
    return out


def ensemble_args(out: Path, npz: Path, *models: str) -> list[str]:
    return ["--out", str(out), "--data", str(npz), *ENSEMBLE, *(["--models", ",".join(models)] if models else [])]


# --- lm -----------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_lm_on_2_ranks_matches_the_single_process_run(tmp_path, text_file, lm_single):
    out = tmp_path / "ep"
    proc = ok(moekit_on_2_ranks("lm", *lm_args(out, text_file)))
    assert proc.stdout.count("results in") == 1  # rank 0 alone reports
    assert_same_lm_results(out, lm_single)
    m = metrics(out)
    assert m["environment"]["device"] == "2 ranks x cpu (--expert-parallel, gloo)"
    for name in ("report.md", "config.json", "eval_nll.npz", "valid_ppl.png"):
        assert (out / name).is_file(), name
    assert (out / "config.json").read_text() == (lm_single / "config.json").read_text()
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_00000011.pt", "step_00000012.pt"]
    assert not list(out.rglob("*.tmp"))


@pytest.mark.slow
def test_lm_interrupted_on_one_rank_resumes_on_2_ranks_or_in_one_process(tmp_path, text_file, lm_single):
    out = tmp_path / "cut"
    # A SIGINT on rank 1 in step 2 of the second model: both ranks stop after it, checkpoint 4 + 2.
    proc = torchrun(str(INTERRUPTED_RUN), "6", "1", "lm", *lm_args(out, text_file), "--expert-parallel")
    assert proc.returncode != 0
    assert proc.stderr.count("rerun with --resume") == 1, proc.stderr[-3000:]
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_00000004.pt", "step_00000006.pt"]
    ckpt = load_checkpoint(out / "checkpoints" / "step_00000006.pt")
    assert ckpt["current"]["model"]["middle.experts.w1"].shape[0] == 4  # the whole model, as one process saves it
    assert not (out / "metrics.json").exists()
    in_one = tmp_path / "cut-copy"
    shutil.copytree(out, in_one)

    ok(moekit_on_2_ranks("lm", *lm_args(out, text_file), "--resume"))
    assert_same_lm_results(out, lm_single)
    assert main(["lm", *lm_args(in_one, text_file), "--resume"]) == 0  # saved on 2 ranks, resumed on 1
    assert_same_lm_results(in_one, lm_single)


# --- ensemble -----------------------------------------------------------------------------------------


def finished_runs(out: Path) -> dict:
    *_, path = sorted((out / "checkpoints").iterdir())  # the newest of the last two
    return load_checkpoint(path)["finished"]


def assert_same_ensemble_results(got: Path, want: Path) -> None:
    a, b = finished_runs(got), finished_runs(want)
    assert sorted(a) == sorted(b)
    for name in a:
        torch.testing.assert_close(a[name]["losses"], b[name]["losses"], rtol=RTOL, atol=0, msg=name)
        torch.testing.assert_close(a[name]["member_probs"], b[name]["member_probs"], rtol=RTOL, atol=1e-5, msg=name)
        assert a[name]["params"] == b[name]["params"], name
        assert a[name]["flops_per_example"] == pytest.approx(b[name]["flops_per_example"], rel=1e-6), name
        # atol: Adam turns rounding noise in a gradient that is 0 in exact arithmetic (attention's key
        # bias) into steps of up to lr; the weights then differ by ~1e-5 where the outputs do not.
        for key, value in b[name]["model"].items():
            torch.testing.assert_close(a[name]["model"][key], value, rtol=RTOL, atol=1e-4, msg=f"{name}: {key}")
    ma, mb = metrics(got)["models"], metrics(want)["models"]
    for model in mb:
        for key in ("accuracy", "nll", "ece", "brier", "gflops_per_example", "params"):
            assert ma[model][key] == pytest.approx(mb[model][key], rel=RTOL, abs=1e-6), (model, key)


@pytest.mark.slow
def test_ensemble_on_2_ranks_matches_the_single_process_run(tmp_path, tiny_npz):
    single, ep = tmp_path / "single", tmp_path / "ep"
    assert main(["ensemble", *ensemble_args(single, tiny_npz)]) == 0
    proc = ok(moekit_on_2_ranks("ensemble", *ensemble_args(ep, tiny_npz)))
    assert proc.stdout.count("results in") == 1
    assert sorted(metrics(ep)["models"]) == sorted(ensemble_job.MODELS)  # dense, vmoe, e3, deep-ensemble, e3-init
    assert_same_ensemble_results(ep, single)
    assert "2 ranks x cpu" in (ep / "report.md").read_text()


@pytest.mark.slow
def test_ensemble_interrupted_on_2_ranks_resumes(tmp_path, tiny_npz):
    models = ("vmoe", "e3-init")
    single, out = tmp_path / "single", tmp_path / "cut"
    assert main(["ensemble", *ensemble_args(single, tiny_npz, *models)]) == 0
    # vmoe trains 4 steps; e3-init (initialised from it) is stopped after 1 of its 2, rank 0 signalled.
    proc = torchrun(str(INTERRUPTED_RUN), "5", "0", "ensemble", *ensemble_args(out, tiny_npz, *models),
                    "--expert-parallel")
    assert proc.returncode != 0
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_00000004.pt", "step_00000005.pt"]
    ok(moekit_on_2_ranks("ensemble", *ensemble_args(out, tiny_npz, *models), "--resume"))
    assert_same_ensemble_results(out, single)


# --- errors -------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_an_out_dir_refused_on_rank_0_stops_every_rank_with_one_message(tmp_path, text_file):
    out = tmp_path / "busy"
    out.mkdir()
    (out / "notes.txt").write_text("not a run")
    proc = moekit_on_2_ranks("lm", *lm_args(out, text_file))  # only rank 0 looks at --out
    assert proc.returncode != 0
    # One line from rank 0 (the other lines are torchrun's report of the failed workers).
    assert proc.stderr.count("moekit lm: error:") == 1, proc.stderr[-3000:]
    assert "holds no config.json" in proc.stderr
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]


def test_expert_parallel_outside_torchrun_says_to_launch_with_torchrun(tmp_path, text_file, tiny_npz, monkeypatch,
                                                                     capsys):
    for name in TORCHRUN_VARS:
        monkeypatch.delenv(name, raising=False)
    assert main(["lm", *lm_args(tmp_path / "lm", text_file), "--expert-parallel"]) == 2
    err = capsys.readouterr().err
    assert "torchrun --nproc_per_node=N -m moekit lm" in err and "RANK" in err and "Traceback" not in err
    assert main(["ensemble", *ensemble_args(tmp_path / "ens", tiny_npz), "--expert-parallel"]) == 2
    assert "torchrun --nproc_per_node=N -m moekit ensemble" in capsys.readouterr().err
    assert not (tmp_path / "lm").exists() and not (tmp_path / "ens").exists()


@pytest.mark.slow
@pytest.mark.parametrize("layout", [["--fsdp", "--ep-size", "1"], ["--ep-size", "2"]],
                         ids=["2x1-fsdp", "1x2-replicate"])
def test_lm_on_a_2_rank_mesh_matches_the_single_process_run(tmp_path, text_file, lm_single, layout):
    # The ("dp", "ep") layouts of moekit.parallel.parallelize: FSDP2 with the experts replicated on
    # both ranks (2x1), and the experts sharded over both ranks with the dense part replicated by
    # FSDP2's replicate (1x2). Both train what one process trains on the global batch.
    out = tmp_path / "mesh"
    ok(moekit_on_2_ranks("lm", *lm_args(out, text_file), *layout))
    assert_same_lm_results(out, lm_single)
    layout_name = "2x1 fsdp" if "--fsdp" in layout else "1x2 replicate"
    assert metrics(out)["environment"]["device"] == f"2 ranks x cpu (--expert-parallel, {layout_name}, gloo)"


def test_several_processes_without_the_flag_are_refused(tmp_path, text_file, monkeypatch, capsys):
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert main(["lm", *lm_args(tmp_path / "lm", text_file)]) == 2
    assert "(WORLD_SIZE=2) without --expert-parallel" in capsys.readouterr().err
    assert not (tmp_path / "lm").exists()


def test_experts_or_batch_that_do_not_split_over_the_ranks_are_named():
    three = ExpertParallel(rank=0, world_size=3, device=torch.device("cpu"))  # no process group needed
    parser_args = ["lm", "--models", "lstm-4x,moe-4", "--batch-size", "6"]
    from moekit.cli import build_parser

    with pytest.raises(ConfigError, match="the number of experts of moe-4=4 is not divisible by the 3 ranks"):
        lm_job.check_parallel(config_from_args(build_parser().parse_args(parser_args)), three)
    with pytest.raises(ConfigError, match="batch_size=32 is not divisible by the 3 ranks"):
        lm_job.check_parallel(config_from_args(build_parser().parse_args(["lm", "--models", "lstm-4x"])), three)
    lm_job.check_parallel(config_from_args(build_parser().parse_args(["lm", "--models", "lstm-4x",
                                                                      "--batch-size", "6"])), three)
    with pytest.raises(ConfigError, match="num_experts=8 is not divisible by the 3 ranks"):
        ensemble_job.check_parallel(ensemble_job.EnsembleConfig(batch_size=63), three)
    ensemble_job.check_parallel(ensemble_job.EnsembleConfig(batch_size=63, models=("dense",)), three)
    # With --ep-size the experts split over a group of P ranks, the batch still over all of them.
    six_by_three = ExpertParallel(rank=0, world_size=6, device=torch.device("cpu"), ep_size=3)
    ensemble_job.check_parallel(ensemble_job.EnsembleConfig(batch_size=12, num_experts=6), six_by_three)
    with pytest.raises(ConfigError, match="num_experts=8 is not divisible by --ep-size 3"):
        ensemble_job.check_parallel(ensemble_job.EnsembleConfig(batch_size=12, num_experts=8), six_by_three)
    with pytest.raises(ConfigError, match="--ep-size 4 does not divide the 6 ranks"):
        ExpertParallel(rank=0, world_size=6, device=torch.device("cpu"), ep_size=4)


@pytest.mark.slow
def test_a_stopped_rank_is_named_on_the_console_and_the_run_completes_when_it_continues(tmp_path, text_file):
    # Rank 1 is stopped (SIGSTOP) in its 3rd step; with --watchdog 1, rank 0 must name it within seconds,
    # where the collective alone would wait out --timeout. SIGCONT then lets the run finish normally.
    pidfile, out = tmp_path / "stopped.pid", tmp_path / "run"
    env = {k: v for k, v in os.environ.items() if k not in TORCHRUN_VARS}
    env["OMP_NUM_THREADS"] = "1"
    proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                             str(STOPPED_RUN), "3", "1", str(pidfile), "lm", *lm_args(out, text_file),
                             "--expert-parallel", "--watchdog", "1", "--timeout", "120"],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    lines = []
    try:
        for line in proc.stderr:
            lines.append(line)
            if "has waited" in line:
                break
        assert any("has waited" in line for line in lines), "".join(lines[-40:])
        report = next(line for line in lines if "has waited" in line)
        assert "moekit: rank 0 has waited" in report and "for rank 1 (" in report and "stopped or hung?" in report
        assert "the all_reduce of the gradients during training step 3 of lstm-4x" in report
        os.kill(int(pidfile.read_text()), signal.SIGCONT)
        rest = proc.stderr.read()
        assert proc.wait(timeout=300) == 0, rest[-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()
    assert (out / "metrics.json").is_file()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_cuda_without_cuda_is_a_clear_error(tmp_path, text_file, capsys):
    # Refused as the command line is read, through the one error path of the jobs: a line, status 2.
    assert main(["lm", *lm_args(tmp_path / "lm", text_file), "--device", "cuda", "--expert-parallel"]) == 2
    assert "CUDA is not available" in capsys.readouterr().err


@pytest.mark.parametrize("job", ["lm", "ensemble"])
def test_help_says_how_to_launch(job, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "1000")  # no line breaks inside the command
    with pytest.raises(SystemExit):
        main([job, "--help"])
    text = capsys.readouterr().out
    assert f"torchrun --nproc_per_node=N -m moekit {job} ... --expert-parallel" in text
    assert "gloo on cpu, NCCL on cuda" in text
