"""The recursive depth kind (shared blocks applied several times) and Mixture-of-Depths
(routed layers, the causal predictor): each against the plain stack it stands for, FLOPs,
presets, bad settings."""

import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import SMALL, fast_init, fast_jit

from efflm.cli import main
from efflm.config import load_config
from efflm.flops import forward_flops_per_token, traced_matmul_flops
from efflm.layers.attention.softmax import attention_mask, causal_mix_flops
from efflm.layers.depth.mod import ModStack, RoutedBlock, capacity_tokens
from efflm.layers.plan import layer_plan
from efflm.models import LM, Block
from efflm.train.trainer import train


def _init(cfg, x):
    model = LM(cfg.model)
    return model, nn.unbox(fast_init(model, x)["params"])


def _tokens(cfg, b=2):
    return jax.random.randint(jax.random.key(3), (b, cfg.data.seq_len), 0, 256)


@pytest.mark.parametrize("sharing, unique, recursions, order", [
    ("cycle", 4, 1, ["shared/layer_0", "shared/layer_1", "shared/layer_2", "shared/layer_3"]),
    ("middle_cycle", 4, 1, ["first", "shared/layer_0", "shared/layer_1", "last"]),
    ("cycle", 2, 2, ["shared/layer_0", "shared/layer_1", "shared/layer_0", "shared/layer_1"]),
    ("middle_cycle", 3, 2, ["first", "shared/layer_0", "shared/layer_0", "last"]),
])
def test_recursive_equals_the_plain_stack_of_its_layers(small_config, sharing, unique,
                                                        recursions, order):
    """One recursion is the plain stack; more recursions are the plain stack with the
    shared blocks repeated (ABAB), parameters shared."""
    cfg = small_config("model.depth.kind=recursive", f"model.depth.recursive.sharing={sharing}",
                       f"model.depth.recursive.unique_layers={unique}",
                       f"model.depth.recursive.recursions={recursions}", "model.num_layers=4")
    x = _tokens(cfg)
    model, params = _init(cfg, x)
    plain_cfg = small_config("model.num_layers=4")
    plain = dict(params)
    blocks = params["blocks"]
    pick = lambda path: blocks[path] if "/" not in path else blocks["shared"][  # noqa: E731
        path.split("/")[1]]
    plain["blocks"] = {f"layer_{i}": pick(p) for i, p in enumerate(order)}
    np.testing.assert_allclose(fast_jit(model.apply)({"params": params}, x),
                               fast_jit(LM(plain_cfg.model).apply)({"params": plain}, x),
                               rtol=2e-5, atol=2e-5)
    n = sum(v.size for v in jax.tree.leaves(params["blocks"]))
    assert 4 * n == unique * sum(v.size for v in jax.tree.leaves(plain["blocks"]))


def _stack(cfg, params, x, seg=None, mutable=()):
    pos = jnp.broadcast_to(jnp.arange(x.shape[1]), x.shape[:2])
    stack = ModStack(cfg.model, Block, layer_plan(cfg.model))
    return stack.apply({"params": params}, x, {}, pos, seg, attention_mask(seg, x.shape[1]),
                       mutable=list(mutable))


def test_mod_at_full_capacity_is_the_dense_stack_with_router_weights(small_config):
    cfg = small_config("model.depth.kind=mod", "model.depth.mod.capacity=1.0",
                       "model.num_layers=4")
    x = jax.random.normal(jax.random.key(1), (2, 16, cfg.model.d_model))
    pos = jnp.broadcast_to(jnp.arange(16), (2, 16))
    causal = attention_mask(None, 16)
    plan = layer_plan(cfg.model)
    assert [s.routed for s in plan] == [False, True, False, True]
    params = nn.unbox(fast_init(
        ModStack(cfg.model, Block, plan), x, {}, pos, None, None)["params"])

    def hand(params, by_hand):
        for i, spec in enumerate(plan):
            p = params[f"layer_{i}"]
            if spec.routed:
                r = jax.nn.sigmoid(by_hand @ p["router"]["kernel"])
                y, _ = Block(cfg.model, spec).apply({"params": p["block"]}, by_hand, {}, pos,
                                                    None, causal)
                by_hand = by_hand + r * (y - by_hand)
            else:
                by_hand, _ = Block(cfg.model, spec).apply({"params": p}, by_hand, {}, pos,
                                                          None, causal)
        return by_hand

    by_hand = fast_jit(hand)(params, x)
    got, _ = fast_jit(lambda p, x: _stack(cfg, p, x, mutable=["losses", "stats"]))(params, x)
    np.testing.assert_allclose(got, by_hand, rtol=1e-5, atol=1e-5)


