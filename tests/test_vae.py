"""vae.py: f4 parameter counts, diffusers oracles (same random weights), CompVis names, latent cache
(resume, flips, labels), and small-AE training."""
import json
import os
import types

import numpy as np
import pytest
import torch

import vae
from support import data, encode, runs, system, weights
from experiments import train_vae
from experiments.measure import diffusers_autoencoder


class TinyData:
    """data.load_dataset's interface: dataset[i] -> (CHW image in [-1, 1], condition)."""
    def __init__(self, n=10, size=16, channels=3, captions=False, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.images = torch.rand(n, channels, size, size, generator=g) * 2 - 1
        self.labels = None if captions else np.arange(n, dtype=np.int64) % 3
        self.captions = [f"caption {i}" for i in range(n)] if captions else None
        self.num_classes = None if captions else 3
        self.accessed = []

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        self.accessed.append(i)
        return self.images[i], (self.captions[i] if self.captions else int(self.labels[i]))


def randomized(preset, seed=0):
    """An autoencoder with every tensor random (system.randomise_), latent scale 1."""
    return system.randomise_(vae.Autoencoder(vae.PRESETS[preset], scale=1.0), seed).eval()


def close(ours, ref):
    assert ours.shape == ref.shape
    err = (ours - ref).abs().max() / ref.abs().max()
    assert err <= 1e-4, err


def test_f4_parameter_counts():
    with torch.device("meta"):
        counts = {p: sum(t.numel() for t in vae.Autoencoder(vae.PRESETS[p]).parameters())
                  for p in ("vq-f4", "kl-f4")}
    assert counts == {"vq-f4": 55_322_782, "kl-f4": 55_312_063}  # LDM's configs


@pytest.mark.parametrize("preset,size",
                         [("tiny-vq", 16), ("tiny-kl", 16), ("vq-f4", 64), ("kl-f4", 64)])
def test_diffusers_oracle_same_random_weights(tmp_path, preset, size):
    src = randomized(preset)
    ref = diffusers_autoencoder(src.config)
    theirs = ref.state_dict()
    mapping = weights.autoencoder_key_map(src.config)
    ref.load_state_dict({mapping[k]: v.reshape(theirs[mapping[k]].shape)
                         for k, v in src.state_dict().items()})
    # a real diffusers dir: config.json + diffusion_pytorch_model.safetensors
    ref.save_pretrained(tmp_path)
    model = vae.Autoencoder(src.config, scale=1.0).eval()
    weights.load_diffusers_weights(model, str(tmp_path))
    x = torch.rand(1, 3, size, size, generator=torch.Generator().manual_seed(1)) * 2 - 1
    with torch.no_grad():
        if src.config.kind == "vq":
            z_ref = ref.encode(x).latents  # pre-quantization
            dec_ref = ref.decode(z_ref).sample  # quantizes first
        else:
            z_ref = ref.encode(x).latent_dist.mode()
            dec_ref = ref.decode(z_ref).sample
        close(model.encode(x), z_ref)
        close(model.decode(z_ref), dec_ref)


def test_diffusers_legacy_attention_names_and_errors(tmp_path):
    import safetensors.torch
    src = randomized("tiny-kl")
    mapping = weights.autoencoder_key_map(src.config)
    names = {".to_q.": ".query.", ".to_k.": ".key.", ".to_v.": ".value.",
             ".to_out.0.": ".proj_attn."}
    legacy = {}
    for k, v in src.state_dict().items():
        name = mapping[k]
        for new, old in names.items():
            name = name.replace(new, old)
        legacy[name] = v.squeeze() if v.dim() == 4 and v.shape[-1] == 1 and "attn" in k else v
    safetensors.torch.save_file(legacy, str(tmp_path / "diffusion_pytorch_model.safetensors"))
    model = vae.Autoencoder(src.config)
    weights.load_diffusers_weights(model, str(tmp_path))
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(),
                                                 src.state_dict().values()))
    with pytest.raises(ValueError, match="different model"):  # a KL file into a VQ model
        weights.load_diffusers_weights(vae.Autoencoder(vae.PRESETS["tiny-vq"]), str(tmp_path))
    with pytest.raises(FileNotFoundError, match="diffusion_pytorch_model"):
        weights.load_diffusers_weights(model, str(tmp_path / "nowhere"))


