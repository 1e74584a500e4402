"""released.py: a released-format pipeline directory, written here with diffusers' save_pretrained
and random weights, samples as a diffusers-driven loop does (each spacing), and fine-tunes."""
import dataclasses
import json
import os

import numpy as np
import pytest
import safetensors.torch
import torch
from diffusers import (DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler,
                       UNet2DConditionModel, VQModel)

import diffusion
import sample
import train
import unet
import vae
from support import checkpoints, data, export, released, system, weights
from conftest import CLASSES, TINY_UNET, write_pipeline

# diffusers' DPM scheduler calls np.array(tensor, copy=False) (a NumPy 2 deprecation): not ours
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")
# the paper's LDM-4 layout (Table 3) at a small width: attention at every level but the first and
# in the middle, one head per block, so the head width differs per level (64 / 96 / 160)
NARROW_LDM4 = dataclasses.replace(unet.PRESETS["ldm4-in1k"], model_channels=32, num_res_blocks=1,
                                  attention_resolutions=(8, 4, 2), sample_size=16,
                                  context_dim=32)


@torch.no_grad()
def diffusers_samples(root, table, labels, x_T, scale, steps, sampler):
    """The authors' loop: from_config of the stored scheduler, guidance eps_u + s (eps_c - eps_u),
    VQModel.decode (quantised, no scale), (x / 2 + 0.5).clamp(0, 1), round(255 x)."""
    net = UNet2DConditionModel.from_pretrained(root / "unet").eval()
    vq = VQModel.from_pretrained(root / "vqvae").eval()
    kind = DPMSolverMultistepScheduler if sampler == "dpm" else DDIMScheduler
    scheduler = kind.from_config(kind.load_config(root / "scheduler"))
    scheduler.set_timesteps(steps)
    context = torch.cat([table[[CLASSES] * len(labels)], table[labels]])[:, None]  # [2B, 1, D]
    x = x_T
    for t in scheduler.timesteps:
        eps_u, eps_c = net(torch.cat([x, x]), t, encoder_hidden_states=context).sample.chunk(2)
        x = scheduler.step(eps_u + scale * (eps_c - eps_u), t, x).prev_sample
    images = (vq.decode(x).sample / 2 + 0.5).clamp(0, 1)
    return (images * 255).round().permute(0, 2, 3, 1).numpy(), scheduler.timesteps


def test_the_paper_one_head_ldm4_is_read_at_full_size():
    """LDM-4 IN-1K as diffusers stores it (attention_head_dim 1: one head, 384 / 576 / 960 wide):
    our preset, every tensor's name and shape, built on the meta device (1.6 GB otherwise)."""
    ldm4 = unet.PRESETS["ldm4-in1k"]
    config = weights.unet_diffusers_config(ldm4)
    assert released.unet_config({**config, "attention_head_dim": 1}) == ldm4
    with torch.device("meta"):
        theirs = UNet2DConditionModel(**config).state_dict()
        ours = unet.UNet(ldm4).state_dict()
    mapped = weights.unet_from_diffusers(ldm4, theirs)
    assert {k: v.shape for k, v in mapped.items()} == {k: v.shape for k, v in ours.items()}
    assert sum(v.numel() for v in ours.values()) == 400_920_579  # Table 3


def test_one_head_every_level_and_a_ddpm_config_equal_the_diffusers_loop(tmp_path):
    """The paper's layout (narrow) with the stored config a DDPMScheduler writes (variance_type
    fixed_small, which DPM-Solver ignores; clip_sample off as LDM)."""
    table = write_pipeline(tmp_path / "model", "leading", 1, NARROW_LDM4, DDPMScheduler,
                           variance_type="fixed_small")
    config = json.load(open(tmp_path / "model" / "scheduler" / "scheduler_config.json"))
    assert config["_class_name"] == "DDPMScheduler" and config["variance_type"] == "fixed_small"
    out, sampler = tmp_path / "samples", "dpm"
    sample.main(["--ckpt", str(tmp_path / "model"), "--classes", "2,5", "--per-class", "1",
                 "--sampler", sampler, "--steps", "4", "--guidance", "2", "--out", str(out),
                 "--no-images"])
    ours = np.load(out / "s2" / "samples.npz")["arr_0"]
    assert ours.shape == (2, 32, 32, 1)
    x_T, _ = sample.initial_noise(range(2), 0, (3, 16, 16))
    theirs, _ = diffusers_samples(tmp_path / "model", table, [2, 5], x_T, 2.0, 4, sampler)
    diff = np.abs(ours.astype(float) - theirs)
    assert diff.max() <= 1 and diff.mean() < 0.02, (diff.max(), diff.mean())


