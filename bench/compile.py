"""Compile every Pallas kernel for an NVIDIA GPU without one: Triton IR -> PTX -> cubin.

    efflm bench compile [--arch 90a] [--cases flash,ce,...] [--dtype bfloat16] [--out FILE]

For each kernel (forward and backward, at GPU-sized shapes and the default block sizes,
and inside the whole `small` train step traced as on a GPU: case group `step`) the
table gives the shared memory Triton asks for, and the registers and spill bytes
`ptxas -v` reports. A kernel that asks for more shared memory than an SM block can have
(227 KiB on Hopper) would fail at launch; spills cost speed. Nothing runs: this checks
that the kernels compile and fit, not that they are fast or right (the `gpu` tests and
`efflm bench flash_attention|grouped_matmul|linear_attention` do that on a GPU).

It needs the Triton compiler of jax's CUDA plugin and `ptxas`, both of which work on a
machine without a GPU. Install them beside the CPU jax, e.g.

    V=$(python -c "import jaxlib; print(jaxlib.__version__)")
    pip install --no-deps --target /tmp/jax-cuda jax-cuda12-plugin==$V \\
        jax-cuda12-pjrt==$V nvidia-cuda-nvcc-cu12
    PYTHONPATH=/tmp/jax-cuda JAX_PLATFORMS=cpu efflm bench compile

`ptxas` is looked for in $PTXAS, on PATH, then in the nvidia-cuda-nvcc package.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
import warnings
from dataclasses import dataclass

import jax
import jax.numpy as jnp

from efflm.bench.report import emit, header

# Without a GPU, Pallas lowers Triton kernels for compute capability 9.0 (sm_90a PTX),
# so that is the one target this check can speak for.
SMEM_LIMIT = {"90a": 227 * 1024}


@dataclass
class Compiled:
    case: str
    kernel: str
    num_warps: int
    num_stages: int
    smem: int
    registers: int | None = None
    spill_stores: int | None = None
    spill_loads: int | None = None


def _triton_module():
    """jaxlib's Triton entry point, once the CUDA plugin has registered its compiler."""
    from jax._src.lib import triton

    jax.devices()  # plugin discovery registers the compilation handler
    if not triton.has_compilation_handler("CUDA"):
        print("efflm bench compile: no CUDA Triton compiler found; install "
              "jax-cuda12-plugin (see `efflm bench compile --help`)", file=sys.stderr)
        raise SystemExit(2)
    return triton


@contextlib.contextmanager
def _capture(sink: list):
    """Make Pallas compile each Triton kernel while lowering and keep what comes out.

    jaxlib <= 0.10.2 leaves Triton compilation to XLA at executable build time, which
    needs a GPU; newer jaxlib compile while lowering. Both end in `triton.compile`.
    """
    from jax._src.pallas.triton import pallas_call_registration as reg

    triton = _triton_module()
    original, version = triton.compile, reg.jaxlib_version

    def spy(platform, module, arch, **kw):
        result = original(platform, module, arch, **kw)
        sink.append((kw, result))
        return result

    triton.compile = spy
    reg.jaxlib_version = max(version, (0, 10, 3))
    try:
        yield
    finally:
        triton.compile, reg.jaxlib_version = original, version


def _find_ptxas() -> str | None:
    found = os.environ.get("PTXAS") or shutil.which("ptxas")
    if found:
        return found
    try:
        import nvidia.cuda_nvcc as nvcc
    except ImportError:
        return None
    for root in getattr(nvcc, "__path__", []):
        path = os.path.join(root, "bin", "ptxas")
        if os.path.exists(path):
            return path
    return None


