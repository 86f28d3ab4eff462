"""The MoE layer (`layers/moe/experts.py`) with the top-k router: dispatch against the
per-token reference, FLOPs, placement, bad settings, training."""

import json
import math
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import SMALL, fast_init, fast_jit

from efflm.cli import main
from efflm.config import load_config
from efflm.flops import traced_matmul_flops
from efflm.layers.moe.experts import MoE, moe_reference
from efflm.layers.moe.topk import TopKRouter
from efflm.train.trainer import train

D, E, K, F, TOKENS = 16, 4, 2, 8, (2, 12)
LAYER = ("model.mlp.kind=moe", f"model.d_model={D}", f"model.moe.num_experts={E}",
         f"model.moe.top_k={K}", f"model.moe.expert_d_ff={F}", "model.moe.block_rows=4",
         "model.init_std=0.5", "model.num_layers=2")


def _layer(small_config, *overrides):
    cfg = small_config(*LAYER, *overrides).model
    x = jax.random.normal(jax.random.key(1), (*TOKENS, D))
    params = nn.unbox(fast_init(MoE(cfg), x)["params"])
    return cfg, x, params


# Two packed documents in row 0, padding at the end of row 1.
SEGMENTS = np.asarray([[1] * 7 + [2] * 5, [1] * 9 + [0] * 3], np.int32)


def _reference_loss(cfg, params, x, weights_out, capacity, experts):
    """The dense reference, with the router's gates (so the router gets gradients) for
    the experts it chose."""
    routing = TopKRouter(cfg).apply({"params": params["router"]}, x, {}, SEGMENTS)[0]
    out, _ = moe_reference(x, experts, routing.gates,
                           (params["gate"], params["up"], params["out"]), capacity,
                           cfg.moe.capacity_policy, SEGMENTS)
    return jnp.sum(out.reshape(-1, D) * weights_out)


@pytest.mark.filterwarnings("ignore:.*runs in interpret mode")
@pytest.mark.parametrize("overrides", [
    ["model.moe.dispatch=dropless"],
    ["model.moe.dispatch=dropless", "model.moe.impl=ragged"],
    ["model.moe.dispatch=dropless", "model.moe.impl=pallas"],
    ["model.moe.dispatch=capacity", "model.moe.capacity_factor=1.0"],
    ["model.moe.dispatch=capacity", "model.moe.capacity_factor=0.5",
     "model.moe.renormalize=false"],
    ["model.moe.dispatch=capacity", "model.moe.capacity_factor=0.75",
     "model.moe.capacity_policy=batch"],
])
def test_topk_dispatch_matches_the_per_token_reference(small_config, overrides):
    """Values and gradients (router, experts, inputs) on packed documents with padding;
    a capacity dispatch keeps exactly the pairs the reference keeps (causal or batch
    policy); padding gets no expert; the sown losses and statistics are the reference's,
    over the real tokens."""
    cfg, x, params = _layer(small_config, *overrides)
    capacity = None
    if cfg.moe.dispatch == "capacity":
        capacity = cfg.moe.capacity_factor * K / E
    w = jax.random.normal(jax.random.key(2), (24, D))
    routing = TopKRouter(cfg).apply({"params": params["router"]}, x, {}, SEGMENTS)[0]
    experts = np.asarray(routing.experts)
    ref, keep = moe_reference(x, experts, routing.gates,
                              (params["gate"], params["up"], params["out"]), capacity,
                              cfg.moe.capacity_policy, SEGMENTS)

    def loss(p, x):
        out, sown = MoE(cfg).apply({"params": p}, x, segment_ids=SEGMENTS,
                                   mutable=["losses", "stats"])
        return jnp.sum(out.reshape(-1, D) * w), (out, sown)

    (_, (out, sown)), grads = fast_jit(jax.value_and_grad(loss, (0, 1), has_aux=True))(
        params, x)
    scale = float(jnp.max(jnp.abs(ref)))
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5 * scale)
    assert not np.asarray(out)[SEGMENTS == 0].any()
    ref_grads = fast_jit(lambda p, x: jax.grad(_reference_loss, (1, 2))(
        cfg, p, x, w, capacity, experts))(params, x)
    for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5 * float(jnp.max(jnp.abs(b))))
    assert any(float(jnp.max(jnp.abs(g))) > 0 for g in jax.tree.leaves(grads[0]["router"]))

    stats = {k.split(":")[1]: float(v[0]) for k, v in sown["stats"].items()}
    real = (SEGMENTS > 0).reshape(-1)
    asked, kept = experts[real], experts[real][keep[real]]
    assert stats["moe_dropped_fraction"] == pytest.approx(1 - kept.size / asked.size)
    assert (kept.size < asked.size) == (capacity is not None)
    load = np.bincount(asked.reshape(-1), minlength=E) / (asked.size / E)
    processed = np.bincount(kept, minlength=E) / (asked.size / E)
    probs = np.asarray(routing.probs, np.float64)[real]
    assert stats["expert_load_max"] == pytest.approx(load.max())
    assert stats["expert_load_min"] == pytest.approx(load.min())
    assert stats["expert_load_cv"] == pytest.approx(load.std(), rel=1e-5)
    assert stats["expert_processed_load_max"] == pytest.approx(processed.max())
    assert stats["expert_processed_load_min"] == pytest.approx(processed.min())
    assert stats["moe_tokens_without_expert"] == pytest.approx(
        np.mean(keep[real].sum(-1) == 0))
    assert stats["router_entropy"] == pytest.approx(
        np.mean(-np.sum(probs * np.log(probs), -1)), rel=1e-5)
    balance = E * np.sum(load / E * probs.mean(0))
    lse = np.log(np.exp(np.asarray(routing.logits, np.float64)[real]).sum(-1))
    assert float(sown["losses"]["router"]["balance"][0]) == pytest.approx(
        cfg.moe.balance_loss * balance, rel=1e-5)
    assert float(sown["losses"]["router"]["router_z"][0]) == pytest.approx(
        cfg.moe.router_z_loss * np.mean(lse**2), rel=1e-5)


