"""The inference-time mitigations AMG compares against (Somepalli et al. 2023, "Understanding and
mitigating copying in diffusion models"): perturb the condition, not the sampler.

- ``gni``  ``gni_rows(seed, emb [B, L, D], std=0.1, branches="both", null=None)``: Gaussian noise on the text
  encoder's output, ``emb + std * N(0, 1)``.
- ``rt``   ``random_token_replacement(rng, prompt, n=4, vocab=None)``: ``n`` random words of the
  caption replaced by random vocabulary words (``mode="add"``: ``n`` random words inserted).
- ``cwr``  ``caption_word_repetition(rng, prompt, n=4)``: ``n`` random words of the caption
  repeated at random positions.
- ``rna``  ``random_number_addition(rng, prompt, n=4)``: ``n`` random integers in [0, 100000)
  inserted at random positions.

**Defaults follow the reference code** (github.com/somepago/DCR, ``sd_mitigation.py``): GNI adds
``0.1 * randn`` (its README runs ``--rand_noise_lam 0.1``); the word transforms repeat their
insertion ``--rand_aug_repeats`` = 4 times, each at ``random.randint(0, len(words))`` of the
current word list; RNA's numbers are ``np.random.choice(100000)``; CWR draws from the words of the
*original* caption. Deliberate differences, each a parameter:

- RT: the reference inference script *adds* random tokens (``rand_word_add``, a random CLIP
  token id < 49400 decoded); the paper's RT names replacement, so ``mode="replace"`` (default)
  replaces ``n`` distinct word positions, each by a vocabulary word different from the one it
  replaces, and ``mode="add"`` is the reference script's insertion.
- Random words come from ``vocab``: a list of words, a testbed ``CaptionTokenizer`` (its
  ``.vocab``: on the testbed a word outside the vocabulary becomes ``<unk>``, so draw from it),
  or a transformers tokenizer (its whole-word alphabetic tokens, ``</w>`` stripped: the closest
  to the reference's random CLIP tokens). ``vocab=None``: ``DEFAULT_WORDS``, a small built-in
  list of common English words. CWR's ``vocab`` restricts the repeated words to those in it
  (when the caption has any), so repetitions on the testbed are not ``<unk>``.
- Words are whitespace-separated (``str.split()``; the reference splits on single spaces), and
  the result is joined with single spaces.
- GNI: the reference overrides diffusers' ``_encode_prompt``, which then returned the
  unconditional and conditional embeddings concatenated, so its noise hit both CFG branches,
  each with its own draw. ``branches="both"`` (default) does that: ``apply_baseline("gni", emb,
  seed, null=null_emb)`` returns ``WithNull(cond=emb + noise, null=null_emb + other noise)``, a
  condition whose unconditional half is that sample's own noisy empty-prompt embedding;
  ``branches="cond"`` noises the conditional embedding only (the earlier behaviour).

``n`` is a count (int >= 0) or, as a float in [0, 1], a fraction of the caption's words
(rounded). Transforms are pure: the randomness comes from ``rng`` (an int seed, a
``numpy.random.Generator`` or a JAX key). ``apply_baseline(name, prompts, seed, **params)`` runs
one over a batch with one independent stream per prompt (``(seed, i)``), so a prompt's result
does not depend on the rest of the batch.
"""
from __future__ import annotations

import inspect
import math
import re
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from amg_jax.models.base import WithNull

Array = jax.Array

DEFAULT_STD = 0.1
DEFAULT_N = 4
DEFAULT_NUMBER_HIGH = 100000
RT_MODES = ("replace", "add")
GNI_BRANCHES = ("both", "cond")
NULL_STREAM = 0x6E756C6C      # fold_in constant of the unconditional branch's GNI noise ("null")

