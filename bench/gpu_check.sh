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
#
#   --only tests,demo,kernels,stream   run some parts (e.g. two device calls, not one)
#   --pack FILE                        also write FILE (.tar.gz): the JSON, logs and summary
#                                      without the demo's run directories
#
# On the lent H200 (no network; 8 files come back from $OUT): first, here,
# `bash bench/gpu_wheels.sh`; then one device call with carry [".whl"]:
#   bash bench/gpu_check.sh --out /tmp/gc --pack $OUT/gpu-check.tar.gz
set -uo pipefail

DEVICE=cuda
OUT=""
ONLY=tests,demo,kernels,stream
PACK=""
while [ $# -gt 0 ]; do
  case "$1" in
    --device) DEVICE="$2"; shift 2 ;;
    --out) OUT="$2"; shift 2 ;;
    --only) ONLY="$2"; shift 2 ;;
    --pack) PACK="$2"; shift 2 ;;
    -h|--help) sed -n '2,30p' "$0"; exit 0 ;;
    *) echo "error: unknown argument $1; see bash $0 --help" >&2; exit 2 ;;
  esac
done
case "$DEVICE" in
  cuda|cuda:*|cpu) ;;
  *) echo "error: --device $DEVICE: expected cuda, cuda:N or cpu" >&2; exit 2 ;;
esac
for p in ${ONLY//,/ }; do
  case "$p" in
    tests|demo|kernels|stream) ;;
    *) echo "error: --only $ONLY: unknown part $p; expected some of tests,demo,kernels,stream" >&2; exit 2 ;;
  esac
done
want() { case ",$ONLY," in *",$1,"*) return 0 ;; *) return 1 ;; esac; }

cd "$(dirname "$0")/.." || exit 2
OUT="${OUT:-bench/results/gpu-check-${DEVICE//:/}}"
mkdir -p "$OUT"
SUMMARY="$OUT/summary.txt"
: > "$SUMMARY"
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
PY="${PYTHON:-$(command -v python >/dev/null && echo python || echo python3)}"  # the GPU image has python3 only
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
# The lent GPU machine reaches no registry: what its image lacks (dask, distributed,
# pydantic) comes as wheels in .whl/ (bench/gpu_wheels.sh, run where pip works; carry
# the folder), and the package installs without build isolation or dependencies.
log "== install"
if ! "$PY" -c "import torch" 2>/dev/null; then
  "$PY" -m pip install -q torch || log "could not install torch"
fi
OFFLINE=()
if ls .whl/*.whl >/dev/null 2>&1; then
  OFFLINE=(--no-index)
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl >> "$OUT/install.log" 2>&1 \
    && export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}" \
    || log "could not install the wheels in .whl/ (log: $OUT/install.log)"
fi
# run from the repo root, `import ooc_universal` finds the folder even when nothing is
# installed; the cli/kernels/bench subpackages exist only through the install's mapping
if ! "$PY" -c "import ooc_universal.cli, ooc_universal.kernels, ooc_universal.bench, pytest" 2>/dev/null; then
  "$PY" -m pip install -q --no-deps --no-build-isolation -e . >> "$OUT/install.log" 2>&1 \
    || "$PY" -m pip install -q "${OFFLINE[@]}" -e ".[test]" >> "$OUT/install.log" 2>&1 \
    || log "could not install the package (log: $OUT/install.log)"
fi
MISSING=$("$PY" - <<'PYEOF'
import importlib
missing = []
for name in ("torch", "transformers", "numpy", "h5py", "dask.array", "distributed", "numba",
             "click", "tqdm", "matplotlib", "pandas", "pyarrow", "safetensors", "pydantic",
             "xarray", "pytest", "ooc_universal.cli", "ooc_universal.kernels",
             "ooc_universal.bench"):
    try:
        importlib.import_module(name)
    except Exception:
        missing.append(name)
print(" ".join(missing))
PYEOF
)
if [ -n "$MISSING" ]; then
  log "error: cannot import: $MISSING; on a machine without network, run bash bench/gpu_wheels.sh where pip works and carry .whl"
  exit 1
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
want tests && part tests env OOC_TEST_DEVICE="$DEVICE" "$PY" -m pytest -q -x tests/test_stream.py -k device

# -- 3. the demo pipeline on the device and on the CPU --------------------------------
DEMO_ARGS=(--steps tokens,extract,reduce,universal --no-progress)
[ -n "$DEMO_TOKENS" ] && DEMO_ARGS+=(--n-tokens "$DEMO_TOKENS")
DEMO="$OUT/demo"
if want demo; then
  rm -rf "$DEMO"
  part demo_device "$PY" -m ooc_universal run --run-dir "$DEMO/$DEVICE" --device "$DEVICE" "${DEMO_ARGS[@]}"
  if [ "$DEVICE" != cpu ]; then
    part demo_cpu "$PY" -m ooc_universal run --run-dir "$DEMO/cpu" --device cpu "${DEMO_ARGS[@]}"
    part demo_compare "$PY" -m ooc_universal.bench.bench_stream --compare-runs "$DEMO/$DEVICE" "$DEMO/cpu"
  fi
fi

# -- 4. the co-moment kernel against torch.matmul: fp32, bf16, TF32 -------------------
KARGS=(--device "${DEVICE%%:*}" --n "$KERNEL_N" --na "$KERNEL_NA" --nb "$KERNEL_NA")
want kernels && part kernels "$PY" -m ooc_universal.bench.bench_kernels "${KARGS[@]}" --out "$OUT/kernels.json"
want kernels && part kernels_tf32 env TORCH_ALLOW_TF32_CUBLAS_OVERRIDE=1 "$PY" -m ooc_universal.bench.bench_kernels "${KARGS[@]}" --out "$OUT/kernels-tf32.json"

# -- 5. streamed reduce at GPT-2-small shape, bf16 and TF32; stream vs store ----------
want stream && for prec in bf16 tf32; do
  part "stream_$prec" "$PY" -m ooc_universal.bench.bench_stream "${SHAPE[@]}" --models "$STREAM_MODELS" \
    --tokens "$STREAM_TOKENS" --device "$DEVICE" --precision "$prec" --memory "$MEMORY" \
    --no-store --out "$OUT/stream-$prec.json" --no-progress
done
want stream && part stream_vs_store "$PY" -m ooc_universal.bench.bench_stream "${SHAPE[@]}" --models 2 \
  --tokens "$RATIO_TOKENS" --device "$DEVICE" --precision bf16 --memory "$MEMORY" \
  --out "$OUT/stream-vs-store.json" --no-progress

# -- 6. the paper's projection from the measured rates --------------------------------
log "== projection (paper: 5 GPT-2 small x 3 checkpoints x 5M tokens)"
grep -h "projection" "$OUT"/stream_*.log 2>/dev/null | tee -a "$SUMMARY"
log "done: $FAILED part(s) failed; results in $OUT"
if [ -n "$PACK" ]; then
  tar czf "$PACK" --exclude=demo -C "$OUT" . && log "packed: $PACK" || log "could not pack $PACK"
fi
exit "$FAILED"
