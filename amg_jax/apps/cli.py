"""The `amg` command line. Every subcommand validates its arguments before any work starts.

Each subcommand's parser names the function that runs it (``set_defaults(func=...)``); ``main``
parses, silences the libraries' chatter and calls it with the command's own parser, through
which an error found after parsing is reported (``amg eval: error: ...``, exit status 2).
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
import warnings

import jax

from amg_jax.apps import bench, demo, evaluate, sweep
from amg_jax.apps.models import MODELS, TESTBEDS, is_sd, testbed_config
from amg_jax.apps.sample import SampleRun, run_sample
from amg_jax.apps.screens import SCREEN_CHOICES
from amg_jax.apps.sweep.config import read_prompts
from amg_jax.data.testbed import KINDS as PROMPT_KINDS
from amg_jax.evaluation import inception
from amg_jax.evaluation.evalnet import save_evaluator, train_evalnet
from amg_jax.guidance import GUIDANCES, METHODS
from amg_jax.guidance.amg import C3_UNITS, GRADIENTS, SCORES, THRESHOLDS, AMGConfig
from amg_jax.index_fetch import fetch_images, read_prompt_list
from amg_jax.index_build import EMBEDDERS, build_index, captions_path, image_embedder, list_images
from amg_jax.models import zoo
from amg_jax.models.attention import ATTENTION_IMPLEMENTATIONS
from amg_jax.prompt_baselines import PROMPT_BASELINES
from amg_jax.samplers import SAMPLERS
from amg_jax.sharding import maybe_initialize_distributed
from amg_jax.similarity import sscd
from amg_jax.train import TrainConfig


def _quiet_libraries() -> None:
    """Silence diffusers' / transformers' deprecation chatter (Flax classes are deprecated there)."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    for name in ("diffusers", "transformers"):
        logging.getLogger(name).setLevel(logging.ERROR)


def _csv(choices):
    """argparse type: a comma-separated list whose items are all in ``choices``."""
    def parse(text: str) -> tuple:
        items = tuple(t.strip() for t in text.split(",") if t.strip())
        if not items:
            raise argparse.ArgumentTypeError("expected a comma-separated list, got nothing")
        bad = [t for t in items if t not in choices]
        if bad:
            raise argparse.ArgumentTypeError(f"unknown {bad[0]!r}; choose from {', '.join(choices)}")
        return items
    return parse


