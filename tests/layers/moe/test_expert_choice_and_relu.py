"""The expert_choice and relu (BlockFFN) routers: per-token references, their statistics,
FLOPs, configuration errors, training and the refusal to sample a non-causal model."""

import json
import math
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import SMALL, fast_jit

from efflm.cli import main
from efflm.config import load_config
from efflm.flops import traced_matmul_flops
from efflm.layers.moe.expert_choice import expert_choice_picks, expert_choice_reference
from efflm.layers.moe.experts import MoE
from efflm.layers.moe.relu import ReluRouter, locality_loss, relu_gates, relu_picks, relu_reference

D, E, K, F, SHAPE = 16, 4, 2, 8, (2, 8)
LAYER = ("model.mlp.kind=moe", f"model.d_model={D}", f"model.moe.num_experts={E}",
         f"model.moe.top_k={K}", f"model.moe.expert_d_ff={F}", "model.moe.block_rows=4",
         "model.init_std=0.5", "model.num_layers=2")
EXPERT_CHOICE = ("model.moe.router=expert_choice", "model.moe.dispatch=capacity",
                 "model.moe.capacity_policy=batch")


def _layer(small_config, *overrides):
    """A layer's config, inputs and parameters, drawn with numpy (std 0.5; the relu
    router's norm scale around 1) to spare compiling jax.random's initialisers."""
    cfg = small_config(*LAYER, *overrides).model
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(*SHAPE, D)), jnp.float32)
    shapes = nn.unbox(jax.eval_shape(MoE(cfg).init, jax.random.key(0), x)["params"])
    params = jax.tree.map(lambda s: jnp.asarray(0.5 * rng.normal(size=s.shape), s.dtype),
                          shapes)
    if "norm_scale" in params["router"]:
        params["router"]["norm_scale"] = 1 + 0.2 * params["router"]["norm_scale"]
    return cfg, x, params


def _apply(cfg, params, x):
    return MoE(cfg).apply({"params": params}, x, mutable=["losses", "stats"])


def _stats(sown):
    flat = jax.tree_util.tree_flatten_with_path(sown["stats"])[0]
    return {path[-2].key.split(":")[1]: float(v) for path, v in flat}


def _check_against_reference(cfg, params, x, reference):
    """Values and gradients (experts, router, inputs) of the layer against `reference`
    (params, x) -> output; returns the sown collections."""
    w = jnp.asarray(np.random.default_rng(2).normal(size=x.shape), jnp.float32)

    def loss(p, x):
        out, sown = _apply(cfg, p, x)
        return jnp.sum(out * w), (out, sown)

    (_, (out, sown)), grads = fast_jit(jax.value_and_grad(loss, (0, 1), has_aux=True))(
        params, x)
    ref = reference(params, x)
    scale = float(jnp.max(jnp.abs(ref)))
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5 * scale)
    ref_grads = fast_jit(jax.grad(lambda p, x: jnp.sum(reference(p, x) * w), (0, 1)))(
        params, x)
    for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5 * float(jnp.max(jnp.abs(b))))
    assert all(float(jnp.max(jnp.abs(g))) > 0 for g in jax.tree.leaves(grads[0]["router"]))
    return sown


def _weights(p):
    return p["gate"], p["up"], p["out"]


def test_expert_choice_matches_the_per_token_reference(small_config):
    """Each expert takes its top-capacity tokens of each sequence (capacity =
    ceil(capacity_factor * length * top_k / E) = 2 here), tokens sum the affinity-weighted
    outputs of the experts that took them: values, gradients, and the count of tokens
    no expert took."""
    cfg, x, params = _layer(small_config, *EXPERT_CHOICE, "model.moe.capacity_factor=0.5")
    capacity = math.ceil(0.5 * SHAPE[1] * K / E)
    kernel = params["router"]["kernel"]
    picks = expert_choice_picks(jax.nn.softmax(x @ kernel, axis=-1), capacity)
    assert all(len(p) == capacity for seq in picks for p in seq)

    def reference(p, x):
        return expert_choice_reference(x, p["router"]["kernel"], _weights(p), picks)

    sown = _check_against_reference(cfg, params, x, reference)
    stats = _stats(sown)
    counts = np.zeros(SHAPE)
    for b, seq in enumerate(picks):
        for p in seq:
            counts[b, p] += 1
    assert np.mean(counts == 0) > 0
    assert stats["moe_tokens_without_expert"] == pytest.approx(np.mean(counts == 0))
    assert stats["moe_experts_per_token_mean"] == pytest.approx(counts.mean())
    assert stats["moe_experts_per_token_max"] == counts.max()
    # Balanced by construction, and nothing dropped: no load or dropped statistics.
    assert not {"expert_load_cv", "moe_dropped_fraction"} & set(stats)


