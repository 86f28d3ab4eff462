"""The sigmoid_bias router (auxiliary-loss-free balancing, DeepSeek-V3): against a per-token
reference, values and gradients; the bias's once-per-step update."""

import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import SMALL, fast_compiled, fast_init, fast_jit, fast_state

from efflm import mesh as mesh_lib
from efflm.cli import main
from efflm.config import load_config
from efflm.layers.moe.sigmoid_bias import BALANCE, SigmoidBiasRouter, update_bias
from efflm.train.step import build_program
from efflm.train.trainer import train

D, E, K, R = 16, 4, 2, 6


ROUTER = (f"model.d_model={D}", f"model.moe.num_experts={E}", f"model.moe.top_k={K}",
          f"model.moe.recurrent.hidden={R}", "model.init_std=0.5", "model.mlp.kind=moe",
          "model.moe.expert_d_ff=8")


def _sigmoid(a):
    return 1 / (1 + np.exp(-a))


def _top(values, k):
    """Indices of the k largest, largest first (a per-token loop)."""
    return np.stack([np.argsort(-v, kind="stable")[:k] for v in values])


def test_sigmoid_bias_matches_the_per_token_reference(small_config):
    """Experts: top-k of sigmoid score + bias; gates: the chosen scores without the bias,
    normalised; the sequence-wise balance loss per sequence; the step's load written to
    the state with the bias unchanged. Gradients (router kernel, tokens) of the gates and
    the loss are the reference's; the bias gets none."""
    cfg = small_config(*ROUTER, "model.moe.router=sigmoid_bias",
                       "model.moe.sigmoid_bias.seq_balance_loss=0.3").model
    sequences, length = 3, 8
    x = jax.random.normal(jax.random.key(1), (sequences * length, D))
    params = nn.unbox(fast_init(
        SigmoidBiasRouter(cfg), x.reshape(sequences, length, D), {}))["params"]
    bias = np.array([0.3, -0.2, 0.0, 0.15], np.float32)
    state = {BALANCE: {"bias": jnp.asarray(bias), "load": jnp.zeros(E)}}
    w = np.asarray(jax.random.normal(jax.random.key(2), (sequences * length, K)))

    def run(kernel, x, bias):
        (routing, _), out = SigmoidBiasRouter(cfg).apply(
            {"params": {"kernel": kernel}, "state": {BALANCE: {**state[BALANCE],
                                                                "bias": bias}}},
            x.reshape(sequences, length, D), {}, mutable=["state", "losses", "stats"])
        loss = jnp.sum(routing.gates * w) + out["losses"]["seq_balance"][0]
        return loss, (routing, out)

    (_, (routing, out)), grads = fast_jit(jax.value_and_grad(run, (0, 1, 2), has_aux=True))(
        params["kernel"], x, jnp.asarray(bias))

    kernel, xs = np.asarray(params["kernel"], np.float64), np.asarray(x, np.float64)
    scores = _sigmoid(xs @ kernel)
    experts = _top(scores + bias, K)
    assert len(set(map(tuple, experts))) > 1
    # The bias changes the choice of some tokens (else this test could not see it).
    assert (experts != _top(scores, K)).any()
    np.testing.assert_array_equal(routing.experts, experts)
    chosen = np.take_along_axis(scores, experts, -1)
    np.testing.assert_allclose(routing.gates, chosen / chosen.sum(-1, keepdims=True),
                               rtol=1e-5)
    # Without a mutable state (eval, generation) it routes with the same bias.
    held = SigmoidBiasRouter(cfg).apply({"params": params, "state": state},
                                        x.reshape(sequences, length, D), {},
                                        mutable=["losses", "stats"])[0][0]
    np.testing.assert_array_equal(held.experts, experts)
    counts = np.bincount(experts.reshape(-1), minlength=E)
    np.testing.assert_array_equal(out["state"][BALANCE]["load"], counts)
    np.testing.assert_array_equal(out["state"][BALANCE]["bias"], bias)
    assert float(out["stats"]["max:router_bias_range"][0]) == pytest.approx(0.5)

    def token_gates(kernel, x_t, chosen):
        g = jax.nn.sigmoid(x_t @ kernel)[chosen]
        return g / jnp.sum(g)

    def reference_loss(kernel, x):
        gates = jax.vmap(token_gates, (None, 0, 0))(kernel, x, experts)
        balance = 0.0
        for s in range(sequences):
            rows = slice(s * length, (s + 1) * length)
            score = jax.nn.sigmoid(x[rows] @ kernel)
            f = np.bincount(experts[rows].reshape(-1), minlength=E) * E / (K * length)
            p = jnp.mean(score / jnp.sum(score, -1, keepdims=True), axis=0)
            balance += jnp.sum(f * p) / sequences
        return jnp.sum(gates * w) + 0.3 * balance, balance

    (ref, balance), ref_grads = fast_jit(jax.value_and_grad(
        reference_loss, (0, 1), has_aux=True))(params["kernel"], x)
    assert float(out["losses"]["seq_balance"][0]) == pytest.approx(0.3 * float(balance),
                                                                   rel=1e-5)
    for got, want in zip(grads[:2], ref_grads):
        np.testing.assert_allclose(got, want, rtol=1e-4,
                                   atol=1e-6 * float(jnp.max(jnp.abs(want))))
    assert not np.asarray(grads[2]).any()


