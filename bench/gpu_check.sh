#!/usr/bin/env bash
# The prepared GPU check of issue 15, in one call, from a bare machine with the repo in it:
#
#   bash bench/gpu_check.sh                 # on a CUDA machine (about 8 minutes)
#   bash bench/gpu_check.sh --device cpu    # smoke mode: every piece at tiny sizes on a CPU
#
# 1. installs what is missing (the package and its test extras; torch only if absent:
#    a GPU machine brings its own CUDA build)
# 2. runs the tests that exercise the CUDA paths against float64 (tests/test_stream.py
#    -k device: both block sources, fp32 and bf16, on the device)
# 3. runs the demo pipeline (tokens -> extract -> reduce -> universal) with --device
#    cuda and with --device cpu and compares their reduce outputs and Table 1
# 4. benchmarks the co-moment kernel against torch.matmul on the same shapes: fp32, bf16,
#    and fp32 with TF32 GEMMs (TORCH_ALLOW_TF32_CUBLAS_OVERRIDE=1)
# 5. benchmarks a streamed reduce of GPT-2-small-shaped random models (5 models, 200k
#    tokens) in bf16 and TF32, with the reduce's fraction of torch.matmul, and the
#    stream-vs-store ratio on a smaller run that fits the disk
# 6. prints the paper experiment's projection on this GPU from the measured rates
#
# Everything lands in $OUT (default bench/results/gpu-check-<device>/): JSON per part and
# summary.txt. Sizes can be set by environment: STREAM_TOKENS, STREAM_MODELS,
# RATIO_TOKENS, KERNEL_N, KERNEL_NA, DEMO_TOKENS. Exit status: the number of failed parts.
set -uo pipefail

DEVICE=cuda
OUT=""
while [ $# -gt 0 ]; do
  case "$1" in
    --device) DEVICE="$2"; shift 2 ;;
    --out) OUT="$2"; shift 2 ;;
    -h|--help) sed -n '2,24p' "$0"; exit 0 ;;
    *) echo "error: unknown argument $1; see bash $0 --help" >&2; exit 2 ;;
  esac
done
case "$DEVICE" in
  cuda|cuda:*|cpu) ;;
  *) echo "error: --device $DEVICE: expected cuda, cuda:N or cpu" >&2; exit 2 ;;
esac

cd "$(dirname "$0")/.." || exit 2
OUT="${OUT:-bench/results/gpu-check-${DEVICE//:/}}"
mkdir -p "$OUT"
SUMMARY="$OUT/summary.txt"
: > "$SUMMARY"
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
PY="${PYTHON:-python}"
START=$(date +%s)
FAILED=0

if [ "$DEVICE" = cpu ]; then          # smoke mode: the same pieces, tiny
  STREAM_TOKENS="${STREAM_TOKENS:-2048}"; STREAM_MODELS="${STREAM_MODELS:-3}"
  RATIO_TOKENS="${RATIO_TOKENS:-2048}"; KERNEL_N="${KERNEL_N:-512}"
  KERNEL_NA="${KERNEL_NA:-256}"; DEMO_TOKENS="${DEMO_TOKENS:-4096}"
  SHAPE=(--quick); MEMORY=4GB
else
  STREAM_TOKENS="${STREAM_TOKENS:-200000}"; STREAM_MODELS="${STREAM_MODELS:-5}"
  RATIO_TOKENS="${RATIO_TOKENS:-32768}"; KERNEL_N="${KERNEL_N:-8192}"
  KERNEL_NA="${KERNEL_NA:-4096}"; DEMO_TOKENS="${DEMO_TOKENS:-}"
  SHAPE=(--layers 12 --d-model 768 --heads 12 --d-mlp 3072 --window 1024); MEMORY=100GB
fi

log() { echo "[gpu-check $(( $(date +%s) - START ))s] $*" | tee -a "$SUMMARY"; }
part() {  # part NAME COMMAND...: run it, log its last lines, count a failure
  local name="$1"; shift
  log "== $name: $*"
  if "$@" > "$OUT/$name.log" 2>&1; then
    tail -n 12 "$OUT/$name.log" | tee -a "$SUMMARY"
    log "ok: $name"
  else
    tail -n 25 "$OUT/$name.log" | tee -a "$SUMMARY"
    log "FAILED: $name (log: $OUT/$name.log)"
    FAILED=$((FAILED + 1))
  fi
}