def _ptxas_info(ptxas: str, ptx: str, arch: str) -> tuple[int, int, int]:
    """(registers, spill store bytes, spill load bytes) from `ptxas -v`."""
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "kernel.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        done = subprocess.run([ptxas, f"-arch=sm_{arch}", "-v", src, "-o",
                               os.path.join(tmp, "kernel.cubin")],
                              capture_output=True, text=True, check=False)
    text = done.stdout + done.stderr
    if done.returncode != 0:
        raise RuntimeError(f"ptxas failed: {text[-2000:]}")
    regs = re.search(r"Used (\d+) registers", text)
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", text)
    return (int(regs.group(1)) if regs else -1,
            int(spills.group(1)) if spills else 0, int(spills.group(2)) if spills else 0)


def _kernel_name(ptx: str) -> str:
    found = re.search(r"\.entry\s+([A-Za-z0-9_$]+)", ptx)
    return found.group(1) if found else "?"


# ---------------------------------------------------------------------------------------
# The cases: a function of bf16 inputs whose forward and backward use the Pallas path.


def _spec(shape, dtype):
    return jax.ShapeDtypeStruct(shape, dtype)


def _grad_all(fn, n):
    """Value and grads w.r.t. the first n arguments of a function to a scalar."""
    def loss(*args):
        out = fn(*args)
        out = out[0] if isinstance(out, tuple) else out
        return jnp.sum(out.astype(jnp.float32))
    return jax.grad(loss, argnums=tuple(range(n)))


def _flash_case(dt, d, heads, kv_heads, length=2048, segments=False, window=0):
    from efflm.pallas_kernels import flash_attention

    seg = jnp.ones((1, length), jnp.int32) if segments else None

    def fn(q, k, v):
        return flash_attention(q, k, v, segment_ids=seg, window=window, interpret=False)
    args = (_spec((1, length, heads, d), dt), *[_spec((1, length, kv_heads, d), dt)] * 2)
    return _grad_all(fn, 3), args


def _sparse_case(dt, d, heads, kv_heads, length=2048, block=64):
    from efflm.pallas_kernels.block_sparse_attention import (
        block_sparse_attention,
        sliding_block_mask,
    )

    mask = sliding_block_mask(length, block_q=block, block_k=block, window_blocks=4)

    def fn(q, k, v):
        return block_sparse_attention(q, k, v, mask, block_q=block, block_k=block,
                                      interpret=False)
    args = (_spec((1, length, heads, d), dt), *[_spec((1, length, kv_heads, d), dt)] * 2)
    return _grad_all(fn, 3), args


def _nsa_case(dt, d, heads, kv_heads, select_block, n, block_q=64, length=8192):
    from efflm.pallas_kernels.selected_attention import selected_attention

    index = jnp.zeros((1, length, kv_heads, n), jnp.int32)  # the tables are XLA's work
    valid = jnp.ones((1, length, kv_heads, n), bool)
    seg = jnp.ones((1, length), jnp.int32)

    def fn(q, k, v):
        return selected_attention(q, k, v, index, valid, select_block=select_block,
                                  segment_ids=seg, block_q=block_q, interpret=False)
    args = (_spec((1, length, heads, d), dt), *[_spec((1, length, kv_heads, d), dt)] * 2)
    return _grad_all(fn, 3), args


def _ce_case(dt, d, vocab=50304, tokens=8192):
    from efflm.pallas_kernels.fused_cross_entropy import linear_cross_entropy

    targets = jnp.zeros((tokens,), jnp.int32)
    mask = jnp.ones((tokens,), jnp.bool_)

    def fn(h, w):
        loss, _, count = linear_cross_entropy(h, w, targets, mask, impl="pallas",
                                              interpret=False)
        return loss / count
    return jax.grad(fn, argnums=(0, 1)), (_spec((tokens, d), dt), _spec((d, vocab), dt))