def _batch(cfg, skewed=False):
    """Random bytes; `skewed`: 16 letters drawn with Zipf-like frequencies."""
    rng = np.random.default_rng(0)
    b, t = cfg.train.batch_size, cfg.data.seq_len
    if skewed:
        p = 1 / np.arange(1, 17) ** 1.5
        tokens = rng.choice(np.frombuffer(b"etaoinshrdlucmfw", np.uint8).astype(np.int32),
                            (b, t + 1), p=p / p.sum())
    else:
        tokens = rng.integers(0, 256, (b, t + 1)).astype(np.int32)
    return {"inputs": tokens[:, :-1], "targets": tokens[:, 1:],
            "segment_ids": np.ones((b, t), np.int32),
            "positions": np.tile(np.arange(t, dtype=np.int32), (b, 1))}


BIAS_STEP = ("model.mlp.kind=moe", "model.moe.router=sigmoid_bias",
             "model.moe.sigmoid_bias.bias_rate=0.01",
             f"model.moe.num_experts={E}", "model.moe.expert_d_ff=16", "model.init_std=0.1",
             "optimizer.lr=1e-4", "optimizer.warmup_steps=0", "train.batch_size=16")


def _program(cfg, devices):
    return build_program(cfg, mesh_lib.make_mesh(cfg.mesh, jax.devices()[:devices]))


def _steps(program, batch, steps):
    """The state after `steps` train steps on `batch` from a fresh state, and each
    step's load CV."""
    cvs = []
    with program.context():
        state = fast_state(program)
        batch = mesh_lib.global_batch(batch, program.mesh)
        step = fast_compiled(program.train_step, state, batch)
        for _ in range(steps):
            state, metrics = step(state, batch)
            cvs.append(float(metrics["stats"]["expert_load_cv"]))
    return state, cvs


def _balance(state, num_layers):
    """(bias, load) of each layer's router, stacked (layers, experts)."""
    blocks = jax.device_get(state.model_state)["state"]["blocks"]
    balance = [blocks[f"layer_{i}"]["mlp"]["router"][BALANCE] for i in range(num_layers)]
    return tuple(np.stack([b[k] for b in balance]) for k in ("bias", "load"))


@pytest.fixture(scope="module")
def bias_program():
    """The sigmoid_bias model on one device, its program compiled once for the module."""
    return _program(load_config("tiny", [*SMALL, *BIAS_STEP]), 1)


def test_bias_moves_once_per_step_by_the_load_of_the_whole_step(bias_program):
    """After a step from b = 0, `b = bias_rate * sign(mean(load) - load)`, the load
    counting every (token, choice) pair of the global batch: on 8 devices with 2
    microbatches (the recorded load is the microbatches' mean) the bias is that of one
    device without accumulation."""
    cfg = load_config("tiny", [*SMALL, *BIAS_STEP, "mesh.data=8", "train.grad_accum=2"])
    layers, batch = cfg.model.num_layers, _batch(cfg)
    ref_bias, ref_load = _balance(_steps(bias_program, batch, 1)[0], layers)
    bias, load = _balance(_steps(_program(cfg, 8), batch, 1)[0], layers)
    accum = cfg.train.grad_accum
    pairs = cfg.train.batch_size * cfg.data.seq_len * cfg.model.moe.top_k
    np.testing.assert_allclose(ref_load.sum(-1), pairs)
    np.testing.assert_array_equal(
        ref_bias, np.float32(0.01) * np.sign(ref_load.mean(-1, keepdims=True) - ref_load))
    assert (ref_bias > 0).any() and (ref_bias < 0).any()
    np.testing.assert_array_equal(bias, ref_bias)
    np.testing.assert_allclose(load * accum, ref_load)


