"""Diffusion process of LDM-4 (Rombach et al. 2022) as the paper trains and samples it.

Noise schedule, forward noising q(x_t | x_0), the epsilon-prediction loss (with the IP baseline of
Table 1), classifier-free guidance (Eq. 2) and three samplers: DPM-Solver++ 2M (the paper's
default, 50 steps, as diffusers' DPMSolverMultistepScheduler), DDIM (LDM's check, App. C) and
plain DDPM ancestral sampling. The schedule is float64; step coefficients are float64 Python
numbers applied to tensors in the sample's own dtype.
"""
import math

import torch
import torch.nn.functional as F
from tqdm import tqdm

# ----------------------------------------------------------------------------- noise schedule


def ldm_linear_betas(num_steps=1000, beta_start=0.0015, beta_end=0.0195):
    """LDM's "linear" schedule (diffusers: "scaled_linear"): linear in sqrt(beta) (App. B.3)."""
    return torch.linspace(beta_start ** 0.5, beta_end ** 0.5, num_steps, dtype=torch.float64) ** 2


def alphas_cumprod(betas):
    """alpha-bar_t = prod_{s<=t} (1 - beta_s); 1.423e-4 at t = 999 for the LDM schedule."""
    return torch.cumprod(1.0 - betas.double(), dim=0)


def _abar(alphas_cumprod, t):
    """alpha-bar at an integer time as a Python float; t = -1 means "before t = 0" (alpha-bar 1)."""
    return 1.0 if t < 0 else alphas_cumprod[t].item()


# ----------------------------------------------------------------------------- training


def q_sample(x0, t, noise, alphas_cumprod):
    """x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) noise, t: int64 [B] (DDPM Eq. 4)."""
    abar = alphas_cumprod.to(x0.device)[t].view(-1, *([1] * (x0.dim() - 1)))  # float64 [B,1,1,1]
    return abar.sqrt().to(x0.dtype) * x0 + (1.0 - abar).sqrt().to(x0.dtype) * noise


def training_loss(model, x0, t, noise, conditions, delta, alphas_cumprod, input_noise=None,
                  embedding_mask=None):
    """Eq. 8: || noise - eps_theta(x_t, t, c_theta(y) + delta) ||^2, averaged over all elements.

    model(x_t, t, y, delta) is the denoiser (cep.Denoiser): it embeds the conditions y and adds
    CEP's delta (None: no CEP). The caller draws t, noise and delta. IP baseline (Ning et al.
    2023, Table 1): x_t is built from noise + input_noise (input_noise = lambda * xi) while the
    regression target stays `noise`. embedding_mask: Table 6's dropout on c_theta(y) (None: off).
    """
    x_t = q_sample(x0, t, noise if input_noise is None else noise + input_noise, alphas_cumprod)
    if embedding_mask is None:
        eps = model(x_t, t, conditions, delta)
    else:
        eps = model(x_t, t, conditions, delta, embedding_mask)
    return F.mse_loss(eps.float(), noise.float())


# ----------------------------------------------------------------------------- guidance


def guided_eps(model, x, t, context, null_context, scale):
    """Classifier-free guidance, Eq. 2: eps = eps(null) + s (eps(c) - eps(null)), all channels.

    One batched forward over [cond; null]; scale 1 is the plain conditional model.
    """
    if scale == 1:
        return model(x, t, context).float()
    if null_context.shape != context.shape:
        raise ValueError(f"null_context {tuple(null_context.shape)} must match context "
                         f"{tuple(context.shape)}")
    both = model(torch.cat([x, x]), torch.cat([t, t]), torch.cat([context, null_context]))
    eps_c, eps_null = both.chunk(2)
    eps_c, eps_null = eps_c.float(), eps_null.float()  # combined in fp32, also under bf16 autocast
    return eps_null + scale * (eps_c - eps_null)


def cads_weight(t, num_train_steps, tau1=0.6, tau2=0.9):
    """CADS's annealing schedule gamma(t) (Sadat et al., ICLR 2024, Sec. 3), t/(T-1) in [0, 1]:
    1 (the clean condition) below tau1, 0 (pure noise) above tau2, linear in between."""
    if not 0 <= tau1 < tau2 <= 1:
        raise ValueError(f"CADS needs 0 <= tau1 < tau2 <= 1, got tau1={tau1}, tau2={tau2}")
    u = t.double() / (num_train_steps - 1)
    return ((tau2 - u) / (tau2 - tau1)).clamp(0, 1)


def cads_context(context, t, noise, num_train_steps, tau1=0.6, tau2=0.9, scale=0.25, psi=1.0):
    """Condition-annealed sampling (CADS, Sadat et al. 2024, Sec. 3): the inference-time
    counterpart of CEP. c_hat = sqrt(gamma(t)) c + s sqrt(1 - gamma(t)) n, n ~ N(0, I), then
    rescaled to c's per-sample mean and std and mixed back with weight psi.

    context [B, L, D], t int64 [B], noise like context (a fresh draw at every step).
    """
    gamma = cads_weight(t, num_train_steps, tau1, tau2).to(context.dtype).view(-1, 1, 1)
    noisy = gamma.sqrt() * context + scale * (1 - gamma).sqrt() * noise
    dims = tuple(range(1, context.dim()))  # statistics over one condition's elements
    rescaled = (noisy - noisy.mean(dims, keepdim=True)) / noisy.std(dims, keepdim=True) \
        * context.std(dims, keepdim=True) + context.mean(dims, keepdim=True)
    return psi * rescaled + (1 - psi) * noisy


