#!/usr/bin/env bash
# The CUDA checks of issue 14 in one run, from the repository root of a machine with a CUDA GPU:
#     bash benchmarks/gpu_check.sh [--quick]
# 1. versions: nvidia-smi, torch (CUDA, cuDNN), triton, transformers, peft;
# 2. the gpu-marked tests (tests/test_gpu.py and, where they exist, tests/test_triton_lora.py,
#    tests/test_triton_loss.py and tests/test_triton_model.py), with Triton's interpreter OFF
#    (TRITON_INTERPRET=0: the compiled kernels);
# 3. the CUDA benchmark rows: benchmarks/lora_linear.py, train_step.py, inference.py and shared_shrink.py with
#    --device cuda
#    (--quick: their smallest settings, a smoke run of a minute or two).
# JSON, pictures and one log per step go to $OUT if set, else benchmarks/results/gpu/. Every step runs under its
# own `timeout` and within a total deadline (GPU_CHECK_DEADLINE seconds, default 450), and runs even if an
# earlier one failed. Exit status: 0 when every step passed, 1 when one failed or timed out, 2 (nothing run)
# where no CUDA device is available.
set -u
cd "$(dirname "$0")/.." || exit 2
PY="${PYTHON:-python}"
DEST="${OUT:-benchmarks/results/gpu}"
QUICK=()
[ "${1:-}" = "--quick" ] && QUICK=(--quick)
DEADLINE="${GPU_CHECK_DEADLINE:-450}"
export TRITON_INTERPRET=0  # the tests default it to 1 (the interpreter) when it is unset
export PYTHONUNBUFFERED=1

if ! "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" >/dev/null 2>&1; then
    echo "gpu_check.sh: no CUDA device is available here (torch.cuda.is_available() is False, or torch is" \
         "missing): nothing was run. Run it on a machine with an NVIDIA GPU; the CPU benchmarks run without" \
         "--device cuda." >&2
    exit 2
fi
mkdir -p "$DEST"
START=$SECONDS
FAILED=()
SUMMARY=()

# step NAME LIMIT_S COMMAND...: run COMMAND under `timeout` (at most the time left before the deadline),
# its output shown and kept in $DEST/NAME.log; records the outcome and never stops the script.
step() {
    local name=$1 limit=$2
    shift 2
    local left=$((DEADLINE - (SECONDS - START) - 5))
    if [ "$left" -lt 20 ]; then
        echo "=== $name: skipped, the ${DEADLINE} s deadline is reached"
        FAILED+=("$name"); SUMMARY+=("$name: skipped (deadline)")
        return
    fi
    [ "$limit" -gt "$left" ] && limit=$left
    echo "=== $name (timeout ${limit} s): $*"
    local t0=$SECONDS
    timeout --kill-after=10 "$limit" "$@" 2>&1 | tee "$DEST/$name.log"
    local rc=${PIPESTATUS[0]}
    local took=$((SECONDS - t0))
    if [ "$rc" -eq 0 ]; then
        SUMMARY+=("$name: passed (${took} s)")
    else
        [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ] && rc="timeout after ${limit} s"
        FAILED+=("$name"); SUMMARY+=("$name: FAILED ($rc, ${took} s)")
    fi
}

versions() {
    nvidia-smi || echo "(nvidia-smi not found)"
    "$PY" - <<'EOF'
import importlib, torch
print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}")
for i in range(torch.cuda.device_count()):
    p = torch.cuda.get_device_properties(i)
    print(f"cuda:{i} {p.name}, capability {p.major}.{p.minor}, {p.total_memory / 2**30:.1f} GiB")
for lib in ("triton", "transformers", "peft"):
    try:
        print(lib, importlib.import_module(lib).__version__)
    except ImportError:
        print(lib, "not installed")
EOF
}

echo "=== versions"
versions 2>&1 | tee "$DEST/versions.log"
TESTS=()
for f in tests/test_gpu.py tests/test_triton_lora.py tests/test_triton_loss.py tests/test_triton_model.py; do
    [ -f "$f" ] && TESTS+=("$f")
done
step tests 150 "$PY" -m pytest -q -m gpu -p no:cacheprovider -rs "${TESTS[@]}"
step lora_linear 80 "$PY" benchmarks/lora_linear.py --device cuda ${QUICK[@]+"${QUICK[@]}"} --out "$DEST/lora_linear_cuda.json"
step train_step 120 "$PY" benchmarks/train_step.py --device cuda ${QUICK[@]+"${QUICK[@]}"} --out "$DEST/train_step_cuda.json"
step inference 80 "$PY" benchmarks/inference.py --device cuda ${QUICK[@]+"${QUICK[@]}"} --out "$DEST/inference_cuda.json"
step shared_shrink 60 "$PY" benchmarks/shared_shrink.py --device cuda ${QUICK[@]+"${QUICK[@]}"} --out "$DEST/shared_shrink_cuda.json"

{
    echo "gpu_check.sh $(date -u +%Y-%m-%dT%H:%M:%SZ), $((SECONDS - START)) s in all, results in $DEST"
    printf '  %s\n' "${SUMMARY[@]}"
} | tee "$DEST/summary.txt"
[ "${#FAILED[@]}" -eq 0 ]