@pytest.mark.parametrize("sampler,spacing,offset", [("dpm", "leading", 1), ("dpm", "linspace", 0),
                                                    ("dpm", "trailing", 0), ("ddim", "leading", 1),
                                                    ("ddim", "linspace", 0)])
def test_samples_equal_the_diffusers_loop(tmp_path, sampler, spacing, offset):
    table = write_pipeline(tmp_path / "model", spacing, offset)
    steps, labels = 6, [0, 3, 7]
    config = json.load(open(tmp_path / "model" / "scheduler" / "scheduler_config.json"))
    out = tmp_path / "samples"
    sample.main(["--ckpt", str(tmp_path / "model"), "--classes", "0,3,7", "--per-class", "1",
                 "--sampler", sampler, "--steps", str(steps), "--guidance", "2",
                 "--out", str(out), "--no-images"])
    ours = np.load(out / "s2" / "samples.npz")
    assert ours["labels"].tolist() == labels and ours["arr_0"].shape == (3, 16, 16, 1)
    x_T, _ = sample.initial_noise(range(3), 0, (3, 8, 8))  # sample.py's noise: seed (0, index)
    theirs, timesteps = diffusers_samples(tmp_path / "model", table, labels, x_T, 2.0, steps,
                                          sampler)
    assert released.timesteps(config, sampler, steps).tolist() == timesteps.tolist()
    diff = np.abs(ours["arr_0"].astype(float) - theirs)
    assert diff.max() <= 1 and diff.mean() < 0.02, (diff.max(), diff.mean())  # rounding only


def test_spacings_give_other_timesteps_and_paper_forces_ours(tmp_path):
    write_pipeline(tmp_path / "model", "leading", 1)
    config = json.load(open(tmp_path / "model" / "scheduler" / "scheduler_config.json"))
    assert released.timesteps(config, "dpm", 50)[[0, 1, -1]].tolist() == [951, 932, 20]
    assert released.timesteps({**config, "timestep_spacing": "linspace"}, "dpm", 50)[
        [0, 1, -1]].tolist() == [999, 979, 20]  # the paper's protocol (App. B.7)
    for meaning in ({"clip_sample": True}, {"prediction_type": "v_prediction"}):
        with pytest.raises(ValueError, match="cannot be sampled here") as refused:
            released.timesteps({**config, **meaning}, "ddim", 50)
        assert "--timesteps paper" not in str(refused.value)  # no hint into wrong samples
    with pytest.raises(ValueError, match="variance_type"):
        released.check_model_options({**config, "variance_type": "learned_range"}, "dpm")
    with pytest.raises(ValueError, match="10 trained_betas for num_train_timesteps 1000"):
        released.alphas_cumprod({**config, "trained_betas": config["trained_betas"][:10]})
    torch.testing.assert_close(released.alphas_cumprod(config),
                               diffusion.alphas_cumprod(diffusion.ldm_linear_betas()))
    common = ["--ckpt", str(tmp_path / "model"), "--classes", "1", "--per-class", "1",
              "--steps", "4", "--no-images"]
    sample.main([*common, "--out", str(tmp_path / "a")])
    sample.main([*common, "--out", str(tmp_path / "b"), "--timesteps", "paper"])
    a, b = (np.load(tmp_path / d / "s2" / "samples.npz") for d in ("a", "b"))
    assert str(a["timesteps"]) == "config" and str(b["timesteps"]) == "paper"
    assert not np.array_equal(a["arr_0"], b["arr_0"])  # other timesteps, other samples
    stored = tmp_path / "model" / "scheduler" / "scheduler_config.json"
    stored.write_text(json.dumps({**config, "prediction_type": "v_prediction"}))
    with pytest.raises(SystemExit, match="v_prediction.*cannot be sampled here"):
        sample.main([*common, "--out", str(tmp_path / "c"), "--timesteps", "paper"])


def test_unsupported_models_and_missing_parts_are_named(tmp_path):
    write_pipeline(tmp_path / "model", "leading", 1)
    config = json.load(open(tmp_path / "model" / "unet" / "config.json"))
    assert released.unet_config(config) == TINY_UNET
    with pytest.raises(ValueError, match="class_embed_type"):
        released.unet_config({**config, "class_embed_type": "timestep"})
    os.remove(tmp_path / "model" / "class_embedder" / "config.json")
    with pytest.raises(SystemExit, match="class_embedder/config.json is missing"):
        sample.main(["--ckpt", str(tmp_path / "model"), "--out", str(tmp_path / "s")])


