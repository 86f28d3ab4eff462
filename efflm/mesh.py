"""The device mesh and the rules that map logical axis names to its axes.

Layers and kernels use it (`mesh_axes_of`), so it imports nothing from them; the kinds'
own mesh checks are asked by `efflm.layers.plan.check_mesh`.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import flax.linen as nn
import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from efflm.errors import ConfigError
from efflm.shapes import num_kv_heads

if TYPE_CHECKING:
    from efflm.config import Config, MeshConfig

AXES = ("data", "fsdp", "tensor", "expert", "sequence")
# Mesh axes over which the batch is split (tokens of non-expert layers).
BATCH_AXES = ("data", "fsdp", "expert")


def mesh_shape(cfg: MeshConfig, num_devices: int) -> dict[str, int]:
    """Sizes of the mesh axes, with a -1 axis taking the remaining devices."""
    sizes = {a: getattr(cfg, a) for a in AXES}
    known = math.prod(v for v in sizes.values() if v != -1)
    flexible = [a for a, v in sizes.items() if v == -1]
    if flexible:
        if num_devices % known:
            raise ConfigError(
                f"the fixed mesh axes ({_describe(sizes)}) use {known} devices, which does not "
                f"divide the {num_devices} available; choose sizes whose product divides "
                f"{num_devices}")
        sizes[flexible[0]] = num_devices // known
    if math.prod(sizes.values()) != num_devices:
        raise ConfigError(
            f"mesh sizes {_describe(sizes)} multiply to {math.prod(sizes.values())} but there "
            f"are {num_devices} devices; make the product {num_devices} or set one axis to -1")
    return sizes


def _describe(sizes: dict[str, int]) -> str:
    return ", ".join(f"mesh.{a}={v}" for a, v in sizes.items() if v != 1)


def make_mesh(cfg: MeshConfig, devices=None) -> Mesh:
    devices = jax.devices() if devices is None else devices
    sizes = mesh_shape(cfg, len(devices))
    shape = tuple(sizes[a] for a in AXES)
    try:
        arr = mesh_utils.create_device_mesh(shape, devices=devices)
    except Exception:  # odd topologies: fall back to the given order
        arr = np.asarray(devices).reshape(shape)
    return Mesh(arr, AXES)


def logical_rules(cfg: Config, mesh: Mesh) -> tuple[tuple[str, object], ...]:
    """Logical-axis rules for this model on this mesh.

    Parameters: `embed` over fsdp (ZeRO-3 style), heads/mlp/vocab over tensor.
    Activations: `batch` over data x fsdp x expert, `length` over sequence. Flax
    skips a mesh axis already used by an earlier dimension, so an activation's
    `embed` stays unsplit once `batch` took fsdp.
    """
    tensor = mesh.shape["tensor"]
    kv_rule = "tensor" if num_kv_heads(cfg.model) % tensor == 0 else None
    return (
        ("batch", BATCH_AXES),
        ("length", "sequence"),
        ("embed", "fsdp"),
        ("heads", "tensor"),
        ("kv_heads", kv_rule),
        ("mlp", "tensor"),
        ("vocab", "tensor"),
        ("expert", "expert"),
        ("layers", None),
        ("head_dim", None),
    )


def check_divisibility(cfg: Config, mesh: Mesh) -> None:
    """Raise ConfigError when a dimension the model shards does not split evenly (the
    kinds check their own dimensions: `efflm.layers.plan.check_mesh`)."""
    m = cfg.model
    shards = math.prod(mesh.shape[a] for a in BATCH_AXES)
    micro = cfg.train.batch_size // cfg.train.grad_accum
    if micro % shards:
        raise ConfigError(
            f"the batch per step (train.batch_size={cfg.train.batch_size} / "
            f"train.grad_accum={cfg.train.grad_accum} = {micro}) is not divisible by the "
            f"{shards} data shards (mesh data x fsdp x expert); use a multiple of {shards}")
    checks = [
        ("model.d_model", m.d_model, "fsdp"),
        ("model.attention.num_heads", m.attention.num_heads, "tensor"),
        ("model.mlp.d_ff", m.mlp.d_ff, "tensor"),
        ("model.vocab_size", m.vocab_size, "tensor"),
        ("data.seq_len", cfg.data.seq_len, "sequence"),
    ]
    for key, value, axis in checks:
        if value % mesh.shape[axis]:
            raise ConfigError(f"{key}={value} is not divisible by mesh.{axis}="
                              f"{mesh.shape[axis]}")
    n = mesh.shape["sequence"]
    if m.attention.context_parallel == "zigzag" and n > 1 and cfg.data.seq_len % (2 * n):
        raise ConfigError(f"data.seq_len={cfg.data.seq_len} is not divisible by 2 x "
                          f"mesh.sequence={n}: model.attention.context_parallel=zigzag "
                          "halves each device's chunk (ring does not)")


def mesh_axes_of(mesh, name: str, size: int) -> tuple[str, ...]:
    """The mesh axes (of size > 1) the active logical rules give to axis `name`, or ()
    when their product does not divide `size` (a batch of one at init stays whole)."""
    axes = nn.logical_to_mesh_axes((name,))[0]
    axes = (axes,) if isinstance(axes, str) else tuple(axes or ())
    axes = tuple(a for a in axes if mesh.shape[a] > 1)
    return axes if size % math.prod(mesh.shape[a] for a in axes) == 0 else ()


def shardings_of(abstract_boxed, mesh: Mesh, rules):
    """NamedShardings for a pytree whose leaves may carry flax logical partitioning.

    A leaf whose names do not fit its shape (their rank, or mesh axes that do not divide
    it) is replicated: an optimizer state derived from a parameter with another shape
    (Adafactor's row and column statistics) keeps the parameter's box, not its axes."""

    def fits(names, shape) -> bool:
        if len(names) != len(shape):
            return False
        spec = nn.logical_to_mesh_axes(names, rules)
        for size, axes in zip(shape, spec):
            axes = (axes,) if isinstance(axes, str) else tuple(axes or ())
            if size % math.prod(mesh.shape[a] for a in axes):
                return False
        return True

    def fit(leaf):
        if isinstance(leaf, nn.Partitioned) and not fits(
                leaf.names, getattr(leaf.value, "shape", ())):  # (optax's masked: no array)
            return leaf.value
        return leaf

    fitted = jax.tree.map(fit, abstract_boxed, is_leaf=lambda x: isinstance(x, nn.Partitioned))
    return nn.logical_to_mesh_sharding(nn.get_partition_spec(fitted), mesh, rules)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec(BATCH_AXES, "sequence"))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def global_batch(local: dict, mesh: Mesh) -> dict:
    """Assemble each process's rows into global arrays sharded over the batch axes."""
    sharding = batch_sharding(mesh)
    return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in local.items()}
