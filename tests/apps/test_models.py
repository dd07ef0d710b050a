"""The model registry (``apps.models``): testbeds, per-model defaults, prompt baselines on the text UNet."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from amg_jax.apps import models
from amg_jax.apps.models import (baseline_conditions, build_testbed, caption_conditions, get_model, make_detector,
                                 resolve_testbed)
from amg_jax.data import testbed as tb
from amg_jax.evaluation.protocol import prepare_bench
from amg_jax.guidance import build_method
from amg_jax.models.base import WithNull


def test_testbed_names_and_auto():
    assert resolve_testbed("auto", ["unet-text"]) == "unet"
    assert resolve_testbed("auto", ["mixture"]) == "default"
    assert resolve_testbed("small", ["unet-text"]) == "small"
    assert models.testbed_config("unet").image_size == 16
    assert models.testbed_config("unet").n_specific == tb.TestbedConfig().n_specific
    with pytest.raises(ValueError, match="unknown testbed 'huge'"):
        models.testbed_config("huge")


def test_model_base_and_detector_defaults():
    from amg_jax.apps import evaluate

    assert get_model("unet-uncond").base == "none" and get_model("unet-text").base == "cfg"
    assert get_model("empirical").base == "cfg"
    assert get_model("unet-class").detector == "nl2-bank" and get_model("mixture").detector == "nl2"
    cfg = evaluate.EvalConfig(model="unet-uncond", method="amg", base="cfg")
    with pytest.raises(ValueError, match="base 'cfg' needs a condition"):
        evaluate.build_guidance(cfg, None)


@pytest.fixture(scope="module")
def text_bench():
    bed = build_testbed(resolve_testbed("auto", ["unet-text"]))
    return bed, prepare_bench(bed, 1, 2, 0, conditioning="text")


def test_token_denoiser_equals_the_caption_id_denoiser(text_bench):
    from amg_jax.models.unet import token_denoiser

    bed, bench = text_bench
    lm = get_model("unet-text").load(bed)
    tden = token_denoiser(lm.model, lm.denoiser.params)
    x = jax.random.normal(jax.random.key(0), (len(bench.cond),) + lm.denoiser.sample_shape)
    t = jnp.full((len(bench.cond),), 500, jnp.int32)
    tokens = jnp.asarray(np.asarray(lm.model.tokens)[np.asarray(bench.cond)])
    cond = {"tokens": tokens, "noise": jnp.zeros(tokens.shape + (lm.model.config.text_dim,))}
    # the same float32 UNet on the same embeddings (+ exact zeros), same batch shapes: bit-identical
    # here; atol 1e-5 (~40 ulps of |eps| ~ 1) allows another fusion. A wrong caption is off by >1e-2.
    np.testing.assert_allclose(np.asarray(tden(x, t, cond)), np.asarray(lm.denoiser(x, t, bench.cond)), atol=1e-5)
    null = tden.null_batch(2)
    np.testing.assert_allclose(np.asarray(tden(x[:2], t[:2], null)),
                               np.asarray(lm.denoiser(x[:2], t[:2], jnp.full((2,), -1))), atol=1e-5)


@pytest.mark.parametrize("baseline", ["gni", "rt", "cwr", "rna"])
def test_baseline_conditions(text_bench, baseline):
    bed, bench = text_bench
    spec = get_model("unet-text")
    den, cond = baseline_conditions(spec, bed, bench, baseline, seed=1)
    lm = spec.load(bed)
    tokens = np.asarray(lm.model.tokens)[np.asarray(bench.cond)]
    den.validate_cond(cond, len(bench.cond))
    if baseline == "gni":         # both CFG branches noised, each with its own draw (the reference)
        assert isinstance(cond, WithNull)
        null, cond = cond.null, cond.cond
        np.testing.assert_array_equal(np.asarray(null["tokens"]),
                                      np.broadcast_to(np.asarray(lm.model.null_tokens), tokens.shape))
        assert 0.05 < float(np.std(np.asarray(null["noise"]))) < 0.2
        assert not np.allclose(np.asarray(null["noise"]), np.asarray(cond["noise"]))
        np.testing.assert_array_equal(np.asarray(cond["tokens"]), tokens)
        assert 0.05 < float(np.std(np.asarray(cond["noise"]))) < 0.2
    else:
        assert (np.asarray(cond["tokens"]) != tokens).any(axis=1).all()      # every caption edited
        assert not np.asarray(cond["noise"]).any()
    again = baseline_conditions(spec, bed, bench, baseline, seed=1)[1]
    again = again.cond if isinstance(again, WithNull) else again
    np.testing.assert_array_equal(np.asarray(again["tokens"]), np.asarray(cond["tokens"]))


def test_gni_cond_only_is_a_named_option(text_bench):
    """branches="cond": the earlier behaviour (noise on the conditional embedding only), same draws."""
    bed, bench = text_bench
    spec = get_model("unet-text")
    _, both = baseline_conditions(spec, bed, bench, "gni", seed=1)
    _, cond = baseline_conditions(spec, bed, bench, "gni", {"branches": "cond"}, seed=1)
    assert isinstance(cond, dict)
    np.testing.assert_array_equal(np.asarray(cond["noise"]), np.asarray(both.cond["noise"]))   # one call: exact


def test_gni_noises_the_unconditional_branch_of_cfg(text_bench):
    """With WithNull the sampler's unconditional call gets each sample's own null condition: the
    CFG result differs from noising the conditional branch only, and equals a hand-built CFG step."""
    from amg_jax.guidance import make_guidance
    from amg_jax.samplers import SamplerConfig, sample

    bed, bench = text_bench
    spec = get_model("unet-text")
    den, both = baseline_conditions(spec, bed, bench, "gni", seed=1)
    _, cond = baseline_conditions(spec, bed, bench, "gni", {"branches": "cond"}, seed=1)
    g, cfg = make_guidance("cfg", scale=3.0), SamplerConfig("ddim", num_steps=1)
    keys = bench.keys
    a = np.asarray(sample(den, g, cfg, keys, both).x0)
    b = np.asarray(sample(den, g, cfg, keys, cond).x0)
    assert np.abs(a - b).max() > 1e-3
    # one DDIM step from x_T at t: eps_hat = eps(null_b) + 3 (eps(cond_b) - eps(null_b))
    from amg_jax.samplers import initial_noise, make_sampler

    s = make_sampler(cfg, den.schedule)
    x = initial_noise(keys, den.sample_shape)
    t = jnp.full((x.shape[0],), int(s.timesteps[0]), jnp.int32)
    e_u, e_c = den(x, t, both.null), den(x, t, both.cond)
    eps = e_u + 3.0 * (e_c - e_u)
    ab = float(s.alpha_bars[0])
    x0 = (x - np.sqrt(1 - ab) * eps) / np.sqrt(ab)
    # float32 UNet calls batched differently (2B vs B rows): round-off ~1e-5 relative
    np.testing.assert_allclose(a, np.asarray(x0), rtol=1e-4, atol=1e-4)


def test_amg_with_a_prompt_baseline_on_the_text_unet(text_bench):
    """AMG over the token denoiser of a prompt baseline: y_N = the neighbour caption's tokens in the
    same condition structure (it crashed at trace time with the label broadcast into the dict)."""
    from amg_jax.samplers import SamplerConfig, sample

    bed, bench = text_bench
    spec = get_model("unet-text")
    den, cond = baseline_conditions(spec, bed, bench, "rna", seed=1)
    lm = spec.load(bed)
    conds = caption_conditions(spec, bed)
    np.testing.assert_array_equal(np.asarray(conds["tokens"]), np.asarray(lm.model.tokens))
    g = build_method("amg", 1.5, detector=make_detector("nl2-bank", lm.bank), neighbour_conds=conds,
                     amg={"threshold": "always", "c3": 0.0})
    res = sample(den, g, SamplerConfig("ddim", num_steps=2), bench.keys, cond)
    assert np.isfinite(np.asarray(res.x0)).all() and np.asarray(res.trace["s2"]).max() > 0   # G_dup acted
    # without the caption table the mismatch is named, not a broadcasting error
    bad = build_method("amg", 1.5, detector=make_detector("nl2-bank", lm.bank), amg={"threshold": "always"})
    with pytest.raises(ValueError, match="neighbour_conds"):
        sample(den, bad, SamplerConfig("ddim", num_steps=2), bench.keys, cond)


def test_baseline_conditions_errors(text_bench):
    bed, bench = text_bench
    with pytest.raises(ValueError, match="unknown prompt baseline"):
        baseline_conditions(get_model("unet-text"), bed, bench, "xyz")
    with pytest.raises(ValueError, match="needs a model with a text encoder"):
        baseline_conditions(get_model("unet-class"), bed, bench, "rna")


def test_one_set_of_amg_defaults_per_model(monkeypatch, tmp_path):
    """eval, the sweeps and the bench read a model's AMG defaults from its ModelSpec (``amg``; the
    user's settings on top); `amg eval --model empirical --method amg` with its defaults stops
    copying (it copied 100%: only `amg demo` set the perfect memorizer's cheap gradient, c3 1e4)."""
    import dataclasses

    from amg_jax.apps import evaluate, sweep
    from amg_jax.guidance.amg import AMGConfig

    assert get_model("empirical").amg_settings() == {"gradient": "cheap", "c3": 10000.0}
    assert get_model("unet-text").amg_settings({"c3": 3.0}) == {"c3": 3.0}
    monkeypatch.setitem(models._MODELS, "mixture",
                        dataclasses.replace(get_model("mixture"), amg=(("c3", 0.125), ("fallback", False))))
    bed = build_testbed("small")
    g = evaluate.build_guidance(evaluate.EvalConfig(model="mixture", method="amg", amg=(("c2", 1.0),)), bed)
    assert g.config == AMGConfig(c3=0.125, fallback=False, c2=1.0)
    path = tmp_path / "s.toml"
    path.write_text('[sweep]\nname = "t"\nmodel = "mixture"\ntestbed = "small"\nout = "o"\nprompts_per_kind = 1\nsamples_per_prompt = 2\n'
                    '[[method]]\nname = "AMG"\nguidance = "amg"\namg = { c2 = 1.0 }\n')
    cfg = sweep.load_config(str(path))
    s = sweep.cell_settings(cfg, cfg.cells[0])
    assert s["amg"] == json.loads(json.dumps(dataclasses.asdict(AMGConfig(c3=0.125, fallback=False, c2=1.0))))
    monkeypatch.undo()
    r = evaluate.run_eval(evaluate.EvalConfig(out=str(tmp_path / "e"), model="empirical", testbed="small",
                                              method="amg", prompts_per_kind=1, samples_per_prompt=4, steps=20),
                          echo=lambda *a: None)
    assert r["metrics"]["all"]["frac_copied"] < 0.5      # measured 0/24 at 2 prompts per kind (old defaults: 24/24)
