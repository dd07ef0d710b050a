"""Tiny random-weight Stable Diffusion models for tests, benches and examples (nothing is downloaded).

- ``tiny_configs(sample_size, text_dim, vocab_size, variant)``: diffusers / transformers config.json dicts of
  a tiny SD 1.x / 2.x / SDXL; ``SD_V1_SCHEDULER`` / ``SD_V2_SCHEDULER`` / ``SDXL_SCHEDULER``: their
  published scheduler configs.
- ``module_inits(configs)``, ``random_params``, ``random_sd_params``: our modules and NumPy-drawn params
  for them (no init compile), SD-1.5-sized ones included (the bench's).
- ``write_tiny_tokenizer(dir)``: a CLIP tokenizer with a locally learnt vocabulary.
- ``write_tiny_sd(dir, seed, framework, variant)``: a whole diffusers-layout folder, Flax ``.msgpack`` or
  (with torch) PyTorch ``.safetensors``, that ``load_stable_diffusion`` reads as it reads the hub's.
"""
from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
from flax.serialization import to_bytes
from flax.traverse_util import flatten_dict, unflatten_dict

from amg_jax.models.clip_text import ClipTextConfig, ClipTextEncoder
from amg_jax.models.sd_unet import UNet2DCondition, UNetConfig
from amg_jax.models.sd_vae import AutoencoderKL, VAEConfig
from amg_jax.models.stable_diffusion import quiet_libraries


SD_V1_SCHEDULER = {
    "_class_name": "PNDMScheduler", "beta_end": 0.012, "beta_schedule": "scaled_linear", "beta_start": 0.00085,
    "clip_sample": False, "num_train_timesteps": 1000, "set_alpha_to_one": False, "skip_prk_steps": True,
    "steps_offset": 1, "trained_betas": None,
}
# SD 2.x's (stabilityai/stable-diffusion-2-1): DDIM keys, v-prediction
SD_V2_SCHEDULER = dict(SD_V1_SCHEDULER, _class_name="DDIMScheduler", prediction_type="v_prediction")
# SDXL's (stabilityai/stable-diffusion-xl-base-1.0)
SDXL_SCHEDULER = {
    "_class_name": "EulerDiscreteScheduler", "beta_end": 0.012, "beta_schedule": "scaled_linear",
    "beta_start": 0.00085, "clip_sample": False, "interpolation_type": "linear", "num_train_timesteps": 1000,
    "prediction_type": "epsilon", "sample_max_value": 1.0, "set_alpha_to_one": False, "skip_prk_steps": True,
    "steps_offset": 1, "timestep_spacing": "leading", "trained_betas": None, "use_karras_sigmas": False,
}
VARIANTS = ("sd1", "sd2", "sdxl")
SCHEDULERS = {"sd1": SD_V1_SCHEDULER, "sd2": SD_V2_SCHEDULER, "sdxl": SDXL_SCHEDULER}


def tiny_configs(sample_size: int = 8, text_dim: int = 32, vocab_size: int = 1000, variant: str = "sd1") -> dict:
    """Configs of a tiny SD (diffusers / transformers config.json keys): UNet (32, 64) channels, 4-block
    VAE (factor 8), 2-layer CLIP text encoder(s). ``variant``: "sd1" (conv projections, quick-GELU text
    encoder), "sd2" (linear projections, per-block heads, GELU text encoder; its scheduler is
    v-prediction) or "sdxl" (SDXL's block order, 2 transformer layers in the attention level, the
    ``text_time`` conditioning, a second text encoder with a projection)."""
    if variant not in VARIANTS:
        raise ValueError(f"tiny_configs: variant must be one of {list(VARIANTS)}, got {variant!r}")
    unet = dict(sample_size=sample_size, in_channels=4, out_channels=4,
                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), block_out_channels=(32, 64),
                layers_per_block=1, attention_head_dim=4, cross_attention_dim=text_dim, norm_num_groups=32)
    vae = dict(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
               up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(16, 16, 16, 16), layers_per_block=1,
               latent_channels=4, norm_num_groups=8, sample_size=sample_size * 8)
    text = dict(vocab_size=vocab_size, hidden_size=text_dim, intermediate_size=2 * text_dim, num_hidden_layers=2,
                num_attention_heads=4, max_position_embeddings=77, projection_dim=text_dim, hidden_act="quick_gelu")
    out = {"unet": unet, "vae": vae, "text_encoder": text}
    if variant in ("sd2", "sdxl"):
        unet.update(use_linear_projection=True, attention_head_dim=(2, 4))
        text.update(hidden_act="gelu")
    if variant == "sdxl":
        unet.update(down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                    up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), transformer_layers_per_block=(1, 2),
                    cross_attention_dim=2 * text_dim, addition_embed_type="text_time", addition_time_embed_dim=8,
                    projection_class_embeddings_input_dim=text_dim + 6 * 8)
        vae.update(scaling_factor=0.13025)
        out["text_encoder_2"] = dict(text, hidden_act="gelu")
    return out