def _number(cast, what: str, check, rule: str):
    """argparse type: ``cast(text)`` that must satisfy ``check`` (else: ``rule``)."""
    def parse(text: str):
        try:
            v = cast(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if not check(v):
            raise argparse.ArgumentTypeError(f"{rule}, got {text!r}")
        return v
    return parse


_positive_int = _number(int, "an integer", lambda v: v >= 1, "must be >= 1")
_finite_float = _number(float, "a number", lambda v: abs(v) < float("inf"), "must be finite")
_positive_float = _number(float, "a number", lambda v: 0 < v < float("inf"), "must be a finite number > 0")
_count = _number(int, "an integer", lambda v: v >= 0, "must be >= 0")
_unet_channels = _number(int, "an integer", lambda v: v >= 8 and v % 8 == 0,
                         "must be a positive multiple of 8 (the UNet's GroupNorm groups)")


def _check_out(parser, path, flag: str, *, file: bool = False) -> None:
    """Fail before any work when ``path`` (a directory, or a ``file``) cannot be written, so a
    long run does not end on an unwritable output; ``flag`` names the argument."""
    if path is None:
        return
    full = os.path.abspath(path)
    if file and os.path.isdir(full):
        parser.error(f"{flag} {path!r} is a directory; expected a file name")
    if not file and os.path.exists(full) and not os.path.isdir(full):
        parser.error(f"{flag} {path!r} exists and is not a directory")
    p = os.path.dirname(full) if file else full
    while not os.path.exists(p):
        p = os.path.dirname(p)
    if not os.path.isdir(p):
        parser.error(f"{flag} {path!r} cannot be created: {p!r} is not a directory")
    if not os.access(p, os.W_OK):
        parser.error(f"{flag} {path!r} cannot be created: {p!r} is not writable")


class _Help(argparse.ArgumentDefaultsHelpFormatter):
    """Show defaults, except for options whose default is "not set" (None)."""

    def _get_help_string(self, action):
        return action.help if action.default is None else super()._get_help_string(action)


def _add_no_progress(p) -> None:
    """``--no-progress`` (sets ``progress`` False; True by default, without the formatter's
    misleading "(default: True)" after a flag that turns it off)."""
    p.set_defaults(progress=True)
    p.add_argument("--no-progress", dest="progress", action="store_false", default=argparse.SUPPRESS,
                   help="hide the progress bar")


def _add_run_args(p) -> None:
    """The options every testbed run shares: prompts, seeds, sampler, steps, scale, seed."""
    p.add_argument("--prompts", dest="prompts_per_kind", type=_positive_int, default=4, metavar="N",
                   help="prompts of each kind (specific, duplicated, generic)")
    p.add_argument("--samples", dest="samples_per_prompt", type=_positive_int, default=8, metavar="N",
                   help="seeds per prompt")
    p.add_argument("--sampler", choices=SAMPLERS, default="ddim", help="sampler")
    p.add_argument("--steps", type=_positive_int, default=50, help="sampling steps")
    p.add_argument("--scale", type=_finite_float, default=None,
                   help="guidance scale s0 (default: a trained model's card guidance_scale, else 7.5)")
    p.add_argument("--seed", type=int, default=0, help="seed of prompts, sampling noise and references")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="amg",
        description="amg_jax: make diffusion models stop copying their training images - "
                    "Anti-Memorization Guidance and the attraction-basin methods (delayed CFG with a "
                    "static or dynamic transition point, opposite guidance) in JAX.",
        epilog="Run `amg COMMAND --help` for a command's options.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    d = sub.add_parser(
        "demo", help="compare CFG, delayed CFG (STP, DTP) and AMG on the trained testbed UNet",
        description="Sample the methods on the testbed with the shipped text-conditional UNet "
                    "(checkpoints/text, trained until it copies its duplicated and specific captions); "
                    "--models adds the class-conditional and unconditional UNets, the perfect memorizer "
                    "(the empirical denoiser: every method ends on a training image) and the partial "
                    "memorizer (a Gaussian mixture plus training images as point masses). Writes grid_<model>.png, "
                    "similarity_<model>.png (AMG's similarity vs gate threshold over steps), "
                    "metrics.json and prints the table: share copied (calibrated criterion), nL2 < 1.4, "
                    "median nL2, Frechet distance vs fresh true renders, alignment, pixels out of range.",
        formatter_class=_Help)
    d.add_argument("--out", default="demo_out", help="output directory")
    d.add_argument("--models", type=_csv(MODELS), default=",".join(demo.DEFAULT_MODELS), metavar="LIST",
                   help=f"comma-separated models from: {', '.join(MODELS)}")
    d.add_argument("--methods", type=_csv(METHODS), default=",".join(demo.DEFAULT_METHODS), metavar="LIST",
                   help=f"comma-separated methods from: {', '.join(METHODS)}")
    d.add_argument("--testbed", choices=TESTBEDS + ("auto",), default="auto",
                   help="auto: the models' (unet for the trained UNets, else default); default: 32x32, "
                        "62 captions; small: 16x16, 12 captions (quick); unet: the default captions at 16x16")
    _add_run_args(d)
    _add_no_progress(d)
    d.set_defaults(func=_run_demo)
    _add_eval(sub)
    _add_train(sub)
    _add_evalnet(sub)
    _add_convert(sub)
    _add_index(sub)
    _add_sample(sub)
    _add_sweep(sub)
    _add_bench(sub)
    return parser


def _add_bench(sub) -> None:
    b = sub.add_parser(
        "bench", help="measure speed: vs diffusers' Flax pipeline, AMG vs CFG, search vs bank size, devices",
        description="Benchmark amg_jax against references measured in the same run (ratios): plain CFG vs "
                    "diffusers' FlaxStableDiffusionPipeline, AMG vs CFG (gate closed / open / a realistic mix; "
                    "pixel and SSCD-through-VAE detectors; full vs cheap gradient), nearest-neighbour search vs "
                    "bank size, scaling over devices. Writes OUT/bench.json and OUT/bench.md.",
        formatter_class=_Help)
    b.set_defaults(func=_run_bench)
    b.add_argument("--out", default="bench_out", help="output directory")
    b.add_argument("--quick", action="store_true", help="tiny settings: the tiny SD, 3 steps, no gate-open loops (about 2 minutes on 2 CPU cores)")
    b.add_argument("--parts", default=None, help="comma-separated parts: pipeline, kernels, amg, search, devices")
    b.add_argument("--sd-size", choices=("tiny", "1.5", "xl"), default="tiny",
                   help="Stable Diffusion size for the SD parts (1.5 / xl: random SD-1.5- / SDXL-sized, GPU)")
    b.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32",
                   help="the SD networks' dtype")
    b.add_argument("--attention", choices=ATTENTION_IMPLEMENTATIONS, default="auto",
                   help="attention kernel: auto (cuDNN's fused one on NVIDIA GPUs for 16-bit models), xla, cudnn")
    b.add_argument("--sd", dest="sd_path", help="a local diffusers SD directory to benchmark instead")
    b.add_argument("--steps", type=_positive_int, help="sampling steps")
    b.add_argument("--batch", type=_positive_int, help="images per call")
    b.add_argument("--repeats", type=_positive_int, help="timed repeats (median)")


