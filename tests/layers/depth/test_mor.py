"""Mixture-of-Recursions (`layers/depth/mor.py`): at full capacity the recursive stack
with router gates; the gathered steps against the masked full computation (both
routers, token choice with overflow, KV sharing against a reference that feeds the
first step's keys and values to the later ones); decoding; FLOPs; bad settings."""

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
from efflm.layers.depth.mod import capacity_tokens
from efflm.layers.depth.mor import MorStack
from efflm.layers.depth.plain import LayerGroup
from efflm.layers.plan import layer_plan
from efflm.models import Block

MIDDLE = ("model.depth.kind=mor", "model.depth.mor.sharing=middle_cycle",
          "model.depth.mor.unique_layers=3", "model.depth.mor.recursions=3",
          "model.num_layers=5")
# One shared block, no unique blocks: cheaper to compile.
CYCLE = ("model.depth.kind=mor", "model.depth.mor.sharing=cycle",
         "model.depth.mor.unique_layers=1", "model.depth.mor.recursions=3",
         "model.num_layers=3")
CYCLE2 = (*CYCLE[:3], "model.depth.mor.recursions=2", "model.num_layers=2")


def _setup(cfg, x, seg=None):
    pos = jnp.broadcast_to(jnp.arange(x.shape[1]), x.shape[:2])
    plan = layer_plan(cfg.model)
    stack = MorStack(cfg.model, Block, plan)
    params = nn.unbox(fast_init(stack, x, {}, pos, seg, attention_mask(seg, x.shape[1]))
                      ["params"])
    return stack, plan, pos, params


def _scores(p, x, r):
    hidden = jax.nn.gelu(x @ p["predictor_in"])
    return x @ p["router"][:, r], hidden @ p["predictor_out"][:, r]


def _by_hand(cfg, plan, p, x, pos, seg, choose, token=False, shared=False):
    """first (middle_cycle); then per step r the shared block on the full sequence
    with attention to the chosen keys only, kept for the chosen tokens (expert choice:
    `choose(r, logits, predicted, active) -> chosen`, gated per step; `token`:
    `choose(r, active)`, ungated steps and the output x0 + g (h - x0), g the softmax
    probability of the token's depth); `shared`: steps after the first attend to the
    first step's keys and values (its chosen tokens'), fed to them; last (middle_cycle)."""
    t = x.shape[1]
    causal = jnp.tril(jnp.ones((t, t), bool))
    same = jnp.ones_like(causal)[None] if seg is None else seg[:, :, None] == seg[:, None, :]
    unique = "first" in p
    if unique:
        x, _ = Block(cfg.model, plan[0]).apply({"params": p["first"]}, x, {}, pos, seg,
                                               attention_mask(seg, t))
    x0, kv = x, None
    group = LayerGroup(cfg.model, Block, plan[1:2] if unique else plan[:1], share_kv=shared)
    active = jnp.ones(x.shape[:2], bool) if seg is None else seg > 0
    for r in range(p["router"].shape[1]):
        if token:
            chosen = choose(r, active)
        else:
            logits, predicted = _scores(p, x, r)
            chosen = choose(r, logits, predicted, active)
        mask = (causal & same & chosen[:, None, :])[:, None]
        (y, _), emitted = group.apply({"params": p["shared"]}, (x, {}), pos, seg, mask, kv)
        if shared and kv is None:
            kv = tuple(e._replace(segment_ids=jnp.where(chosen, e.segment_ids, 0))
                       for e in emitted)
        new = y if token else x + jax.nn.sigmoid(logits)[..., None] * (y - x)
        x = jnp.where(chosen[..., None], new, x)
        active = chosen
    if token:
        probs = jax.nn.softmax(x0 @ p["router"], axis=-1)
        gate = jnp.take_along_axis(probs, jnp.argmax(probs, -1)[..., None], -1)
        x = x0 + gate * (x - x0)
    if unique:
        x, _ = Block(cfg.model, plan[-1]).apply({"params": p["last"]}, x, {}, pos, seg,
                                                attention_mask(seg, t))
    return x


