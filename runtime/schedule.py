"""The FLUX.2-klein flow-match Euler schedule, computed in numpy exactly as diffusers 0.42 computes it.

diffusers' ``Flux2KleinPipeline`` passes ``sigmas = linspace(1, 1/steps, steps)`` and
``mu = compute_empirical_mu(target_tokens, steps)`` to ``FlowMatchEulerDiscreteScheduler.set_timesteps``.
The runtime has no torch, so the same arithmetic lives here; a test checks it against the scheduler itself.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np

from sparse_context.runtime.errors import InputError, bad_value

# Options of FlowMatchEulerDiscreteScheduler that change sigmas and that this module does not reproduce.
_UNSUPPORTED_OPTIONS = ("use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas", "invert_sigmas",
                        "stochastic_sampling")


def compute_empirical_mu(image_seq_len: int, num_steps: int) -> float:
    """diffusers' ``compute_empirical_mu`` (pipeline_flux2): the resolution- and step-dependent time shift."""
    a1, b1 = 8.73809524e-05, 1.89833333
    a2, b2 = 0.00016927, 0.45666666
    if image_seq_len > 4300:
        return float(a2 * image_seq_len + b2)
    m_200 = a2 * image_seq_len + b2
    m_10 = a1 * image_seq_len + b1
    a = (m_200 - m_10) / 190.0
    b = m_200 - 200.0 * a
    return float(a * num_steps + b)


@dataclass(frozen=True)
class FlowMatchSchedule:
    """Sigmas (steps + 1, ending at 0) and the timesteps fed to the transformer (sigma * 1000, divided by 1000
    again by the pipeline: the model sees ``timesteps / 1000``)."""

    sigmas: np.ndarray  # (steps + 1,) float32
    timesteps: np.ndarray  # (steps,) float32
    num_train_timesteps: int = 1000

    @property
    def num_steps(self) -> int:
        return int(self.timesteps.shape[0])

    def model_timestep(self, step: int) -> np.float32:
        """The value diffusers passes as ``timestep`` to the transformer at ``step`` (float32 t / 1000)."""
        return np.float32(self.timesteps[step]) / np.float32(self.num_train_timesteps)

    def step_delta(self, step: int) -> np.float32:
        """``sigma_next - sigma`` in float32, the Euler step size of ``FlowMatchEulerDiscreteScheduler.step``."""
        return np.float32(self.sigmas[step + 1] - self.sigmas[step])


def _time_shift(shift_type: str, mu: float, t: np.ndarray) -> np.ndarray:
    if shift_type == "exponential":
        return math.exp(mu) / (math.exp(mu) + (1.0 / t - 1.0) ** 1.0)
    if shift_type == "linear":
        return mu / (mu + (1.0 / t - 1.0) ** 1.0)
    raise InputError(bad_value("scheduler time_shift_type", shift_type, "'exponential' or 'linear'"))


def flow_match_schedule(
    num_steps: int,
    image_seq_len: int,
    scheduler_config: Mapping[str, Any] | None = None,
    sigmas: list[float] | None = None,
) -> FlowMatchSchedule:
    """The schedule ``Flux2KleinPipeline`` uses for ``num_steps`` steps and ``image_seq_len`` target tokens.

    ``scheduler_config`` is the model folder's ``scheduler/scheduler_config.json`` (defaults: diffusers'
    FlowMatchEulerDiscreteScheduler defaults).
    """
    if not isinstance(num_steps, (int, np.integer)) or num_steps < 1:
        raise InputError(bad_value("number of denoising steps", num_steps, "an integer >= 1", "--steps"))
    config = dict(scheduler_config or {})
    for option in _UNSUPPORTED_OPTIONS:
        if config.get(option):
            raise InputError(bad_value(f"scheduler option {option}", config[option], "false (not reproduced here)"))
    num_train = int(config.get("num_train_timesteps", 1000))
    shift = float(config.get("shift", 1.0))

    if sigmas is None:
        sigma_values = np.linspace(1.0, 1.0 / num_steps, num_steps)
    else:
        if len(sigmas) != num_steps:
            raise InputError(bad_value("custom sigmas", f"{len(sigmas)} values", f"{num_steps} (one per step)"))
        sigma_values = np.asarray(sigmas)
    sigma_values = sigma_values.astype(np.float32)

    if config.get("use_dynamic_shifting", False):
        mu = compute_empirical_mu(image_seq_len, num_steps)
        sigma_values = _time_shift(config.get("time_shift_type", "exponential"), mu, sigma_values)
    else:
        sigma_values = shift * sigma_values / (1 + (shift - 1) * sigma_values)

    shift_terminal = config.get("shift_terminal")
    if shift_terminal:
        one_minus = 1 - sigma_values
        scale = one_minus[-1] / (1 - shift_terminal)
        sigma_values = 1 - (one_minus / scale)

    sigma_values = np.asarray(sigma_values, dtype=np.float32)  # diffusers: torch.from_numpy(...).to(float32)
    timesteps = sigma_values * np.float32(num_train)
    all_sigmas = np.concatenate([sigma_values, np.zeros(1, dtype=np.float32)])
    return FlowMatchSchedule(sigmas=all_sigmas, timesteps=timesteps.astype(np.float32), num_train_timesteps=num_train)


def euler_step(latents: np.ndarray, velocity: np.ndarray, delta: float) -> np.ndarray:
    """``FlowMatchEulerDiscreteScheduler.step`` on numpy arrays, rounding as diffusers does.

    diffusers upcasts the sample to float32 and computes ``sample + dt * model_output`` with ``dt`` a 0-d float32
    tensor: torch keeps the product in the velocity's dtype (``dt`` is rounded to it first), the sum is float32,
    and the result is cast back to the velocity's dtype. Bit-equal to diffusers on CPU for float16 and float32.
    """
    velocity = np.asarray(velocity)
    dtype = velocity.dtype
    product = dtype.type(np.float32(delta)) * velocity  # (1, N, C) in the velocity's dtype
    return (np.asarray(latents, np.float32) + product.astype(np.float32)).astype(dtype)