@pytest.mark.parametrize("preset", ["tiny-vq", "tiny-kl"])
def test_compvis_names_roundtrip(tmp_path, preset):
    """A CompVis-style Lightning checkpoint (with loss.* keys, and as a full LDM's
    first_stage_model.*)
    loads; diffusers' own LDM->diffusers VAE converter confirms our names are LDM's."""
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint
    src = randomized(preset)
    sd = {**src.state_dict(), "loss.logvar": torch.zeros(()),
          "loss.discriminator.main.0.weight": torch.randn(4, 3, 4, 4)}
    torch.save({"state_dict": sd, "global_step": 7}, tmp_path / "model.ckpt")
    model = weights.load_autoencoder(str(tmp_path / "model.ckpt"), preset, scale=1.0)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(),
                                                 src.state_dict().values()))
    full = {f"first_stage_model.{k}": v
            for k, v in sd.items()} | {"model.diffusion_model.x": torch.zeros(1)}
    torch.save({"state_dict": full}, tmp_path / "ldm.ckpt")
    loaded = weights.load_autoencoder(str(tmp_path / "ldm.ckpt"), preset)
    assert loaded.state_dict().keys() == src.state_dict().keys()

    ref = diffusers_autoencoder(src.config)
    levels = len(src.config.ch_mult)
    converted = convert_ldm_vae_checkpoint(sd,
                                           {"down_block_types": ("D",) * levels,
                                            "up_block_types": ("U",) * levels})
    if preset == "tiny-vq":  # the converter is written for KL; the codebook keeps its name
        converted["quantize.embedding.weight"] = sd["quantize.embedding.weight"]
    ref.load_state_dict(converted)  # strict: every diffusers tensor came from an LDM name of ours
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        z = model.encode(x)
        close(z, ref.encode(x).latents if preset == "tiny-vq" else ref.encode(x).latent_dist.mode())
        close(model.decode(z), ref.decode(z).sample)


def test_weight_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="vq-f4.zip"):
        weights.load_autoencoder(str(tmp_path / "model.ckpt"), "vq-f4")
    torch.save({"state_dict": randomized("tiny-kl").state_dict()}, tmp_path / "kl.ckpt")
    with pytest.raises(ValueError, match="quantize.embedding.weight"):  # listed as missing
        weights.load_autoencoder(str(tmp_path / "kl.ckpt"), "tiny-vq")
    with pytest.raises(ValueError, match="preset"):
        weights.load_autoencoder(str(tmp_path / "kl.ckpt"))


def test_vq_decode_quantizes():
    model = randomized("tiny-vq")
    z = torch.randn(2, 3, 8, 8)
    codebook = model.quantize.embedding.weight
    idx = ((z.permute(0, 2, 3, 1)[..., None, :] - codebook) ** 2).sum(-1).argmin(-1)  # brute force
    zq = codebook[idx].permute(0, 3, 1, 2)
    with torch.no_grad():
        assert torch.equal(model.decode(z), model.decode(zq))
        assert not torch.allclose(model.decode_latent(z), model.decoder(model.post_quant_conv(z)))


class Killed(Exception):
    pass


class DiesAt(TinyData):
    def __init__(self, at, **kw):
        super().__init__(**kw)
        self.at = at

    def __getitem__(self, i):
        if i >= self.at:
            raise Killed
        return super().__getitem__(i)


META = {"preset": "tiny-vq", "weights": "random", "dataset": "tiny", "flip": True}