# -- 1. install ---------------------------------------------------------------------
log "== install"
if ! "$PY" -c "import torch" 2>/dev/null; then
  "$PY" -m pip install -q torch || log "could not install torch"
fi
if ! "$PY" -c "import ooc_universal, pytest" 2>/dev/null; then
  "$PY" -m pip install -q -e ".[test]" || log "could not install the package (offline?)"
fi
"$PY" - <<EOF 2>&1 | tee -a "$SUMMARY"
import torch
print("torch", torch.__version__, "cuda available:", torch.cuda.is_available(),
      torch.cuda.get_device_name() if torch.cuda.is_available() else "")
EOF
if [ "$DEVICE" != cpu ] && ! "$PY" -c "import torch, sys; sys.exit(not torch.cuda.is_available())"; then
  log "error: --device $DEVICE but torch sees no CUDA device; run with --device cpu for the smoke mode"
  exit 1
fi

# -- 2. CUDA-path tests against float64 ----------------------------------------------
part tests env OOC_TEST_DEVICE="$DEVICE" "$PY" -m pytest -q -x tests/test_stream.py -k device

# -- 3. the demo pipeline on the device and on the CPU --------------------------------
DEMO_ARGS=(--steps tokens,extract,reduce,universal --no-progress)
[ -n "$DEMO_TOKENS" ] && DEMO_ARGS+=(--n-tokens "$DEMO_TOKENS")
DEMO="$OUT/demo"
rm -rf "$DEMO"
part demo_device "$PY" -m ooc_universal run --run-dir "$DEMO/$DEVICE" --device "$DEVICE" "${DEMO_ARGS[@]}"
if [ "$DEVICE" != cpu ]; then
  part demo_cpu "$PY" -m ooc_universal run --run-dir "$DEMO/cpu" --device cpu "${DEMO_ARGS[@]}"
  part demo_compare "$PY" -m ooc_universal.bench.bench_stream --compare-runs "$DEMO/$DEVICE" "$DEMO/cpu"
fi

# -- 4. the co-moment kernel against torch.matmul: fp32, bf16, TF32 -------------------
KARGS=(--device "${DEVICE%%:*}" --n "$KERNEL_N" --na "$KERNEL_NA" --nb "$KERNEL_NA")
part kernels "$PY" -m ooc_universal.bench.bench_kernels "${KARGS[@]}" --out "$OUT/kernels.json"
part kernels_tf32 env TORCH_ALLOW_TF32_CUBLAS_OVERRIDE=1 "$PY" -m ooc_universal.bench.bench_kernels "${KARGS[@]}" --out "$OUT/kernels-tf32.json"

# -- 5. streamed reduce at GPT-2-small shape, bf16 and TF32; stream vs store ----------
for prec in bf16 tf32; do
  part "stream_$prec" "$PY" -m ooc_universal.bench.bench_stream "${SHAPE[@]}" --models "$STREAM_MODELS" \
    --tokens "$STREAM_TOKENS" --device "$DEVICE" --precision "$prec" --memory "$MEMORY" \
    --no-store --out "$OUT/stream-$prec.json" --no-progress
done
part stream_vs_store "$PY" -m ooc_universal.bench.bench_stream "${SHAPE[@]}" --models 2 \
  --tokens "$RATIO_TOKENS" --device "$DEVICE" --precision bf16 --memory "$MEMORY" \
  --out "$OUT/stream-vs-store.json" --no-progress

# -- 6. the paper's projection from the measured rates --------------------------------
log "== projection (paper: 5 GPT-2 small x 3 checkpoints x 5M tokens)"
grep -h "projection" "$OUT"/stream_*.log 2>/dev/null | tee -a "$SUMMARY"
log "done: $FAILED part(s) failed; results in $OUT"
exit "$FAILED"