def _run_bench(args, parser) -> None:
    _check_out(parser, args.out, "--out")
    try:
        res = bench.main(args.out, quick=args.quick, parts=args.parts, sd_size=args.sd_size, sd_path=args.sd_path,
                         steps=args.steps, batch=args.batch, repeats=args.repeats, dtype=args.dtype,
                         attention=args.attention)
    except (ValueError, OSError) as err:
        parser.error(str(err))
    print(f"wrote {args.out}/bench.json and bench.md ({len(res.get('parts', {}))} parts)")


def _add_sweep(sub) -> None:
    w = sub.add_parser(
        "sweep", help="run a sweep config (methods x parameter grids) and write its tables, grids and plots",
        description="Run every cell (method x the product of its list-valued settings) of a TOML sweep config "
                    "(see experiments/configs/), writing each cell's results atomically as it finishes; a re-run "
                    "skips finished cells. At the end: results.csv, results.md, grids/ and plots/ in the config's "
                    "out folder. The config is checked before any work.",
        formatter_class=_Help)
    w.set_defaults(func=_run_sweep)
    w.add_argument("config", help="sweep config (.toml)")
    _add_no_progress(w)


def _run_sweep(args, parser) -> int:
    try:
        config = sweep.load_config(args.config)
    except (ValueError, FileNotFoundError) as err:
        parser.error(str(err))
    _check_out(parser, config.out, f"{args.config}: sweep.out")
    try:
        res = sweep.main(args.config, progress=args.progress)
    except sweep.SweepError as err:
        print(f"amg sweep: {err}", file=sys.stderr)
        return 1
    except (ValueError, OSError) as err:
        parser.error(str(err))
    print(f"wrote {res['out']}: {len(res['cells'])} cells (results.csv, results.md, grids/, plots/)")
    return 0


def _add_sample(sub) -> None:
    s = sub.add_parser(
        "sample", help="sample Stable Diffusion with CFG, a basin method or AMG; write images and traces",
        description="Sample a Stable Diffusion model (sd:DIR in diffusers layout, Flax or PyTorch weights, or "
                    "sd:HUB_ID when online) for each --prompt and seed, batches sharded over all devices, and "
                    "write OUT/images/*.png, OUT/trace.npz (per-step similarity, gate, scales) and "
                    "OUT/samples.json. AMG decodes x0_hat with the VAE and compares its SSCD or CLIP embedding "
                    "with a bank from `amg index build`.",
        formatter_class=_Help)
    s.set_defaults(func=_run_sample)
    s.add_argument("--model", required=True, help="sd:PATH_OR_HUB_ID")
    which = s.add_mutually_exclusive_group(required=True)
    which.add_argument("--prompt", action="append", help="a prompt (repeat for several)")
    which.add_argument("--prompts-file", help="prompts, one a line, or .jsonl lines with 'prompt' or 'caption' "
                                              "(e.g. sdv1_500_memorized.jsonl)")
    s.add_argument("--out", required=True, help="output directory")
    s.add_argument("--guidance", dest="method", choices=METHODS, default="cfg", help="method")
    s.add_argument("--base", choices=METHODS[:-1], default="cfg", help="the guidance AMG wraps")
    s.add_argument("--seeds", type=_positive_int, default=1, help="seeds per prompt")
    s.add_argument("--seed", type=int, default=0, help="first seed")
    s.add_argument("--scale", type=_finite_float, default=7.5, help="guidance scale")
    s.add_argument("--sampler", choices=SAMPLERS, default="ddim", help="sampler")
    s.add_argument("--steps", type=_positive_int, default=50, help="sampling steps")
    s.add_argument("--height", type=_positive_int, help="image height (default: the model's)")
    s.add_argument("--width", type=_positive_int, help="image width (default: the model's)")
    s.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32", help="compute dtype")
    s.add_argument("--attention", choices=ATTENTION_IMPLEMENTATIONS, default="auto",
                   help="attention kernel: auto (cuDNN's fused one on NVIDIA GPUs for 16-bit models), xla, cudnn")
    s.add_argument("--batch", type=_positive_int, default=8, help="images per sampler call")
    s.add_argument("--baseline", choices=sorted(PROMPT_BASELINES),
                   help="a Somepalli et al. mitigation on the prompts (gni: noise on the text embedding)")
    s.add_argument("--detector", help="AMG's detector: sscd:PARAMS.npz (amg convert sscd) or clip:DIR_OR_HUB_ID")
    s.add_argument("--bank", help="AMG's reference bank (amg index build, with the same embedder)")
    s.add_argument("--measure", metavar="sscd:PARAMS.npz",
                   help="measure every image's SSCD to --bank (any method): per image in samples.json, "
                        "per prompt (max / mean over seeds, share > 0.5) in OUT/per_prompt.csv, aggregates with "
                        "bootstrap intervals over prompts")
    s.add_argument("--clip", metavar="DIR_OR_HUB_ID",
                   help="a CLIP (e.g. openai/clip-vit-large-patch14): every image's CLIP score with its prompt, "
                        "per image, per prompt and as a mean with its bootstrap interval over prompts")
    _add_screen_args(s)
    a = s.add_argument_group("AMG settings (defaults: the papers' SD settings c1=4, c2=3, c3=100 raw)")
    a.add_argument("--c1", type=_finite_float, help="despecification strength")
    a.add_argument("--c2", type=_finite_float, help="caption deduplication strength")
    a.add_argument("--c3", type=_finite_float, help="dissimilarity strength (raw)")
    a.add_argument("--threshold", choices=THRESHOLDS, help="gate schedule")
    a.add_argument("--lambda-min", type=_finite_float, help="gate threshold early (default sscd 0.2, clip 0.7)")
    a.add_argument("--lambda-max", type=_finite_float, help="gate threshold at the end (default sscd 0.5, clip 0.9)")
    a.add_argument("--gradient", choices=GRADIENTS, help="full (through the UNet) or cheap G_sim gradient")