def test_full_capacity_is_the_recursive_stack_with_router_gates(small_config):
    cfg = small_config(*MIDDLE, "model.depth.mor.capacity=1,1,1")
    x = jax.random.normal(jax.random.key(1), (2, 16, cfg.model.d_model))
    stack, plan, pos, params = _setup(cfg, x)
    every = lambda r, logits, predicted, active: active  # noqa: E731
    expected = fast_jit(lambda p, x: _by_hand(cfg, plan, p, x, pos, None, every))(params, x)
    got, _ = fast_jit(lambda p, x: stack.apply({"params": p}, x, {}, pos, None,
                                               attention_mask(None, 16),
                                               mutable=["losses", "stats"]))(params, x)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


def test_gathered_steps_equal_the_masked_full_computation(small_config):
    """Values and gradients with packed documents and padding: step r keeps the top
    ceil(capacity * real tokens) of the tokens step r - 1 kept (padding never), and
    they attend to the kept tokens of their own document only."""
    cfg = small_config(*CYCLE2, "model.depth.mor.capacity=0.5,0.25")
    b, t, d = 2, 16, cfg.model.d_model
    x = jax.random.normal(jax.random.key(1), (b, t, d))
    seg = jnp.asarray(np.repeat([[1] * 6 + [2] * 7 + [0] * 3], b, 0), jnp.int32)
    stack, plan, pos, params = _setup(cfg, x, seg)

    def choose(r, logits, predicted, active):
        keep = capacity_tokens((0.5, 0.25)[r], 13)  # 13 real tokens a row
        idx = jax.lax.top_k(jnp.where(active, jax.lax.stop_gradient(logits), -jnp.inf),
                            keep)[1]
        return jnp.zeros((b, t), bool).at[jnp.arange(b)[:, None], idx].set(True)

    def gathered(p, x):
        out, _ = stack.apply({"params": p}, x, {}, pos, seg, attention_mask(seg, t),
                             mutable=["losses", "stats"])
        return out

    masked = lambda p, x: _by_hand(cfg, plan, p, x, pos, seg, choose)  # noqa: E731
    real = np.asarray(seg > 0)
    np.testing.assert_allclose(np.asarray(fast_jit(gathered)(params, x))[real],
                               np.asarray(fast_jit(masked)(params, x))[real],
                               rtol=1e-5, atol=1e-5)
    w = jax.random.normal(jax.random.key(2), (b, t, d)) * (seg > 0)[..., None]
    ga = fast_jit(jax.grad(lambda p, x: jnp.sum(gathered(p, x) * w), (0, 1)))(params, x)
    gm = fast_jit(jax.grad(lambda p, x: jnp.sum(masked(p, x) * w), (0, 1)))(params, x)
    for a, r in zip(jax.tree.leaves(ga[0]), jax.tree.leaves(gm[0])):
        np.testing.assert_allclose(a, r, rtol=1e-4, atol=1e-5)
    router = ga[0]["router"]
    assert np.all(np.isfinite(router)) and np.all(np.abs(router).max(axis=0) > 0)
    # Of 13 real tokens a row 7 run step 0 and 4 of those step 1.
    _, sown = stack.apply({"params": params}, x, {}, pos, seg, attention_mask(seg, t),
                          mutable=["losses", "stats"])
    stats = {k: float(v[0]) for k, v in sown["stats"].items()}
    want = {"mean:mor_depth_0": 6 / 13, "mean:mor_depth_1": 3 / 13,
            "mean:mor_depth_2": 4 / 13, "mean:mor_depth_mean": 11 / 13,
            "mean:mor_capacity_use_0": 7 / 13, "mean:mor_capacity_use_1": 4 / 13}
    assert {k: stats[k] for k in want} == pytest.approx(want)


def test_default_schedule_keeps_r_in_R_fewer_each_step():
    from efflm.layers.depth.mor import capacity_schedule

    assert capacity_schedule(load_config("tiny_mor").model.depth.mor) == pytest.approx(
        (1, 2 / 3, 1 / 3))