def test_latent_cache_resume_flips_labels(tmp_path):
    model = randomized("tiny-vq")
    full = TinyData()
    data.encode_dataset(model, full, str(tmp_path / "a"), META, batch_size=4, dtype=np.float32)
    with pytest.raises(Killed):  # killed while reading chunk 1: chunk 0 is written and recorded
        data.encode_dataset(model, DiesAt(4), str(tmp_path / "b"), META, batch_size=4,
                            dtype=np.float32)
    with pytest.raises(ValueError, match="incomplete"):
        data.LatentCache(str(tmp_path / "b"))
    resumed = TinyData()
    data.encode_dataset(model, resumed, str(tmp_path / "b"), META, batch_size=4, dtype=np.float32)
    assert sorted(resumed.accessed) == list(range(4, 10))  # continued at chunk 1
    a, b = data.LatentCache(str(tmp_path / "a")), data.LatentCache(str(tmp_path / "b"))
    assert np.array_equal(a.latents, b.latents) and a.latents.shape == (10, 2, 3, 8, 8)
    with torch.no_grad():
        close(torch.from_numpy(np.array(b.latents[:, 0])), model.encode(full.images))
        close(torch.from_numpy(np.array(b.latents[:, 1])), model.encode(full.images.flip(-1)))
    assert np.array_equal(b.labels, full.labels) and b[3][1] == full.labels[3]
    assert b[3][0].shape == (2, 3, 8, 8)
    assert b.scale == 1.0 and b.num_classes == 3 and b.meta["preset"] == "tiny-vq"
    assert b.meta["complete"]
    with pytest.raises(SystemExit, match="different cache"):
        data.encode_dataset(model, full, str(tmp_path / "b"), {**META, "weights": "other"},
                            batch_size=4)


def test_latent_cache_kl_scale_and_captions(tmp_path):
    model = randomized("tiny-kl")
    # external KL weights: the scale is measured on the data first (support/encode.py)
    model.scale = None
    ds = TinyData(n=6, captions=True)
    with pytest.raises(ValueError, match="scale is not set"):
        data.encode_dataset(model, ds, str(tmp_path), {**META, "preset": "tiny-kl"}, batch_size=4)
    model.scale = vae.measure_scale(model, data.spread_images(ds))
    assert model.scale == pytest.approx(vae.measure_scale(model, ds.images))  # all 6 images
    data.encode_dataset(model, ds, str(tmp_path), {**META, "preset": "tiny-kl"}, batch_size=4)
    cache = data.LatentCache(str(tmp_path))
    assert cache.latents.dtype == np.float16 and cache.captions == ds.captions
    assert cache.labels is None
    assert cache[5][1] == "caption 5"
    # 1/std of all 6 images
    assert abs(np.asarray(cache.latents[:, 0], dtype=np.float64).std() - 1.0) < 1e-2
    assert cache.scale == model.scale


def fake_datasets(monkeypatch, **kw):
    """data.load_dataset returns TinyData (seeded by the split)."""
    monkeypatch.setattr(data, "load_dataset",
                        lambda name, root=None, split="train", image_size=None,
                        pad=False: TinyData(seed=int(split == "test"), **kw))


def test_training_lowers_loss():
    for preset in ("tiny-kl", "tiny-vq"):
        torch.manual_seed(0)
        model = vae.Autoencoder(vae.PRESETS[preset])
        # smooth
        x = torch.nn.functional.interpolate(torch.rand(8, 3, 4, 4) * 2 - 1, size=16,
                                            mode="bilinear")
        opt = torch.optim.Adam(model.parameters(), lr=2e-3, betas=(0.5, 0.9))
        losses = []
        for _ in range(10):
            loss = train_vae.training_loss(model, x)
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
        assert np.mean(losses[-3:]) < 0.85 * np.mean(losses[:3]), (preset, losses)


def test_cli_train_then_encode(tmp_path, monkeypatch):
    fake_datasets(monkeypatch)
    out = tmp_path / "ae"
    train_vae.main(["--dataset", "tiny", "--preset", "tiny-kl", "--steps", "3", "--batch-size",
                    "4", "--out", str(out), "--eval-images", "6"])
    report = json.load(open(out / "report.json"))
    assert report["steps"] == 3 and report["psnr"] > 0 and (out / "recon.png").exists()
    model = weights.load_autoencoder(str(out / "ckpt.pt"))
    assert model.scale == report["scale"] and model.config == vae.PRESETS["tiny-kl"]
    encode.main(["--dataset", "tiny", "--weights", str(out / "ckpt.pt"), "--out",
                 str(tmp_path / "cache"),
                 "--batch-size", "4", "--num-workers", "0"])
    cache = data.LatentCache(str(tmp_path / "cache"))  # no --flip: the images only
    assert cache.scale == model.scale and cache.latents.shape == (10, 1, 3, 8, 8)
    assert not cache.flip and cache.meta["flip"] is False
    with torch.no_grad():  # float16 as stored
        expected = model.encode(TinyData().images)
    cached = torch.from_numpy(np.array(cache.latents[:, 0], dtype=np.float32))
    assert (cached - expected).abs().max() <= 1e-3 * expected.abs().max()
    before = (out / "ckpt.pt").read_bytes()
    with pytest.raises(SystemExit, match="already holds an autoencoder"):
        train_vae.main(["--dataset", "tiny", "--preset", "tiny-kl", "--steps", "3", "--out",
                        str(out)])
    assert (out / "ckpt.pt").read_bytes() == before  # the trained autoencoder is untouched


