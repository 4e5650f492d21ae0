#!/usr/bin/env bash
# The GPU check (issue 25) in one call: GPU tests, bench_gpu.py's figures, and the record.
#
#   MCNC_COMMIT=<sha> OUT=/some/dir bash benchmarks/gpu_check.sh   # ~6 minutes; default OUT=./gpu_out
#   BENCH_ARGS=--small bash benchmarks/gpu_check.sh    # toy sizes: checks the script (any machine)
#   GPU_EXTRA=adapters,lora,distributed bash benchmarks/gpu_check.sh
#                                   # also the adapter bank, the lora merge and the 8-way split
#   GPU_MAIN=0 GPU_EXTRA=lora,adapters bash benchmarks/gpu_check.sh   # only the extras (a
#                                   # second call: the device tool allows 10 minutes a command)
#
# Run from the repository root on a machine with an NVIDIA GPU, torch (CUDA) and triton;
# nothing is downloaded (packages the machine lacks travel as wheels in .whl/, see
# benchmarks/README.md). Steps, each allowed to fail without stopping the others:
#   0. the package installed in place (entry points, converters, the compiled Philox), else
#      imported from the tree
#   1. versions (python, torch, CUDA, triton, GPU, driver)
#   2. the GPU tests: `pytest -m gpu` (tests/gpu_marks.py), junit report with each test's
#      GpuPath
#   3. benchmarks/bench_gpu.py: throughput, end-to-end loads, memory, error
#   4. the extras named in GPU_EXTRA
#   5. benchmarks/gpu_record.py: the record gpu-DATE-DEVICE.json (figures, test counts,
#      targets, each GpuPath's verdict), to be committed under benchmarks/results/
# $OUT keeps at most four files, since the device tool returns eight: summary.md, the record,
# bench_gpu.json and logs.tar.gz (every log, report and JSON). Multi-GB model files go to
# $SCRATCH (default: a fresh directory under /tmp), removed on exit.
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
LOGS="$SCRATCH/logs"
mkdir -p "$LOGS"

# 0. the package in place ------------------------------------------------------------------
if [ "${GPU_INSTALL:-1}" != 0 ]; then
  if $PY -m pip install -q --no-index --no-deps --no-build-isolation -e . >"$LOGS/install.log" 2>&1
  then echo "installed in place (editable)"
  else echo "editable install failed (see install.log): importing from the tree"
  fi
fi

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
} | tee "$LOGS/versions.txt"

# 2. tests (GPU_MAIN=0 skips 2 and 3: a second call that runs only GPU_EXTRA) ---------------
TEST_RC=skipped TEST_LINE="skipped (GPU_MAIN=0)" BENCH_RC=skipped
if [ "${GPU_MAIN:-1}" != 0 ]; then
# `-m gpu`: the tests that need CUDA (the interpreted kernels are the CPU's tests).
XDIST=$($PY -c "import xdist" 2>/dev/null && echo "-n 8")  # Triton compiles in parallel
# shellcheck disable=SC2086  # XDIST is empty or two words
timeout "${GPU_TEST_TIMEOUT:-180}" $PY -m pytest $XDIST -m gpu ${GPU_TESTS:-tests} -q \
  -p no:cacheprovider --continue-on-collection-errors --durations=10 -rf \
  --junitxml="$LOGS/pytest.xml" >"$LOGS/pytest.log" 2>&1
TEST_RC=$?
TEST_LINE=$(tail -n 1 "$LOGS/pytest.log")
echo "tests (rc $TEST_RC): $TEST_LINE"

# 3. benchmarks ----------------------------------------------------------------------------
ELAPSED=$(( $(date +%s) - START ))
BUDGET=$(( 330 - ELAPSED ))
[ "$BUDGET" -lt 60 ] && BUDGET=60
# shellcheck disable=SC2086  # BENCH_ARGS (e.g. --small for a dry run) is a word list
timeout "$BUDGET" $PY benchmarks/bench_gpu.py --out "$LOGS" --scratch "$SCRATCH" \
  --deadline $(( BUDGET - 50 )) ${BENCH_ARGS:-} >"$LOGS/bench.log" 2>&1
