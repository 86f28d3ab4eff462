"""Sweeps: an ablation as one command, `efflm sweep FILE [--out DIR]`.

A sweep file (YAML, `configs/sweeps/*.yaml`):

    base: tiny                        # a preset or a config file
    overrides: [train.eval_every=50]  # shared by every variant
    variants:                         # named variants, each a list of overrides
      softmax: []
      gla: [model.attention.kind=gla]
    grid:                             # and/or every combination of these values
      optimizer.lr: [1.0e-3, 3.0e-3]
    seeds: 2                          # train.seed 0 .. seeds - 1 (init and data order)
    budget: {kind: flops, steps: 100}

With both `variants` and `grid`, every variant is crossed with every grid point; a grid
point's name is its `key=value` pairs (the key's last part). The budget makes the runs
comparable; `steps` is what the base (the base config with the shared overrides) trains:

  * `tokens`: every variant sees as many tokens as the base (steps x batch x length);
  * `flops`: every variant spends as many training FLOPs as the base (the analytic count
    MFU uses), so a cheaper variant trains longer;
  * `time`: every variant trains as long as the base, its step time measured by a short
    timed run (`calibration_steps`, default 5, after 2 warm-up steps).

The warm-up (and `optimizer.decay_steps` where set) scales with each variant's steps.
The plan (each variant's overrides and steps) is written to DIR/plan.json before
anything trains and read back on a rerun, so calibrated steps stay fixed.

Each run is a normal training run in DIR/<variant>/seed-<n>, in its own process (an
XLA abort cannot be caught in process), its output in DIR/logs/. Finished runs are
skipped, interrupted ones resume, a failed one is recorded in DIR/status.json and the
sweep carries on; running the sweep again fills the gaps. When it ends, the report
(`efflm report`) is written to DIR/report.md with its plots.
"""

from __future__ import annotations

import itertools
import json
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass

import yaml

from efflm.config import load_config
from efflm.errors import EfflmError
from efflm.flops import train_flops_per_step

BUDGETS = ("tokens", "flops", "time")
_FILE_KEYS = {"base", "overrides", "variants", "grid", "seeds", "budget"}
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._=,+-]*$")


class SweepError(EfflmError):
    pass


@dataclass
class Sweep:
    name: str
    base: str
    overrides: list[str]
    variants: dict[str, list[str]]  # name -> the variant's own overrides
    seeds: int
    budget: str
    steps: int
    calibration_steps: int = 5


@dataclass
class Run:
    variant: str
    seed: int
    overrides: list[str]  # everything after the base, the sweep's steps and seed included
    steps: int
    workdir: str

    @property
    def label(self) -> str:
        return f"{self.variant} seed {self.seed}"


class _UniqueKeys(yaml.SafeLoader):
    """A YAML loader that refuses a mapping with the same key twice (two variants of one
    name would otherwise silently become one)."""


def _mapping(loader, node, deep=False):
    seen = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise SweepError(f"{key!r} appears twice in one mapping (line "
                             f"{key_node.start_mark.line + 1}); names must be unique")
        seen.add(key)
    return loader.construct_mapping(node, deep=deep)


_UniqueKeys.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _mapping)


def _overrides(value, where: str) -> list[str]:
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(v, str) and "=" in v for v in value):
        raise SweepError(f"{where} must be a list of key=value strings; got {value!r}")
    return list(value)


def _value_text(value) -> str:
    return json.dumps(value) if isinstance(value, (list, dict)) else str(value)