def _decoded(stack, params, x, pos, prefill=5):
    """The stack's outputs through its caches: a prefill, then one token at a time."""
    run = fast_jit(lambda cache, x, pos: stack.apply(
        {"params": params, "cache": cache}, x, {}, pos, None, None, mutable=["cache"]))
    shapes = jax.eval_shape(run, {}, x, pos)[1]["cache"]
    cache = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
    out, mutated = run(cache, x[:, :prefill], pos[:, :prefill])
    got = [out]
    for i in range(prefill, x.shape[1]):
        out, mutated = run(mutated["cache"], x[:, i:i + 1], pos[:, i:i + 1])
        got.append(out)
    return jnp.concatenate(got, 1), shapes


@pytest.mark.parametrize("kv", ["recursion", "shared"])
def test_decoding_follows_the_causal_predictor(small_config, kv):
    """Through the caches (a prefill, then one token at a time), step r runs the tokens
    the predictor keeps among those step r - 1 ran, attending to earlier such tokens
    (kv=shared: to the first step's keys and values, from one cache): the masked full
    computation with the predictor's choices."""
    cfg = small_config(*CYCLE, "model.init_std=0.3", f"model.depth.mor.kv={kv}")
    b, t = 2, 12
    x = jax.random.normal(jax.random.key(1), (b, t, cfg.model.d_model))
    stack, plan, pos, params = _setup(cfg, x)
    counts = []

    def choose(r, logits, predicted, active):
        chosen = active & (predicted > 0)
        counts.append(chosen.sum())
        return chosen

    expected = _by_hand(cfg, plan, params, x, pos, None, choose, shared=kv == "shared")
    assert 0 < counts[1] < counts[0] < b * t, counts  # some tokens stop at each step
    got, cache = _decoded(stack, params, x, pos)
    # float32 at init_std 0.3 (hidden states up to ~10): ~2e-5 apart at most.
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-4)
    # One cache per step, or the first step's alone.
    keys = [a for path, a in jax.tree_util.tree_flatten_with_path(cache)[0]
            if "cached_key" in jax.tree_util.keystr(path)]
    assert [k.shape[:2] for k in keys] == [(3, b) if kv == "recursion" else (b, t)]


def _overflow(asking, keep):
    """Each row's first `keep` asking tokens, in position order (numpy)."""
    kept = np.zeros_like(asking)
    for row, ask in zip(kept, asking):
        row[np.flatnonzero(ask)[:keep]] = True
    return kept


