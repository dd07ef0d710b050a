"""Noise schedules and timestep spacings: bit-for-bit against diffusers' PyTorch schedulers."""
import dataclasses

import numpy as np
import pytest

from amg_jax import schedules
from amg_jax.schedules import Schedule

SCHEDULES = [
    Schedule("linear"),
    Schedule("scaled_linear", beta_start=0.00085, beta_end=0.012),
    Schedule("squaredcos_cap_v2"),
    Schedule("linear", num_train_timesteps=37, beta_start=3e-4, beta_end=0.05),
]


def test_schedule_is_a_frozen_hashable_config():
    s = Schedule()
    assert (s.beta_schedule, s.num_train_timesteps, s.beta_start, s.beta_end) == ("linear", 1000, 1e-4, 0.02)
    assert hash(s) == hash(Schedule()) and s == Schedule()
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.beta_end = 0.1


def test_cosine_is_an_alias_of_squaredcos_cap_v2():
    assert Schedule("cosine") == Schedule("squaredcos_cap_v2")
    assert Schedule("cosine").beta_schedule == "squaredcos_cap_v2"
    np.testing.assert_array_equal(Schedule("cosine").betas(), schedules.betas_for_alpha_bar(1000))


@pytest.mark.parametrize("kwargs, field", [
    (dict(beta_schedule="sigmoid"), "beta_schedule"),
    (dict(num_train_timesteps=1), "num_train_timesteps"),
    (dict(beta_start=0.03, beta_end=0.02), "beta_start"),
    (dict(beta_end=1.5), "beta_end"),
])
def test_bad_schedule_names_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        Schedule(**kwargs)


def test_unknown_schedule_lists_the_choices():
    with pytest.raises(ValueError, match="scaled_linear"):
        Schedule("sigmoid")


@pytest.mark.parametrize("s", SCHEDULES, ids=lambda s: f"{s.beta_schedule}-{s.num_train_timesteps}")
def test_arrays_are_float32_and_sane(s):
    betas, ab = s.betas(), s.alphas_cumprod()
    assert betas.dtype == ab.dtype == np.float32
    assert betas.shape == ab.shape == (s.num_train_timesteps,)
    assert np.all(betas > 0) and np.all(betas <= 0.999)
    assert np.all(np.diff(ab) < 0) and 0 < ab[-1] < ab[0] < 1


@pytest.mark.torch
@pytest.mark.parametrize("s", SCHEDULES, ids=lambda s: f"{s.beta_schedule}-{s.num_train_timesteps}")
def test_betas_and_alphas_cumprod_match_diffusers_bit_for_bit(s):
    from diffusers import DDIMScheduler, DPMSolverMultistepScheduler

    # bit for bit by design (the module reproduces torch's CPU float32 arithmetic, not an
    # approximation of it): any difference is a parity bug, not round-off to allow for
    for cls in (DDIMScheduler, DPMSolverMultistepScheduler):
        ref = cls(num_train_timesteps=s.num_train_timesteps, beta_schedule=s.beta_schedule,
                  beta_start=s.beta_start, beta_end=s.beta_end)
        np.testing.assert_array_equal(s.betas(), ref.betas.numpy())
        np.testing.assert_array_equal(s.alphas_cumprod(), ref.alphas_cumprod.numpy())


@pytest.mark.torch
def test_torch_linspace_emulation_is_exact():
    import torch

    # bit for bit by design, as above: the emulation reproduces torch's float32 CPU linspace
    for steps in [2, 3, 7, 16, 33, 100, 1000, 1001]:
        for a, b in [(1e-4, 0.02), (0.00085 ** 0.5, 0.012 ** 0.5), (0.5, 0.5), (-1.0, 3.0)]:
            np.testing.assert_array_equal(schedules.torch_linspace_f32(a, b, steps),
                                          torch.linspace(a, b, steps, dtype=torch.float32).numpy())


# ------------------------------------------------------------------ spacings


def test_spacing_examples():
    np.testing.assert_array_equal(schedules.leading(1000, 4), [750, 500, 250, 0])
    np.testing.assert_array_equal(schedules.leading(1000, 4, steps_offset=1), [751, 501, 251, 1])
    np.testing.assert_array_equal(schedules.trailing(1000, 4), [999, 749, 499, 249])
    np.testing.assert_array_equal(schedules.linspace(1000, 4), [999, 666, 333, 0])
    np.testing.assert_array_equal(schedules.dpm_solver_timesteps("leading", 1000, 4), [800, 600, 400, 200])
    np.testing.assert_array_equal(schedules.dpm_solver_timesteps("linspace", 1000, 4), [999, 749, 500, 250])
    np.testing.assert_array_equal(schedules.dpm_solver_timesteps("trailing", 1000, 4), [999, 749, 499, 249])


def test_unknown_spacing_names_the_field():
    with pytest.raises(ValueError, match="spacing.*'karras'.*leading"):
        schedules.timesteps("karras", 1000, 10)
    with pytest.raises(ValueError, match="spacing"):
        schedules.dpm_solver_timesteps("karras", 1000, 10)


@pytest.mark.parametrize("spacing", schedules.SPACINGS)
@pytest.mark.parametrize("num_steps", [1, 3, 10, 50, 61, 250, 1000])
def test_spacings_are_descending_in_range_and_of_length_n(spacing, num_steps):
    fns = [schedules.timesteps]
    if num_steps < 1000:  # DPM-Solver's N + 1 grid repeats timesteps at N = T (checked by SamplerConfig)
        fns.append(schedules.dpm_solver_timesteps)
    for fn in fns:
        ts = fn(spacing, 1000, num_steps)
        assert ts.dtype == np.int64 and ts.shape == (num_steps,)
        assert np.all(np.diff(ts) < 0)
        assert 0 <= ts.min() and ts.max() <= 999


def test_trailing_drops_diffusers_spurious_minus_one():
    # diffusers' float arange yields N + 1 timesteps for N = 61 (the last one -1); we keep N.
    raw = np.round(np.arange(1000, 0, -1000 / 61)).astype(np.int64) - 1
    assert len(raw) == 62 and raw[-1] == -1
    np.testing.assert_array_equal(schedules.trailing(1000, 61), raw[:61])


@pytest.mark.torch
@pytest.mark.parametrize("spacing", schedules.SPACINGS)
@pytest.mark.parametrize("num_steps, offset", [(1, 0), (3, 0), (10, 0), (10, 1), (50, 1), (50, 0), (999, 0)])
def test_timesteps_match_diffusers(spacing, num_steps, offset):
    from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler

    for cls, fn in [(DDPMScheduler, schedules.timesteps), (DDIMScheduler, schedules.timesteps),
                    (DPMSolverMultistepScheduler, schedules.dpm_solver_timesteps)]:
        ref = cls(timestep_spacing=spacing, steps_offset=offset)
        ref.set_timesteps(num_steps)
        np.testing.assert_array_equal(fn(spacing, 1000, num_steps, offset), ref.timesteps.numpy(),
                                      err_msg=f"{cls.__name__} {spacing} N={num_steps} offset={offset}")