DEFAULT_WORDS = tuple("""
apple art autumn baby ball beach bear bicycle bird blue boat book bottle bread bridge
building butterfly cake camera candle car castle cat chair child city cloud coffee
computer cow cup dance desert dog door dragon dream earth egg elephant engine face farm
field fire fish flower forest fruit garden girl glass gold grass green guitar hair hat
heart hill horse house ice island jacket key king lake lamp leaf light lion machine map
moon mountain music night ocean orange paper park pencil piano planet queen rain red
river road robot rock rose sand school sea sheep ship shoe silver sky snow song space star
stone street summer sun table tiger tower train tree truck umbrella valley village
violin water wave whale wheel window winter wolf wood yellow zebra
""".split())


# ----------------------------------------------------------------------------- validation helpers

def _fail(where: str, msg: str):
    raise ValueError(f"{where}: {msg}")


def _rng(rng, where: str) -> np.random.Generator:
    """A NumPy generator from an int seed, a Generator or a JAX PRNG key."""
    if isinstance(rng, np.random.Generator):
        return rng
    if isinstance(rng, (int, np.integer)) and not isinstance(rng, bool):
        if rng < 0:
            _fail(where, f"seed must be >= 0, got {rng}")
        return np.random.default_rng(int(rng))
    if isinstance(rng, jax.Array):
        data = jax.random.key_data(rng) if jax.dtypes.issubdtype(rng.dtype, jax.dtypes.prng_key) else rng
        data = np.asarray(data)
        if data.dtype == np.uint32 and data.size >= 1:
            return np.random.default_rng([int(v) for v in data.ravel()])
    _fail(where, f"rng must be an int seed, a numpy.random.Generator or a JAX PRNG key, got {type(rng).__name__}")


def _prompt(prompt, where: str) -> list[str]:
    if not isinstance(prompt, str):
        _fail(where, f"prompt must be a string, got {type(prompt).__name__}")
    return prompt.split()


def _count(n, num_words: int, where: str) -> int:
    """``n`` as a count: an int >= 0, or a float fraction in [0, 1] of ``num_words`` (rounded)."""
    if isinstance(n, bool) or not isinstance(n, (int, np.integer, float, np.floating)):
        _fail(where, f"n must be an int >= 0 or a float fraction in [0, 1], got {n!r}")
    if isinstance(n, (int, np.integer)):
        if n < 0:
            _fail(where, f"n must be >= 0, got {n}")
        return int(n)
    if not (math.isfinite(n) and 0.0 <= n <= 1.0):
        _fail(where, f"a fractional n must be in [0, 1], got {n!r}")
    return int(math.floor(n * num_words + 0.5))


def _norm_word(w: str) -> str:
    return re.sub(r"[^a-z0-9']", "", w.lower())


def vocab_words(vocab=None) -> tuple[str, ...]:
    """The words the random transforms draw from: ``None`` -> ``DEFAULT_WORDS``; a sequence of
    words; an object with ``.vocab`` (the testbed ``CaptionTokenizer``); or a transformers
    tokenizer (``get_vocab()``: its whole-word alphabetic tokens, ``</w>`` stripped, specials
    dropped), in id order."""
    where = "vocab"
    if vocab is None:
        return DEFAULT_WORDS
    if hasattr(vocab, "get_vocab") and callable(vocab.get_vocab):
        special = set(getattr(vocab, "all_special_tokens", ()))
        items = sorted(vocab.get_vocab().items(), key=lambda kv: kv[1])
        clip_style = any(tok.endswith("</w>") for tok, _ in items)     # CLIP BPE: "</w>" ends a word
        words = []
        for tok, _ in items:
            if tok in special:
                continue
            if clip_style:
                w = tok[:-4] if tok.endswith("</w>") else None
            else:                                                      # GPT-2 "\u0120word", WordPiece "##" pieces
                w = tok[1:] if tok.startswith("\u0120") else tok
            if w and w.isascii() and w.isalpha():
                words.append(w)
        out = tuple(dict.fromkeys(words))
    elif hasattr(vocab, "vocab") and not isinstance(vocab, (str, bytes)):
        out = tuple(str(w) for w in vocab.vocab)
    elif isinstance(vocab, (str, bytes)) or not isinstance(vocab, Sequence) and not isinstance(vocab, np.ndarray):
        _fail(where, f"expected None, a list of words, a CaptionTokenizer or a transformers tokenizer, "
                     f"got {type(vocab).__name__}")
    else:
        out = tuple(vocab.tolist() if isinstance(vocab, np.ndarray) else vocab)
    bad = [w for w in out if not isinstance(w, str) or not w or w.split() != [w]]
    if bad:
        _fail(where, f"entries must be non-empty single words (no whitespace), got {bad[:3]!r}")
    if not out:
        _fail(where, "the vocabulary is empty")
    return out


