"""Tests for diffusion.py: LDM schedule, loss, guidance (Eq. 2) and the samplers vs diffusers."""
import math

import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler

from diffusion import (alphas_cumprod, ddim_step, ddim_timesteps, ddpm_step, dpm_solver_timesteps,
                       guided_eps, ldm_linear_betas, q_sample, sample, training_loss)

ABAR = alphas_cumprod(ldm_linear_betas())
# LDM's scheduler settings as diffusers spells them (the released pipelines' scheduler config)
LDM_CONFIG = dict(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.0015,
                  beta_end=0.0195, clip_sample=False, set_alpha_to_one=False, steps_offset=1)
SHAPE = (2, 3, 4, 4)
RTOL = 1e-5  # relative error in norm
# diffusers' DPM scheduler calls np.array(tensor, copy=False) (a NumPy 2 deprecation): not ours
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")


def rel_err(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def toy_eps(x, t):
    """A fixed, deterministic, nonlinear "model" eps(x, t) (bounded, depends on t and position)."""
    phase = torch.arange(x[0].numel(), dtype=x.dtype).view(x.shape[1:]) * 0.37
    return torch.tanh(0.9 * x + 0.5 * torch.sin(0.01 * t.view(-1, 1, 1, 1).to(x.dtype) + phase))


def recording(eps_fn):
    """Wrap eps_fn so that every input x it sees is recorded (the trajectory)."""
    seen = []

    def fn(x, t):
        seen.append(x.clone())
        return eps_fn(x, t)
    return fn, seen


def gens(seeds):
    return [torch.Generator().manual_seed(s) for s in seeds]


def assert_trajectories_close(ours, ref, x_ours, x_ref):
    assert len(ours) == len(ref)
    for i, (a, b) in enumerate(zip(ours, ref)):
        assert rel_err(a, b) < RTOL, f"step {i}: rel err {rel_err(a, b):.2e}"
    assert rel_err(x_ours, x_ref) < RTOL


# ----------------------------------------------------------------------------- schedule


def test_schedule_closed_forms():
    betas = ldm_linear_betas()
    assert betas.dtype == ABAR.dtype == torch.float64 and betas.shape == (1000,)
    assert betas[0].item() == pytest.approx(0.0015, rel=1e-12)
    assert betas[-1].item() == pytest.approx(0.0195, rel=1e-12)
    assert torch.allclose(betas.sqrt().diff(), betas.sqrt().diff()[0].expand(999))  # linear in sqrt
    assert f"{ABAR[-1].item():.4g}" == "0.0001423"  # LDM's schedule: final alpha-bar 1.423e-4
    ref = DDPMScheduler(**{k: v for k, v in LDM_CONFIG.items() if k != "set_alpha_to_one"})
    assert rel_err(ABAR, ref.alphas_cumprod) < 2e-6  # diffusers computes it in float32


def test_posterior_variance_vs_diffusers():
    ref = DDPMScheduler(**{k: v for k, v in LDM_CONFIG.items() if k != "set_alpha_to_one"})
    # diffusers' float32 alpha-bar loses ~1e-5 in 1 - abar_t / abar_{t-1} near t = 0: give it ours
    ref.alphas_cumprod, ref.one = ABAR, torch.tensor(1.0, dtype=torch.float64)
    betas = ldm_linear_betas()
    x, eps, noise = torch.randn(3, *SHAPE, dtype=torch.float64)
    for t in [1, 2, 10, 500, 998, 999]:
        var = (betas[t] * (1 - ABAR[t - 1]) / (1 - ABAR[t])).item()  # beta_tilde_t
        assert var == pytest.approx(ref._get_variance(t).item(), rel=1e-10)
        # the noise term of ddpm_step is exactly sqrt(beta_tilde_t) * noise
        added = ddpm_step(eps, x, t, ABAR, noise) - ddpm_step(eps, x, t, ABAR,
                                                              torch.zeros_like(noise))
        assert torch.allclose(added, math.sqrt(var) * noise, rtol=1e-10, atol=1e-12)
    # no noise at t=0
    assert torch.equal(ddpm_step(eps, x, 0, ABAR, None), ddpm_step(eps, x, 0, ABAR, noise))


def test_q_sample_vs_diffusers():
    x0, noise = torch.randn(2, 4, 3, 8, 8, dtype=torch.float64)
    t = torch.tensor([0, 17, 500, 999])
    by_hand = ABAR[t].sqrt().view(-1, 1, 1, 1) * x0 + (1 - ABAR[t]).sqrt().view(-1, 1, 1, 1) * noise
    assert torch.allclose(q_sample(x0, t, noise, ABAR), by_hand, rtol=1e-12)
    ref = DDPMScheduler(**{k: v for k, v in LDM_CONFIG.items() if k != "set_alpha_to_one"})
    theirs = ref.add_noise(x0.float(), noise.float(), t)
    assert rel_err(q_sample(x0.float(), t, noise.float(), ABAR), theirs) < RTOL


# ----------------------------------------------------------------------------- DDPM / DDIM


def test_ddim_timesteps():
    assert ddim_timesteps(50).tolist() == list(range(981, 0, -20))
    for n in [10, 50, 250, 1000]:
        ref = DDIMScheduler(**LDM_CONFIG)
        ref.set_timesteps(n)
        assert torch.equal(ddim_timesteps(n), ref.timesteps)


def test_ddpm_trajectory_vs_diffusers():
    # steps_offset is left out: diffusers' "leading" spacing would shift all 1000 steps to 1000..1
    ref = DDPMScheduler(**{k: v for k, v in LDM_CONFIG.items() if k not in ("set_alpha_to_one",
                                                                            "steps_offset")})
    # diffusers' float32 alpha-bar makes its beta_t = 1 - abar_t / abar_{t-1} ~1e-5 off near t = 0
    # (see test_posterior_variance_vs_diffusers): give it our float64 schedule
    ref.alphas_cumprod, ref.one = ABAR, torch.tensor(1.0, dtype=torch.float64)
    x_T = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0))
    fn, ours = recording(toy_eps)
    x_ours = sample(fn, x_T, "ddpm", 1000, ABAR, generators=gens([1, 2]))

    fn, theirs = recording(toy_eps)
    x, g = x_T, gens([1, 2])
    for t in ref.timesteps:
        x = ref.step(fn(x, t.expand(len(x))), t, x, generator=g).prev_sample
    assert_trajectories_close(ours, theirs, x_ours, x)


