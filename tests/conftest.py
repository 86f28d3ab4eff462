import os
import re
import warnings

# Eight host devices for the sharding tests; must be set before JAX is imported. Any
# earlier device count is replaced, not repeated: pytest-xdist workers inherit the
# controller's environment, and JAX's cache keys hash XLA_FLAGS, so a repeated flag
# would give the workers other keys than a plain `pytest` run.
_FLAGS = re.sub(r"--xla_force_host_platform_device_count=\S*", "",
                os.environ.get("XLA_FLAGS", ""))
os.environ["XLA_FLAGS"] = " ".join([*_FLAGS.split(), "--xla_force_host_platform_device_count=8"])
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from efflm.config import load_config  # noqa: E402

# Many tests compile the same small programs: share compilations between them (and
# with the subprocesses they start) through JAX's persistent cache. The xdist workers
# share it too: they inherit JAX_COMPILATION_CACHE_DIR, an absolute path, from the
# controller. Sharing is safe: an entry is written once (an existing key is never
# rewritten), and an entry read while another process is still writing it fails to
# decompress, which JAX reports as a warning before compiling the program itself.
_CACHE = os.path.join(os.path.dirname(__file__), "..", ".pytest_cache", "jax")
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.abspath(_CACHE))
jax.config.update("jax_compilation_cache_dir", os.environ["JAX_COMPILATION_CACHE_DIR"])
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)

# Small shapes that keep each compiled step well under a second on 2 cores.
SMALL = [
    "model.d_model=64", "model.num_layers=2", "model.attention.num_heads=4",
    "model.mlp.d_ff=128", "model.max_seq_len=64", "data.seq_len=32", "train.batch_size=8",
    "train.eval_batches=2", "logging.progress=false", "logging.tensorboard=false",
    "checkpoint.async_save=false",
]


@pytest.fixture
def small_config():
    """A factory: the tiny preset at test shapes, plus overrides."""

    def make(*overrides, preset="tiny"):
        return load_config(preset, [*SMALL, *overrides])

    return make


# pytest-xdist groups (`--dist loadgroup`: a group's tests all run on one worker). The
# multi-host tests start two training processes each, so one such test at a time: the
# tests marked `multihost`, and every test of these files.
_MULTIHOST_FILES = ("test_distributed.py",)
# A fixture of these scopes is built once per file (class) on each worker that uses it.
_SHARED_SCOPES = ("module", "class")


def _xdist_group(item) -> str | None:
    """The group of `item`: "multihost" for the multi-host tests, its file's path when it
    uses a fixture built once per file, else None (any worker)."""
    if item.get_closest_marker("multihost") or item.path.name in _MULTIHOST_FILES:
        return "multihost"
    info = getattr(item, "_fixtureinfo", None)  # pytest's resolved fixtures of the test
    if info is None:
        return None
    for name in info.names_closure:
        defs = info.name2fixturedefs.get(name)
        if defs and defs[-1].scope in _SHARED_SCOPES:
            return item.nodeid.split("::")[0]  # its file, e.g. tests/train/test_trainer.py
    return None


# tryfirst: xdist reads the groups in its own hook of this name, which runs before a
# conftest's unless told otherwise.
@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items):
    has_gpu = any(d.platform == "gpu" for d in jax.devices()) if os.environ.get(
        "JAX_PLATFORMS") != "cpu" else False
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    grouping = config.pluginmanager.hasplugin("xdist")  # not needed on GPU machines
    for item in items:
        if "gpu" in item.keywords and not has_gpu:
            item.add_marker(skip)
        if grouping and item.get_closest_marker("xdist_group") is None:
            group = _xdist_group(item)
            if group is not None:
                item.add_marker(pytest.mark.xdist_group(name=group))