def test_autoencoder_attention_is_contiguous_and_exact(monkeypatch):
    """q, k, v reach SDPA contiguous (its fused kernels need it) and the block equals the
    explicit softmax(q k^T / sqrt(C)) v of LDM's AttnBlock."""
    torch.manual_seed(0)
    block = vae.AttnBlock(32).eval()
    for p in block.parameters():
        torch.nn.init.normal_(p, std=0.2)
    x = torch.randn(2, 32, 4, 4)
    seen = []
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def spy(q, k, v, *a, **kw):
        seen.append(all(t.is_contiguous() for t in (q, k, v)))
        return sdpa(q, k, v, *a, **kw)
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
    with torch.no_grad():
        out = block(x)
        h = block.norm(x)
        q, k, v = (m(h).flatten(2) for m in (block.q, block.k, block.v))  # [B, C, HW]
        w = torch.softmax(q.transpose(1, 2) @ k / 32 ** 0.5, dim=-1)  # [B, HW, HW]
        ref = x + block.proj_out((v @ w.transpose(1, 2)).reshape(2, 32, 4, 4))
    assert seen == [True]
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


class Payload:
    """Unpickling calls print: the stand-in for code a checkpoint could run."""
    def __reduce__(self):
        return (print, ("payload ran",))


def test_checkpoints_that_pickle_code_need_an_explicit_flag(tmp_path, capsys):
    src = randomized("tiny-vq")
    torch.save({"state_dict": src.state_dict(), "callbacks": Payload()}, tmp_path / "model.ckpt")
    with pytest.raises(SystemExit, match="pass --unsafe-pickle"):
        weights.load_autoencoder(str(tmp_path / "model.ckpt"), "tiny-vq")
    assert "payload ran" not in capsys.readouterr().out
    model = weights.load_autoencoder(str(tmp_path / "model.ckpt"), "tiny-vq", unsafe_pickle=True)
    assert "payload ran" in capsys.readouterr().out  # what the flag risks
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(),
                                                 src.state_dict().values()))


def test_a_colour_folder_trains_small_kl_rgb_and_is_scored_on_images_it_never_saw(tmp_path):
    from PIL import Image
    rng = np.random.default_rng(0)
    for c in range(2):
        os.makedirs(tmp_path / "f" / str(c))
        for i in range(10):
            image = Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8))
            image.save(tmp_path / "f" / str(c) / f"{i}.png")
    train, test = data.train_test_split("folder", str(tmp_path / "f"), 16)
    assert (len(train), len(test)) == (18, 2) and not set(train.indices) & set(test.indices)
    out = tmp_path / "ae"
    train_vae.main(["--dataset", "folder", "--data-root", str(tmp_path / "f"), "--image-size",
                    "16", "--preset", "small-kl-rgb", "--steps", "2", "--batch-size", "4",
                    "--out", str(out)])
    report = json.load(open(out / "report.json"))
    assert report["held_out_images"] == 2 and "10 % of the folder" in report["held_out_from"]
    model = weights.load_autoencoder(str(out / "ckpt.pt"))
    assert model.encode(test[0][0][None]).shape == (1, 4, 4, 4)  # f4 latents, 4 channels
    encode.main(["--dataset", "folder", "--data-root", str(tmp_path / "f"), "--image-size", "16",
                 "--weights", str(out / "ckpt.pt"), "--out", str(tmp_path / "cache"),
                 "--num-workers", "0"])
    cache = data.LatentCache(str(tmp_path / "cache"))
    assert cache.class_names == ["0", "1"] and cache.latents.shape == (20, 1, 4, 4, 4)


