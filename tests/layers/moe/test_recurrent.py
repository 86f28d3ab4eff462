"""The recurrent router (RMoE): against a per-token reference, values and gradients,
and the GRU state's path through the layer carry."""

import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import SMALL, cached_and_full_logits, fast_init, fast_jit

from efflm.cli import main
from efflm.flops import traced_matmul_flops
from efflm.layers.moe.recurrent import CARRY, RecurrentRouter
from efflm.layers.plan import layer_plan
from efflm.models import LM

D, E, K, R = 16, 4, 2, 6


ROUTER = (f"model.d_model={D}", f"model.moe.num_experts={E}", f"model.moe.top_k={K}",
          f"model.moe.recurrent.hidden={R}", "model.init_std=0.5", "model.mlp.kind=moe",
          "model.moe.expert_d_ff=8")


def _softmax(a):
    e = np.exp(a - a.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def _top(values, k):
    """Indices of the k largest, largest first (a per-token loop)."""
    return np.stack([np.argsort(-v, kind="stable")[:k] for v in values])


def _gru_reference(x, h, p):
    """One GRU step written out per gate (reset r, update z, candidate n)."""
    wi, wh, bi, bh = p["gru_input"], p["gru_hidden"], p["gru_input_bias"], p["gru_hidden_bias"]
    r, n = h.shape[-1], slice(2 * h.shape[-1], None)
    gi, gh = x @ wi + bi, h @ wh + bh
    reset = jax.nn.sigmoid(gi[..., :r] + gh[..., :r])
    update = jax.nn.sigmoid(gi[..., r:2 * r] + gh[..., r:2 * r])
    candidate = jnp.tanh(gi[..., n] + reset * gh[..., n])
    return update * h + (1 - update) * candidate


def _recurrent_reference(layer_params, layer_inputs):
    """Routing of every MoE layer from a loop over the layers: the GRU state starts at
    zero and each layer's router reads `GRU(x_l @ proj_l, h_{l-1})`. Returns the logits
    and the state after each layer."""
    h = jnp.zeros((layer_inputs[0].shape[0], R))
    logits, states = [], []
    for p, x in zip(layer_params, layer_inputs):
        h = _gru_reference(x @ p["proj"], h, p)
        logits.append(h @ p["kernel"])
        states.append(h)
    return logits, states


def test_recurrent_router_chain_matches_the_per_token_reference(small_config):
    """Three routers in a row through the carry: logits, experts (top-k of the softmax),
    renormalised gates and the carried GRU state are the reference loop's, and so are
    the gradients of the gates with respect to every router weight and every input."""
    cfg = small_config(*ROUTER, "model.moe.router=recurrent", "model.num_layers=3").model
    x = jax.random.normal(jax.random.key(1), (3, 10, D))
    carry = RecurrentRouter.initial_carry(cfg, x[0].reshape(2, 5, D))
    assert carry[CARRY].shape == (2, 5, R)
    params = [nn.unbox(fast_init(RecurrentRouter(cfg), x[i], carry, seed=i))["params"]
              for i in range(3)]
    w = jax.random.normal(jax.random.key(2), (3, 10, K))

    def model(params, x):
        c, out, routings = carry, 0.0, []
        for i in range(3):
            routing, c = RecurrentRouter(cfg).apply({"params": params[i]}, x[i], c,
                                                    mutable=["losses"])[0]
            out += jnp.sum(routing.gates * w[i])
            routings.append(routing)
        return out, (routings, c)

    (_, (routings, last)), grads = fast_jit(jax.value_and_grad(model, (0, 1), has_aux=True))(
        params, x)
    ref_logits, ref_states = _recurrent_reference(params, list(x))
    np.testing.assert_allclose(last[CARRY].reshape(10, R), ref_states[-1], rtol=1e-5,
                               atol=1e-6)
    experts = []
    for routing, logits in zip(routings, ref_logits):
        logits = np.asarray(logits, np.float64)
        np.testing.assert_allclose(routing.logits, logits, rtol=1e-5, atol=1e-6)
        probs = _softmax(logits)
        chosen = _top(probs, K)
        np.testing.assert_array_equal(routing.experts, chosen)
        gates = np.take_along_axis(probs, chosen, -1)
        np.testing.assert_allclose(routing.gates, gates / gates.sum(-1, keepdims=True),
                                   rtol=1e-5)
        experts.append(chosen)

    def token_gates(logits_t, chosen):
        g = jax.nn.softmax(logits_t)[chosen]
        return g / jnp.sum(g)

    def reference(params, x):
        logits, _ = _recurrent_reference(params, list(x))
        return sum(jnp.sum(jax.vmap(token_gates)(lg, experts[i]) * w[i])
                   for i, lg in enumerate(logits))

    ref_grads = fast_jit(jax.grad(reference, (0, 1)))(params, x)
    for got, want in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads)):
        np.testing.assert_allclose(got, want, rtol=1e-4,
                                   atol=1e-6 * float(jnp.max(jnp.abs(want))))
    # The first router's weights reach the last router's gates through the carry.
    only_last = fast_jit(jax.grad(lambda p: jnp.sum(model(p, x)[1][0][2].gates * w[2])))(
        params)
    assert float(jnp.max(jnp.abs(only_last[0]["gru_hidden"]))) == 0.0  # h_0 = 0
    assert float(jnp.max(jnp.abs(only_last[0]["proj"]))) > 0


RECURRENT_LM = (f"model.moe.num_experts={E}", "model.moe.expert_d_ff=16",
                "model.moe.router=recurrent", f"model.moe.recurrent.hidden={R}",
                "model.num_layers=5", "model.mlp.pattern=moe,swiglu", "model.init_std=0.2")


