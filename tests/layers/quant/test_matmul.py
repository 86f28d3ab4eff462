"""Low-precision layers: the int8 and ternary formats, N:M sparsity with SR-STE, the hook
that routes every targeted matmul through them (and fp8, `test_fp8.py`), training in
each, and their config errors."""


import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import FAST_COMPILE, random_batch

from efflm import mesh as mesh_lib
from efflm.cli import main
from efflm.config import load_config
from efflm.layers.quant import QUANT
from efflm.layers.quant import int8 as int8_lib
from efflm.layers.quant import ternary as ternary_lib
from efflm.layers.quant.matmul import quantized_matmul, reference_matmul
from efflm.layers.quant.nm import nm_mask, sr_ste, sr_ste_reference
from efflm.models import LM
from efflm.train.step import build_program

FORMATS = ["int8", "ternary"]


def _rand(shape, seed=0, scale=1.0):
    return jnp.asarray(np.random.default_rng(seed).normal(size=shape) * scale, jnp.float32)


def test_int8_round_trip_within_half_a_step():
    x = _rand((16, 48), scale=3.0)
    for axis in (0, -1):
        q, scale = int8_lib.quantize(x, axis)
        assert q.dtype == jnp.int8 and int(jnp.max(jnp.abs(q.astype(jnp.int32)))) == 127
        err = jnp.abs(int8_lib.dequantize(q, scale) - x)
        assert bool(jnp.all(err <= scale / 2 * (1 + 1e-6)))


def test_ternary_round_trip_within_its_bound():
    w = _rand((32, 24), seed=1)
    q, scale = ternary_lib.Ternary.quantize_weight(w)
    assert set(np.unique(np.asarray(q)).tolist()) == {-1, 0, 1}
    np.testing.assert_allclose(float(scale[0, 0]), float(jnp.mean(jnp.abs(w))), rtol=1e-5)
    err = jnp.abs(q.astype(jnp.float32) * scale - w)
    # Inside [-1.5, 1.5] scales rounding is off by at most half a step; beyond, the
    # clip leaves |w| - scale.
    bound = jnp.maximum(scale / 2, jnp.abs(w) - scale) * (1 + 1e-6)
    assert bool(jnp.all(err <= bound))
    assert bool(jnp.any(jnp.abs(w) > 1.5 * scale))  # the clipped case is exercised


def test_out_of_range_saturates_symmetrically_and_nan_is_not_hidden():
    x = jnp.asarray([[-1e38, -300.0, -127.6, 0.0, 126.4, 300.0, 3e38]], jnp.float32)
    q = int8_lib.quantize_with_scale(x, jnp.float32(1.0))
    assert q.tolist() == [[-127, -127, -127, 0, 126, 127, 127]]  # never -128
    for name in FORMATS:
        fmt = QUANT[name]
        big = jnp.asarray([[3e38, -3e38, 1.0, 0.0]], jnp.float32)
        y = quantized_matmul(fmt, big, _rand((4, 3)))
        assert not bool(jnp.any(jnp.isnan(y)))
        zero = quantized_matmul(fmt, jnp.zeros((2, 4)), jnp.zeros((4, 3)))
        assert not bool(jnp.any(jnp.isnan(zero))) and float(jnp.max(jnp.abs(zero))) == 0
        # A NaN input must give NaN, not a silent zero from the int8 cast.
        nan = quantized_matmul(fmt, big.at[0, 2].set(jnp.nan), _rand((4, 3)))
        assert bool(jnp.all(jnp.isnan(nan)))
        nan_w = quantized_matmul(fmt, _rand((2, 4)), _rand((4, 3)).at[1, 1].set(jnp.nan))
        assert bool(jnp.any(jnp.isnan(nan_w)))


@pytest.mark.parametrize("name", FORMATS)
def test_int_matmul_matches_reference_values_and_gradients(name):
    fmt = QUANT[name]
    x, w, g = _rand((10, 32), 2), _rand((32, 12), 3, 0.1), _rand((10, 12), 4)
    np.testing.assert_allclose(quantized_matmul(fmt, x, w), reference_matmul(fmt, x, w),
                               rtol=1e-5, atol=1e-5)
    fast = jax.grad(lambda x, w: jnp.sum(g * quantized_matmul(fmt, x, w)), (0, 1))(x, w)
    ref = jax.grad(lambda x, w: jnp.sum(g * reference_matmul(fmt, x, w)), (0, 1))(x, w)
    for a, b in zip(fast, ref):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", FORMATS)