def test_fine_tuning_starts_from_the_released_weights(tmp_path):
    write_pipeline(tmp_path / "model", "leading", 1)
    start, _, _ = checkpoints.load(str(tmp_path / "model"))
    out = str(tmp_path / "tuned")
    train.main(["--init", str(tmp_path / "model"), "--vae", str(tmp_path / "model" / "vqvae"),
                "--image-size", "16", "--eta", "0.05", "--cep", "gaussian", "--steps", "2",
                "--batch-size", "4", "--lr", "1e-4", "--num-workers", "0", "--out", out])
    config = json.load(open(os.path.join(out, "config.json")))
    assert config["init"] == str(tmp_path / "model") and config["num_classes"] == CLASSES
    tuned = torch.load(os.path.join(out, "ckpt.pt"), weights_only=True)
    moved = [k for k, v in start.state_dict().items() if not torch.equal(v, tuned["model"][k])]
    near = max((v - tuned["model"][k]).abs().max().item() for k, v in start.state_dict().items())
    assert moved and near < 1e-2  # two small steps away from the released weights
    sample.main(["--ckpt", out, "--per-class", "1", "--steps", "3", "--no-images",
                 "--out", str(tmp_path / "s")])
    assert np.load(tmp_path / "s" / "s2" / "samples.npz")["arr_0"].shape == (10, 16, 16, 1)
    with pytest.raises(SystemExit, match="are 1x4x4.*takes 3x8x8"):
        train.main(["--init", str(tmp_path / "model"), "--steps", "1", "--out", str(tmp_path / "x"),
                    "--num-workers", "0", "--batch-size", "4", "--image-size", "4"])


def test_ldm_checkpoint_samples_as_the_same_weights_in_a_pipeline(tmp_path, monkeypatch):
    """LDM's cin256-v2 model.ckpt layout (model.diffusion_model.*, cond_stage_model.embedding,
    first_stage_model.*) at the tiny size: the same weights give the same samples."""
    table = write_pipeline(tmp_path / "model", "linspace", 0)
    pipeline, _, _ = checkpoints.load(str(tmp_path / "model"))
    vq = weights.load_autoencoder(str(tmp_path / "model" / "vqvae"))
    state = {f"model.diffusion_model.{k[5:]}": v for k, v in pipeline.state_dict().items()
             if k.startswith("unet.")}
    state["cond_stage_model.embedding.weight"] = table
    state.update({f"first_stage_model.{k}": v for k, v in vq.state_dict().items()})
    torch.save({"state_dict": state}, tmp_path / "model.ckpt")
    monkeypatch.setitem(unet.PRESETS, "ldm4-in1k", TINY_UNET)  # cin256-v2's architecture, tiny
    monkeypatch.setitem(vae.PRESETS, "vq-f4", vq.config)
    common = ["--classes", "0,3", "--per-class", "1", "--steps", "4", "--no-images"]
    sample.main(["--ckpt", str(tmp_path / "model.ckpt"), *common, "--out", str(tmp_path / "a")])
    sample.main(["--ckpt", str(tmp_path / "model"), *common, "--timesteps", "paper",
                 "--out", str(tmp_path / "b")])
    a, b = (np.load(tmp_path / d / "s2" / "samples.npz")["arr_0"] for d in ("a", "b"))
    np.testing.assert_array_equal(a, b)
    with pytest.raises(SystemExit, match="neither a train.py checkpoint nor an LDM class model"):
        torch.save({"state_dict": {"x": torch.zeros(1)}}, tmp_path / "other.ckpt")
        sample.main(["--ckpt", str(tmp_path / "other.ckpt"), "--out", str(tmp_path / "c")])


def write_text_pipeline(root):
    """A CC3M text model's layout: bert/ and tokenizer/ instead of class_embedder/, a U-Net whose
    context width is BERT's (a tiny BERT with a 40-word vocabulary here)."""
    from transformers import BertConfig, BertModel, BertTokenizer
    write_pipeline(root, "leading", 1)
    cfg = dataclasses.replace(TINY_UNET, context_dim=32)
    net = system.randomise_(UNet2DConditionModel(**weights.unet_diffusers_config(cfg)), seed=4)
    net.save_pretrained(root / "unet")
    os.remove(root / "class_embedder" / "config.json")
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + \
        "a an the dog cat red blue small big on in of with photo picture house tree car".split()
    (root / "vocab.txt").write_text("\n".join(words) + "\n")
    BertTokenizer(str(root / "vocab.txt")).save_pretrained(root / "tokenizer")
    torch.manual_seed(5)
    BertModel(BertConfig(vocab_size=len(words), hidden_size=32, num_hidden_layers=2,
                         num_attention_heads=2, intermediate_size=64,
                         max_position_embeddings=80)).save_pretrained(root / "bert")


