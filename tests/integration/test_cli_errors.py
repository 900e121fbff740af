"""Every job's user errors take one path: one line on stderr naming the value or file, exit status 2.

The cases are those of a hostile-input audit of the command line: bad option values, unusable data
files, unusable ``--out`` directories. Each fails before any training (and, but for the ``--out``
cases, before ``--out`` is touched), so the whole table runs in seconds.
"""

import json

import numpy as np
import pytest
import torch

from moekit.cli import main
from moekit.data.pairs import synthetic_examples, write_jsonl

torch.set_num_threads(1)

DEMO = ["--steps", "2", "--batch-size", "4", "--seq-len", "8", "--dim", "16", "--hidden-dim", "32", "--num-experts",
        "4", "--k", "2", "--vocab-size", "120", "--device", "cpu", "--quiet"]
LM = ["--dim", "8", "--steps", "2", "--batch-size", "4", "--seq-len", "8", "--vocab-size", "60", "--models", "moe-4",
      "--device", "cpu", "--quiet"]
ENSEMBLE = ["--steps", "2", "--models", "dense", "--device", "cpu", "--quiet"]
PATTERNS = ["--preset", "tiny", "--patterns", "2", "--device", "cpu", "--quiet"]
UPCYCLE = ["--preset", "tiny", "--device", "cpu", "--quiet"]
FACTS = ["--dim", "8", "--facts", "4,8", "--seeds", "1", "--num-symbols", "6", "--num-values", "4", "--device", "cpu",
         "--quiet"]


@pytest.fixture(scope="module")
def files(tmp_path_factory, text_file, tiny_npz):
    """The data files of the cases, by name: good ones and every kind of bad one."""
    d = tmp_path_factory.mktemp("bad")
    good = dict(np.load(tiny_npz))

    def npz(name, **changes):
        arrays = {**good, **changes}
        np.savez(d / name, **{k: v for k, v in arrays.items() if v is not None})
        return d / name

    y_big, y_unseen, x_huge = good["y_train"].copy(), good["y_test"].copy(), good["x_train"].astype(np.float32)
    y_big[0], y_unseen[0], x_huge[0, 0, 0] = 10**9, 7, 1e30
    x_nan = x_huge.copy()
    x_nan[0, 0, 0] = np.nan
    np.save(d / "array.npy", good["x_train"])
    (d / "cut.npz").write_bytes(tiny_npz.read_bytes()[:400])
    (d / "binary.txt").write_bytes(bytes(range(256)) * 4)
    (d / "empty.txt").write_text("")
    write_jsonl(d / "pairs.jsonl", synthetic_examples(30, 2, seed=0))
    (d / "bad.jsonl").write_text('{"source": "a b"}\n')
    (d / "a-file").write_text("not a directory")
    return {"text": text_file, "npz": tiny_npz, "npy": d / "array.npy", "cut": d / "cut.npz",
            "binary": d / "binary.txt", "empty": d / "empty.txt", "pairs": d / "pairs.jsonl",
            "bad_jsonl": d / "bad.jsonl",
            "label 1e9": npz("big.npz", y_train=y_big), "unseen": npz("unseen.npz", y_test=y_unseen),
            "1e30": npz("huge.npz", x_train=x_huge), "nan": npz("nan.npz", x_train=x_nan),
            "float labels": npz("float.npz", y_train=good["y_train"].astype(float)),
            "no y_test": npz("lacks.npz", y_test=None), "a-file": d / "a-file", "dir": d}


