"""The kind contract, run over every registered kind: causality (or a declared reason not
to be causal), decoding equals the full pass, FLOPs against the traced matmuls, finite
gradients, the fast path against its reference, and bad settings exit 2. A kind is
tested here by being registered; its own file tests what is particular to it."""

import dataclasses
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import FAST_COMPILE, SMALL, cached_and_full_logits, fast_jit, traced_forward_flops

from efflm.cli import main
from efflm.config import load_config
from efflm.config.schema import FAMILIES
from efflm.errors import ConfigError
from efflm.flops import forward_flops_per_token
from efflm.layers import ATTENTION, DEPTH, MLP
from efflm.layers.attention.softmax import attention_mask, causal_mix_flops
from efflm.layers.common import LOSSES, RNG_STREAMS, STATE_COLLECTIONS, STATS
from efflm.layers.moe import ROUTERS
from efflm.layers.moe.capacity import row_capacity
from efflm.layers.moe.dispatch import block_rows, capacity_rate
from efflm.layers.moe.experts import MoE
from efflm.layers.plan import depth_kind, layer_plan, no_decay, not_causal
from efflm.models import LM
from efflm.shapes import head_dim
from efflm.train.roles import path_keys

# The models built here are shared by the file's tests: under pytest-xdist they run on one
# worker (as conftest groups files with module-scoped fixtures).
pytestmark = pytest.mark.xdist_group("test_kinds")

# family -> (the key that selects a kind, its registry)
FAMILY = {"mixer": ("model.attention.kind", ATTENTION), "mlp": ("model.mlp.kind", MLP),
          "router": ("model.moe.router", ROUTERS), "depth": ("model.depth.kind", DEPTH)}
# Every model here: one layer (two where a kind needs them), chunks of 8 (several per
# sequence), 4 small experts (unused unless an MLP is moe). Kinds whose models are the
# same config (softmax, swiglu, none; moe, topk) share them.
COMMON = ("model.num_layers=1", "model.attention.chunk_size=8", "model.moe.num_experts=4",
          "model.moe.expert_d_ff=32")
ENABLE = {"model.moe": ("model.mlp.kind=moe",)}  # a family whose kinds run only then
# What a kind needs to run at these shapes (its validate_config says why); a new kind
# that needs settings adds them here.
NEEDS = {("router", "expert_choice"): ("model.moe.dispatch=capacity",
                                        "model.moe.capacity_policy=batch"),
         ("router", "recurrent"): ("model.num_layers=2",),  # a chain of MoE layers
         ("depth", "recursive"): ("model.num_layers=2", "model.depth.recursive.unique_layers=1"),
         ("depth", "mod"): ("model.num_layers=2",),  # layer 1 routed
         ("depth", "mor"): ("model.num_layers=2", "model.depth.mor.unique_layers=1",
                            "model.depth.mor.recursions=2"),
         ("mixer", "based"): ("model.attention.based.window=6",),  # a window < length
         # Blocks that divide neither the FLOPs test's length (40) nor the decoding's (24).
         ("mixer", "sliding"): ("model.attention.sliding.window=6",  # 2 blocks back
                                "model.attention.sliding.sinks=2",
                                "model.attention.sliding.block_size=5"),
         ("mixer", "power"): ("model.attention.power.block_size=5",  # 1, 2, 4 blocks back
                              "model.attention.power.sinks=2"),
         # Compressed blocks of 4 every 2 tokens, 2 of 4-token selection blocks, a window
         # of 6 and query blocks of 5: all branches matter at lengths 21 to 40.
         ("mixer", "nsa"): ("model.attention.nsa.compress_block=4", "model.attention.nsa.stride=2",
                            "model.attention.nsa.select_block=4",
                            "model.attention.nsa.select_blocks=2",
                            "model.attention.nsa.window=6", "model.attention.nsa.block_size=5")}