def random_params(init_fn, rng: np.random.Generator):
    """Random params with the structure of ``init_fn(key)`` without running (or compiling) it:
    kernels N(0, 1 / fan_in), embeddings N(0, 0.5^2), norm scales 1 + N(0, 0.02^2), biases N(0, 0.02^2).
    Building a tiny model's params this way takes milliseconds instead of an XLA compilation."""

    shapes = flatten_dict(jax.eval_shape(init_fn, jax.random.PRNGKey(0)))
    out = {}
    for key, leaf in shapes.items():
        shape, name = tuple(leaf.shape), key[-1]
        z = rng.standard_normal(shape).astype(np.float32)
        if name == "kernel":
            z = z / np.sqrt(max(1, int(np.prod(shape[:-1]))))
        elif name == "embedding":
            z = 0.5 * z
        elif name == "scale":
            z = 1.0 + 0.02 * z
        else:
            z = 0.02 * z
        out[key] = jnp.asarray(z, leaf.dtype)
    return unflatten_dict(out)


def module_inits(configs: dict) -> dict:
    """{component: (module, init args)} of amg_jax's modules for diffusers-style ``configs`` (float32)."""
    unet_cfg = UNetConfig.from_dict(configs["unet"])
    vae_cfg = VAEConfig.from_dict(configs["vae"])
    s, f = unet_cfg.downsampling, vae_cfg.factor
    out = {}
    added = None
    if "text_encoder_2" in configs:
        p = ClipTextConfig.from_dict(configs["text_encoder_2"]).projection_dim
        added = (jnp.zeros((1, p)), jnp.zeros((1, 6)))
    out["unet"] = (UNet2DCondition(unet_cfg), (jnp.zeros((1, s, s, unet_cfg.in_channels)), jnp.zeros((1,), jnp.int32),
                                               jnp.zeros((1, 1, unet_cfg.cross_attention_dim)), added))
    out["vae"] = (AutoencoderKL(vae_cfg), (jnp.zeros((1, f, f, vae_cfg.in_channels)),))
    for c in ("text_encoder", "text_encoder_2"):
        if c in configs:
            t = ClipTextConfig.from_dict(configs[c])
            out[c] = (ClipTextEncoder(t, projection=c == "text_encoder_2"),
                      (jnp.zeros((1, t.max_position_embeddings), jnp.int32),))
    return out


def random_sd_params(configs: dict, rng: np.random.Generator) -> dict:
    """{component: random params} (``random_params``) of ``module_inits(configs)``; the VAE decoder's
    output layer is scaled by 0.3, which keeps the random decoder's pixels mostly inside [-1, 1]."""
    out = {c: random_params(lambda k, m=m, a=a: m.init(k, *a)["params"], rng)
           for c, (m, a) in module_inits(configs).items()}
    conv_out = out["vae"]["decoder"]["conv_out"]
    conv_out["kernel"] = 0.3 * conv_out["kernel"]
    return out


