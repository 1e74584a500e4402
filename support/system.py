"""What every script shares: its processes (torchrun, DDP), their gathers and stop signals, its
CPU threads, its seeds, atomic file writes and checkpoints, random weights for equivalence
checks, and the `--help` layout.

torch's default is one thread per core: right on an idle machine, 15-80x slower on a busy one
(threads that wait for a core spin instead of sleeping). Every script takes `--threads N`; the
default stays one per core (shared among a node's torchrun processes), so that a run and its
resume use the same count and agree bit for bit, and a busy machine is reported at the start.
"""
import argparse
import contextlib
import fcntl
import json
import os
import re
import signal
import threading

import numpy as np
import torch
import torch.distributed as dist


def setup_distributed(device=None):
    """(rank, world size, device): torchrun sets RANK; NCCL on CUDA, gloo on the CPU. `device`
    overrides the default (cuda when available) of a single process."""
    if "RANK" not in os.environ:
        return 0, 1, torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend)
    rank, world = dist.get_rank(), dist.get_world_size()
    if backend == "nccl":
        local = int(os.environ["LOCAL_RANK"])
        torch.cuda.set_device(local)
        return rank, world, torch.device("cuda", local)
    return rank, world, torch.device("cpu")


def rank_and_world():
    """(rank, world size) of the running process group; (0, 1) without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def gather_rows(rows, index=None):
    """Rank 0 gets every rank's numpy rows in one array, other ranks None. Without `index` the
    shards are contiguous and concatenate in rank order; with it (int [len(rows)]) row k of this
    rank goes to position index[k]. A rank with no rows takes part too (every rank must call)."""
    rank, world = rank_and_world()
    if world == 1 and (index is None or np.array_equal(index, np.arange(len(rows)))):
        return rows  # already in place: no copy of (possibly 50K) images
    parts = [(rows, index)]
    if world > 1:
        parts = [None] * world if rank == 0 else None
        dist.gather_object((rows, index), parts, dst=0)
        if rank != 0:
            return None
    parts = [(r, i) for r, i in parts if len(r)]
    if index is None:
        return np.concatenate([r for r, _ in parts])
    out = np.empty((sum(len(r) for r, _ in parts), *parts[0][0].shape[1:]), parts[0][0].dtype)
    for r, i in parts:
        out[i] = r
    return out


def read_weights(path):
    """A weights file: .safetensors, or a torch file of tensors only."""
    if path.endswith(".safetensors"):
        import safetensors.torch
        return safetensors.torch.load_file(path)
    return torch.load(path, map_location="cpu", weights_only=True)


def seed_of(*keys):
    """One integer seed from a tuple of integers (seed, step), (seed, sample index), ..."""
    return int(np.random.SeedSequence(list(keys)).generate_state(1)[0])


TEMPORARY = ".atomic-tmp"  # NAME.atomic-tmpPID.EXT: a save in progress (remove_stale_temporaries)


def write_atomic(path, write, previous=None):
    """write(tmp) fills a temporary file beside `path`, then it replaces `path` in one rename: a
    killed run or a full disk never leaves a half-written file, and the old one stays intact on
    failure. `previous`: keep the replaced file there (a fallback checkpoint)."""
    root, ext = os.path.splitext(path)
    tmp = f"{root}{TEMPORARY}{os.getpid()}{ext}"  # the extension stays: np.savez would add .npz
    try:
        write(tmp)
        if previous and os.path.exists(path):
            os.replace(path, previous)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_json(path, obj):
    """A JSON file, written atomically."""
    def write(tmp):
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=1)
    write_atomic(path, write)


def randomise_(module, seed):
    """Random values in every parameter and buffer (also LDM's zero-initialised convs), so that
    the equivalence checks can fail; fan-in scaled so activations stay O(1)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.state_dict().items():
            if not p.is_floating_point():  # BatchNorm's num_batches_tracked
                continue
            if p.ndim > 1:
                p.normal_(0, p[0].numel() ** -0.5, generator=gen)
            elif name.endswith("running_var"):
                p.uniform_(0.5, 1.5, generator=gen)
            elif name.endswith(("bias", "running_mean")):
                p.normal_(0, 0.1, generator=gen)
            else:  # norm scales
                p.normal_(1, 0.1, generator=gen)
    return module


def save_checkpoint(path, state):
    """Atomic (a killed run loses nothing); the previous checkpoint stays as ckpt.prev.pt, the
    fallback when the newest cannot be read."""
    try:
        write_atomic(path, lambda tmp: torch.save(state, tmp), previous_checkpoint(path))
    except (OSError, RuntimeError) as e:  # a full disk is a RuntimeError inside torch.save
        raise SystemExit(f"could not write checkpoint {path} ({e}); the previous checkpoint is "
                         f"intact (a save needs room for three checkpoints)") from e


def previous_checkpoint(path):
    return path[:-len(".pt")] + ".prev.pt"


def ignore_stop_signals(worker_id=None):
    """DataLoader workers leave SIGINT / SIGTERM to the main process: a Ctrl-C or a SIGTERM to the
    whole process group (Slurm's scancel, `timeout`) then stops the run after its step, with a
    checkpoint, instead of killing the workers mid-batch."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def remove_stale_temporaries(folder):
    """Remove the temporary files of atomic writes (NAME.atomic-tmpPID[.EXT]) whose process is
    gone: what a save killed by SIGKILL leaves behind. No other file is touched."""
    for name in os.listdir(folder) if os.path.isdir(folder) else []:
        match = re.fullmatch(r".+" + re.escape(TEMPORARY) + r"(\d+)(\.\w+)?", name)
        if not match or pid_alive(int(match[1])):
            continue
        path = os.path.join(folder, name)
        print(f"removing {path} ({os.path.getsize(path) / 2**20:.1f} MiB), left by a killed save")
        os.remove(path)


def pid_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def out_folder(folder):
    """Create an output folder, or stop with one line: a file of that name, no permission, a
    read-only disk."""
    if os.path.exists(folder) and not os.path.isdir(folder):
        raise SystemExit(f"{folder} is a file, not a folder: choose another output folder")
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as e:
        raise SystemExit(f"cannot create {folder} ({e.strerror}): choose another output "
                         "folder") from None
    if not os.access(folder, os.W_OK):
        raise SystemExit(f"cannot write in {folder}: choose another output folder")
    return folder


@contextlib.contextmanager
def folder_lock(folder, what):
    """One `what` at a time in `folder`: an exclusive flock on FOLDER/.WHAT.lock, taken atomically
    and released by the kernel when the process ends however it ends (no stale lock after a
    kill, whatever the file holds); a second process stops at once, naming the first."""
    out_folder(folder)
    path = os.path.join(folder, f".{what}.lock")
    try:
        f = open(path, "a+")
    except OSError as e:
        raise SystemExit(f"cannot write in {folder} ({e.strerror}): choose another "
                         "folder") from None
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        holder = f.read().strip() or "unknown"
        f.close()
        raise SystemExit(f"another {what} (pid {holder}) is running in {folder}: wait for it, "
                         "or choose another folder") from None
    f.seek(0)
    f.truncate()
    f.write(str(os.getpid()))
    f.flush()
    try:
        yield
    finally:
        f.close()  # releases the lock


@contextlib.contextmanager
def stop_on_signals():
    """Collects SIGINT and SIGTERM (a cluster's pre-emption notice) instead of dying mid-step;
    the loop saves and stops after the current step."""
    received = []
    if threading.current_thread() is not threading.main_thread():
        yield received  # signals reach the main thread only
        return
    previous = {s: signal.signal(s, lambda signum, frame: received.append(signum))
                for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield received
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def stop_requested(received, world, device):
    """Whether any process received a stop signal: after every step, all ranks together (one
    all-reduce of a number: torchrun and Slurm send SIGKILL 30 s after their SIGTERM, so waiting
    for a log step could lose the save)."""
    if world == 1:
        return bool(received)
    flag = torch.tensor(float(bool(received)), device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return flag.item() > 0


def all_reduce_mean(x, world):
    if world > 1:
        dist.all_reduce(x)
        x = x / world
    return x.item()


UNSAFE_PICKLE_HELP = ("read weights that pickle more than tensors (a CompVis Lightning "
                      "model.ckpt); unpickling can run any code the file holds: only for files you "
                      "trust")
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
              "process: oversubscribed CPUs run torch many times slower; consider --threads "
              f"{fitting}")
    torch.set_num_threads(threads)
    return threads


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """--help keeps the module docstring's layout and shows every flag's default, once: not
    where the help text names it already, nor for a flag that is off or unset by default."""

    def _get_help_string(self, action):
        text = action.help or ""
        if action.default in (None, False) or "(default" in text:
            return text
        return super()._get_help_string(action)
