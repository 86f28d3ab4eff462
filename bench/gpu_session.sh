#!/usr/bin/env bash
# The GPU checks in one call: the `gpu` tests, then the kernel and MFU benchmarks, each
# under its own time limit, everything written to one folder with the machine's versions.
#
#   bash bench/gpu_session.sh [OUTDIR] [tests|bench|all]
#
# OUTDIR defaults to $OUT, else bench/results/gpu. `tests` takes at most 5 minutes and
# `bench` at most 9.5, so each fits one device call; JAX_PLATFORMS defaults to cuda.
#
# Run from the repository root on a CUDA machine. When `.whl/` is present (wheels of
# what a network-less image lacks, see the README's "GPU machines"), they are installed
# into /tmp/site first; efflm itself is installed editable without dependencies.
# Each part's table goes to OUTDIR/<part>.md, its log to OUTDIR/<part>.log; a failing
# or timed-out part is recorded in OUTDIR/summary.txt and the next part still runs.
set -uo pipefail
out=${1:-${OUT:-bench/results/gpu}}
what=${2:-all}
mkdir -p "$out"
summary="$out/summary.txt"
: > "$summary"

if [ -d .whl ] && ls .whl/*.whl > /dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl > "$out/install.log" 2>&1
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
python3 -m pip install -q --no-deps --no-build-isolation -e . >> "$out/install.log" 2>&1 \
  || { echo "install failed (see install.log)" | tee -a "$summary"; exit 1; }

{
  date -u +"%Y-%m-%d %H:%M UTC"
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv 2>&1
  python3 - <<'EOF'
import jax, jaxlib
print("jax", jax.__version__, "jaxlib", jaxlib.__version__, "devices", jax.devices())
try:
    from jax._src.lib import cuda_versions
    print("cuda runtime", cuda_versions.cuda_runtime_get_version(),
          "cudnn", cuda_versions.cudnn_get_version())
except Exception as e:  # the module moves between jaxlib versions
    print("cuda/cudnn versions unavailable:", e)
EOF
} > "$out/env.txt" 2>&1
cat "$out/env.txt"

part() {  # part NAME SECONDS COMMAND...
  local name=$1 limit=$2
  shift 2
  local start=$SECONDS
  timeout "$limit" "$@" > "$out/$name.log" 2>&1
  local rc=$?
  echo "$name: rc=$rc in $((SECONDS - start)) s: $*" | tee -a "$summary"
}

export JAX_PLATFORMS=${JAX_PLATFORMS:-cuda}
if [ "$what" = tests ] || [ "$what" = all ]; then
  part gpu_tests 300 python3 -m pytest -q -m gpu -p no:cacheprovider --durations=15
fi
if [ "$what" = bench ] || [ "$what" = all ]; then
  # At most 570 s together, so that `bench` fits one 10-minute call.
  part flash_attention 140 efflm bench flash_attention --out "$out/flash_attention.md"
  part flash_attention_gqa 80 efflm bench flash_attention --group 4 --head-dims 128 \
    --width 2048 --out "$out/flash_attention_gqa.md"
  part grouped_matmul 80 efflm bench grouped_matmul --out "$out/grouped_matmul.md"
  part linear_attention 110 efflm bench linear_attention --out "$out/linear_attention.md"
  part fused_cross_entropy 30 efflm bench fused_cross_entropy --vocabs 32768,65536,131072 \
    --out "$out/fused_cross_entropy.md"
  part mfu 130 efflm bench mfu --configs small --steps 10 model.dtype=bfloat16 \
    --out "$out/mfu.md"
fi
echo
cat "$summary"
for f in "$out"/*.md; do [ -f "$f" ] && { echo; tail -n 25 "$f"; }; done