@torch.no_grad()
def test_text_model_samples_equal_the_diffusers_loop(tmp_path):
    from transformers import BertModel, BertTokenizer
    write_text_pipeline(tmp_path / "model")
    prompts = ["a photo of a red dog", "the big house on a tree"]
    (tmp_path / "prompts.txt").write_text("\n".join(prompts) + "\n")
    sample.main(["--ckpt", str(tmp_path / "model"), "--prompts", str(tmp_path / "prompts.txt"),
                 "--steps", "5", "--guidance", "3", "--out", str(tmp_path / "s"), "--no-images"])
    ours = np.load(tmp_path / "s" / "s3" / "samples.npz")["arr_0"].astype(float)
    (tmp_path / "latin-1.txt").write_bytes("a caf\xe9 dog\n".encode("latin-1"))  # a bad input
    with pytest.raises(SystemExit, match="latin-1.txt is not UTF-8 .* at byte 5"):
        sample.main(["--ckpt", str(tmp_path / "model"), "--prompts",
                     str(tmp_path / "latin-1.txt"), "--out", str(tmp_path / "l")])
    bert = BertModel.from_pretrained(tmp_path / "model" / "bert").eval()
    tokenizer = BertTokenizer.from_pretrained(tmp_path / "model" / "tokenizer")
    ids = tokenizer(["", ""] + prompts, padding="max_length", truncation=True, max_length=77,
                    return_tensors="pt")["input_ids"]
    context = bert(input_ids=ids).last_hidden_state  # no attention mask: padding attended
    net = UNet2DConditionModel.from_pretrained(tmp_path / "model" / "unet").eval()
    vq = VQModel.from_pretrained(tmp_path / "model" / "vqvae").eval()
    scheduler = DPMSolverMultistepScheduler.from_config(
        DPMSolverMultistepScheduler.load_config(tmp_path / "model" / "scheduler"))
    scheduler.set_timesteps(5)
    x, _ = sample.initial_noise(range(2), 0, (3, 8, 8))
    for t in scheduler.timesteps:
        eps_u, eps_c = net(torch.cat([x, x]), t, encoder_hidden_states=context).sample.chunk(2)
        x = scheduler.step(eps_u + 3.0 * (eps_c - eps_u), t, x).prev_sample
    assert vq.config.scaling_factor == 0.18215  # VQModel's default, as a release may store it
    assert released.latent_scale(str(tmp_path / "model")) == 0.18215  # train.py --init's scale
    x = x / vq.config.scaling_factor  # LDMTextToImagePipeline: 1 / scaling_factor * latents
    theirs = ((vq.decode(x).sample / 2 + 0.5).clamp(0, 1) * 255).round().permute(0, 2, 3, 1)
    diff = np.abs(ours - theirs.numpy())
    assert diff.max() <= 1 and diff.mean() < 0.02, (diff.max(), diff.mean())


