"""The trained testbed models: what each one is trained on, how it is trained, shipped and loaded.

Three kinds (``KINDS``), all ``UNetModel``s on the same testbed images:

- ``"text"``:   conditioned on the caption (tokenized, ``CaptionTokenizer``); condition id = caption id;
- ``"class"``:  conditioned on the shape attribute (the CIFAR-style class label);
- ``"uncond"``: unconditional.

A shipped model is a directory (``checkpoints/<name>/``)::

    card.json      kind, testbed config, UNet config, tokenizer, condition names, training
                   settings and time, measured memorization (``write_card`` / ``update_card``)
    params/        the EMA params (orbax ``StandardCheckpointer``; only these are shipped)
    bank.npz       the reference bank of the training images (``amg_jax.index.save_bank``)

``train_model`` trains one kind with ``amg_jax.train.train`` in a work directory (resumable)
and ``export_model`` writes the shipped directory from it; ``load_model`` reads it back as a
``Denoiser`` plus its testbed, bank and card, with a clear error for a missing, truncated or
mismatched directory.
"""
from __future__ import annotations

import dataclasses
import os
import shutil
from typing import Any, NamedTuple

import jax
import numpy as np
import orbax.checkpoint as ocp

from amg_jax.data import testbed as tb
from amg_jax.data.bank import bank_from_testbed
from amg_jax.failed_reads import quiet_failed_reads
from amg_jax.index import load_bank, save_bank
from amg_jax.jsonio import read_json, write_json
from amg_jax.models.base import Denoiser
from amg_jax.models.text import CaptionTokenizer
from amg_jax.models.unet import UNetConfig, UNetModel, unet_denoiser
from amg_jax.train import train

KINDS = ("text", "class", "uncond")
CARD = "card.json"
PARAMS = "params"
BANK = "bank.npz"
CLASS_ATTRIBUTE = "shape"


def _tuples(v):
    """JSON lists back to the tuples the frozen configs hold."""
    return tuple(_tuples(x) for x in v) if isinstance(v, list) else v


def _check_kind(kind: str) -> None:
    if kind not in KINDS:
        raise ValueError(f"unknown testbed model kind {kind!r}; choose one of {list(KINDS)}")


def training_data(bed: tb.Testbed, kind: str) -> tuple[np.ndarray, np.ndarray | None, tuple]:
    """(images [N, H, W, 3], condition ids [N] or None, condition names) for ``kind``."""
    _check_kind(kind)
    if kind == "text":
        return bed.images, bed.labels.astype(np.int32), tuple(bed.captions)
    if kind == "class":
        a = tb.ATTRIBUTES.index(CLASS_ATTRIBUTE)
        return bed.images, bed.attributes[:, a].astype(np.int32), tuple(bed.config.vocabulary(CLASS_ATTRIBUTE))
    return bed.images, None, ()


def build_model(bed: tb.Testbed, kind: str, *, name: str | None = None, **unet) -> UNetModel:
    """The UNet for ``kind`` on ``bed`` (``unet``: ``UNetConfig`` overrides)."""
    _, cond, names = training_data(bed, kind)
    size = bed.config.image_size
    if kind == "text":
        tok = CaptionTokenizer.from_captions(bed.captions)
        cfg = UNetConfig(image_size=size, conditioning="text", num_classes=len(names), vocab_size=tok.vocab_size,
                         max_tokens=tok.max_length, **unet)
        return UNetModel(cfg, tokens=tok.encode(bed.captions), null_tokens=tok.encode("")[0], name=name or "unet-text")
    cfg = UNetConfig(image_size=size, conditioning="class" if kind == "class" else "none",
                     num_classes=len(names), **unet)
    return UNetModel(cfg, name=name or f"unet-{kind}")


def reference_bank(bed: tb.Testbed, kind: str, *, rng=0):
    """The pixel bank of the training images with this kind's labels and the calibrated copy distance."""
    return bank_from_testbed(bed, labels=training_data(bed, kind)[1], rng=rng)


def train_model(kind: str, workdir: str, config, *, testbed: tb.TestbedConfig | None = None, progress: bool = True,
                echo=print, stop_after: int | None = None, **unet):
    """Train ``kind`` on the testbed (``testbed`` config, default ``TestbedConfig()``) in ``workdir``
    (resumes there). Returns (model, ``TrainResult``, bed)."""
    bed = tb.make_testbed(testbed or tb.TestbedConfig())
    model = build_model(bed, kind, **unet)
    images, cond, _ = training_data(bed, kind)
    result = train(model, images, cond, config, workdir, progress=progress, stop_after=stop_after, echo=echo)
    return model, result, bed


def export_model(out: str, kind: str, model: UNetModel, params, bed: tb.Testbed, *, train_config=None,
                 train_seconds: float | None = None, extra: dict | None = None) -> str:
    """Write the shipped directory ``out`` (card, EMA params, bank); replaces an existing one."""
    out = os.path.abspath(out)
    tmp = out + ".partial"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    ck = ocp.StandardCheckpointer()
    ck.save(os.path.join(tmp, PARAMS), jax.device_get(params))
    ck.wait_until_finished()
    ck.close()
    save_bank(os.path.join(tmp, BANK), reference_bank(bed, kind))
    _, _, names = training_data(bed, kind)
    card = {
        "format": "amg_jax.testbed_model", "version": 1, "kind": kind, "name": model.name,
        "testbed": dataclasses.asdict(bed.config), "unet": model.config_dict(),
        "tokenizer": CaptionTokenizer.from_captions(bed.captions).to_dict() if kind == "text" else None,
        "condition_names": list(names),
        "training": None if train_config is None else dict(dataclasses.asdict(train_config), seconds=train_seconds),
    }
    card.update(extra or {})
    write_json(os.path.join(tmp, CARD), card)
    if os.path.exists(out):
        shutil.rmtree(out)
    os.replace(tmp, out)
    return out


