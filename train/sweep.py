"""Sweeps: an ablation as one command, `efflm sweep FILE [--out DIR]` (FILE: a path,
or the name of a file in configs/sweeps/).

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
    timed run in a process of its own (`calibration_steps`, default 5, after 2 warm-up
    steps).

The warm-up (and `optimizer.decay_steps` where set) scales with each variant's steps.
The plan (base, shared overrides, budget, and each variant's overrides and steps) is
written to DIR/plan.json before anything trains and read back on a rerun, so calibrated
steps stay fixed; a rerun whose base, shared overrides or budget differ, or whose
variant of the same name has other overrides, is refused.

Each run is a normal training run in DIR/<variant>/seed-<n>, in its own process (an
XLA abort cannot be caught in process), its output in DIR/logs/. A run is finished when
its last step's checkpoint exists; finished runs are skipped, interrupted ones resume,
a failed one is recorded in DIR/status.json and the sweep carries on; running the sweep
again fills the gaps. Ctrl-C or SIGTERM lets the current run save and stop first. When
the sweep ends, the report (`efflm report`) is written to DIR/report.md with its plots.
"""

from __future__ import annotations

import itertools
import json
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field

import yaml

from efflm import configs
from efflm.config import load_config
from efflm.errors import EfflmError
from efflm.flops import train_flops_per_step

BUDGETS = ("tokens", "flops", "time")
_FILE_KEYS = {"base", "overrides", "variants", "grid", "seeds", "budget"}
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._=,+-]*$")
# What a sweep's folder holds beside the variants' folders.
_RESERVED = {"logs", "plan.json", "status.json", "report.md", "loss_vs_steps.png",
             "loss_vs_flops.png", "throughput_memory.png"}


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
    base_cost: float | None = None  # the base's cost per step, once planned
    configs: dict = field(default_factory=dict)  # each variant's resolved config


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
    """A grid value as override text (YAML: null, true, lists as JSON)."""
    if value is None or isinstance(value, (bool, list, dict)):
        return json.dumps(value)
    return str(value)


def _value_name(value) -> str:
    """A grid value as part of a folder name."""
    return re.sub(r"[^A-Za-z0-9._+-]+", "_", _value_text(value)).strip("_") or "_"


def load_sweep(path: str) -> Sweep:
    """Read and check a sweep file (every variant's config is resolved, so an unknown key
    or kind fails here, naming the variant, before anything runs)."""
    path = find_sweep(path)
    try:
        with open(path, encoding="utf-8") as f:
            raw = yaml.load(f, Loader=_UniqueKeys)  # noqa: S506 - a SafeLoader subclass
    except (OSError, UnicodeDecodeError) as e:
        raise SweepError(f"{path} cannot be read ({e})") from None
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
                isinstance(k, str) and isinstance(v, list) and v for k, v in grid.items()):
            raise SweepError(f"{path}: `grid` must map keys to non-empty lists of values; "
                             f"got {grid!r}")
        points = [[(key, value) for value in values] for key, values in grid.items()]
        crossed = {}
        for name, own in (variants or {"": []}).items():
            for point in itertools.product(*points):
                label = ",".join(f"{k.split('.')[-1]}={_value_name(v)}" for k, v in point)
                full = f"{name},{label}" if name else label
                if full in crossed:
                    raise SweepError(f"{path}: two variants are both named {full!r}")
                crossed[full] = own + [f"{k}={_value_text(v)}" for k, v in point]
        variants = crossed
    if not variants:
        raise SweepError(f"{path}: no variants: give `variants`, a `grid`, or both")
    for name in variants:
        if not _NAME.match(name) or name in _RESERVED:
            raise SweepError(f"variant {name!r}: a name is letters, digits and . _ = , + - "
                             f"(it names a folder), and not one of {', '.join(sorted(_RESERVED))}")
    seeds = raw.get("seeds", 1)
    if not isinstance(seeds, int) or isinstance(seeds, bool) or seeds < 1:
        raise SweepError(f"{path}: `seeds` must be a positive integer; got {seeds!r}")
    budget = raw.get("budget") or {}
    if not isinstance(budget, dict):
        raise SweepError(f"{path}: `budget` must be a mapping such as "
                         f"{{kind: flops, steps: 100}}; got {budget!r}")
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
            sweep.configs[name] = load_config(sweep.base, sweep.overrides + own)
        except EfflmError as e:
            raise SweepError(f"variant {name!r}: {e}") from None
    return sweep