def _run_sample(args, parser) -> None:
    if not is_sd(args.model):
        parser.error(f"sample: --model must be sd:PATH_OR_HUB_ID (a Stable Diffusion in diffusers layout), got "
                     f"{args.model!r}; the testbed models are sampled by `amg eval` / `amg demo`")
    amg = tuple((f, getattr(args, f)) for f in ("c1", "c2", "c3", "threshold", "lambda_min", "lambda_max", "gradient")
                if getattr(args, f) is not None)
    _check_out(parser, args.out, "--out")
    try:
        prompts = list(args.prompt) if args.prompt else [p for p, _ in read_prompts(args.prompts_file)]
        if not prompts:
            raise ValueError(f"sample: --prompts-file {args.prompts_file} has no prompts")
        run = SampleRun(model=args.model, prompts=tuple(prompts), out=args.out, seeds=args.seeds, seed=args.seed,
                        method=args.method, base=args.base, scale=args.scale, sampler=args.sampler, steps=args.steps,
                        height=args.height, width=args.width, dtype=args.dtype, attention=args.attention,
                        detector=args.detector,
                        bank=args.bank, amg=amg, baseline=args.baseline, batch=args.batch, screen=args.screen,
                        screen_threshold=args.screen_threshold, measure=args.measure, clip=args.clip)
        report = run_sample(run)
    except (ValueError, OSError) as err:
        parser.error(str(err))
    print(f"wrote {len(report['samples'])} images to {args.out} ({report['seconds']:.1f}s)")
    if "sscd" in report:
        m = report["sscd"]
        lo, hi = m["frac_sscd_above_0.5_ci"]
        print(f"SSCD to the bank > 0.5: {m['frac_sscd_above_0.5']:.1%} [{lo:.1%}, {hi:.1%}] of images "
              f"({m['prompts']} prompts; 95% bootstrap over prompts), max {m['sscd_top1']:.3f}; per prompt: "
              f"{os.path.join(args.out, 'per_prompt.csv')}")
    summary = report.get("sscd", report.get("clip", {}))
    if "clip_score_ci" in summary:
        lo, hi = summary["clip_score_ci"]
        print(f"CLIP score: {summary['clip_score']:.2f} [{lo:.2f}, {hi:.2f}] (95% bootstrap over prompts)")


def _add_convert(sub) -> None:
    c = sub.add_parser("convert", help="convert released weights to amg_jax's Flax params",
                       description="Convert released PyTorch weights into Flax params amg_jax loads.")
    csub = c.add_subparsers(dest="what", metavar="WHAT", required=True)
    s = csub.add_parser("sscd", help="the official SSCD TorchScript file -> a .npz of Flax params",
                        description="Convert the SSCD copy-detection model (e.g. sscd_disc_mixup.torchscript.pt "
                                    "from facebookresearch/sscd-copy-detection; a torch.save'd state dict works "
                                    "too) into Flax params + config (.npz) for `--detector sscd:OUT` and "
                                    "`amg index build --embedder sscd:OUT`. Needs PyTorch.",
                        formatter_class=_Help)
    s.set_defaults(func=_run_convert)
    s.add_argument("src", help="TorchScript / state-dict file")
    s.add_argument("dst", help="output .npz")
    f = csub.add_parser("inception", help="the standard FID Inception weights -> a .npz of Flax params",
                        description="Convert pytorch-fid's FID Inception-v3 weights (pt_inception-2015-12-05-"
                                    "6726825d.pth, a torch state dict) into Flax params (.npz) for the FID "
                                    "metric (amg_jax.evaluation.inception). Needs PyTorch.",
                        formatter_class=_Help)
    f.set_defaults(func=_run_convert)
    f.add_argument("src", help="state-dict file (.pth)")
    f.add_argument("dst", help="output .npz")