def update_card(path: str, **fields) -> dict:
    """Merge ``fields`` (e.g. ``memorization={...}``) into ``path``'s card."""
    card = read_card(path)
    card.update(fields)
    write_json(os.path.join(path, CARD), card)
    return card


def read_card(path: str) -> dict:
    """The card of a shipped model directory (clear errors for a missing / malformed one)."""
    if not os.path.isdir(path):
        raise FileNotFoundError(f"model directory {path} does not exist")
    p = os.path.join(path, CARD)
    if not os.path.exists(p):
        raise FileNotFoundError(f"{path} is not a testbed model: it has no {CARD}")
    card = read_json(p, "model card")
    if not isinstance(card, dict) or card.get("format") != "amg_jax.testbed_model":
        raise ValueError(f"{p} is not a testbed model card (format {card.get('format') if isinstance(card, dict) else None!r})")
    for key in ("kind", "testbed", "unet"):
        if key not in card:
            raise ValueError(f"{p} has no {key!r}")
    _check_kind(card["kind"])
    return card


class LoadedModel(NamedTuple):
    denoiser: Denoiser
    model: UNetModel
    bed: tb.Testbed
    bank: Any
    card: dict


def load_model(path: str) -> LoadedModel:
    """A shipped testbed model directory -> (denoiser, model, testbed, bank, card).

    Raises FileNotFoundError for a missing directory / card / params, ValueError for a malformed
    card, params that do not match the card's UNet config (another model's params), or a
    truncated / unreadable params checkpoint, naming the file.
    """
    path = os.path.abspath(path)
    card = read_card(path)
    try:
        cfg = tb.TestbedConfig(**{k: _tuples(v) for k, v in card["testbed"].items()})
    except (TypeError, ValueError) as e:
        raise ValueError(f"{path}/{CARD}: bad testbed config: {e}") from None
    bed = tb.make_testbed(cfg)
    unet = {k: _tuples(v) for k, v in card["unet"].items()
            if k in {f.name for f in dataclasses.fields(UNetConfig)}
            and k not in ("image_size", "conditioning", "num_classes", "vocab_size", "max_tokens")}
    try:
        model = build_model(bed, card["kind"], name=card.get("name"), **unet)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{path}/{CARD}: bad UNet config: {e}") from None
    if model.config_dict() != card["unet"]:
        diff = sorted(k for k in set(model.config_dict()) | set(card["unet"])
                      if model.config_dict().get(k) != card["unet"].get(k))
        raise ValueError(f"{path}/{CARD}: the card's UNet config does not match its testbed (differs in {diff})")
    ppath = os.path.join(path, PARAMS)
    if not os.path.isdir(ppath):
        raise FileNotFoundError(f"{path} has no {PARAMS}/ (the model's weights)")
    target = jax.eval_shape(model.init, jax.random.key(0))
    ck = ocp.StandardCheckpointer()
    quiet_failed_reads()
    try:
        params = ck.restore(ppath, target)
    except (ValueError, KeyError) as e:
        quiet_failed_reads(collect=True)
        msg = str(e).splitlines()[0][:300]
        raise ValueError(f"{ppath}: the weights do not match the card's UNet config or are damaged ({msg})") from None
    except Exception as e:    # noqa: BLE001  orbax / tensorstore raise many types for damaged files
        quiet_failed_reads(collect=True)
        msg = str(e).splitlines()[0][:300]
        raise ValueError(f"{ppath}: the weights are unreadable (truncated or damaged?): "
                         f"{type(e).__name__}: {msg}") from None
    finally:
        ck.close()
    want = jax.tree.map(lambda a: tuple(a.shape), target)
    got = jax.tree.map(lambda a: tuple(np.shape(a)), params)
    if jax.tree.structure(want) != jax.tree.structure(got) or want != got:
        bad = [f"{jax.tree_util.keystr(k)}: {g} (card wants {w})"
               for (k, w), g in zip(jax.tree_util.tree_leaves_with_path(want, is_leaf=lambda v: isinstance(v, tuple)),
                                    jax.tree.leaves(got, is_leaf=lambda v: isinstance(v, tuple))) if w != g][:3]
        raise ValueError(f"{ppath}: the weights do not match the card's UNet config (another model's weights?): "
                         + ("; ".join(bad) or "different parameter tree"))
    bank = load_bank(os.path.join(path, BANK))
    den = unet_denoiser(model, params, condition_names=card.get("condition_names") or None)
    return LoadedModel(den, model, bed, bank, card)


__all__ = ["BANK", "CARD", "KINDS", "LoadedModel", "PARAMS", "build_model", "export_model", "load_model",
           "read_card", "reference_bank", "train_model", "training_data", "update_card"]