@pytest.mark.parametrize("eta", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("n", [50, 10])
def test_ddim_trajectory_vs_diffusers(eta, n):
    ref = DDIMScheduler(**LDM_CONFIG)
    ref.set_timesteps(n)
    x_T = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0))
    fn, ours = recording(toy_eps)
    x_ours = sample(fn, x_T, "ddim", n, ABAR, eta=eta, generators=gens([3, 4]))

    fn, theirs = recording(toy_eps)
    x, g = x_T, gens([3, 4])
    for t in ref.timesteps:
        # same per-sample draw
        noise = torch.stack([torch.randn(SHAPE[1:], generator=gi) for gi in g])
        x = ref.step(fn(x, t.expand(len(x))), t, x, eta=eta, variance_noise=noise).prev_sample
    assert_trajectories_close(ours, theirs, x_ours, x)


def test_ddim_eta0_ignores_noise_and_last_step_uses_abar0():
    x, eps = torch.randn(2, *SHAPE, dtype=torch.float64)
    # last step: abar_prev = abar[0] (set_alpha_to_one=False)
    out = ddim_step(eps, x, 1, -1, ABAR, 0.0, None)
    x0 = (x - (1 - ABAR[1]).sqrt() * eps) / ABAR[1].sqrt()
    assert torch.allclose(out, ABAR[0].sqrt() * x0 + (1 - ABAR[0]).sqrt() * eps, rtol=1e-12)


# ----------------------------------------------------------------------------- DPM-Solver++ 2M


def dpm_reference():
    """diffusers' DPMSolverMultistepScheduler built from the LDM scheduler config, as the paper's
    released inference scripts do (from_config of the pipeline's scheduler)."""
    return DPMSolverMultistepScheduler.from_config(DDIMScheduler(**LDM_CONFIG).config)


