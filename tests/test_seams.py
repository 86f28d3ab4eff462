"""The seams every kind builds on, exercised through toy layers: auxiliary losses in the
objective, per-step random keys, non-trainable model state, statistics, layer plans
(with a carry) and weight decay by role."""

import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import SMALL, fast_compiled, fast_init, fast_jit, fast_state

from efflm import layers
from efflm import mesh as mesh_lib
from efflm.cli import main
from efflm.config import load_config
from efflm.layers.common import sow_loss, sow_stat
from efflm.layers.contract import Depth, FeedForward, Mixer, NumberFormat, Router
from efflm.layers.depth.plain import PlainStack
from efflm.layers.moe import ROUTERS
from efflm.layers.moe.topk import real_tokens, router_kernel, softmax_topk
from efflm.layers.plan import initial_carry, layer_plan
from efflm.layers.quant import QUANT
from efflm.models import LM, Block
from efflm.train.step import build_program
from efflm.train.trainer import train

AUX_WEIGHT = 0.37


class ToyAux(FeedForward):
    """MLP kind that adds nothing to the residual but sows `c * sum(w**2)`."""

    flops_per_token = staticmethod(lambda cfg, seq_len: 0.0)

    @nn.compact
    def __call__(self, x, *, segment_ids=None):
        w = self.param("w", nn.initializers.normal(1.0), (3,))
        sow_loss(self, "toy", AUX_WEIGHT * jnp.sum(w**2))
        sow_stat(self, "toy_max_x", jnp.max(x), reduce="max")
        sow_stat(self, "toy_mean_x", jnp.mean(x))
        return jnp.zeros_like(x)


class ToyCounter(Mixer):
    """Mixer kind that counts its calls in the model state and logs its random keys."""

    flops_per_token = staticmethod(lambda cfg, seq_len: 0.0)
    decodes = True  # it mixes nothing across tokens, so it needs no cache

    @nn.compact
    def __call__(self, x, positions, segment_ids, mask):
        calls = self.variable("state", "calls", lambda: jnp.zeros((), jnp.int32))
        seen = self.variable("state", "seen", nn.with_logical_partitioning(
            nn.initializers.zeros, ("embed",)), None, (x.shape[-1],))
        if self.is_mutable_collection("state") and not self.is_initializing():
            calls.value += 1
            seen.value += jnp.mean(x, axis=(0, 1))
        out = x * self.param("w", nn.initializers.ones, (x.shape[-1],))
        if self.has_rng("dropout"):
            word = jax.random.key_data(self.make_rng("dropout"))[..., -1]
            sow_stat(self, "key", (word % 65521).astype(jnp.float32), reduce="per_layer")
            # Randomness that reaches the loss, so a resume with other keys would differ.
            out = out + 1e-3 * jax.random.normal(self.make_rng("dropout"), x.shape, x.dtype)
        sow_stat(self, "calls", calls.value.astype(jnp.float32), reduce="max")
        return out


class ToyA(Mixer):
    @nn.compact
    def __call__(self, x, positions, segment_ids, mask):
        w = self.param("w", nn.initializers.normal(0.3), (x.shape[-1], x.shape[-1]))
        return jnp.tanh(x @ w)


class ToyB(Mixer):
    @nn.compact
    def __call__(self, x, positions, segment_ids, mask):
        scale = self.param("s", nn.initializers.normal(1.0), (x.shape[-1],))
        return jnp.sin(x) * scale


class ToyCarry(FeedForward):
    """MLP kind that counts the layers it ran in, through the layer carry."""

    @staticmethod
    def takes_carry(cfg):
        return True

    @staticmethod
    def initial_carry(cfg, x):
        return {"depth": jnp.zeros((), x.dtype)}

    @nn.compact
    def __call__(self, x, carry, *, segment_ids=None):
        depth = carry["depth"] + 1
        s = self.param("s", nn.initializers.normal(1.0), (x.shape[-1],))
        return x * s * depth, {**carry, "depth": depth}


class ProbeMLP(FeedForward):
    """Feed-forward kind that records the segment ids it is given."""

    flops_per_token = staticmethod(lambda cfg, seq_len: 0.0)

    @nn.compact
    def __call__(self, x, *, segment_ids=None):
        self.sow("intermediates", "segment_ids", segment_ids)
        return jnp.zeros_like(x)