def _router_io(cfg, params, tokens):
    """The LM's logits and, for each layer with a router, its input (the MLP's normed
    input) and its Routing, captured from one forward pass."""
    capture = lambda mdl, method: (method == "__call__" and (  # noqa: E731
        isinstance(mdl, RecurrentRouter) or mdl.name == "mlp_norm"))
    out, inter = fast_jit(lambda p, t: LM(cfg).apply(
        {"params": p}, t, capture_intermediates=capture,
        mutable=["intermediates", "losses", "stats"]))(params, tokens)
    return out, inter["intermediates"]["blocks"]


def test_recurrent_lm_routes_as_a_gru_loop_scanned_and_unrolled(small_config):
    """MoE in layers 0, 2 and 4 with dense layers between: each MoE layer's routing is
    the reference loop over those layers on their inputs (the carry skips the dense
    layers); the scanned stack with remat (layers 0-3 as two repeats, layer 4 after the
    scan) gives the unrolled stack's logits and routing."""
    cfg = small_config(*RECURRENT_LM).model
    assert [s.mlp for s in layer_plan(cfg)] == ["moe", "swiglu", "moe", "swiglu", "moe"]
    tokens = jax.random.randint(jax.random.key(3), (2, 8), 0, 256)
    params = nn.unbox(fast_init(LM(cfg), tokens))["params"]
    logits, io = _router_io(cfg, params, tokens)
    moe_layers = (0, 2, 4)
    inputs = [io[f"layer_{i}"]["mlp_norm"]["__call__"][0].reshape(-1, cfg.d_model)
              for i in moe_layers]
    routings = [io[f"layer_{i}"]["mlp"]["router"]["__call__"][0][0] for i in moe_layers]
    ref_logits, _ = _recurrent_reference(
        [params["blocks"][f"layer_{i}"]["mlp"]["router"] for i in moe_layers], inputs)
    for routing, ref in zip(routings, ref_logits):
        np.testing.assert_allclose(routing.logits, ref, rtol=1e-4, atol=1e-5)
        np.testing.assert_array_equal(routing.experts, _top(_softmax(np.asarray(ref)), K))

    scan_cfg = small_config(*RECURRENT_LM, "model.scan_layers=true", "model.remat=full").model
    blocks = params["blocks"]
    scanned = {**params, "blocks": {
        "layers": {f"layer_{j}": jax.tree.map(lambda *xs: jnp.stack(xs),
                                              *[blocks[f"layer_{2 * r + j}"] for r in range(2)])
                   for j in range(2)}, "layer_4": blocks["layer_4"]}}
    assert jax.tree.structure(scanned) == jax.tree.structure(nn.unbox(jax.eval_shape(
        LM(scan_cfg).init, jax.random.key(0), tokens))["params"])
    scan_logits, scan_io = _router_io(scan_cfg, scanned, tokens)
    np.testing.assert_allclose(scan_logits, logits, rtol=1e-4, atol=1e-5)
    stacked = scan_io["layers"]["layer_0"]["mlp"]["router"]["__call__"][0][0]
    for r, i in enumerate((0, 2)):
        np.testing.assert_array_equal(stacked.experts[r], routings[i // 2].experts)
    np.testing.assert_array_equal(
        scan_io["layer_4"]["mlp"]["router"]["__call__"][0][0].experts, routings[2].experts)


def test_recurrent_lm_decodes_through_the_cache(small_config):
    """The GRU state is per token within a forward pass: one token at a time through the
    cache gives the full forward pass's logits."""
    cfg = small_config(*RECURRENT_LM, "model.num_layers=2", "model.mlp.pattern=").model
    model = LM(cfg)
    variables = nn.unbox(fast_init(model, jnp.zeros((2, 8), jnp.int32)))
    cached, full = cached_and_full_logits(model, variables, t=14, prefill=9)
    np.testing.assert_allclose(cached, full, rtol=1e-4, atol=1e-4)


def test_recurrent_router_flops_are_its_matmuls(small_config):
    """The count inside a model is in tests/test_kinds.py; here the formula itself."""
    cfg = small_config(*ROUTER, "model.moe.router=recurrent").model
    from efflm.layers.moe import ROUTERS

    cls = ROUTERS["recurrent"]
    x = jax.random.normal(jax.random.key(1), (2, 5, D))
    args = (x, cls.initial_carry(cfg, x))
    variables = nn.unbox(fast_init(cls(cfg), *args))
    traced = traced_matmul_flops(
        lambda v: cls(cfg).apply(v, *args, mutable=["losses", "stats", "state"])[0], variables)
    assert traced == 10 * cls.flops_per_token(cfg)
    assert cls.flops_per_token(cfg) == 2 * D * R + 12 * R * R + 2 * R * E


@pytest.mark.parametrize("overrides, words", [
    (["model.moe.router=recurrent", "model.moe.recurrent.hidden=0"],
     "model.moe.recurrent.hidden must be > 0"),
    (["model.moe.router=recurrent", "model.mlp.every=2"], "has 1 MoE layer(s)"),
    (["model.moe.router=recurrent", "model.depth.kind=mod", "model.num_layers=4"],
     "routed layers of model.depth.kind=mod"),
])
def test_bad_router_settings_exit_2_with_one_line(tmp_path, capsys, overrides, words):
    assert main(["train", "--config", "tiny_moe", *SMALL, f"train.workdir={tmp_path}/w",
                 *overrides]) == 2
    err = capsys.readouterr().err
    assert words in err and err.count("\n") == 1
    assert not os.path.exists(tmp_path / "w")
