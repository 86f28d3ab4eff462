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