def test_dropless_equals_capacity_that_drops_nothing(small_config):
    cfg, x, params = _layer(small_config, "model.moe.num_shared_experts=1")
    big, _, _ = _layer(small_config, "model.moe.num_shared_experts=1",
                       "model.moe.dispatch=capacity", f"model.moe.capacity_factor={E}")
    dropless, capacity = (fast_jit(lambda p, x, c=c: MoE(c).apply(
        {"params": p}, x, mutable=["losses", "stats"])[0])(params, x) for c in (cfg, big))
    np.testing.assert_allclose(dropless, capacity, rtol=1e-5, atol=1e-5)
    assert "shared" in params


@pytest.mark.parametrize("dispatch", ["capacity", "dropless"])
def test_flops_count_active_work_and_the_dispatch_overhead_is_stated(small_config, dispatch):
    """The analytic count is the active work (router + k experts + shared); the traced
    matmuls are that work plus exactly the padding the dispatch computes (E * capacity
    slots, or the dropless row blocks) and the gate-weighted sum of the k outputs."""
    cfg, x, params = _layer(small_config, f"model.moe.dispatch={dispatch}",
                            "model.moe.num_shared_experts=1")
    t = x.shape[0] * x.shape[1]
    traced = traced_matmul_flops(
        lambda p, x: MoE(cfg).apply({"params": p}, x, mutable=["losses", "stats"])[0],
        params, x)
    expert = 6 * D * F
    assert MoE.flops_per_token(cfg, 0) == 2 * D * E + (K + 1) * expert
    if dispatch == "capacity":  # each row its slots per expert
        rows = E * x.shape[0] * math.ceil(cfg.moe.capacity_factor * x.shape[1] * K / E)
    else:
        block = cfg.moe.block_rows
        rows = -(-t * K // block) * block + E * block
    assert traced == t * (2 * D * E + expert) + rows * expert + 2 * t * K * D
    assert rows >= t * K


@pytest.mark.parametrize("override, words", [
    ("model.moe.top_k=9", "model.moe.top_k=9 is larger than model.moe.num_experts=8"),
    ("model.moe.capacity_factor=0", "model.moe.capacity_factor must be > 0"),
    ("model.moe.router=topq", "model.moe.router='topq'"),
    ("model.moe.dispatch=droples", "did you mean 'dropless'"),
    ("model.moe.expert_d_ff=0", "model.moe.expert_d_ff must be > 0"),
    ("model.mlp.first_dense=4", "leave no layer"),
    ("model.moe.capacity_policy=fifo", "model.moe.capacity_policy='fifo' is not a valid"),
    ("model.moe.dispatch=capacity mesh.sequence=2",
     "model.moe.capacity_policy=causal under mesh.sequence=2"),
    ("model.moe.router=expert_choice model.moe.dispatch=capacity",
     "model.moe.capacity_policy=causal cannot apply to model.moe.router=expert_choice"),
])
def test_bad_moe_settings_exit_2_with_one_line(tmp_path, capsys, override, words):
    assert main(["train", "--config", "tiny_moe", *SMALL, "model.num_layers=4",
                 f"train.workdir={tmp_path}/w", *override.split()]) == 2
    err = capsys.readouterr().err
    assert words in err and err.count("\n") == 1
    assert not os.path.exists(tmp_path / "w")


def test_placement_every_and_first_dense():
    from efflm.layers.plan import layer_plan

    cfg = load_config("tiny_moe", ["model.num_layers=6", "model.mlp.first_dense=1",
                                   "model.mlp.every=2"]).model
    assert [s.mlp for s in layer_plan(cfg)] == ["swiglu", "swiglu", "moe", "swiglu", "moe",
                                                "swiglu"]


def _losses(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def test_tiny_moe_trains_resumes_bitwise_and_generates(tmp_path, capsys):
    common = [*SMALL, "optimizer.schedule=constant", "optimizer.warmup_steps=0",
              "optimizer.lr=3e-3", "logging.every=1", "train.eval_every=0",
              "checkpoint.every=3", "model.moe.jitter=0.1"]
    straight, resumed = str(tmp_path / "a"), str(tmp_path / "b")
    cfg = load_config("tiny_moe", [*common, "train.steps=6", f"train.workdir={straight}"])
    train(cfg)
    # d=64, 2 layers: each has 8 experts of 3 * 64 * 512 parameters, 2 of them active.
    inactive = 2 * 6 * 3 * 64 * 512
    out = capsys.readouterr().out
    total = float(out.split("M parameters")[0].split()[-1])
    assert f"M parameters ({total - inactive / 1e6:.2f}M active per token)" in out
    train(load_config("tiny_moe", [*common, "train.steps=3", f"train.workdir={resumed}"]))
    train(load_config("tiny_moe", [*common, "train.steps=6", f"train.workdir={resumed}"]))
    keys = ("loss", "aux_loss", "expert_load_cv", "router_entropy", "moe_dropped_fraction")
    rows = [[{k: r[k] for k in keys} for r in _losses(w)] for w in (straight, resumed)]
    assert rows[0] == rows[1]
    assert rows[0][-1]["loss"] < rows[0][0]["loss"]
    assert all(r["aux_loss"] > 0 for r in rows[0])
    capsys.readouterr()
    assert main(["generate", "--workdir", straight, "--prompt", "def", "--max-new-tokens",
                 "4", "--temperature", "0"]) == 0
    assert capsys.readouterr().out.startswith("def")


def _padded(x, length, seed):
    """The batch of SEGMENTS at `length` tokens a row: its real tokens where they were,
    every other position padding of random content."""
    real = SEGMENTS > 0
    out = np.random.default_rng(seed).normal(size=(2, length, D)).astype(np.float32)
    out[:, :12][real] = np.asarray(x)[real]
    seg = np.zeros((2, length), np.int32)
    seg[:, :12] = SEGMENTS
    return jnp.asarray(out), seg


@pytest.mark.parametrize("overrides", [
    ["model.moe.dispatch=capacity", "model.moe.capacity_factor=0.5"],
    ["model.moe.dispatch=capacity", "model.moe.capacity_factor=0.75",
     "model.moe.capacity_policy=batch"],
    ["model.moe.router=sigmoid_bias"],
    ["model.moe.router=recurrent"],
    ["model.moe.router=relu", "model.moe.relu.rows_per_token=1"],
    ["model.moe.router=expert_choice", "model.moe.dispatch=capacity",
     "model.moe.capacity_policy=batch"],
], ids=["capacity-causal", "capacity-batch", "sigmoid_bias", "recurrent", "relu",
        "expert_choice"])
def test_padding_is_not_a_token(small_config, overrides):
    """The same real tokens with padding of other content and amount (12 or 16 tokens a
    row): the same outputs for the real tokens, zero for padding, and the same losses,
    statistics and load state (capacities count real tokens)."""
    cfg, x, params = _layer(small_config, *overrides)
    run = fast_jit(lambda p, x, seg: MoE(cfg).apply(
        {"params": p, "state": state}, x, segment_ids=seg,
        mutable=["losses", "stats", "state"]))
    state = nn.unbox(fast_init(MoE(cfg), x)).get("state", {})
    results = []
    for length, seed in ((12, 5), (16, 6)):
        xs, seg = _padded(x, length, seed)
        out, sown = run(params, xs, seg)
        assert not np.asarray(out)[seg == 0].any()
        results.append((np.asarray(out)[seg > 0], sown))
    (a, sown_a), (b, sown_b) = results
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    leaves_a = jax.tree_util.tree_leaves_with_path(sown_a)
    leaves_b = dict(jax.tree_util.tree_leaves_with_path(sown_b))
    assert len(leaves_a) == len(leaves_b) > 3
    for path, value in leaves_a:
        np.testing.assert_allclose(value, leaves_b[path], rtol=1e-5, atol=1e-7,
                                   err_msg=jax.tree_util.keystr(path))
