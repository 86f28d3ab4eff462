import jax.numpy as jnp
import numpy as np
import pytest

from efflm.config import OptimizerConfig
from efflm.train.loss import cross_entropy
from efflm.train.optim import learning_rate_schedule


def test_cross_entropy_matches_naive_with_mask_and_z_loss():
    rng = np.random.default_rng(0)
    logits = rng.standard_normal((2, 5, 11)).astype(np.float32) * 3
    targets = rng.integers(0, 11, (2, 5))
    mask = np.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], bool)
    loss_sum, z_sum, count = cross_entropy(jnp.asarray(logits, jnp.bfloat16).astype(jnp.float32),
                                           jnp.asarray(targets), jnp.asarray(mask), 1e-2)
    lg = np.asarray(jnp.asarray(logits, jnp.bfloat16).astype(jnp.float32), np.float64)
    lse = np.log(np.exp(lg).sum(-1))
    nll = lse - np.take_along_axis(lg, targets[..., None], -1)[..., 0]
    assert count == 8
    assert loss_sum == pytest.approx((nll * mask).sum(), rel=1e-5)
    assert z_sum == pytest.approx(1e-2 * (lse**2 * mask).sum(), rel=1e-5)


@pytest.mark.parametrize("schedule", ["cosine", "linear", "constant"])
def test_schedule_warms_up_then_decays(schedule):
    cfg = OptimizerConfig(lr=1e-3, warmup_steps=30, schedule=schedule, min_lr_ratio=0.1)
    lr = learning_rate_schedule(cfg, 300)
    assert float(lr(0)) == 0.0
    assert float(lr(15)) == pytest.approx(5e-4)
    assert float(lr(30)) == pytest.approx(1e-3)
    end = {"cosine": 1e-4, "linear": 1e-4, "constant": 1e-3}[schedule]
    assert float(lr(300)) == pytest.approx(end, rel=1e-4)
    if schedule == "cosine":  # half-way through the decay: the mean of peak and floor
        assert float(lr(165)) == pytest.approx(5.5e-4, rel=1e-4)


@pytest.mark.parametrize("schedule", ["cosine", "linear"])
def test_schedule_has_its_own_length_and_then_holds(schedule):
    cfg = OptimizerConfig(lr=1e-3, warmup_steps=10, schedule=schedule, min_lr_ratio=0.1,
                          decay_steps=110)
    lr = learning_rate_schedule(cfg, 300)  # train.steps does not stretch it
    assert float(lr(10)) == pytest.approx(1e-3)
    assert float(lr(60)) == pytest.approx(5.5e-4, rel=1e-4)  # half-way in both shapes
    for step in (110, 200, 300, 10**6):
        assert float(lr(step)) == pytest.approx(1e-4, rel=1e-4)
    default = learning_rate_schedule(OptimizerConfig(schedule=schedule, warmup_steps=10), 110)
    assert float(default(60)) == pytest.approx(float(learning_rate_schedule(
        OptimizerConfig(schedule=schedule, warmup_steps=10, decay_steps=110), 999)(60)))


def _optimizer(name, *extra):
    from efflm.config import load_config

    return load_config("tiny", [f"optimizer.name={name}", "optimizer.warmup_steps=0",
                                "optimizer.schedule=constant", "optimizer.lr=0.02",
                                "optimizer.clip_norm=0", *extra]).optimizer


@pytest.mark.parametrize("name", ["adamw", "lion", "adafactor", "muon", "galore", "apollo",
                                  "apollo_mini"])
