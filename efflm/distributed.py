"""Multi-process start-up through `jax.distributed`.

The coordinator comes from `distributed.*` in the config or from the environment
(`JAX_COORDINATOR_ADDRESS`, `JAX_NUM_PROCESSES`, `JAX_PROCESS_ID`); on clusters that
JAX detects itself (SLURM, Open MPI, ...) no setting is needed.
"""

from __future__ import annotations

import os

import jax

from efflm.config import DistributedConfig
from efflm.errors import ConfigError


def _cluster_detected() -> bool:
    for var in ("SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE"):
        if int(os.environ.get(var, "1") or 1) > 1:
            return True
    return False


def initialize(cfg: DistributedConfig) -> None:
    """Join the other processes of the run, if there are any; idempotent."""
    if jax.distributed.is_initialized():
        return
    address = cfg.coordinator_address or os.environ.get("JAX_COORDINATOR_ADDRESS", "")
    num = cfg.num_processes or int(os.environ.get("JAX_NUM_PROCESSES", "0") or 0)
    pid = cfg.process_id if cfg.process_id >= 0 else int(os.environ.get("JAX_PROCESS_ID", "-1"))
    if not address and not _cluster_detected():
        return
    # CPU processes need a collectives library to talk to each other.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    kwargs = dict(heartbeat_timeout_seconds=cfg.heartbeat_timeout_s,
                  initialization_timeout=max(cfg.heartbeat_timeout_s, 60))
    if address:
        if num <= 0 or pid < 0:
            raise ConfigError(
                "a coordinator address needs the process count and this process's id: set "
                "distributed.num_processes and distributed.process_id (or JAX_NUM_PROCESSES "
                "and JAX_PROCESS_ID)")
        if pid >= num:
            raise ConfigError(f"distributed.process_id={pid} must be below "
                              f"distributed.num_processes={num}")
        jax.distributed.initialize(address, num_processes=num, process_id=pid, **kwargs)
    else:
        jax.distributed.initialize(**kwargs)