def test_gathered_tokens_equal_the_masked_full_computation(small_config):
    """Values and gradients, with packed segments and padding: the top ceil(capacity *
    real tokens) real tokens are chosen (padding never is) and attend to the chosen
    tokens of their own document only."""
    cfg = small_config("model.depth.kind=mod", "model.depth.mod.capacity=0.5")
    b, t, d = 2, 16, cfg.model.d_model
    x = jax.random.normal(jax.random.key(1), (b, t, d))
    pos = jnp.broadcast_to(jnp.arange(t), (b, t))
    seg = jnp.asarray(np.repeat([[1] * 6 + [2] * 7 + [0] * 3], b, 0), jnp.int32)
    spec = layer_plan(cfg.model)[1]
    layer = RoutedBlock(cfg.model, spec, Block)
    params = nn.unbox(fast_init(layer, x, {}, pos, seg, None)["params"])

    def gathered(p, x):
        (out, _), _ = layer.apply({"params": p}, x, {}, pos, seg, None,
                                  mutable=["losses", "stats"])
        return out

    def masked(p, x):
        logits = (x @ p["router"]["kernel"])[..., 0]
        real = jnp.where(seg > 0, jax.lax.stop_gradient(logits), -jnp.inf)
        idx = jax.lax.top_k(real, capacity_tokens(0.5, 13))[1]  # 13 real tokens a row
        chosen = jnp.zeros((b, t), bool).at[jnp.arange(b)[:, None], idx].set(True)
        causal = jnp.tril(jnp.ones((t, t), bool))
        mask = (causal & (seg[:, :, None] == seg[:, None, :]) & chosen[:, None, :])[:, None]
        y, _ = Block(cfg.model, spec).apply({"params": p["block"]}, x, {}, pos, seg, mask)
        r = jax.nn.sigmoid(logits)[..., None]
        return jnp.where(chosen[..., None], x + r * (y - x), x)

    w = jax.random.normal(jax.random.key(2), (b, t, d))
    np.testing.assert_allclose(fast_jit(gathered)(params, x), fast_jit(masked)(params, x),
                               rtol=1e-5, atol=1e-5)
    ga = fast_jit(jax.grad(lambda p, x: jnp.sum(gathered(p, x) * w), (0, 1)))(params, x)
    gm = fast_jit(jax.grad(lambda p, x: jnp.sum(masked(p, x) * w), (0, 1)))(params, x)
    for a, r in zip(jax.tree.leaves(ga), jax.tree.leaves(gm)):
        np.testing.assert_allclose(a, r, rtol=1e-4, atol=1e-5)
    router = ga[0]["router"]["kernel"]
    assert np.all(np.isfinite(router)) and np.abs(router).max() > 0


