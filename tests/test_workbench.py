"""The bench: prompts, conditions, references and metrics for text, class and unconditional models."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from amg_jax import workbench
from amg_jax.data import testbed as tb


@pytest.fixture(scope="module")
def bed():
    return workbench.build_testbed("small")


@pytest.mark.parametrize("conditioning", ["text", "class", "uncond"])
def test_bench_shapes_per_conditioning(bed, conditioning):
    b = workbench.prepare_bench(bed, 1, 3, 0, conditioning=conditioning)
    n = len(b.caption_ids)
    assert b.constraints.shape == (n, 6) and b.kinds.shape == (n,) and len(b.keys) == n
    assert b.reference.shape == (4 * n, 16, 16, 3) and b.truth.shape == (n, 16, 16, 3)
    assert len(b.examples) == len(b.prompt_ids) == n // 3
    if conditioning == "text":
        assert set(b.kinds) == {"specific", "duplicated", "generic"}
        np.testing.assert_array_equal(np.asarray(b.cond), b.caption_ids)
        np.testing.assert_array_equal(b.constraints, bed.constraints[b.caption_ids])
    elif conditioning == "class":
        shapes = bed.config.vocabulary("shape")
        assert list(b.prompts) == list(shapes) and n == 3 * len(shapes)
        a = tb.ATTRIBUTES.index("shape")
        np.testing.assert_array_equal(b.constraints[:, a], np.asarray(b.cond))
        assert (np.delete(b.constraints, a, axis=1) == -1).all()
        # the references of a class show that class
        ref_kinds = np.repeat(b.kinds, 4)
        pred = b.classifier.classify(b.reference)[:, a]
        for c, name in enumerate(shapes):
            assert np.mean(pred[ref_kinds == name] == c) > 0.6
    else:
        assert (np.asarray(b.cond) == -1).all() and set(b.kinds) == {"uncond"} and n == 3 * 3
        assert (b.constraints == -1).all()
    m = b.measure(b.truth)
    assert "all" in m and np.isfinite(m["all"]["fd"])
    assert np.isnan(m["all"]["alignment"]) == (conditioning == "uncond")


def test_bench_alignment_tells_right_from_wrong_class(bed):
    b = workbench.prepare_bench(bed, 1, 8, 0, conditioning="class")
    right = b.measure(b.truth)["all"]["alignment"]
    wrong = workbench.measure(b.truth, b.constraints[::-1].copy(), b.kinds, bed, b.threshold, b.classifier,
                              b.reference)["all"]["alignment"]
    assert right > 0.8 and wrong < 0.5


def test_bad_conditioning_is_named(bed):
    with pytest.raises(ValueError, match="conditioning must be"):
        workbench.prepare_bench(bed, 1, 2, 0, conditioning="pixels")


def test_testbed_names_and_auto():
    assert workbench.resolve_testbed("auto", ["unet-text"]) == "unet"
    assert workbench.resolve_testbed("auto", ["mixture"]) == "default"
    assert workbench.resolve_testbed("small", ["unet-text"]) == "small"
    assert workbench.testbed_config("unet").image_size == 16
    assert workbench.testbed_config("unet").n_specific == tb.TestbedConfig().n_specific
    with pytest.raises(ValueError, match="unknown testbed 'huge'"):
        workbench.testbed_config("huge")


def test_sample_in_chunks_equals_one_batch(small_mixture):
    import jax.numpy as jnp

    from amg_jax.samplers import SamplerConfig, keys_from_seeds, sample

    bed, den = small_mixture
    g = workbench.method_guidance("dtp", 5.0)
    keys = keys_from_seeds(range(5))
    cond = jnp.asarray([0, 3, 5, 7, 9], jnp.int32)
    sampler = SamplerConfig("ddim", num_steps=4)
    whole = sample(den, g, sampler, keys, cond)
    parts = workbench.sample_in_chunks(den, g, sampler, keys, cond, chunk=2)     # 2 + 2 + 1 (padded)
    np.testing.assert_allclose(parts.x0, np.asarray(whole.x0), rtol=1e-4, atol=1e-4)   # batch-size round-off
    assert parts.x0.shape == (5, 16, 16, 3)
    for k, v in whole.trace.items():
        np.testing.assert_allclose(parts.trace[k], np.asarray(v), rtol=1e-4, atol=1e-4)


def test_model_base_and_detector_defaults():
    from amg_jax import evaluate

    assert workbench.model_base("unet-uncond") == "none" and workbench.model_base("unet-text") == "cfg"
    assert workbench.model_base("empirical") == "cfg"
    assert workbench.model_detector("unet-class") == "nl2-bank" and workbench.model_detector("mixture") == "nl2"
    cfg = evaluate.EvalConfig(model="unet-uncond", method="amg", base="cfg")
    with pytest.raises(ValueError, match="base 'cfg' needs a condition"):
        evaluate.build_guidance(cfg, None)


@pytest.fixture(scope="module")
def text_bench():
    bed = workbench.build_testbed(workbench.resolve_testbed("auto", ["unet-text"]))
    return bed, workbench.prepare_bench(bed, 1, 2, 0, conditioning="text")


def test_token_denoiser_equals_the_caption_id_denoiser(text_bench):
    from amg_jax.models.unet import token_denoiser

    bed, bench = text_bench
    lm = workbench.load_trained("unet-text", bed)
    tden = token_denoiser(lm.model, lm.denoiser.params)
    x = jax.random.normal(jax.random.key(0), (len(bench.cond),) + lm.denoiser.sample_shape)
    t = jnp.full((len(bench.cond),), 500, jnp.int32)
    tokens = jnp.asarray(np.asarray(lm.model.tokens)[np.asarray(bench.cond)])
    cond = {"tokens": tokens, "noise": jnp.zeros(tokens.shape + (lm.model.config.text_dim,))}
    np.testing.assert_allclose(np.asarray(tden(x, t, cond)), np.asarray(lm.denoiser(x, t, bench.cond)), atol=1e-5)
    null = tden.null_batch(2)
    np.testing.assert_allclose(np.asarray(tden(x[:2], t[:2], null)),
                               np.asarray(lm.denoiser(x[:2], t[:2], jnp.full((2,), -1))), atol=1e-5)


@pytest.mark.parametrize("baseline", ["gni", "rt", "cwr", "rna"])
def test_baseline_conditions(text_bench, baseline):
    bed, bench = text_bench
    den, cond = workbench.baseline_conditions("unet-text", bed, bench, baseline, seed=1)
    lm = workbench.load_trained("unet-text", bed)
    tokens = np.asarray(lm.model.tokens)[np.asarray(bench.cond)]
    if baseline == "gni":
        np.testing.assert_array_equal(np.asarray(cond["tokens"]), tokens)
        assert 0.05 < float(np.std(np.asarray(cond["noise"]))) < 0.2
    else:
        assert (np.asarray(cond["tokens"]) != tokens).any(axis=1).all()      # every caption edited
        assert not np.asarray(cond["noise"]).any()
    den.validate_cond(cond, len(bench.cond))
    again = workbench.baseline_conditions("unet-text", bed, bench, baseline, seed=1)[1]
    np.testing.assert_array_equal(np.asarray(again["tokens"]), np.asarray(cond["tokens"]))


def test_baseline_conditions_errors(text_bench):
    bed, bench = text_bench
    with pytest.raises(ValueError, match="unknown prompt baseline"):
        workbench.baseline_conditions("unet-text", bed, bench, "xyz")
    with pytest.raises(ValueError, match="needs a model with a text encoder"):
        workbench.baseline_conditions("unet-class", bed, bench, "rna")
