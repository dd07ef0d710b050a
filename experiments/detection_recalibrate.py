"""Two calibrations of the screen tried offline on the detection study's stored per-sample scores
(experiments/results/detection/unet-text.json; no sampling):

    python experiments/detection_recalibrate.py

- a margin: calibrate for a higher recall on the calibration prompts (95%, 98%, 99%, 100%) and
  read the held-out recall and flag rates;
- per prompt: flag every seed of a prompt whose mean score over its seeds passes the threshold
  (Wen et al.'s prompt-level use of the signal).

Same split as the study: every other prompt of each kind calibrates. The scores are each sample's
final windowed score (the study's latched peak differs from it only for noise_magnitude, by the
running mean's maximum), so the figures approximate what the sampler's latched flag would do.
"""
import json
import os

import numpy as np

from amg_jax.evaluation.detection import calibrate_threshold, recall

PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "detection", "unet-text.json")


def main():
    ps = json.load(open(PATH))["per_sample"]
    prompt, kind, copied = np.array(ps["prompt"]), np.array(ps["kind"]), np.array(ps["copied"], bool)
    cal = np.zeros(prompt.size, bool)
    for k in dict.fromkeys(kind):
        for p in list(dict.fromkeys(prompt[kind == k]))[0::2]:
            cal |= prompt == p
    ev, generic = ~cal, kind == "generic"
    never = ~np.isin(prompt, np.unique(prompt[copied]))
    print("screen                 calibration  thr      recall(eval)  flags generic  flags never-copying prompts")
    for name in ("noise_magnitude", "noise_magnitude_first"):
        s = np.array(ps[name])
        pooled = np.array([s[prompt == p].mean() for p in prompt])
        for label, score in ((name, s), (name + " per prompt", pooled)):
            for target in (0.95, 0.98, 0.99, 1.0):
                thr = calibrate_threshold(score[cal], copied[cal], target)
                print(f"{label:<34} {target:>5.0%}  {thr:.4f}  {recall(score[ev], copied[ev], thr):>8.1%}  "
                      f"{np.mean(score[ev & generic] > thr):>10.1%}  {np.mean(score[ev & never] > thr):>10.1%}")


if __name__ == "__main__":
    main()
