"""Muon, GaLore and APOLLO (train/optim.py, train/lowrank.py): the role routing on real
models, each against a per-matrix reference, FSDP and bitwise resume."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import SMALL

from efflm.config import load_config
from efflm.train.lowrank import apollo_projector
from efflm.train.optim import make_optimizer
from efflm.train.roles import ParamRoles
from efflm.train.step import build_program


def _roles(cfg):
    program = build_program(cfg)
    with program.context():
        params = jax.eval_shape(lambda r: program._init_model(r, boxed=True),
                                jax.random.key(0))[1]
    return ParamRoles.of(params)


def _find(roles, *suffix):
    (path,) = [p for p in roles.roles if p[-len(suffix):] == suffix and "layer_0" in p
               or p == suffix]
    return path


@pytest.mark.parametrize("preset,extra", [("tiny", []), ("tiny", ["model.scan_layers=true"]),
                                          ("small_moe", [])])
def test_roles_route_each_parameter(small_config, preset, extra):
    """Matrices by their axis names (3-D attention kernels included, stacked layers and
    experts as batches); the embedding, routers and norm scales not, though a scanned
    norm scale and a router kernel are 2-D."""
    roles = _roles(small_config(*extra, preset=preset))
    stacked = preset == "small_moe" or extra
    lead = (0,) if stacked else ()
    shift = len(lead)
    assert roles.roles[("embedding",)] == "vocab"
    assert roles.roles[_find(roles, "attention_norm", "scale")] == "vector"
    query = roles.matrices[_find(roles, "attention", "query", "kernel")]
    assert (query.batch_axes, query.reduction, query.output) == (
        lead, (shift,), (shift + 1, shift + 2))
    out = roles.matrices[_find(roles, "attention", "out", "kernel")]
    assert (out.reduction, out.output) == ((shift, shift + 1), (shift + 2,))
    if preset == "small_moe":
        assert roles.roles[_find(roles, "mlp", "router", "kernel")] == "router"
        up = roles.matrices[_find(roles, "mlp", "up")]
        assert (up.batch_axes, up.reduction, up.output) == ((0, 1), (2,), (3,))
        assert up.stacked == (2 * 8, 64, 1024)
    else:
        down = roles.matrices[_find(roles, "mlp", "out", "kernel")]
        assert (down.reduction, down.output) == ((shift,), (shift + 1,))
    assert set(roles.roles.values()) <= {"matrix", "vocab", "router", "vector"}


def _optimizer(name, *extra):
    return load_config("tiny", [f"optimizer.name={name}", "optimizer.warmup_steps=0",
                                "optimizer.schedule=constant", "optimizer.lr=1.0",
                                "optimizer.weight_decay=0", "optimizer.clip_norm=0",
                                *extra]).optimizer


# A scanned query kernel (layers, embed, heads, head_dim), an output kernel (heads,
# head_dim, embed) and a norm scale.
NAMES = {("q",): ("layers", "embed", "heads", "head_dim"),
         ("o",): ("heads", "head_dim", "embed"), ("scale",): ("layers", "embed")}
SHAPES = {("q",): (2, 8, 2, 3), ("o",): (2, 5, 8), ("scale",): (2, 8)}


def _grads(steps, seed=0):
    rng = np.random.default_rng(seed)
    return [{p[0]: jnp.asarray(rng.normal(size=s), jnp.float32) for p, s in SHAPES.items()}
            for _ in range(steps)]


def _run(tx, grads):
    params = {p[0]: jnp.zeros(s) for p, s in SHAPES.items()}
    state = tx.init(params)
    out = []
    for g in grads:
        u, state = jax.jit(tx.update)(g, state, params)
        out.append(u)
    return out, state


@pytest.mark.parametrize("rms", [0.2, 0.0])
def test_muon_orthogonalises_each_matrix_slice_as_optax_does_a_2d_matrix(rms):
    """Our Muon on stacked, 3-D and 4-D kernels equals optax's Muon on each slice seen as
    its (reduction, output) matrix, with AdamW's RMS or modded-nanogpt's width scale;
    the norm scale gets Adam, as AdamW would."""
    roles = ParamRoles.from_names(NAMES, SHAPES)
    grads = _grads(3)
    cfg = _optimizer("muon", f"optimizer.muon.consistent_rms={rms}")
    ours, state = _run(make_optimizer(cfg, 10, roles), grads)
    slices = lambda g: {f"q{i}": g["q"][i].reshape(8, 6) for i in range(2)} | {
        "o": g["o"].reshape(10, 8)}
    ref = optax.contrib.muon(1.0, beta=0.95, nesterov=True, consistent_rms=rms or None)
    zeros = slices({k: jnp.zeros(s) for (k,), s in SHAPES.items()})
    ref_state = ref.init(zeros)
    adam = optax.adamw(1.0, b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.0)
    adam_state = adam.init(jnp.zeros((2, 8)))
    for g, u in zip(grads, ours):
        expect, ref_state = ref.update(slices(g), ref_state, zeros)
        for i in range(2):
            np.testing.assert_allclose(u["q"][i].reshape(8, 6), expect[f"q{i}"], atol=2e-5)
        np.testing.assert_allclose(u["o"].reshape(10, 8), expect["o"], atol=2e-5)
        scale, adam_state = adam.update(g["scale"], adam_state, jnp.zeros((2, 8)))
        np.testing.assert_allclose(u["scale"], scale, atol=1e-6)
    error = float(optax.tree.get(state, "orthogonality_error"))
    assert 0.0 < error < 0.5  # the quintic's singular values lie near, not at, 1


def _adam_normalised(x, m, v, t, b1, b2, eps):
    m, v = b1 * m + (1 - b1) * x, b2 * v + (1 - b2) * x * x
    return (m / (1 - b1 ** t)) / (np.sqrt(v / (1 - b2 ** t)) + eps), m, v


def _slices(g):
    """Each matrix slice of the test parameters with its smaller side first."""
    return [np.asarray(g["q"][i].reshape(8, 6)).T for i in range(2)] + [
        np.asarray(g["o"].reshape(10, 8)).T]


def _check(u, expect, **tol):
    """`u` (the parameters' updates at learning rate 1) against the descent directions
    of each oriented slice."""
    for i in range(2):
        np.testing.assert_allclose(u["q"][i].reshape(8, 6), -expect[i].T, **tol)
    np.testing.assert_allclose(u["o"].reshape(10, 8), -expect[2].T, **tol)


def test_galore_equals_a_per_slice_reference_across_a_refresh():
    """Top-r singular vectors of the gradient, refreshed every 2 steps; Adam on the
    projection; `scale` times the projection back. A (10 x 8) output kernel is seen as
    its transpose (smaller side first)."""
    cfg = _optimizer("galore", "optimizer.galore.rank=3", "optimizer.galore.refresh=2")
    roles = ParamRoles.from_names(NAMES, SHAPES)
    grads = _grads(3, seed=1)
    ours, state = _run(make_optimizer(cfg, 10, roles), grads)
    own = cfg.galore
    m, v = ([np.zeros((3, s.shape[1])) for s in _slices(grads[0])] for _ in range(2))
    projectors = None
    for t, (g, u) in enumerate(zip(grads, ours), start=1):
        slices = _slices(g)
        if t % 2 == 1:
            projectors = [np.asarray(jnp.linalg.svd(jnp.asarray(s), full_matrices=False)[0]
                                     [:, :3]) for s in slices]
        out = []
        for i, (s, p) in enumerate(zip(slices, projectors)):
            n, m[i], v[i] = _adam_normalised(p.T @ s, m[i], v[i], t, own.b1, own.b2, own.eps)
            out.append(own.scale * p @ n)
        _check(u, out, atol=2e-5)
    assert float(optax.tree.get(state, "projection_age")) == 0.0  # step 3 refreshed


@pytest.mark.parametrize("name", ["apollo", "apollo_mini"])
def test_apollo_scales_the_raw_gradient_as_a_per_slice_reference(name):
    """Adam on a random projection (redrawn every 2 steps) gives per-channel (Mini: one
    per matrix) scales of the raw gradient; the update's norm grows at most 1.01x a
    step."""
    rank = 3 if name == "apollo" else 1
    cfg = _optimizer(name, f"optimizer.{name}.rank={rank}", f"optimizer.{name}.refresh=2")
    roles = ParamRoles.from_names(NAMES, SHAPES)
    grads = _grads(4, seed=2)
    grads = [jax.tree.map(lambda x, t=t: x * (1 + t), g) for t, g in enumerate(grads)]
    ours, state = _run(make_optimizer(cfg, 10, roles), grads)
    own = getattr(cfg, name)
    index = list(roles.matrices).index
    m, v = ([np.zeros((rank, s.shape[1])) for s in _slices(grads[0])] for _ in range(2))
    last, hits = [0.0] * 3, []
    for t, (g, u) in enumerate(zip(grads, ours), start=1):
        slices = _slices(g)
        period = (t - 1) // 2
        projectors = [np.asarray(apollo_projector(own.seed, period, index(("q",)),
                                                  (2, 6, rank)))[i] for i in range(2)]
        projectors.append(np.asarray(apollo_projector(own.seed, period, index(("o",)),
                                                      (1, 8, rank)))[0])
        out = []
        for i, (s, p) in enumerate(zip(slices, projectors)):
            low = p.T @ s
            n, m[i], v[i] = _adam_normalised(low, m[i], v[i], t, own.b1, own.b2, own.eps)
            axis = 0 if name == "apollo" else None
            ratio = np.linalg.norm(n, axis=axis) / (np.linalg.norm(low, axis=axis) + 1e-8)
            x = s * ratio
            norm = np.linalg.norm(x)
            hits.append(bool(last[i] and norm > own.growth_limit * last[i]))
            if hits[-1]:
                x, norm = x * own.growth_limit * last[i] / norm, own.growth_limit * last[i]
            last[i] = norm
            out.append(own.scale * x)
        _check(u, out, rtol=2e-4, atol=1e-6)
    print(hits)
    assert any(hits)  # the limiter was exercised
    # Its fraction of slices hit, logged for the last step (slices in parameter order).
    assert float(optax.tree.get(state, "limited")) == pytest.approx(np.mean(hits[-3:]))


@pytest.mark.parametrize("name", ["muon", "galore"])
def test_a_step_under_fsdp_with_the_state_sharded(small_config, name):
    """Muon's momentum shards like its parameter; GaLore's projected moments and
    projectors (another shape) are replicated; a step (GaLore's first: an SVD) runs
    under data=2 x fsdp=4 and updates every matrix."""
    from conftest import fast_compiled, fast_state, random_batch

    from efflm import mesh as mesh_lib

    extra = ["optimizer.galore.rank=8"] if name == "galore" else []
    program = build_program(small_config(f"optimizer.name={name}", *extra, "mesh.data=2",
                                         "mesh.fsdp=4", "optimizer.warmup_steps=0"))
    with program.context():
        shapes = jax.eval_shape(program.init, jax.random.key(0)).opt_state
    matrices = [any(a is not None for a in s.spec) for x, s in zip(
        jax.tree.leaves(shapes), jax.tree.leaves(program.state_shardings.opt_state))
        if x.ndim >= 2]
    assert any(matrices) and all(matrices) == (name == "muon")
    batch = mesh_lib.global_batch(random_batch(program.cfg), program.mesh)
    with program.context():
        state = fast_state(program)
        before = jax.tree.map(np.asarray, state.params)
        new, metrics = fast_compiled(program.train_step, state, batch)(state, batch)
    assert np.isfinite(float(metrics["loss"]))
    moved = jax.tree.map(lambda a, b: bool(np.any(a != np.asarray(b))), before, new.params)
    assert all(jax.tree.leaves(moved))


@pytest.mark.parametrize("name", ["apollo"])
def test_bitwise_resume_under_fsdp_and_the_logged_scalars(tmp_path, name):
    """Under data=2 x fsdp=4: 2 steps, then a resume to 4, log what 4 at once logs, the
    projections' age included (made at steps 1 and 4)."""
    import json
    import os

    from efflm.train.trainer import train

    def run(workdir, steps):
        train(load_config("tiny", [
            *SMALL, f"optimizer.name={name}", f"optimizer.{name}.rank=8",
            f"optimizer.{name}.refresh=3", "optimizer.schedule=constant",
            "optimizer.warmup_steps=0", "logging.every=1", "train.eval_every=0",
            "checkpoint.every=2", "mesh.data=2", "mesh.fsdp=4", f"train.steps={steps}",
            f"train.workdir={workdir}"]))
        with open(os.path.join(workdir, "metrics.jsonl")) as f:
            return [json.loads(line) for line in f]

    straight = run(str(tmp_path / "a"), 4)
    run(str(tmp_path / "b"), 2)
    resumed = run(str(tmp_path / "b"), 4)
    keys = ("loss", "grad_norm", "optimizer/projection_age",
            *(["optimizer/limited"] if name == "apollo" else []))
    assert [[r[k] for k in keys] for r in resumed] == [[r[k] for k in keys] for r in straight]
    assert [r["optimizer/projection_age"] for r in straight] == [0.0, 1.0, 2.0, 0.0]


def test_bad_optimizer_input_is_one_line_exit_2_and_writes_nothing(tmp_path, capsys):
    from efflm.cli import main

    workdir = tmp_path / "run"
    for args, words in (
            (["optimizer.name=muon", "optimizer.adamw.b2=0.9"],
             "optimizer.adamw.b2 applies to optimizer.name=adamw; this config uses "
             "optimizer.name=muon"),
            (["optimizer.name=galore", "optimizer.galore.rank=65"],
             "optimizer.galore.rank=65 is larger than every weight matrix's smaller side "
             "(the largest is 64)"),
            (["optimizer.name=apollo", "optimizer.apollo.growth_limit=0.5"],
             "optimizer.apollo.growth_limit must be 0 (none) or >= 1")):
        assert main(["train", "--config", "tiny", *SMALL, *args, f"train.workdir={workdir}",
                     "train.fresh=true"]) == 2
        err = capsys.readouterr().err
        assert words in err and err.count("\n") == 1, err
        assert not workdir.exists()


def test_resume_refuses_a_changed_projection_rank():
    from efflm.train.trainer import optimizer_differences

    old = load_config("tiny", ["optimizer.name=galore", "optimizer.galore.rank=64"])
    new = load_config("tiny", ["optimizer.name=galore", "optimizer.galore.rank=32",
                               "optimizer.galore.scale=0.5"])
    assert optimizer_differences(old, new) == [("optimizer.galore.rank", 64, 32)]
