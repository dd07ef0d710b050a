"""SD sampler configs: ``sd_sampler_config`` builds what diffusers' DDIM / DDPM / DPMSolverMultistepScheduler
build ``from_config`` the model's scheduler_config.json (same defaults, same timesteps, same steps), refuses
the keys amg_jax cannot honour, and two loads of one SD share compiled sampling loops.
"""
import dataclasses
import inspect
import math
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from amg_jax import samplers
from amg_jax.guidance import make_guidance
from amg_jax.models import sd_tiny
from amg_jax.models import stable_diffusion as sdm
from amg_jax.samplers import keys_from_seeds, make_sampler, sample, sampler_timesteps, step_noise
from amg_jax.schedules import Schedule

SD_V1 = dict(sd_tiny.SD_V1_SCHEDULER)
SD_V1_SCHEDULE = Schedule("scaled_linear", 1000, 0.00085, 0.012)
NAMES = ("ddim", "ddpm", "dpm++2m")
# keys of the three classes that only the training schedule / the denoiser read (``_scheduler_settings``)
SCHEDULE_KEYS = {"num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "trained_betas", "prediction_type"}
# keys read only under a setting that is refused (thresholding, flow sigmas): ignored
IGNORED_KEYS = {"dynamic_thresholding_ratio", "sample_max_value", "flow_shift", "use_dynamic_shifting",
                "time_shift_type"}


def _sd(config: dict) -> types.SimpleNamespace:
    """The two attributes ``sd_sampler_config`` reads, for the schedule ``config`` describes."""
    schedule, _ = sdm._scheduler_settings(config, "test")
    return types.SimpleNamespace(scheduler_config=config, schedule=schedule)


def _diffusers_class(name: str):
    from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler

    return {"ddim": DDIMScheduler, "ddpm": DDPMScheduler, "dpm++2m": DPMSolverMultistepScheduler}[name]


def _diffusers(name: str, config: dict, num_steps: int):
    """diffusers' own scheduler for ``name``, ``from_config(config)`` then ``set_timesteps(num_steps)``."""
    sch = _diffusers_class(name).from_config(config)
    sch.set_timesteps(num_steps)
    return sch


# ------------------------------------------------------------------ the defaults table


@pytest.mark.torch
@pytest.mark.parametrize("name", NAMES)
def test_defaults_table_is_the_diffusers_class_defaults(name):
    """SCHEDULER_DEFAULTS / SCHEDULER_FIXED hold each class's __init__ defaults, and every option of the
    class is followed, fixed, a schedule key or ignored (a new diffusers option fails here)."""
    cls = _diffusers_class(name)
    params = inspect.signature(cls.__init__).parameters
    assert sdm.SCHEDULER_CLASSES[name] == cls.__name__
    for table in (sdm.SCHEDULER_DEFAULTS[name], sdm.SCHEDULER_FIXED[name]):
        for key, value in table.items():
            assert key in params, f"{cls.__name__} has no {key}"
            assert params[key].default == value, (key, params[key].default, value)
    assert cls.from_config({}).config["timestep_spacing"] == sdm.SCHEDULER_DEFAULTS[name]["timestep_spacing"]
    known = set(sdm.SCHEDULER_DEFAULTS[name]) | set(sdm.SCHEDULER_FIXED[name]) | SCHEDULE_KEYS | IGNORED_KEYS
    assert set(params) - {"self"} <= known, set(params) - {"self"} - known
    # the training schedule's defaults are the classes' too
    assert sdm._scheduler_settings({}, "test") == (
        Schedule(params["beta_schedule"].default, params["num_train_timesteps"].default,
                 params["beta_start"].default, params["beta_end"].default), params["prediction_type"].default)
    assert params["trained_betas"].default is None


def test_dpm_solver_defaults_differ_from_ddim():
    """A config without timestep_spacing: DPM-Solver++ lays its steps by "linspace", DDIM / DDPM by "leading"."""
    config = {k: v for k, v in SD_V1.items() if k != "steps_offset"}
    sd = _sd(config)
    assert sdm.sd_sampler_config(sd, 20, "dpm++2m").spacing == "linspace"
    ddim, ddpm = sdm.sd_sampler_config(sd, 20, "ddim"), sdm.sd_sampler_config(sd, 20, "ddpm")
    assert (ddim.spacing, ddim.steps_offset, ddpm.spacing) == ("leading", 0, "leading")
    # keys of other classes are ignored, as from_config ignores them: clip_sample is not DPM-Solver's
    assert not sdm.sd_sampler_config(_sd(dict(SD_V1, clip_sample=True)), 20, "dpm++2m").clip_sample
    # a missing clip_sample takes DDIM's / DDPM's default, True
    bare = {k: v for k, v in SD_V1.items() if k != "clip_sample"}
    assert sdm.sd_sampler_config(_sd(bare), 20, "ddim").clip_sample
    assert sdm.sd_sampler_config(_sd(bare), 20, "ddpm").clip_sample


def test_sd_v14_dpm_solver_grid_without_torch():
    """SD v1.4's config, 50 steps: DPM-Solver++ from 999 to 20 (diffusers' linspace grid), DDIM 981 .. 1."""
    sd = _sd(SD_V1)
    ts = sampler_timesteps(sdm.sd_sampler_config(sd, 50, "dpm++2m"), sd.schedule)
    assert (len(ts), ts[0], ts[1], ts[-1]) == (50, 999, 979, 20)
    np.testing.assert_array_equal(sampler_timesteps(sdm.sd_sampler_config(sd, 50), sd.schedule),
                                  np.arange(981, 0, -20))


def test_overrides_and_plain_config_entry():
    cfg = sdm.sampler_config_from_scheduler(SD_V1, 20, "dpmsolver++", spacing="trailing")
    assert (cfg.name, cfg.spacing, cfg.steps_offset) == ("dpm++2m", "trailing", 1)
    assert sdm.sd_sampler_config(_sd(SD_V1), 20, eta=1.0).eta == 1.0
    with pytest.raises(ValueError, match="schedule.*not the one the scheduler config describes"):
        sdm.sampler_config_from_scheduler(SD_V1, 20, schedule=Schedule())


# ------------------------------------------------------------------ timesteps and settings = diffusers'

_SD2 = dict(SD_V1, _class_name="DDIMScheduler", prediction_type="v_prediction", timestep_spacing="leading")
VARIANTS = {
    "empty": {},
    "sd_v1": SD_V1,
    "sd_v1_no_offset": {k: v for k, v in SD_V1.items() if k != "steps_offset"},
    "sd_v1_bare": {k: SD_V1[k] for k in ("beta_schedule", "beta_start", "beta_end", "num_train_timesteps")},
    "leading": dict(SD_V1, timestep_spacing="leading"),
    "trailing": dict(SD_V1, timestep_spacing="trailing"),
    "linspace": dict(SD_V1, timestep_spacing="linspace"),
    "offset0": dict(SD_V1, steps_offset=0, timestep_spacing="leading"),
    "clip": dict(SD_V1, clip_sample=True, clip_sample_range=0.5),
    "alpha_one": dict(SD_V1, set_alpha_to_one=True),
    "v_prediction": _SD2,
    "fixed_large": dict(SD_V1, variance_type="fixed_large"),
    "sigma_min": dict(SD_V1, final_sigmas_type="sigma_min", lower_order_final=False),
    "unipc_solver_type": dict(SD_V1, solver_type="bh2", euler_at_final=True),
    "lambda_clip_no_effect": dict(SD_V1, lambda_min_clipped=-5.1),
    "linear": {"beta_schedule": "linear", "timestep_spacing": "trailing"},
}


@pytest.mark.torch
@pytest.mark.parametrize("num_steps", [10, 50])
@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("name", NAMES)
def test_timesteps_and_settings_match_diffusers_from_config(name, variant, num_steps):
    config = VARIANTS[variant]
    sd = _sd(config)
    cfg = sdm.sd_sampler_config(sd, num_steps, name)
    sch = _diffusers(name, config, num_steps)
    want = sch.timesteps.numpy()
    np.testing.assert_array_equal(sampler_timesteps(cfg, sd.schedule), want)
    np.testing.assert_array_equal(make_sampler(cfg, sd.schedule).timesteps, want)
    np.testing.assert_array_equal(sd.schedule.alphas_cumprod(), sch.alphas_cumprod.numpy())
    c = sch.config
    assert (cfg.spacing, cfg.steps_offset) == (c.timestep_spacing, c.steps_offset)
    if name in ("ddim", "ddpm"):
        assert (cfg.clip_sample, cfg.clip_range) == (c.clip_sample, c.clip_sample_range)
    else:
        assert not cfg.clip_sample
        assert (cfg.lower_order_final, cfg.final_sigmas_type) == (c.lower_order_final, c.final_sigmas_type)
        sigma_last = math.sqrt((1 - sd.schedule.alphas_cumprod()[0]) / sd.schedule.alphas_cumprod()[0])
        assert float(sch.sigmas[-1]) == pytest.approx(0.0 if cfg.final_sigmas_type == "zero" else sigma_last)
    if name == "ddim":
        assert cfg.set_alpha_to_one == c.set_alpha_to_one
        final = 1.0 if cfg.set_alpha_to_one else float(sd.schedule.alphas_cumprod()[0])
        assert float(sch.final_alpha_cumprod) == pytest.approx(final, rel=1e-7)   # the same float32 value
    if name == "ddpm":
        assert cfg.variance_type == c.variance_type


@pytest.mark.torch
def test_sd_v14_timesteps_per_sampler():
    """SD v1.4's scheduler config (PNDM, steps_offset 1, no timestep_spacing), 50 steps, per sampler."""
    sd = _sd(SD_V1)
    for name in NAMES:
        want = _diffusers(name, SD_V1, 50).timesteps.numpy()
        got = sampler_timesteps(sdm.sd_sampler_config(sd, 50, name), sd.schedule)
        np.testing.assert_array_equal(got, want)
        print(f"\n{name}: {want[:4].tolist()} ... {want[-3:].tolist()}")
    want = _diffusers("dpm++2m", SD_V1, 50).timesteps.numpy()
    assert (want[0], want[-1]) == (999, 20)
    np.testing.assert_array_equal(_diffusers("ddim", SD_V1, 50).timesteps.numpy(), np.arange(981, 0, -20))


@pytest.mark.torch
@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("num_steps, config", [(6, "sd_v1"), (20, "sd_v1"), (6, "v_prediction")])
def test_steps_match_diffusers_step_on_sd_v14(name, num_steps, config, monkeypatch):
    """Every step of our sampler from sd_sampler_config(SD v1.4) against diffusers' scheduler .step built
    from_config(SD v1.4), on random eps (DDPM's noise fed to diffusers from our per-step draws). With
    v_prediction, diffusers steps on v and ours on UNetEps's eps = sqrt(ab) v + sqrt(1 - ab) x_t."""
    import torch
    from diffusers.schedulers import scheduling_ddpm

    config = VARIANTS[config]
    sd = _sd(config)
    cfg = sdm.sd_sampler_config(sd, num_steps, name)
    smp = make_sampler(cfg, sd.schedule)
    sch = _diffusers(name, config, num_steps)
    v_pred = config.get("prediction_type") == "v_prediction"
    rng = np.random.default_rng(0)
    shape = (2, 4, 8, 8)
    x_T = rng.standard_normal(shape).astype(np.float32)
    eps = rng.standard_normal((num_steps,) + shape).astype(np.float32)
    keys = keys_from_seeds([3, 4])
    noise = {}
    monkeypatch.setattr(scheduling_ddpm, "randn_tensor", lambda *a, **k: noise["z"])
    x, state = jnp.asarray(x_T), smp.init(jnp.asarray(x_T))
    xt = torch.from_numpy(x_T)
    for i, t in enumerate(sch.timesteps):
        assert int(t) == int(smp.timesteps[i])
        e = jnp.asarray(eps[i])
        if v_pred:
            ab = float(smp.alpha_bars[i])
            e = math.sqrt(ab) * e + math.sqrt(1.0 - ab) * x
        x, state = smp.step(x, e, jnp.int32(i), keys, state)
        noise["z"] = torch.from_numpy(np.array(step_noise(keys, i, shape[1:])))
        xt = sch.step(torch.from_numpy(eps[i]), t, xt).prev_sample
        # float32 JAX vs diffusers' float32 torch per step, relative to the latents' size: margins <= 2.6%
        # over 20 steps (the same with AVX / another BLAS kernel); a wrong coefficient is off by >1e-3.
        scale = max(1.0, float(np.abs(xt.numpy()).max()))
        np.testing.assert_allclose(np.asarray(x), xt.numpy(), rtol=0, atol=2e-5 * scale, err_msg=f"step {i}")


# ------------------------------------------------------------------ refused keys


@pytest.mark.parametrize("name, key, value, message", [
    ("ddim", "timestep_spacing", "karras", r"timestep_spacing='karras' unknown timestep spacing"),
    ("dpm++2m", "timestep_spacing", None, r"timestep_spacing=None unknown"),
    ("ddim", "steps_offset", 1.5, r"steps_offset=1.5 must be an integer"),
    ("ddpm", "steps_offset", -1, r"steps_offset=-1 must be an integer >= 0"),
    ("ddim", "clip_sample", "yes", r"clip_sample='yes' must be true or false"),
    ("ddpm", "clip_sample_range", 0, r"clip_sample_range=0 must be a number > 0"),
    ("ddim", "set_alpha_to_one", None, r"set_alpha_to_one=None must be true or false"),
    ("ddim", "thresholding", True, r"thresholding=True is not supported by amg_jax's ddim sampler"),
    ("ddpm", "thresholding", True, r"thresholding=True"),
    ("dpm++2m", "thresholding", True, r"thresholding=True"),
    ("ddim", "rescale_betas_zero_snr", True, r"rescale_betas_zero_snr=True"),
    ("dpm++2m", "rescale_betas_zero_snr", True, r"rescale_betas_zero_snr=True"),
    ("ddim", "prediction_type", "sample", r"prediction_type 'sample' is not supported"),
    ("dpm++2m", "prediction_type", "flow_prediction", r"prediction_type 'flow_prediction'"),
    ("ddpm", "trained_betas", [0.1] * 1000, r"trained_betas"),
    ("ddpm", "variance_type", "learned_range", r"variance_type='learned_range' is not supported by amg_jax's ddpm"),
    ("ddpm", "variance_type", "fixed_small_log", r"variance_type='fixed_small_log'"),
    ("dpm++2m", "variance_type", "learned", r"variance_type='learned' is not supported by amg_jax's dpm\+\+2m"),
    ("dpm++2m", "algorithm_type", "sde-dpmsolver++", r"algorithm_type='sde-dpmsolver\+\+'.*dpmsolver\+\+"),
    ("dpm++2m", "algorithm_type", "dpmsolver", r"algorithm_type='dpmsolver'"),
    ("dpm++2m", "solver_order", 3, r"solver_order=3.*solver_order=2 only"),
    ("dpm++2m", "solver_type", "heun", r"solver_type='heun'"),
    ("dpm++2m", "use_karras_sigmas", True, r"use_karras_sigmas=True"),
    ("dpm++2m", "use_exponential_sigmas", True, r"use_exponential_sigmas=True"),
    ("dpm++2m", "use_beta_sigmas", True, r"use_beta_sigmas=True"),
    ("dpm++2m", "use_lu_lambdas", True, r"use_lu_lambdas=True"),
    ("dpm++2m", "use_flow_sigmas", True, r"use_flow_sigmas=True"),
    ("dpm++2m", "final_sigmas_type", "one", r"final_sigmas_type='one' is not supported"),
])
def test_unsupported_keys_are_refused_naming_the_key(name, key, value, message):
    config = dict(SD_V1, **{key: value})
    with pytest.raises(ValueError, match=message):
        sdm.sampler_config_from_scheduler(config, 20, name)


def test_refusals_that_depend_on_the_steps_and_schedule():
    # euler_at_final changes the last step only when it would be second order: sigma_min and >= 15 steps
    config = dict(SD_V1, euler_at_final=True, final_sigmas_type="sigma_min")
    assert sdm.sampler_config_from_scheduler(config, 10, "dpm++2m").final_sigmas_type == "sigma_min"
    with pytest.raises(ValueError, match="euler_at_final=True"):
        sdm.sampler_config_from_scheduler(config, 20, "dpm++2m")
    # lambda_min_clipped clips the cosine schedule's last timesteps (diffusers shortens its grid), not SD's
    cosine = {"beta_schedule": "squaredcos_cap_v2", "lambda_min_clipped": -5.1}
    with pytest.raises(ValueError, match="lambda_min_clipped=-5.1"):
        sdm.sampler_config_from_scheduler(cosine, 20, "dpm++2m")
    sdm.sampler_config_from_scheduler(dict(SD_V1, lambda_min_clipped=-5.1), 20, "dpm++2m")
    # keys of another class do not matter: DDIM has no algorithm_type, DPM-Solver no set_alpha_to_one
    sdm.sampler_config_from_scheduler(dict(SD_V1, algorithm_type="sde-dpmsolver++"), 20, "ddim")
    # steps past the schedule are refused here, before any sampling
    with pytest.raises(ValueError, match="steps_offset=1 puts timestep 1000"):
        sdm.sampler_config_from_scheduler(SD_V1, 1000, "ddim")


@pytest.mark.torch
def test_refused_keys_do_change_diffusers_timesteps_or_steps():
    """A sample of the refusals: diffusers' result really differs from the default config's."""
    base = _diffusers("dpm++2m", SD_V1, 20).timesteps.numpy()
    karras = _diffusers("dpm++2m", dict(SD_V1, use_karras_sigmas=True), 20).timesteps.numpy()
    assert not np.array_equal(base, karras)
    cosine = {"beta_schedule": "squaredcos_cap_v2"}
    clipped = _diffusers("dpm++2m", dict(cosine, lambda_min_clipped=-5.1), 20).timesteps.numpy()
    assert not np.array_equal(_diffusers("dpm++2m", cosine, 20).timesteps.numpy(), clipped)


# ------------------------------------------------------------------ two loads share compiled loops


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return sd_tiny.write_tiny_sd(tmp_path_factory.mktemp("sd") / "tiny-sd", seed=0, sample_size=8)


@pytest.mark.usefixtures("fast_compiles")
def test_two_loads_of_one_model_share_the_compiled_loop(tiny_dir):
    a, b = sdm.load_stable_diffusion(tiny_dir), sdm.load_stable_diffusion(tiny_dir)
    den_a, den_b = sdm.sd_denoiser(a), sdm.sd_denoiser(b)
    assert den_a.eps_fn == den_b.eps_fn and hash(den_a.eps_fn) == hash(den_b.eps_fn)
    assert den_a.decode == den_b.decode and hash(den_a.decode) == hash(den_b.decode)
    assert jax.tree.structure(den_a) == jax.tree.structure(den_b)

    guidance = make_guidance("cfg", scale=7.5)
    cfg = sdm.sd_sampler_config(a, 2, "ddim")
    keys = keys_from_seeds([0])
    cond = sdm.encode_prompts(a, ["a red cube"])
    before = samplers._sample_jit._cache_size()
    x_a = sample(den_a, guidance, cfg, keys, cond).x0
    assert samplers._sample_jit._cache_size() == before + 1
    x_b = sample(den_b, guidance, cfg, keys, cond).x0
    assert samplers._sample_jit._cache_size() == before + 1          # the second load reused the loop
    np.testing.assert_array_equal(np.asarray(x_a), np.asarray(x_b))   # the same compiled loop, equal params: exact

    # another dtype is another model: nothing shared
    c = sdm.load_stable_diffusion(tiny_dir, dtype="bfloat16")
    den_c = sdm.sd_denoiser(c)
    assert den_c.eps_fn != den_a.eps_fn and den_c.decode != den_a.decode
    sample(den_c, guidance, cfg, keys, cond)
    assert samplers._sample_jit._cache_size() == before + 2
    # a bundle built in memory (no weights id) has a decoder of its own, stable for that bundle
    mem = dataclasses.replace(a, vae_weights_id=())
    assert mem.vae_decoder != a.vae_decoder and mem.vae_decoder == mem.vae_decoder
    assert dataclasses.replace(a, vae_weights_id=()).vae_decoder != mem.vae_decoder