def _run_convert(args, parser) -> None:
    if not os.path.isfile(args.src):
        parser.error(f"convert {args.what}: {args.src!r} does not exist")
    _check_out(parser, args.dst, f"convert {args.what}: dst", file=True)
    try:
        print((sscd if args.what == "sscd" else inception).convert_file(args.src, args.dst))
    except (ValueError, OSError) as err:
        parser.error(str(err))


def _add_index(sub) -> None:
    i = sub.add_parser("index", help="reference banks of training images for the detectors",
                       description="Build the reference bank the detectors search.")
    isub = i.add_subparsers(dest="what", metavar="WHAT", required=True)
    b = isub.add_parser(
        "build", help="embed a folder of images (and captions) into a bank",
        description="Embed every image under FOLDER (sorted; resized on the short side and centre-cropped) "
                    "with SSCD, CLIP or as raw pixels, in batches sharded over all devices, and write a "
                    "reference bank (.npz) with caption ids as labels (captions from --captions, "
                    "FOLDER/captions.jsonl|csv or sidecar .txt files; beside the bank in OUT.captions.json). "
                    "Finished batches are kept in OUT.partial/ and skipped when the command is re-run.",
        formatter_class=_Help)
    b.set_defaults(func=_run_index)
    b.add_argument("folder", help="folder of training images")
    b.add_argument("--out", required=True, help="bank file to write (.npz)")
    b.add_argument("--embedder", default="pixel", metavar="SPEC",
                   help=f"one of {', '.join(EMBEDDERS)}: pixel | sscd:PARAMS.npz | clip:DIR_OR_HUB_ID")
    b.add_argument("--size", type=_positive_int, nargs=2, metavar=("H", "W"),
                   help="image size (default: the embedder's input size; required for pixel)")
    b.add_argument("--captions", help="captions file (.jsonl with file/caption, or .csv)")
    b.add_argument("--batch", type=_positive_int, default=32, help="images per batch")
    b.add_argument("--copy-threshold", type=_finite_float,
                   help="store a calibrated copy threshold with the bank (pixel banks)")
    b.add_argument("--skip-bad", action="store_true", help="skip unreadable images with a warning")
    _add_no_progress(b)
    f = isub.add_parser(
        "fetch", help="download the training images of a prompt list (.jsonl / .csv with URLs)",
        description="Download each training image a prompt list names (.jsonl lines {\"caption\", \"url\", "
                    "\"index\"} as Wen et al.'s sdv1_500_memorized.jsonl, or a .csv with caption and url columns) "
                    "into OUT/<index>.<ext>, with OUT/captions.jsonl for `amg index build OUT` and every failure "
                    "(HTTP error, timeout, HTML instead of an image, truncated image, redirect loop) in "
                    "OUT/fetch_report.json. A re-run requests only the images not in OUT.",
        formatter_class=_Help)
    f.set_defaults(func=_run_index_fetch)
    f.add_argument("prompts", help="prompt list with image URLs (.jsonl or .csv)")
    f.add_argument("--out", required=True, help="folder to write the images to")
    f.add_argument("--workers", type=_positive_int, default=8, help="downloads at once")
    f.add_argument("--per-host", type=_positive_int, default=2, help="downloads at once from one host")
    f.add_argument("--timeout", type=_positive_float, default=10.0, help="seconds a connection or read may stall")
    f.add_argument("--deadline", type=_positive_float, default=60.0, help="seconds for one whole download")
    f.add_argument("--retries", type=_count, default=3,
                   help="retries (exponential back-off) after a timeout, a dropped connection, HTTP 429 or 5xx")
    _add_no_progress(f)


def _run_index(args, parser) -> None:
    _check_out(parser, args.out, "--out", file=True)
    try:
        list_images(args.folder)                     # fail on a bad folder before loading any model
        embed, name, size, kind = image_embedder(args.embedder, size=args.size)
        bank = build_index(args.folder, embed, args.out, size=size, batch=args.batch, captions=args.captions,
                           embedder_name=name, kind=kind, skip_bad=args.skip_bad, progress=args.progress,
                           copy_threshold=args.copy_threshold)
    except (ValueError, OSError) as err:
        parser.error(str(err))
    print(f"wrote {args.out}: {bank.size} rows of {bank.dim} ({name}), captions in {captions_path(args.out)}")


