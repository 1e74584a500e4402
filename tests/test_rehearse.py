"""experiments/rehearse.py's own instruments: the process tree its memory watcher and its SIGTERM
follow (torchrun starts each worker in a session of its own), and the projection of GPU memory
(what autograd saves, per step and per image)."""
import os
import signal
import subprocess
import sys
import time

from experiments import rehearse
from support import checkpoints

LAUNCHER = ("import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', "
            "'import time; time.sleep(60)'], start_new_session=True); time.sleep(60)")


def test_the_process_tree_reaches_a_worker_in_a_session_of_its_own():
    """A launcher (its own group) starts a worker in a new session, as torchrun does: the
    launcher's process group misses the worker, its tree holds it."""
    launcher = subprocess.Popen([sys.executable, "-c", LAUNCHER], start_new_session=True)
    try:
        for _ in range(100):
            tree = rehearse.process_tree(launcher.pid)
            if len(tree) == 2:
                break
            time.sleep(0.05)
        assert tree[0] == launcher.pid and len(tree) == 2, tree
        worker = tree[1]
        assert os.getpgid(worker) != launcher.pid  # what the old watcher followed
    finally:
        for pid in rehearse.process_tree(launcher.pid):
            os.kill(pid, signal.SIGKILL)
        launcher.wait()


def test_saved_tensors_are_a_part_per_step_and_a_part_per_image():
    """The projection's model of what autograd saves in a bf16 autocast step: a part per step,
    autocast's bf16 copies of the weights (2 bytes a parameter), and a part that grows with the
    batch in equal increments. Counting at batch 1 and multiplying (its first version) gave the
    400M model 1.04 GiB per image where 0.75 GiB was the weights' copy. On the narrow ldm4-in1k
    layout at its 64x64x3 latents."""
    config = {"preset": "ldm4-narrow", "head_channels": None, "text": False, "num_classes": 2,
              "size": 64, "channels": 3}
    model = checkpoints.build_denoiser(config)
    one, two, three = (rehearse.saved_activation_bytes(model, config, b) for b in (1, 2, 3))
    per_image, per_step = two - one, 2 * one - two
    assert abs((three - two) / per_image - 1) < 0.01, (one, two, three)
    weights = sum(p.numel() for p in model.parameters())
    assert abs(per_step / (2 * weights) - 1) < 0.05, (per_step, weights)