def write_tiny_tokenizer(directory: str, extra_merges: int = 200):
    """A CLIPTokenizer (vocab.json + merges.txt) with CLIP's 512 byte-level symbols, ``extra_merges``
    merges of frequent English letter pairs, and the start / end tokens (end = the highest id, as in
    CLIP). Any text tokenizes without unknown tokens. Returns the tokenizer."""
    from transformers import CLIPTokenizer    # heavy: the tokenizer only
    from transformers.models.clip.tokenization_clip import bytes_to_unicode  # heavy / optional

    os.makedirs(directory, exist_ok=True)
    symbols = list(bytes_to_unicode().values())
    vocab = symbols + [s + "</w>" for s in symbols]
    letters = "etaoinshrdlcumwfgypbvkjxqz"
    merges = []
    for a in letters:
        for b in letters:
            if len(merges) < extra_merges:
                merges.append((a, b + "</w>") if (len(merges) % 2) else (a, b))
    vocab += [a + b for a, b in merges] + ["<|startoftext|>", "<|endoftext|>"]
    vocab_file, merges_file = os.path.join(directory, "vocab.json"), os.path.join(directory, "merges.txt")
    with open(vocab_file, "w") as f:
        json.dump({tok: i for i, tok in enumerate(vocab)}, f)
    with open(merges_file, "w") as f:
        f.write("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    with quiet_libraries():
        tok = CLIPTokenizer(vocab_file, merges_file, model_max_length=77)
        tok.save_pretrained(directory)
    return tok


def _write_json(path: str, obj: dict) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump(obj, f, indent=2)


def write_tiny_sd(directory: str | os.PathLike, seed: int = 0, *, framework: str = "flax",
                  sample_size: int = 8, scheduler_config: dict | None = None, variant: str = "sd1") -> str:
    """Write a tiny random-weight Stable Diffusion in diffusers' layout; returns the directory.

    framework: "flax" (amg_jax's modules' random params as diffusion_flax_model.msgpack /
    flax_model.msgpack, in diffusers' / transformers' Flax trees) or "pt" (diffusers'
    UNet2DConditionModel / AutoencoderKL and transformers' CLIPTextModel(WithProjection), .safetensors;
    needs torch). variant: "sd1", "sd2" (v-prediction) or "sdxl" (``tiny_configs``). sample_size: latent
    size (the image is 8x larger). scheduler_config: replaces keys of the variant's scheduler config.
    """
    if framework not in ("flax", "pt"):
        raise ValueError(f"write_tiny_sd: framework must be 'flax' or 'pt', got {framework!r}")
    if variant not in VARIANTS:
        raise ValueError(f"write_tiny_sd: variant must be one of {list(VARIANTS)}, got {variant!r}")
    directory = os.fspath(directory)
    os.makedirs(directory, exist_ok=True)
    xl = variant == "sdxl"
    toks = ["tokenizer"] + (["tokenizer_2"] if xl else [])
    vocab = {}
    for name in toks:
        vocab = write_tiny_tokenizer(os.path.join(directory, name)).get_vocab()
    cfg = tiny_configs(sample_size=sample_size, vocab_size=len(vocab), variant=variant)
    texts = [c for c in ("text_encoder", "text_encoder_2") if c in cfg]
    for c in texts:
        cfg[c].update(bos_token_id=vocab["<|startoftext|>"], eos_token_id=vocab["<|endoftext|>"],
                      pad_token_id=vocab["<|endoftext|>"])
    sched = dict(SCHEDULERS[variant], **(scheduler_config or {}))
    flax = "Flax" if framework == "flax" else ""
    text_classes = {"text_encoder": "CLIPTextModel", "text_encoder_2": "CLIPTextModelWithProjection"}
    import diffusers    # for its version string and, with "pt", its PyTorch classes

    with quiet_libraries():
        from transformers import CLIPTextConfig  # a config class (no model)

        if framework == "flax":
            params = random_sd_params(cfg, np.random.default_rng(seed))
            for c in ("unet", "vae"):
                _write_json(os.path.join(directory, c, "config.json"),
                            dict(cfg[c], _class_name=f"Flax{'UNet2DConditionModel' if c == 'unet' else 'AutoencoderKL'}",
                                 _diffusers_version=diffusers.__version__))
                with open(os.path.join(directory, c, "diffusion_flax_model.msgpack"), "wb") as f:
                    f.write(to_bytes(params[c]))
            for c in texts:
                conf = CLIPTextConfig(**cfg[c])
                conf.architectures = ["Flax" + text_classes[c]]
                conf.save_pretrained(os.path.join(directory, c))
                with open(os.path.join(directory, c, "flax_model.msgpack"), "wb") as f:
                    f.write(to_bytes(params[c]))
        else:
            import torch    # optional (the torch extra): only to write PyTorch weights
            from diffusers import AutoencoderKL as TorchVAE, UNet2DConditionModel  # heavy / optional
            import transformers

            torch.manual_seed(seed)
            UNet2DConditionModel(**cfg["unet"]).save_pretrained(os.path.join(directory, "unet"))
            vae = TorchVAE(**cfg["vae"])
            with torch.no_grad():
                vae.decoder.conv_out.weight.mul_(0.3)   # as for Flax: pixels mostly inside [-1, 1]
            vae.save_pretrained(os.path.join(directory, "vae"))
            for c in texts:
                getattr(transformers, text_classes[c])(CLIPTextConfig(**cfg[c])).save_pretrained(
                    os.path.join(directory, c))
    _write_json(os.path.join(directory, "scheduler", "scheduler_config.json"), sched)
    # what each library's pipeline.save_pretrained writes: Flax class names for Flax weights
    index = {"_class_name": f"{flax}StableDiffusion{'XL' if xl else ''}Pipeline",
             "_diffusers_version": diffusers.__version__,
             "scheduler": ["diffusers", flax + sched["_class_name"]],
             "unet": ["diffusers", f"{flax}UNet2DConditionModel"], "vae": ["diffusers", f"{flax}AutoencoderKL"]}
    for c in texts:
        index[c] = ["transformers", flax + text_classes[c]]
    for t in toks:
        index[t] = ["transformers", "CLIPTokenizer"]
    if xl:
        index["force_zeros_for_empty_prompt"] = True
    else:
        index.update(feature_extractor=[None, None], safety_checker=[None, None])
        if framework == "pt":
            index["requires_safety_checker"] = False
    _write_json(os.path.join(directory, "model_index.json"), index)
    return directory


__all__ = ["SCHEDULERS", "SDXL_SCHEDULER", "SD_V1_SCHEDULER", "SD_V2_SCHEDULER", "VARIANTS", "module_inits",
           "random_params", "random_sd_params", "tiny_configs", "write_tiny_sd", "write_tiny_tokenizer"]
