"""The testbed tokenizer and text encoder."""
import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from amg_jax.models.text import CaptionTokenizer, TextEncoder, pooled

CAPTIONS = ["a red circle", "a blue striped square on a gray background", "red"]


def test_tokenizer_round_trip_padding_and_null():
    tok = CaptionTokenizer.from_captions(CAPTIONS)
    assert tok.max_length == 9 and tok.vocab_size == 3 + len(tok.vocab)
    ids = tok.encode(CAPTIONS)
    chex.assert_shape(ids, (3, 9))
    assert np.all(ids[:, 0] == tok.bos_id)
    assert tok.decode(ids) == CAPTIONS
    assert ids[2, 2:].tolist() == [tok.pad_id] * 7
    null = tok.encode("")
    assert null[0, 0] == tok.bos_id and np.all(null[0, 1:] == tok.pad_id)
    assert tok.encode("a purple circle")[0, 2] == tok.unk_id


def test_too_long_caption_is_truncated_with_a_warning():
    tok = CaptionTokenizer.from_captions(CAPTIONS, max_length=3)
    with pytest.warns(UserWarning, match="truncated to 2"):
        ids = tok.encode("a red circle")
    assert tok.decode(ids) == ["a red"]


def test_save_load_and_errors(tmp_path):
    tok = CaptionTokenizer.from_captions(CAPTIONS)
    tok.save(str(tmp_path / "tok.json"))
    assert CaptionTokenizer.load(str(tmp_path / "tok.json")) == tok
    with pytest.raises(FileNotFoundError, match="does not exist"):
        CaptionTokenizer.load(str(tmp_path / "missing.json"))
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ValueError, match="unreadable"):
        CaptionTokenizer.load(str(tmp_path / "bad.json"))
    with pytest.raises(ValueError, match="max_length"):
        CaptionTokenizer(vocab=("a",), max_length=1)
    with pytest.raises(ValueError, match="repeated"):
        CaptionTokenizer(vocab=("a", "a"))


def test_encoder_masks_padding():
    tok = CaptionTokenizer.from_captions(CAPTIONS)
    enc = TextEncoder(tok.vocab_size, tok.max_length, dim=16, num_layers=1, num_heads=2)
    ids = jnp.asarray(tok.encode(CAPTIONS))
    params = enc.init(jax.random.key(0), ids)
    emb, mask = enc.apply(params, ids)
    chex.assert_shape(emb, (3, tok.max_length, 16))
    np.testing.assert_array_equal(np.asarray(mask), np.asarray(ids) != 0)
    # what sits in the padded positions does not change the real tokens' embeddings
    other = ids.at[2, 5].set(0).at[2, 6].set(0)        # still padding -> identical
    # masked attention weights are exactly 0, so the real tokens are bit-identical (margin 0); the
    # pooled mean of 2 tokens is ~1 ulp from emb.mean. Leaking padding is off by >1e-2.
    chex.assert_trees_all_close(enc.apply(params, other)[0][2, :2], emb[2, :2], atol=1e-6)
    p = pooled(emb, mask)
    chex.assert_shape(p, (3, 16))
    np.testing.assert_allclose(np.asarray(p[2]), np.asarray(emb[2, :2].mean(0)), rtol=1e-5, atol=1e-6)
