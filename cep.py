"""Conditions, condition embedding perturbation (CEP) and the denoiser of Eq. 8.

The condition embedders c_theta(y) of the LDM-4 models (App. B.3) and the perturbation delta of
CEP, the paper's method (Sec. 5.1, Eq. 8): during training the U-Net sees c_theta(y) + delta
instead of c_theta(y) (`Denoiser` below),

    loss = || eps - eps_theta(x_t, t, c_theta(y) + delta) ||^2,

with delta drawn afresh for every sample at every step, and never at sampling. `Denoiser` is
eps_theta(x_t, t, c_theta(y) + delta) itself: embedder, delta, U-Net (unet.py), one model for
training (train.py) and sampling (sample.py).
  CEP-U: delta ~ U(-gamma/sqrt(d), +gamma/sqrt(d)) elementwise
  CEP-G: delta ~ N(0, (gamma/sqrt(d))^2 I)   (the paper's N(0, gamma/sqrt(d) I), its second
         argument read as the standard deviation: our reading)
d is the width of one condition token (the last dimension of the embedding).
The null condition (the extra class row, or the empty caption) is what condition dropout puts
in during training and what classifier-free guidance (Eq. 2) contrasts with at sampling.
"""
import math
import os

import torch
import torch.nn as nn


# -----------------------------------------------------------------------------
# condition embedders


class ClassEmbedder(nn.Module):
    """Class label -> one context token (LDM cin256: 512-d). Row num_classes is the null class
    used for classifier-free guidance (Eq. 2)."""

    tokens = 1  # context tokens per condition

    def __init__(self, num_classes, dim=512):
        super().__init__()
        self.num_classes = num_classes
        self.embedding = nn.Embedding(num_classes + 1, dim)

    @property
    def null_label(self):
        return self.num_classes

    def null_condition(self, batch):
        """A batch of null labels, int64 [batch]."""
        return torch.full((batch,), self.null_label, dtype=torch.long,
                          device=self.embedding.weight.device)

    def forward(self, labels):
        # labels: int64 [B] -> [B, 1, dim]
        return self.embedding(labels)[:, None, :]


class TextEmbedder(nn.Module):
    """Captions -> token states of a pre-trained, fully trainable BERT-family encoder (the paper:
    bert-base-uncased, 77 tokens, App. B.3), loaded from a local directory only. The released
    CC3M models (released.py) keep their tokenizer in another folder and call BERT with the
    token ids only (attention_mask=False: the padding tokens are attended too)."""

    def __init__(self, path, context_dim, max_length=77, freeze=False, tokenizer=None,
                 attention_mask=True):
        super().__init__()
        if path is None:
            raise FileNotFoundError("captions need a text encoder: pass --text-encoder DIR, a "
                                    "local bert-base-uncased (config.json, vocab.txt, "
                                    "model.safetensors)")
        if not os.path.isfile(os.path.join(str(path), "config.json")):
            raise FileNotFoundError(
                f"no BERT model directory at {path!r}: download bert-base-uncased from the Hugging "
                f"Face hub (config.json, vocab.txt, model.safetensors) into that directory "
                f"(or pass another local BERT-family model directory)")
        from transformers import AutoModel, AutoTokenizer
        self.tokenizer = AutoTokenizer.from_pretrained(tokenizer or path, local_files_only=True)
        self.encoder = AutoModel.from_pretrained(path, local_files_only=True)
        self.encoder.train()  # from_pretrained returns eval mode; the encoder is trained too
        if getattr(self.encoder, "pooler", None) is not None:
            # unused (we take the token states); DDP rejects unused parameters
            self.encoder.pooler = None
        self.max_length, self.freeze, self.attention_mask = max_length, freeze, attention_mask
        self.tokens = max_length  # context tokens per condition
        self.remembered = None  # caption -> a frozen encoder's token states (remember)
        if freeze:  # small caption sets on a CPU: a fixed encoder (the paper trains it)
            self.encoder.requires_grad_(False).eval()
        hidden = self.encoder.config.hidden_size
        # the paper does not say how BERT's width meets the U-Net's context width: a linear
        # projection when they differ (our reading)
        self.proj = nn.Linear(hidden, context_dim) if hidden != context_dim else nn.Identity()

    @staticmethod
    def null_condition(batch):
        """The null condition for guidance is the empty caption."""
        return [""] * batch

    def tokenize(self, captions):
        """list[str] -> dict of [B, max_length] tensors on the module's device."""
        tokens = self.tokenizer(list(captions), padding="max_length", truncation=True,
                                max_length=self.max_length, return_tensors="pt")
        device = next(self.encoder.parameters()).device
        keep = ("input_ids", "attention_mask", "token_type_ids") if self.attention_mask \
            else ("input_ids",)
        return {k: v.to(device) for k, v in tokens.items() if k in keep}

    def train(self, mode=True):
        super().train(mode)
        if self.freeze:
            self.encoder.eval()  # no dropout in a frozen encoder
        return self

    @torch.no_grad()
    def remember(self, captions, batch=64, limit_bytes=2**30):
        """A frozen encoder gives every caption the same token states at every step: compute
        those of the run's captions (and the empty one) once, sorted, in batches of `batch`, so
        that the result does not depend on the resume point or the number of processes. Not
        done (a note says so) when they would take more than `limit_bytes`."""
        unique = sorted(set(captions) | {""})
        size = len(unique) * self.max_length * self.encoder.config.hidden_size * 4
        if size > limit_bytes:
            print(f"note: the frozen encoder's states of {len(unique)} captions would take "
                  f"{size / 2**30:.1f} GiB: the encoder runs at every step instead")
            return
        states = [self.encoder(**self.tokenize(unique[i:i + batch])).last_hidden_state
                  for i in range(0, len(unique), batch)]
        self.remembered = dict(zip(unique, torch.cat(states)))

    def forward(self, captions):
        # list[str] -> last hidden states [B, max_length, hidden] -> [B, max_length, context_dim]
        if self.remembered is not None and all(c in self.remembered for c in captions):
            return self.proj(torch.stack([self.remembered[c] for c in captions]))
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.freeze):
            hidden = self.encoder(**self.tokenize(captions)).last_hidden_state
        return self.proj(hidden)


