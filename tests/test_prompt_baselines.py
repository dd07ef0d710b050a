"""Somepalli et al.'s prompt baselines (GNI, RT, CWR, RNA): determinism, structure, statistics, errors."""
import types

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from amg_jax import prompt_baselines as pb
from amg_jax.models.base import WithNull
from amg_jax.models.text import CaptionTokenizer

PROMPTS = ["a red circle on a gray background", "a small blue striped square", "green", ""]
STRING_BASELINES = ("rt", "cwr", "rna")


def _is_subsequence(small, big):
    it = iter(big)
    return all(any(w == b for b in it) for w in small)


def test_registry_and_defaults():
    assert set(pb.PROMPT_BASELINES) == {"gni", "rt", "cwr", "rna"}
    assert pb.EMBEDDING_BASELINES == ("gni",)
    assert pb.baseline_params("rt") == ("n", "vocab", "mode")
    assert pb.baseline_params("gni") == ("std", "branches", "null")
    assert pb.BASELINE_DEFAULTS["gni"]["std"] == 0.1 and pb.BASELINE_DEFAULTS["rna"]["n"] == 4


@pytest.mark.parametrize("name", STRING_BASELINES)
def test_string_baselines_deterministic_per_seed_and_per_prompt(name):
    a = pb.apply_baseline(name, PROMPTS, 7)
    assert a == pb.apply_baseline(name, PROMPTS, 7)
    assert isinstance(a, list) and len(a) == len(PROMPTS) and all(isinstance(p, str) for p in a)
    b = pb.apply_baseline(name, PROMPTS, 8)
    assert a[:2] != b[:2]
    # each prompt has its own stream: its result does not depend on the rest of the batch
    assert pb.apply_baseline(name, PROMPTS[:1], 7) == a[:1]
    assert pb.apply_baseline(name, PROMPTS[0], 7) == a[0]
    # the functions themselves take an int seed, a Generator or a JAX key
    fn = pb.PROMPT_BASELINES[name]
    assert fn(3, PROMPTS[0]) == fn(np.random.default_rng(3), PROMPTS[0])
    assert fn(jax.random.key(0), PROMPTS[0]) == fn(jax.random.PRNGKey(0), PROMPTS[0])
    many = {fn(s, PROMPTS[0]) for s in range(20)}
    assert len(many) > 15


def test_random_token_replacement_structure():
    words = PROMPTS[0].split()
    vocab = ["alpha", "beta", "gamma", "red"]
    for seed in range(10):
        out = pb.random_token_replacement(seed, PROMPTS[0], n=3, vocab=vocab).split()
        assert len(out) == len(words)
        changed = [i for i, (o, w) in enumerate(zip(out, words)) if o != w]
        assert len(changed) == 3 and all(out[i] in vocab for i in changed)
    # a fraction of the words; n beyond the caption replaces every word (never by itself)
    assert sum(o != w for o, w in zip(pb.random_token_replacement(0, PROMPTS[0], n=0.5, vocab=vocab).split(),
                                      words)) == 4
    out = pb.random_token_replacement(1, "red red red", n=10, vocab=vocab).split()
    assert len(out) == 3 and "red" not in out
    assert pb.random_token_replacement(0, "", n=4) == ""
    assert pb.random_token_replacement(0, PROMPTS[0], n=0) == PROMPTS[0]
    # the reference script's insertion
    out = pb.random_token_replacement(2, PROMPTS[0], n=4, vocab=vocab, mode="add").split()
    assert len(out) == len(words) + 4 and _is_subsequence(words, out)
    # default vocabulary: built-in English words
    out = pb.random_token_replacement(3, PROMPTS[1], n=2).split()
    assert sum(o in pb.DEFAULT_WORDS for o in out) >= 2


def test_testbed_vocabulary_keeps_words_known():
    tok = CaptionTokenizer.from_captions(PROMPTS[:3], max_length=32)
    for seed in range(5):
        rt = pb.apply_baseline("rt", PROMPTS[:3], seed, vocab=tok)
        cwr = pb.apply_baseline("cwr", [PROMPTS[0] + " Zebra!"], seed, vocab=tok)
        for p in rt:
            assert tok.unk_id not in tok.encode(p)[0].tolist()
        assert tok.encode(cwr[0])[0].tolist().count(tok.unk_id) == 1           # only the original "zebra!"
    assert pb.vocab_words(tok) == tok.vocab