def load_sweep(path: str) -> Sweep:
    """Read and check a sweep file (every variant's config is resolved, so an unknown key
    or kind fails here, naming the variant, before anything runs)."""
    if not os.path.isfile(path):
        raise SweepError(f"no sweep file {path!r}")
    try:
        with open(path) as f:
            raw = yaml.load(f, Loader=_UniqueKeys)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as e:
        raise SweepError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(raw, dict):
        raise SweepError(f"{path}: a sweep file is a mapping with keys "
                         f"{', '.join(sorted(_FILE_KEYS))}")
    unknown = sorted(set(raw) - _FILE_KEYS)
    if unknown:
        raise SweepError(f"{path}: unknown key(s) {', '.join(unknown)}; a sweep file has "
                         f"{', '.join(sorted(_FILE_KEYS))}")
    if not isinstance(raw.get("base"), str):
        raise SweepError(f"{path}: `base` must name a preset or a config file")
    named = raw.get("variants") or {}
    if not isinstance(named, dict):
        raise SweepError(f"{path}: `variants` must map names to lists of overrides")
    variants = {str(k): _overrides(v, f"variant {k!r}") for k, v in named.items()}
    grid = raw.get("grid")
    if grid is not None:
        if not isinstance(grid, dict) or not grid or not all(
                isinstance(v, list) and v for v in grid.values()):
            raise SweepError(f"{path}: `grid` must map keys to non-empty lists of values; "
                             f"got {grid!r}")
        points = [[(key, value) for value in values] for key, values in grid.items()]
        crossed = {}
        for name, own in (variants or {"": []}).items():
            for point in itertools.product(*points):
                label = ",".join(f"{k.split('.')[-1]}={_value_text(v)}" for k, v in point)
                full = f"{name},{label}" if name else label
                if full in crossed:
                    raise SweepError(f"{path}: two variants are both named {full!r}")
                crossed[full] = own + [f"{k}={_value_text(v)}" for k, v in point]
        variants = crossed
    if not variants:
        raise SweepError(f"{path}: no variants: give `variants`, a `grid`, or both")
    for name in variants:
        if not _NAME.match(name):
            raise SweepError(f"variant {name!r}: a name is letters, digits and . _ = , + - "
                             "(it names a folder)")
    seeds = raw.get("seeds", 1)
    if not isinstance(seeds, int) or isinstance(seeds, bool) or seeds < 1:
        raise SweepError(f"{path}: `seeds` must be a positive integer; got {seeds!r}")
    budget = raw.get("budget") or {}
    kind, steps = budget.get("kind", "tokens"), budget.get("steps")
    if kind not in BUDGETS:
        raise SweepError(f"{path}: budget.kind must be one of {', '.join(BUDGETS)}; "
                         f"got {kind!r}")
    calibration = budget.get("calibration_steps", 5)
    for key, value in (("steps", steps), ("calibration_steps", calibration)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise SweepError(f"{path}: budget.{key} must be a positive integer; got {value!r}")
    unknown = sorted(set(budget) - {"kind", "steps", "calibration_steps"})
    if unknown:
        raise SweepError(f"{path}: unknown budget key(s) {', '.join(unknown)}")
    sweep = Sweep(os.path.splitext(os.path.basename(path))[0], raw["base"],
                  _overrides(raw.get("overrides"), "overrides"), variants, seeds, kind, steps,
                  calibration)
    for name, own in variants.items():
        try:
            load_config(sweep.base, sweep.overrides + own)
        except EfflmError as e:
            raise SweepError(f"variant {name!r}: {e}") from None
    return sweep


def _step_cost(cfg, budget: str, calibration_steps: int) -> float:
    """What one training step costs under the budget."""
    if budget == "tokens":
        return cfg.train.batch_size * cfg.data.seq_len
    if budget == "flops":
        return train_flops_per_step(cfg.model, cfg.data.seq_len, cfg.train.batch_size)
    from efflm.bench.mfu import measure

    return measure(cfg, calibration_steps, 2)["step_time"]


def _scaled(cfg, steps: int, base_steps: int) -> list[str]:
    """The schedule's lengths scaled from the base's steps to `steps`."""
    out = [f"optimizer.warmup_steps={round(cfg.optimizer.warmup_steps * steps / base_steps)}"]
    if cfg.optimizer.decay_steps:
        out.append(f"optimizer.decay_steps="
                   f"{max(1, round(cfg.optimizer.decay_steps * steps / base_steps))}")
    return out


def plan(sweep: Sweep, out: str, recorded: dict | None = None) -> list[Run]:
    """Every (variant, seed) run with its steps. `recorded`: a previous plan, whose steps
    are kept for variants whose overrides did not change (a changed one is an error)."""
    recorded = recorded or {}
    for name, entry in recorded.items():
        if name in sweep.variants and entry["overrides"] != sweep.variants[name]:
            raise SweepError(f"variant {name!r} changed since its runs started (was "
                             f"{' '.join(entry['overrides']) or 'no overrides'}); give it "
                             "a new name or remove its folder")
    costs: dict[str, float] = {}  # one measurement per distinct config

    def cost(cfg) -> float:
        key = repr(cfg)
        if key not in costs:
            costs[key] = _step_cost(cfg, sweep.budget, sweep.calibration_steps)
        return costs[key]

    base_cfg = load_config(sweep.base, sweep.overrides)
    runs = []
    for name, own in sweep.variants.items():
        cfg = load_config(sweep.base, sweep.overrides + own)
        if name in recorded:
            steps = recorded[name]["steps"]
        else:
            steps = round(sweep.steps * cost(base_cfg) / cost(cfg))
        if steps < 1:
            raise SweepError(f"variant {name!r}: the {sweep.budget} budget of {sweep.steps} "
                             "base steps buys it no step; raise budget.steps")
        for seed in range(sweep.seeds):
            runs.append(Run(name, seed, sweep.overrides + own + _scaled(cfg, steps, sweep.steps)
                            + [f"train.steps={steps}", f"train.seed={seed}"], steps,
                            os.path.join(out, name, f"seed-{seed}")))
    return runs


def finished(run: Run) -> bool:
    """Whether the run's metrics reach its last step."""
    path = os.path.join(run.workdir, "metrics.jsonl")
    if not os.path.exists(path):
        return False
    with open(path) as f:
        steps = [json.loads(line).get("step", 0) for line in f if line.strip()]
    return bool(steps) and max(steps) >= run.steps


def launch(run: Run, base: str, log_path: str) -> tuple[int, str]:
    """Train one run in its own process; (exit status, its last line of error output)."""
    argv = [sys.executable, "-m", "efflm.cli", "train", "--config", base, *run.overrides,
            f"train.workdir={run.workdir}", "logging.progress=false"]
    with open(log_path, "a") as log:
        log.write(" ".join(argv) + "\n")
        log.flush()
        done = subprocess.run(argv, stdout=log, stderr=subprocess.STDOUT, check=False)
    with open(log_path) as log:
        lines = [line.strip() for line in log if line.strip()]
    return done.returncode, lines[-1] if lines else ""


def _write_json(path: str, value) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(value, f, indent=1)
    os.replace(tmp, path)


def run_sweep(path: str, out: str = "", runner=launch, steps: int | None = None,
              seeds: int | None = None) -> int:
    """Run a sweep file's plan (module docstring); 0 when every run finished, 1 if any
    failed (each recorded in DIR/status.json). `steps`, `seeds`: in place of the file's
    budget.steps and seeds."""
    from efflm.train.report import write_report

    sweep = load_sweep(path)
    for key, value in (("--steps", steps), ("--seeds", seeds)):
        if value is not None and value < 1:
            raise SweepError(f"{key} must be a positive integer; got {value}")
    sweep.steps = steps or sweep.steps
    sweep.seeds = seeds or sweep.seeds
    out = out or os.path.join("runs", "sweeps", sweep.name)
    plan_path = os.path.join(out, "plan.json")
    recorded = {}
    if os.path.exists(plan_path):
        with open(plan_path) as f:
            previous = json.load(f)
        if (previous["budget"], previous["base_steps"]) != (sweep.budget, sweep.steps):
            raise SweepError(f"{out} holds a sweep with a {previous['budget']} budget of "
                             f"{previous['base_steps']} base steps, not {sweep.budget} of "
                             f"{sweep.steps}; use another --out")
        recorded = previous["variants"]
    runs = plan(sweep, out, recorded)
    os.makedirs(os.path.join(out, "logs"), exist_ok=True)
    steps = {r.variant: r.steps for r in runs}
    _write_json(plan_path, {"file": os.path.abspath(path), "base": sweep.base,
                            "budget": sweep.budget, "base_steps": sweep.steps,
                            "variants": {**recorded, **{name: {"overrides": own,
                                                              "steps": steps[name]}
                                                       for name, own in sweep.variants.items()}}})
    status_path = os.path.join(out, "status.json")
    status = {}
    if os.path.exists(status_path):
        with open(status_path) as f:
            status = json.load(f)
    print(f"sweep {sweep.name}: {len(sweep.variants)} variants x {sweep.seeds} seeds, "
          f"{sweep.budget} budget of {sweep.steps} base steps, in {out}", flush=True)
    failed = 0
    for i, run in enumerate(runs, 1):
        key = f"{run.variant}/seed-{run.seed}"
        prefix = f"[{i}/{len(runs)}] {run.label} ({run.steps} steps)"
        if finished(run):
            status[key] = {"state": "done", "seconds": status.get(key, {}).get("seconds")}
            print(f"{prefix}: finished earlier", flush=True)
            continue
        print(f"{prefix}: training", flush=True)
        start = time.time()
        log_path = os.path.join(out, "logs", f"{run.variant}-seed-{run.seed}.log")
        try:
            code, last = runner(run, sweep.base, log_path)
        except KeyboardInterrupt:
            print(f"{prefix}: interrupted; run the sweep again to resume it", flush=True)
            return 130
        seconds = round(time.time() - start, 1)
        if code == 0 and finished(run):
            status[key] = {"state": "done", "seconds": seconds}
            print(f"{prefix}: done in {seconds:.0f} s", flush=True)
        else:
            failed += 1
            status[key] = {"state": "failed", "exit_status": code, "message": last,
                           "log": log_path}
            print(f"{prefix}: FAILED (exit {code}): {last}", flush=True)
        _write_json(status_path, status)
    _write_json(status_path, status)
    summary = f"sweep {sweep.name}: {len(runs) - failed} of {len(runs)} runs finished"
    if any(os.path.exists(os.path.join(r.workdir, "metrics.jsonl")) for r in runs):
        summary += f"; report in {write_report([out], out)}"
    print(summary, flush=True)
    return 1 if failed else 0