def test_mod_padding_is_not_a_token(small_config):
    """The same packed real tokens with padding of other content and amount (12 or 16
    tokens a row): the same logits for the real tokens, and the same losses and
    statistics, but for the share of the static slots real tokens fill."""
    cfg = small_config("model.depth.kind=mod", "model.depth.mod.capacity=0.5").model
    seg12 = np.asarray([[1] * 7 + [2] * 5, [1] * 9 + [0] * 3], np.int32)
    real = np.random.default_rng(0).integers(0, 256, (2, 12))
    model = LM(cfg)
    params = nn.unbox(fast_init(model, jnp.zeros((2, 12), jnp.int32)))["params"]
    run = fast_jit(lambda tokens, pos, seg: model.apply(
        {"params": params}, tokens, pos, seg, mutable=["losses", "stats"]))
    results = []
    for length, seed in ((12, 1), (16, 2)):
        seg = np.zeros((2, length), np.int32)
        seg[:, :12] = seg12
        tokens = np.random.default_rng(seed).integers(0, 256, (2, length))
        tokens[seg > 0] = real[seg12 > 0]
        pos = np.zeros_like(seg)
        for b in range(2):
            for d in set(seg[b]) - {0}:
                pos[b, seg[b] == d] = np.arange((seg[b] == d).sum())
        logits, sown = run(tokens, pos, seg)
        results.append((np.asarray(logits)[seg > 0], sown))
    (a, sown_a), (b, sown_b) = results
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    leaves_b = dict(jax.tree_util.tree_leaves_with_path(sown_b))
    compared = 0
    for path, value in jax.tree_util.tree_leaves_with_path(sown_a):
        if "mod_capacity_use" not in jax.tree_util.keystr(path):
            np.testing.assert_allclose(value, leaves_b[path], rtol=1e-5, atol=1e-7,
                                       err_msg=jax.tree_util.keystr(path))
            compared += 1
    assert compared == 3  # the predictor loss, its accuracy, the router entropy


def test_mod_decoding_follows_the_causal_predictor(small_config):
    """Through the cache (a prefill, then one token at a time), a routed layer sends the
    tokens its predictor picks through the block, attending to earlier picked tokens
    only: the masked full computation with the predictor's choices."""
    cfg = small_config("model.depth.kind=mod", "model.init_std=0.3")
    b, t, d = 2, 12, cfg.model.d_model
    x = jax.random.normal(jax.random.key(1), (b, t, d))
    pos = jnp.broadcast_to(jnp.arange(t), (b, t))
    spec = layer_plan(cfg.model)[1]
    layer = RoutedBlock(cfg.model, spec, Block)
    params = nn.unbox(fast_init(layer, x, {}, pos, None, None)["params"])

    def reference(params, x):
        hidden = jax.nn.gelu(x @ params["predictor_in"]["kernel"])
        chosen = (hidden @ params["predictor_out"]["kernel"])[..., 0] > 0
        mask = (jnp.tril(jnp.ones((t, t), bool)) & chosen[:, None, :])[:, None]
        y, _ = Block(cfg.model, spec).apply({"params": params["block"]}, x, {}, pos, None,
                                            mask)
        r = jax.nn.sigmoid(x @ params["router"]["kernel"])
        return chosen, jnp.where(chosen[..., None], x + r * (y - x), x)

    chosen, expected = fast_jit(reference)(params, x)
    assert 0 < int(chosen.sum()) < b * t

    run = fast_jit(lambda cache, x, pos: layer.apply(
        {"params": params, "cache": cache}, x, {}, pos, None, None, mutable=["cache"]))
    shapes = jax.eval_shape(run, {}, x, pos)[1]["cache"]
    cache = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
    (out, _), mutated = run(cache, x[:, :5], pos[:, :5])
    got = [out]
    for i in range(5, t):
        (out, _), mutated = run(mutated["cache"], x[:, i:i + 1], pos[:, i:i + 1])
        got.append(out)
    np.testing.assert_allclose(jnp.concatenate(got, 1), expected, rtol=1e-5, atol=1e-5)