def test_vocab_from_transformers_clip_tokenizer(tmp_path):
    import json

    from transformers import CLIPTokenizer

    vocab = {"<|startoftext|>": 5, "<|endoftext|>": 6, "c": 0, "a": 1, "t": 2, "cat</w>": 3, "ca": 4, "7</w>": 7}
    (tmp_path / "vocab.json").write_text(json.dumps(vocab))
    (tmp_path / "merges.txt").write_text("#version: 0.2\nc a\nca t</w>\n")
    tok = CLIPTokenizer(str(tmp_path / "vocab.json"), str(tmp_path / "merges.txt"))
    assert pb.vocab_words(tok) == ("cat",)                       # whole-word alphabetic tokens only
    assert pb.random_token_replacement(0, "a dog", n=1, vocab=tok).split().count("cat") == 1


def test_caption_word_repetition_structure():
    words = PROMPTS[1].split()
    for seed in range(10):
        out = pb.caption_word_repetition(seed, PROMPTS[1], n=4).split()
        assert len(out) == len(words) + 4 and _is_subsequence(words, out)
        extra = list(out)
        for w in words:
            extra.remove(w)
        assert all(w in words for w in extra)
    assert pb.caption_word_repetition(0, "", n=4) == ""
    assert pb.caption_word_repetition(0, "green", n=2) == "green green green"
    assert len(pb.caption_word_repetition(0, PROMPTS[0], n=0.5).split()) == 7 + 4


def test_random_number_addition_structure():
    words = PROMPTS[0].split()
    for seed in range(10):
        out = pb.random_number_addition(seed, PROMPTS[0]).split()
        assert len(out) == len(words) + 4 and _is_subsequence(words, out)
        nums = [w for w in out if w.isdigit()]
        assert len(nums) == 4 and all(0 <= int(w) < 100000 for w in nums)
    out = pb.random_number_addition(0, "", n=3, high=10).split()
    assert len(out) == 3 and all(0 <= int(w) < 10 for w in out)


def test_gni_statistics_and_determinism():
    emb = jnp.zeros((8, 64, 64), jnp.float32)
    out = pb.apply_baseline("gni", emb, 0, std=0.3, branches="cond")
    chex.assert_shape(out, emb.shape)
    noise = np.asarray(out - emb)
    # 8 x 64 x 64 = 32768 draws: the sample mean / std are within 0.01 of 0 / 0.3 (> 5 standard errors)
    assert abs(noise.mean()) < 0.01 and abs(noise.std() - 0.3) < 0.01
    np.testing.assert_array_equal(np.asarray(pb.apply_baseline("gni", emb, 0, std=0.3, branches="cond")),
                                  np.asarray(out))                   # the same call again: deterministic, exact
    other = np.asarray(pb.apply_baseline("gni", emb, 1, std=0.3, branches="cond"))
    assert abs(np.corrcoef(other.ravel(), noise.ravel())[0, 1]) < 0.05              # independent draws
    # per-row streams: row i does not depend on the batch size; rows differ from each other. The same
    # threefry bits, their float conversion compiled for a batch of 2 vs 8 (an ulp at most, |x| < 2):
    # atol 1e-6; a stream that depends on the batch is off by O(0.3).
    np.testing.assert_allclose(np.asarray(pb.apply_baseline("gni", emb[:2], 0, std=0.3, branches="cond")),
                               np.asarray(out[:2]), rtol=0, atol=1e-6)
    assert not np.allclose(noise[0], noise[1])
    # the function itself: default strength 0.1, an int seed as key, the input's dtype kept
    d = np.asarray(pb.gaussian_noise_embedding(0, emb + 1.0)) - 1.0
    assert abs(d.mean()) < 0.005 and abs(d.std() - 0.1) < 0.005
    assert jax.eval_shape(pb.gaussian_noise_embedding, jax.random.key(1), emb.astype(jnp.bfloat16)).dtype \
        == jnp.bfloat16


def test_gni_noises_both_branches_by_default():
    """The reference noises the concatenated [uncond, cond] embeddings: each sample's null embedding
    gets its own draw. The conditional half equals branches="cond" (the earlier behaviour)."""
    emb, null = jnp.zeros((8, 16, 32), jnp.float32), jnp.ones((16, 32), jnp.float32)
    both = pb.apply_baseline("gni", emb, 0, std=0.3, null=null)
    assert isinstance(both, WithNull)
    # the same _gni_rows call on the same shapes: exact; the batch-by-batch rows (3:5) are another
    # shape, compared at chex's default 1e-6 (an ulp at most)
    np.testing.assert_array_equal(np.asarray(both.cond), np.asarray(pb.apply_baseline("gni", emb, 0, std=0.3,
                                                                                      branches="cond")))
    n = np.asarray(both.null) - 1.0
    chex.assert_shape(n, emb.shape)
    assert abs(n.std() - 0.3) < 0.01 and abs(np.corrcoef(n.ravel(), np.asarray(both.cond).ravel())[0, 1]) < 0.05
    assert not np.allclose(n[0], n[1])                          # per-row draws of the null branch too
    part = pb.gni_rows(0, emb[3:5], 0.3, null=null, index=[3, 4])  # global row numbers: batch by batch
    chex.assert_trees_all_close(part, jax.tree.map(lambda a: a[3:5], both))
    with pytest.raises(ValueError, match="pass null="):
        pb.apply_baseline("gni", emb, 0)
    with pytest.raises(ValueError, match="branches must be one of"):
        pb.apply_baseline("gni", emb, 0, branches="uncond")
    with pytest.raises(ValueError, match=r"null must be \[L, D\]"):
        pb.apply_baseline("gni", emb, 0, null=jnp.ones((3, 32)))