def pytest_collection_finish(session):
    """On an xdist worker under `--dist loadgroup`: warn if xdist did not take the groups
    (it appends `@group` to the node ids; some pytest versions drop that silently)."""
    config = session.config
    if not (hasattr(config, "workerinput") and config.getvalue("loadgroup")):
        return
    lost = [item.nodeid for item in session.items if item.get_closest_marker("xdist_group")
            and item.nodeid.rfind("@") <= item.nodeid.rfind("]")]  # xdist's own test
    if lost:
        warnings.warn(f"--dist loadgroup ignored the xdist groups of {len(lost)} collected "
                      f"tests (e.g. {lost[0]}): pytest {pytest.__version__} does not work with "
                      "this pytest-xdist; install the versions pyproject.toml's test extra allows",
                      stacklevel=1)


# Programs the tests run a few times at small shapes compile without backend
# optimisation: about half the compile time.
FAST_COMPILE = {"xla_backend_optimization_level": 0}


def fast_jit(fn, **kwargs):
    """`jax.jit(fn)` compiled with FAST_COMPILE."""
    return jax.jit(fn, compiler_options=FAST_COMPILE, **kwargs)


def fast_compiled(fn, *args):
    """The jitted `fn` lowered for `args` and compiled with FAST_COMPILE (call it under
    the program's context for a Program's steps)."""
    return fn.lower(*args).compile(compiler_options=FAST_COMPILE)


def fast_state(program, seed=0):
    """`program.init(jax.random.key(seed))`, compiled with FAST_COMPILE."""
    key = jax.random.key(seed)
    return fast_compiled(program.init, key)(key)


def fast_init(module, *args, seed=0):
    """`module.init(jax.random.key(seed), *args)` compiled with FAST_COMPILE: run
    eagerly, initialisation dispatches each op on its own (seconds for a routed layer)."""
    return fast_jit(module.init)(jax.random.key(seed), *args)


def cached_and_full_logits(model, variables, b=2, t=24, prefill=11):
    """Logits of random tokens through the decoding cache (a prefill, then one token at a
    time) and from one forward pass over the whole sequence."""
    import jax.numpy as jnp

    from efflm.train.generate import init_cache

    tokens = jax.random.randint(jax.random.key(1), (b, t), 0, 256)
    positions = jnp.broadcast_to(jnp.arange(t), (b, t))
    full = fast_jit(model.apply)(variables, tokens)
    cache = init_cache(model, variables, b, model.cfg.max_seq_len)
    assert not any(x.any() for x in jax.tree.leaves(cache))
    run = fast_jit(lambda cache, x, pos: model.apply({**variables, "cache": cache}, x, pos,
                                                     mutable=["cache"]))
    logits, mutated = run(cache, tokens[:, :prefill], positions[:, :prefill])
    got = [logits]
    for i in range(prefill, t):
        logits, mutated = run(mutated["cache"], tokens[:, i:i + 1], positions[:, i:i + 1])
        got.append(logits)
    return jnp.concatenate(got, axis=1), full