def test_dpm_config_is_2m():
    cfg = dpm_reference().config
    assert (cfg.algorithm_type, cfg.solver_order, cfg.solver_type) == ("dpmsolver++", 2, "midpoint")
    assert (cfg.timestep_spacing, cfg.final_sigmas_type, cfg.lower_order_final) == ("linspace",
                                                                                    "zero", True)


@pytest.mark.parametrize("n", [1, 2, 3, 10, 20, 50])
def test_dpm_timesteps_vs_diffusers(n):
    ref = dpm_reference()
    ref.set_timesteps(n)
    assert torch.equal(dpm_solver_timesteps(n), ref.timesteps)
    if n == 50:
        assert dpm_solver_timesteps(50)[[0, 1, -1]].tolist() == [999, 979, 20]


@pytest.mark.parametrize("n", [50, 20, 10, 3, 2, 1])
def test_dpm_trajectory_vs_diffusers(n):
    ref = dpm_reference()
    ref.set_timesteps(n)
    x_T = torch.randn(SHAPE, generator=torch.Generator().manual_seed(5))
    fn, ours = recording(toy_eps)
    x_ours = sample(fn, x_T, "dpm", n, ABAR)

    fn, theirs = recording(toy_eps)
    x = x_T
    for t in ref.timesteps:
        x = ref.step(fn(x, t.expand(len(x))), t, x).prev_sample
    assert_trajectories_close(ours, theirs, x_ours, x)


def test_dpm_bad_steps():
    with pytest.raises(ValueError, match="num_steps"):
        dpm_solver_timesteps(1000)


# ----------------------------------------------------------------------------- guidance


class LinearModel(torch.nn.Module):
    """eps = w * x + mean(context): guided_eps has a closed form; counts forward calls."""

    def __init__(self):
        super().__init__()
        self.calls, self.batches = 0, []

    def forward(self, x, t, context):
        self.calls += 1
        self.batches.append(len(x))
        return 0.7 * x + context.mean(dim=(1, 2)).view(-1, 1, 1, 1) + 0.001 * t.view(-1, 1, 1, 1)


@pytest.mark.parametrize("scale", [0.0, 1.5, 2.0, 7.5])
def test_guidance_closed_form_one_forward(scale):
    x, t = torch.randn(SHAPE), torch.tensor([3, 900])
    c, null = torch.randn(2, 5, 8), torch.randn(2, 5, 8)
    model = LinearModel()
    eps = guided_eps(model, x, t, c, null, scale)
    mc, mn = c.mean(dim=(1, 2)).view(-1, 1, 1, 1), null.mean(dim=(1, 2)).view(-1, 1, 1, 1)
    expected = 0.7 * x + 0.001 * t.view(-1, 1, 1, 1) + mn + scale * (mc - mn)  # Eq. 2
    assert torch.allclose(eps, expected, atol=1e-5)
    assert model.calls == 1 and model.batches == [2 * len(x)]


def test_guidance_scale_one_is_conditional():
    x, t = torch.randn(SHAPE), torch.tensor([3, 900])
    c, null = torch.randn(2, 5, 8), torch.randn(2, 5, 8)
    model = LinearModel()
    assert torch.equal(guided_eps(model, x, t, c, null, 1.0), LinearModel()(x, t, c))
    assert model.calls == 1 and model.batches == [len(x)]


# ----------------------------------------------------------------------------- training loss