_CALIBRATE = """
import json, sys
from efflm.bench.mfu import measure
from efflm.config import load_config
cfg = load_config(sys.argv[1], json.loads(sys.argv[2]))
print(json.dumps(measure(cfg, int(sys.argv[3]), 2)["step_time"]))
"""


def calibrate(base: str, overrides: list[str], steps: int) -> float:
    """Median step time of a config over `steps` timed steps (after 2 warm-up steps),
    measured in a process of its own like every run."""
    done = subprocess.run([sys.executable, "-c", _CALIBRATE, base, json.dumps(overrides),
                           str(steps)], capture_output=True, text=True, check=False)
    if done.returncode != 0:
        lines = [line for line in (done.stderr + done.stdout).splitlines() if line.strip()]
        raise SweepError(f"timing {' '.join(overrides) or base} failed (exit "
                         f"{done.returncode}): {lines[-1] if lines else 'no output'}")
    return float(done.stdout.strip().splitlines()[-1])


def _scaled(cfg, steps: int, base_steps: int) -> list[str]:
    """The schedule's lengths scaled from the base's steps to `steps`."""
    out = [f"optimizer.warmup_steps={round(cfg.optimizer.warmup_steps * steps / base_steps)}"]
    if cfg.optimizer.decay_steps:
        out.append(f"optimizer.decay_steps="
                   f"{max(1, round(cfg.optimizer.decay_steps * steps / base_steps))}")
    return out


def plan(sweep: Sweep, out: str, recorded: dict | None = None) -> list[Run]:
    """Every (variant, seed) run with its steps. `recorded`: a previous plan
    (`plan.json`): its steps are kept for variants whose overrides did not change, a
    changed variant is an error, and under a time budget the base's recorded step time
    is reused."""
    recorded = recorded or {"variants": {}}
    for name, entry in recorded["variants"].items():
        if name in sweep.variants and entry["overrides"] != sweep.variants[name]:
            raise SweepError(f"variant {name!r} changed since its runs started (was "
                             f"{' '.join(entry['overrides']) or 'no overrides'}); give it "
                             f"a new name, or use another --out than {out}")
    costs: dict[str, float] = {}  # one measurement per distinct config

    def cost(cfg, overrides) -> float:
        key = repr(cfg)
        if key not in costs:
            if sweep.budget == "tokens":
                costs[key] = cfg.train.batch_size * cfg.data.seq_len
            elif sweep.budget == "flops":
                costs[key] = train_flops_per_step(cfg.model, cfg.data.seq_len,
                                                  cfg.train.batch_size)
            else:
                costs[key] = calibrate(sweep.base, overrides, sweep.calibration_steps)
        return costs[key]

    base_cfg = load_config(sweep.base, sweep.overrides)
    if recorded.get("base_cost"):
        costs[repr(base_cfg)] = recorded["base_cost"]
    runs = []
    for name, own in sweep.variants.items():
        cfg = sweep.configs[name]
        if name in recorded["variants"]:
            steps = recorded["variants"][name]["steps"]
        else:
            steps = round(sweep.steps * cost(base_cfg, sweep.overrides)
                          / cost(cfg, sweep.overrides + own))
        if steps < 1:
            raise SweepError(f"variant {name!r}: the {sweep.budget} budget of {sweep.steps} "
                             "base steps buys it no step; raise budget.steps")
        for seed in range(sweep.seeds):
            runs.append(Run(name, seed, sweep.overrides + own + _scaled(cfg, steps, sweep.steps)
                            + [f"train.steps={steps}", f"train.seed={seed}"], steps,
                            os.path.join(out, name, f"seed-{seed}")))
    sweep.base_cost = costs.get(repr(base_cfg))
    return runs


def finished(run: Run) -> bool:
    """Whether the run completed: its last step's checkpoint exists (a run saves it after
    its last metrics and eval rows, whatever `checkpoint.every` says)."""
    return os.path.isdir(os.path.join(run.workdir, "checkpoints", str(run.steps)))


_child: subprocess.Popen | None = None  # the run in progress, for SIGTERM


def _forward_sigterm(signum, frame):
    """SIGTERM to the sweep: pass it to the run (which saves and stops), then stop as
    Ctrl-C would."""
    if _child is not None and _child.poll() is None:
        _child.send_signal(signal.SIGTERM)
    raise KeyboardInterrupt


