"""Quantisation-aware training (`layers/quant/qat.py`): the fake-quantised weights and
their levels, LSQ's gradients against the analytic ones, and the end-to-end phase
(`train.trainable=quant_scales`) resumed from a full-precision run."""

import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import SMALL

from efflm.cli import main
from efflm.layers.quant.qat import codes, fake_quantize_weight, initial_step_zero
from efflm.train.trainer import load_workdir_config

GROUP, BITS = 4, 2  # levels 0..3


def _case():
    rng = np.random.default_rng(0)
    w = rng.normal(size=(8, 3)).astype(np.float32)
    step, zero = initial_step_zero(jnp.asarray(w), BITS, GROUP)
    # Shrink the steps so that some weights clip at either end, and move a zero point.
    step = step * jnp.asarray(rng.uniform(0.5, 1.0, size=step.shape), jnp.float32)
    return jnp.asarray(w), step, zero.at[0, 0].add(1.0)


def test_levels_and_round_trip_within_half_a_step():
    w, step, zero = _case()
    q = np.asarray(codes(w, step, zero, BITS, GROUP))
    assert set(np.unique(q)) <= {0.0, 1.0, 2.0, 3.0}
    s, z = (np.repeat(np.asarray(a), GROUP, axis=0) for a in (step, zero))
    back = np.asarray(fake_quantize_weight(w, step, zero, BITS, GROUP))
    np.testing.assert_allclose(back, (q - z) * s, rtol=1e-6)
    v = np.asarray(w) / s + z
    inside = (v >= 0) & (v <= 3)
    assert inside.any() and (~inside).any()
    assert np.all(np.abs(back - np.asarray(w))[inside] <= s[inside] / 2 + 1e-6)
    nan = fake_quantize_weight(w.at[1, 2].set(jnp.nan), step, zero, BITS, GROUP)
    assert np.isnan(np.asarray(nan)[1, 2]) and np.isfinite(np.delete(np.asarray(nan), 5)).all()
    # The initial step and zero point cover each group's range exactly.
    s0, z0 = initial_step_zero(w, BITS, GROUP)
    q0 = np.asarray(codes(w, s0, z0, BITS, GROUP)).reshape(2, GROUP, 3)
    assert (q0.min(axis=1) == 0).all() and (q0.max(axis=1) == 3).all()


def test_lsq_gradients_equal_the_analytic_ones():
    """d/dw: 1 inside the range, 0 where it clips; d/ds: round(v) - v inside, q - z at
    the ends; d/dz: 0 inside, -s where it clips; s's and z's times 1/sqrt(G (2^b - 1))."""
    w, step, zero = _case()
    c = jnp.asarray(np.random.default_rng(1).normal(size=w.shape), jnp.float32)
    gw, gs, gz = jax.grad(lambda w, s, z: jnp.sum(c * fake_quantize_weight(w, s, z, BITS, GROUP)),
                          (0, 1, 2))(w, step, zero)
    s, z = (np.repeat(np.asarray(a), GROUP, axis=0) for a in (step, np.round(zero)))
    v = np.asarray(w) / s + z
    low, high = v < 0, v > 3
    inside = ~(low | high)
    c = np.asarray(c)
    factor = 1 / math.sqrt(GROUP * 3)
    np.testing.assert_allclose(gw, c * inside, rtol=1e-6)
    ds = np.where(inside, np.round(v) - v, np.where(low, -z, 3 - z))
    np.testing.assert_allclose(gs, factor * (c * ds).reshape(2, GROUP, 3).sum(1),
                               rtol=1e-5, atol=1e-6)
    dz = np.where(inside, 0.0, -s)
    np.testing.assert_allclose(gz, factor * (c * dz).reshape(2, GROUP, 3).sum(1),
                               rtol=1e-5, atol=1e-6)


def _params(workdir, step):
    """The parameters of a workdir's checkpoint at `step`, flattened by path."""
    from efflm.train.trainer import restore_run

    _, _, state, _, at = restore_run(workdir)
    assert at == step
    return {jax.tree_util.keystr(p): np.asarray(v)
            for p, v in jax.tree_util.tree_flatten_with_path(state.params)[0]}


