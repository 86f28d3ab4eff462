"""`efflm export`: the quantised weights of a trained run, reloaded, give the quantised
forward pass; its errors are one line."""

import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import FAST_COMPILE, SMALL, random_batch

from efflm.cli import main
from efflm.models import LM


def _snapshot(workdir):
    out = {}
    for root, _, files in os.walk(workdir):
        for f in files:
            p = os.path.join(root, f)
            out[os.path.relpath(p, workdir)] = open(p, "rb").read()
    return out


@pytest.fixture(scope="module")
def trained_workdirs(tmp_path_factory):
    dirs = {}
    for kind in ("int8", "ternary", "fp8", "mxfp4", "qat", "none"):
        workdir = str(tmp_path_factory.mktemp(f"export_{kind}"))
        assert main(["train", "--config", "tiny", *SMALL, "train.steps=2",
                     f"train.workdir={workdir}", f"model.quant.kind={kind}",
                     "model.quant.targets=[attention,mlp,head]", "model.sparsity.nm=2:4",
                     "model.quant.qat.group_size=32", "train.eval_every=0"]) == 0
        dirs[kind] = workdir
    workdir = str(tmp_path_factory.mktemp("export_experts"))
    assert main(["train", "--config", "tiny", *SMALL, "train.steps=2", "model.mlp.kind=moe",
                 "model.moe.expert_d_ff=64", f"train.workdir={workdir}",
                 "model.quant.kind=int8", "model.quant.targets=[experts]",
                 "train.eval_every=0"]) == 0
    dirs["experts"] = workdir
    return dirs


def test_routed_experts_export_as_float_and_reload_quantised(trained_workdirs, tmp_path,
                                                             capsys):
    """Only the routed experts in int8: no hooked matmul, so no integer weights; the
    reloaded float32 experts run the int8 forward pass again."""
    from efflm.train.export import load_export
    from efflm.train.trainer import restore_run

    out = str(tmp_path / "q.npz")
    assert main(["export", "--workdir", trained_workdirs["experts"], "--out", out]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["quantized_bytes"] == 0
    cfg, variables = load_export(out)
    _, program, state, _, _ = restore_run(trained_workdirs["experts"])
    tokens = jnp.asarray(random_batch(cfg)["inputs"])
    with program.context():
        expected = jax.jit(program.model.apply, compiler_options=FAST_COMPILE)(
            state.variables(), tokens)
        got = jax.jit(LM(cfg.model).apply, compiler_options=FAST_COMPILE)(variables, tokens)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["int8", "ternary", "fp8", "mxfp4", "qat"])
def test_export_reload_reproduces_the_quantised_forward(trained_workdirs, kind, capsys,
                                                        tmp_path):
    from efflm.train.export import load_export
    from efflm.train.trainer import restore_run

    workdir = trained_workdirs[kind]
    before = _snapshot(workdir)
    if kind == "int8":  # the default place, beside the run's files
        out = os.path.join(workdir, "export", "quantized.npz")
        assert main(["export", "--workdir", workdir]) == 0
    else:
        out = str(tmp_path / "q.npz")
        assert main(["export", "--workdir", workdir, "--out", out]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["path"] == out and os.path.isfile(out)
    after = _snapshot(workdir)
    after.pop(os.path.join("export", "quantized.npz"), None)
    assert after == before  # checkpoints, metrics and config untouched
    # int8 and fp8: half of bf16 plus the scales; ternary: an eighth plus one scale each;
    # mxfp4: a quarter plus a byte per 32; qat 4-bit: a quarter plus a float32 step and
    # zero point per group of 32.
    ratio = report["quantized_bytes"] / report["quantized_as_bf16_bytes"]
    low, high = {"ternary": (0.125, 0.13), "mxfp4": (0.265, 0.266),
                 "qat": (0.375, 0.376)}.get(kind, (0.5, 0.55))
    assert low <= ratio < high, ratio

    with np.load(out) as data:
        weights = [k for k in data.files if k.endswith("/weight")]
        assert weights and all(data[k].dtype == (np.int8 if kind == "int8" else np.uint8)
                               for k in weights)  # fp8: its bytes; mxfp4, qat: packed
    cfg, variables = load_export(out)
    if kind == "fp8":
        assert all(x.dtype == jnp.float8_e4m3fn for p, x in jax.tree_util.tree_flatten_with_path(
            variables["quantized"])[0] if "weight" in jax.tree_util.keystr(p))
    _, program, state, _, _ = restore_run(workdir)
    tokens = jnp.asarray(random_batch(cfg)["inputs"])
    model = program.model
    if kind == "fp8":  # an exported fp8 model scales by the amax now (it has no history)
        model = LM(dataclasses.replace(cfg.model, quant=dataclasses.replace(
            cfg.model.quant, fp8=dataclasses.replace(cfg.model.quant.fp8,
                                                     scaling="current"))))
    with program.context():
        expected = jax.jit(model.apply, compiler_options=FAST_COMPILE)(
            state.variables(), tokens)
        got = jax.jit(LM(cfg.model).apply, compiler_options=FAST_COMPILE)(variables, tokens)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
    # The latent kernels the export replaced really are not read.
    assert all(float(jnp.max(jnp.abs(k))) == 0.0 for k in jax.tree.leaves(
        variables["params"]["blocks"]) if k.ndim >= 2)


def test_export_errors_are_one_line_exit_2(trained_workdirs, tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    for workdir, words in ((str(tmp_path / "missing"), ""), (str(empty), ""),
                           (trained_workdirs["none"], "model.quant.kind=none")):
        assert main(["export", "--workdir", workdir]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and err.startswith("efflm: error:") and words in err
    assert not os.path.exists(os.path.join(trained_workdirs["none"], "export"))