def _run_index_fetch(args, parser) -> None:
    _check_out(parser, args.out, "--out")
    try:
        read_prompt_list(args.prompts)              # a bad list fails before any request
        report = fetch_images(args.prompts, args.out, workers=args.workers, per_host=args.per_host,
                              timeout=args.timeout,
                              deadline=args.deadline, retries=args.retries, progress=args.progress)
    except (ValueError, OSError) as err:
        parser.error(str(err))
    print(f"{args.out}: {report['images']} of {report['entries']} images ({report['fetched']} fetched now, "
          f"{report['already_present']} already there, {report['failed']} failed: {args.out}/fetch_report.json); "
          f"next: amg index build {args.out} --out BANK.npz --embedder sscd:PARAMS.npz")


def _add_train(sub) -> None:
    t = sub.add_parser(
        "train", help="train a testbed UNet (text, class or unconditional) and export it",
        description="Train the testbed UNet of KIND (text: caption-conditioned; class: the shape "
                    "attribute; uncond) with AdamW + EMA, data parallel over all devices, checkpointing "
                    "in WORKDIR (an interrupted run resumes from its last checkpoint when run again), "
                    "then export the EMA weights, the reference bank and a card to OUT (the shipped "
                    "checkpoint format that `load_model` and `amg demo` read).",
        formatter_class=_Help)
    t.set_defaults(func=_run_train)
    d = TrainConfig()
    t.add_argument("--kind", choices=zoo.KINDS, required=True, help="conditioning")
    t.add_argument("--workdir", required=True, help="training directory (checkpoints, losses, resume)")
    t.add_argument("--out", default=None, help="export the trained model here (default: do not export)")
    t.add_argument("--testbed", choices=TESTBEDS, default="unet",
                   help="the training data (unet: the default captions at 16x16, what the shipped models use)")
    t.add_argument("--steps", type=_positive_int, default=d.steps, help="optimizer steps")
    t.add_argument("--batch", dest="batch_size", type=_positive_int, default=d.batch_size, help="batch size")
    t.add_argument("--lr", dest="learning_rate", type=_finite_float, default=d.learning_rate, help="learning rate")
    t.add_argument("--warmup", dest="warmup_steps", type=int, default=d.warmup_steps, help="warm-up steps")
    t.add_argument("--ema", dest="ema_decay", type=_finite_float, default=d.ema_decay, help="EMA decay")
    t.add_argument("--cond-dropout", type=_finite_float, default=d.cond_dropout, help="condition dropout (CFG)")
    t.add_argument("--checkpoint-every", type=_positive_int, default=d.checkpoint_every, help="steps between checkpoints")
    t.add_argument("--seed", type=int, default=d.seed, help="seed of init, batches and noise")
    t.add_argument("--channels", type=_unet_channels, default=32, help="UNet base width")
    _add_no_progress(t)


def _add_evalnet(sub) -> None:
    v = sub.add_parser(
        "evalnet", help="train the evaluation network (FD features, attribute alignment) and save it",
        description="Train the testbed's evaluation network on fresh true renders of random attribute "
                    "combinations (one head per attribute; its pooled features give the Frechet distance "
                    "`amg eval` and `amg demo` report, its predictions the alignment) and save it to OUT "
                    "(checkpoints/evalnet is the one the bench uses).",
        formatter_class=_Help)
    v.set_defaults(func=_run_evalnet)
    v.add_argument("--out", required=True, help="directory to write (evalnet.json + params.npz)")
    v.add_argument("--testbed", choices=TESTBEDS, default="unet", help="the testbed it judges")
    v.add_argument("--steps", type=_positive_int, default=4000, help="optimizer steps")
    v.add_argument("--batch", type=_positive_int, default=64, help="batch size (fresh renders per step)")
    v.add_argument("--lr", type=_positive_float, default=3e-3, help="peak learning rate")
    v.add_argument("--seed", type=int, default=0, help="seed of init and renders")


def _run_evalnet(args, parser) -> None:
    _check_out(parser, args.out, "--out")
    bed_cfg = testbed_config(args.testbed)
    try:
        ev = train_evalnet(bed_cfg, steps=args.steps, batch_size=args.batch, learning_rate=args.lr, seed=args.seed,
                           echo=print)
        path = save_evaluator(args.out, ev)
    except (ValueError, OSError) as err:
        parser.error(str(err))
    print("held-out accuracy: " + ", ".join(f"{k} {v:.3f}" for k, v in ev.accuracy.items()))
    print(f"saved the evaluation network to {path}")