def _check_std(std, where: str) -> None:
    if isinstance(std, (int, float, np.integer, np.floating)) and not isinstance(std, bool):
        if not (math.isfinite(std) and std >= 0):
            _fail(where, f"std must be a finite number >= 0, got {std!r}")
    elif isinstance(std, bool) or not isinstance(std, jax.Array):
        _fail(where, f"std must be a number, got {type(std).__name__}")


def _insert(rng: np.random.Generator, words: list[str], word: str) -> None:
    """Inserts ``word`` at a uniform position in 0..len(words) (the reference's insert_rand_word)."""
    words.insert(int(rng.integers(0, len(words) + 1)), word)


# ----------------------------------------------------------------------------- the baselines

def gaussian_noise_embedding(key, emb, std: float = DEFAULT_STD) -> Array:
    """GNI: ``emb + std * N(0, 1)`` for text embeddings ``emb [B, L, D]`` (any shape), in
    ``emb``'s dtype. ``key``: a JAX PRNG key or an int seed. Pure and jit-able (``std`` may be
    traced). Reference strength 0.1 (on SD v1.4's CLIP-L token embeddings). It noises the one
    array it is given; ``gni_rows`` is the baseline over a batch, both CFG branches."""
    where = "gaussian_noise_embedding"
    _check_std(std, where)
    if isinstance(key, (int, np.integer)) and not isinstance(key, bool):
        key = jax.random.key(int(key))
    emb = jnp.asarray(emb)
    if not jnp.issubdtype(emb.dtype, jnp.floating):
        _fail(where, f"emb must be a float array (text embeddings [B, L, D]), got dtype {emb.dtype}")
    return _add_noise(key, emb, std)


@jax.jit
def _add_noise(key: Array, emb: Array, std) -> Array:
    """``emb + std * N(0, 1)`` in float32, cast back to ``emb``'s dtype (jitted: eager calls hit the cache)."""
    noise = jax.random.normal(key, emb.shape, jnp.float32)
    return (emb.astype(jnp.float32) + std * noise).astype(emb.dtype)


def random_token_replacement(rng, prompt: str, n=DEFAULT_N, vocab=None, mode: str = "replace") -> str:
    """RT: ``mode="replace"``: ``n`` distinct random word positions of ``prompt`` (all of them if
    it has fewer) each get a random word of ``vocab`` different from the word replaced; the word
    count is unchanged. ``mode="add"``: ``n`` random vocab words inserted at random positions,
    as the reference script does. ``n``: count or fraction of the caption's words."""
    where = "random_token_replacement"
    if mode not in RT_MODES:
        _fail(where, f"mode must be one of {RT_MODES}, got {mode!r}")
    words = _prompt(prompt, where)
    k = _count(n, len(words), where)
    pool = vocab_words(vocab)
    g = _rng(rng, where)
    if mode == "add":
        for _ in range(k):
            _insert(g, words, pool[int(g.integers(len(pool)))])
        return " ".join(words)
    k = min(k, len(words))
    index = {w: i for i, w in enumerate(pool)}
    for pos in g.choice(len(words), size=k, replace=False) if k else ():
        own = index.get(words[pos], index.get(_norm_word(words[pos])))
        if own is None or len(pool) == 1:
            j = int(g.integers(len(pool)))
        else:                                   # uniform over the pool without the word itself
            j = int(g.integers(len(pool) - 1))
            j += j >= own
        words[int(pos)] = pool[j]
    return " ".join(words)


