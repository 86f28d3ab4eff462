"""The benchmarks' HLO accounting (`bench/report.py:collective_bytes`): collectives in a
loop body count once per iteration, and what a device receives follows its group size."""

import jax
import jax.numpy as jnp
from conftest import FAST_COMPILE
from jax import lax
from jax.sharding import AxisType, PartitionSpec

from efflm.bench.report import collective_bytes, group_size


def _compiled_text(fn, x):
    mesh = jax.make_mesh((2, 4), ("a", "b"), axis_types=(AxisType.Auto,) * 2)
    body = jax.shard_map(fn, mesh=mesh, in_specs=PartitionSpec("a", "b"),
                         out_specs=PartitionSpec("a", "b"), check_vma=False)
    return jax.jit(body).lower(x).compile(compiler_options=FAST_COMPILE).as_text()


def test_a_permute_in_a_loop_counts_per_iteration_and_groups_scale_what_arrives():
    def fn(x):  # x: the (4, 8) float32 block of one device, 128 bytes
        ring = [(i, (i + 1) % 4) for i in range(4)]
        x = lax.fori_loop(0, 3, lambda i, x: lax.ppermute(x, "b", ring) * 2.0, x)
        return x + lax.psum(x, "b") + lax.all_gather(x, "a", axis=0, tiled=True)[:4]

    text = _compiled_text(fn, jnp.ones((8, 32)))
    result = collective_bytes(text)
    assert result["collective-permute"] == 3 * 128
    assert result["all-reduce"] == 128 and result["all-gather"] == 256
    got = collective_bytes(text, received=True)
    assert got["collective-permute"] == 3 * 128
    assert got["all-reduce"] == 128 * 2 * 3 // 4  # 2 (n - 1) / n of it, n = 4
    assert got["all-gather"] == 256 // 2  # (n - 1) / n, n = 2


def test_group_sizes_in_each_notation():
    assert group_size("x, replica_groups={{0,1,2},{3,4,5}}, y") == 3
    assert group_size("replica_groups=[2,4]<=[8], to_apply=%add") == 4
    assert group_size("replica_groups=mesh['axis_0'=2,'axis_1'=4] {'axis_0'}, x") == 2
    assert group_size("replica_groups=mesh['axis_0'=2,'axis_1'=4] {'axis_0','axis_1'}") == 8


def test_quant_table_names_the_targets_it_was_given():
    from efflm.bench.quant import targets_line

    assert targets_line(["optimizer.lr=1e-3"]) == "the default targets"
    assert targets_line(["model.quant.targets=[experts]"]) == "targets [experts]"