def test_relu_matches_the_per_token_reference_and_counts_overflow(small_config):
    """Gates RMSNorm(ReLU(x W_r)) over the experts, a variable number of experts per
    token; with a budget of 1 row per token the active pairs that do not fit (token
    order, largest gate first, the budget growing with the position) are dropped exactly
    as the loop drops them, and counted."""
    bound = 1
    cfg, x, params = _layer(small_config, "model.moe.router=relu",
                            f"model.moe.relu.rows_per_token={bound}")
    router = params["router"]
    gates, logits, _ = relu_gates(x, router["kernel"], router["norm_scale"], cfg.norm_eps)
    kept, dropped = relu_picks(gates, logits > 0, bound)
    active = int(jnp.sum(logits > 0))
    per_token = active / (SHAPE[0] * SHAPE[1])
    assert 1 < per_token < E and len(set(np.sum(logits > 0, -1).ravel().tolist())) > 1

    def reference(p, x):
        r = p["router"]
        return relu_reference(x, r["kernel"], r["norm_scale"], _weights(p), kept,
                              cfg.norm_eps)

    stats = _stats(_check_against_reference(cfg, params, x, reference))
    assert dropped > 0 and len(kept) <= bound * x.shape[0] * x.shape[1]
    assert stats["relu_overflow_fraction"] == pytest.approx(dropped / active)
    assert stats["relu_active_per_token"] == pytest.approx(per_token)


def test_relu_sparsity_statistics_and_l1_on_a_hand_built_case(small_config):
    """Token-level sparsity: the fraction of zero (token, expert) gates; chunk-level: the
    fraction of experts unused by all 8 tokens of a chunk; the L1 loss is relu_l1 times
    the mean L1 norm of the RMS-normalised gates."""
    cfg = small_config(*LAYER, "model.moe.router=relu", "model.moe.relu.l1=0.5").model
    # Logits = x (identity router): chunk 1 uses expert 0 only, chunk 2 experts 1 and 2
    # alternately and expert 3 in its last token.
    pattern = np.full((1, 16, E), -1.0, np.float32)
    pattern[0, :8, 0] = 2.0
    pattern[0, 8:16:2, 1] = 1.0
    pattern[0, 9:16:2, 2] = 1.0
    pattern[0, 15, 3] = 3.0
    params = {"kernel": jnp.eye(E), "norm_scale": jnp.ones(E)}
    _, sown = fast_jit(lambda p, x: ReluRouter(cfg).apply(
        {"params": p}, x, {}, mutable=["losses", "stats"]))(params, jnp.asarray(pattern))
    stats = _stats(sown)
    assert stats["relu_token_sparsity"] == pytest.approx(1 - 17 / 64)
    assert stats["relu_chunk_sparsity"] == pytest.approx((3 + 1) / 8)
    assert stats["relu_active_per_token"] == pytest.approx(17 / 16)
    activity = np.array([8, 4, 4, 1])
    assert stats["relu_active_load_cv"] == pytest.approx(activity.std() / activity.mean())
    # one active expert: normalised gate sqrt(E) = 2; token 15: (1, 3) / sqrt(10 / 4)
    l1 = (15 * 2 + 4 / math.sqrt(10 / 4)) / 16
    assert float(sown["losses"]["relu_l1"][0]) == pytest.approx(0.5 * l1, rel=1e-5)


