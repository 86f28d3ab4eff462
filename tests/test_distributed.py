"""Multi-host training: 2 processes on 127.0.0.1 that join through jax.distributed and
talk over gloo, each with 2 CPU devices, so that the global mesh has 4 devices.

Each child gets its own XLA_FLAGS (2 devices, not conftest's 8) and shares the
persistent compilation cache, caching every compilation so that later runs start fast.
"""

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from conftest import SMALL

from efflm.config import load_config
from efflm.data import get_tokenizer, make_train_iterator
from efflm.mesh import global_batch, make_mesh
from efflm.train.step import build_program
from efflm.train.trainer import evaluate

# Constant learning rate: 6 steps resumed to 9 follow the same path as 9 at once.
COMMON = [*SMALL, "optimizer.schedule=constant", "optimizer.warmup_steps=0",
          "logging.every=1", "train.eval_every=3", "checkpoint.every=3"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _child_env(devices: int) -> dict:
    env = dict(os.environ)
    flags = re.sub(r"--xla_force_host_platform_device_count=\d+", "", env.get("XLA_FLAGS", ""))
    env["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={devices}".strip()
    env["JAX_PLATFORMS"] = "cpu"
    env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
    env["PYTHONUNBUFFERED"] = "1"
    return env


def _start_pair(workdir, logdir, *overrides):
    """Two training processes on one shared workdir; their output goes to log0/log1."""
    port = _free_port()
    procs = []
    for i in range(2):
        args = [sys.executable, "-m", "efflm.cli", "train", "--config", "tiny", *COMMON,
                *overrides, f"train.workdir={workdir}",
                f"distributed.coordinator_address=127.0.0.1:{port}",
                "distributed.num_processes=2", f"distributed.process_id={i}",
                "distributed.heartbeat_timeout_s=10"]
        with open(os.path.join(logdir, f"log{i}.txt"), "w") as log:
            procs.append(subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT,
                                          env=_child_env(2)))
    return procs


def _kill(procs):
    for p in procs:
        if p.poll() is None:
            p.kill()
            p.wait()


def _logs(logdir) -> str:
    """The end of both processes' output, for failure messages."""
    out = ""
    for i in range(2):
        with open(os.path.join(logdir, f"log{i}.txt")) as f:
            out += f"--- process {i}:\n{f.read()[-3000:]}\n"
    return out


def _wait(procs, logdir, timeout=180):
    deadline = time.time() + timeout
    for p in procs:
        try:
            p.wait(timeout=max(1, deadline - time.time()))
        except subprocess.TimeoutExpired:
            pytest.fail(f"a process did not finish in {timeout}s\n{_logs(logdir)}")
    assert [p.returncode for p in procs] == [0, 0], _logs(logdir)


def _wait_for_first_row(procs, workdir, logdir, timeout=180):
    """Block until training has logged a step (so every process is past start-up)."""
    metrics = os.path.join(workdir, "metrics.jsonl")
    deadline = time.time() + timeout
    while not (os.path.exists(metrics) and os.path.getsize(metrics)):
        if time.time() > deadline or any(p.poll() is not None for p in procs):
            pytest.fail(f"training did not log a step\n{_logs(logdir)}")
        time.sleep(0.2)


def _rows(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def _reference(steps):
    """Train and eval losses of 1 process on 4 devices fed the 2 processes' global batches.

    Process i of 2 reads its own document shard; stacking both shards' rows gives the
    global batch that the 2-process run assembles with make_array_from_process_local_data.
    """
    cfg = load_config("tiny", [*COMMON, f"train.steps={steps}"])
    program = build_program(cfg, make_mesh(cfg.mesh, jax.devices()[:4]))
    tokenizer = get_tokenizer(cfg.data)
    shards = [make_train_iterator(cfg.data, tokenizer, global_batch=cfg.train.batch_size,
                                  seed=cfg.train.seed, process_index=i, process_count=2)
              for i in range(2)]
    losses, evals = [], []
    with program.context():
        state = program.init(jax.random.key(cfg.train.seed))
        for step in range(1, steps + 1):
            parts = [next(s) for s in shards]
            batch = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
            state, metrics = program.train_step(state, global_batch(batch, program.mesh))
            losses.append(float(metrics["loss"]))
            if step % cfg.train.eval_every == 0:
                evals.append(evaluate(program, state, tokenizer,
                                      cfg.train.eval_batches)["eval_loss"])
    return losses, evals


def test_two_processes_train_the_reference_model_and_resume(tmp_path):
    """Two processes train one model: each step's loss (a mean over the global batch)
    and each eval loss equal those of one process on 4 devices that is fed the same
    global batches (the rows of both processes' data shards); they differ only in the
    order of float sums. A resumed run (6 -> 9 steps) restores the state and each
    process's data position, so it continues on the reference's path too."""
    workdir, logdir = str(tmp_path / "run"), str(tmp_path)
    procs = _start_pair(workdir, logdir, "train.steps=6")
    try:
        ref_losses, ref_evals = _reference(9)  # computed while the pair trains
        _wait(procs, logdir)
        rows = _rows(workdir)
        assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3, 4, 5, 6]
        data = os.listdir(os.path.join(workdir, "checkpoints", "6", "data"))
        assert {"process_0-of-2.json", "process_1-of-2.json"} <= set(data)

        procs = _start_pair(workdir, logdir, "train.steps=9")
        _wait(procs, logdir)
    finally:
        _kill(procs)
    assert "resuming at step 6" in _logs(logdir)
    rows = _rows(workdir)
    losses = [r["loss"] for r in rows if "loss" in r]
    evals = [r["eval_loss"] for r in rows if "eval_loss" in r]
    assert [r["step"] for r in rows if "loss" in r] == list(range(1, 10))
    assert losses == pytest.approx(ref_losses, rel=1e-5)
    assert evals == pytest.approx(ref_evals, rel=1e-5) and len(evals) == 3
    assert losses[-1] < losses[0]


@pytest.mark.parametrize("victim", [1, 0], ids=["worker_killed", "coordinator_killed"])
def test_a_killed_peer_stops_the_survivor(tmp_path, victim):
    """kill -9 of one process makes the other exit non-zero, not hang in a collective.

    JAX's coordination service does it: killing process 1 (a worker), the service in
    process 0 misses its heartbeats (distributed.heartbeat_timeout_s) and aborts
    process 0; killing process 0 takes the service down, and process 1's agent
    aborts as soon as its connection to it breaks.
    """
    workdir, logdir = str(tmp_path / "run"), str(tmp_path)
    procs = _start_pair(workdir, logdir, "train.steps=100000", "train.eval_every=0",
                        "checkpoint.every=0")
    survivor = procs[1 - victim]
    try:
        _wait_for_first_row(procs, workdir, logdir)
        os.kill(procs[victim].pid, signal.SIGKILL)
        killed = time.time()
        try:
            survivor.wait(timeout=90)
        except subprocess.TimeoutExpired:
            pytest.fail(f"process {1 - victim} still runs 90s after its peer was killed")
        took = time.time() - killed
    finally:
        _kill(procs)
    assert survivor.returncode != 0, _logs(logdir)
    print(f"process {1 - victim} exited with {survivor.returncode} {took:.1f}s after the kill")


def test_sigterm_to_one_process_stops_both_at_one_step(tmp_path):
    """A scheduler's SIGTERM may reach one host only: JAX's preemption service tells
    the others, and all save one checkpoint at the same step and exit 128+SIGTERM."""
    workdir, logdir = str(tmp_path / "run"), str(tmp_path)
    procs = _start_pair(workdir, logdir, "train.steps=100000", "train.eval_every=0",
                        "checkpoint.every=0")
    try:
        _wait_for_first_row(procs, workdir, logdir)
        os.kill(procs[1].pid, signal.SIGTERM)
        for p in procs:
            p.wait(timeout=90)
    finally:
        _kill(procs)
    assert [p.returncode for p in procs] == [128 + signal.SIGTERM] * 2, _logs(logdir)
    steps = os.listdir(os.path.join(workdir, "checkpoints"))
    assert len(steps) == 1, steps
    data = os.listdir(os.path.join(workdir, "checkpoints", steps[0], "data"))
    assert {"process_0-of-2.json", "process_1-of-2.json"} <= set(data)
    assert f"at step {steps[0]}" in _logs(logdir)
