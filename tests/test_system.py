"""system.py: the thread count every script sets, its note on a busy machine, and the folder
lock of train.py, sample.py and the sweep."""
import multiprocessing
import os
import time

import pytest
import torch

from support import system


def _try_lock(folder, start, results):
    """Take the lock when `start` is set; report whether it was held for 0.2 s."""
    start.wait()
    try:
        with system.folder_lock(folder, "train"):
            time.sleep(0.2)
        results.put(True)
    except SystemExit as e:
        results.put(str(e))


def test_two_processes_started_at_once_never_both_hold_the_lock(tmp_path):
    """30 times: two processes released by one event take the same folder's lock; exactly one
    gets it and the other is told which process holds it (a check-then-write lock admitted two
    in about 1 of 20 starts)."""
    ctx = multiprocessing.get_context("fork")
    for k in range(30):
        start, results = ctx.Event(), ctx.Queue()
        procs = [ctx.Process(target=_try_lock, args=(str(tmp_path / str(k)), start, results))
                 for _ in range(2)]
        for proc in procs:
            proc.start()
        start.set()
        outcome = [results.get(timeout=30) for _ in procs]
        for proc in procs:
            proc.join()
        assert outcome.count(True) == 1, outcome
        refusal = next(o for o in outcome if o is not True)
        assert "another train (pid " in refusal and "is running in" in refusal


def test_a_lock_is_free_again_when_its_process_ends_however_it_ends(tmp_path):
    """A killed holder leaves its lock file behind; the kernel has released the lock."""
    ctx = multiprocessing.get_context("fork")
    start, results = ctx.Event(), ctx.Queue()
    proc = ctx.Process(target=_try_lock, args=(str(tmp_path), start, results))
    proc.start()
    start.set()
    time.sleep(0.1)
    proc.kill()
    proc.join()
    assert os.path.exists(tmp_path / ".train.lock")
    with system.folder_lock(str(tmp_path), "train"):
        with pytest.raises(SystemExit, match=f"pid {os.getpid()}"):
            with system.folder_lock(str(tmp_path), "train"):
                pass


def test_threads_requested_then_env_then_cores(monkeypatch, capsys):
    before = torch.get_num_threads()
    try:
        monkeypatch.setattr(os, "getloadavg", lambda: (0.0, 0.0, 0.0))
        monkeypatch.setenv("OMP_NUM_THREADS", "1")
        assert system.set_threads(3) == 3 and torch.get_num_threads() == 3
        capsys.readouterr()  # (3 threads may exceed the cores: a note)
        assert system.set_threads(0) == 1 and torch.get_num_threads() == 1
        monkeypatch.delenv("OMP_NUM_THREADS")
        cores = len(os.sched_getaffinity(0))
        assert system.set_threads(0) == cores
        monkeypatch.setenv("LOCAL_WORLD_SIZE", str(cores))  # torchrun: the cores are shared
        assert system.set_threads(0) == 1
        assert capsys.readouterr().out == ""  # an idle machine: nothing to report
        monkeypatch.delenv("LOCAL_WORLD_SIZE")
        monkeypatch.setattr(os, "getloadavg", lambda: (cores + 1.0, 0.0, 0.0))
        system.set_threads(0)
        assert "oversubscribed" in capsys.readouterr().out
    finally:
        torch.set_num_threads(before)