def clip_denoised(eps_fn, alphas_cumprod):
    """eps_fn whose implied x0 = (x_t - sqrt(1 - abar) eps) / sqrt(abar) is clipped to [-1, 1], eps
    re-derived from it (as DDPM / ADM sample pixel-space models; diffusers' clip_sample). At t near
    T, 1/sqrt(abar) ~ 84 turns a small eps error into a large x0 error; clipping bounds it."""
    def clipped(x, t):
        eps = eps_fn(x, t)
        abar = alphas_cumprod.to(x.device)[t].view(-1, *([1] * (x.dim() - 1))).to(x.dtype)
        x0 = ((x - (1 - abar).sqrt() * eps) / abar.sqrt()).clamp(-1, 1)
        return (x - abar.sqrt() * x0) / (1 - abar).sqrt()
    return clipped


# ----------------------------------------------------------------------------- DDPM


def ddpm_step(eps, x_t, t, alphas_cumprod, noise):
    """Ancestral step x_t -> x_{t-1} (DDPM Eq. 6-7), t an int in [0, T-1].

    Posterior variance beta_tilde_t = beta_t (1 - abar_{t-1}) / (1 - abar_t) (diffusers
    "fixed_small"); no noise is added at t = 0 (`noise` may then be None).
    """
    abar, abar_prev = _abar(alphas_cumprod, t), _abar(alphas_cumprod, t - 1)
    beta = 1.0 - abar / abar_prev
    x0 = (x_t - math.sqrt(1.0 - abar) * eps) / math.sqrt(abar)
    mean = (math.sqrt(abar_prev) * beta / (1.0 - abar)) * x0 \
        + (math.sqrt(1.0 - beta) * (1.0 - abar_prev) / (1.0 - abar)) * x_t
    if t == 0:
        return mean
    return mean + math.sqrt(beta * (1.0 - abar_prev) / (1.0 - abar)) * noise


# ----------------------------------------------------------------------------- DDIM