def test_token_choice_with_overflow_and_shared_kv_equals_the_masked_full_computation(
        small_config):
    """Values and gradients (the router's through the depth's probability) with packed
    documents and padding: each token runs the steps up to the depth it picked, unless
    step 1's 4 slots are taken by earlier tokens of its row (the latest drop first,
    counted as mor_dropped); step 1 attends to step 0's keys and values (kv=shared)
    as in a reference that feeds them to it."""
    cfg = small_config(*CYCLE2, "model.depth.mor.router=token_choice",
                       "model.depth.mor.capacity=1,0.25", "model.depth.mor.kv=shared")
    b, t, d = 2, 16, cfg.model.d_model
    x = jax.random.normal(jax.random.key(3), (b, t, d))
    seg = jnp.asarray(np.repeat([[1] * 6 + [2] * 7 + [0] * 3], b, 0), jnp.int32)
    stack, plan, pos, params = _setup(cfg, x, seg)
    assert set(params) == {"router", "shared"}
    choice = np.argmax(np.asarray(x @ params["router"]), -1)
    real = np.asarray(seg > 0)
    kept = [real, _overflow(real & (choice >= 1), 4)]
    asked = int(np.sum(real & (choice >= 1)))
    assert asked > 4 * b, "no overflow at this seed"

    def gathered(p, x):
        out, sown = stack.apply({"params": p}, x, {}, pos, seg, attention_mask(seg, t),
                                mutable=["losses", "stats"])
        return out, sown

    masked = lambda p, x: _by_hand(cfg, plan, p, x, pos, seg,  # noqa: E731
                                   lambda r, active: jnp.asarray(kept[r]), token=True,
                                   shared=True)
    got, sown = fast_jit(gathered)(params, x)
    np.testing.assert_allclose(np.asarray(got)[real], np.asarray(fast_jit(masked)(params, x))
                               [real], rtol=1e-5, atol=1e-5)
    w = jax.random.normal(jax.random.key(2), (b, t, d)) * (seg > 0)[..., None]
    ga = fast_jit(jax.grad(lambda p, x: jnp.sum(gathered(p, x)[0] * w), (0, 1)))(params, x)
    gm = fast_jit(jax.grad(lambda p, x: jnp.sum(masked(p, x) * w), (0, 1)))(params, x)
    for a, r in zip(jax.tree.leaves(ga), jax.tree.leaves(gm)):
        np.testing.assert_allclose(a, r, rtol=1e-4, atol=1e-5)
    assert np.abs(ga[0]["router"]).max() > 0
    stats = {k: float(v[0]) for k, v in sown["stats"].items()}
    assert stats["mean:mor_dropped"] == pytest.approx((asked - 4 * b) / real.sum())
    assert stats["mean:mor_depth_2"] == pytest.approx(4 * b / real.sum())
    assert stats["mean:mor_choice_2"] == pytest.approx(np.sum(real & (choice == 1)) / real.sum())
    assert set(sown["losses"]) == {"mor_balance"}


def test_shared_kv_attention_equals_a_per_query_softmax():
    """Each query (4 heads on 2 K/V heads) over the keys of its own document at or
    before its position, never a slot of document 0; segment ids None: one document."""
    from efflm.layers.attention.softmax import shared_kv_attention
    from efflm.layers.contract import SharedKV

    rng = np.random.default_rng(0)
    b, t, s, heads, kv_heads, d = 2, 6, 9, 4, 2, 8
    q = rng.normal(size=(b, t, heads, d)).astype(np.float32)
    k, v = (rng.normal(size=(b, s, kv_heads, d)).astype(np.float32) for _ in "kv")
    kv_pos = np.broadcast_to(np.arange(s) * 2, (b, s))  # keys at even positions
    kv_seg = np.array([[1, 2, 1, 2, 0, 1, 2, 0, 1], [2, 1, 1, 0, 2, 2, 1, 2, 1]])
    q_pos = rng.integers(2, 2 * s, size=(b, t))
    q_seg = rng.integers(1, 3, size=(b, t))
    kv = SharedKV(*map(jnp.asarray, (k, v, kv_pos, kv_seg)))
    for seg in (q_seg, None):
        got = np.asarray(shared_kv_attention(jnp.asarray(q), kv, jnp.asarray(q_pos),
                                             None if seg is None else jnp.asarray(seg)))
        want = np.zeros_like(got)
        for i, j, h in np.ndindex(b, t, heads):
            doc = 1 if seg is None else seg[i, j]
            sel = (kv_seg[i] == doc) & (kv_pos[i] <= q_pos[i, j])
            g = h // (heads // kv_heads)
            scores = k[i, sel, g] @ q[i, j, h] / np.sqrt(d)
            p = np.exp(scores - scores.max())
            want[i, j, h] = (p / p.sum()) @ v[i, sel, g]
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_token_choice_decodes_as_the_full_pass(small_config):
    """Nothing overflows at capacity 1: a prefill and then one token at a time give the
    full pass's outputs, every depth taken by some token."""
    cfg = small_config(*CYCLE, "model.init_std=0.3", "model.depth.mor.router=token_choice",
                       "model.depth.mor.capacity=1,1,1")
    x = jax.random.normal(jax.random.key(1), (2, 12, cfg.model.d_model))
    stack, plan, pos, params = _setup(cfg, x)
    assert set(np.argmax(np.asarray(x @ params["router"]), -1).ravel()) == {0, 1, 2}
    full, _ = fast_jit(lambda p, x: stack.apply({"params": p}, x, {}, pos, None,
                                                attention_mask(None, 12),
                                                mutable=["losses", "stats"]))(params, x)
    got, _ = _decoded(stack, params, x, pos)
    np.testing.assert_allclose(got, full, rtol=1e-5, atol=1e-4)