def caption_word_repetition(rng, prompt: str, n=DEFAULT_N, vocab=None) -> str:
    """CWR: ``n`` times, a random word of the original caption is inserted at a random position.
    ``vocab``: if given, only caption words in it (lower-cased, punctuation stripped) are
    repeated, when there are any. An empty caption is returned unchanged."""
    where = "caption_word_repetition"
    words = _prompt(prompt, where)
    k = _count(n, len(words), where)
    cands = list(words)
    if vocab is not None and words:
        known = set(vocab_words(vocab))
        cands = [w for w in words if w in known or _norm_word(w) in known] or cands
    g = _rng(rng, where)
    if not cands:
        return " ".join(words)
    for _ in range(k):
        _insert(g, words, cands[int(g.integers(len(cands)))])
    return " ".join(words)


def random_number_addition(rng, prompt: str, n=DEFAULT_N, high: int = DEFAULT_NUMBER_HIGH) -> str:
    """RNA: ``n`` random integers uniform in [0, high) inserted at random positions (reference:
    ``high = 100000``)."""
    where = "random_number_addition"
    words = _prompt(prompt, where)
    k = _count(n, len(words), where)
    if isinstance(high, bool) or not isinstance(high, (int, np.integer)) or high < 1:
        _fail(where, f"high must be an int >= 1, got {high!r}")
    g = _rng(rng, where)
    for _ in range(k):
        _insert(g, words, str(int(g.integers(0, int(high)))))
    return " ".join(words)


@jax.jit
def _gni_rows(key: Array, index: Array, emb: Array, std: Array) -> Array:
    """GNI over a batch, row ``i`` with key ``fold_in(key, index[i])`` (one compilation per shape)."""
    return jax.vmap(lambda i, e: _add_noise(jax.random.fold_in(key, i), e, std))(index, emb)


def gni_rows(seed, emb, std=DEFAULT_STD, branches: str = "both", null=None, *, index=None):
    """GNI over a batch of embeddings ``emb [B, L, D]``; row ``i`` (global sample number
    ``index[i]``, default ``i``) draws its conditional noise from ``fold_in(key(seed), index[i])``.
    ``branches="cond"``: the noisy embeddings [B, L, D]. ``"both"`` (the reference): also the
    null embedding ``null [L, D]`` (or [B, L, D]) noised per row from ``fold_in(fold_in(key(seed),
    NULL_STREAM), index[i])``, returned as ``WithNull(cond, null)`` for the sampler."""
    where = "prompt baseline 'gni'"
    if branches not in GNI_BRANCHES:
        _fail(where, f"branches must be one of {list(GNI_BRANCHES)}, got {branches!r}")
    emb = jnp.asarray(emb)
    index = jnp.arange(emb.shape[0], dtype=jnp.int32) if index is None else jnp.asarray(index, jnp.int32)
    key = jax.random.key(int(seed)) if isinstance(seed, (int, np.integer)) else seed
    cond = _gni_rows(key, index, emb, jnp.float32(std))
    if branches == "cond":
        return cond
    if null is None:
        _fail(where, "branches='both' noises the unconditional embedding too (the reference): pass null= "
                     "the empty prompt's embedding [L, D], or set branches='cond'")
    null = jnp.asarray(null, emb.dtype)
    if null.shape != emb.shape:
        if null.shape != emb.shape[1:]:
            _fail(where, f"null must be [L, D] = {tuple(emb.shape[1:])} or [B, L, D], got {tuple(null.shape)}")
        null = jnp.broadcast_to(null, emb.shape)
    return WithNull(cond=cond, null=_gni_rows(jax.random.fold_in(key, NULL_STREAM), index, null, jnp.float32(std)))


# ----------------------------------------------------------------------------- registry

PROMPT_BASELINES: dict[str, Callable] = {
    "gni": gni_rows,
    "rt": random_token_replacement,
    "cwr": caption_word_repetition,
    "rna": random_number_addition,
}
EMBEDDING_BASELINES = ("gni",)        # act on text embeddings [B, L, D]; the others on prompt strings
BASELINE_DEFAULTS = {"gni": {"std": DEFAULT_STD, "branches": "both"}, "rt": {"n": DEFAULT_N, "mode": "replace"},
                     "cwr": {"n": DEFAULT_N}, "rna": {"n": DEFAULT_N, "high": DEFAULT_NUMBER_HIGH}}