def test_each_optimizer_fits_a_least_squares_problem_with_its_state_size(name):
    """Loss falls; state per parameter as the method says: AdamW two moments, Lion one,
    Adafactor a row and a column statistic for a matrix (and a full one for a vector),
    Muon one for the matrix; GaLore two of rank x 512 and a 256 x rank projector,
    APOLLO two of rank x 512 and no projector, APOLLO-Mini two of 512 (the bias: AdamW)."""
    import jax
    import optax

    from efflm.train.optim import make_optimizer
    from efflm.train.roles import ParamRoles

    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(64, 256)), jnp.float32)
    target = x @ jnp.asarray(rng.normal(size=(256, 512)) / 16, jnp.float32)
    params = {"kernel": jnp.zeros((256, 512)), "bias": jnp.zeros((512,))}
    # Adafactor's default step is relative to |w|, which starts at 0 here.
    extra = {"adafactor": ["optimizer.adafactor.multiply_by_parameter_scale=false"],
             "galore": ["optimizer.galore.rank=32"],
             "apollo": ["optimizer.apollo.rank=32"]}.get(name, [])
    roles = ParamRoles.from_names({("kernel",): ("embed", "mlp"), ("bias",): ("mlp",)},
                                  {("kernel",): (256, 512), ("bias",): (512,)})
    tx = make_optimizer(_optimizer(name, *extra), 100, roles)

    def loss(p):
        return jnp.mean((x @ p["kernel"] + p["bias"] - target) ** 2)

    @jax.jit
    def step(p, s):
        g = jax.grad(loss)(p)
        u, s = tx.update(g, s, p)
        return optax.apply_updates(p, u), s

    state = tx.init(params)
    first = float(loss(params))
    for _ in range(30):
        params, state = step(params, state)
    assert float(loss(params)) < 0.5 * first, name
    floats = sum(a.size for a in jax.tree.leaves(state) if a.dtype == jnp.float32)
    size = 256 * 512 + 512
    # Adafactor: rows + columns for the kernel, a full moment for the bias, and optax's
    # one-element placeholders for the statistics each does not use.
    # Muon: its 3 Newton-Schulz coefficients and the logged error; the low-rank ones:
    # the two logged scalars, and APOLLO the last update norm.
    assert floats == {"adamw": 2 * size, "lion": size, "adafactor": 256 + 512 + 512 + 3,
                      "muon": 256 * 512 + 2 * 512 + 4,
                      "galore": 2 * 32 * 512 + 256 * 32 + 2 * 512 + 2,
                      "apollo": 2 * 32 * 512 + 1 + 2 * 512 + 2,
                      "apollo_mini": 2 * 512 + 1 + 2 * 512 + 2}[name]


def test_bad_optimizer_settings_are_one_line_exit_2(capsys):
    from efflm.cli import main

    for args, words in ((["optimizer.name=sgd"], "optimizer.name"),
                        (["optimizer.name=lion", "optimizer.lion.b2=1.5"],
                         "optimizer.lion.b2 must be in [0, 1)"),
                        (["optimizer.name=adafactor", "optimizer.adafactor.decay_rate=-1"],
                         "optimizer.adafactor.decay_rate")):
        assert main(["config", "show", "--config", "tiny", *args]) == 2
        err = capsys.readouterr().err
        assert words in err and err.count("\n") == 1, err


def test_adafactor_state_shards_under_fsdp(small_config):
    """Under mesh.fsdp=4 the factored statistics (another shape than their parameter)
    are replicated and the rest shard like their parameters; a step runs."""
    import jax
    from conftest import fast_compiled, fast_state, random_batch

    from efflm import mesh as mesh_lib
    from efflm.train.step import build_program

    cfg = small_config("optimizer.name=adafactor", "optimizer.adafactor.min_dim_size_to_factor=64",
                       "mesh.data=2", "mesh.fsdp=4")
    program = build_program(cfg)
    batch = mesh_lib.global_batch(random_batch(cfg), program.mesh)
    with program.context():
        state = fast_state(program)
        state, metrics = fast_compiled(program.train_step, state, batch)(state, batch)
    assert np.isfinite(float(metrics["loss"]))
    shards = [(x.shape, x.addressable_shards[0].data.shape)
              for x in jax.tree.leaves(state.opt_state) if x.ndim]
    assert any(full != part for full, part in shards)  # some state is split
    assert any(len(full) == 1 and full == part for full, part in shards)  # factored: whole