def launch(run: Run, base: str, log_path: str) -> tuple[int, str]:
    """Train one run in its own process; (exit status, its last line of output). On
    Ctrl-C (which the run receives too) or SIGTERM, wait for the run to save its
    checkpoint and stop, then raise KeyboardInterrupt."""
    global _child
    argv = [sys.executable, "-m", "efflm.cli", "train", "--config", base, *run.overrides,
            f"train.workdir={run.workdir}", "logging.progress=false"]
    with open(log_path, "a") as log:
        log.write(" ".join(argv) + "\n")
        log.flush()
        _child = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)
        try:
            code = _child.wait()
        except KeyboardInterrupt:
            try:
                _child.wait(timeout=600)
            except subprocess.TimeoutExpired:
                _child.kill()
                _child.wait()
            raise
        finally:
            _child = None
    with open(log_path, encoding="utf-8", errors="replace") as log:
        lines = [line.strip() for line in log if line.strip()]
    return code, lines[-1] if lines else ""


def _write_json(path: str, value) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(value, f, indent=1)
    os.replace(tmp, path)


def find_sweep(path: str) -> str:
    """A sweep file's path: `path` itself, or the name of one in configs/sweeps/."""
    if os.path.isfile(path):
        return path
    packaged = os.path.join(os.path.dirname(configs.__file__), "sweeps",
                            path if path.endswith(".yaml") else path + ".yaml")
    if os.path.isfile(packaged):
        return packaged
    names = sorted(f[:-5] for f in os.listdir(os.path.dirname(packaged)) if f.endswith(".yaml"))
    raise SweepError(f"no sweep file {path!r}; give a path, or one of: {', '.join(names)}")


def run_sweep(path: str, out: str = "", runner=launch, steps: int | None = None,
              seeds: int | None = None) -> int:
    """Run a sweep file's plan (module docstring); 0 when every run finished, 1 if any
    failed (each recorded in DIR/status.json), 130 when interrupted. `steps`, `seeds`:
    in place of the file's budget.steps and seeds."""
    from efflm.train.report import write_report

    sweep = load_sweep(path)
    for key, value in (("--steps", steps), ("--seeds", seeds)):
        if value is not None and value < 1:
            raise SweepError(f"{key} must be a positive integer; got {value}")
    sweep.steps = steps or sweep.steps
    sweep.seeds = seeds or sweep.seeds
    out = out or os.path.join("runs", "sweeps", sweep.name)
    plan_path = os.path.join(out, "plan.json")
    recorded = None
    if os.path.exists(plan_path):
        with open(plan_path) as f:
            recorded = json.load(f)
        before = [recorded.get(k) for k in ("base", "overrides", "budget", "base_steps")]
        if before != [sweep.base, sweep.overrides, sweep.budget, sweep.steps]:
            raise SweepError(f"{out} holds a sweep of base {before[0]!r}, shared overrides "
                             f"{before[1]}, a {before[2]} budget of {before[3]} base steps; "
                             "this one differs: use another --out")
    runs = plan(sweep, out, recorded)
    os.makedirs(os.path.join(out, "logs"), exist_ok=True)
    steps_of = {r.variant: r.steps for r in runs}
    variants = {**(recorded or {}).get("variants", {}),
                **{name: {"overrides": own, "steps": steps_of[name]}
                   for name, own in sweep.variants.items()}}
    _write_json(plan_path, {"file": os.path.abspath(find_sweep(path)), "base": sweep.base,
                            "overrides": sweep.overrides, "budget": sweep.budget,
                            "base_steps": sweep.steps, "base_cost": sweep.base_cost,
                            "variants": variants})
    status_path = os.path.join(out, "status.json")
    status = {}
    if os.path.exists(status_path):
        with open(status_path) as f:
            status = json.load(f)
    print(f"sweep {sweep.name}: {len(sweep.variants)} variants x {sweep.seeds} seeds, "
          f"{sweep.budget} budget of {sweep.steps} base steps, in {out}", flush=True)
    failed = 0
    previous = signal.signal(signal.SIGTERM, _forward_sigterm)
    try:
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
            code, last = runner(run, sweep.base, log_path)
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
    except KeyboardInterrupt:
        print(f"sweep {sweep.name}: interrupted; run it again to resume", flush=True)
        return 130
    finally:
        signal.signal(signal.SIGTERM, previous)
        _write_json(status_path, status)
    summary = f"sweep {sweep.name}: {len(runs) - failed} of {len(runs)} runs finished"
    if any(os.path.exists(os.path.join(r.workdir, "metrics.jsonl")) for r in runs):
        try:
            summary += f"; report in {write_report([out], out)}"
        except EfflmError as e:
            summary += f"; no report ({e})"
    print(summary, flush=True)
    return 1 if failed else 0