# (job, options, what the message must say); {name} stands for files[name].
CASES = [
    # options every job shares
    ("demo", ["--seed", "-1"], "--seed: must be an integer from 0 to 4294967295, got '-1'"),
    ("demo", ["--seed", str(2**33)], "got '8589934592'"),
    ("lm", ["--seed", "x"], "--seed: invalid int value: 'x'"),
    ("demo", ["--device", "meta"], "device 'meta': the jobs train on cpu, cuda, mps"),
    ("demo", ["--device", "cuda:99"], "device 'cuda:99'"),
    ("ensemble", ["--device", "nonsense"], "unknown device 'nonsense'"),
    ("demo", ["--bogus"], "unrecognized arguments: --bogus"),
    ("lm", ["--fsdp"], "--fsdp lay out the ranks of a torchrun launch: add --expert-parallel"),
    ("ensemble", ["--ep-size", "2", "--fsdp"], "--ep-size and --fsdp lay out the ranks"),
    ("lm", ["--ep-size", "0"], "--ep-size: must be an integer >= 1, got '0'"),
    # demo
    ("demo", ["--lr", "inf"], "--lr: must be a finite number > 0, got 'inf'"),
    ("demo", ["--lr", "nan"], "--lr: must be a finite number > 0, got 'nan'"),
    ("demo", ["--steps", "0"], "--steps: must be an integer >= 1, got '0'"),
    ("demo", ["--vocab-size", "1"], "vocab_size=1 leaves no room for a word"),
    ("demo", ["--vocab-size", "2"], "vocab_size=2 leaves no room for a word"),
    ("demo", ["--router", "expert_choice"], "--router: invalid choice: 'expert_choice'"),
    ("demo", ["--router", "e3"], "--router: invalid choice: 'e3'"),
    ("demo", ["--k", "5"], "k=5 exceeds num_experts=4"),
    ("demo", ["--seq-len", "100000"], "seq_len=100000 needs more than"),
    ("demo", ["--data", "{binary}"], "binary.txt' looks binary"),
    ("demo", ["--data", "{empty}"], "empty.txt' is empty"),
    ("demo", ["--data", "{dir}/missing.txt"], "missing.txt': No such file"),
    # lm
    ("lm", ["--lr", "inf"], "--lr: must be a finite number > 0, got 'inf'"),
    ("lm", ["--vocab-size", "1"], "vocab_size=1 leaves no room for a word"),
    ("lm", ["--dropout", "1.5"], "--dropout: must be a probability in [0, 1), got '1.5'"),
    ("lm", ["--w-load", "-1"], "--w-load: must be a finite number >= 0, got '-1'"),
    ("lm", ["--w-importance", "nan"], "--w-importance: must be a finite number >= 0, got 'nan'"),
    ("lm", ["--clip", "inf"], "--clip: must be a finite number > 0"),
    ("lm", ["--threads", "0"], "--threads: must be an integer from 1 to 1024, got '0'"),
    ("lm", ["--threads", str(2**31)], "--threads: must be an integer from 1 to 1024, got '2147483648'"),
    ("lm", ["--models", "gru"], "unknown model 'gru'"),
    ("lm", ["--data", "{npz}"], "tiny.npz' looks binary"),
    ("lm", ["--timeout", "0"], "--timeout: must be a number of seconds > 0, got '0'"),
    ("ensemble", ["--watchdog", "-1"], "--watchdog: must be a finite number of seconds >= 0, got '-1'"),
    # ensemble
    ("ensemble", ["--threads", "-1"], "--threads: must be an integer from 1 to 1024, got '-1'"),
    ("ensemble", ["--steps", "0"], "--steps: must be an integer >= 1, got '0'"),
    ("ensemble", ["--models", "bogus"], "unknown model(s) ['bogus']"),
    ("ensemble", ["--data", "{npy}"], "array.npy' is a single .npy array"),
    ("ensemble", ["--data", "{cut}"], "cut.npz' is a damaged or truncated .npz archive"),
    ("ensemble", ["--data", "{text}"], "synthetic.txt' is not an .npz archive"),
    ("ensemble", ["--data", "{dir}"], "is a directory, not an .npz file"),
    ("ensemble", ["--data", "{label 1e9}"], "1000000001 classes from the largest training label is more than"),
    ("ensemble", ["--data", "{unseen}"], "'y_test' holds label 7, beyond the 3 classes"),
    ("ensemble", ["--data", "{1e30}"], "pixel values (up to 1e+30) are too large to standardise"),
    ("ensemble", ["--data", "{nan}"], "'x_train' holds NaN or Inf"),
    ("ensemble", ["--data", "{float labels}"], "'y_train' must be a 1-D integer array"),
    ("ensemble", ["--data", "{no y_test}"], "lacks the array(s) 'y_test'"),
    ("ensemble", ["--ensemble-size", "1"], "--ensemble-size 1: an ensemble needs M >= 2 members"),
    ("ensemble", ["--ensemble-size", "0"], "--ensemble-size: must be an integer >= 1, got '0'"),
    ("ensemble", ["--ensemble-size", "3"], "num_experts=8 is not divisible by ensemble_size=3"),
    ("ensemble", ["--ensemble-size", "8", "--k", "2"], "k=2 exceeds"),
    ("ensemble", ["--layout", "first"], "--layout: invalid choice: 'first'"),
    ("ensemble", ["--last-n", "9"], "last_n=9 must be in [1, 4] for depth=8"),
    ("ensemble", ["--last-n", "0"], "--last-n: must be an integer >= 1, got '0'"),
    # patterns
    ("patterns", ["--patterns", "1000"], "--patterns 1000 needs 1000 pattern tokens"),
    ("patterns", ["--patterns", "1"], "--patterns 1: K must be >= 2"),
    ("patterns", ["--data", "synthetic", "--patterns", "7"], "--patterns 7: the synthetic set has 6 patterns"),
    ("patterns", ["--threads", "-1"], "--threads: must be an integer from 0 to 1024, got '-1'"),
    ("patterns", ["--threads", "1000000000"], "--threads: must be an integer from 0 to 1024"),
    ("patterns", ["--beam", "0"], "--beam: must be an integer >= 1"),
    ("patterns", ["--data", "{bad_jsonl}"], "bad.jsonl:1: 'targets' must be a non-empty list"),
    ("patterns", ["--data", "{npz}"], "cannot read pair data"),
    ("patterns", ["--capacity-factor", "0.5"], "--capacity-factor: must be a finite number >= 1 or 'none', got '0.5'"),
    ("patterns", ["--capacity-factor", "nan"], "--capacity-factor: must be a finite number >= 1 or 'none'"),
    ("patterns", ["--capacity-factor", "x"], "--capacity-factor: invalid capacity_or_none value: 'x'"),
    ("patterns", ["--gate-weight", "-1"], "--gate-weight: must be a finite number >= 0, got '-1'"),
    ("patterns", ["--pretrain-steps", "-1"], "--pretrain-steps: must be an integer >= 0, got '-1'"),
    ("patterns", ["--head", "wide"], "--head: invalid choice: 'wide'"),
    # upcycle
    ("upcycle", ["--lr", "-1"], "--lr: must be a finite number > 0, got '-1'"),
    ("upcycle", ["--noise", "nan"], "--noise: must be a finite number >= 0, got 'nan'"),
    ("upcycle", ["--threads", "0"], "--threads: must be an integer from 1 to 1024, got '0'"),
    ("upcycle", ["--k", "9", "--num-experts", "4"], "k=9 exceeds num_experts=4"),
    ("upcycle", ["--heads", "3"], "is not a multiple of heads=3"),
    ("upcycle", ["--data", "{binary}"], "binary.txt' looks binary"),
    # facts
    ("facts", ["--epochs", "0"], "--epochs: must be an integer >= 1, got '0'"),
    ("facts", ["--lr", "inf"], "--lr: must be a finite number > 0, got 'inf'"),
    ("facts", ["--threads", "-2"], "--threads: must be an integer from 1 to 1024, got '-2'"),
    ("facts", ["--models", "gru"], "unknown model 'gru'"),
    # lm's named corpus
    ("lm", ["--corpus", "english", "--data", "{text}"], "--corpus"),
    # bench
    ("bench", ["--quick", "--threads", "0"], "--threads: must be an integer from 1 to 1024, got '0'"),
    ("bench", ["--quick", "--repeats", "0"], "--repeats: must be an integer >= 1, got '0'"),
    ("bench", ["--quick", "--only", "nomatch"], "--only 'nomatch' matches no configuration"),
]
DEFAULT_DATA = {"demo": "{text}", "lm": "{text}", "ensemble": "{npz}", "patterns": "{pairs}", "upcycle": "{text}",
                "facts": None, "bench": None}