def _gmm_case(dt, d, ffn, groups=8, tokens=16384):
    from efflm.pallas_kernels.grouped_matmul import grouped_matmul

    sizes = jnp.full((groups,), tokens // groups, jnp.int32)

    def fn(x, w):
        return grouped_matmul(x, w, sizes, impl="pallas", interpret=False)
    return _grad_all(fn, 2), (_spec((tokens, d), dt), _spec((groups, d, ffn), dt))


def _linear_case(dt, d, heads=8, length=4096, per_dim=False):
    from efflm.pallas_kernels.linear_attention import chunked_linear_attention

    def fn(q, k, v, g):
        return chunked_linear_attention(q, k, v, log_decay=g, impl="pallas",
                                        interpret=False)
    gates = (1, length, heads, d) if per_dim else (1, length, heads)
    args = (*[_spec((1, length, heads, d), dt)] * 3, _spec(gates, jnp.float32))
    return _grad_all(fn, 4), args


def _delta_case(dt, d, chunk=64, heads=8, length=4096, dv=None):
    from efflm.pallas_kernels.gated_delta_rule import gated_delta_rule_pallas

    def fn(q, k, v, log_alpha, beta):
        return gated_delta_rule_pallas(q, k, v, log_alpha, beta, chunk=chunk,
                                       interpret=False)
    args = (*[_spec((1, length, heads, d), dt)] * 2, _spec((1, length, heads, dv or d), dt),
            *[_spec((1, length, heads), jnp.float32)] * 2)
    return _grad_all(fn, 5), args


def _step_case(dt, preset="small"):
    """The whole train step of a preset with Pallas attention and loss, batch 8. `dt` is
    ignored: the preset's dtype applies."""
    from efflm.config import load_config
    from efflm.train.step import build_program

    cfg = load_config(preset, ["model.attention.impl=pallas", "train.loss_impl=pallas",
                               "train.batch_size=8"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "impl=pallas on cpu runs in interpret mode"
        program = build_program(cfg)
    shape = (cfg.train.batch_size, cfg.data.seq_len)
    batch = {k: _spec(shape, jnp.int32) for k in ("inputs", "targets", "segment_ids",
                                                  "positions")}

    def step(batch):
        return program._train_step(program._init(jax.random.key(0)), batch)
    return step, (batch,), program.context()


CASES = {
    "flash": {
        "flash d64 h8/8": lambda dt: _flash_case(dt, 64, 8, 8),
        "flash d128 h8/8": lambda dt: _flash_case(dt, 128, 8, 8),
        "flash d128 h8/2 (GQA 4)": lambda dt: _flash_case(dt, 128, 8, 2),
        "flash d128 segments+window": lambda dt: _flash_case(dt, 128, 8, 8, segments=True,
                                                          window=512),
    },
    "sparse": {
        "block-sparse d128 sliding": lambda dt: _sparse_case(dt, 128, 8, 2),
    },
    "nsa": {  # the selected branch; block_q 64 = model.attention.nsa.block_size's default
        "nsa selected d128 h8/2 l'64 n16": lambda dt: _nsa_case(dt, 128, 8, 2, 64, 16),
        "nsa selected d64 h4/4 l'16 n4 (tiny_nsa)": lambda dt: _nsa_case(dt, 64, 4, 4, 16, 4),
    },
    "ce": {
        "cross-entropy d768 V50304": lambda dt: _ce_case(dt, 768),
        "cross-entropy d2048 V50304": lambda dt: _ce_case(dt, 2048),
    },
    "gmm": {
        "gmm 1024x4096 E8": lambda dt: _gmm_case(dt, 1024, 4096),
    },
    "linear": {
        "linear d64": lambda dt: _linear_case(dt, 64),
        "linear d128": lambda dt: _linear_case(dt, 128),
        "linear d256 (value columns split)": lambda dt: _linear_case(dt, 256),
        "linear d80 (padded to 128)": lambda dt: _linear_case(dt, 80),
        "GLA gates d64": lambda dt: _linear_case(dt, 64, per_dim=True),
        "GLA gates d128": lambda dt: _linear_case(dt, 128, per_dim=True),
    },
    "delta": {
        **{f"gated delta d{d} chunk {c}": (lambda dt, d=d, c=c: _delta_case(dt, d, c))
           for d in (64, 128) for c in (32, 64)},
        "gated delta d64 dv128 chunk 64": lambda dt: _delta_case(dt, 64, 64, dv=128),
    },
    "step": {
        "train step, small preset (its bfloat16)": _step_case,
    },
}


@contextlib.contextmanager
def _as_if_on_gpu():
    """Trace as a GPU run would: `auto` and `interpret=None` read jax.default_backend()."""
    real = jax.default_backend
    jax.default_backend = lambda: "gpu"
    try:
        yield
    finally:
        jax.default_backend = real


def compile_case(name: str, build, dtype) -> list[Compiled]:
    fn, args, *context = build(dtype)  # a case may bring the context it traces in
    sink: list = []
    with _capture(sink), _as_if_on_gpu(), (context or [contextlib.nullcontext()])[0]:
        jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",))
    rows, seen = [], set()
    for kw, result in sink:
        kernel = _kernel_name(result.asm)
        key = (kernel, result.asm)
        if key in seen:
            continue
        seen.add(key)
        row = Compiled(name, kernel, kw.get("num_warps", 0), kw.get("num_stages", 0),
                       result.smem_bytes)
        row.ptx = result.asm
        rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="efflm bench compile", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", nargs="?", default="compile", choices=["compile"])
    p.add_argument("--arch", default="90a", choices=sorted(SMEM_LIMIT),
                   help="ptxas target sm_<arch> (default 90a, Hopper)")
    p.add_argument("--cases", default=",".join(CASES),
                   help=f"comma-separated groups of: {', '.join(CASES)}")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--out", default="", help="also write the table to this markdown file")
    args = p.parse_args(argv)
    groups = [c.strip() for c in args.cases.split(",") if c.strip()]
    unknown = [g for g in groups if g not in CASES]
    if unknown or not groups:
        p.error(f"--cases: unknown {unknown or 'empty'}; choose from {', '.join(CASES)}")
    ptxas = _find_ptxas()
    limit = SMEM_LIMIT[args.arch]
    lines = [*header("compile", argv if argv is not None else sys.argv[1:]),
             f"Triton (jaxlib {jax.__version__}'s, through the CUDA plugin) to PTX, then "
             f"`ptxas -arch=sm_{args.arch} -v` ({ptxas or 'ptxas not found: no registers'}). "
             f"{args.dtype} inputs; shared memory limit {limit // 1024} KiB per block.", "",
             "| case | kernel | warps | stages | smem KiB | registers | spill st/ld B | "
             "fits |", "|---|---|---|---|---|---|---|---|"]
    failures = 0
    for group in groups:
        for name, build in CASES[group].items():
            try:
                rows = compile_case(name, build, jnp.dtype(args.dtype))
            except Exception as e:  # noqa: BLE001 - a failed compile is a table row
                failures += 1
                lines.append(f"| {name} | FAILED: {type(e).__name__}: "
                             f"{str(e).splitlines()[0][:200]} | | | | | | no |")
                continue
            for r in rows:
                if ptxas:
                    try:
                        r.registers, r.spill_stores, r.spill_loads = _ptxas_info(
                            ptxas, r.ptx, args.arch)
                    except RuntimeError as e:
                        failures += 1
                        lines.append(f"| {name} | {r.kernel}: ptxas FAILED: "
                                     f"{str(e).splitlines()[0][:200]} | | | | | | no |")
                        continue
                fits = r.smem <= limit
                failures += not fits
                regs = "" if r.registers is None else str(r.registers)
                spill = "" if r.registers is None else f"{r.spill_stores}/{r.spill_loads}"
                lines.append(f"| {name} | {r.kernel} | {r.num_warps} | {r.num_stages} | "
                             f"{r.smem / 1024:.1f} | {regs} | {spill} | "
                             f"{'yes' if fits else 'NO'} |")
    emit(lines, args.out)
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