def test_flops_count_the_tokens_each_step_runs():
    """Traced forward matmuls: the unique blocks at full length, the shared block at each
    step's capacity (attention among its tokens), routers and predictor every step; the
    full masked softmax at these lengths does 2x the causal half counted."""
    from efflm.models import LM

    cfg = load_config("tiny", [*SMALL, *MIDDLE, "model.depth.mor.capacity=1,0.5,0.25"])
    b, t = 2, cfg.data.seq_len
    model = LM(cfg.model)
    x = jnp.zeros((b, t), jnp.int32)
    params = nn.unbox(jax.eval_shape(model.init, jax.random.key(0), x))["params"]
    traced = traced_matmul_flops(
        lambda p, x: model.apply({"params": p}, x, mutable=["losses", "stats"])[0],
        params, x)
    keeps = [capacity_tokens(c, t) for c in (1, 0.5, 0.25)]
    mix = 2 * t * causal_mix_flops(cfg.model, t) + sum(
        k * causal_mix_flops(cfg.model, k) for k in keeps)
    assert traced == pytest.approx(forward_flops_per_token(cfg.model, t) * b * t + mix * b,
                                   rel=1e-12)


@pytest.mark.parametrize("overrides, words", [
    (["model.depth.mor.recursions=0"], "model.depth.mor.recursions"),
    (["model.depth.mor.capacity=0.5,1,1"], "do not grow"),
    (["model.depth.mor.capacity=1,0.5,0"], "in (0, 1]"),
    (["model.depth.mor.capacity=1,0.5"], "gives 2 steps"),
    (["mesh.sequence=2"], "mesh.sequence > 1"),
    (["model.depth.mor.recursions=100000"], "more than model.num_layers"),
    (["model.mlp.kind=moe", "model.moe.router=recurrent"], "carry"),
    (["model.depth.mor.router=token"], "model.depth.mor.router='token'"),
    (["model.depth.mor.kv=shared", "model.depth.mor.recursions=1", "model.num_layers=3"],
     "recursions=1 has none"),
    (["model.depth.mor.kv=shared", "model.attention.kind=gla"], "no keys and values"),
])
def test_bad_mor_settings_exit_2_with_one_line(tmp_path, capsys, overrides, words):
    assert main(["train", "--config", "tiny_mor", *SMALL, "model.num_layers=5",
                 f"train.workdir={tmp_path}/w", *overrides]) == 2
    err = capsys.readouterr().err
    assert words in err and err.count("\n") == 1, err
    assert not (tmp_path / "w").exists()


def test_generate_refuses_routed_depth_over_recurrent_decoding_state():
    from efflm.layers.plan import not_causal

    assert not_causal(load_config("tiny_mor").model, decoding=True) == []
    for preset, extra in (("tiny_mor", []), ("tiny_mod", []),
                          ("tiny_mor", ["model.depth.mor.router=token_choice"])):
        cfg = load_config(preset, ["model.attention.kind=gla", *extra]).model
        reasons = not_causal(cfg, decoding=True)
        assert len(reasons) == 1 and "model.attention.kind=gla takes" in reasons[0]
        assert reasons[0].startswith("model.depth.kind=")
    assert not_causal(load_config("tiny_mor", ["model.depth.mor.router=token_choice"]).model) == []


def test_shared_blocks_with_model_state_are_refused(tmp_path, capsys):
    assert main(["train", "--config", "tiny_mor", *SMALL, "model.num_layers=5",
                 "model.quant.kind=fp8", f"train.workdir={tmp_path}/w"]) == 2
    err = capsys.readouterr().err
    assert "their model state" in err and err.count("\n") == 1, err
    assert not (tmp_path / "w").exists()
