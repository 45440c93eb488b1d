#!/usr/bin/env bash
# One-command device benchmark: on a machine with a GPU or a TPU, install the matching jax,
# then for every method at its imagenet preset (ResNet-50, 224 px, bf16) at a per-device
# batch that launch.plan says fits, print images/s, step time, MFU (launch/plan.py's peak
# bf16 table) and the device-compiled peak memory beside the planner's CPU estimate, and
# write it all as a markdown table.
#
#   bash benchmarks/accelerator.sh                         # detect, install, plan, time
#   bash benchmarks/accelerator.sh --dry_run               # print what it would install and run
#   bash benchmarks/accelerator.sh --methods=detcon_b,byol --per_device_batch=64 --out=FILE.md
#
# Timing is benchmarks/train_step.py --preset imagenet (the trainer's own jit step: loss,
# grads, LARS, EMA/queue; compile and warm-up excluded, median of --repeats blocks), so it
# measures the step on a synthetic batch, not the input pipeline.
set -euo pipefail
cd "$(dirname "$0")/.."

DRY=0
METHODS="detcon_b byol simclr detcon_s moco_v2 swav"
OUT=""
PER_DEVICE=""          # empty: the largest power of two launch.plan says fits, capped by CAP
CAP=256                # the presets' per-device batch on 16 devices; keeps the run short
STEPS="--warmup 2 --steps 5 --repeats 3"
PYTHON="${PYTHON:-python3}"
for arg in "$@"; do
  case "$arg" in
    --dry_run) DRY=1 ;;
    --methods=*) METHODS="${arg#*=}"; METHODS="${METHODS//,/ }" ;;
    --out=*) OUT="${arg#*=}" ;;
    --per_device_batch=*) PER_DEVICE="${arg#*=}" ;;
    --cap=*) CAP="${arg#*=}" ;;
    -h|--help) sed -n '2,14p' "$0"; exit 0 ;;
    *) echo "error: unknown argument $arg (see --help)" >&2; exit 2 ;;
  esac
done

# --- Which device: GPUs by nvidia-smi, a TPU VM by its metadata server or /dev/accel*.
PLATFORM=none; TARGET=""; COUNT=0
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  PLATFORM=gpu
  COUNT=$(nvidia-smi -L | wc -l)
  NAME=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1)
  KIND=$(echo "$NAME" | grep -oiE 'h200|h100|a100' | head -1 | tr 'A-Z' 'a-z' || true)
  TARGET="--gpu=${KIND:-h100}-$COUNT"
  [ -n "$KIND" ] || echo "warning: $NAME is not in launch/plan.py's DEVICES; planning as h100" >&2
elif ls /dev/accel* >/dev/null 2>&1 || [ -n "${TPU_ACCELERATOR_TYPE:-}" ]; then
  PLATFORM=tpu
  TYPE="${TPU_ACCELERATOR_TYPE:-$(curl -s -m 5 -H Metadata-Flavor:Google \
    http://metadata.google.internal/computeMetadata/v1/instance/attributes/accelerator-type \
    || true)}"
  TARGET="--tpu=${TYPE:-v4-8}"
fi

case "$PLATFORM" in
  gpu) INSTALL=("$PYTHON" -m pip install -q -U "jax[cuda12]") ;;
  tpu) INSTALL=("$PYTHON" -m pip install -q -U "jax[tpu]") ;;
  none)
    if [ "$DRY" = 0 ]; then
      echo "error: no GPU (nvidia-smi) or TPU (/dev/accel*) here; --dry_run shows the commands" >&2
      exit 2
    fi
    # What a GPU host would get (a TPU VM: jax[tpu] and --tpu=<its accelerator type>).
    INSTALL=("$PYTHON" -m pip install -q -U "jax[cuda12]"); TARGET="--gpu=h100-8" ;;
esac
OUT="${OUT:-/tmp/accelerator_benchmark_$(date -u +%Y%m%d_%H%M).md}"

show() { echo "+ $(printf '%q ' "$@")"; }
run() {   # print a command; run it unless --dry_run
  show "$@"
  if [ "$DRY" = 0 ]; then "$@"; fi
}

echo "# device: $PLATFORM ${TARGET:-}  methods: $METHODS  table: $OUT"
[ "$PLATFORM" = none ] && echo "# (no GPU or TPU here: showing what a GPU host would run)"
run "${INSTALL[@]}"
run "$PYTHON" -c "import jax; print(jax.device_count(), 'x', jax.devices()[0].device_kind)"

# Per method: the batch (launch.plan on this host's CPU, unless --per_device_batch), then
# the timed step on the device (global batch = per-device batch x jax.device_count()).
if [ "$DRY" = 1 ]; then
  DEVICES='$N'; echo "# N = jax.device_count(); B = the largest power of two (<= $CAP) that launch.plan's summary line says fits"
else
  DEVICES=$("$PYTHON" -c "import jax; print(jax.device_count())")
fi
PLANS=""
for m in $METHODS; do
  PLAN=("$PYTHON" -m launch.plan "--config=configs/$m.py:imagenet" "$TARGET" --summary)
  if [ -n "$PER_DEVICE" ]; then
    b=$PER_DEVICE
  elif [ "$DRY" = 1 ]; then
    show "${PLAN[@]}"; b='$B'
  else
    show "${PLAN[@]}"
    line=$(JAX_PLATFORMS=cpu "${PLAN[@]}" | tail -1)
    echo "  $line"
    PLANS+="- $line"$'\n'
    b=$(echo "$line" | sed -n 's/.*largest power-of-two batch that fits: \([0-9]*\)\/device.*/\1/p')
    if [ -z "$b" ] || [ "$b" -lt 1 ]; then
      echo "error: launch.plan found no per-device batch of $m that fits" >&2; exit 1
    fi
    [ "$b" -gt "$CAP" ] && b=$CAP
    # The planner's line (GiB + MiB per image) read at the benchmarked batch, for the table.
    est=$(echo "$line" | sed -n 's/.*CPU-compiled estimate: \([0-9.]*\) GiB + \([0-9.]*\) MiB per image.*/\1 \2/p' \
          | awk -v b="$b" '{printf "%.2f", $1 + $2 * b / 1024}')
    PLANS+="  at $b/device (benchmarked): ~${est:-?} GiB/device"$'\n'
  fi
  STEP=("$PYTHON" benchmarks/train_step.py --preset imagenet --methods "$m" $STEPS
        --markdown "$OUT")
  if [ "$DRY" = 1 ]; then
    echo "+ $(printf '%q ' "${STEP[@]}")--batch_size \$(($b * $DEVICES))"
  else
    run "${STEP[@]}" --batch_size $((b * DEVICES))
  fi
done

if [ "$DRY" = 1 ]; then
  "$PYTHON" -m launch.plan --help >/dev/null   # the planner's command line answers here
  echo "# dry run: nothing installed or run."
  exit 0
fi
{
  echo
  echo "launch.plan's CPU-compiled estimates (not the device's figure; the device-compiled one"
  echo "is the table's last column):"
  echo
  printf '%s' "$PLANS"
} >> "$OUT"
echo
cat "$OUT"