def test_scale_only_phase_resumes_a_full_precision_run(tmp_path, capsys):
    """Two full-precision steps, then two with qat training its step sizes alone: the
    resume says what it drops, the weights and zero points stay bitwise, the step sizes
    start from the weights' ranges and move, and the loss stays finite; config.yaml
    changes with the first checkpoint of the new layout."""
    workdir = str(tmp_path / "w")
    common = [*SMALL, f"train.workdir={workdir}", "train.eval_every=0", "logging.every=1",
              "checkpoint.every=2", "model.scan_layers=true"]  # step sizes stacked by scan
    assert main(["train", "--config", "tiny", *common, "train.steps=2"]) == 0
    before = _params(workdir, 2)
    phase = ["model.quant.kind=qat", "model.quant.qat.group_size=32",
             "train.trainable=quant_scales", "optimizer.schedule=constant",
             "optimizer.warmup_steps=0", "optimizer.lr=1e-4"]
    # No step to run: nothing is saved in the new layout, so config.yaml keeps
    # describing the full-precision checkpoints, and the next resume reads them.
    assert main(["train", "--config", "tiny", *common, *phase, "train.steps=2"]) == 0
    assert load_workdir_config(workdir).model.quant.kind == "none"
    capsys.readouterr()
    assert main(["train", "--config", "tiny", *common, *phase, "train.steps=4"]) == 0
    assert load_workdir_config(workdir).model.quant.kind == "qat"
    out = capsys.readouterr().out
    assert "resuming with model.quant.kind none -> qat" in out
    assert "train.trainable all -> quant_scales: the optimizer state of the frozen" in out
    after = _params(workdir, 4)
    steps = [k for k in after if "qat_step" in k]
    assert steps and all(k not in before for k in steps)
    assert all(np.array_equal(after[k], v) for k, v in before.items())
    query = "['blocks']['layers']['layer_0']['attention']['query']"
    kernel = before[query + "['kernel']"][1].reshape(64, -1)  # the second layer's
    first = np.asarray(initial_step_zero(jnp.asarray(kernel), 4, 32)[0])
    moved = after[query + "['matmul']['qat_step']"][1]
    assert moved.shape == first.shape and 0 < np.abs(moved - first).max() < 0.5 * first.max()
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        losses = [json.loads(line)["loss"] for line in f if '"loss"' in line]
    assert len(losses) == 4 and np.isfinite(losses).all()


@pytest.mark.parametrize("bits, per_byte", [(2, 4), (3, 2), (4, 2), (8, 1)])
def test_levels_pack_as_many_a_byte_as_their_bits_allow(bits, per_byte):
    from efflm.layers.quant.qat import Qat

    q = jnp.asarray(np.random.default_rng(bits).integers(0, 2 ** bits, size=(64, 6)))
    packed = Qat.pack(q)
    assert packed.dtype == jnp.uint8 and packed.size == q.size // per_byte
    np.testing.assert_array_equal(Qat.unpack(packed, q.shape), q)


def test_step_sizes_and_zero_points_are_not_decayed():
    from efflm.train.optim import decay_mask

    params = {"dense": {"kernel": 0.0, "matmul": {"qat_step": 0.0, "qat_zero": 0.0}}}
    assert decay_mask(params) == {
        "dense": {"kernel": True, "matmul": {"qat_step": False, "qat_zero": False}}}


@pytest.mark.parametrize("overrides, words", [
    (["model.quant.kind=qat", "model.quant.qat.bits=5"], "model.quant.qat.bits='5'"),
    (["model.quant.kind=qat", "model.quant.qat.group_size=48"],
     "model.quant.qat.group_size=48 does not divide the input width 64 of the attention"),
    (["model.quant.kind=qat", "model.quant.qat.group_size=64", "model.mlp.kind=moe",
      "model.moe.num_shared_experts=1", "model.moe.expert_d_ff=32"],
     "does not divide the input width 32 of the mlp"),
    (["train.trainable=quant_scales"], "model.quant.kind=none has none"),
    (["model.quant.kind=mxfp4", "model.d_model=48", "model.attention.num_heads=3"],
     "mxfp4's block of 32 does not divide the input width 48 of the attention"),
])
def test_bad_quant_settings_exit_2_with_one_line(tmp_path, capsys, overrides, words):
    assert main(["train", "--config", "tiny", *SMALL, f"train.workdir={tmp_path}/w",
                 *overrides]) == 2
    err = capsys.readouterr().err
    assert words in err and err.count("\n") == 1, err
    assert not (tmp_path / "w").exists()