def test_bias_evens_the_load_of_skewed_data(bias_program):
    """Ten steps on one batch of skewed text, the weights hardly moving (lr 1e-4): the
    load's coefficient of variation falls step by step as the bias moves."""
    cfg = load_config("tiny", [*SMALL, *BIAS_STEP])
    state, cvs = _steps(bias_program, _batch(cfg, skewed=True), 10)
    assert cvs[0] > 0.3
    assert cvs[-1] < 0.6 * cvs[0]
    assert sum(b < a for a, b in zip(cvs, cvs[1:])) >= 7
    bias, _ = _balance(state, cfg.model.num_layers)
    assert np.abs(bias).max() > 0.01


def test_bias_rule_acts_on_each_layer_of_a_scanned_stack(small_config):
    """Under a scanned stack the state is stacked (layers, experts): the rule moves
    each layer's bias by its own load."""
    cfg = small_config(*BIAS_STEP).model
    load = np.array([[5.0, 1, 1, 1], [2, 2, 2, 2], [0, 3, 1, 4]], np.float32)
    value = {"bias": jnp.ones((3, E)), "load": jnp.asarray(load)}
    new = update_bias(cfg, value)
    for layer in range(3):
        one = update_bias(cfg, {"bias": jnp.ones(E), "load": jnp.asarray(load[layer])})
        np.testing.assert_array_equal(new["bias"][layer], one["bias"])
    np.testing.assert_allclose(new["bias"], 1 + 0.01 * np.array(
        [[-1, 1, 1, 1], [0, 0, 0, 0], [1, -1, 1, -1]]), rtol=1e-6)
    np.testing.assert_array_equal(new["load"], load)


def _rows(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f if "loss" in line]


def test_sigmoid_bias_run_resumes_bitwise(tmp_path):
    """The bias is checkpointed with the model state: a run resumed from a checkpoint
    is bitwise the uninterrupted one (losses, loads and the bias's range)."""
    common = [*SMALL, *BIAS_STEP, "model.moe.sigmoid_bias.bias_rate=0.05", "optimizer.lr=3e-3",
              "optimizer.schedule=constant", "logging.every=1", "train.eval_every=0",
              "checkpoint.every=2"]
    straight, resumed = str(tmp_path / "a"), str(tmp_path / "b")
    train(load_config("tiny", [*common, "train.steps=3", f"train.workdir={straight}"]))
    train(load_config("tiny", [*common, "train.steps=2", f"train.workdir={resumed}"]))
    train(load_config("tiny", [*common, "train.steps=3", f"train.workdir={resumed}"]))
    keys = ("loss", "aux_loss", "expert_load_cv", "expert_load_max", "router_bias_range")
    rows = [[{k: r[k] for k in keys} for r in _rows(w)] for w in (straight, resumed)]
    assert rows[0] == rows[1]
    assert [r["router_bias_range"] > 0 for r in rows[0]] == [False, True, True]


@pytest.mark.parametrize("overrides, words", [
    (["model.moe.router=sigmoid_bias", "model.moe.sigmoid_bias.bias_rate=-0.1"],
     "model.moe.sigmoid_bias.bias_rate must be >= 0"),
    (["model.moe.router=sigmoid_bias", "model.moe.sigmoid_bias.seq_balance_loss=-1"],
     "model.moe.sigmoid_bias.seq_balance_loss must be >= 0"),
])
def test_bad_router_settings_exit_2_with_one_line(tmp_path, capsys, overrides, words):
    assert main(["train", "--config", "tiny_moe", *SMALL, f"train.workdir={tmp_path}/w",
                 *overrides]) == 2
    err = capsys.readouterr().err
    assert words in err and err.count("\n") == 1
    assert not os.path.exists(tmp_path / "w")