def test_straight_through_gradients_equal_the_analytic_ones(name):
    # d/dx sum(g * Q(x) Q(w)) = g Q(w)^T and d/dw = Q(x)^T g: the quantisers pass the
    # gradient straight through.
    fmt = QUANT[name]
    x = jnp.asarray([[0.5, -1.0], [2.0, 0.25]], jnp.float32)
    w = jnp.asarray([[1.0, -0.2, 0.0], [0.3, 0.9, -1.2]], jnp.float32)
    g = jnp.asarray([[1.0, 2.0, -1.0], [0.5, 0.0, 3.0]], jnp.float32)
    xq, sx = fmt.quantize_activation(x)
    wq, sw = fmt.quantize_weight(w)
    xd, wd = np.asarray(xq * sx, np.float64), np.asarray(wq * sw, np.float64)
    gx, gw = jax.grad(lambda x, w: jnp.sum(g * quantized_matmul(fmt, x, w)), (0, 1))(x, w)
    np.testing.assert_allclose(gx, np.asarray(g) @ wd.T, rtol=1e-6)
    np.testing.assert_allclose(gw, xd.T @ np.asarray(g), rtol=1e-6)
    if name == "ternary":  # w / mean|w| rounds to these values
        assert wq.tolist() == [[1, 0, 0], [0, 1, -1]]


@pytest.mark.parametrize("n,m", [(2, 4), (1, 4), (3, 8)])
def test_nm_mask_keeps_exactly_n_largest_of_every_m(n, m):
    w = _rand((4 * m, 6), 5)
    w = w.at[0:m, 0].set(1.0)  # ties: still exactly n
    mask = np.asarray(nm_mask(w, n, m)).reshape(4, m, 6)
    assert (mask.sum(axis=1) == n).all()
    mag = np.abs(np.asarray(w)).reshape(4, m, 6)
    kept_min = np.where(mask, mag, np.inf).min(axis=1)
    dropped_max = np.where(mask, -np.inf, mag).max(axis=1)
    assert (kept_min >= dropped_max).all()


def test_sr_ste_gradient_adds_the_decay_on_pruned_weights():
    w, g = _rand((8, 3), 6), _rand((8, 3), 7)
    mask = nm_mask(w, 2, 4)
    decay = 0.3
    grad = jax.grad(lambda w: jnp.sum(g * sr_ste(w, mask, decay)))(w)
    np.testing.assert_allclose(grad, g + decay * jnp.where(mask, 0, w), rtol=1e-6)

    def ref_loss(w):
        masked, penalty = sr_ste_reference(w, mask, decay)
        return jnp.sum(g * masked) + penalty

    np.testing.assert_allclose(grad, jax.grad(ref_loss)(w), rtol=1e-6)
    np.testing.assert_array_equal(sr_ste(w, mask, decay), jnp.where(mask, w, 0))



def _fast(jitted, *args):
    """`jitted` compiled for `args` without backend optimisation."""
    return jitted.lower(*args).compile(compiler_options=FAST_COMPILE)


def _train(cfg, devices, steps=6):
    mesh = mesh_lib.make_mesh(cfg.mesh, devices)
    program = build_program(cfg, mesh)
    # The same batch every step: the loss must fall.
    batch = mesh_lib.global_batch(random_batch(cfg), mesh)
    losses, stats = [], []
    with program.context():
        key = jax.random.key(0)
        state = _fast(program.init, key)(key)
        train_step = _fast(program.train_step, state, batch)
        for _ in range(steps):
            state, m = train_step(state, batch)
            losses.append(float(m["loss"]))
            stats.append(jax.device_get(m["stats"]))
    return np.array(losses), stats, program, state


TRAIN = ("optimizer.warmup_steps=0", "optimizer.lr=3e-3", "model.tie_embeddings=false",
         "model.quant.targets=[attention,mlp,head]")


KINDS = [["model.quant.kind=int8"], ["model.quant.kind=ternary"],
         ["model.sparsity.nm=2:4"], ["model.quant.kind=fp8"],  # fp8: delayed scaling
         ["model.quant.kind=mxfp4"], ["model.quant.kind=qat", "model.quant.qat.group_size=32"]]
IDS = ["int8", "ternary", "2:4", "fp8", "mxfp4", "qat"]


@pytest.mark.parametrize("kind, devices, mesh", [
    pytest.param(k, n, mesh, id=f"{i}-{name}") for k, i in zip(KINDS, IDS)
    for n, mesh, name in ((1, [], "one_device"), (8, ["mesh.data=1", "mesh.fsdp=8"], "fsdp8"))
    if n == 1 or i not in ("mxfp4", "qat")])  # the formats' own matmuls: one device
def test_each_kind_trains_with_finite_falling_loss(small_config, kind, devices, mesh):
    cfg = small_config(*TRAIN, *kind, *mesh)
    losses, stats, program, state = _train(cfg, jax.devices()[:devices])
    assert np.isfinite(losses).all(), losses
    assert losses[-1] < losses[0] - 0.05, losses
    assert state.params["head"].dtype == jnp.float32  # latent weights stay float32
    if "nm" in kind[0]:
        flips = [float(np.asarray(s["nm_flip_rate"]).ravel()[0]) for s in stats]
        assert all(0.0 <= f <= 1.0 for f in flips) and max(flips) > 0, flips
        masks = jax.tree.leaves(state.model_state["state"])
        assert masks and all(float(np.mean(np.asarray(mk))) == 0.5 for mk in masks)