# Settings that change what a kind's layer computes, checked like kinds: the capacity
# policies (with drops happening), a tight relu row budget, and MoR's token choice
# (causal) with each caching variant.
VARIANTS = {
    "capacity-causal": ("router", "topk", ("model.moe.dispatch=capacity",
                                           "model.moe.capacity_factor=0.5")),
    "capacity-batch": ("router", "topk", ("model.moe.dispatch=capacity",
                                          "model.moe.capacity_factor=0.5",
                                          "model.moe.capacity_policy=batch")),
    "relu-budget": ("router", "relu", ("model.moe.relu.rows_per_token=1",)),
    "mor-token": ("depth", "mor", ("model.depth.mor.router=token_choice",)),
    "mor-token-shared-kv": ("depth", "mor", ("model.depth.mor.router=token_choice",
                                             "model.depth.mor.kv=shared"))}


def _kinds(*families, variants=False):
    """(family, kind, extra overrides) of every registered kind, and the VARIANTS."""
    params = [pytest.param(f, k, (), id=f"{f}-{k}") for f in families for k in FAMILY[f][1]]
    return params + [pytest.param(*v, id=name) for name, v in VARIANTS.items() if variants]


def _config(family, kind, *extra):
    selector = FAMILY[family][0]
    overrides = (*COMMON, *ENABLE.get(selector.rsplit(".", 1)[0], ()), f"{selector}={kind}",
                 *NEEDS.get((family, kind), ()), *extra)
    try:
        return load_config("tiny", [*SMALL, *overrides]).model
    except ConfigError as e:
        pytest.fail(f"{e}: add what the kind needs to NEEDS in tests/test_kinds.py")


# Parameters drawn with a generator that is cheap to compile.
INIT_KEY = jax.random.key(0, impl="unsafe_rbg")


def _init(module, *args):
    return nn.unbox(jax.jit(module.init, compiler_options=FAST_COMPILE)(INIT_KEY, *args))


def _model(cfg):
    """Model, variables and one jitted (loss, logits), grads program; built once per
    distinct config (the kinds that share a model share its compilations)."""
    if repr(cfg) not in _MODELS:
        _MODELS[repr(cfg)] = _build(cfg)
    return _MODELS[repr(cfg)]


_MODELS = {}


def _build(cfg):
    model = LM(cfg)
    variables = _init(model, jnp.zeros((1, 8), jnp.int32))
    state = {c: variables[c] for c in STATE_COLLECTIONS if c in variables}
    rngs = {s: jax.random.key(i + 1) for i, s in enumerate(RNG_STREAMS)}

    def objective(params, tokens):
        logits, sown = model.apply({"params": params, **state}, tokens, rngs=rngs,
                                   mutable=[LOSSES, STATS, *state])
        logp = jax.nn.log_softmax(logits.astype(jnp.float32)[:, :-1])
        loss = -jnp.mean(jnp.take_along_axis(logp, tokens[:, 1:, None], -1))
        return loss + sum(jnp.sum(x) for x in jax.tree.leaves(sown.get(LOSSES, {}))), logits

    grad = jax.jit(jax.value_and_grad(objective, has_aux=True), compiler_options=FAST_COMPILE)
    return model, {"params": variables["params"], **state}, grad


def _tokens(seed, t=32):
    return jax.random.randint(jax.random.key(seed), (2, t), 0, 256)


def _causality(cfg, starts=(5, 19, 28)):
    """For each p of `starts` (inside chunks of 8), every token from p on changed: the
    largest change of the logits before p, the smallest from p on, and their scale."""
    _, variables, grad = _model(cfg)
    tokens = _tokens(0)
    (_, base), _ = grad(variables["params"], tokens)
    before, after = 0.0, np.inf
    for p in starts:
        changed = tokens.at[:, p:].set((tokens[:, p:] + 1 + _tokens(1)[:, p:] % 255) % 256)
        delta = np.abs(np.asarray(grad(variables["params"], changed)[0][1] - base))
        before, after = max(before, delta[:, :p].max()), min(after, delta[:, p:].max())
    return float(before), float(after), float(np.abs(base).max())


@pytest.mark.parametrize("family, kind, extra", _kinds("mixer", "mlp", "router", "depth",
                                                       variants=True))
