"""The out-directory lock: exclusive between processes, released on exit, a dead holder's taken over."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from moekit.train import lock
from moekit.train.lock import LOCK_FILE, OutDirBusy, OutDirLock, is_locked_here, lock_out_dir, release_lock

# lock.py needs only the standard library: loaded from its file, a helper process starts in
# milliseconds instead of importing torch with the moekit package.
LOAD_LOCK = (
    "import importlib.util, sys\n"
    f"spec = importlib.util.spec_from_file_location('lock', {str(Path(lock.__file__))!r})\n"
    "lock = importlib.util.module_from_spec(spec)\n"
    "spec.loader.exec_module(lock)\n"
)
# Takes the lock on argv[1], says so on stdout, then waits (until killed, or until stdin closes).
HOLDER = LOAD_LOCK + "lock.lock_out_dir(sys.argv[1])\nprint('locked', flush=True)\nsys.stdin.read()\n"


def _holder(directory):
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(directory)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "locked"
    return proc


def test_a_second_process_is_refused_naming_the_holder(tmp_path):
    proc = _holder(tmp_path)
    try:
        with pytest.raises(OutDirBusy) as e:
            OutDirLock(tmp_path).acquire()
        message = str(e.value)
        assert f"pid {proc.pid}" in message and str(tmp_path) in message and "--force does not override" in message
    finally:
        proc.stdin.close()
        assert proc.wait(timeout=60) == 0
    # The holder ended normally: its lock file is gone and the directory is free.
    assert not (tmp_path / LOCK_FILE).exists()
    lock = OutDirLock(tmp_path).acquire()
    assert lock.took_over is None
    lock.release()


def test_a_killed_holder_leaves_a_stale_lock_that_is_taken_over(tmp_path):
    proc = _holder(tmp_path)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    assert json.loads((tmp_path / LOCK_FILE).read_text())["pid"] == proc.pid  # left behind by the kill
    lock = OutDirLock(tmp_path).acquire()
    try:
        assert lock.took_over["pid"] == proc.pid
        assert json.loads((tmp_path / LOCK_FILE).read_text())["pid"] == os.getpid()
    finally:
        lock.release()
    assert not (tmp_path / LOCK_FILE).exists()


def test_two_locks_of_one_directory_exclude_each_other_within_a_process(tmp_path):
    # flock belongs to the open file: even this process cannot take the lock twice by accident.
    first = OutDirLock(tmp_path).acquire()
    with pytest.raises(OutDirBusy, match=f"pid {os.getpid()}"):
        OutDirLock(tmp_path).acquire()
    first.release()
    OutDirLock(tmp_path).acquire().release()


def test_lock_out_dir_returns_the_lock_this_process_holds_until_released(tmp_path):
    a = lock_out_dir(tmp_path)
    assert lock_out_dir(tmp_path / ".") is a and is_locked_here(tmp_path)
    release_lock(tmp_path)
    assert not is_locked_here(tmp_path) and not (tmp_path / LOCK_FILE).exists()
    release_lock(tmp_path)  # releasing twice does nothing


def test_a_holder_that_exits_without_releasing_frees_the_lock(tmp_path):
    # A holder that exits (normally) without calling release: the kernel drops the lock, the file stays.
    script = LOAD_LOCK + "import os\nlock.OutDirLock(sys.argv[1]).acquire()\nos._exit(0)\n"
    subprocess.run([sys.executable, "-c", script, str(tmp_path)], check=True, timeout=60)
    assert (tmp_path / LOCK_FILE).exists()
    t0 = time.monotonic()
    lock = OutDirLock(tmp_path).acquire()
    assert lock.took_over is not None and time.monotonic() - t0 < 5  # no waiting for a timeout
    lock.release()