def baseline_params(name: str) -> tuple[str, ...]:
    """The keyword parameters baseline ``name`` accepts (its strength and options)."""
    fn = _lookup(name)
    params = list(inspect.signature(fn).parameters.values())[2:]
    return tuple(p.name for p in params if p.kind != p.KEYWORD_ONLY)     # keyword-only: the callers' plumbing


def _lookup(name: str) -> Callable:
    if name not in PROMPT_BASELINES:
        raise ValueError(f"unknown prompt baseline {name!r}; known: {', '.join(PROMPT_BASELINES)}")
    return PROMPT_BASELINES[name]


def apply_baseline(name: str, prompts, seed: int, **params) -> Any:
    """Runs baseline ``name`` over a batch, deterministically per ``seed``; prompt ``i`` uses its
    own stream (``(seed, i)``), so its result does not depend on the other prompts.

    String baselines ("rt", "cwr", "rna"): ``prompts`` a string or a sequence of strings ->
    list of strings. "gni": ``prompts`` the text embeddings ``[B, L, D]`` -> ``gni_rows``: with
    ``branches="both"`` (default; pass ``null=`` the empty prompt's embedding) a ``WithNull`` of
    both noisy branches, with ``branches="cond"`` the noisy embeddings (row ``i`` with key
    ``fold_in(key(seed), i)``). ``params``: the baseline's keywords
    (``baseline_params(name)``), e.g. ``n=4``, ``vocab=tokenizer``, ``std=0.1``."""
    fn = _lookup(name)
    allowed = baseline_params(name)
    bad = [k for k in params if k not in allowed]
    if bad:
        raise ValueError(f"prompt baseline {name!r}: unknown parameter(s) {bad}; it takes {list(allowed)}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"prompt baseline {name!r}: seed must be an int >= 0, got {seed!r}")
    seed = int(seed)
    if name in EMBEDDING_BASELINES:
        if isinstance(prompts, str) or (isinstance(prompts, (list, tuple)) and prompts and isinstance(prompts[0], str)):
            raise ValueError(f"prompt baseline {name!r} acts on text embeddings [B, L, D], not on prompt strings; "
                             f"encode the prompts first")
        emb = jnp.asarray(prompts)
        if emb.ndim < 1 or emb.shape[0] == 0:
            raise ValueError(f"prompt baseline {name!r}: embeddings must be [B, ...] with B > 0, got shape {emb.shape}")
        if not jnp.issubdtype(emb.dtype, jnp.floating):
            raise ValueError(f"prompt baseline {name!r}: embeddings must be floats, got dtype {emb.dtype}")
        std = params.get("std", DEFAULT_STD)
        _check_std(std, f"prompt baseline {name!r}")
        return gni_rows(seed, emb, std, params.get("branches", "both"), params.get("null"))
    single = isinstance(prompts, str)
    batch = [prompts] if single else list(prompts)
    bad_items = [p for p in batch if not isinstance(p, str)]
    if bad_items:
        raise ValueError(f"prompt baseline {name!r} takes prompt strings; got {type(bad_items[0]).__name__} "
                         f"(use 'gni' for embeddings)")
    if params.get("vocab") is not None:
        params = dict(params, vocab=vocab_words(params["vocab"]))   # convert a tokenizer once per batch
    out = [fn(np.random.default_rng([seed, i]), p, **params) for i, p in enumerate(batch)]
    return out[0] if single else out


__all__ = [
    "BASELINE_DEFAULTS", "DEFAULT_WORDS", "EMBEDDING_BASELINES", "GNI_BRANCHES", "PROMPT_BASELINES", "apply_baseline",
    "gni_rows",
    "baseline_params", "caption_word_repetition", "gaussian_noise_embedding", "random_number_addition",
    "random_token_replacement", "vocab_words",
]