def test_earlier_outputs_ignore_later_tokens_unless_declared(family, kind, extra):
    """Changing the tokens from position p on (for three p) moves no logit before p; a
    model whose kinds declare a reason (`not_causal`) must really move some."""
    cfg = _config(family, kind, *extra)
    reason = not_causal(cfg)
    before, after, scale = _causality(cfg)
    assert after > 1e-3 * scale  # the change reaches the model at all
    if reason:
        assert before > 1e-5 * scale, f"{kind} declares {reason!r}, yet is causal here"
    else:
        assert before <= 1e-6 * scale, f"{kind}: logits before p moved by {before}"


@pytest.mark.parametrize("family, kind, extra", _kinds("mixer", "mlp", "router", "depth"))
def test_one_step_gradients_are_finite(family, kind, extra):
    """Gradients of the token loss plus the sown auxiliary losses, for every parameter;
    and each name the kinds exempt from weight decay (`no_decay`) is a parameter's."""
    cfg = _config(family, kind)
    _, variables, grad = _model(cfg)
    (loss, _), grads = grad(variables["params"], _tokens(0))
    leaves = jax.tree_util.tree_leaves_with_path(grads)
    bad = [jax.tree_util.keystr(path) for path, g in leaves if not np.isfinite(np.asarray(g)).all()]
    assert np.isfinite(float(loss)) and not bad, bad
    assert no_decay(cfg) <= {path_keys(path)[-1] for path, _ in leaves}


@pytest.mark.parametrize("kind", ATTENTION)
def test_cached_decoding_equals_the_full_pass(kind):
    """A prefill of 11 tokens, then one at a time, against one pass over all 24."""
    if not ATTENTION[kind].decodes:
        pytest.skip(f"{kind} has no decoding cache (decodes = False)")
    model, variables, _ = _model(_config("mixer", kind))
    cached, full = cached_and_full_logits(model, variables)
    scale = float(jnp.max(jnp.abs(full)))
    np.testing.assert_allclose(cached, full, rtol=1e-5, atol=1e-5 * scale)


@pytest.mark.parametrize("name", [n for n, (f, k, extra) in VARIANTS.items()
                                  if f == "router" and not not_causal(_config(f, k, *extra))])
def test_cached_decoding_with_drops_equals_the_full_pass(name):
    """A causal capacity rule of a router decodes as it trains: with pairs dropped in
    the full pass, the cache's slot counters drop the same ones token by token. (MoR's
    token choice decodes without capacity: `tests/layers/depth/test_mor.py`.)"""
    family, kind, extra = VARIANTS[name]
    model, variables, _ = _model(_config(family, kind, *extra))
    tokens = _tokens(0, 24)
    _, sown = fast_jit(lambda v, x: model.apply(v, x, mutable=[STATS]))(variables, tokens)
    dropped = {k: float(v) for k, v in _flat_stats(sown).items()
               if "dropped" in k or "overflow" in k}
    assert dropped and all(v > 0 for v in dropped.values()), dropped
    cached, full = cached_and_full_logits(model, variables)
    scale = float(jnp.max(jnp.abs(full)))
    np.testing.assert_allclose(cached, full, rtol=1e-5, atol=1e-5 * scale)


def _flat_stats(sown):
    return {jax.tree_util.keystr(path): v for path, v in
            jax.tree_util.tree_flatten_with_path(sown[STATS])[0]}


def _per_sequence(cfg):
    """Whether the router returns per-sequence rows (`Routing.rows`), from shapes only."""
    router, x = ROUTERS[cfg.moe.router](cfg), jnp.zeros((1, 8, cfg.d_model))
    (routing, _), _ = jax.eval_shape(lambda k: router.init_with_output(
        k, x, router.initial_carry(cfg, x)), jax.random.key(0))
    return routing.rows is not None