def test_the_hook_changes_every_target_and_only_them(small_config):
    """Quantising one target changes the logits; the fused (xla) loss agrees with the
    naive one, so the head is quantised on both paths."""
    base = small_config("model.tie_embeddings=false")
    program = build_program(base)
    batch = random_batch(base)
    key = jax.random.key(0)
    with program.context():
        state = _fast(program.init, key)(key)
    variables = state.variables()

    def logits(*overrides):
        cfg = small_config("model.tie_embeddings=false", *overrides)
        apply = program.model.clone(cfg=cfg.model).apply
        return jax.jit(apply, compiler_options=FAST_COMPILE)(variables, batch["inputs"])

    def loss_sum(*overrides):
        p = build_program(small_config("model.tie_embeddings=false", *overrides))
        with p.context():
            forward = jax.jit(p.forward, compiler_options=FAST_COMPILE)
            return float(forward(state.params, state.model_state, batch)[0])

    plain = logits()
    for target in ("attention", "mlp", "head"):
        q = logits("model.quant.kind=int8", f"model.quant.targets=[{target}]")
        assert float(jnp.max(jnp.abs(q - plain))) > 1e-5, target
    plain_sum = loss_sum()
    for kind in ("int8", "ternary"):
        sums = [loss_sum(f"model.quant.kind={kind}", "model.quant.targets=[head]",
                         f"train.loss_impl={impl}") for impl in ("naive", "xla")]
        gap = abs(sums[0] - sums[1])
        assert gap < 1e-5 * abs(sums[0]) and abs(sums[0] - plain_sum) > 100 * gap, (
            sums, plain_sum)


@pytest.mark.parametrize("override,words", [
    ("model.quant.kind=int4", "model.quant.kind"),
    ("model.quant.targets=[attention,embedding]", "model.quant.targets"),
    ("model.sparsity.nm=4:2", "0 < N < M"),
    ("model.sparsity.nm=2:3", "does not divide"),
    ("model.sparsity.nm=two", "N:M"),
    ("model.quant.kind=fp8 model.quant.fp8.history=0", "model.quant.fp8.history must be"),
    ("model.quant.kind=fp8 model.quant.fp8.scaling=dynamic", "model.quant.fp8.scaling"),
])
def test_bad_quant_settings_are_one_line_exit_2(override, words, capsys):
    assert main(["train", "--config", "tiny", *override.split(), "train.steps=1"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and words in err, err


def test_a_target_that_matches_no_layer_is_an_error(capsys):
    args = ["train", "--config", "tiny", "model.mlp.kind=moe", "model.quant.kind=int8",
            "model.quant.targets=[mlp]", "train.steps=1"]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "matches no layer" in err, err
    # The same model may quantise its attention.
    assert main(["config", "show", "--config", "tiny", "model.mlp.kind=moe",
                 "model.quant.kind=int8", "model.quant.targets=[attention]"]) == 0


def test_nm_override_is_read_as_text(small_config):
    # YAML 1.1 would read an unquoted 2:4 as the base-60 integer 124.
    cfg = small_config("model.quant.kind=ternary", "model.sparsity.nm=2:4")
    assert cfg.model.sparsity.nm == "2:4"
    assert cfg.model.quant.targets == ["attention", "mlp", "experts"]


@pytest.mark.parametrize("kind", [k + ["model.quant.mxfp4.forward=rtn"] if "mxfp4" in k[0]
                                  else k for k in KINDS], ids=IDS)
def test_flops_are_the_same_matmul_counts(small_config, kind):
    """A quantised or sparse matmul counts as the float one, in the accounting (MFU)
    and in the traced forward pass (mxfp4's QuEST transform, matmuls by a Hadamard
    matrix, is work the accounting does not credit: with forward=rtn there is none)."""
    from efflm.flops import forward_flops_per_token, traced_matmul_flops

    def forward_flops(cfg):
        model = LM(cfg.model)
        tokens = jnp.asarray(random_batch(cfg)["inputs"][:2])
        variables = jax.eval_shape(model.init, jax.random.key(0), tokens)
        return traced_matmul_flops(lambda v, x: model.apply(v, x), variables, tokens)

    plain = small_config()
    cfg = small_config("model.quant.targets=[attention,mlp,head]", *kind)
    assert forward_flops(cfg) == forward_flops(plain) > 0
    t = cfg.data.seq_len
    assert forward_flops_per_token(cfg.model, t) == forward_flops_per_token(plain.model, t)
    if "mxfp4" in kind[0]:  # quest: 2 * 32 FLOPs per element of each operand, uncredited
        quest = small_config("model.quant.targets=[attention,mlp,head]", kind[0])
        assert forward_flops(quest) > forward_flops(plain)
        assert forward_flops_per_token(quest.model, t) == forward_flops_per_token(plain.model, t)


def test_a_yaml_preset_reads_a_quoted_nm(tmp_path):
    path = tmp_path / "sparse.yaml"
    path.write_text('extends: tiny\nmodel:\n  sparsity:\n    nm: "2:4"\n')
    assert load_config(str(path)).model.sparsity.nm == "2:4"
