"""AnimateLCM-SVD-xt: SVD-XT distilled into a consistency model that makes a video in about 4 steps, and its sampler.

Wang et al., "AnimateLCM: Accelerating the Animation of Personalized Diffusion Models and Adapters with Decoupled
Consistency Learning" (2024) distil SVD-XT's UNet into a consistency model (Song, Dhariwal, Chen and Sutskever,
"Consistency Models", ICML 2023): a function f(x, sigma) that maps a sample at any noise level sigma straight to a
clean one. The multistep sampler (Song et al., Algorithm 1) alternates that jump with fresh noise at the next,
lower level:

    x = sigma_0 z_0                              (sigma_0 = sigma_max)
    for i = 0 .. n-1:   x = f(x, sigma_i) + sigma_{i+1} z_{i+1}        (sigma_n = 0: the last jump adds nothing)

f keeps SVD's own EDM v-prediction parametrisation (Karras et al. 2022, sigma_data = 1), with F the UNet:

    f(x, sigma) = c_skip x + c_out F(c_in x, c_noise)
    c_skip = sd^2 / (sigma^2 + sd^2)    c_out = -sigma sd / sqrt(sigma^2 + sd^2)
    c_in = 1 / sqrt(sigma^2 + sd^2)     c_noise = ln(sigma) / 4

The levels are points of the Karras schedule sigma(r) = (sigma_max^(1/rho) + r (sigma_min^(1/rho) -
sigma_max^(1/rho)))^rho over N = 40 training points (r = k / (N - 1)); n steps take every floor(N / n)-th point
from the top. N, sigma_min 0.002, sigma_max 700, sigma_data 1 and rho 7 are the published AnimateLCM-SVD-xt
settings.

Every random number comes from `generator`, which the service sets to the request's seeded generator before each
pipeline call: diffusers' SVD pipeline calls `step()` without one, and torch's global generator would make the same
seed give different videos.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.schedulers.scheduling_utils import SchedulerMixin, SchedulerOutput
from diffusers.utils.torch_utils import randn_tensor


class AnimateLCMScheduler(SchedulerMixin, ConfigMixin):
    """Consistency-model multistep sampling for SVD's UNet; saved and loaded like any diffusers scheduler."""

    order = 1

    @register_to_config
    def __init__(self, num_train_timesteps: int = 40, sigma_min: float = 0.002, sigma_max: float = 700.0,
                 sigma_data: float = 1.0, s_noise: float = 1.0, rho: float = 7.0):
        # The first sample is sigma_max-scaled noise, its standard deviation taken as SVD's Euler scheduler does.
        self.init_noise_sigma = math.sqrt(sigma_max**2 + sigma_data**2)
        self.generator: torch.Generator | None = None
        self.set_timesteps(num_train_timesteps)

    def set_timesteps(self, num_inference_steps: int, device: str | torch.device | None = None) -> None:
        """The noise levels of an n-step run, and the UNet's timesteps (c_noise) for them."""
        points = self.config.num_train_timesteps
        if not 1 <= num_inference_steps <= points:
            raise ValueError(f"num_inference_steps must be 1 to {points} for this model, got {num_inference_steps}")
        stride = points // num_inference_steps
        ramp = np.arange(num_inference_steps) * stride / (points - 1)
        low, high = (self.config.sigma_min ** (1 / self.config.rho), self.config.sigma_max ** (1 / self.config.rho))
        sigmas = (high + ramp * (low - high)) ** self.config.rho
        self.num_inference_steps = num_inference_steps
        self.sigmas = torch.from_numpy(np.append(sigmas, 0.0)).to(torch.float32)
        self.timesteps = torch.from_numpy(np.log(sigmas) / 4).to(device=device, dtype=torch.float32)
        self._index = 0

    @property
    def step_index(self) -> int:
        return self._index

    def _levels(self) -> tuple[float, float]:
        if self._index >= self.num_inference_steps:
            raise RuntimeError("step() called more often than set_timesteps() planned")
        return float(self.sigmas[self._index]), float(self.sigmas[self._index + 1])

    def scale_model_input(self, sample: torch.Tensor, timestep=None) -> torch.Tensor:
        sigma, _ = self._levels()
        return sample / math.sqrt(sigma**2 + self.config.sigma_data**2)

    def scalings(self, sigma: float) -> tuple[float, float]:
        """(c_skip, c_out) at noise level `sigma`."""
        data = self.config.sigma_data
        return data**2 / (sigma**2 + data**2), -sigma * data / math.sqrt(sigma**2 + data**2)

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor,
             generator: torch.Generator | None = None, return_dict: bool = True):
        """Jump to the clean sample, then noise it to the next level (nothing is added after the last step)."""
        sigma, following = self._levels()
        c_skip, c_out = self.scalings(sigma)
        denoised = c_skip * sample + c_out * model_output
        if following > 0:
            noise = randn_tensor(sample.shape, generator=generator or self.generator, device=sample.device,
                                 dtype=sample.dtype)
            denoised = denoised + (self.config.s_noise * following) * noise
        self._index += 1
        return SchedulerOutput(prev_sample=denoised) if return_dict else (denoised,)

    def __len__(self) -> int:
        return self.config.num_train_timesteps


def load_unet_weights(unet, repo: str, filename: str) -> None:
    """Put the distilled weights (`svd.ANIMATELCM_WEIGHTS`) into SVD-XT's UNet; downloaded once into the
    Hugging Face cache."""
    from huggingface_hub import hf_hub_download
    from safetensors.torch import load_file

    state = load_file(hf_hub_download(repo, filename))
    unet.load_state_dict(state, strict=True)  # every key, or a clear failure: not a half-converted UNet
