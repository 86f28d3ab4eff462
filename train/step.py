"""The pure training and evaluation steps, jitted with explicit shardings.

`Program` ties a Config to a mesh: the model, the optimizer, the sharding of
every leaf of the train state, and the jitted `init`, `train_step`, `eval_step`.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

from efflm import mesh as mesh_lib
from efflm.config import Config
from efflm.data import IGNORE, SOURCES
from efflm.layers.common import (
    LOSSES,
    OBSERVED,
    RNG_STREAMS,
    STATE_COLLECTIONS,
    STATS,
    apply_observations,
    apply_step_updates,
)
from efflm.layers.depth.plain import repeating_group
from efflm.layers.plan import check_mesh, layer_plan, no_decay
from efflm.layers.quant import QUANT
from efflm.models import LM
from efflm.train import sown as sown_lib
from efflm.train.loss import cross_entropy, linear_cross_entropy_terms, resolve_loss_impl
from efflm.train.optim import OPTIMIZERS, learning_rate_schedule, make_optimizer
from efflm.train.roles import ParamRoles


def loss_mask(batch):
    """The targets the loss trains and scores: those of real tokens (segment id > 0)
    that are not IGNORE (a source's unscored positions)."""
    return (batch["segment_ids"] > 0) & (batch["targets"] != IGNORE)


def _global_norm(tree):
    """L2 norm over all leaves, in float32 (optax renames this helper across versions)."""
    return jnp.sqrt(sum(jnp.sum(jnp.square(x.astype(jnp.float32)))
                        for x in jax.tree.leaves(tree)))


@flax.struct.dataclass
class TrainState:
    step: jax.Array  # int32 scalar
    params: Any
    model_state: Any  # {collection: variables} for STATE_COLLECTIONS, outside the gradient
    opt_state: Any
    rng: jax.Array  # raw uint32 key data, so it checkpoints as a plain array

    def variables(self) -> dict:
        """What `model.apply` takes: the parameters and the model state."""
        return {"params": self.params, **self.model_state}


def step_rngs(rng: jax.Array, step, microbatch=0) -> dict:
    """A fresh key for each random stream of `RNG_STREAMS`, from the state's key, the
    step and the microbatch: the same on a resumed run as on an uninterrupted one."""
    key = jax.random.fold_in(jax.random.wrap_key_data(rng), step)
    key = jax.random.fold_in(key, microbatch)
    return {name: jax.random.fold_in(key, i) for i, name in enumerate(RNG_STREAMS)}


@dataclass
class Program:
    cfg: Config
    mesh: Mesh
    model: LM
    tx: optax.GradientTransformation
    rules: tuple
    state_shardings: Any
    batch_sharding: Any

    @contextlib.contextmanager
    def context(self):
        """Mesh and logical-axis rules for tracing and running the steps."""
        with jax.set_mesh(self.mesh), nn.logical_axis_rules(self.rules):
            yield

    # -- pure functions -------------------------------------------------------------

    def _init(self, rng, boxed: bool = False):
        """Fresh state; `boxed` keeps flax's partitioning metadata (for eval_shape)."""
        step, params, model_state, rng = self._init_model(rng, boxed)
        return TrainState(step=step, params=params, model_state=model_state,
                          opt_state=self.tx.init(params), rng=rng)

    def _init_model(self, rng, boxed: bool = False):
        """(step, params, model_state, rng) of a fresh state: all but the optimizer's."""
        params_rng, state_rng = jax.random.split(rng)
        rngs = {"params": params_rng,
                **{s: jax.random.fold_in(params_rng, i + 1) for i, s in enumerate(RNG_STREAMS)}}
        dummy = jnp.zeros((1, self.cfg.data.seq_len), jnp.int32)
        variables = self.model.init(rngs, dummy)
        params = variables["params"]
        model_state = {c: variables[c] for c in STATE_COLLECTIONS if c in variables}
        if not boxed:
            params, model_state = nn.unbox((params, model_state))
        return (jnp.zeros((), jnp.int32), params, model_state,
                jax.random.key_data(state_rng))

    def forward(self, params, model_state, batch, rngs=None, update_state=False,
                accuracy=False):
        """Token losses and what the layers sowed, for one (micro)batch.

        Returns `(loss_sum, z_sum, count, aux_loss, stats, model_state, correct)`: summed
        token (z-)losses over the scored targets (`loss_mask`) and their count, the sum
        of the sown auxiliary losses, the sown statistics (`sown.reduce_stats`), the
        model state, updated by the layers when `update_state`, and with `accuracy` how
        many scored targets the logits' argmax predicts (else None). `train.loss_impl`
        naive (and `accuracy`) computes the full logits; xla and pallas take the final
        hidden states and the head weight and never hold (tokens x vocab) logits.
        """
        impl = resolve_loss_impl(self.cfg.train.loss_impl, dict(self.mesh.shape))
        args = (batch["inputs"], batch["positions"], batch["segment_ids"])
        mask = loss_mask(batch)
        targets = jnp.where(mask, batch["targets"], 0)
        variables = {"params": params, **model_state}
        mutable = [LOSSES, STATS, *(model_state if update_state else ())]
        correct = None
        if impl == "naive" or accuracy:
            logits, sown = self.model.apply(variables, *args, rngs=rngs, mutable=mutable)
            loss_sum, z_sum, count = cross_entropy(logits, targets, mask,
                                                   self.cfg.train.z_loss)
            if accuracy:
                hit = (jnp.argmax(logits, axis=-1) == targets) & mask
                correct = jnp.sum(hit.astype(jnp.float32))
        else:
            (h, w), sown = self.model.apply(
                variables, *args, rngs=rngs, mutable=mutable,
                method=lambda lm, *a: lm.head_operands(lm.hidden(*a)))
            loss_sum, z_sum, count = linear_cross_entropy_terms(
                h, w, targets, mask, self.cfg.train.z_loss, impl)
        stats = sown_lib.reduce_stats(sown.get(STATS, {}), self.period)
        new_state = {c: sown[c] for c in model_state} if update_state else model_state
        aux = sown_lib.sum_losses(sown.get(LOSSES, {}))
        return loss_sum, z_sum, count, aux, stats, new_state, correct

    def grads(self, state: TrainState, batch):
        """Gradients of the step's objective, its metrics and the updated model state.

        The objective is the token loss (plus z-loss) summed over the global batch and
        divided by its token count, plus each sown auxiliary loss (a per-(micro)batch
        mean) divided by `train.grad_accum`, so that both count once per step. The
        model state is what the forward passes wrote (averaged over microbatches), then
        updated once by the rules of `efflm.layers.common.STEP_UPDATES`, and from what
        the backward passes observed (`OBSERVED`: the max over microbatches).
        """
        accum = self.cfg.train.grad_accum
        denom = jnp.maximum(jnp.sum(loss_mask(batch)).astype(jnp.float32), 1.0)
        observed = state.model_state.get(OBSERVED, {})

        def objective(params, observed, micro, index):
            model_state = {**state.model_state, **({OBSERVED: observed} if observed else {})}
            loss_sum, z_sum, count, aux, stats, new_state, _ = self.forward(
                params, model_state, micro, step_rngs(state.rng, state.step, index),
                update_state=True)
            return (loss_sum + z_sum) / denom + aux / accum, (
                (loss_sum, aux, count), stats, new_state)

        grad_fn = jax.grad(objective, argnums=(0, 1), has_aux=True)
        if accum == 1:
            (grads, seen), (sums, stats, model_state) = grad_fn(state.params, observed,
                                                                 batch, 0)
            stats = jax.tree.map(lambda x: x[None], stats)
        else:
            micro = jax.tree.map(
                lambda x: x.reshape(accum, x.shape[0] // accum, *x.shape[1:]), batch)

            def body(carry, xs):
                total, most, sums_so_far = carry
                (grads, seen), (sums, stats, new_state) = grad_fn(state.params, observed, *xs)
                return (jax.tree.map(jnp.add, total, grads),
                        jax.tree.map(jnp.maximum, most, seen),  # observed: max, not sum
                        jax.tree.map(jnp.add, sums_so_far, sums)), (stats, new_state)

            zeros = (jax.tree.map(jnp.zeros_like, state.params),
                     jax.tree.map(jnp.zeros_like, observed), (jnp.zeros(()),) * 3)
            (grads, seen, sums), (stats, model_state) = jax.lax.scan(
                body, zeros, (micro, jnp.arange(accum)))
            model_state = sown_lib.combine_model_state(model_state)
        model_state = apply_step_updates(self.cfg.model, model_state)
        if observed:
            model_state = apply_observations(self.cfg.model, model_state, seen)
        loss_sum, aux, count = sums
        metrics = {"loss": loss_sum / jnp.maximum(count, 1.0), "aux_loss": aux / accum,
                   "tokens": count, "stats": sown_lib.combine_microbatches(stats)}
        return grads, metrics, model_state

    def _train_step(self, state: TrainState, batch):
        grads, metrics, model_state = self.grads(state, batch)
        updates, opt_state = self.tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics["grad_norm"] = _global_norm(grads)
        metrics["optimizer"] = OPTIMIZERS[self.cfg.optimizer.name].report(opt_state)
        new = state.replace(step=state.step + 1, params=params, model_state=model_state,
                            opt_state=opt_state)
        return new, metrics

    def _eval_step(self, params, model_state, batch):
        """Summed loss and count of the scored targets; their bytes where the batch
        carries `target_bytes`; with a source that reports an accuracy
        (`DataSource.accuracy`), how many the argmax predicts."""
        accuracy = SOURCES[self.cfg.data.source].accuracy is not None
        loss_sum, _, count, _, _, _, correct = self.forward(params, model_state, batch,
                                                            accuracy=accuracy)
        out = {"loss_sum": loss_sum, "tokens": count}
        if "target_bytes" in batch:
            out["bytes"] = jnp.sum(batch["target_bytes"]).astype(jnp.float32)  # exact
        if accuracy:
            out["correct"] = correct
        return out

    # -- jitted entry points ----------------------------------------------------------

    def __post_init__(self):
        self.period = repeating_group(layer_plan(self.cfg.model))[0]
        if self.state_shardings is None:  # only the model and optimizer are needed yet
            return
        rep = mesh_lib.replicated(self.mesh)
        self.init = jax.jit(self._init, out_shardings=self.state_shardings)
        self.train_step = jax.jit(
            self._train_step, in_shardings=(self.state_shardings, self.batch_sharding),
            out_shardings=(self.state_shardings, rep), donate_argnums=(0,))
        self.eval_step = jax.jit(
            self._eval_step, in_shardings=(self.state_shardings.params,
                                           self.state_shardings.model_state,
                                           self.batch_sharding),
            out_shardings=rep)
        self.learning_rate = learning_rate_schedule(self.cfg.optimizer, self.cfg.train.steps)


def trainable_only(cfg: Config, tx: optax.GradientTransformation):
    """`tx` for the parameters `train.trainable` names; the others get zero updates
    (and no optimizer state)."""
    if cfg.train.trainable == "all":
        return tx
    names = QUANT[cfg.model.quant.kind].scale_params

    def label(path, _):
        keys = [k.key for k in path if isinstance(k, jax.tree_util.DictKey)]
        return "train" if keys and keys[-1] in names else "frozen"

    return optax.multi_transform({"train": tx, "frozen": optax.set_to_zero()},
                                 lambda p: jax.tree_util.tree_map_with_path(label, p))


def build_program(cfg: Config, mesh: Mesh | None = None) -> Program:
    """Model, optimizer and jitted steps for `cfg` on `mesh` (default: all devices)."""
    mesh = mesh or mesh_lib.make_mesh(cfg.mesh)
    mesh_lib.check_divisibility(cfg, mesh)
    check_mesh(cfg.model, dict(mesh.shape))
    rules = mesh_lib.logical_rules(cfg, mesh)
    model = LM(cfg.model)
    partial = Program(cfg, mesh, model, None, rules, None, None)
    with partial.context():
        step, params, model_state, rng = jax.eval_shape(
            lambda r: partial._init_model(r, boxed=True), jax.random.key(0))
        roles = ParamRoles.of(params, no_decay=no_decay(cfg.model))
        tx = trainable_only(cfg, make_optimizer(cfg.optimizer, cfg.train.steps, roles))
        abstract = TrainState(step, params, model_state, jax.eval_shape(tx.init, params), rng)
    state_shardings = mesh_lib.shardings_of(abstract, mesh, rules)
    return Program(cfg, mesh, model, tx, rules, state_shardings, mesh_lib.batch_sharding(mesh))


def compiled_memory(compiled) -> dict:
    """Per-device bytes of a compiled step, from XLA's `memory_analysis()`: its arguments,
    outputs and temporaries, and `step_memory_bytes`, their sum less the outputs that
    reuse donated arguments (what the step holds at its peak). Empty where the backend
    reports nothing."""
    memory = compiled.memory_analysis()
    if memory is None:
        return {}
    parts = {name: int(getattr(memory, f"{name}_size_in_bytes", 0))
             for name in ("argument", "output", "temp", "alias")}
    out = {f"memory_{name}_bytes": value for name, value in parts.items()}
    out["step_memory_bytes"] = (parts["argument"] + parts["output"] + parts["temp"]
                                - parts["alias"])
    return out


def count_params(params) -> int:
    return sum(x.size for x in jax.tree.leaves(params))
