#!/usr/bin/env bash
# The GPU checks in one call of about 8 minutes: the `gpu` tests, then the kernel and MFU
# benchmarks, the most important first, each under its own time limit.
#
#   bash bench/gpu_session.sh [OUTDIR] [PARTS]
#
# PARTS is a comma-separated list drawn from: tests (at most 140 s), flash (our flash
# attention against jax.nn's xla and cudnn paths and jax's Pallas mha, head dims 64 and
# 128, 1K-16K), linear (linear attention against flash, 4K-32K), gmm (grouped matmul
# against ragged_dot), mfu (`small` and `small_moe` in bf16), gqa (flash with 4 query
# heads per K/V head), ce (fused cross-entropy memory and time), selected (NSA's selected branch), tune (our flash
# attention at block sizes 128x64, 64x128 and 128x128 beside cuDNN).
# The default, `tests,flash,linear,gmm`, takes at most about 7 minutes, so a second
# call that checks fixes (e.g. `tests,mfu,gqa`) still fits the device time of a session.
# PYTEST_K selects tests by pytest's -k expression (e.g. "linear and bf16"). JAX_PLATFORMS defaults to cuda.
#
# Run from the repository root on a CUDA machine. When `.whl/` is present (wheels of what a
# network-less image lacks, see the README's "GPU machines"), they are installed into
# /tmp/site first; efflm itself is installed editable without dependencies. Everything is
# written to a work folder and packed into OUTDIR/gpu_session.tgz after each part (so a
# call cut short still returns what finished); OUTDIR/summary.txt lists each part's exit
# status and time. OUTDIR defaults to $OUT, else bench/results/gpu.
set -uo pipefail
out=${1:-${OUT:-bench/results/gpu}}
parts=${2:-tests,flash,linear,gmm}
mkdir -p "$out"
work=$(mktemp -d)
summary="$work/summary.txt"
: > "$summary"
pack() { cp "$summary" "$out/summary.txt"; tar czf "$out/gpu_session.tgz" -C "$work" .; }

if [ -d .whl ] && ls .whl/*.whl > /dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl > "$work/install.log" 2>&1
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
python3 -m pip install -q --no-deps --no-build-isolation -e . >> "$work/install.log" 2>&1 \
  || { echo "install failed (see install.log)" | tee -a "$summary"; pack; exit 1; }

{
  date -u +"%Y-%m-%d %H:%M UTC"
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv 2>&1
  python3 - <<'EOF'
import jax, jaxlib
print("python", __import__("sys").version.split()[0], "jax", jax.__version__,
      "jaxlib", jaxlib.__version__, "devices", jax.devices())
try:
    from jax._src.lib import cuda_versions
    print("cuda runtime", cuda_versions.cuda_runtime_get_version(),
          "cudnn", cuda_versions.cudnn_get_version())
except Exception as e:  # the module moves between jaxlib versions
    print("cuda/cudnn versions unavailable:", e)
for name in ("triton", "flax", "optax", "orbax.checkpoint"):
    try:
        print(name, __import__(name, fromlist=["_"]).__version__)
    except Exception as e:
        print(name, "unavailable:", type(e).__name__)
EOF
} > "$work/env.txt" 2>&1
cat "$work/env.txt"

part() {  # part NAME SECONDS COMMAND...: SIGINT at the limit, so pytest still summarises
  local name=$1 limit=$2
  shift 2
  local start=$SECONDS
  PYTHONUNBUFFERED=1 timeout -s INT -k 10 "$limit" "$@" > "$work/$name.log" 2>&1
  local rc=$?
  echo "$name: rc=$rc in $((SECONDS - start)) s: $*" | tee -a "$summary"
  pack
}

export JAX_PLATFORMS=${JAX_PLATFORMS:-cuda}
for p in ${parts//,/ }; do
  case $p in
    tests) part gpu_tests 140 python3 -m pytest -q -m gpu -p no:cacheprovider -rfE \
             --durations=15 -k "${PYTEST_K:-}" ;;
    flash) part flash_attention 80 efflm bench flash_attention --head-dims 128 --runs 10 \
             --out "$work/flash_attention.md"
           part flash_attention_d64 50 efflm bench flash_attention --head-dims 64 \
             --seqs 1024,4096,16384 --runs 10 --out "$work/flash_attention_d64.md" ;;
    linear) part linear_attention 70 efflm bench linear_attention --seqs 4096,8192,16384,32768 \
              --runs 5 --out "$work/linear_attention.md" ;;
    gmm) part grouped_matmul 50 efflm bench grouped_matmul --tokens 16384,65536 --d-models 2048 \
           --runs 5 --out "$work/grouped_matmul.md" ;;
    tune) for blocks in 128x64 64x128 128x128; do
            part "flash_blocks_$blocks" 30 efflm bench flash_attention --head-dims 64,128 \
              --seqs 4096,16384 --impls ours,cudnn --block-q "${blocks%x*}" \
              --block-k "${blocks#*x}" --runs 10 --out "$work/flash_blocks_$blocks.md"
          done ;;
    mfu) part mfu 75 efflm bench mfu --configs small,small_moe --steps 5 \
           model.dtype=bfloat16 --out "$work/mfu.md" ;;
    gqa) part flash_attention_gqa 60 efflm bench flash_attention --group 4 --head-dims 128 \
           --seqs 2048,4096,8192,16384 --runs 10 --out "$work/flash_attention_gqa.md" ;;
    ce) part fused_cross_entropy 60 efflm bench fused_cross_entropy --time --d-model 768 \
          --vocabs 32768,65536,131072 --runs 10 --out "$work/fused_cross_entropy.md" ;;
    selected) part selected_attention 60 efflm bench selected_attention --runs 5 \
                --out "$work/selected_attention.md" ;;
    *) echo "unknown part '$p'" | tee -a "$summary" ;;
  esac
done
echo
cat "$summary"
grep -h -A3 "^FAILED\|^ERROR\|passed\|failed" "$work/gpu_tests.log" 2>/dev/null | tail -n 40
for f in "$work"/*.md; do [ -f "$f" ] && { echo; tail -n 14 "$f"; }; done
for f in "$work"/*.log; do  # a part that wrote no table: its last lines (rows done, error)
  name=$(basename "$f" .log)
  case $name in install|gpu_tests) continue ;; esac
  [ -f "$work/$name.md" ] || { echo; echo "== $name (no table)"; { grep '^row:' "$f"; tail -n 2 "$f"; } | cut -c1-400; }
done