# -----------------------------------------------------------------------------
# CEP (Sec. 5.1, Eq. 8)

KINDS = ("none", "uniform", "gaussian")


def cep_delta(kind, gamma, shape, generator=None, device=None, dtype=None):
    """Draw the perturbation delta of Eq. 8; d = shape[-1] (for text token states [B, L, D],
    d = D, the width of one token: our reading)."""
    scale = gamma / math.sqrt(shape[-1])
    if kind == "uniform":  # CEP-U: U(-gamma/sqrt(d), +gamma/sqrt(d))
        u = torch.rand(shape, generator=generator, device=device, dtype=dtype)
        return (2 * u - 1) * scale
    # CEP-G: N(0, gamma/sqrt(d) I), gamma/sqrt(d) read as the std (our reading)
    if kind == "gaussian":
        return torch.randn(shape, generator=generator, device=device, dtype=dtype) * scale
    raise ValueError(f"unknown CEP kind {kind!r}: expected 'uniform' or 'gaussian'")


def embedding_dropout_mask(p, shape, generator=None, device=None):
    """Table 6's alternative perturbation: dropout with probability p on the condition embedding,
    in training only, as a mask (0 or 1 / (1 - p), nn.Dropout's scaling) drawn for every sample
    at every step like delta; elementwise, the null condition included (our reading: the paper
    says only 'dropout 0.1 on the class embedding')."""
    keep = torch.rand(shape, generator=generator, device=device) >= p
    return keep.float() / (1 - p)


# -----------------------------------------------------------------------------
# the denoiser of Eq. 8

class Denoiser(torch.nn.Module):
    """eps_theta(x_t, t, c_theta(y) + delta): a condition embedder (ClassEmbedder or
    TextEmbedder) and a U-Net (unet.UNet) whose context width is the embedder's. Building one
    from a run's config or a checkpoint: support/checkpoints.py."""

    def __init__(self, embedder, unet):
        super().__init__()
        self.embedder, self.unet = embedder, unet
        self.context_shape = (embedder.tokens, unet.config.context_dim)  # [L, D] per condition

    def forward(self, x_t, t, conditions, delta=None, mask=None):
        """Eq. 8. delta [B, *context_shape] is CEP's perturbation (cep.cep_delta), given during
        training only; None at sampling and without CEP. mask: Table 6's embedding dropout
        (embedding_dropout_mask), training only, else None."""
        context = self.embedder(conditions)  # c_theta(y): [B, L, D]
        if mask is not None:
            context = context * mask
        if delta is not None:
            context = context + delta
        return self.unet(x_t, t, context)

    def null_conditions(self, batch):
        """`batch` null conditions: the null class (labels) or the empty caption (text)."""
        return self.embedder.null_condition(batch)

    def drop_conditions(self, conditions, drop):
        """Condition dropout for classifier-free guidance: the null condition where drop (bool
        [B]) is set. Labels are int64 [B]; captions a list of B strings."""
        if isinstance(conditions, list):
            return [self.embedder.null_condition(1)[0] if d else c
                    for d, c in zip(drop.tolist(), conditions)]
        return torch.where(drop, self.embedder.null_label, conditions)