def test_relu_locality_chunk_and_balance_losses_against_per_token_loops(small_config):
    """BlockFFN's losses on two rows (the second with two documents and padding) against
    loops over tokens: locality is the BCE of a * z_{t-1} against sigmoid(a * z_t) over
    the consecutive real pairs of one document; chunk is 1 - prod_t (1 - p_{t,e}) over
    the chunks with a real token, p the gates normalised to sum 1; balance is
    E * sum_i f_i P_i over the pairs kept under the row bound. Both tokens of a pair get
    gradient."""
    a, chunk_len = 3.0, 4
    cfg = small_config(*LAYER, "model.moe.router=relu", "model.moe.relu.l1=0",
                       "model.moe.relu.balance=0",
                       f"model.moe.relu.sharpness={a}", "model.moe.relu.locality=0.5",
                       "model.moe.relu.chunk=0.25",
                       f"model.moe.relu.chunk_len={chunk_len}").model
    z = np.random.default_rng(3).normal(size=(2, 10, E)).astype(np.float32)
    seg = np.array([[1] * 10, [1, 1, 1, 2, 2, 2, 2, 0, 0, 0]], np.int32)
    params = {"kernel": jnp.eye(E), "norm_scale": jnp.ones(E)}
    _, sown = fast_jit(lambda p, x, s: ReluRouter(cfg).apply(
        {"params": p}, x, {}, s, mutable=["losses", "stats"]))(params, jnp.asarray(z),
                                                                  jnp.asarray(seg))

    def bce(x, y):  # -(y log sigmoid(x) + (1 - y) log(1 - sigmoid(x)))
        return y * np.logaddexp(0, -x) + (1 - y) * np.logaddexp(0, x)

    terms = [bce(a * z[b, t - 1, e], 1 / (1 + np.exp(-a * z[b, t, e])))
             for b in range(2) for t in range(1, 10) for e in range(E)
             if seg[b, t] and seg[b, t] == seg[b, t - 1]]
    assert len(terms) == (9 + 5) * E
    assert float(sown["losses"]["relu_locality"][0]) == pytest.approx(
        0.5 * np.mean(terms), rel=1e-5)
    relu = np.maximum(z, 0) * (seg > 0)[..., None]
    p = relu / np.maximum(relu.sum(-1, keepdims=True), 1e-30)
    used = [1 - np.prod(1 - p[b, c:c + chunk_len, e]) for b in range(2)
            for c in range(0, 8, chunk_len) if seg[b, c:c + chunk_len].any()
            for e in range(E)]
    assert len(used) == 4 * E
    assert float(sown["losses"]["relu_chunk"][0]) == pytest.approx(0.25 * np.mean(used),
                                                                   abs=1e-4)
    # Balance at a bound of one row per token: E * sum_i f_i P_i, f over the kept pairs.
    cfg = small_config(*LAYER, "model.moe.router=relu", "model.moe.relu.rows_per_token=1",
                       "model.moe.relu.balance=0.3").model
    _, sown = fast_jit(lambda p, x, s: ReluRouter(cfg).apply(
        {"params": p}, x, {}, s, mutable=["losses"]))(params, jnp.asarray(z),
                                                       jnp.asarray(seg))
    gates = relu_gates(jnp.asarray(z), params["kernel"], params["norm_scale"],
                       cfg.norm_eps)[0]
    kept, dropped = relu_picks(gates, (z > 0) & (seg > 0)[..., None], 1, seg)
    assert dropped > 0
    f = np.bincount([e for _, _, e in kept], minlength=E) / len(kept)
    share = p[seg > 0].mean(0)
    assert float(sown["losses"]["balance"][0]) == pytest.approx(0.3 * E * np.sum(f * share),
                                                               rel=1e-4)
    pair = np.ones((1, 1), bool)
    grad = jax.grad(lambda lg: locality_loss(lg, pair, a))(jnp.asarray(z[:1, :2]))
    assert np.all(np.abs(np.asarray(grad)) > 0)


def test_relu_stays_causal_when_its_bound_drops_pairs(small_config):
    """Changing the last tokens of each sequence leaves the earlier outputs of a relu
    layer as they were, even with a bound (1 row per token) that drops pairs (every kind
    at its defaults, expert choice's declared non-causality included: tests/test_kinds.py)."""
    cfg, x, params = _layer(small_config, "model.moe.router=relu",
                            "model.moe.relu.rows_per_token=1")
    later = x.at[:, 5:].set(-3.0 * x[:, 5:])
    apply = fast_jit(lambda x: _apply(cfg, params, x))
    (out, sown), (out_later, _) = apply(x), apply(later)
    np.testing.assert_array_equal(out[:, :5], out_later[:, :5])
    assert not np.allclose(out[:, 5:], out_later[:, 5:])
    assert _stats(sown)["relu_overflow_fraction"] > 0