def test_flip_is_a_choice_of_the_cache_and_the_run(tmp_path):
    """encode --flip caches the mirror as view 1; train.py draws it only with --flip: a no-flip
    run never sees a mirrored latent (or pixel), and a no-flip cache refuses --flip."""
    model = randomized("tiny-vq")
    ds = TinyData()
    for flip in (False, True):
        data.encode_dataset(model, ds, str(tmp_path / f"f{flip}"), {**META, "flip": flip},
                            batch_size=4, dtype=np.float32)
    one, both = (data.LatentCache(str(tmp_path / f"f{flip}")) for flip in (False, True))
    assert one.latents.shape[1] == 1 and both.latents.shape[1] == 2 and both.flip
    assert np.array_equal(one.latents[:, 0], both.latents[:, 0])
    g = torch.Generator().manual_seed(0)
    for cache in (one, both):
        x = torch.from_numpy(np.array(cache.latents))
        for _ in range(5):  # never the mirror
            chosen = runs.first_stage(x, cache, None, False, g, 10, slice(0, 10))
            assert torch.equal(chosen, x[:, 0])
    views = torch.stack([runs.first_stage(torch.from_numpy(np.array(both.latents)), both, None,
                                          True, g, 10, slice(0, 10)) for _ in range(5)])
    mirrored = (views == torch.from_numpy(np.array(both.latents[:, 1]))).flatten(2).all(-1)
    assert 0 < mirrored.float().mean() < 1  # each sample or its mirror
    pixels = ds.images
    assert torch.equal(runs.first_stage(pixels, ds, None, False, g, 10, slice(0, 10)), pixels)
    flipped = runs.first_stage(pixels, ds, None, True, g, 10, slice(0, 10))
    is_mirror = (flipped == pixels.flip(-1)).flatten(1).all(1)
    assert 0 < is_mirror.sum() < 10 and ((flipped == pixels).flatten(1).all(1) | is_mirror).all()
    args = types.SimpleNamespace(latents=str(tmp_path / "fFalse"), flip=True)
    with pytest.raises(ValueError, match="holds no mirrored images.*--flip"):
        runs.load_training_data(args)


def test_runs_before_the_flip_option_resume_as_they_trained():
    """A latent run saved before --flip existed drew a mirror every step: resuming it needs
    --flip; a pixel run of then did not flip."""
    base = {"global_batch": 8, "batch_size": 8, "data_changed_ok": False, "lr": 1e-4, "step": 4}
    runs.check_resumable({**base, "latents": "cache"}, {**base, "latents": "cache", "flip": True})
    with pytest.raises(SystemExit, match="--flip: checkpoint True, now False"):
        runs.check_resumable({**base, "latents": "cache"},
                             {**base, "latents": "cache", "flip": False})
    runs.check_resumable({**base, "latents": None}, {**base, "latents": None, "flip": False})


def test_a_damaged_autoencoder_checkpoint_resumes_from_the_previous_one(tmp_path, monkeypatch):
    """train_vae.py kept no previous checkpoint and never removed a killed save's temporary: a
    damaged ckpt.pt ended the autoencoder run."""
    fake_datasets(monkeypatch)
    out = tmp_path / "ae"
    common = ["--dataset", "tiny", "--preset", "tiny-kl", "--batch-size", "4", "--eval-images",
              "4", "--save-every", "1", "--out", str(out)]
    train_vae.main([*common, "--steps", "2"])
    assert (out / "ckpt.prev.pt").exists()
    (out / "ckpt.pt").write_bytes(b"cut")
    (out / "ckpt.atomic-tmp999999999.pt").write_bytes(b"0" * 100)  # a killed save's
    train_vae.main([*common, "--steps", "3", "--resume"])
    assert not (out / "ckpt.atomic-tmp999999999.pt").exists()
    assert json.load(open(out / "report.json"))["steps"] == 3
