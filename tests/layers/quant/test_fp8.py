"""FP8 (`layers/quant/fp8.py`): the casts, the fp8 matmul against its dequantised
reference with e5m2 gradients, delayed scaling's amax history (once per step, the max
over microbatches, scanned, resumed bitwise), the f8 dots in the lowered program, and
the fp8 matmul a GPU compiles to."""

import json
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import SMALL, fast_compiled, fast_state, random_batch

from efflm import mesh as mesh_lib
from efflm.config import load_config
from efflm.layers.quant.fp8 import (
    E4M3,
    E4M3_MAX,
    E5M2,
    E5M2_MAX,
    HISTORY,
    cast,
    fp8_matmul,
    reference_matmul,
)
from efflm.train.step import build_program
from efflm.train.trainer import train

FP8 = ("model.quant.kind=fp8", "model.quant.targets=[attention,mlp,head]",
       "model.tie_embeddings=false", "train.loss_impl=naive")


def test_casts_round_trip_within_the_format_bound_saturate_and_keep_nan():
    x = jnp.asarray(np.random.default_rng(0).normal(size=4096) * 10, jnp.float32)
    x = jnp.where(jnp.abs(x) < 0.02, 0.02, x)  # inside both formats' normal range
    for dtype, mantissa_bits in ((E4M3, 3), (E5M2, 2)):
        back = cast(x, dtype, 1.0).astype(jnp.float32)
        assert float(jnp.max(jnp.abs(back - x) / jnp.abs(x))) <= 2.0 ** -(mantissa_bits + 1)
    big = jnp.asarray([1000.0, -1e9, 1e6, jnp.nan])
    assert cast(big, E4M3, 1.0).astype(jnp.float32).tolist()[:3] == [E4M3_MAX, -E4M3_MAX,
                                                                     E4M3_MAX]
    assert cast(big, E5M2, 1.0).astype(jnp.float32).tolist()[:3] == [1024.0, -E5M2_MAX,
                                                                     E5M2_MAX]
    assert bool(jnp.isnan(cast(big, E4M3, 1.0)[3].astype(jnp.float32)))
    # A plain cast is what the clip prevents: NaN (e4m3) and inf (e5m2).
    assert bool(jnp.isnan(jnp.float32(1000.0).astype(E4M3).astype(jnp.float32)))
    assert bool(jnp.isinf(jnp.float32(1e6).astype(E5M2).astype(jnp.float32)))


@pytest.mark.parametrize("recorded", [(-1.0, -1.0, -1.0), (2.0, 0.05, 1e-3)],
                         ids=["current", "delayed"])
def test_fp8_matmul_matches_its_reference_and_its_gradients_are_e5m2(recorded):
    """Delayed scales below the tensors' amax saturate them, as the reference does; the
    backward pass multiplies the e5m2 gradient with the saved e4m3 operands, and the
    observed cotangent is the call's amax of x, w and the gradient."""
    rng = np.random.default_rng(1)
    x, w, g = (jnp.asarray(rng.normal(size=s) * c, jnp.float32)
               for s, c in (((16, 32), 3.0), ((32, 24), 0.1), ((16, 24), 1e-3)))
    recorded = jnp.asarray(recorded, jnp.float32)
    y, vjp = jax.vjp(lambda x, w, o: fp8_matmul(x, w, recorded, o), x, w, jnp.zeros(3))
    np.testing.assert_allclose(y, reference_matmul(x, w, recorded), rtol=1e-5, atol=1e-6)
    dx, dw, seen = vjp(g)

    def scale(i, now, limit):  # -1 (CURRENT): the tensor's own amax
        return (now if recorded[i] == -1 else float(recorded[i])) / limit

    amaxes = [float(jnp.max(jnp.abs(a))) for a in (x, w, g)]
    sx, sw = scale(0, amaxes[0], E4M3_MAX), scale(1, amaxes[1], E4M3_MAX)
    sg = scale(2, amaxes[2], E5M2_MAX)
    xd, wd, gd = (cast(a, t, s).astype(jnp.float32) * s
                  for a, t, s in ((x, E4M3, sx), (w, E4M3, sw), (g, E5M2, sg)))
    np.testing.assert_allclose(dx, gd @ wd.T, rtol=1e-5, atol=1e-9)
    np.testing.assert_allclose(dw, xd.T @ gd, rtol=1e-5, atol=1e-9)
    np.testing.assert_allclose(seen, amaxes, rtol=1e-6)
    assert float(jnp.max(jnp.abs(gd - g))) > 0  # the gradient really was quantised


def _histories(state):
    leaves = jax.tree_util.tree_flatten_with_path(state.model_state["state"])[0]
    return {jax.tree_util.keystr(p): np.asarray(v) for p, v in leaves if HISTORY in str(p)}