def test_mod_flops_count_the_work_done(small_config):
    """Forward matmuls traced through an unrolled model: routed layers run their chosen
    tokens only (attention among them: the c^2 term), plus router and predictor; the
    one full masked softmax at these lengths does 2x the causal half counted."""
    cfg = small_config("model.depth.kind=mod", "model.depth.mod.capacity=0.5",
                       "model.num_layers=4")
    b, t = 2, cfg.data.seq_len
    x = _tokens(cfg, b)
    model = LM(cfg.model)
    params = nn.unbox(jax.eval_shape(model.init, jax.random.key(0), x))["params"]  # shapes
    traced = traced_matmul_flops(
        lambda p, x: model.apply({"params": p}, x, mutable=["losses", "stats"])[0],
        params, x)
    keep = capacity_tokens(0.5, t)
    mix = 2 * t * causal_mix_flops(cfg.model, t) + 2 * keep * causal_mix_flops(cfg.model, keep)
    assert traced == pytest.approx(forward_flops_per_token(cfg.model, t) * b * t + mix * b,
                                   rel=1e-12)
    # tiny with every second block at c = 0.5: about 3/4 of the dense forward pass.
    mod, dense = load_config("tiny_mod").model, load_config("tiny").model
    ratio = forward_flops_per_token(mod, 256) / forward_flops_per_token(dense, 256)
    assert 0.74 < ratio < 0.77


def _rows(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


@pytest.mark.parametrize("preset, stats, shape", [
    ("tiny_mod", ("mod_predictor_accuracy", "mod_router_entropy",
                  "mod_capacity_use/layer_1"), ["model.num_layers=2"]),  # layer 1 routed
    ("tiny_recursive", (), ["model.num_layers=4"]),  # 2 shared blocks, twice
    # One block, run by all and half of the tokens.
    ("tiny_mor", ("mor_predictor_accuracy", "mor_router_entropy", "mor_depth_mean",
                  "mor_depth_2", "mor_capacity_use_1"),
     ["model.num_layers=2", "model.depth.mor.sharing=cycle",
      "model.depth.mor.unique_layers=1", "model.depth.mor.recursions=2"]),
])
def test_presets_train_under_fsdp_resume_bitwise_and_generate(tmp_path, capsys, preset,
                                                              stats, shape):
    common = [*SMALL, "optimizer.schedule=constant", "optimizer.warmup_steps=0",
              "optimizer.lr=3e-3", "logging.every=1", "train.eval_every=0",
              "checkpoint.every=3", "mesh.fsdp=2", "train.batch_size=16", *shape]
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    train(load_config(preset, [*common, "train.steps=6", f"train.workdir={a}"]))
    train(load_config(preset, [*common, "train.steps=3", f"train.workdir={b}"]))
    train(load_config(preset, [*common, "train.steps=6", f"train.workdir={b}"]))
    keys = ("loss", "grad_norm", *stats)
    rows = [[{k: r[k] for k in keys} for r in _rows(w)] for w in (a, b)]
    assert rows[0] == rows[1]
    assert rows[0][-1]["loss"] < rows[0][0]["loss"]
    out = capsys.readouterr().out
    assert ("efflm generate samples by its causal decoding rule" in out) == (
        preset != "tiny_recursive")
    assert main(["generate", "--workdir", a, "--prompt", "def", "--max-new-tokens", "4",
                 "--temperature", "0"]) == 0
    assert capsys.readouterr().out.startswith("def")


@pytest.mark.parametrize("overrides, words", [
    (["model.depth.kind=mod", "model.depth.mod.every=9"], "model.depth.mod.every=9"),
    (["model.depth.kind=recursive", "model.depth.recursive.unique_layers=3"],
     "set model.num_layers=6"),
    (["model.depth.kind=recursive", "model.depth.recursive.sharing=middle_cycle",
      "model.depth.recursive.unique_layers=2"], "unique_layers >= 3"),
])
def test_bad_depth_settings_exit_2_with_one_line(tmp_path, capsys, overrides, words):
    assert main(["train", "--config", "tiny", *SMALL, "model.num_layers=4",
                 f"train.workdir={tmp_path}/w", *overrides]) == 2
    err = capsys.readouterr().err
    assert words in err and err.count("\n") == 1
