"""`efflm bench compile`: the pieces that run without jax's CUDA plugin, and (with it) the
gated delta rule's register verdict."""

import os
import stat

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


def test_gated_delta_rule_kernels_do_not_spill_at_the_default_chunk():
    """The README's compiler verdict: at head dim 64 and chunk 64, in bfloat16, none of
    the gated delta rule's kernels spills registers on sm_90a (needs jax's CUDA plugin
    and ptxas; no GPU)."""
    import jax.numpy as jnp

    ptxas = compile_bench._find_ptxas()
    if not _cuda_compiler() or ptxas is None:
        pytest.skip("needs jax's CUDA plugin and ptxas (`efflm bench compile --help`)")
    rows = compile_bench.compile_case("gated delta d64 chunk 64",
                                      compile_bench.CASES["delta"]["gated delta d64 chunk 64"],
                                      jnp.bfloat16)
    assert len(rows) == 7
    for row in rows:
        assert compile_bench._ptxas_info(ptxas, row.ptx, "90a")[1:] == (0, 0), row.kernel
