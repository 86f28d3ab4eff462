"""`efflm bench compile`: the pieces that run without jax's CUDA plugin, and (with it) the
gated delta rule's register verdict."""

import os
import stat

import jax.numpy as jnp
import pytest

from efflm.bench import compile as compile_bench


def _cuda_compiler() -> bool:
    import jax
    from jax._src.lib import triton

    jax.devices()  # plugin discovery registers the compilation handler
    return triton.has_compilation_handler("CUDA")


def test_without_cuda_compiler_exits_2_with_advice(capsys):
    if _cuda_compiler():
        pytest.skip("the CUDA plugin is installed: the whole table would be compiled")
    with pytest.raises(SystemExit) as e:
        compile_bench.main(["--cases", "gmm"])
    assert e.value.code == 2
    assert "jax-cuda12-plugin" in capsys.readouterr().err


def test_bad_cases_are_refused(capsys):
    with pytest.raises(SystemExit) as e:
        compile_bench.main(["--cases", "flash,nope"])
    assert e.value.code == 2 and "nope" in capsys.readouterr().err


def test_ptxas_report_is_parsed(tmp_path):
    fake = tmp_path / "ptxas"
    fake.write_text("#!/bin/sh\n"
                    "echo \"ptxas info    : Compiling entry function 'flash_attention_dkv'\" >&2\n"
                    "echo 'ptxas info    : Function properties for flash_attention_dkv' >&2\n"
                    "echo '    96 bytes stack frame, 92 bytes spill stores, 220 bytes spill "
                    "loads' >&2\n"
                    "echo 'ptxas info    : Used 255 registers, used 1 barriers' >&2\n")
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    ptx = ".version 8.8\n.target sm_90a\n.visible .entry flash_attention_dkv(\n"
    assert compile_bench._kernel_name(ptx) == "flash_attention_dkv"
    assert compile_bench._ptxas_info(os.fspath(fake), ptx, "90a") == (255, 92, 220)


@pytest.mark.parametrize("group, case, dtype, kernels", [
    ("delta", "gated delta d64 chunk 64", "bfloat16", 7),
    ("linear", "GLA gates d128", "bfloat16", 5),
    ("flash", "flash d128 h8/2 (GQA 4)", "float32", 3),
])
def test_kernels_do_not_spill(group, case, dtype, kernels):
    """The compiler's verdicts the README states: none of these kernels spills registers
    on sm_90a (the gated delta rule at its default chunk; GLA's state and output passes
    at head dim 128; flash attention in float32 at its default blocks). Needs jax's CUDA
    plugin and ptxas, no GPU."""
    ptxas = compile_bench._find_ptxas()
    if not _cuda_compiler() or ptxas is None:
        pytest.skip("needs jax's CUDA plugin and ptxas (`efflm bench compile --help`)")
    rows = compile_bench.compile_case(case, compile_bench.CASES[group][case], jnp.dtype(dtype))
    assert len(rows) == kernels
    for row in rows:
        assert compile_bench._ptxas_info(ptxas, row.ptx, "90a")[1:] == (0, 0), row.kernel