def _steps(cfg, steps):
    mesh = mesh_lib.make_mesh(cfg.mesh, jax.devices()[:1])
    program = build_program(cfg, mesh)
    batch = mesh_lib.global_batch(random_batch(cfg), mesh)
    with program.context():
        state = fast_state(program)
        step = fast_compiled(program.train_step, state, batch)
        losses = []
        for _ in range(steps):
            state, m = step(state, batch)
            losses.append(float(m["loss"]))
    return state, losses


def test_delayed_history_rolls_once_per_step_as_the_max_over_microbatches(small_config):
    """Scanned layers; 3 steps of a 4-long history: the newest amaxes first, the unused
    row zero; 4 microbatches give the histories of 1 (the amax of a step is the max over
    its microbatches, the gradient's too)."""
    over = (*FP8, "model.quant.fp8.history=4", "model.scan_layers=true",
            "optimizer.warmup_steps=0")
    whole, losses = _steps(small_config(*over), 3)
    micro, _ = _steps(small_config(*over, "train.grad_accum=4"), 3)
    hist, hist_micro = _histories(whole), _histories(micro)
    assert len(hist) == 8 and hist.keys() == hist_micro.keys()  # 7 per layer group + head
    for name, h in hist.items():
        assert h.shape[-2:] == (4, 3)
        assert (h[..., :3, :] > 0).all() and (h[..., 3, :] == 0).all(), name
        np.testing.assert_allclose(hist_micro[name], h, rtol=1e-5, err_msg=name)
    assert np.isfinite(losses).all()
    assert not any(bool(jnp.any(v)) for v in jax.tree.leaves(whole.model_state["observed"]))


def test_delayed_scaling_resumes_bitwise(tmp_path):
    common = [*SMALL, *FP8, "optimizer.schedule=constant", "optimizer.warmup_steps=0",
              "logging.every=1", "train.eval_every=0", "checkpoint.every=2",
              "model.quant.fp8.history=3"]
    rows = []
    for name, stops in (("straight", [4]), ("resumed", [2, 4])):
        workdir = str(tmp_path / name)
        for steps in stops:
            train(load_config("tiny", [*common, f"train.steps={steps}",
                                       f"train.workdir={workdir}"]))
        with open(os.path.join(workdir, "metrics.jsonl")) as f:
            rows.append([json.loads(line)["loss"] for line in f])
    assert rows[0] == rows[1] and len(rows[0]) == 4


def test_the_lowered_step_holds_f8_dots(small_config):
    cfg = small_config(*FP8)
    program = build_program(cfg, mesh_lib.make_mesh(cfg.mesh, jax.devices()[:1]))
    with program.context():
        state = jax.eval_shape(program.init, jax.random.key(0))
        batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype)
                 for k, v in random_batch(cfg).items()}
        text = program.train_step.lower(state, batch).as_text()
    dots = [line for line in text.splitlines() if "stablehlo.dot_general" in line]
    assert any(line.count("xf8E4M3FN>") == 2 for line in dots)  # forward: e4m3 x e4m3
    assert any("xf8E5M2>" in line for line in dots)  # backward: the e5m2 gradient


@pytest.mark.gpu
def test_a_gpu_compiles_the_dot_to_an_fp8_matmul():
    """On a GPU each of the three dots (forward, dx, dw) multiplies f8 operands: a cuBLASLt
    fp8 matmul, or XLA's own GEMM fusion with f8 inputs (dimensions multiples of 16)."""
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((64, 128)), jnp.bfloat16)
    w = jnp.asarray(rng.standard_normal((128, 256)), jnp.bfloat16)

    def loss(x, w):
        return jnp.sum(fp8_matmul(x, w, jnp.full(3, -1.0), jnp.zeros(3)))

    text = jax.jit(jax.value_and_grad(loss, (0, 1))).lower(x, w).compile().as_text()
    operands = _dot_operand_types(text)
    assert sum(a.startswith("f8") and b.startswith("f8") for a, b in operands) >= 3, operands


def _dot_operand_types(hlo: str) -> list[tuple[str, str]]:
    """(lhs, rhs) element types of every dot in compiled HLO text (names are resolved
    inside each computation: the printed dot does not repeat its operands' types)."""
    types, found = {}, []
    for line in hlo.splitlines():
        if line.rstrip().endswith("{") and not line.startswith(" "):
            types = {}  # a new computation
        if match := re.match(r"\s*(?:ROOT )?(%[\w.\-]+) = (\w+)\[", line):
            types[match[1]] = match[2]
        if "__cublas$lt$matmul$f8" in line:
            found.append(("f8 (cuBLASLt)", "f8 (cuBLASLt)"))
        elif match := re.search(r" dot\((%[\w.\-]+), (%[\w.\-]+)\)", line):
            found.append((types.get(match[1], "?"), types.get(match[2], "?")))
    return found
