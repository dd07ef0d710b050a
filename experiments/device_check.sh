#!/usr/bin/env bash
# The one prepared device check (issue 22): `amg bench` at SD-1.5 and SDXL size with random weights on
# one GPU (or a TPU host), in under 8 minutes. It needs an installed amg_jax with an accelerator jax
# (e.g. `pip install -e '.[dev]' 'jax[cuda12]==0.10.2'`); nothing is downloaded.
#
#   bash experiments/device_check.sh [OUT]      # default OUT: experiments/results/bench/<device>
#
# Runs, each under its own time limit so one slow compile cannot eat the rest:
#   1. SD-1.5 size, 512 px, bfloat16: plain CFG vs diffusers' FlaxStableDiffusionPipeline (same dtype,
#      params, latents), and the kernels part: float32 / bfloat16 with XLA's attention, bfloat16 with the
#      fused kernel (cuDNN on NVIDIA GPUs), compile time and peak memory.
#   2. SDXL size, 1024 px, bfloat16: the same kernels part (and amg_jax's pipeline rows; diffusers'
#      Flax SDXL pipeline is not a like-for-like reference, see the pipeline part's notes).
#   3. SD-1.5 size, bfloat16: AMG with the gate closed (pixel detector on unet-text; SSCD through the
#      VAE, every step and behind the screen) against CFG in the same run.
# Each writes OUT/<name>/bench.json + bench.md; OUT/device_check.log has everything printed. A stage
# that reaches its limit gets SIGTERM (SIGKILL 20 s later, should a compile hold it): the bench has
# written every row it finished by then (the amg part row by row), marked with why it stopped.
# A smoke run on a CPU (tiny SD, minutes): DEVICE_CHECK_EXTRA="--quick --steps 2 --batch 2 --repeats 1" bash
# experiments/device_check.sh /tmp/device_check
set -uo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}
device=$("$PYTHON" -c 'import jax, re; d = jax.devices()[0]; print(re.sub(r"[^a-z0-9]+", "-", d.device_kind.lower()).strip("-"))')
OUT=${1:-experiments/results/bench/$device}
mkdir -p "$OUT"
log="$OUT/device_check.log"
echo "device check on $device ($("$PYTHON" -c 'import jax; print(jax.devices())')), $(date -u +%FT%TZ)" | tee "$log"
status=0

bench() {   # bench NAME LIMIT_S ARGS...
    local name=$1 limit=$2
    shift 2
    echo "== $name: amg bench $* (limit ${limit} s)" | tee -a "$log"
    local t0=$SECONDS
    # shellcheck disable=SC2086  # DEVICE_CHECK_EXTRA: extra options, word-split (e.g. "--quick" for a CPU smoke run)
    PYTHONUNBUFFERED=1 timeout -k 20 "$limit" "$PYTHON" -m amg_jax.apps.cli bench --out "$OUT/$name" "$@" \
        ${DEVICE_CHECK_EXTRA:-} 2>&1 | tee -a "$log"
    local rc=${PIPESTATUS[0]}
    echo "== $name: exit $rc after $((SECONDS - t0)) s" | tee -a "$log"
    [ "$rc" -eq 0 ] || status=1
}

bench sd15 200 --sd-size 1.5 --dtype bfloat16 --parts pipeline,kernels --steps 20 --batch 4 --repeats 2
bench sdxl 150 --sd-size xl --dtype bfloat16 --parts kernels --steps 10 --batch 2 --repeats 2
bench sd15_amg 120 --sd-size 1.5 --dtype bfloat16 --parts amg --steps 10 --batch 4 --repeats 2
echo "device check done in $SECONDS s (status $status): $OUT" | tee -a "$log"
exit $status
