#!/usr/bin/env bash
# GPU check for the pipelined loader and the fused Triton kernel (issue 4), in ~5 minutes.
#
#   OUT=/some/dir bash benchmarks/gpu_check.sh      # default OUT=./gpu_out
#   BENCH_ARGS=--small bash benchmarks/gpu_check.sh # toy sizes: checks the script (any machine)
#   GPU_EXTRA=adapters,lora,distributed bash benchmarks/gpu_check.sh
#                                   # also issue 14, issue 12's lora merge and issue 11 on CUDA
#   GPU_MAIN=0 GPU_EXTRA=lora bash benchmarks/gpu_check.sh   # only the extras (a second call:
#                                   # the device tool allows 10 minutes a command)
#
# Run from the repository root on a machine with an NVIDIA GPU, torch (CUDA) and triton
# installed; nothing is downloaded. Steps, each allowed to fail without stopping the others:
#   1. versions (python, torch, CUDA, triton, GPU, driver)      -> $OUT/versions.txt
#   2. the GPU tests (CUDA loader and training, spec vectors on the device, compiled kernel,
#      Philox on CUDA and in Triton, pipeline)
#                                                               -> $OUT/pytest.log, pytest.xml
#   3. benchmarks/bench_gpu.py: throughput, end-to-end loads, memory, error
#                                                               -> $OUT/bench_gpu.{json,md}
# and prints one table ($OUT/summary.md). Multi-GB model files go to $SCRATCH (default: a
# fresh directory under /tmp), removed on exit.
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-./gpu_out}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
SCRATCH=${SCRATCH:-$(mktemp -d /tmp/mcnc-gpu-check.XXXXXX)}
mkdir -p "$SCRATCH"
trap 'rm -rf "$SCRATCH"' EXIT
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
PY=${PYTHON:-python3}
# Packages the GPU machine's image lacks travel as wheels in .whl/ (see benchmarks/README.md).
if compgen -G ".whl/*.whl" >/dev/null; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/mcnc-site .whl/*.whl && export PYTHONPATH="/tmp/mcnc-site:$PYTHONPATH"
fi
START=$(date +%s)

# 1. versions ------------------------------------------------------------------------------
{
  echo "date: $(date -u +%FT%TZ)  host: $(hostname)  cores: $(nproc)"
  $PY - <<'EOF' 2>&1
import platform
print("python", platform.python_version())
try:
    import torch
    print("torch", torch.__version__, "cuda", torch.version.cuda,
          "available", torch.cuda.is_available())
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        print("gpu", p.name, f"{p.total_memory / 2**30:.1f} GiB", "sm", p.multi_processor_count)
except Exception as exc:
    print("torch: not importable:", exc)
for name in ("triton", "safetensors", "numpy", "hypothesis", "mcnc_format"):
    try:
        module = __import__(name)
        print(name, getattr(module, "__version__", "?"))
    except Exception as exc:
        print(name, "MISSING:", exc)
EOF
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv 2>&1
} | tee "$OUT/versions.txt"

# 2. tests (GPU_MAIN=0 skips 2 and 3: a second call that runs only GPU_EXTRA) ---------------
TEST_RC=skipped TEST_LINE="skipped (GPU_MAIN=0)" BENCH_RC=skipped
if [ "${GPU_MAIN:-1}" != 0 ]; then
# The GPU runs the compiled kernels; the interpreted ones are the CPU's tests (and Triton
# 3.6's interpreter fails on NumPy 2 scalars).
XDIST=$($PY -c "import xdist" 2>/dev/null && echo "-n 8")  # Triton compiles in parallel
# shellcheck disable=SC2086  # XDIST is empty or two words
timeout 150 $PY -m pytest $XDIST tests/test_cuda.py tests/test_vectors.py tests/test_philox.py \
  tests/test_triton_kernel.py tests/test_philox_triton.py tests/test_stream.py tests/test_slices.py \
  tests/test_serving_triton.py -k "not interpreted" -q -p no:cacheprovider --continue-on-collection-errors \
  --durations=10 -rf --junitxml="$OUT/pytest.xml" >"$OUT/pytest.log" 2>&1
TEST_RC=$?
TEST_LINE=$(tail -n 1 "$OUT/pytest.log")
echo "tests (rc $TEST_RC): $TEST_LINE"

# 3. benchmarks ----------------------------------------------------------------------------
ELAPSED=$(( $(date +%s) - START ))
BUDGET=$(( 330 - ELAPSED ))
[ "$BUDGET" -lt 60 ] && BUDGET=60
# shellcheck disable=SC2086  # BENCH_ARGS (e.g. --small for a dry run) is a word list
timeout "$BUDGET" $PY benchmarks/bench_gpu.py --out "$OUT" --scratch "$SCRATCH" \
  --deadline $(( BUDGET - 50 )) ${BENCH_ARGS:-} >"$OUT/bench.log" 2>&1
BENCH_RC=$?
echo "bench (rc $BENCH_RC, budget ${BUDGET}s): see $OUT/bench.log"
fi

# 4. optional, beyond the 6-minute check: GPU_EXTRA=adapters,lora,distributed --------------
# (issue 14's adapter bank on Llama-2-7B shapes, both routes, about 4 minutes; issue 12's
# lora merge on one Llama-2-7B layer, about 1 minute; issue 11's 8-way split measured rank by
# rank, about 2 minutes)
EXTRA_LINES=""
case ",${GPU_EXTRA:-}," in *,adapters,*)
  timeout 300 $PY benchmarks/bench_adapters.py --size 7b --device cuda \
    --json "$OUT/bench_adapters.json" >"$OUT/bench_adapters.log" 2>&1
  EXTRA_LINES="$EXTRA_LINES
adapters (rc $?): $(grep -E '^\((a|b|c)\)|Triton route' "$OUT/bench_adapters.log" | tr '\n' ' ')";;
esac
case ",${GPU_EXTRA:-}," in *,lora,*)
  timeout 180 $PY benchmarks/bench_lora.py --size llama --device cuda \
    --json "$OUT/bench_lora.json" >"$OUT/bench_lora.log" 2>&1
  EXTRA_LINES="$EXTRA_LINES
lora (rc $?): $(grep -E '^(cached|full) ' "$OUT/bench_lora.log" | tr '\n' ' ')";;
esac
case ",${GPU_EXTRA:-}," in *,distributed,*)
  timeout 240 $PY benchmarks/bench_distributed.py --cuda --json "$OUT/bench_distributed.json" \
    >"$OUT/bench_distributed.log" 2>&1
  EXTRA_LINES="$EXTRA_LINES
distributed (rc $?): see $OUT/bench_distributed.log";;
esac

# summary ----------------------------------------------------------------------------------
{
  echo "# GPU check, $(date -u +%FT%TZ), $(( $(date +%s) - START )) s"
  echo
  grep -E '^(gpu|torch|triton) ' "$OUT/versions.txt" | sed 's/^/    /'
  echo
  echo "tests (rc $TEST_RC): $TEST_LINE"
  echo
  if [ "${GPU_MAIN:-1}" = 0 ]; then
    echo "bench_gpu.py skipped (GPU_MAIN=0)"
  elif [ -s "$OUT/bench_gpu.md" ]; then
    cat "$OUT/bench_gpu.md"
  elif [ -s "$OUT/bench_gpu.json" ]; then
    echo "bench_gpu.py did not finish (rc $BENCH_RC); the sections it completed:"
    $PY -c "import json, sys; sys.path.insert(0, 'benchmarks'); import bench_gpu; \
print(bench_gpu.markdown(json.load(open(sys.argv[1]))))" "$OUT/bench_gpu.json" \
      | tee "$OUT/bench_gpu.md"
  else
    echo "bench_gpu.py produced no figures (rc $BENCH_RC):"
    tail -n 30 "$OUT/bench.log"
  fi
  [ -n "$EXTRA_LINES" ] && echo "$EXTRA_LINES"
} >"$OUT/summary.md"
cat "$OUT/summary.md"
