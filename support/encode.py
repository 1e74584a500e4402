r"""Cache a dataset's latents once (support/data.py's latent cache), as LDM trains on precomputed
first-stage codes: the VQ-f4 encoder costs more than a U-Net step. --flip also caches each image's
horizontal mirror, for train.py --flip (LDM's ImageNet recipe).

    python -m support.encode --dataset folder --data-root IN1K/train --preset vq-f4 \
        --weights vq-f4/model.ckpt --out latents/in1k --batch-size 64 --flip
    torchrun --nproc_per_node=8 -m support.encode ...                # sharded over ranks
"""
import argparse
import dataclasses
import os

import numpy as np
import torch.distributed as dist

import vae
from support import data, system, weights


def cache_meta(model, preset, weights_path, dataset, data_root, split, image_size, pad, flip):
    """What a latent cache records of its autoencoder (and the content hash of its weights,
    which runs and their sampling check) and of the images it encodes (flip: their mirrors
    too)."""
    return {"preset": preset, "config": dataclasses.asdict(model.config),
            "weights": os.path.abspath(weights_path),
            "weights_sha256": weights.weights_hash(weights_path),
            "dataset": dataset, "data_root": data_root, "split": split,
            "image_size": image_size, "pad": pad, "flip": flip}


def encode(args):
    rank, world, device = system.setup_distributed()  # torchrun sets RANK
    system.set_threads(args.threads)
    dataset = data.load_dataset(args.dataset, args.data_root, args.split, args.image_size, args.pad)
    model = weights.load_autoencoder(args.weights, args.preset, unsafe_pickle=args.unsafe_pickle)
    model = model.to(device).eval()
    if dataset[0][0].shape[0] != model.config.in_channels:
        raise SystemExit(f"{args.dataset} images have {dataset[0][0].shape[0]} channels, the "
                         f"autoencoder takes {model.config.in_channels}")
    preset = args.preset or next((k for k, v in vae.PRESETS.items() if v == model.config), None)
    meta = cache_meta(model, preset, args.weights, args.dataset, args.data_root, args.split,
                      args.image_size, args.pad, args.flip)
    if model.scale is None and not os.path.exists(data.cache_files(args.out)["meta"]):
        model.scale = vae.measure_scale(model, data.spread_images(dataset))  # LDM's scale_by_std
    data.encode_dataset(model, dataset, args.out, meta, args.batch_size, np.dtype(args.dtype),
                        args.num_workers, rank, world, device)
    if dist.is_initialized():
        dist.destroy_process_group()


def parse_args(argv=None):
    e = argparse.ArgumentParser(description=__doc__, formatter_class=system.HelpFormatter)
    data.add_dataset_arguments(e)
    e.add_argument("--preset", default=None, choices=sorted(vae.PRESETS),
                   help="autoencoder architecture: needed for CompVis weights (a diffusers "
                        "directory's config.json names its own)")
    e.add_argument("--weights", required=True,
                   help="our checkpoint (train_vae.py), a CompVis model.ckpt, "
                        "or a diffusers VQModel/AutoencoderKL directory")
    e.add_argument("--split", default="train", help="dataset split to encode")
    e.add_argument("--flip", action="store_true",
                   help="also cache each image's horizontal mirror, for train.py --flip (LDM "
                        "flips ImageNet); off by default: mirrored shoes or glyphs are other "
                        "images")
    e.add_argument("--unsafe-pickle", action="store_true", help=system.UNSAFE_PICKLE_HELP)
    e.add_argument("--dtype", default="float16", choices=["float16", "float32"],
                   help="stored latent dtype")
    e.add_argument("--out", required=True, help="output directory")
    e.add_argument("--batch-size", type=int, default=64, help="images per chunk")
    e.add_argument("--num-workers", type=int, default=2, help="DataLoader workers reading images")
    e.add_argument("--threads", type=int, default=0, help=system.THREADS_HELP)
    return e.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    try:
        encode(args)
    except (FileNotFoundError, ValueError) as e:  # a missing or foreign file: one line
        raise SystemExit(f"support/encode.py: {e}") from None


if __name__ == "__main__":
    main()
