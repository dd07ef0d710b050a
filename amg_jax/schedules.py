"""Noise schedules and timestep spacings, computed exactly as diffusers computes them.

A ``Schedule`` is the *training* noise schedule of a model (a frozen, hashable config,
so it can sit in the static part of a ``Denoiser`` pytree). Its arrays are numpy
float32, reproducing diffusers' PyTorch float32 arithmetic:

- ``linear``:            betas = linspace(beta_start, beta_end, T) in float32,
- ``scaled_linear``:     betas = linspace(sqrt(beta_start), sqrt(beta_end), T) ** 2 (Stable Diffusion),
- ``squaredcos_cap_v2``: the cosine schedule of Nichol & Dhariwal, betas capped at 0.999
                         (``cosine`` is accepted as an alias).

The spacing functions pick the ``num_steps`` training timesteps (descending, int64) a
sampler visits, with the names of Lin et al. 2023, Table 2 ("leading", "trailing",
"linspace"). diffusers spaces DDPM/DDIM and DPM-Solver differently: ``timesteps`` is
the DDPM/DDIM rule, ``dpm_solver_timesteps`` the DPMSolverMultistepScheduler rule
(``num_steps + 1`` grid points, the last one dropped).
"""
from __future__ import annotations

import dataclasses
import math

import numpy as np

BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
BETA_SCHEDULE_ALIASES = {"cosine": "squaredcos_cap_v2"}
SPACINGS = ("leading", "trailing", "linspace")


@dataclasses.dataclass(frozen=True)
class Schedule:
    """Training noise schedule (diffusers' ``beta_schedule`` / ``beta_start`` / ``beta_end``).

    ``beta_schedule`` aliases are resolved on construction, so ``Schedule("cosine") ==
    Schedule("squaredcos_cap_v2")`` (one jit compilation for both). Raises ValueError
    naming the field for an unknown schedule or out-of-range values.
    """

    beta_schedule: str = "linear"
    num_train_timesteps: int = 1000
    beta_start: float = 0.0001
    beta_end: float = 0.02

    def __post_init__(self):
        name = BETA_SCHEDULE_ALIASES.get(self.beta_schedule, self.beta_schedule)
        if name not in BETA_SCHEDULES:
            raise ValueError(
                f"Schedule.beta_schedule: unknown schedule {self.beta_schedule!r}; choose one of "
                f"{list(BETA_SCHEDULES) + list(BETA_SCHEDULE_ALIASES)}")
        object.__setattr__(self, "beta_schedule", name)
        if not isinstance(self.num_train_timesteps, (int, np.integer)) or self.num_train_timesteps < 2:
            raise ValueError(
                f"Schedule.num_train_timesteps must be an integer >= 2, got {self.num_train_timesteps!r}")
        if name != "squaredcos_cap_v2" and not 0.0 < self.beta_start <= self.beta_end < 1.0:
            raise ValueError(
                f"Schedule.beta_start / beta_end must satisfy 0 < beta_start <= beta_end < 1, got "
                f"beta_start={self.beta_start!r}, beta_end={self.beta_end!r}")

    def betas(self) -> np.ndarray:
        """[T] float32 betas, as diffusers' schedulers compute them."""
        t = self.num_train_timesteps
        if self.beta_schedule == "linear":
            return torch_linspace_f32(self.beta_start, self.beta_end, t)
        if self.beta_schedule == "scaled_linear":
            b = torch_linspace_f32(self.beta_start ** 0.5, self.beta_end ** 0.5, t)
            return b * b
        return betas_for_alpha_bar(t)

    def alphas_cumprod(self) -> np.ndarray:
        """[T] float32 alpha-bar_t = prod_{s <= t} (1 - beta_s)."""
        return cumprod_f32(np.float32(1.0) - self.betas())


