"""The machine a run uses: its processes (torchrun, DDP), its CPU threads, and the command line.

torch's default is one thread per core: right on an idle machine, 15-80x slower on a busy one
(threads that wait for a core spin instead of sleeping). Every script takes `--threads N`; the
default stays one per core (shared among a node's torchrun processes), so that a run and its
resume use the same count and agree bit for bit, and a busy machine is reported at the start.
"""
import argparse
import os

import torch
import torch.distributed as dist


def setup_distributed():
    """(rank, world size, device): torchrun sets RANK; NCCL on CUDA, gloo on the CPU."""
    if "RANK" not in os.environ:
        return 0, 1, torch.device("cuda" if torch.cuda.is_available() else "cpu")
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    dist.init_process_group(backend)
    rank, world = dist.get_rank(), dist.get_world_size()
    if backend == "nccl":
        local = int(os.environ["LOCAL_RANK"])
        torch.cuda.set_device(local)
        return rank, world, torch.device("cuda", local)
    return rank, world, torch.device("cpu")


THREADS_HELP = "CPU threads per process (0 = OMP_NUM_THREADS or one per core; see system.py)"


def set_threads(requested=0):
    """torch's CPU threads: `requested` if > 0, else OMP_NUM_THREADS if set, else the cores shared
    among this node's torchrun processes. Prints a note when other work already fills the cores."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    local = int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    if requested > 0:
        threads = requested
    elif os.environ.get("OMP_NUM_THREADS", "").isdigit():
        threads = max(1, int(os.environ["OMP_NUM_THREADS"]))
    else:
        threads = max(1, cores // local)
    busy = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    fitting = max(1, round(cores - busy) // local)  # threads that the free cores hold
    if threads > fitting and int(os.environ.get("LOCAL_RANK", 0)) == 0:
        print(f"note: {cores} cores, load {busy:.1f} before this run, {threads} threads per "
              f"process: oversubscribed CPUs run torch many times slower; consider --threads "
              f"{fitting}")
    torch.set_num_threads(threads)
    return threads


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """--help keeps the module docstring's layout and shows every flag's default."""