def test_export_of_a_trained_run_samples_the_same_in_diffusers_and_back(tmp_path):
    """A latent class run of train.py (an autoencoder of ours) written in the released layout:
    diffusers' from_pretrained reads the U-Net and the VQModel, the class embedder is the fork's
    ClassEmbedder layout, a diffusers-driven loop samples what sample.py samples from the run,
    and sample.py --ckpt reads the export back."""
    config = vae.AutoencoderConfig("vq", in_channels=1, ch=32, ch_mult=(1, 2), num_res_blocks=1,
                                   n_embed=64)
    vq = system.randomise_(vae.Autoencoder(config), seed=6)
    torch.save({"config": dataclasses.asdict(config), "model": vq.state_dict(), "scale": 1.0},
               tmp_path / "vq.pt")
    run_dir, out = str(tmp_path / "run"), str(tmp_path / "pipeline")
    train.main(["--dataset", "digits", "--image-size", "16", "--vae", str(tmp_path / "vq.pt"),
                "--steps", "2", "--batch-size", "4", "--num-workers", "0", "--out", run_dir])
    export.main([run_dir, out])
    for part in ("unet", "vqvae", "class_embedder", "scheduler", "model_index.json"):
        assert os.path.exists(os.path.join(out, part)), part
    embedder = json.load(open(os.path.join(out, "class_embedder", "config.json")))
    table = safetensors.torch.load_file(
        os.path.join(out, "class_embedder", "diffusion_pytorch_model.safetensors"))
    assert embedder["n_classes"] == CLASSES + 1 and list(table) == ["embedding.weight"]
    table = table["embedding.weight"]
    assert table.shape == (CLASSES + 1, embedder["embed_dim"])
    common = ["--classes", "0,4,9", "--per-class", "1", "--steps", "5", "--guidance", "2",
              "--no-images"]
    sample.main(["--ckpt", run_dir, *common, "--out", str(tmp_path / "a")])
    sample.main(["--ckpt", out, *common, "--out", str(tmp_path / "b")])
    a, b = (np.load(tmp_path / d / "s2" / "samples.npz")["arr_0"] for d in ("a", "b"))
    x_T, _ = sample.initial_noise(range(3), 0, (3, 8, 8))
    theirs, timesteps = diffusers_samples(tmp_path / "pipeline", table, [0, 4, 9], x_T, 2.0, 5,
                                          "dpm")
    assert timesteps.tolist() == [999, 799, 599, 400, 200]  # the paper's DPM-Solver spacing
    for ours in (a, b):
        diff = np.abs(ours.astype(float) - theirs)
        assert diff.max() <= 1 and diff.mean() < 0.02, (diff.max(), diff.mean())
    with pytest.raises(SystemExit, match="exists: choose a new directory"):
        export.main([run_dir, out])


def test_export_of_a_text_run_round_trips_and_refuses_what_the_pipeline_cannot_run(tmp_path):
    """A text run fine-tuned from a CC3M-layout release (BERT without attention mask, 77 tokens)
    exports to bert/ + tokenizer/ and samples the same from the export; a run whose BERT takes
    an attention mask is refused, with the flag that avoids it."""
    from PIL import Image
    write_text_pipeline(tmp_path / "model")
    ds = data.load_dataset("digits", split="train")
    for i in range(8):
        Image.fromarray(ds.images[i, 0].numpy()).save(tmp_path / f"{i}.png")
    (tmp_path / "c.tsv").write_text("".join(f"{i}.png\ta {'red' if i % 2 else 'blue'} dog\n"
                                            for i in range(8)))
    flags = ["--dataset", "captions", "--data-root", str(tmp_path / "c.tsv"), "--image-size", "16",
             "--vae", str(tmp_path / "model" / "vqvae"), "--steps", "1", "--batch-size", "4",
             "--num-workers", "0"]
    run_dir, out = str(tmp_path / "tuned"), str(tmp_path / "export")
    train.main([*flags, "--init", str(tmp_path / "model"), "--out", run_dir])
    assert json.load(open(os.path.join(run_dir, "config.json")))["latent_scale"] == 0.18215
    export.main([run_dir, out])
    assert all(os.path.isdir(os.path.join(out, part)) for part in ("bert", "tokenizer"))
    (tmp_path / "prompts.txt").write_text("a red dog\nthe big house\n")
    common = ["--prompts", str(tmp_path / "prompts.txt"), "--steps", "3", "--no-images"]
    sample.main(["--ckpt", run_dir, *common, "--out", str(tmp_path / "a")])
    sample.main(["--ckpt", out, *common, "--out", str(tmp_path / "b")])
    a, b = (np.load(tmp_path / d / "s2" / "samples.npz")["arr_0"].astype(float) for d in "ab")
    assert np.abs(a - b).max() <= 1
    masked = str(tmp_path / "masked")
    train.main([*flags, "--text-encoder", str(tmp_path / "model" / "bert"), "--out", masked])
    with pytest.raises(SystemExit, match="attention mask .*--no-attention-mask"):
        export.main([masked, str(tmp_path / "refused")])
    pixel = str(tmp_path / "pixel")  # the text pipeline decodes latents: a pixel model cannot go
    pixel_flags = [f for f in flags if f not in ("--vae", str(tmp_path / "model" / "vqvae"))]
    train.main([*pixel_flags, "--text-encoder", str(tmp_path / "model" / "bert"), "--out", pixel])
    with pytest.raises(SystemExit, match="a pixel-space text model has no released layout"):
        export.main([pixel, str(tmp_path / "refused")])
    assert not os.path.exists(tmp_path / "refused")
