"""system.py: the thread count every script sets, and its note on a busy machine."""
import os

import torch

from support import system



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
