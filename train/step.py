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
from efflm.models import LM
from efflm.train.loss import cross_entropy, linear_cross_entropy_terms, resolve_loss_impl
from efflm.train.optim import learning_rate_schedule, make_optimizer


def _global_norm(tree):
    """L2 norm over all leaves, in float32 (optax renames this helper across versions)."""
    return jnp.sqrt(sum(jnp.sum(jnp.square(x.astype(jnp.float32)))
                        for x in jax.tree.leaves(tree)))


@flax.struct.dataclass
class TrainState:
    step: jax.Array  # int32 scalar
    params: Any
    opt_state: Any
    rng: jax.Array  # raw uint32 key data, so it checkpoints as a plain array


def _sum_sown(collection) -> jax.Array:
    leaves = jax.tree.leaves(collection)
    return sum((jnp.sum(x.astype(jnp.float32)) for x in leaves), jnp.zeros((), jnp.float32))


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
        params_rng, state_rng = jax.random.split(rng)
        dummy = jnp.zeros((1, self.cfg.data.seq_len), jnp.int32)
        params = self.model.init(params_rng, dummy)["params"]
        if not boxed:
            params = nn.unbox(params)
        return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                          opt_state=self.tx.init(params),
                          rng=jax.random.key_data(state_rng))

    def loss_terms(self, params, batch):
        """(loss_sum, z_sum, aux_loss, num_tokens) for one (micro)batch.

        `train.loss_impl` naive computes the full logits; xla and pallas take the final
        hidden states and the head weight and never hold (tokens x vocab) logits.
        """
        impl = resolve_loss_impl(self.cfg.train.loss_impl, dict(self.mesh.shape))
        args = (batch["inputs"], batch["positions"], batch["segment_ids"])
        mask = batch["segment_ids"] > 0
        if impl == "naive":
            logits, sown = self.model.apply({"params": params}, *args, mutable=["losses"])
            loss_sum, z_sum, count = cross_entropy(
                logits, batch["targets"], mask, self.cfg.train.z_loss)
        else:
            (h, w), sown = self.model.apply(
                {"params": params}, *args, mutable=["losses"],
                method=lambda lm, *a: (lm.hidden(*a), lm.head_weight()))
            loss_sum, z_sum, count = linear_cross_entropy_terms(
                h, w, batch["targets"], mask, self.cfg.train.z_loss, impl)
        return loss_sum, z_sum, _sum_sown(sown.get("losses", {})), count

    def _train_step(self, state: TrainState, batch):
        accum = self.cfg.train.grad_accum

        def objective(params, micro):
            loss_sum, z_sum, aux, count = self.loss_terms(params, micro)
            return loss_sum + z_sum, (loss_sum, aux, count)

        grad_fn = jax.grad(objective, has_aux=True)
        if accum == 1:
            grads, (loss_sum, aux, count) = grad_fn(state.params, batch)
        else:
            micro = jax.tree.map(
                lambda x: x.reshape(accum, x.shape[0] // accum, *x.shape[1:]), batch)

            def body(carry, mb):
                grads, (loss_sum, aux, count) = grad_fn(state.params, mb)
                return jax.tree.map(jnp.add, carry, (grads, loss_sum, aux, count)), None

            zeros = (jax.tree.map(jnp.zeros_like, state.params), jnp.zeros(()),
                     jnp.zeros(()), jnp.zeros(()))
            (grads, loss_sum, aux, count), _ = jax.lax.scan(body, zeros, micro)
        # Token losses are summed over the whole global batch, then averaged once.
        # Auxiliary losses are per-microbatch means, so they are averaged over `accum`.
        denom = jnp.maximum(count, 1.0)
        grads = jax.tree.map(lambda g: g / denom, grads)
        if accum > 1:
            aux = aux / accum
        updates, opt_state = self.tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = {
            "loss": loss_sum / denom,
            "aux_loss": aux,
            "grad_norm": _global_norm(grads),
            "tokens": count,
        }
        new = state.replace(step=state.step + 1, params=params, opt_state=opt_state)
        return new, metrics

    def _eval_step(self, params, batch):
        loss_sum, _, _, count = self.loss_terms(params, batch)
        return {"loss_sum": loss_sum, "tokens": count,
                "bytes": jnp.sum(batch["target_bytes"].astype(jnp.float32))}

    # -- jitted entry points ----------------------------------------------------------

    def __post_init__(self):
        if self.state_shardings is None:  # only the model and optimizer are needed yet
            return
        rep = mesh_lib.replicated(self.mesh)
        self.init = jax.jit(self._init, out_shardings=self.state_shardings)
        self.train_step = jax.jit(
            self._train_step, in_shardings=(self.state_shardings, self.batch_sharding),
            out_shardings=(self.state_shardings, rep), donate_argnums=(0,))
        self.eval_step = jax.jit(
            self._eval_step, in_shardings=(self.state_shardings.params, self.batch_sharding),
            out_shardings=rep)
        self.learning_rate = learning_rate_schedule(self.cfg.optimizer, self.cfg.train.steps)


def build_program(cfg: Config, mesh: Mesh | None = None) -> Program:
    """Model, optimizer and jitted steps for `cfg` on `mesh` (default: all devices)."""
    mesh = mesh or mesh_lib.make_mesh(cfg.mesh)
    mesh_lib.check_divisibility(cfg, mesh)
    rules = mesh_lib.logical_rules(cfg, mesh)
    model = LM(cfg.model)
    tx = make_optimizer(cfg.optimizer, cfg.train.steps)
    partial = Program(cfg, mesh, model, tx, rules, None, None)
    with partial.context():
        abstract = jax.eval_shape(lambda r: partial._init(r, boxed=True), jax.random.key(0))
    state_shardings = mesh_lib.shardings_of(abstract, mesh, rules)
    return Program(cfg, mesh, model, tx, rules, state_shardings, mesh_lib.batch_sharding(mesh))


def count_params(params) -> int:
    return sum(x.size for x in jax.tree.leaves(params))