def test_training_loss_oracle_and_ip():
    x0, noise, xi = torch.randn(3, 4, 3, 8, 8)
    t = torch.tensor([0, 250, 500, 999])
    ctx = torch.zeros(4, 1, 8)
    abar = ABAR[t].view(-1, 1, 1, 1).float()
    seen = {}

    def oracle(x_t, t_, conditions, delta):  # recovers exactly the noise that built x_t
        seen["x_t"], seen["delta"] = x_t, delta
        return (x_t - abar.sqrt() * x0) / (1 - abar).sqrt()

    assert training_loss(oracle, x0, t, noise, ctx, None, ABAR).item() < 1e-8
    # IP: x_t is built from noise + input_noise, the target stays `noise`
    input_noise = 0.1 * xi
    loss = training_loss(oracle, x0, t, noise, ctx, None, ABAR, input_noise=input_noise)
    assert torch.allclose(seen["x_t"],
                          abar.sqrt() * x0 + (1 - abar).sqrt() * (noise + input_noise), atol=1e-5)
    assert loss.item() == pytest.approx(input_noise.pow(2).mean().item(), rel=1e-3)
    # an arbitrary prediction: plain MSE against `noise`, averaged over all elements
    pred = torch.randn_like(x0)
    loss = training_loss(lambda *a: pred, x0, t, noise, ctx, None, ABAR, input_noise=input_noise)
    assert loss.item() == pytest.approx((pred - noise).pow(2).mean().item(), rel=1e-6)


# ----------------------------------------------------------------------------- sample()


@pytest.mark.parametrize("sampler,n,eta",
                         [("ddpm", 1000, 0.0), ("ddim", 20, 1.0), ("dpm", 20, 0.0)])
def test_sample_independent_of_batch(sampler, n, eta):
    x_T = torch.randn(4, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    together = sample(toy_eps, x_T, sampler, n, ABAR, eta=eta, generators=gens([10, 11, 12, 13]))
    split = torch.cat([sample(toy_eps, x_T[:2], sampler, n, ABAR, eta=eta,
                              generators=gens([10, 11])),
                       sample(toy_eps, x_T[2:], sampler, n, ABAR, eta=eta,
                              generators=gens([12, 13]))])
    assert torch.equal(together, split)
    if sampler != "dpm":  # stochastic: the seeds matter
        other = sample(toy_eps, x_T, sampler, n, ABAR, eta=eta, generators=gens([20, 21, 22, 23]))
        assert not torch.allclose(together, other)


def test_sample_bad_input():
    x_T = torch.randn(SHAPE)
    with pytest.raises(ValueError, match="ddpm runs all 1000 steps"):
        sample(toy_eps, x_T, "ddpm", 50, ABAR)
    with pytest.raises(ValueError, match="unknown sampler"):
        sample(toy_eps, x_T, "euler", 50, ABAR)
    with pytest.raises(ValueError, match="one generator per sample"):
        sample(toy_eps, x_T, "ddim", 50, ABAR, eta=1.0, generators=gens([1]))


def test_cads_schedule_closed_form():
    from diffusion import cads_weight
    t = torch.tensor([0, 500, 599, 749, 899, 999])  # t / 999 = 0, 0.5005, 0.5996, 0.7497, 0.8999, 1
    expected = ((0.9 - t.double() / 999) / 0.3).clamp(0, 1)
    torch.testing.assert_close(cads_weight(t, 1000, 0.6, 0.9), expected)
    assert cads_weight(t, 1000)[0] == 1 and cads_weight(t, 1000)[-1] == 0
    with pytest.raises(ValueError, match="tau1 < tau2"):
        cads_weight(t, 1000, 0.9, 0.6)


def test_cads_context_limits():
    from diffusion import cads_context
    g = torch.Generator().manual_seed(0)
    c, n = torch.randn(4, 1, 16, generator=g) * 3 + 1, torch.randn(4, 1, 16, generator=g)
    low, high = torch.zeros(4, dtype=torch.long), torch.full((4,), 999)
    torch.testing.assert_close(cads_context(c, low, n, 1000), c)  # gamma = 1: the clean condition
    noisy = cads_context(c, high, n, 1000, psi=0.0)  # gamma = 0, no rescaling: s * noise
    torch.testing.assert_close(noisy, 0.25 * n)
    rescaled = cads_context(c, high, n, 1000, psi=1.0)  # rescaled to c's per-sample statistics
    torch.testing.assert_close(rescaled.mean((1, 2)), c.mean((1, 2)))
    torch.testing.assert_close(rescaled.std((1, 2)), c.std((1, 2)))
    torch.testing.assert_close(rescaled,
                               (n - n.mean((1, 2), keepdim=True)) / n.std((1, 2), keepdim=True)
                               * c.std((1, 2), keepdim=True) + c.mean((1, 2), keepdim=True))