BENCH_RC=$?
echo "bench (rc $BENCH_RC, budget ${BUDGET}s): see bench.log in logs.tar.gz"
fi

# 4. optional, beyond the 6-minute check: GPU_EXTRA=adapters,lora,distributed --------------
# (issue 14's adapter bank on Llama-2-7B shapes, both routes, about 4 minutes; issue 12's
# lora merge on one Llama-2-7B layer, about 1 minute; issue 11's 8-way split measured rank by
# rank, about 2 minutes)
EXTRA_LINES=""
case ",${GPU_EXTRA:-}," in *,adapters,*)
  timeout 300 $PY benchmarks/bench_adapters.py --size 7b --device cuda \
    --json "$LOGS/bench_adapters.json" >"$LOGS/bench_adapters.log" 2>&1
  EXTRA_LINES="$EXTRA_LINES
adapters (rc $?): $(grep -E '^\((a|b|c)\)|Triton route' "$LOGS/bench_adapters.log" | tr '\n' ' ')";;
esac
case ",${GPU_EXTRA:-}," in *,lora,*)
  timeout 180 $PY benchmarks/bench_lora.py --size llama --device cuda \
    --json "$LOGS/bench_lora.json" >"$LOGS/bench_lora.log" 2>&1
  EXTRA_LINES="$EXTRA_LINES
lora (rc $?): $(grep -E '^(cached|full) ' "$LOGS/bench_lora.log" | tr '\n' ' ')";;
esac
case ",${GPU_EXTRA:-}," in *,distributed,*)
  timeout 240 $PY benchmarks/bench_distributed.py --cuda --json "$LOGS/bench_distributed.json" \
    >"$LOGS/bench_distributed.log" 2>&1
  EXTRA_LINES="$EXTRA_LINES
distributed (rc $?): see bench_distributed.log in logs.tar.gz";;
esac

# 5. the record ---------------------------------------------------------------------------
RECORD_LINE=$($PY benchmarks/gpu_record.py record "$LOGS" --commit "${MCNC_COMMIT:-}" \
  --into "$OUT" 2>&1)
echo "$RECORD_LINE"

# summary ----------------------------------------------------------------------------------
{
  echo "# GPU check, $(date -u +%FT%TZ), $(( $(date +%s) - START )) s"
  echo
  grep -E '^(gpu|torch|triton) ' "$LOGS/versions.txt" | sed 's/^/    /'
  echo
  echo "tests (rc $TEST_RC): $TEST_LINE"
  echo "$RECORD_LINE"
  echo
  if [ "${GPU_MAIN:-1}" = 0 ]; then
    echo "bench_gpu.py skipped (GPU_MAIN=0)"
  elif [ -s "$LOGS/bench_gpu.md" ]; then
    cat "$LOGS/bench_gpu.md"
  elif [ -s "$LOGS/bench_gpu.json" ]; then
    echo "bench_gpu.py did not finish (rc $BENCH_RC); the sections it completed:"
    $PY -c "import json, sys; sys.path.insert(0, 'benchmarks'); import bench_gpu; \
print(bench_gpu.markdown(json.load(open(sys.argv[1]))))" "$LOGS/bench_gpu.json"
  else
    echo "bench_gpu.py produced no figures (rc $BENCH_RC):"
    tail -n 30 "$LOGS/bench.log"
  fi
  [ -n "$EXTRA_LINES" ] && echo "$EXTRA_LINES"
} >"$OUT/summary.md"
[ -s "$LOGS/bench_gpu.json" ] && cp "$LOGS/bench_gpu.json" "$OUT/"
tar -czf "$OUT/logs.tar.gz" -C "$LOGS" .
cat "$OUT/summary.md"
