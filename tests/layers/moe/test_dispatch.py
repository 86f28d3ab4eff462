"""Expert parallelism on 8 CPU devices: experts split over the `expert` mesh axis, tokens
exchanged inside shard_map; forward and gradients equal one device."""

import jax
import numpy as np
import pytest
from conftest import SMALL, fast_compiled, fast_state

from efflm import mesh as mesh_lib
from efflm.cli import main
from efflm.config import load_config
from efflm.train.step import build_program

MOE = [*SMALL, "model.moe.expert_d_ff=64", "optimizer.warmup_steps=0",
       "model.moe.ep_capacity_factor=8"]


def _batch(cfg, seed=0):
    rng = np.random.default_rng(seed)
    b, t = cfg.train.batch_size, cfg.data.seq_len
    seg = np.ones((b, t), np.int32)
    seg[::2, t // 2:] = 2
    return {"inputs": rng.integers(0, 256, (b, t)).astype(np.int32),
            "targets": rng.integers(0, 256, (b, t)).astype(np.int32),
            "segment_ids": seg, "positions": np.tile(np.arange(t, dtype=np.int32), (b, 1))}


def _run(overrides, devices, steps=0):
    """(grads, metrics) of one step's objective, the compiled HLO, and the losses of
    `steps` train steps (then the grads are not computed)."""
    cfg = load_config("tiny_moe", [*MOE, *overrides])
    mesh = mesh_lib.make_mesh(cfg.mesh, jax.devices()[:devices])
    program = build_program(cfg, mesh)
    with program.context():
        state = fast_state(program)
        batch = mesh_lib.global_batch(_batch(cfg), mesh)
        if steps:
            losses = []
            step = fast_compiled(program.train_step, state, batch)
            for _ in range(steps):
                state, m = step(state, batch)
                losses.append(float(m["loss"]))
            return losses
        grads_fn = fast_compiled(jax.jit(program.grads), state, batch)
        grads, metrics, _ = grads_fn(state, batch)
    return jax.device_get((grads, metrics)), grads_fn.as_text(), program


@pytest.fixture(scope="module")
def one_device():
    return _run([], 1)


@pytest.mark.parametrize("mesh, exchange, collective", [
    (["mesh.expert=4", "mesh.data=2"], "gather_scatter", "reduce-scatter"),
    (["mesh.expert=4", "mesh.data=2"], "all_to_all", "all-to-all"),
    (["mesh.expert=2", "mesh.fsdp=2", "mesh.data=2"], "gather_scatter", "reduce-scatter"),
    (["mesh.expert=2", "mesh.fsdp=2", "mesh.data=2"], "all_to_all", "all-to-all"),
    (["mesh.data=4", "mesh.fsdp=2"], "gather_scatter", "all-gather"),  # per-shard dispatch
])
def test_expert_parallel_equals_one_device(one_device, mesh, exchange, collective):
    (ref_grads, ref_metrics), _, _ = one_device
    (grads, metrics), hlo, program = _run([*mesh, f"model.moe.ep_exchange={exchange}"], 8)
    assert collective in hlo
    gate = program.state_shardings.params["blocks"]["layer_0"]["mlp"]["gate"]
    assert gate.spec[0] == "expert"  # split over the axis where it is > 1
    assert metrics["stats"]["moe_dropped_fraction"] == 0
    assert metrics["loss"] == pytest.approx(ref_metrics["loss"], rel=1e-6)
    for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads)):
        np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-7)


def test_int8_experts_under_expert_parallel_equal_one_device():
    """Routed experts in int8 (`model.quant.targets` entry `experts`): each device's
    share of the experts quantised as on one device (each expert's own scales)."""
    int8 = ["model.quant.kind=int8", "model.quant.targets=[experts]"]
    (ref_grads, ref_metrics), _, _ = _run(int8, 1)
    (grads, metrics), _, _ = _run([*int8, "mesh.expert=4", "mesh.data=2"], 8)
    assert metrics["loss"] == pytest.approx(ref_metrics["loss"], rel=1e-6)
    for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads)):
        np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-7)


def test_a_short_expert_parallel_run_follows_one_device():
    ref = _run([], 1, steps=3)
    got = _run(["mesh.expert=4", "mesh.data=2", "model.moe.ep_exchange=gather_scatter"], 8,
               steps=3)
    np.testing.assert_allclose(got, ref, rtol=2e-5)
    assert got[-1] < got[0]


def test_all_to_all_drops_beyond_the_per_device_capacity():
    (_, metrics), _, _ = _run(["mesh.expert=4", "mesh.data=2",
                               "model.moe.ep_exchange=all_to_all",
                               "model.moe.ep_capacity_factor=0.25"], 8)
    assert 0 < metrics["stats"]["moe_dropped_fraction"] < 1
    assert np.isfinite(metrics["loss"])


@pytest.mark.parametrize("overrides, words", [
    (["mesh.expert=8", "model.moe.num_experts=4"], "not divisible by mesh.expert=8"),
    (["model.moe.ep_exchange=alltoall"], "model.moe.ep_exchange='alltoall'"),
    (["model.moe.ep_capacity_factor=0"], "model.moe.ep_capacity_factor must be > 0"),
    (["mesh.expert=4", "model.moe.ep_exchange=ragged"], "ragged_all_to_all"),
])
def test_bad_expert_parallel_settings_exit_2(tmp_path, capsys, overrides, words):
    assert main(["train", "--config", "tiny_moe", *SMALL, f"train.workdir={tmp_path}/w",
                 "train.steps=1", *overrides]) == 2
    err = capsys.readouterr().err
    assert words in err and err.count("\n") == 1


@pytest.mark.parametrize("policy", ["causal", "batch"])
def test_all_to_all_capacity_is_causal_unless_batch(policy):
    """Under mesh.expert=4 with drops happening, changing the second half of every
    sequence moves no earlier output with the causal policy; the batch policy, which
    declares itself not causal, does move some."""
    import flax.linen as nn
    import jax.numpy as jnp
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    from efflm.layers.moe.experts import MoE
    from efflm.layers.plan import not_causal

    cfg = load_config("tiny_moe", [*MOE, "mesh.expert=4", "mesh.data=2",
                                   "model.moe.ep_exchange=all_to_all",
                                   "model.moe.ep_capacity_factor=0.5",
                                   f"model.moe.capacity_policy={policy}"])
    assert bool(not_causal(cfg.model)) == (policy == "batch")
    rng = np.random.default_rng(0)
    x = rng.normal(size=(16, 16, cfg.model.d_model)).astype(np.float32)  # 2 rows a shard
    changed = x.copy()
    changed[:, 8:] = rng.normal(size=changed[:, 8:].shape)
    mesh = mesh_lib.make_mesh(cfg.mesh, jax.devices()[:8])
    with jax.set_mesh(mesh), nn.logical_axis_rules(mesh_lib.logical_rules(cfg, mesh)):
        params = jax.jit(MoE(cfg.model).init)(jax.random.key(0), jnp.asarray(x))
        run = jax.jit(lambda p, x: MoE(cfg.model).apply(p, x, mutable=["stats"]))
        shard = NamedSharding(mesh, P(("data", "fsdp", "expert")))
        (a, stats), (b, _) = (run(params, jax.device_put(v, shard)) for v in (x, changed))
    assert float(stats["stats"]["mean:moe_dropped_fraction"][0]) > 0
    early = float(jnp.max(jnp.abs(a[:, :8] - b[:, :8])))
    assert float(jnp.max(jnp.abs(a[:, 8:] - b[:, 8:]))) > 0
    assert (early == 0) == (policy == "causal"), early
