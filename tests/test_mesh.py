import jax
import numpy as np
import pytest
from conftest import FAST_COMPILE

from efflm import mesh as mesh_lib
from efflm.errors import ConfigError
from efflm.train.step import build_program


def _batches(cfg, n, seed=0):
    """`n` copies of one random batch, so that a few steps visibly lower the loss."""
    rng = np.random.default_rng(seed)
    b, t = cfg.train.batch_size, cfg.data.seq_len
    out = []
    for _ in range(1):
        seg = np.ones((b, t), np.int32)
        seg[:, t - 5:] = 0  # padding tail
        seg[::2, t // 3:t - 5] = 2
        out.append({
            "inputs": rng.integers(0, 256, (b, t)).astype(np.int32),
            "targets": rng.integers(0, 256, (b, t)).astype(np.int32),
            "segment_ids": seg,
            "positions": np.tile(np.arange(t, dtype=np.int32), (b, 1)),
        })
    return out * n


def _losses(cfg, devices, steps=3, rows=lambda batch: batch):
    mesh = mesh_lib.make_mesh(cfg.mesh, devices)
    program = build_program(cfg, mesh)
    # A few steps at small shapes: compiled without backend optimisation.
    options = FAST_COMPILE
    with program.context():
        key = jax.random.key(0)
        state = program.init.lower(key).compile(compiler_options=options)(key)
        losses, train_step = [], None
        for batch in map(rows, _batches(cfg, steps)):
            batch = mesh_lib.global_batch(batch, mesh)
            if train_step is None:
                train_step = program.train_step.lower(state, batch).compile(
                    compiler_options=options)
            state, m = train_step(state, batch)
            losses.append(float(m["loss"]))
    return np.array(losses), program, state




SHARDED = ("model.attention.num_kv_heads=2", "model.tie_embeddings=false",
           "optimizer.warmup_steps=0")


@pytest.fixture(scope="module")
def one_device_losses():
    from conftest import SMALL

    from efflm.config import load_config

    return _losses(load_config("tiny", [*SMALL, *SHARDED]), jax.devices()[:1])[0]


@pytest.mark.parametrize("mesh", [
    ["mesh.data=8"],
    ["mesh.data=1", "mesh.fsdp=8"],
    ["mesh.data=2", "mesh.tensor=4"],
    ["mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2"],
    # Sequence parallelism: the zig-zag ring (auto); all-gather with FSDP, tensor, remat.
    ["mesh.data=2", "mesh.sequence=4"],
    ["mesh.fsdp=2", "mesh.tensor=2", "mesh.sequence=2", "model.remat=full",
     "model.attention.context_parallel=allgather"],
])
def test_sharded_training_matches_one_device(small_config, one_device_losses, mesh):
    ref = one_device_losses
    cfg = small_config(*SHARDED, *mesh)
    got, program, state = _losses(cfg, jax.devices())
    np.testing.assert_allclose(got, ref, rtol=2e-5)
    assert ref[-1] < ref[0]  # it trains
    # Parameters and optimizer state really are split as the mesh says.
    kernel = state.params["blocks"]["layer_0"]["mlp"]["gate"]["kernel"]
    mu = state.opt_state[1][0].mu["blocks"]["layer_0"]["mlp"]["gate"]["kernel"]
    expected = (program.mesh.shape["fsdp"], program.mesh.shape["tensor"])
    for x in (kernel, mu):
        shard = x.addressable_shards[0].data.shape
        assert (x.shape[0] // shard[0], x.shape[1] // shard[1]) == expected


def test_hybrid_under_sequence_parallelism_matches_one_device(small_config):
    """tiny_hybrid (gla, gla, gla, softmax) under fsdp=2 x sequence=4 with scanned,
    rematerialised layers: its gla layers pass their states by all-scan, its softmax
    layer runs the zig-zag ring (`auto`); the losses equal one device's."""
    over = (*SHARDED, "model.attention.num_kv_heads=4", "model.num_layers=4")
    ref = _losses(small_config(*over, preset="tiny_hybrid"), jax.devices()[:1])[0]
    cfg = small_config(*over, "mesh.data=1", "mesh.fsdp=2", "mesh.sequence=4",
                       "model.scan_layers=true", "model.remat=full", preset="tiny_hybrid")
    got = _losses(cfg, jax.devices())[0]
    np.testing.assert_allclose(got, ref, rtol=2e-5)
    assert ref[-1] < ref[0]


def _uneven(batch):
    """Rows 0..7 keep 4..11 tokens, rows 8.. all: the microbatches of grad_accum=2 hold
    very different token counts, so averaging per microbatch would weigh them wrongly."""
    seg = batch["segment_ids"].copy()
    for i in range(len(seg)):
        seg[i] = 1 if i >= 8 else (np.arange(seg.shape[1]) < 4 + i)
    return {**batch, "segment_ids": seg}


def test_gradient_accumulation_matches_full_batch(small_config):
    over = ("train.batch_size=16", "optimizer.warmup_steps=0", "optimizer.lr=1e-3")
    ref, _, ref_state = _losses(small_config(*over), jax.devices(), rows=_uneven)
    got, _, state = _losses(small_config(*over, "train.grad_accum=2"), jax.devices(),
                            rows=_uneven)
    assert len(jax.devices()) == 8
    assert ref[-1] < ref[0] - 0.05  # a real learning rate: the steps move the loss
    np.testing.assert_allclose(got, ref, rtol=2e-5)  # per-microbatch averaging: ~3e-3
    for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(ref_state.params)):
        # Adam's steps are about lr = 1e-3; averaging per microbatch moves them by ~6e-3.
        np.testing.assert_allclose(a, b, rtol=0, atol=2e-5)


@pytest.mark.parametrize("overrides, words", [
    (["mesh.data=3"], ["multiply to 3", "8 devices"]),
    (["mesh.data=-1", "mesh.tensor=3"], ["does not divide"]),
    (["mesh.data=8", "train.batch_size=4"], ["not divisible by the 8 data shards"]),
    (["mesh.data=1", "mesh.tensor=8", "model.attention.num_heads=4"], ["num_heads=4"]),
])
def test_bad_meshes_are_explained(small_config, overrides, words):
    with pytest.raises(ConfigError) as e:
        build_program(small_config(*overrides))
    for w in words:
        assert w in str(e.value)


@pytest.mark.filterwarnings("ignore:.*runs in interpret mode")
@pytest.mark.parametrize("mesh", [
    ["mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2", "train.loss_impl=pallas"],
    ["mesh.data=4", "mesh.tensor=2", "model.attention.num_kv_heads=1"],  # heads kept whole
])
def test_pallas_kernels_under_a_mesh_match_one_device(small_config, one_device_losses,
                                                        mesh):
    """Flash attention runs per (batch, heads) shard inside shard_map, and the fused loss
    per batch shard; the losses equal the one-device XLA run."""
    cfg = small_config(*SHARDED, *mesh, "model.attention.impl=pallas")
    got, _, _ = _losses(cfg, jax.devices())
    if "model.attention.num_kv_heads=1" in mesh:
        ref, _, _ = _losses(small_config(*SHARDED, "model.attention.num_kv_heads=1"),
                            jax.devices()[:1])
    else:
        ref = one_device_losses
    np.testing.assert_allclose(got, ref, rtol=5e-5)
