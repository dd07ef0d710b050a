"""The `amg` command line. Every subcommand validates its arguments before any work starts."""
from __future__ import annotations

import argparse
import os
import sys


def _quiet_libraries() -> None:
    """Silence diffusers' / transformers' deprecation chatter (Flax classes are deprecated there)."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    for name in ("diffusers", "transformers"):
        import logging

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


def build_parser() -> argparse.ArgumentParser:
    from amg_jax import demo
    from amg_jax.guidance import GUIDANCES
    from amg_jax.samplers import SAMPLERS

    parser = argparse.ArgumentParser(
        prog="amg",
        description="amg_jax: make diffusion models stop copying their training images - "
                    "Anti-Memorization Guidance and the attraction-basin methods (delayed CFG with a "
                    "static or dynamic transition point, opposite guidance) in JAX.",
        epilog="Run `amg COMMAND --help` for a command's options.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    d = sub.add_parser(
        "demo", help="compare CFG, STP, DTP, OG and OG+DTP on the testbed's closed-form memorizers",
        description="Sample every method on the testbed with the perfect memorizer (the empirical "
                    "denoiser: every method ends on a training image) and the partial memorizer (a "
                    "Gaussian mixture plus training images as point masses: it copies duplicated and "
                    "specific prompts, generalizes on generic ones). Writes grid_<model>.png, "
                    "metrics.json and prints the table: share copied (calibrated criterion), nL2 < 1.4, "
                    "median nL2, Frechet distance vs fresh true renders, alignment, pixels out of range.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    d.add_argument("--out", default="demo_out", help="output directory")
    d.add_argument("--models", type=_csv(demo.MODELS), default=demo.MODELS, metavar="LIST",
                   help=f"comma-separated models from: {', '.join(demo.MODELS)}")
    d.add_argument("--methods", type=_csv(tuple(GUIDANCES)), default=demo.DEFAULT_METHODS, metavar="LIST",
                   help=f"comma-separated guidances from: {', '.join(GUIDANCES)}")
    d.add_argument("--testbed", choices=demo.TESTBEDS, default="default",
                   help="default: 32x32, 62 captions; small: 16x16, 12 captions (quick)")
    d.add_argument("--prompts", dest="prompts_per_kind", type=_positive_int, default=4, metavar="N",
                   help="prompts of each kind (specific, duplicated, generic)")
    d.add_argument("--samples", dest="samples_per_prompt", type=_positive_int, default=8, metavar="N",
                   help="seeds per prompt")
    d.add_argument("--sampler", choices=SAMPLERS, default="ddim", help="sampler")
    d.add_argument("--steps", type=_positive_int, default=50, help="sampling steps")
    d.add_argument("--scale", type=_finite_float, default=7.5, help="guidance scale s0")
    d.add_argument("--seed", type=int, default=0, help="seed of prompts, sampling noise and references")
    d.add_argument("--no-progress", dest="progress", action="store_false", help="hide the progress bar")
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    _quiet_libraries()
    if args.command == "demo":
        from amg_jax import demo

        fields = {f: getattr(args, f) for f in ("out", "models", "methods", "testbed", "prompts_per_kind",
                                               "samples_per_prompt", "sampler", "steps", "scale", "seed")}
        try:
            config = demo.DemoConfig(**fields)
        except ValueError as e:
            parser.error(str(e))
        demo.run_demo(config, progress=args.progress)
    return 0


if __name__ == "__main__":
    sys.exit(main())