class ProbeRouter(Router):
    """Top-k router that records the segment ids it is given."""

    flops_per_token = staticmethod(lambda cfg: 0.0)

    @nn.compact
    def __call__(self, x, carry, segment_ids=None):
        self.sow("intermediates", "segment_ids", segment_ids)
        kernel = router_kernel(self, "kernel", (x.shape[-1], self.cfg.moe.num_experts))
        return softmax_topk(self, x.reshape(-1, x.shape[-1]) @ kernel,
                            real_tokens(segment_ids, x.shape[0] * x.shape[1])), carry


@pytest.fixture(autouse=True, scope="module")
def toy_kinds():
    toys = ((layers.MLP, {"toy_aux": ToyAux, "toy_carry": ToyCarry, "toy_probe": ProbeMLP}),
            (layers.ATTENTION, {"toy_counter": ToyCounter, "toy_a": ToyA, "toy_b": ToyB}),
            (ROUTERS, {"toy_probe": ProbeRouter}))
    for registry, kinds in toys:
        registry.update(kinds)
    yield
    for registry, kinds in toys:
        for name in kinds:
            del registry[name]


def _batch(cfg, seed=0):
    rng = np.random.default_rng(seed)
    b, t = cfg.train.batch_size, cfg.data.seq_len
    seg = np.ones((b, t), np.int32)
    seg[1::2, t // 2:] = 2
    seg[::3, t - 3 - rng.integers(0, 5):] = 0  # rows with different token counts
    return {"inputs": rng.integers(0, 256, (b, t)).astype(np.int32),
            "targets": rng.integers(0, 256, (b, t)).astype(np.int32),
            "segment_ids": seg, "positions": np.tile(np.arange(t, dtype=np.int32), (b, 1))}


def _grads(cfg, devices):
    mesh = mesh_lib.make_mesh(cfg.mesh, devices)
    program = build_program(cfg, mesh)
    with program.context():
        state = fast_state(program)
        batch = mesh_lib.global_batch(_batch(cfg), mesh)
        grads, metrics, _ = fast_compiled(jax.jit(program.grads), state, batch)(state, batch)
    return jax.device_get((state.params, grads, metrics))


def _toy_ws(tree):
    """The toy_aux layers' (1 and 3) `w` leaves, stacked, from either layout."""
    blocks = tree["blocks"]
    if "layers" in blocks:
        return blocks["layers"]["layer_1"]["mlp"]["w"]
    return np.stack([blocks[f"layer_{i}"]["mlp"]["w"] for i in (1, 3)])


def _query_grads(tree):
    blocks = tree["blocks"]
    if "layers" in blocks:
        return blocks["layers"]["layer_0"]["attention"]["query"]["kernel"]
    return np.stack([blocks[f"layer_{i}"]["attention"]["query"]["kernel"] for i in (0, 2)])


TOY_AUX = ("model.num_layers=4", "model.mlp.pattern=swiglu,toy_aux", "train.batch_size=16")


@pytest.fixture(scope="module")
def aux_reference():
    return _grads(load_config("tiny", [*SMALL, *TOY_AUX]), jax.devices()[:1])


@pytest.mark.parametrize("overrides, devices", [
    ([], 1), (["train.grad_accum=4"], 1), (["mesh.data=8"], 8),
    (["mesh.data=4", "mesh.fsdp=2", "train.grad_accum=2"], 8),
    (["model.scan_layers=true", "train.grad_accum=2"], 1)])
def test_sown_auxiliary_loss_gets_exactly_its_gradient(small_config, aux_reference,
                                                       overrides, devices):
    """Each layer's `c * sum(w**2)` counts once per step: its gradient is `2c * w`,
    whatever the accumulation and the mesh; token-loss gradients are those of one
    device without accumulation, and so are the statistics the layers sow (reduced
    over layers, microbatches and devices by their rules)."""
    params, grads, metrics = _grads(small_config(*TOY_AUX, *overrides),
                                    jax.devices()[:devices])
    _, ref_grads, ref_metrics = aux_reference
    w = _toy_ws(params)
    np.testing.assert_allclose(_toy_ws(grads), 2 * AUX_WEIGHT * w, rtol=1e-6)
    assert metrics["aux_loss"] == pytest.approx(AUX_WEIGHT * float(np.sum(w**2)), rel=1e-6)
    assert set(metrics["stats"]) == {"toy_max_x", "toy_mean_x"}
    if "model.scan_layers=true" in overrides:  # initialised differently: values differ
        return
    np.testing.assert_allclose(_query_grads(grads), _query_grads(ref_grads), rtol=2e-4,
                               atol=1e-7)
    for name, value in ref_metrics["stats"].items():
        assert metrics["stats"][name] == pytest.approx(value, rel=1e-5, abs=1e-6)
    assert metrics["stats"]["toy_max_x"] > metrics["stats"]["toy_mean_x"]


RESUME = [*SMALL, "optimizer.schedule=constant", "optimizer.warmup_steps=0",
          "logging.every=1", "checkpoint.every=2", "model.attention.kind=toy_counter",
          "model.scan_layers=true", "model.remat=full", "train.grad_accum=2",
          "train.batch_size=16", "mesh.fsdp=2"]


def _rows(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def test_keys_and_model_state_through_scan_remat_and_resume(tmp_path, capsys):
    """Every step and every layer draws its own key; a counter in the model state
    advances once per step (not per microbatch), is checkpointed, and a resumed run
    is bitwise the uninterrupted one; eval and generate read the state too. State is
    sharded by its logical axis names."""
    program = build_program(load_config("tiny", RESUME))
    seen = program.state_shardings.model_state["state"]["blocks"]["layers"]["layer_0"]
    assert seen["attention"]["seen"].spec == jax.sharding.PartitionSpec(None, "fsdp")
    straight, resumed = str(tmp_path / "straight"), str(tmp_path / "resumed")
    train(load_config("tiny", [*RESUME, "train.steps=4", "train.eval_every=4",
                               f"train.workdir={straight}"]))
    train(load_config("tiny", [*RESUME, "train.steps=2", "train.eval_every=0",
                               f"train.workdir={resumed}"]))
    train(load_config("tiny", [*RESUME, "train.steps=4", "train.eval_every=4",
                               f"train.workdir={resumed}"]))
    timing = ("step_time_s", "tokens_per_sec", "mfu", "peak_flops")
    rows, again = ([{k: v for k, v in r.items() if k not in timing} for r in _rows(w)
                    if "loss" in r] for w in (straight, resumed))
    assert rows == again
    # The counter after each step's update: once per step, not per microbatch.
    assert [r["calls"] for r in rows] == [1, 2, 3, 4]
    keys = [(r["key/layer_0"], r["key/layer_1"]) for r in rows]
    assert all(a != b for a, b in keys)  # layers differ
    assert len(set(keys)) == len(keys)  # steps differ
    evals = [r for r in _rows(straight) if "eval_loss" in r]
    assert evals == [r for r in _rows(resumed) if "eval_loss" in r]
    capsys.readouterr()
    assert main(["generate", "--workdir", straight, "--prompt", "x", "--max-new-tokens",
                 "2", "--temperature", "0"]) == 0


def _apply_stack(cfg, params, x):
    pos = jnp.broadcast_to(jnp.arange(x.shape[1]), x.shape[:2])
    plan = layer_plan(cfg.model)
    stack = PlainStack(cfg.model, Block, plan)
    return stack.apply({"params": params}, x, initial_carry(cfg.model, plan, x), pos, None,
                       None)


@pytest.mark.parametrize("num_layers", [4, 5])
def test_layer_plan_scanned_and_unrolled_equal_layers_by_hand(small_config, num_layers):
    """Two alternating mixer kinds and a carry between layers: the plan's repeating
    group scanned (the leftover layer unrolled) equals the layers applied by hand."""
    cfg = small_config("model.attention.pattern=toy_a,toy_b", "model.mlp.kind=toy_carry",
                       f"model.num_layers={num_layers}")
    plan = layer_plan(cfg.model)
    assert [s.mixer for s in plan] == ["toy_a", "toy_b", "toy_a", "toy_b", "toy_a"][
        :num_layers]
    x = jax.random.normal(jax.random.key(1), (2, 8, cfg.model.d_model))
    pos = jnp.broadcast_to(jnp.arange(8), (2, 8))
    start = initial_carry(cfg.model, plan, x)
    assert start == {"depth": 0}
    params = nn.unbox(PlainStack(cfg.model, Block, plan).init(
        jax.random.key(0), x, start, pos, None, None))["params"]
    assert sorted(params) == [f"layer_{i}" for i in range(num_layers)]
    by_hand, carry = x, {"depth": jnp.zeros(())}
    for i, spec in enumerate(plan):
        by_hand, carry = Block(cfg.model, spec).apply({"params": params[f"layer_{i}"]},
                                                      by_hand, carry, pos, None, None)
    assert carry["depth"] == num_layers
    np.testing.assert_allclose(_apply_stack(cfg, params, x), by_hand, rtol=1e-6)

    scan_cfg = small_config("model.attention.pattern=toy_a,toy_b", "model.mlp.kind=toy_carry",
                            f"model.num_layers={num_layers}", "model.scan_layers=true")
    scanned = {"layers": {f"layer_{j}": jax.tree.map(
        lambda *xs: jnp.stack(xs), *[params[f"layer_{2 * r + j}"] for r in range(2)])
        for j in range(2)}}
    if num_layers == 5:
        scanned["layer_4"] = params["layer_4"]
    structure = jax.tree.structure(nn.unbox(PlainStack(scan_cfg.model, Block, plan).init(
        jax.random.key(0), x, start, pos, None, None))["params"])
    assert jax.tree.structure(scanned) == structure
    # float32: five layers of values near 1 reassociated by the scan differ by ~4e-6.
    np.testing.assert_allclose(_apply_stack(scan_cfg, scanned, x), by_hand, rtol=1e-5,
                               atol=1e-5)


def test_weight_decay_by_role_scanned_equals_unscanned(small_config):
    """Norm scales are not decayed whatever their rank: from one initialisation, a few
    steps with weight decay give the same parameters scanned and unscanned."""
    overrides = ("optimizer.weight_decay=0.5", "optimizer.warmup_steps=0", "optimizer.lr=1e-2")
    cfg, scan_cfg = small_config(*overrides), small_config(*overrides, "model.scan_layers=true")
    devices = jax.devices()[:1]
    plain = build_program(cfg, mesh_lib.make_mesh(cfg.mesh, devices))
    scan = build_program(scan_cfg, mesh_lib.make_mesh(scan_cfg.mesh, devices))
    n = cfg.model.num_layers

    def restack(tree):
        tree = dict(tree)
        blocks = tree.pop("blocks")
        return {**tree, "blocks": {"layers": {"layer_0": jax.tree.map(
            lambda *xs: jnp.stack(xs), *[blocks[f"layer_{i}"] for i in range(n)])}}}

    with plain.context():
        state = plain.init(jax.random.key(0))
    scan_state = jax.tree.map(jnp.copy, state.replace(  # train_step donates its input
        params=restack(state.params), opt_state=scan.tx.init(restack(state.params))))
    batch = _batch(cfg)
    for _ in range(3):
        with plain.context():
            state, _ = plain.train_step(state, mesh_lib.global_batch(batch, plain.mesh))
        with scan.context():
            scan_state, _ = scan.train_step(scan_state,
                                            mesh_lib.global_batch(batch, scan.mesh))
    for a, b in zip(jax.tree.leaves(restack(state.params)), jax.tree.leaves(scan_state.params)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=2e-5)  # decay moves scales 5e-3


def test_checkpoint_from_before_model_state_is_one_line(tmp_path, capsys):
    """A checkpoint whose train state lacks a field (written before `model_state`
    existed) is refused with one line naming it, and left as it was."""
    from typing import Any

    import flax

    from efflm.data import get_tokenizer, make_train_iterator
    from efflm.train.checkpoint import Checkpointer
    from efflm.train.trainer import prepare_workdir

    @flax.struct.dataclass
    class EarlierTrainState:
        step: Any
        params: Any
        opt_state: Any
        rng: Any

    args = [*SMALL, f"train.workdir={tmp_path}", "train.steps=4"]
    cfg = load_config("tiny", args)
    prepare_workdir(cfg, True)
    program = build_program(cfg)
    with program.context():
        state = program.init(jax.random.key(0))
    data = make_train_iterator(cfg.data, get_tokenizer(cfg.data), global_batch=8, seed=0,
                               process_index=0, process_count=1)
    checkpointer = Checkpointer(str(tmp_path / "checkpoints"), cfg.checkpoint)
    checkpointer.save(2, EarlierTrainState(state.step, state.params, state.opt_state,
                                           state.rng), data, force=True)
    checkpointer.close()
    before = sorted(os.listdir(tmp_path / "checkpoints" / "2" / "state"))
    capsys.readouterr()
    assert main(["train", "--config", "tiny", *args]) == 2
    err = capsys.readouterr().err
    assert "step 2" in err and "has no model_state" in err and err.count("\n") == 1
    assert sorted(os.listdir(tmp_path / "checkpoints" / "2" / "state")) == before
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["2"]


def test_step_updates_replace_only_the_variables_they_name():
    """`apply_step_updates` hands each variable named in STEP_UPDATES (any depth, any
    container) to its rule with the config, and leaves every other leaf as it was."""
    from flax.core import FrozenDict

    from efflm.layers.common import STEP_UPDATES, apply_step_updates, step_update

    seen = []

    @step_update("toy_step_total")
    def add_rate(cfg, value):
        seen.append(cfg)
        return {**value, "total": value["total"] + value["last"] * cfg}

    try:
        state = {"state": {"a": FrozenDict({"toy_step_total": {"total": jnp.ones(2),
                                                                  "last": jnp.arange(2.0)}}),
                           "b": {"calls": jnp.int32(3)}}}
        out = apply_step_updates(10.0, state)
    finally:
        del STEP_UPDATES["toy_step_total"]
    assert seen == [10.0] and isinstance(out["state"]["a"], FrozenDict)
    np.testing.assert_array_equal(out["state"]["a"]["toy_step_total"]["total"], [1.0, 11.0])
    np.testing.assert_array_equal(out["state"]["a"]["toy_step_total"]["last"], [0.0, 1.0])
    assert out["state"]["b"]["calls"] == 3


def test_microbatch_state_mean_keeps_an_unchanged_leaf_bitwise():
    """A float state leaf that every microbatch left at the same value (the sigmoid_bias
    router's bias) comes out bitwise unchanged for any microbatch count; other leaves are
    their mean, integers the last microbatch's."""
    from efflm.train.sown import combine_model_state

    rng = np.random.default_rng(0)
    same = (rng.normal(size=4096) * 1e-3).astype(np.float32)
    for n in (2, 3, 5, 6, 7):
        moving = rng.normal(size=(n, 8)).astype(np.float32)
        out = combine_model_state({"same": jnp.asarray(np.stack([same] * n)),
                                   "moving": jnp.asarray(moving),
                                   "count": jnp.arange(n)})
        np.testing.assert_array_equal(out["same"], same)
        np.testing.assert_allclose(out["moving"], moving.mean(0), rtol=1e-6, atol=1e-7)
        assert int(out["count"]) == n - 1


def test_feed_forwards_and_routers_see_which_positions_are_padding(small_config):
    """The token mask reaches every feed-forward kind and, through the MoE layer, its
    router: both get the batch's segment ids (0: padding), in every layer."""
    cfg = small_config("model.mlp.pattern=toy_probe,moe", "model.moe.router=toy_probe",
                       "model.moe.num_experts=4").model
    model = LM(cfg)
    tokens = jnp.zeros((2, 8), jnp.int32)
    seg = jnp.asarray([[1, 1, 1, 2, 2, 0, 0, 0], [1, 1, 1, 1, 1, 1, 1, 0]], jnp.int32)
    pos = jnp.broadcast_to(jnp.arange(8), (2, 8))
    variables = fast_init(model, tokens, pos, seg)
    _, seen = fast_jit(lambda p: model.apply({"params": p}, tokens, pos, seg, mutable=[
        "intermediates", "losses", "stats"]))(variables["params"])
    seen = seen["intermediates"]["blocks"]
    np.testing.assert_array_equal(seen["layer_0"]["mlp"]["segment_ids"][0], seg)
    np.testing.assert_array_equal(seen["layer_1"]["mlp"]["router"]["segment_ids"][0], seg)


@pytest.mark.parametrize("registry, base", [
    (layers.ATTENTION, Mixer), (layers.MLP, FeedForward), (ROUTERS, Router),
    (layers.DEPTH, Depth), ({k: v for k, v in QUANT.items() if v is not None}, NumberFormat)])
def test_every_registered_kind_declares_its_family_contract(registry, base):
    """Central code calls the hooks of a kind's family base without probing for them, so
    every registered kind must subclass it (a test kind registered here too)."""
    wrong = sorted(k for k, cls in registry.items() if not issubclass(cls, base))
    assert not wrong, f"not subclasses of {base.__name__}: {wrong}"