def _moe_overhead(cfg, tokens, length):
    """Matmul work of one MoE layer beyond the rows its analytic count credits: the rows
    the dispatch computes past its (token, expert) pairs (dropless: row blocks plus a
    spare block per expert; capacity: every expert's slots, per-sequence rows with one
    choice each at factor 1) and the gate-weighted sum (2 d_model per pair)."""
    moe, expert = cfg.moe, 6 * cfg.d_model * cfg.moe.expert_d_ff
    pairs = round(MoE.routed_rows_per_token(cfg, length) * tokens)
    if moe.dispatch == "dropless":
        block = block_rows(cfg, pairs)
        computed = -(-pairs // block) * block + moe.num_experts * block
    elif _per_sequence(cfg) or moe.capacity_policy == "batch":
        factor = 1.0 if _per_sequence(cfg) else moe.capacity_factor
        computed = moe.num_experts * math.ceil(factor * pairs / moe.num_experts)
    else:  # causal: each row its slots per expert
        computed = moe.num_experts * tokens // length * row_capacity(capacity_rate(cfg), length)
    return (computed - pairs) * expert + 2 * pairs * cfg.d_model


def _traced_and_analytic(cfg, length=40, batch=2):
    """Forward matmul FLOPs of LM(cfg) on a (batch, length) batch, traced, and the analytic
    count plus what runs beyond it by construction: a full masked softmax does twice
    the causal half credited (in every layer as the depth kind runs it: the hook is
    linear in the layers' counts), a sparse kind the masked pairs of its tiles and each
    MoE layer its dispatch overhead."""
    plan = layer_plan(cfg)
    traced = traced_forward_flops(cfg, length, batch)
    hook = depth_kind(cfg).flops_per_token
    softmax = (hook(cfg, length, lambda i, n, **_: causal_mix_flops(cfg, n) * (
        plan[i].mixer == "softmax")) - hook(cfg, length, lambda i, n, **_: 0.0)) * batch * length
    pair = 4 * cfg.attention.num_heads * head_dim(cfg)
    for spec in plan:  # a sparse kind: the masked pairs of the tiles it computes
        masked = spec.mixer_kind.uncredited_pairs_per_token(cfg, length)
        softmax += masked * pair * batch * length
    moe = sum(s.mlp_kind is MoE for s in plan) * _moe_overhead(cfg, batch * length, length)
    return traced, forward_flops_per_token(cfg, length) * batch * length + softmax + moe


@pytest.mark.parametrize("family, kind, extra", _kinds("mixer", "mlp", "router", "depth",
                                                       variants=True))
def test_analytic_flops_equal_the_traced_matmuls(family, kind, extra):
    """Exact at a length (40) that is no multiple of the chunk (16): the linear kinds
    count their chunked form over the padded length, which is what runs."""
    cfg = _config(family, kind, *extra, "model.attention.chunk_size=16")
    traced, expected = _traced_and_analytic(cfg)
    assert traced == pytest.approx(expected, rel=1e-12)


SEGMENTS = jnp.array([[1] * 6 + [2] * 9 + [3] * 4 + [0] * 2, [1] * 21])  # 21: chunks 8+8+5
LAYER = ("model.d_model=32", "model.attention.num_heads=2")  # 2 heads of 16


def _layer_value_and_grads(cfg, reference=None, segments=SEGMENTS):
    """One mixer layer over packed segments: output and gradients (params, x) of
    <layer(x), w>, with weights 5x training's init so every branch moves the output
    (`reference`: the kind's field of that name, when given)."""
    cls = ATTENTION[cfg.attention.kind]
    kw = {} if reference is None else {"reference": reference}
    b, t = segments.shape
    rng = np.random.default_rng(0)
    x, w = (jnp.asarray(rng.normal(size=(b, t, cfg.d_model)), jnp.float32) for _ in "xw")
    positions = jnp.broadcast_to(jnp.arange(t), (b, t))
    mask = attention_mask(segments, t)
    params = _init(cls(cfg), x, positions, segments, mask)["params"]
    params = jax.tree.map(lambda a: 5 * a, params)

    def objective(params, x):
        out = cls(cfg, **kw).apply({"params": params}, x, positions, segments, mask)
        return jnp.sum(out * w), out

    grad = jax.value_and_grad(objective, (0, 1), has_aux=True)
    (_, out), grads = jax.jit(grad, compiler_options=FAST_COMPILE)(params, x)
    return [out, *jax.tree.leaves(grads)]


@pytest.mark.parametrize("kind", ATTENTION)
def test_fast_path_equals_its_reference(kind):
    """The chunked (fast) form against the kind's token-scan reference, values and
    gradients, over packed segments and a partial last chunk."""
    if "reference" not in {f.name for f in dataclasses.fields(ATTENTION[kind])}:
        pytest.skip(f"{kind} has no `reference` field (no fast form with a token-scan "
                    "reference beside it)")
    cfg = _config("mixer", kind, *LAYER)
    fast, reference = (_layer_value_and_grads(cfg, r) for r in (False, True))
    for got, want in zip(fast, reference, strict=True):
        scale = max(1.0, float(jnp.max(jnp.abs(want))))
        np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-5 * scale)


