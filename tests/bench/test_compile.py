"""`efflm bench compile` pieces that run without jax's CUDA plugin."""

import os
import stat

import pytest

from efflm.bench import compile as compile_bench


def test_without_cuda_compiler_exits_2_with_advice(capsys):
    from jax._src.lib import triton

    if triton.has_compilation_handler("CUDA"):
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
