"""unet.py: exact parameter counts (Table 3), and agreement with diffusers' UNet2DConditionModel
(the format of the paper's released models) under the same random weights."""
import dataclasses
import time

import pytest
import torch
from diffusers import UNet2DConditionModel

from unet import PRESETS, UNet

from support import system, weights


def num_params(model):
    return sum(p.numel() for p in model.parameters())


def random_pair(config, seed=0):
    """(ours, diffusers') with the same random weights; ours is filled only by the key map."""
    with torch.device("meta"):
        theirs = UNet2DConditionModel(**weights.unet_diffusers_config(config))
        ours = UNet(config)
    theirs = system.randomise_(theirs.to_empty(device="cpu"), seed).eval()
    ours = ours.to_empty(device="cpu").eval()
    assert not list(theirs.buffers()) and not list(ours.buffers())  # nothing left uninitialised
    weights.load_unet_diffusers(ours, theirs.state_dict())
    return ours, theirs


def assert_close(a, b, rtol=1e-4):
    err = (a - b).abs().max() / b.abs().max()
    assert err < rtol, f"max abs difference / max abs value = {err:.2e}"


def test_param_counts():
    # Table 3 / App. B.3: 400,920,579 (LDM cin256-v2); LDM text2img256: 403,623,939.
    expected = {"ldm4-in1k": 400_920_579, "ldm4-text": 403_623_939}
    for name, config in PRESETS.items():
        with torch.device("meta"):
            ours = UNet(config)
            theirs = UNet2DConditionModel(**weights.unet_diffusers_config(config))
        assert num_params(ours) == num_params(theirs) == expected.get(name, num_params(ours))
        assert set(weights.unet_key_map(config).values()) == set(theirs.state_dict())


SMALL = {
    "tiny": PRESETS["tiny"],
    "tiny-2heads-depth2": dataclasses.replace(PRESETS["tiny"], head_channels=32,
                                              transformer_depth=2),
    "tiny-attention-at-16": dataclasses.replace(PRESETS["tiny"], attention_resolutions=(16,)),
    "digits": PRESETS["digits"],
}


@pytest.mark.parametrize("name", SMALL)
def test_matches_diffusers_small(name):
    c = SMALL[name]
    ours, theirs = random_pair(c)
    assert num_params(ours) == num_params(theirs)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, c.in_channels, c.sample_size, c.sample_size, generator=gen)
    context = torch.randn(2, 3, c.context_dim, generator=gen)
    with torch.no_grad():
        for t in (torch.tensor([0, 999]), torch.tensor([0.5, 250.25])):
            ref = theirs(x, t, encoder_hidden_states=context).sample
            out = ours(x, t, context)
            assert out.shape == x.shape
            assert_close(out, ref)


def test_matches_diffusers_ldm4_in1k():
    c = PRESETS["ldm4-in1k"]
    start = time.time()
    ours, theirs = random_pair(c)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(1, 3, 64, 64, generator=gen)
    context = torch.randn(1, 1, 512, generator=gen)  # one class token
    t = torch.tensor([437])
    with torch.no_grad():
        ref = theirs(x, t, encoder_hidden_states=context).sample
        del theirs
        out = ours(x, t, context)
    assert_close(out, ref)
    print(f"full-size oracle: {time.time() - start:.1f} s")


def test_head_channels_is_a_different_model():
    # Same parameter count (every head layout has inner width = channel width) ...
    with torch.device("meta"):
        wide = dataclasses.replace(PRESETS["ldm4-in1k"], head_channels=64)
        assert num_params(UNet(wide)) == num_params(UNet(PRESETS["ldm4-in1k"]))
    # ... and the same state-dict keys, but a different function of the same weights.
    one_head = system.randomise_(UNet(PRESETS["tiny"]), seed=0).eval()
    two_heads = UNet(dataclasses.replace(PRESETS["tiny"], head_channels=32)).eval()
    two_heads.load_state_dict(one_head.state_dict())
    x, context, t = torch.randn(2, 3, 16, 16), torch.randn(2, 3, 32), torch.tensor([10, 900])
    with torch.no_grad():
        assert (one_head(x, t, context) - two_heads(x, t, context)).abs().max() > 1e-3


def test_fresh_model_predicts_zero():
    # LDM zero-initialises the output conv: an untrained U-Net predicts eps = 0.
    model = UNet(PRESETS["tiny"])
    out = model(torch.randn(2, 3, 16, 16), torch.tensor([1, 2]), torch.randn(2, 1, 32))
    assert out.shape == (2, 3, 16, 16) and not out.any()


def test_clear_errors():
    c = PRESETS["tiny"]
    model = UNet(c)
    with pytest.raises(ValueError, match="context must be"):
        model(torch.randn(1, 3, 16, 16), torch.tensor([1]), torch.randn(1, 1, 64))
    with pytest.raises(ValueError, match="multiples of 2"):
        model(torch.randn(1, 3, 15, 15), torch.tensor([1]), torch.randn(1, 1, 32))
    with pytest.raises(ValueError, match="not feature-map sizes"):
        dataclasses.replace(c, attention_resolutions=(4,))
    state = {k: torch.zeros(1) for k in weights.unet_key_map(c).values()}
    del state["conv_in.weight"]
    state["class_embedding.weight"] = torch.zeros(1)
    with pytest.raises(ValueError, match=r"missing \(1\): \['conv_in.weight'\]") as err:
        weights.load_unet_diffusers(model, state)
    assert "class_embedding.weight" in str(err.value)