def test_relu_model_decodes_as_its_full_pass_when_the_bound_cannot_bind(small_config):
    """With relu_rows_per_token = num_experts no pair is ever dropped, so logits through
    the decoding cache (a prefill, then one token at a time, each call with its own row
    bound) equal one forward pass over the whole sequence."""
    from conftest import cached_and_full_logits

    from efflm.models import LM

    cfg = small_config("model.mlp.kind=moe", "model.moe.router=relu",
                       f"model.moe.num_experts={E}", f"model.moe.relu.rows_per_token={E}",
                       f"model.moe.expert_d_ff={F}", "model.d_model=32", "model.num_layers=1")
    model = LM(cfg.model)
    shapes = nn.unbox(jax.eval_shape(model.init, jax.random.key(0),
                                     jnp.zeros((1, 8), jnp.int32)))["params"]
    rng = np.random.default_rng(5)
    params = jax.tree.map(lambda s: jnp.asarray(0.2 * rng.normal(size=s.shape), s.dtype),
                          shapes)
    cached, full = cached_and_full_logits(model, {"params": params}, t=16, prefill=9)
    np.testing.assert_allclose(cached, full, rtol=1e-5, atol=1e-5)


def test_rows_dispatched_per_shard_equal_one_device(small_config):
    """On 8 devices (mesh.data=4, mesh.fsdp=2) each batch shard dispatches its own
    sequences' rows; expert choice's capacity dispatch is exact per shard: outputs and
    gradients equal the unsharded layer, and every row is computed (the experts per token
    are the unsharded layer's)."""
    overrides, mesh = EXPERT_CHOICE, ("mesh.data=4", "mesh.fsdp=2")
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    from efflm import mesh as mesh_lib

    full = small_config(*LAYER, *overrides, *mesh)
    cfg, _, params = _layer(small_config, *overrides)
    x = jnp.asarray(np.random.default_rng(3).normal(size=(8, SHAPE[1], D)), jnp.float32)
    w = jnp.asarray(np.random.default_rng(4).normal(size=x.shape), jnp.float32)

    def loss(p, x):
        out, sown = _apply(cfg, p, x)
        return jnp.sum(out * w), sown["stats"]

    step = jax.value_and_grad(loss, (0, 1), has_aux=True)
    (ref, ref_stats), ref_grads = jax.jit(step)(params, x)
    devices = mesh_lib.make_mesh(full.mesh, jax.devices()[:8])
    with jax.set_mesh(devices), nn.logical_axis_rules(mesh_lib.logical_rules(full, devices)):
        xs = jax.device_put(x, NamedSharding(devices, P(("data", "fsdp", "expert"))))
        lowered = jax.jit(step).lower(params, xs)
        (got, stats), grads = lowered.compile()(params, xs)
    assert "manual_computation" in lowered.as_text()  # shard_map: dispatched per shard
    assert float(got) == pytest.approx(float(ref), rel=1e-5)
    for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5 * float(jnp.max(jnp.abs(b))))
    key = "mean:moe_experts_per_token_mean"
    assert float(stats[key][0]) == pytest.approx(float(ref_stats[key][0]), rel=1e-6)