# What a strategy needs at these shapes: Ulysses splits the heads over the 4 devices;
# the halo carries no sinks.
STRATEGY_NEEDS = {"ulysses": ("model.attention.num_heads=4",),
                  "halo": ("model.attention.sliding.sinks=0",)}


@pytest.mark.parametrize("kind, strategy", [
    pytest.param(k, s, id=f"{k}-{s}") for k, cls in ATTENTION.items()
    for s in cls.context_parallel])
def test_context_parallel_equals_the_unsharded_layer(kind, strategy):
    """Each strategy a mixer declares (`context_parallel`), under mesh.sequence=4 x
    data=2 with documents crossing the chunk borders: the layer's values and gradients
    equal the unsharded layer's."""
    from efflm import mesh as mesh_lib

    cfg = load_config("tiny", [*SMALL, *COMMON, f"model.attention.kind={kind}",
                               *NEEDS.get(("mixer", kind), ()), *LAYER,
                               *STRATEGY_NEEDS.get(strategy, ()), "mesh.data=2",
                               "mesh.sequence=4",
                               f"model.attention.context_parallel={strategy}"])
    segments = jnp.array([[1] * 5 + [2] * 9 + [3] * 7 + [0] * 3, [1] * 24])  # chunks of 6
    want = _layer_value_and_grads(cfg.model, segments=segments)
    mesh = mesh_lib.make_mesh(cfg.mesh)
    with jax.set_mesh(mesh), nn.logical_axis_rules(mesh_lib.logical_rules(cfg, mesh)):
        got = _layer_value_and_grads(cfg.model, segments=segments)
    for g, r in zip(got, want, strict=True):
        np.testing.assert_allclose(g, r, rtol=2e-5, atol=2e-5 * max(1.0, float(jnp.max(
            jnp.abs(r)))))


# One bad value of one field per kind with settings, as `<family path>.<kind>`: field=value.
BAD = {"model.attention.softmax": "block_size=-1", "model.attention.linear": "feature_map=exp",
       "model.attention.gla": "gate_rank=0", "model.attention.based": "feature_dim=0",
       "model.attention.gated_deltanet": "conv_width=0",
       "model.attention.sliding": "window=0", "model.attention.power": "block_size=0",
       "model.attention.nsa": "stride=0",
       "model.moe.sigmoid_bias": "bias_rate=-0.1", "model.moe.recurrent": "hidden=0",
       "model.moe.relu": "l1=-0.1", "model.depth.mod": "capacity=1.5",
       "model.depth.recursive": "recursions=0", "model.depth.mor": "capacity=0.5,1",
       "model.quant.mxfp4": "clip=0", "model.quant.qat": "bits=5",
       "model.quant.fp8": "history=0"}
SETTINGS = [pytest.param(f, k, id=f"{f.path}.{k}") for f in FAMILIES
            if f.path.startswith("model.") for k, cls in f.kinds().items()
            if cls.settings is not None]


@pytest.mark.parametrize("family, kind", SETTINGS)
def test_a_bad_setting_exits_2_naming_its_key(capsys, family, kind):
    section = f"{family.path}.{kind}"
    if section not in BAD:
        pytest.fail(f"{section} has settings but no entry in BAD (tests/test_kinds.py): "
                    "add one bad value of one of its fields")
    field, value = BAD[section].split("=", 1)
    assert field in {f.name for f in dataclasses.fields(family.kinds()[kind].settings)}
    argv = [*ENABLE.get(family.path, ()), f"{family.path}.{family.selectors[0]}={kind}",
            f"{section}.{field}={value}"]
    assert main(["config", "show", "--config", "tiny", *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"{section}.{field}" in err[0], err
