"""amg_jax: make diffusion models stop copying their training images.

The core contract (README, "Architecture"): a ``Denoiser`` (eps-prediction, conditions, schedule), a
guidance (``init(x_T) -> state``, ``apply(state, ctx) -> (eps_hat, state, trace)``), and one
pure ``sample`` loop (``lax.scan`` over a sampler's steps, jitted once, batched over seeds).

    import jax.numpy as jnp
    import amg_jax as amg
    bed = amg.make_testbed()
    den = amg.empirical_denoiser(bed.images, bed.labels)
    res = amg.sample(den, amg.make_guidance("dtp"), amg.SamplerConfig("ddim", num_steps=50),
                     amg.keys_from_seeds(range(8)), cond=jnp.full((8,), 3))
    res.x0, res.trace["transition"]

    det = amg.pixel_detector(amg.bank_from_testbed(bed))       # nL2 against the training set
    res = amg.sample(den, amg.make_amg(amg.make_guidance("cfg"), det, gradient="cheap", c3=1e4), ...)
    res.trace["sigma"], res.trace["gate"]                      # [8, 50] each
"""
from amg_jax import prompt_baselines
from amg_jax.evaluation import metrics
from amg_jax.data.testbed import Testbed, TestbedConfig, make_testbed
from amg_jax.guidance import (
    AMG,
    CFG,
    GUIDANCES,
    DynamicTransition,
    OppositeDynamic,
    OppositeGuidance,
    StaticTransition,
    AMGConfig,
    StepContext,
    Unguided,
    make_amg,
    make_guidance,
)
from amg_jax.data.bank import bank_from_testbed
from amg_jax.index import ReferenceBank, build_bank, load_bank, save_bank, shard_bank
from amg_jax.models import Denoiser, empirical_denoiser, fit_mixture, mixture_denoiser
from amg_jax.samplers import SAMPLERS, SampleResult, SamplerConfig, keys_from_seeds, sample, sample_loop
from amg_jax.schedules import Schedule
from amg_jax.prompt_baselines import PROMPT_BASELINES, apply_baseline
from amg_jax.sharding import make_mesh, maybe_initialize_distributed, sample_pmap, sample_sharded
from amg_jax.similarity import (Detection, PixelDetectorConfig, SSCDConfig, embedding_detector, nl2, pixel_detector,
                                sscd_detector, through_decoder)

__version__ = "0.1.0"

__all__ = [
    "AMG", "AMGConfig", "Detection", "ReferenceBank", "bank_from_testbed", "build_bank", "embedding_detector",
    "load_bank", "make_amg", "save_bank", "shard_bank",
    "CFG", "Denoiser", "DynamicTransition", "GUIDANCES", "OppositeDynamic", "OppositeGuidance",
    "PixelDetectorConfig", "SAMPLERS", "SampleResult", "SamplerConfig", "Schedule", "StaticTransition",
    "StepContext", "Testbed", "TestbedConfig", "Unguided", "empirical_denoiser", "fit_mixture",
    "keys_from_seeds", "make_guidance", "make_testbed", "metrics", "mixture_denoiser", "nl2",
    "pixel_detector", "sample", "sample_loop",
    "PROMPT_BASELINES", "SSCDConfig", "apply_baseline", "prompt_baselines", "sscd_detector", "through_decoder",
    "make_mesh", "maybe_initialize_distributed", "sample_pmap", "sample_sharded",
]