COMMON = {"demo": DEMO, "lm": LM, "ensemble": ENSEMBLE, "patterns": PATTERNS, "upcycle": UPCYCLE, "facts": FACTS,
          "bench": []}


def _argv(job, options, files, out):
    options = [o.format(**files) for o in options]
    data = [] if "--data" in options or DEFAULT_DATA[job] is None else ["--data", DEFAULT_DATA[job].format(**files)]
    return [job, *COMMON[job], *data, *options, "--out", str(out)]


def _one_error_line(capsys, job):
    err = capsys.readouterr().err
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(f"moekit {job}: error: ") and "Traceback" not in err
    return lines[0]


@pytest.mark.parametrize("job, options, message", CASES, ids=[f"{c[0]} {' '.join(c[1])}" for c in CASES])
def test_a_user_error_is_one_line_and_exit_status_2(job, options, message, files, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(_argv(job, options, files, out)) == 2
    assert message in _one_error_line(capsys, job)
    assert not out.exists()  # refused before the out directory was touched


@pytest.mark.parametrize("job", ["demo", "lm", "ensemble", "patterns", "upcycle", "facts", "bench"])
@pytest.mark.parametrize("where", ["under a file", "a file"])
def test_an_out_that_cannot_be_a_directory_is_named(job, where, files, capsys):
    out = files["a-file"] / "out" if where == "under a file" else files["a-file"]
    assert main(_argv(job, ["--quick"] if job == "bench" else [], files, out)) == 2
    assert str(out) in _one_error_line(capsys, job)


def test_a_full_disk_during_the_run_is_one_line_naming_the_file(files, tmp_path, capsys, monkeypatch):
    import errno

    from moekit.train import checkpoint

    real_replace = checkpoint.os.replace

    def replace(src, dst):  # the first checkpoint finds the disk full
        if "step_" in str(dst):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_replace(src, dst)

    monkeypatch.setattr(checkpoint.os, "replace", replace)
    out = tmp_path / "out"
    assert main(_argv("demo", ["--checkpoint-every", "1"], files, out)) == 2
    line = _one_error_line(capsys, "demo")
    assert "step_00000001.pt" in line and "No space left on device" in line
    assert json.loads((out / "config.json").read_text())["steps"] == 2
    assert not list(out.rglob("*.tmp"))


def test_a_batch_no_machine_holds_is_one_line_and_the_out_directory_stays_usable(files, tmp_path, capsys):
    out = tmp_path / "out"
    argv = _argv("lm", ["--batch-size", str(10**12)], files, out)
    assert main(argv) == 2
    line = _one_error_line(capsys, "lm")
    assert "out of memory (an allocation of" in line and "GiB was refused): lower --batch-size" in line
    # The lock went with the process: the same directory takes a corrected run at once.
    assert main([*argv, "--batch-size", "4", "--force"]) == 0