def jax_devices() -> str:
    d = jax.devices()
    return f"{len(d)} x {d[0].device_kind}"


def _run_train(args, parser) -> None:
    try:
        config = TrainConfig(**{f: getattr(args, f) for f in (
            "steps", "batch_size", "learning_rate", "warmup_steps", "ema_decay", "cond_dropout",
            "checkpoint_every", "seed")})
    except ValueError as err:
        parser.error(str(err))
    _check_out(parser, args.workdir, "--workdir")
    _check_out(parser, args.out, "--out")
    bed_cfg = testbed_config(args.testbed)
    try:
        model, result, bed = zoo.train_model(args.kind, args.workdir, config, testbed=bed_cfg,
                                             progress=args.progress, channels=args.channels)
    except (ValueError, OSError) as err:
        parser.error(str(err))
    if args.out:
        path = zoo.export_model(args.out, args.kind, model, result.ema_params, bed, train_config=config,
                                train_seconds=(round(result.total_seconds, 1) if result.total_seconds == result.total_seconds
                                               else None),
                                extra={"training_command": "amg " + " ".join(sys.argv[1:]),
                                       "training_machine": f"{os.cpu_count()} CPU cores, {jax_devices()}"})
        print(f"exported {args.kind} model (step {result.step}) to {path}")


def _add_eval(sub) -> None:
    e = sub.add_parser(
        "eval", help="run one method (CFG, a basin method or AMG) on a model and prompt set; write metrics.json",
        description="Sample one method on the testbed model for the prompts of the chosen kinds and write "
                    "OUT/metrics.json (per kind and overall: memorized_frac, frac_nl2_below_1.4, sim_top5pct, "
                    "sim_top1, quality_fd, alignment, frac_out_of_range; for AMG gate_open_rate), "
                    "OUT/samples.png and, for AMG, OUT/similarity.png (similarity vs threshold over steps) "
                    "and OUT/trace.npz.",
        formatter_class=_Help)
    e.set_defaults(func=_run_eval)
    e.add_argument("--out", default="eval_out", help="output directory")
    e.add_argument("--model", choices=MODELS, default="unet-text",
                   help="unet-text / unet-class / unet-uncond: the shipped trained UNets (checkpoints/); "
                        "empirical: perfect memorizer; mixture: partial memorizer")
    e.add_argument("--testbed", choices=TESTBEDS + ("auto",), default="auto",
                   help="auto: the model's (unet for the trained UNets, else default)")
    e.add_argument("--method", choices=evaluate.METHODS, default="amg", help="guidance")
    e.add_argument("--base", choices=("auto",) + tuple(GUIDANCES), default="auto",
                   help="the guidance AMG wraps (auto: cfg, none for an unconditional model)")
    e.add_argument("--kinds", type=_csv(PROMPT_KINDS), default=",".join(PROMPT_KINDS), metavar="LIST",
                   help=f"comma-separated prompt kinds from: {', '.join(PROMPT_KINDS)}")
    _add_run_args(e)
    e.add_argument("--detector", choices=evaluate.DETECTORS, default="auto",
                   help="AMG's pixel detector: auto (nl2-bank for the trained UNets, else nl2), nl2 (sigma = -nL2), nl2-bank (nL2 over the bank's typical "
                        "k-NN distance: the distance itself, so the calibrated gate is the copy criterion) "
                        "or cosine")
    _add_screen_args(e)
    a = e.add_argument_group("AMG settings (unset: the model's own, its ModelSpec.amg, then AMGConfig's)")
    a.add_argument("--c1", type=_finite_float, help=f"despecification strength (default {AMGConfig.c1:g})")
    a.add_argument("--c2", type=_finite_float, help=f"caption deduplication strength (default {AMGConfig.c2:g})")
    a.add_argument("--c3", type=_finite_float, help=f"dissimilarity strength (default: the model's, e.g. 1 for the "
                                                     f"trained UNets, 1e4 for empirical; else {AMGConfig.c3:g})")
    a.add_argument("--c3-units", choices=C3_UNITS, help="data: c3 x (bank k-NN distance)^2 (default); raw")
    a.add_argument("--threshold", choices=THRESHOLDS, help="gate schedule (default parabolic)")
    a.add_argument("--lambda-min", type=_finite_float, help="gate threshold at the first steps")
    a.add_argument("--lambda-max", type=_finite_float, help="gate threshold at the last steps")
    a.add_argument("--gradient", choices=GRADIENTS, help=f"G_sim gradient: full (through the denoiser) or cheap (default: the model's, cheap for "
                                                        f"empirical; else {AMGConfig.gradient})")
    a.add_argument("--score", choices=SCORES, help="map of sigma to the G_spe/G_dup score")
    a.add_argument("--no-spe", dest="despecify", action="store_const", const=False, help="drop G_spe")
    a.add_argument("--no-dup", dest="dedup", action="store_const", const=False, help="drop G_dup")
    a.add_argument("--no-sim", dest="dissimilar", action="store_const", const=False, help="drop G_sim")
    a.add_argument("--no-fallback", dest="fallback", action="store_const", const=False,
                   help="no fallback push where the G_sim gradient vanishes")
    a.add_argument("--max-shift", type=_finite_float,
                   help="cap on G_sim's move of x0_hat per step, in units of the bank's k-NN distance")