@pytest.mark.parametrize("router", ["expert_choice", "relu"])
def test_flops_count_the_static_rows_each_router_computes(small_config, router):
    """The analytic count is the router plus every row the router makes the experts
    compute (expert choice: E * capacity per sequence; relu: the row bound, used or not)
    plus the shared expert; the traced matmuls are that plus the dispatch's stated
    overhead (dropless row-block padding) and the gate-weighted sum."""
    overrides = EXPERT_CHOICE if router == "expert_choice" else (
        "model.moe.router=relu", "model.moe.relu.rows_per_token=1.5")
    cfg, x, params = _layer(small_config, *overrides, "model.moe.num_shared_experts=1")
    batch, length = SHAPE
    t = batch * length
    expert = 6 * D * F
    if router == "expert_choice":
        rows = batch * E * math.ceil(1.25 * length * K / E)
        padded = rows
    else:
        rows = batch * math.ceil(1.5 * length)
        padded = -(-rows // 4) * 4 + E * 4
    assert MoE.flops_per_token(cfg, length) == 2 * D * E + (rows / t + 1) * expert
    traced = traced_matmul_flops(lambda p, x: _apply(cfg, p, x)[0], params, x)
    assert traced == t * (2 * D * E + expert) + padded * expert + 2 * rows * D
    unused = E - (1.5 if router == "relu" else 1.25 * K)
    assert MoE.inactive_params(cfg) == round(unused * 3 * D * F)


@pytest.mark.parametrize("overrides, words", [
    (["model.moe.router=expert_choice"], "model.moe.router=expert_choice needs "
                                         "model.moe.dispatch=capacity"),
    (["model.moe.router=relu", "model.moe.dispatch=capacity"],
     "model.moe.router=relu needs model.moe.dispatch=dropless"),
    (["model.moe.router=relu", "model.moe.relu.rows_per_token=0"],
     "model.moe.relu.rows_per_token must be > 0, got 0"),
    (["model.moe.router=relu", "model.moe.relu.rows_per_token=-1"],
     "model.moe.relu.rows_per_token must be > 0, got -1"),
    (["model.moe.router=relu", "model.moe.relu.rows_per_token=9"],
     "model.moe.relu.rows_per_token=9.0 is more than model.moe.num_experts=8"),
    (["model.moe.router=relu", "model.moe.relu.l1=-0.1"], "model.moe.relu.l1 must be >= 0"),
    (["model.moe.router=relu", "model.moe.relu.locality=-1e-3"],
     "model.moe.relu.locality must be >= 0"),
    (["model.moe.router=relu", "model.moe.relu.chunk=-0.05"],
     "model.moe.relu.chunk must be >= 0"),
    (["model.moe.router=relu", "model.moe.relu.sharpness=0"],
     "model.moe.relu.sharpness must be > 0"),
    (["model.moe.router=relu", "model.moe.relu.balance=-1"],
     "model.moe.relu.balance must be >= 0"),
    (["model.moe.router=relu", "model.moe.relu.chunk_len=0"],
     "model.moe.relu.chunk_len must be > 0"),
    ([*EXPERT_CHOICE, "mesh.expert=2"], "model.moe.router=expert_choice cannot run under "
                                        "mesh.expert=2"),
])
def test_bad_router_settings_exit_2_with_one_line(tmp_path, capsys, overrides, words):
    assert main(["train", "--config", "tiny_moe", *SMALL, f"train.workdir={tmp_path}/w",
                 *overrides]) == 2
    err = capsys.readouterr().err
    assert words in err and err.count("\n") == 1
    assert not os.path.exists(tmp_path / "w")


def _rows(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


@pytest.mark.parametrize("router", ["expert_choice", "relu"])
def test_tiny_moe_trains_with_the_router_and_expert_choice_is_flagged(tmp_path, capsys,
                                                                      router):
    """Five steps lower the loss; the router's statistics are logged. Expert choice is
    flagged when training starts (a warning line), its eval rows carry causal=false and
    the printed eval line says so, and efflm generate refuses it in one line (exit 2)."""
    from efflm.train.trainer import train

    workdir = str(tmp_path / router)
    overrides = (EXPERT_CHOICE if router == "expert_choice" else ("model.moe.router=relu",))
    train(load_config("tiny_moe", [
        *SMALL, *overrides, "optimizer.schedule=constant", "optimizer.warmup_steps=0",
        "optimizer.lr=3e-3", "logging.every=1", "train.eval_every=5", "train.steps=5",
        "train.eval_batches=1", "checkpoint.every=5", "model.num_layers=1",
        f"train.workdir={workdir}"]))
    rows = _rows(workdir)
    steps = [r for r in rows if "loss" in r]
    assert len(steps) == 5 and steps[-1]["loss"] < steps[0]["loss"]
    stat = ("moe_tokens_without_expert" if router == "expert_choice"
            else "relu_token_sparsity")
    assert all(0 <= r[stat] <= 1 for r in steps)
    (ev,) = [r for r in rows if "eval_loss" in r]
    out = capsys.readouterr().out
    if router == "relu":
        assert "causal" not in ev and "not causal" not in out
        assert all(0 <= r["relu_overflow_fraction"] <= 1 for r in steps)
        return
    assert "warning: model.moe.router=expert_choice is not causal" in out
    assert "efflm generate refuses it" in out
    assert ev["causal"] is False and "eval_loss" in out and "(not causal" in out
    assert main(["generate", "--workdir", workdir, "--prompt", "def"]) == 2
    err = capsys.readouterr().err
    assert "model.moe.router=expert_choice is not causal" in err
    assert err.count("\n") == 1 and "efflm generate cannot sample" in err
