"""Model FLOPs (analytic) and accelerator peaks, for MFU.

Model FLOPs follow the PaLM convention ("PaLM: Scaling Language Modeling with
Pathways", appendix B): matmul FLOPs only, 2 per multiply-add, a training step
costs 3x the forward pass (backward = 2x forward), rematerialisation is not
counted. Each mixer, MLP and depth kind reports its own forward FLOPs per token
(`flops_per_token` on its class), so routed, sparse and linear kinds count the
work they really do; causal softmax attention counts only the half of the
length x length scores that causality keeps (as FlashAttention reports), so work
spent on masked scores never raises MFU.

`traced_matmul_flops` counts the matmuls a function really runs, from its jaxpr
(scan bodies times their length, Pallas kernels times their grid), for checking the
analytic figures.
"""

from __future__ import annotations

import functools
import math
import time
from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp

from efflm.layers.plan import depth_kind, layer_plan

if TYPE_CHECKING:
    from efflm.config import ModelConfig


def layer_flops_per_token(cfg: ModelConfig):
    """`f(i, seq_len, shared_kv=False)`: forward FLOPs per token of layer i of the plan
    (mixer + MLP) over a sequence of seq_len tokens; `shared_kv`: attending to keys and
    values another call computed (`Mixer.shares_kv`), without projecting its own."""
    plan = layer_plan(cfg)

    def flops(i: int, seq_len: int, shared_kv: bool = False) -> float:
        mixer = plan[i].mixer_kind
        return (mixer.flops_per_token(cfg, seq_len) + plan[i].mlp_kind.flops_per_token(
            cfg, seq_len) - (mixer.kv_flops_per_token(cfg) if shared_kv else 0.0))

    return flops


def inactive_params(cfg: ModelConfig) -> int:
    """Parameters a token does not use (experts it is not routed to): the sum of each
    layer's kinds' `inactive_params`."""
    return sum(spec.mixer_kind.inactive_params(cfg) + spec.mlp_kind.inactive_params(cfg)
               for spec in layer_plan(cfg))


def forward_flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    blocks = depth_kind(cfg).flops_per_token(cfg, seq_len, layer_flops_per_token(cfg))
    return blocks + 2 * cfg.d_model * cfg.vocab_size  # + the output head


def train_flops_per_step(cfg: ModelConfig, seq_len: int, batch_size: int) -> float:
    return 3.0 * forward_flops_per_token(cfg, seq_len) * seq_len * batch_size


def _jaxpr_matmul_flops(jaxpr) -> float:
    total = 0.0
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "dot_general":
            (lhs_contract, _), _ = eqn.params["dimension_numbers"]
            lhs = eqn.invars[0].aval.shape
            out = eqn.outvars[0].aval.shape
            total += 2.0 * math.prod(out) * math.prod(lhs[d] for d in lhs_contract)
            continue
        repeat = eqn.params.get("length", 1) if eqn.primitive.name == "scan" else 1
        if eqn.primitive.name == "pallas_call":  # the kernel once per program
            repeat = math.prod(eqn.params["grid_mapping"].grid)
        for value in eqn.params.values():
            for sub in value if isinstance(value, (tuple, list)) else (value,):
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    total += repeat * _jaxpr_matmul_flops(inner)
    return total


def traced_matmul_flops(fn, *args) -> float:
    """FLOPs of every `dot_general` that `fn(*args)` traces to, each scan body counted
    `length` times (XLA:CPU's `cost_analysis` counts a loop body once) and each Pallas
    kernel once per program of its grid."""
    return _jaxpr_matmul_flops(jax.make_jaxpr(fn)(*args).jaxpr)


# Dense peak FLOP/s per chip by compute dtype (vendor datasheets, no sparsity), keyed
# by the text of jax's `device_kind` (TPU v5e is "TPU v5 lite", v5p is "TPU v5").
PEAK_FLOPS = {
    "H100": {"bfloat16": 989e12, "float16": 989e12, "float32": 494e12},
    "H200": {"bfloat16": 989e12, "float16": 989e12, "float32": 494e12},
    "A100": {"bfloat16": 312e12, "float16": 312e12, "float32": 156e12},
    "L40S": {"bfloat16": 362e12, "float16": 362e12, "float32": 91.6e12},
    "L4": {"bfloat16": 121e12, "float16": 121e12, "float32": 60e12},
    "TPU v4": {"bfloat16": 275e12, "float32": 275e12},
    "TPU v5 lite": {"bfloat16": 197e12, "float32": 197e12},
    "TPU v5": {"bfloat16": 459e12, "float32": 459e12},
    "TPU v6 lite": {"bfloat16": 918e12, "float32": 918e12},
}


def datasheet_name(kind: str) -> str | None:
    """The PEAK_FLOPS entry for a device kind; the longest (most specific) match wins."""
    for name in sorted(PEAK_FLOPS, key=len, reverse=True):
        if name.lower() in kind.lower():
            return name
    return None


def measure_matmul_peak(dtype: str = "float32", n: int = 2048, repeats: int = 5) -> float:
    """FLOP/s of the best of `repeats` square matmuls on the default device."""
    f, a = _matmul(dtype, n)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        f(a, a).block_until_ready()
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best


@functools.cache
def _matmul(dtype: str, n: int):
    a = jnp.ones((n, n), dtype)
    f = jax.jit(lambda x, y: x @ y)
    f(a, a).block_until_ready()
    return f, a


@functools.cache
def measured_matmul_peak(dtype: str = "float32", n: int = 2048, repeats: int = 5) -> float:
    """`measure_matmul_peak`, measured once per process."""
    return measure_matmul_peak(dtype, n, repeats)


def peak_flops_per_device(dtype: str) -> tuple[float, str]:
    """(peak FLOP/s of one device, where the figure came from)."""
    device = jax.devices()[0]
    kind = getattr(device, "device_kind", "")
    name = datasheet_name(kind)
    if name is not None and dtype in PEAK_FLOPS[name]:
        return PEAK_FLOPS[name][dtype], f"datasheet {name}"
    return measured_matmul_peak(dtype), f"measured {dtype} matmul on {kind or device.platform}"


def peak_flops(dtype: str) -> tuple[float, str]:
    """Peak of all devices in the run.

    CPU host devices (`--xla_force_host_platform_device_count`) share one machine's
    cores, so on CPU the measured peak is the whole machine's, not one device's.
    """
    per_device, source = peak_flops_per_device(dtype)
    return per_device * _devices_counted(), source


def _devices_counted() -> int:
    return 1 if jax.default_backend() == "cpu" else jax.device_count()


class PeakMeter:
    """The peak FLOP/s that MFU divides by.

    A datasheet figure is fixed. A measured one (CPU) is the best reading so far: a
    busy moment at start-up would understate the peak and inflate MFU, so `update`
    measures again (one matmul) when at least `interval_s` passed since the last
    reading, and keeps the maximum.
    """

    def __init__(self, dtype: str, interval_s: float = 30.0):
        self.dtype, self.interval_s = dtype, interval_s
        self.peak, self.source = peak_flops(dtype)
        self.measured = self.source.startswith("measured")
        self._last = time.perf_counter()

    def update(self) -> float:
        now = time.perf_counter()
        if self.measured and now - self._last >= self.interval_s:
            reading = measure_matmul_peak(self.dtype, repeats=1) * _devices_counted()
            self.peak = max(self.peak, reading)
            self._last = time.perf_counter()
        return self.peak