def test_errors():
    with pytest.raises(ValueError, match="unknown prompt baseline 'xyz'; known: gni, rt, cwr, rna"):
        pb.apply_baseline("xyz", PROMPTS, 0)
    with pytest.raises(ValueError, match=r"unknown parameter\(s\) \['m'\]; it takes \['n', 'vocab', 'mode'\]"):
        pb.apply_baseline("rt", PROMPTS, 0, m=3)
    with pytest.raises(ValueError, match="n must be >= 0"):
        pb.apply_baseline("cwr", PROMPTS, 0, n=-1)
    with pytest.raises(ValueError, match=r"fractional n must be in \[0, 1\]"):
        pb.apply_baseline("rna", PROMPTS, 0, n=1.5)
    with pytest.raises(ValueError, match="n must be an int"):
        pb.apply_baseline("rt", PROMPTS, 0, n="4")
    with pytest.raises(ValueError, match="mode must be one of"):
        pb.apply_baseline("rt", PROMPTS, 0, mode="swap")
    with pytest.raises(ValueError, match="std must be a finite number >= 0"):
        pb.apply_baseline("gni", jnp.zeros((2, 3, 4)), 0, std=-0.1)
    with pytest.raises(ValueError, match="acts on text embeddings"):
        pb.apply_baseline("gni", PROMPTS, 0)
    with pytest.raises(ValueError, match="takes prompt strings"):
        pb.apply_baseline("rna", [1, 2], 0)
    with pytest.raises(ValueError, match="seed must be an int >= 0"):
        pb.apply_baseline("rna", PROMPTS, -1)
    with pytest.raises(ValueError, match="single words"):
        pb.apply_baseline("rt", PROMPTS, 0, vocab=["two words"])
    with pytest.raises(ValueError, match="vocabulary is empty"):
        pb.random_token_replacement(0, "a b", vocab=[])
    with pytest.raises(ValueError, match="high must be an int >= 1"):
        pb.random_number_addition(0, "a", high=0)
    with pytest.raises(ValueError, match="rng must be"):
        pb.random_number_addition("seed", "a")
    with pytest.raises(ValueError, match="prompt must be a string"):
        pb.caption_word_repetition(0, ["a"])


def test_amg_sample_gni_noise_is_per_row(monkeypatch):
    """`amg sample --baseline gni`: each (prompt, seed) row gets its own stream (fold_in(key(seed), i),
    as apply_baseline and the sweeps), so a row's noise does not depend on how many prompts there are."""
    from amg_jax.apps import sample as sg

    def fake_encode(sd, prompts, batch=64):
        return jnp.stack([jnp.full((3, 4), float(len(p))) for p in prompts])

    monkeypatch.setattr(sg.sdm, "encode_prompts", fake_encode)
    one = sg.SampleRun(model="sd:x", prompts=("a cat",), out="o", seeds=2, seed=5, baseline="gni")
    two = sg.SampleRun(model="sd:x", prompts=("a cat", "a dog"), out="o", seeds=2, seed=5, baseline="gni")
    sd = types.SimpleNamespace(null_embedding=jnp.zeros((3, 4)))
    _, c1 = sg._prompts_for(one, sd)
    _, c2 = sg._prompts_for(two, sd)
    assert isinstance(c1, WithNull)                     # both CFG branches noised (the reference)
    # the same streams through batches of 2 vs 4 rows: an ulp at most, chex's default 1e-6 (|x| < 10)
    chex.assert_trees_all_close(c1, jax.tree.map(lambda a: a[:2], c2))
    chex.assert_trees_all_close(c2, pb.apply_baseline("gni", fake_encode(None, ["a cat"] * 2 + ["a dog"] * 2), 5,
                                                      null=sd.null_embedding))
    assert not np.allclose(np.asarray(c2.cond[0]), np.asarray(c2.cond[1]))  # the two seeds of one prompt differ
    assert not np.allclose(np.asarray(c2.null[0]), np.asarray(c2.null[1]))
