"""Routed experts in a number format (`model.quant.targets` entry `experts`): every
dispatch against the per-token reference in the same format, and the targets' rules."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import fast_init, fast_jit
from test_experts import LAYER, SEGMENTS, D, E, K

from efflm.cli import main
from efflm.layers.moe.experts import MoE, moe_reference
from efflm.layers.moe.topk import TopKRouter
from efflm.layers.quant import QUANT
from efflm.layers.quant.nm import nm_mask, sr_ste_reference


@pytest.mark.filterwarnings("ignore:.*runs in interpret mode")
@pytest.mark.parametrize("overrides", [
    ["model.quant.kind=int8"],
    ["model.quant.kind=int8", "model.moe.impl=ragged"],
    ["model.quant.kind=int8", "model.moe.impl=pallas"],
    ["model.quant.kind=int8", "model.moe.dispatch=capacity", "model.moe.capacity_factor=1.0"],
    ["model.quant.kind=ternary"],
    ["model.quant.kind=int8", "model.sparsity.nm=2:4", "model.sparsity.decay=0.1"],
], ids=["int8", "int8-ragged", "int8-pallas", "int8-capacity", "ternary", "int8-2:4"])
def test_experts_in_a_format_match_the_per_token_reference(small_config, overrides):
    """Output and gradients (experts, router, input) of the MoE layer whose routed experts
    run int8 or ternary matmuls (the dropless blocks, the capacity buffer: real integer
    dots; ragged and the Pallas grouped matmul: fake quantisation), or int8 under a 2:4
    mask trained with SR-STE, equal the per-token reference with fake-quantised operands
    and each expert's own mask."""
    cfg = small_config(*LAYER, *overrides).model
    fmt = QUANT[cfg.quant.kind]
    x = jax.random.normal(jax.random.key(1), (2, 12, D))
    variables = nn.unbox(fast_init(MoE(cfg), x))
    params = variables["params"]
    state = {"state": variables["state"]} if "state" in variables else {}
    w = jax.random.normal(jax.random.key(2), (24, D))

    def loss(p, x):
        out, _ = MoE(cfg).apply({"params": p, **state}, x, segment_ids=SEGMENTS,
                                mutable=["losses", "stats", "state"])
        return jnp.sum(out.reshape(-1, D) * w), out

    routing = TopKRouter(cfg).apply({"params": params["router"]}, x, {}, SEGMENTS)[0]
    experts = np.asarray(routing.experts)
    capacity = K / E if cfg.moe.dispatch == "capacity" else None

    def reference(p, x):
        routing = TopKRouter(cfg).apply({"params": p["router"]}, x, {}, SEGMENTS)[0]
        weights, penalty = (p["gate"], p["up"], p["out"]), 0.0
        if cfg.sparsity.nm:  # each expert's (in, out) matrix masked on its own
            masked = [sr_ste_reference(a, jax.vmap(lambda m: nm_mask(m, 2, 4))(a),
                                       cfg.sparsity.decay) for a in weights]
            weights, penalty = [m for m, _ in masked], sum(pen for _, pen in masked)
        out, _ = moe_reference(x, experts, routing.gates, weights, capacity,
                               cfg.moe.capacity_policy, SEGMENTS, fmt=fmt)
        return jnp.sum(out.reshape(-1, D) * w) + penalty, out

    (_, out), grads = fast_jit(jax.value_and_grad(loss, (0, 1), has_aux=True))(params, x)
    (_, ref), ref_grads = fast_jit(jax.value_and_grad(reference, (0, 1), has_aux=True))(
        params, x)
    plain, _ = moe_reference(x, experts, routing.gates,
                             (params["gate"], params["up"], params["out"]), capacity,
                             cfg.moe.capacity_policy, SEGMENTS)
    scale = float(jnp.max(jnp.abs(ref)))
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5 * scale)
    assert float(jnp.max(jnp.abs(out - plain))) > 1e-3 * scale  # the format is applied
    for name in ("gate", "up", "out", "router"):
        for a, b in zip(jax.tree.leaves(grads[0][name]), jax.tree.leaves(ref_grads[0][name])):
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4 * float(jnp.max(jnp.abs(b))))
    np.testing.assert_allclose(grads[1], ref_grads[1], rtol=1e-4,
                               atol=1e-4 * float(jnp.max(jnp.abs(ref_grads[1]))))


@pytest.mark.parametrize("args, code, words", [
    (["--config", "tiny_moe", "model.quant.kind=int8"], 0, ""),
    (["--config", "tiny_moe", "model.quant.kind=fp8"], 0, ""),
    (["--config", "tiny", "model.quant.kind=int8", "model.quant.targets=[experts]"], 2,
     "'experts' matches no layer"),
    (["--config", "tiny_moe", "model.quant.kind=fp8", "model.quant.targets=[experts]"], 2,
     "does not cover routed experts"),
    (["--config", "tiny_moe", "model.sparsity.nm=2:3", "model.quant.targets=[experts]"], 2,
     "input width 256 of the experts"),
])
def test_default_targets_fit_any_model_and_named_ones_must_match(args, code, words, capsys):
    """The default targets apply to the roles a model has (an MoE model's experts; fp8
    leaves them out); a named target must match a layer and fit the format."""
    assert main(["config", "show", *args]) == code
    err = capsys.readouterr().err.strip()
    assert (len(err.splitlines()) == 1 and words in err) if code else not err, err