def _add_screen_args(p) -> None:
    """--screen / --screen-threshold (eval, sample)."""
    p.add_argument("--screen", choices=SCREEN_CHOICES, default="none",
                   help="training-data-free screen in front of AMG's bank search: none (every-step AMG, the default: "
                        "on the testbed the screen misses copies, README 'Detection without the training set'), "
                        "auto (the calibrated one stored with the model / bank, if any), or a screen by name (with "
                        "STP / DTP / OG it gates their switch: plain CFG where it does not flag)")
    p.add_argument("--screen-threshold", type=_finite_float, default=None,
                   help="the screen's threshold (default: the calibrated one stored with the model / bank)")


def _eval_config(args, parser):
    amg = tuple((f, getattr(args, f)) for f in ("c1", "c2", "c3", "c3_units", "threshold", "lambda_min",
                                               "lambda_max", "gradient", "score", "despecify", "dedup",
                                               "dissimilar", "fallback", "max_shift") if getattr(args, f) is not None)
    if amg and args.method != "amg":
        parser.error(f"AMG settings ({', '.join('--' + k.replace('_', '-') for k, _ in amg)}) need --method amg")
    fields = {f: getattr(args, f) for f in ("out", "model", "testbed", "method", "base", "scale", "kinds",
                                           "prompts_per_kind", "samples_per_prompt", "sampler", "steps", "seed",
                                           "detector", "screen", "screen_threshold")}
    try:
        return evaluate.EvalConfig(amg=amg, **fields)
    except ValueError as err:
        parser.error(str(err))


def _command_parser(parser: argparse.ArgumentParser, args) -> argparse.ArgumentParser:
    """The parser of the (sub)command ``args`` ran (``amg eval``, ``amg index build``, ...): an
    error found after parsing is reported through it, as ``amg eval: error: ...`` with exit
    status 2, the way argparse reports its own errors of that command."""
    while True:
        subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        name = getattr(args, subs[0].dest, None) if subs else None
        if name not in (subs[0].choices if subs else {}):
            return parser
        parser = subs[0].choices[name]


def _wait_for_warnings() -> None:
    """Let the asynchronous divergence warnings of the command's sampling (``samplers.sample``
    issues them when the computation completes) arrive before the command returns."""
    jax = sys.modules.get("jax")
    if jax is not None:
        jax.effects_barrier()


def main(argv=None) -> int:
    """`amg COMMAND ...`: 0 on success; argument and other errors found before or after parsing
    exit 2 with ``amg COMMAND: error: ...`` (``_command_parser``)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "func", None) is None:
        parser.print_help()
        return 2
    _quiet_libraries()
    code = _run_command(args, _command_parser(parser, args))
    _wait_for_warnings()
    return code


def _run_demo(args, parser) -> None:
    fields = {f: getattr(args, f) for f in ("out", "models", "methods", "testbed", "prompts_per_kind",
                                           "samples_per_prompt", "sampler", "steps", "scale", "seed")}
    try:
        config = demo.DemoConfig(**fields)
    except ValueError as e:
        parser.error(str(e))
    _check_out(parser, config.out, "--out")
    try:
        demo.run_demo(config, progress=args.progress)
    except (ValueError, OSError) as err:     # e.g. a missing or damaged checkpoint
        parser.error(str(err))


def _run_eval(args, parser) -> None:
    config = _eval_config(args, parser)
    _check_out(parser, config.out, "--out")
    try:
        evaluate.run_eval(config)
    except (ValueError, OSError) as err:     # e.g. AMG thresholds outside the detector's range, a bad checkpoint
        parser.error(str(err))


# Commands that run over every device of a possibly multi-host job (TPU pod, SLURM, ...): one global mesh.
_DISTRIBUTED = (_run_index, _run_sweep, _run_sample)


def _run_command(args, parser) -> int:
    """Run the parsed command (its ``func``); ``parser`` is the command's own (``_command_parser``)."""
    if args.func in _DISTRIBUTED:
        maybe_initialize_distributed()
    return args.func(args, parser) or 0


if __name__ == "__main__":
    sys.exit(main())