def ddim_timesteps(num_steps, num_train_steps=1000):
    """LDM's "uniform" DDIM spacing with offset 1, descending: 50 steps -> 981, 961, ..., 1.

    arange(n) * (T // n) + 1: LDM's arange(0, T, T // n) + 1 when n divides T (and always
    diffusers' "leading" spacing with steps_offset=1), exactly n steps otherwise.
    """
    if not 1 <= num_steps <= num_train_steps:
        raise ValueError(f"num_steps must be in [1, {num_train_steps}], got {num_steps}")
    return (torch.arange(num_steps, dtype=torch.int64) * (num_train_steps // num_steps) + 1).flip(0)


def ddim_step(eps, x_t, t, t_prev, alphas_cumprod, eta, noise):
    """DDIM step x_t -> x_{t_prev} (Song et al. 2021, Eq. 12), t_prev = -1 after the last step.

    LDM / set_alpha_to_one=False: the last step (t_prev = -1) uses abar_prev = abar[0], not 1.
    eta = 0 is deterministic (`noise` may be None); eta = 1 has DDPM's posterior variance.
    """
    abar = _abar(alphas_cumprod, t)
    abar_prev = _abar(alphas_cumprod, max(t_prev, 0))
    sigma = eta * math.sqrt((1.0 - abar_prev) / (1.0 - abar) * (1.0 - abar / abar_prev))
    x0 = (x_t - math.sqrt(1.0 - abar) * eps) / math.sqrt(abar)
    x_prev = math.sqrt(abar_prev) * x0 + math.sqrt(1.0 - abar_prev - sigma ** 2) * eps
    if sigma > 0:
        x_prev = x_prev + sigma * noise
    return x_prev


# ----------------------------------------------------------------------------- DPM-Solver++ 2M


def dpm_solver_timesteps(num_steps, num_train_steps=1000):
    """diffusers' DPMSolverMultistepScheduler "linspace" spacing (its default; steps_offset is
    ignored there): round(linspace(0, T-1, n+1)) descending, the last entry (0) dropped.
    50 steps -> 999, 979, 959, ..., 20."""
    if not 1 <= num_steps < num_train_steps:  # T steps would repeat a timestep after rounding
        raise ValueError(f"num_steps must be in [1, {num_train_steps - 1}], got {num_steps}")
    t = torch.linspace(0, num_train_steps - 1, num_steps + 1, dtype=torch.float64).round()
    return t.flip(0)[:-1].to(torch.int64)


def _dpm_lambda(abar):
    """Half log-SNR lambda = log(alpha / sigma) with alpha = sqrt(abar), sigma = sqrt(1 - abar)."""
    return 0.5 * (math.log(abar) - math.log1p(-abar))


def dpm_solver_step(eps, x_t, t, t_next, alphas_cumprod, prev=None):
    """One DPM-Solver++ (2M) step x_t -> x_{t_next} (Lu et al. 2022, Alg. 2, "midpoint").

    Data prediction x0 = (x_t - sigma_t eps) / alpha_t. `prev` = (x0, t) of the previous step, or
    None on the first step (first order = DDIM). t_next = -1 is the final step to sigma = 0
    (diffusers final_sigmas_type="zero"): it is first order and returns x0 itself.
    Returns (x_{t_next}, (x0, t)), the second item to be passed as `prev` to the next step.
    """
    abar = _abar(alphas_cumprod, t)
    x0 = (x_t - math.sqrt(1.0 - abar) * eps) / math.sqrt(abar)
    if t_next < 0:  # diffusers: lower_order_final -> first order; with sigma_next = 0 that is x0
        return x0, (x0, t)
    abar_next = _abar(alphas_cumprod, t_next)
    h = _dpm_lambda(abar_next) - _dpm_lambda(abar)
    # first-order part: x_next = (sigma_next / sigma_t) x_t - alpha_next (e^{-h} - 1) D0
    x_next = math.sqrt((1.0 - abar_next) / (1.0 - abar)) * x_t \
        - math.sqrt(abar_next) * math.expm1(-h) * x0
    if prev is not None:  # second-order multistep correction with D1 = (x0 - x0_prev) / r0
        x0_prev, t_prev = prev
        r0 = (_dpm_lambda(abar) - _dpm_lambda(_abar(alphas_cumprod, t_prev))) / h
        x_next = x_next - 0.5 * math.sqrt(abar_next) * math.expm1(-h) * (x0 - x0_prev) / r0
    return x_next, (x0, t)


# ----------------------------------------------------------------------------- sampling loop


def _randn_per_sample(x, generators):
    """Standard normal noise like x, sample i drawn from generators[i] (batch-split invariant)."""
    if generators is None:
        return torch.randn_like(x)
    return torch.stack([torch.randn(x.shape[1:], generator=g, device=g.device, dtype=x.dtype)
                        for g in generators]).to(x.device)


@torch.no_grad()
def sample(eps_fn, x_T, sampler, num_steps, alphas_cumprod, eta=0.0, generators=None,
           progress=False, timesteps=None):
    """Run the reverse process from x_T ~ N(0, I) with eps_fn(x, t[B]) -> eps (guidance applied).

    sampler: "dpm" (DPM-Solver++ 2M, the paper's default with 50 steps), "ddim" (eta >= 0) or
    "ddpm" (ancestral, all T steps). Noise for stochastic samplers comes from generators[i] for
    sample i (one torch.Generator per sample), so a sample does not depend on its batch.
    timesteps: the descending timesteps to visit instead of the sampler's own spacing (a released
    model's stored spacing, released.timesteps). DDIM steps from t to t - T // num_steps, as
    diffusers' DDIMScheduler does whatever the spacing (the next timestep for LDM's spacing).
    """
    T = len(alphas_cumprod)
    if generators is not None and len(generators) != len(x_T):
        raise ValueError(f"need one generator per sample: {len(generators)} for a batch of "
                         f"{len(x_T)}")
    if timesteps is not None and sampler == "ddpm":
        raise ValueError("ddpm visits every timestep: timesteps apply to dpm and ddim")
    if timesteps is not None:
        timesteps = torch.as_tensor(timesteps)
    elif sampler == "dpm":
        timesteps = dpm_solver_timesteps(num_steps, T)
    elif sampler == "ddim":
        timesteps = ddim_timesteps(num_steps, T)
    elif sampler == "ddpm":
        if num_steps != T:
            raise ValueError(f"ddpm runs all {T} steps (got num_steps={num_steps}); use 'ddim' or "
                             "'dpm' for fewer")
        timesteps = torch.arange(T - 1, -1, -1)
    else:
        raise ValueError(f"unknown sampler {sampler!r}: choose 'dpm', 'ddim' or 'ddpm'")

    timesteps = timesteps.tolist()
    x, prev = x_T, None
    for i, t in enumerate(tqdm(timesteps, desc=sampler, disable=not progress)):
        t_next = timesteps[i + 1] if i + 1 < len(timesteps) else -1
        if sampler == "ddim":
            t_next = t - T // num_steps  # < 0 after the last step
        eps = eps_fn(x, torch.full((len(x),), t, dtype=torch.int64, device=x.device))
        if sampler == "dpm":
            x, prev = dpm_solver_step(eps, x, t, t_next, alphas_cumprod, prev)
        elif sampler == "ddim":
            noise = _randn_per_sample(x, generators) if eta > 0 else None
            x = ddim_step(eps, x, t, t_next, alphas_cumprod, eta, noise)
        else:
            noise = _randn_per_sample(x, generators) if t > 0 else None
            x = ddpm_step(eps, x, t, alphas_cumprod, noise)
    return x