def packed_batch_losses(cfg, steps=5):
    """Train losses of `steps` steps of `cfg` on one device, on one fixed random batch of
    two packed documents (and 3 padding tokens) per row (init and step compiled with
    FAST_COMPILE)."""
    from efflm import mesh as mesh_lib
    from efflm.train.step import build_program

    b, t = cfg.train.batch_size, cfg.data.seq_len
    rng = np.random.default_rng(0)
    seg = np.ones((b, t), np.int32)
    seg[:, t // 2:] = 2
    seg[:, t - 3:] = 0
    batch = {"inputs": rng.integers(0, 256, (b, t)).astype(np.int32),
             "targets": rng.integers(0, 256, (b, t)).astype(np.int32),
             "segment_ids": seg,
             "positions": np.tile(np.arange(t, dtype=np.int32), (b, 1))}
    mesh = mesh_lib.make_mesh(cfg.mesh, jax.devices()[:1])
    program = build_program(cfg, mesh)
    with program.context():
        state = fast_state(program)
        batch = mesh_lib.global_batch(batch, mesh)
        step = fast_compiled(program.train_step, state, batch)
        losses = []
        for _ in range(steps):
            state, metrics = step(state, batch)
            losses.append(float(metrics["loss"]))
    return losses


def traced_forward_flops(cfg, length=40, batch=2):
    """Matmul FLOPs that one forward pass of `LM(cfg)` (the ModelConfig) traces to on a
    (batch, length) batch, its model state (e.g. router biases) included."""
    import flax.linen as nn
    import jax.numpy as jnp

    from efflm.flops import traced_matmul_flops
    from efflm.layers.common import LOSSES, STATE_COLLECTIONS, STATS
    from efflm.models import LM

    model = LM(cfg)
    tokens = jnp.zeros((batch, length), jnp.int32)
    variables = nn.unbox(jax.eval_shape(model.init, jax.random.key(0), tokens))
    state = {c: variables[c] for c in STATE_COLLECTIONS if c in variables}
    return traced_matmul_flops(lambda p, s, x: model.apply(
        {"params": p, **s}, x, mutable=[LOSSES, STATS])[0], variables["params"], state, tokens)


def traced_and_analytic_flops(cfg, length=40):
    """Forward matmul FLOPs of `LM(cfg)` on a (2, length) batch, traced, and the analytic
    count for it (`forward_flops_per_token`, plus each softmax layer's full masked
    softmax: twice the causal half it is credited with)."""
    from efflm.flops import forward_flops_per_token
    from efflm.layers.attention.softmax import causal_mix_flops
    from efflm.layers.plan import layer_plan

    traced = traced_forward_flops(cfg, length)
    softmax_layers = sum(spec.mixer == "softmax" for spec in layer_plan(cfg))
    expected = (forward_flops_per_token(cfg, length)
                + softmax_layers * causal_mix_flops(cfg, length))
    return traced, expected * 2 * length


def two_segment_inputs(cfg, seed=0):
    """(tokens, positions, segment ids) of 2 random rows of data.seq_len tokens, each row
    two packed documents."""
    rng = np.random.default_rng(seed)
    b, t = 2, cfg.data.seq_len
    tokens = rng.integers(0, 256, (b, t)).astype(np.int32)
    seg = np.ones((b, t), np.int32)
    seg[:, t // 2:] = 2
    pos = np.concatenate([np.arange(t // 2), np.arange(t - t // 2)])[None].repeat(b, 0)
    return tokens, pos.astype(np.int32), seg


def random_batch(cfg):
    """A training batch of random tokens of `cfg`'s shape, every row one document."""
    rng = np.random.default_rng(0)
    b, t = cfg.train.batch_size, cfg.data.seq_len
    return {"inputs": rng.integers(0, 256, (b, t)).astype(np.int32),
            "targets": rng.integers(0, 256, (b, t)).astype(np.int32),
            "segment_ids": np.ones((b, t), np.int32),
            "positions": np.tile(np.arange(t, dtype=np.int32), (b, 1))}


# Row 0: three documents, the last cut by padding; row 1: one. 37: no block multiple.
SPARSE_SEGMENTS = np.asarray([[1] * 15 + [2] * 4 + [3] * 15 + [0] * 3, [1] * 37])


def attention_against_reference(path, reference, dtype, tol):
    """Values and gradients (q, k, v) of an attention function `path(q, k, v, segments)`
    against `reference(q, k, v, segments)` over SPARSE_SEGMENTS (2 rows of 37 tokens, 4
    query heads sharing 2 K/V heads of 8 dims); the padding's own rows are left out."""
    import jax.numpy as jnp

    rng = np.random.default_rng(0)
    q = jnp.asarray(rng.normal(size=(2, 37, 4, 8)), dtype)
    k, v = (jnp.asarray(rng.normal(size=(2, 37, 2, 8)), dtype) for _ in "kv")
    w = jnp.asarray(rng.normal(size=q.shape), jnp.float32)
    seg = jnp.asarray(SPARSE_SEGMENTS)
    real = (SPARSE_SEGMENTS > 0)[..., None, None]

    def run(f):
        def loss(q, k, v):
            out = f(q, k, v, seg)
            return jnp.sum(out.astype(jnp.float32) * w), out
        (_, out), grads = jax.jit(jax.value_and_grad(loss, (0, 1, 2), has_aux=True))(q, k, v)
        return [np.asarray(a, np.float32) for a in (out, *grads)]

    for x, y in zip(run(path), run(reference), strict=True):
        np.testing.assert_allclose(x * real, y * real, rtol=tol, atol=tol * np.abs(y).max())
