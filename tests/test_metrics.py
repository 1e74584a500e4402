"""Oracle tests of metrics.py against pytorch-fid, torch-fidelity, prdc and closed forms (CPU)."""
import json
import math
import os
import string

import numpy as np
import pytest
import torch
from PIL import Image

import metrics
from support import extract, features


def random_inception_state(seed=0):
    """Random weights at a sane scale (He init, non-trivial batch-norm statistics)."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for k, v in features.InceptionV3().state_dict().items():
        if k.endswith("conv.weight"):
            sd[k] = torch.randn(v.shape, generator=g) * (2 / v[0].numel()) ** 0.5
        elif k.endswith("running_var") or k.endswith("bn.weight"):
            sd[k] = torch.rand(v.shape, generator=g) + 0.5
        elif k.endswith("running_mean") or k.endswith("bn.bias") or k == "fc.bias":
            sd[k] = torch.randn(v.shape, generator=g) * 0.1
        elif k == "fc.weight":
            sd[k] = torch.randn(v.shape, generator=g) * 0.02
        else:
            sd[k] = v
    return sd


def test_inception_matches_pytorch_fid(tmp_path, monkeypatch):
    import pytorch_fid.inception as pfi
    sd = random_inception_state()
    monkeypatch.setattr(pfi, "load_state_dict_from_url", lambda *a, **k: sd)  # no download
    assert set(sd) == set(pfi.fid_inception_v3().state_dict())  # the .pth's keys load as they are
    path = tmp_path / features.FID_WEIGHTS
    torch.save(sd, path)
    ours = features.load_inception(str(path))
    ref = pfi.InceptionV3([3]).eval()
    x = torch.randint(0, 256, (2, 3, 40, 56), generator=torch.Generator().manual_seed(1),
                      dtype=torch.uint8)
    with torch.no_grad():
        out = ours(x)
        pool3 = ref(x.float() / 255)[0].flatten(1)  # pytorch-fid: ToTensor (/255), resize, 2x - 1
    logits = pool3 @ sd["fc.weight"].T + sd["fc.bias"]
    assert out["features"].shape == (2, 2048) and out["logits"].shape == (2, 1008)
    assert out["spatial"].shape == (2, 7 * 17 * 17)
    torch.testing.assert_close(out["features"], pool3, rtol=1e-4,
                               atol=1e-4 * pool3.abs().max().item())
    torch.testing.assert_close(out["logits"], logits, rtol=1e-4,
                               atol=1e-4 * logits.abs().max().item())
    torch.testing.assert_close(out["logits_unbiased"], logits - sd["fc.bias"], rtol=1e-4,
                               atol=1e-4 * logits.abs().max().item())


def test_missing_weights_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="pt_inception-2015-12-05-6726825d.pth"):
        features.load_inception(str(tmp_path / "nope.pth"))
    with pytest.raises(FileNotFoundError, match="CLIP"):
        features.CLIP(str(tmp_path / "no_clip"))


def random_cov(d, rank, g):
    a = torch.randn(d, rank, generator=g, dtype=torch.float64)
    return (a @ a.T / rank).numpy()


def test_frechet_distance_matches_pytorch_fid_and_closed_form():
    from pytorch_fid.fid_score import calculate_frechet_distance
    g = torch.Generator().manual_seed(0)
    d = 16
    mu1 = torch.randn(d, generator=g, dtype=torch.float64).numpy()
    mu2 = torch.randn(d, generator=g, dtype=torch.float64).numpy()
    for rank in (64, 8):  # full rank, then singular covariances
        s1, s2 = random_cov(d, rank, g), random_cov(d, rank, g)
        theirs = calculate_frechet_distance(mu1, s1, mu2, s2)
        ours = metrics.frechet_distance(mu1, s1, mu2, s2)
        assert ours == pytest.approx(theirs, rel=1e-6, abs=1e-8)
    a, b = np.random.RandomState(0).uniform(0.1, 2, d), np.random.RandomState(1).uniform(0.1, 2, d)
    # commuting (diagonal) covariances
    closed = ((mu1 - mu2) ** 2).sum() + ((np.sqrt(a) - np.sqrt(b)) ** 2).sum()
    assert metrics.frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(closed,
                                                                                       rel=1e-10)
    assert metrics.frechet_distance(mu1, s1, mu1, s1) == pytest.approx(0, abs=1e-6)


def test_streaming_statistics_equal_numpy():
    x = np.random.RandomState(0).randn(103, 12) * 3 + 5
    stats = metrics.FeatureStats(12, "cpu")
    for i in range(0, 103, 25):
        stats.update(torch.from_numpy(x[i:i + 25]).float())
    mu, cov = stats.mean_cov()
    x32 = x.astype(np.float32).astype(np.float64)
    np.testing.assert_allclose(mu, x32.mean(0), rtol=1e-12)
    np.testing.assert_allclose(cov, np.cov(x32, rowvar=False), rtol=1e-9, atol=1e-10)


def test_inception_score_matches_torch_fidelity():
    from torch_fidelity.metric_isc import isc_features_to_metric
    logits = torch.randn(500, 1008, generator=torch.Generator().manual_seed(0)) * 3
    ref = isc_features_to_metric(logits, splits=10, shuffle=True, rng_seed=2020)
    mean, std = metrics.inception_score(logits.numpy(), splits=10)
    assert mean == pytest.approx(ref["inception_score_mean"], rel=1e-10)
    assert std == pytest.approx(ref["inception_score_std"], rel=1e-8)


@pytest.mark.parametrize("n", [50, 300])
def test_kid_matches_torch_fidelity_and_is_unbiased(n):
    """Equal sizes, one subset of all samples: torch-fidelity's estimate exactly; the same law
    on both sides averages to 0 at any sizes (unbiased), a shifted one does not."""
    from torch_fidelity.metric_kid import kid_features_to_metric
    rng = np.random.default_rng(n)
    a, b = rng.normal(size=(n, 16)), rng.normal(0.3, 1.2, size=(n, 16))
    theirs = kid_features_to_metric(torch.from_numpy(a), torch.from_numpy(b), kid_subsets=1,
                                    kid_subset_size=n, verbose=False)
    assert metrics.kernel_inception_distance(a, b) == pytest.approx(
        theirs["kernel_inception_distance_mean"], rel=1e-10)
    same = [metrics.kernel_inception_distance(rng.normal(size=(n, 16)), rng.normal(size=(40, 16)))
            for _ in range(200)]
    spread = np.std(same) / np.sqrt(len(same))
    assert abs(np.mean(same)) < 4 * spread  # unbiased, also at unequal sizes (n vs 40)
    assert metrics.kernel_inception_distance(a, b) > 20 * spread


def test_precision_recall_matches_prdc(monkeypatch):
    from prdc import compute_prdc
    rs = np.random.RandomState(0)
    real = rs.randn(300, 8).astype(np.float32)
    fake = (rs.randn(250, 8) * 1.2 + 0.3).astype(np.float32)
    ref = compute_prdc(real, fake, nearest_k=3)
    blocks = metrics.row_blocks
    # several row blocks
    monkeypatch.setattr(metrics, "row_blocks", lambda n, m: blocks(n, m, budget=64 * m))
    ours = metrics.precision_recall(real, fake, k=3)
    for key in ("precision", "recall", "density", "coverage"):
        assert ours[key] == pytest.approx(float(ref[key]), abs=1e-12), key


def test_rmd_mean_is_zero_and_matches_population_closed_form():
    # Two classes N(+-m e1, I) in 4-D, equal weights: Sigma = I, Sigma_agn = I + m^2 e1 e1^T, so
    # RMD = -z1^2 + (s m + z1)^2 / (1 + m^2) with z = x - mu_y (the other coordinates cancel).
    rs, n, m = np.random.RandomState(0), 40000, 2.0
    y = np.repeat([0, 1], n // 2)
    s = np.where(y == 0, 1.0, -1.0)
    z = rs.randn(n, 4)
    x = z.copy()
    x[:, 0] += s * m
    scores = metrics.rmd_scores(x, y)
    closed = -z[:, 0] ** 2 + (s * m + z[:, 0]) ** 2 / (1 + m ** 2)
    assert abs(scores.mean()) < 1e-8  # exact identity: both Mahalanobis terms average to -D
    err = np.abs(scores - closed)  # estimation error of the statistics: O(sqrt(D / N) ||z||^2)
    assert err.mean() < 0.04 and (err / (1 + (z ** 2).sum(1))).max() < 0.05
    # sup = 1
    assert metrics.top_fraction_mean(scores, 0.01) == pytest.approx(np.sort(closed)[-400:].mean(),
                                                                    abs=0.01)
    sing = np.concatenate([x, x[:, :1] * 2], 1)  # a redundant coordinate: singular covariances
    np.testing.assert_allclose(metrics.rmd_scores(sing, y), scores, atol=1e-6)


def test_sample_entropy_limits():
    g = torch.Generator().manual_seed(0)
    codebook = torch.randn(16, 3, generator=g)
    latents = torch.randn(2, 3, 4, 4, generator=g)
    assert metrics.sample_entropy(latents, codebook, tau=1e-6) == pytest.approx(0, abs=1e-6)
    # 6 codes, all at distance sqrt(2) from the origin
    eq = torch.cat([torch.eye(3), -torch.eye(3)])
    uniform = metrics.sample_entropy(torch.zeros(1, 3, 2, 2), eq, tau=1.0)
    assert uniform == pytest.approx(math.log(6), rel=1e-12)
    d2 = ((latents.permute(0, 2, 3, 1).reshape(-1, 1, 3) - codebook[None]) ** 2).sum(-1)
    p = torch.softmax(-d2 / 0.5, 1)
    expected = -(p * p.log()).sum(1).mean().item()
    assert metrics.sample_entropy(latents, codebook, tau=0.5) == pytest.approx(expected, rel=1e-5)


def test_memorization():
    rs = np.random.RandomState(0)
    train = rs.randn(200, 6)
    # 10 exact copies (after L2 normalisation)
    fake = np.concatenate([train[:10] * 3.0, rs.randn(30, 6)])
    out = metrics.memorization(fake, train, k=5, threshold=0.12)
    f = fake / np.linalg.norm(fake, axis=1, keepdims=True)
    t = train / np.linalg.norm(train, axis=1, keepdims=True)
    d = np.sort(np.linalg.norm(f[:, None] - t[None], axis=-1), axis=1)
    # (exact copies: sqrt of rounding)
    assert out["l2_5nn"] == pytest.approx(d[:, :5].mean(), rel=1e-6)
    assert out["mem_ratio"] == pytest.approx((d[:, 0] < 0.12).mean())
    assert out["mem_ratio"] >= 10 / 40


def tiny_clip(path):
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer
    os.makedirs(path)
    vocab = {}
    for c in [*string.ascii_lowercase, *[c + "</w>" for c in string.ascii_lowercase],
              "<|startoftext|>", "<|endoftext|>"]:
        vocab[c] = len(vocab)
    with open(os.path.join(path, "vocab.json"), "w") as f:
        json.dump(vocab, f)
    with open(os.path.join(path, "merges.txt"), "w") as f:
        f.write("#version: 0.2\n")
    tok = CLIPTokenizer(os.path.join(path, "vocab.json"), os.path.join(path, "merges.txt"))
    images = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    eos = vocab["<|endoftext|>"]
    cfg = CLIPConfig(text_config=dict(vocab_size=len(vocab), hidden_size=32, intermediate_size=64,
                                      num_hidden_layers=1,
                                      num_attention_heads=2, bos_token_id=vocab["<|startoftext|>"],
                                      eos_token_id=eos, pad_token_id=eos),
                     vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                        num_attention_heads=2,
                                        image_size=32, patch_size=8), projection_dim=16)
    torch.manual_seed(0)
    CLIPModel(cfg).save_pretrained(path)
    CLIPProcessor(image_processor=images, tokenizer=tok).save_pretrained(path)


def test_clip_score_equals_clip_model_embeddings(tmp_path):
    tiny_clip(str(tmp_path / "clip"))
    clip = features.CLIP(str(tmp_path / "clip"))
    images = torch.randint(0, 256, (3, 1, 40, 40), dtype=torch.uint8,
                           generator=torch.Generator().manual_seed(0))
    captions = ["a cat", "dog", "a red fire engine"]
    inputs = clip.processor(text=captions,
                            images=list(images.expand(-1, 3, -1, -1).permute(0, 2, 3, 1).numpy()),
                            return_tensors="pt", padding=True)
    with torch.no_grad():
        out = clip.model(**inputs)  # CLIPModel's own (normalised) embeddings
    cos = (out.image_embeds * out.text_embeds).sum(1).double()
    expected = (100 * cos.clamp_min(0)).sum().item()
    assert metrics.clip_score_sum(clip, images, captions) == pytest.approx(expected, rel=1e-5)
    ext = features.Extractor(f"clip:{tmp_path / 'clip'}", torch.device("cpu"))
    assert ext.name == "clip:clip" and ext(images)["features"].shape == (3, 16)


def write_npz(path, n, seed, labels=True, size=28):
    rs = np.random.RandomState(seed)
    images = rs.randint(0, 256, (n, size, size, 1)).astype(np.uint8)
    extra = {"labels": np.arange(n) % 4} if labels else {}
    np.savez(path, arr_0=images, **extra)
    return images


def test_cli_end_to_end(tmp_path, capsys):
    torch.manual_seed(0)
    cls = tmp_path / "cls.pt"  # a randomly initialised domain classifier as the feature extractor
    torch.save({"model": features.Classifier(4, 28, 1).state_dict(), "num_classes": 4,
                "image_size": 28, "channels": 1}, cls)
    real = str(tmp_path / "real.npz")
    write_npz(real, 80, 0)
    sweep = tmp_path / "run" / "samples"  # sample.py's layout: OUT/s{scale}/samples.npz
    for i, scale in enumerate((1.0, 2.0)):
        os.makedirs(sweep / f"s{scale:g}")
        write_npz(sweep / f"s{scale:g}" / "samples.npz", 60, i + 1)
    folder = tmp_path / "pngs"
    os.makedirs(folder)
    for i, im in enumerate(write_npz(tmp_path / "x.npz", 40, 9)):
        Image.fromarray(im[..., 0]).save(folder / f"{i:06d}.png")

    def run(fakes, which, out):
        return metrics.main(["--real", real, *[a for f in fakes for a in ("--fake", f)],
                             "--features", f"classifier:{cls}",
                             "--metrics", which, "--train", real, "--batch-size", "32", "--cache",
                             str(tmp_path / "cache"),
                             "--out", str(tmp_path / out)])

    rows = run([str(sweep), f"other={sweep / 's2' / 'samples.npz'}", str(folder)], "fid,pr,mem",
               "out")
    assert [(r["run"], r["scale"]) for r in rows] == [("run", 1.0), ("run", 2.0), ("other", 2.0),
                                                      ("pngs", None)]
    report = json.load(open(tmp_path / "out" / "metrics.json"))
    assert report["features"] == "classifier:cls.pt" and len(report["rows"]) == 4
    assert all(0 <= r["precision"] <= 1 and r["fid"] > 0 and 0 <= r["mem_ratio"] <= 1
               for r in report["rows"])
    # same file, two ways
    assert report["rows"][1]["fid"] == pytest.approx(report["rows"][2]["fid"], rel=1e-12)
    assert os.path.exists(tmp_path / "out" / "precision_recall.png")
    assert len(os.listdir(tmp_path / "cache")) == 1  # real = train: one cached feature file
    assert "classifier:cls.pt" in capsys.readouterr().out
    # RMD needs the conditioning labels; a folder has none
    with pytest.raises(SystemExit, match="labels"):
        run([str(folder)], "rmd", "out2")
    write_npz(tmp_path / "one.npz", 1, 3)
    with pytest.raises(SystemExit, match="^metrics.py: FID needs at least 2 images"):
        run([str(tmp_path / "one.npz")], "fid", "out3")
    write_npz(tmp_path / "three.npz", 3, 3)
    with pytest.raises(SystemExit, match="k=3 needs more than 3 images"):
        run([str(tmp_path / "three.npz")], "pr", "out3")
    assert not os.path.exists(tmp_path / "out3")
    import dataclasses
    import vae
    # a random VQ autoencoder in vae.py's checkpoint format
    vq = vae.Autoencoder(vae.PRESETS["tiny-vq"])
    torch.save({"config": dataclasses.asdict(vq.config), "model": vq.state_dict(), "scale": 1.0},
               tmp_path / "vq.pt")
    sys_argv = ["--vq", str(tmp_path / "vq.pt"), "--tau", "0.5"]
    rows = metrics.main(["--real", real, "--fake", str(sweep), "--features", f"classifier:{cls}",
                         "--metrics", "fid,rmd,entropy",
                         # cached real features
                         "--cache", str(tmp_path / "cache"), "--out", str(tmp_path
                                                                          / "out2"), *sys_argv])
    # other batch size
    assert rows[0]["fid"] == pytest.approx(report["rows"][0]["fid"], rel=1e-6)
    assert "rmd_top1" in rows[0]
    assert os.path.exists(tmp_path / "out2" / "rmd_scores.npz")
    with torch.no_grad():
        images = np.load(sweep / "s1" / "samples.npz")["arr_0"]
        images = torch.from_numpy(images).permute(0, 3, 1, 2)  # NHWC -> NCHW
        direct = metrics.sample_entropy(vq.latent(images.float().expand(-1, 3, -1, -1) / 127.5 - 1),
                                        vq.quantize.embedding.weight, tau=0.5)
    assert rows[0]["entropy"] == pytest.approx(direct, rel=1e-6) and 0 < direct <= math.log(64)
    assert json.load(open(tmp_path / "out2" / "metrics.json"))["options"]["tau"] == 0.5


def test_train_classifier_on_digits(tmp_path):
    acc = features.main(["train-classifier", "--dataset", "digits", "--epochs", "2",
                         "--batch-size", "32", "--out", str(tmp_path / "c.pt")])
    assert acc > 0.6
    ext = features.Extractor(f"classifier:{tmp_path / 'c.pt'}", torch.device("cpu"))
    assert ext(torch.zeros(2, 3, 32, 32, dtype=torch.uint8))["features"].shape == (2, 128)


def test_npz_sources_and_statistics_files(tmp_path):
    from types import SimpleNamespace
    arr = np.random.RandomState(0).randint(0, 256, (23, 5, 6, 3)).astype(np.uint8)
    for save in (np.savez, np.savez_compressed):
        save(tmp_path / "a.npz", arr_0=arr, labels=np.arange(23))
        src = extract.open_images(str(tmp_path / "a.npz"))
        assert len(src) == 23 and (src.labels == np.arange(23)).all()
        np.testing.assert_array_equal(np.concatenate([src.read(0, 10), src.read(10, 23)]), arr)
        np.testing.assert_array_equal(src.read(4, 7), arr[4:7])  # a jump back re-seeks
    mu, sigma = np.zeros(2048), np.eye(2048)
    # pytorch-fid's statistics file: used as it is
    np.savez(tmp_path / "stats.npz", mu=mu, sigma=sigma)
    inception = SimpleNamespace(kind="inception")
    stats = metrics.reference_features(extract.open_images(str(tmp_path / "stats.npz")), inception,
                                       None, "real", ["mu", "sigma"])
    assert stats["mu"] is not None and (stats["sigma"] == sigma).all()
    with pytest.raises(ValueError, match="no images"):
        metrics.reference_features(extract.open_images(str(tmp_path / "stats.npz")), inception,
                                   None, "real", ["features"])


def test_classifier_on_a_folder_tests_on_held_out_images(tmp_path, capsys):
    from PIL import Image
    rng = np.random.default_rng(0)
    for c in range(2):
        os.makedirs(tmp_path / "f" / str(c))
        for i in range(20):
            image = Image.fromarray(rng.integers(0, 255, (8, 8), dtype=np.uint8))
            image.save(tmp_path / "f" / str(c) / f"{i}.png")
    features.main(["train-classifier", "--dataset", "folder", "--data-root", str(tmp_path / "f"),
                  "--image-size", "8", "--epochs", "1", "--out", str(tmp_path / "c.pt")])
    out = capsys.readouterr().out
    assert "held-out 10 % (4 images)" in out and "(4 images)" in out.splitlines()[-1]


def test_channel_first_arrays_are_refused(tmp_path):
    np.savez(tmp_path / "nchw.npz", arr_0=np.zeros((10, 1, 8, 8), np.uint8))
    with pytest.raises(ValueError, match="looks channel-first"):
        extract.NpzSource(str(tmp_path / "nchw.npz"))
    np.savez(tmp_path / "nhwc.npz", arr_0=np.zeros((10, 8, 8, 1), np.uint8))
    assert len(extract.NpzSource(str(tmp_path / "nhwc.npz"))) == 10


def _metrics_worker(rank, world, port, argv, out):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    metrics.main(argv)


def test_two_processes_give_the_single_process_metrics(tmp_path):
    """Uneven shards (61 and 41 images over 2 ranks), features gathered to rank 0 only, the
    cache decided by rank 0: the same numbers as one process."""
    import socket
    import torch.multiprocessing as mp
    torch.manual_seed(0)
    cls = tmp_path / "cls.pt"
    torch.save({"model": features.Classifier(4, 28, 1).state_dict(), "num_classes": 4,
                "image_size": 28,
                "channels": 1}, cls)
    write_npz(tmp_path / "real.npz", 61, 0)
    write_npz(tmp_path / "fake.npz", 41, 1)

    def argv(out):
        return ["--real", str(tmp_path / "real.npz"), "--fake", str(tmp_path / "fake.npz"),
                "--features", f"classifier:{cls}", "--metrics", "fid,pr,mem", "--train",
                str(tmp_path / "real.npz"),
                "--batch-size", "16", "--cache", str(tmp_path / out / "cache"), "--out",
                str(tmp_path / out)]
    one = metrics.main(argv("one"))[0]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_metrics_worker, args=(2, port, argv("two"), "two"), nprocs=2, join=True)
    two = json.load(open(tmp_path / "two" / "metrics.json"))["rows"][0]
    for k in ("fid", "precision", "recall", "l2_5nn", "mem_ratio"):  # other batch boundaries and
        assert two[k] == pytest.approx(one[k], rel=1e-6), k            # sum orders: rounding only


def test_class_accuracy_counts_the_classifier_agreeing_with_the_labels(tmp_path):
    clf = features.Classifier(4, 8, 1)
    with torch.no_grad():
        clf.head.bias.copy_(torch.tensor([0.0, 0.0, 0.0, 1e6]))  # it always says class 3
    torch.save({"model": clf.state_dict(), "num_classes": 4, "image_size": 8, "channels": 1},
               tmp_path / "c.pt")
    images = np.random.default_rng(0).integers(0, 255, (40, 8, 8, 1), dtype=np.uint8)
    labels = np.repeat([3, 0, 3, 1, 3], 8)  # 24 of 40 are class 3
    np.savez(tmp_path / "s.npz", arr_0=images, labels=labels)
    args = ["--real", str(tmp_path / "s.npz"), "--fake", str(tmp_path / "s.npz"),
            "--features", f"classifier:{tmp_path / 'c.pt'}", "--batch-size", "16", "--cache", "",
            "--out", str(tmp_path / "m")]
    rows = metrics.main([*args, "--metrics", "acc"])
    assert rows[0]["class_acc"] == 24 / 40
    np.savez(tmp_path / "s.npz", arr_0=images)
    with pytest.raises(SystemExit, match="acc needs the conditioning labels"):
        metrics.main([*args, "--metrics", "acc"])


def test_the_real_vs_real_row_scores_what_a_perfect_model_scores_at_that_n():
    """n reference images against the rest track n samples of the same distribution against the
    whole reference (two halves of n each would carry twice FID's small-n bias: ~1.8x here)."""
    rng = np.random.default_rng(1)
    spread = np.diag(np.linspace(0.5, 2.0, 16))
    floors, perfect = [], []
    for _ in range(10):
        ref = rng.standard_normal((600, 16)) @ spread
        floors.append(metrics.real_vs_real({"features": ref}, [{"n": 60, "fid": 0.0}])["fid"])
        fake = rng.standard_normal((60, 16)) @ spread
        perfect.append(metrics.frechet_distance(fake.mean(0), np.cov(fake, rowvar=False),
                                                ref.mean(0), np.cov(ref, rowvar=False)))
    assert abs(np.mean(floors) / np.mean(perfect) - 1) < 0.2, (floors, perfect)
    assert metrics.real_vs_real({"features": ref[:100]}, [{"n": 60, "fid": 0.0}]) is None


def test_every_real_and_fake_form_of_help_runs_through_main(tmp_path):
    """--real: .npz of images, pytorch-fid's mu / sigma statistics, a folder, dataset:NAME:SPLIT;
    --fake: .npz, a folder, a sample.py output folder (one row per scale), LABEL=PATH. Through
    metrics.main (a statistics-only reference died in the size note): the statistics with the
    FID Inception at random weights, the rest with a small classifier's features."""
    torch.save(random_inception_state(), tmp_path / "inception.pth")
    clf = features.Classifier(10, 8, 1)
    torch.save({"model": clf.state_dict(), "num_classes": 10, "image_size": 8, "channels": 1},
               tmp_path / "clf.pt")
    images = np.random.default_rng(0).integers(0, 255, (6, 8, 8, 1), dtype=np.uint8)
    np.savez(tmp_path / "real.npz", arr_0=images)
    np.savez(tmp_path / "stats.npz", mu=np.zeros(2048), sigma=np.eye(2048))
    for name in ("folder_real", "folder_fake"):
        os.makedirs(tmp_path / name)
        for i, image in enumerate(images):
            Image.fromarray(image[..., 0]).save(tmp_path / name / f"{i}.png")
    for scale in ("1", "2"):
        os.makedirs(tmp_path / "run" / "samples" / f"s{scale}")
        np.savez(tmp_path / "run" / "samples" / f"s{scale}" / "samples.npz", arr_0=images)
    fakes = [str(tmp_path / "real.npz"), str(tmp_path / "folder_fake"),
             str(tmp_path / "run" / "samples"), f"mine={tmp_path / 'real.npz'}"]
    cases = [(tmp_path / "real.npz", "classifier:" + str(tmp_path / "clf.pt"), fakes),
             (tmp_path / "folder_real", "classifier:" + str(tmp_path / "clf.pt"), fakes[:1]),
             ("dataset:digits:test", "classifier:" + str(tmp_path / "clf.pt"), fakes[:1]),
             (tmp_path / "stats.npz", "inception:" + str(tmp_path / "inception.pth"), fakes[:1])]
    for k, (real, extractor, runs) in enumerate(cases):
        out = tmp_path / f"m{k}"
        metrics.main(["--real", str(real), "--features", extractor, "--metrics", "fid",
                      "--cache", "", "--out", str(out), "--batch-size", "8",
                      *(a for f in runs for a in ("--fake", f))])
        rows = json.load(open(out / "metrics.json"))["rows"]
        assert len(rows) == len(runs) + (len(runs) > 1) and all(
            math.isfinite(r["fid"]) for r in rows), real
    assert {r["run"] for r in json.load(open(tmp_path / "m0" / "metrics.json"))["rows"]} == {
        "real", "folder_fake", "run", "mine"}


def test_the_feature_cache_follows_the_files_and_refuses_nan(tmp_path, capsys):
    """Reference images rewritten in place (same names and count) were scored from the stale
    cache; a cache entry holding NaN printed FID nan and exited 0."""
    clf = features.Classifier(10, 8, 1)
    torch.save({"model": clf.state_dict(), "num_classes": 10, "image_size": 8, "channels": 1},
               tmp_path / "clf.pt")
    rng = np.random.default_rng(0)
    os.makedirs(tmp_path / "real")

    def write_reference(offset):
        for i in range(12):
            Image.fromarray(rng.integers(offset, offset + 60, (8, 8), dtype=np.uint8)).save(
                tmp_path / "real" / f"{i}.png")
    write_reference(0)
    np.savez(tmp_path / "fake.npz", arr_0=rng.integers(0, 60, (12, 8, 8, 1), dtype=np.uint8))

    def fid():
        metrics.main(["--real", str(tmp_path / "real"), "--fake", str(tmp_path / "fake.npz"),
                      "--features", f"classifier:{tmp_path / 'clf.pt'}", "--metrics", "fid",
                      "--cache", str(tmp_path / "cache"), "--out", str(tmp_path / "m")])
        return json.load(open(tmp_path / "m" / "metrics.json"))["rows"][0]["fid"]
    first = fid()
    os.utime(tmp_path / "real", (1, 1))  # the folder's own time as before: only the files differ
    write_reference(150)
    assert fid() != first  # the rewritten images were extracted again
    entry = max((tmp_path / "cache").glob("*.npz"), key=os.path.getmtime)  # the current one
    with np.load(entry) as f:
        poisoned = {k: f[k] for k in f.files}
    poisoned["mu"] = np.full_like(poisoned["mu"], np.nan)
    np.savez(entry, **poisoned)
    capsys.readouterr()
    assert math.isfinite(fid()) and "recomputing them" in capsys.readouterr().out