def torch_linspace_f32(start: float, end: float, steps: int) -> np.ndarray:
    """``torch.linspace(start, end, steps, dtype=torch.float32)`` bit for bit: [steps] float32.

    torch (CPU) works in float32 from both ends with fused multiply-adds:
    ``fma(step, i, start)`` for the first half, ``end - step * (steps - 1 - i)`` (fused) for
    the second, ``step = (end - start) / (steps - 1)``. The fused ops are emulated in float64
    (the product of a float32 and a small integer is exact there).
    """
    start32, end32 = np.float32(start), np.float32(end)
    if steps == 1:
        return np.array([start32], np.float32)
    step = np.float64((end32 - start32) / np.float32(steps - 1))
    i = np.arange(steps)
    half = steps // 2
    lo = np.float64(start32) + step * i[:half]
    hi = np.float64(end32) - step * (steps - 1 - i[half:])
    return np.concatenate([lo, hi]).astype(np.float32)


def cumprod_f32(x: np.ndarray) -> np.ndarray:
    """``torch.cumprod`` of a float32 CPU tensor: accumulated in float64, each output rounded to float32."""
    return np.cumprod(np.asarray(x, np.float64)).astype(np.float32)


def betas_for_alpha_bar(num_train_timesteps: int, max_beta: float = 0.999) -> np.ndarray:
    """The cosine ("squaredcos_cap_v2") betas: [T] float32, computed in float64 as diffusers does."""

    def alpha_bar(t: float) -> float:
        return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

    n = num_train_timesteps
    betas = [min(1 - alpha_bar((i + 1) / n) / alpha_bar(i / n), max_beta) for i in range(n)]
    return np.asarray(betas, np.float32)


def check_spacing(spacing: str, field: str = "spacing") -> None:
    """Raise ValueError naming ``field`` when ``spacing`` is not a known timestep spacing."""
    if spacing not in SPACINGS:
        raise ValueError(f"{field}: unknown timestep spacing {spacing!r}; choose one of {list(SPACINGS)}")


def leading(num_train_timesteps: int, num_steps: int, steps_offset: int = 0) -> np.ndarray:
    """[N] int64: (N-1, ..., 1, 0) * (T // N) + steps_offset (diffusers' "leading")."""
    ratio = num_train_timesteps // num_steps
    return (np.arange(num_steps) * ratio)[::-1].astype(np.int64) + steps_offset


def trailing(num_train_timesteps: int, num_steps: int) -> np.ndarray:
    """[N] int64: round(T, T - T/N, ..., T/N) - 1 (diffusers' "trailing"; always ends at T/N - 1).

    For a few N (e.g. 61 with T = 1000) diffusers' float ``arange`` yields one extra
    timestep, -1, which it would then index as the *last* training step; it is dropped here.
    """
    ratio = num_train_timesteps / num_steps
    t = np.round(np.arange(num_train_timesteps, 0, -ratio)).astype(np.int64) - 1
    return t[:num_steps]


def linspace(num_train_timesteps: int, num_steps: int) -> np.ndarray:
    """[N] int64: round(linspace(0, T-1, N)) reversed (diffusers' "linspace"; ends at 0)."""
    return np.linspace(0, num_train_timesteps - 1, num_steps).round()[::-1].astype(np.int64)


def timesteps(spacing: str, num_train_timesteps: int, num_steps: int, steps_offset: int = 0) -> np.ndarray:
    """DDPMScheduler / DDIMScheduler timesteps: [N] int64, descending.

    ``steps_offset`` applies to "leading" only, as in diffusers.
    """
    check_spacing(spacing)
    if spacing == "leading":
        return leading(num_train_timesteps, num_steps, steps_offset)
    if spacing == "trailing":
        return trailing(num_train_timesteps, num_steps)
    return linspace(num_train_timesteps, num_steps)


def dpm_solver_timesteps(spacing: str, num_train_timesteps: int, num_steps: int,
                         steps_offset: int = 0) -> np.ndarray:
    """DPMSolverMultistepScheduler timesteps: [N] int64, descending.

    "leading" and "linspace" lay N + 1 points and drop the last (t = 0), so they never
    visit t = 0 and, for "leading", step by T // (N + 1); "trailing" is the DDIM rule.
    ``steps_offset`` applies to "leading" only.
    """
    check_spacing(spacing)
    if spacing == "leading":
        return leading(num_train_timesteps, num_steps + 1, steps_offset)[:-1]
    if spacing == "trailing":
        return trailing(num_train_timesteps, num_steps)
    return linspace(num_train_timesteps, num_steps + 1)[:-1]
