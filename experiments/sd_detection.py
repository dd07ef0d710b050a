"""The detection table on Stable Diffusion: memorized prompts against a contrast set of ordinary
ones (``amg_jax.apps.sd_detection``; README, "Stable Diffusion: from a memorized-prompt list to
the papers' tables").

    python experiments/sd_detection.py experiments/configs/sd_v14_detection.toml [--store]
"""
import argparse
import sys

from amg_jax.apps.sd_detection import load_config, run_sd_detection


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config")
    p.add_argument("--store", action="store_true", help="store the calibrated screen beside the bank "
                                                        "(BANK.screen.json: what --screen auto reads)")
    a = p.parse_args(argv)
    try:
        cfg = load_config(a.config)
        report = run_sd_detection(cfg, store=a.store)
    except (ValueError, OSError) as e:
        p.error(str(e))
    print(f"wrote {cfg.out}/detection.json, detection.md, per_sample.csv; screen {report['screen']['name']} "
          f"> {report['screen']['threshold']:.4g}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
