"""`efflm report PATH... [--out DIR]`: one table (Markdown, printed too) and plots for
training runs: a sweep's folder (its variants and seeds), or any workdirs.

Per variant, over its seeds: parameters (total and active per token), training FLOPs
per token (the analytic count MFU uses: three times the forward's), steps, the final
and best validation loss and bits per byte as mean ± standard deviation, the median
tokens/s and MFU of the logged steps, the train step's memory per device (XLA's
`memory_analysis()` of the compiled step, which a run logs in its first row: its
arguments, outputs and temporaries, less the outputs that reuse donated arguments),
the final recall accuracy where the runs measured it (`data.source=mqar`), and, where
logged, the MoE statistics of `efflm.layers.moe.REPORT_STATISTICS` (the expert load's
coefficient of variation, each router's own; means over the last tenth of the steps). A `*`
marks a final bits per byte (or loss, where bits per byte were not measured) that
differs from the first row's by Welch's t-test at the two-sided 5% level (the seeds as
samples; at least two seeds on both sides). Plots (PNG,
matplotlib): validation loss against steps and against training FLOPs (the seeds'
mean, with their range as a band), tokens/s and step memory.
"""

from __future__ import annotations

import json
import math
import os
import re
import statistics
from dataclasses import dataclass, field

from efflm.errors import EfflmError

_SEED_DIR = re.compile(r"^seed-(\d+)$")


@dataclass
class RunResult:
    variant: str
    seed: int
    workdir: str
    rows: list[dict]
    params: int = 0
    active: int = 0
    flops_per_token: float = 0.0  # training: forward x 3
    tokens_per_step: int = 0

    def evals(self, key: str) -> list[tuple[int, float]]:
        return [(r["step"], r[key]) for r in self.rows if key in r]

    def tail_mean(self, key: str) -> float | None:
        """The mean of `key` over the logged rows of the run's last tenth of steps."""
        last = max((r["step"] for r in self.rows), default=0)
        values = [r[key] for r in self.rows if key in r and r["step"] >= 0.9 * last]
        return statistics.fmean(values) if values else None

    def median(self, key: str) -> float | None:
        values = [r[key] for r in self.rows if r.get(key) is not None]
        return statistics.median(values) if values else None


@dataclass
class Variant:
    name: str
    runs: list[RunResult] = field(default_factory=list)


def read_rows(path: str) -> list[dict]:
    """The rows of a metrics.jsonl, skipping a line cut short by a crash."""
    rows = []
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return rows


def _run_dirs(path: str) -> list[str]:
    if os.path.isfile(os.path.join(path, "metrics.jsonl")):
        return [path]
    found = []
    for root, dirs, files in os.walk(path):
        dirs.sort()
        if "metrics.jsonl" in files and "config.yaml" in files:
            found.append(root)
            dirs[:] = []
    return found


_COUNTS: dict[str, int] = {}


def _parameter_count(cfg) -> int:
    """Parameters of the config's model (traced, not initialised; once per model)."""
    import jax

    from efflm.mesh import make_mesh
    from efflm.train.step import build_program, count_params

    key = repr((cfg.model, cfg.data.seq_len))
    if key not in _COUNTS:
        # One device, one sequence: the run's mesh and batch need not fit this machine.
        cfg.mesh = type(cfg.mesh)()
        cfg.train.batch_size, cfg.train.grad_accum = 1, 1
        program = build_program(cfg, make_mesh(cfg.mesh, jax.devices()[:1]))
        _COUNTS[key] = count_params(jax.eval_shape(program._init, jax.random.key(0)).params)
    return _COUNTS[key]


def _describe(workdir: str) -> RunResult:
    from efflm.flops import forward_flops_per_token, inactive_params
    from efflm.train.trainer import load_workdir_config

    cfg = load_workdir_config(workdir)
    rows = read_rows(os.path.join(workdir, "metrics.jsonl"))
    name = os.path.basename(os.path.normpath(workdir))
    seed_dir = _SEED_DIR.match(name)
    variant = (os.path.basename(os.path.dirname(os.path.normpath(workdir))) if seed_dir
               else name)
    params = _parameter_count(cfg)
    return RunResult(variant, int(seed_dir.group(1)) if seed_dir else cfg.train.seed,
                     workdir, rows, params, params - inactive_params(cfg.model),
                     3 * forward_flops_per_token(cfg.model, cfg.data.seq_len),
                     cfg.train.batch_size * cfg.data.seq_len)


def collect(paths: list[str]) -> list[Variant]:
    """The runs under `paths`, grouped by variant: a sweep's in its plan's order, others
    in the order found."""
    variants: dict[str, Variant] = {}
    seen: set[str] = set()
    for path in paths:
        if not os.path.isdir(path):
            raise EfflmError(f"{path!r} is not a folder; pass workdirs or a sweep's folder")
        dirs = _run_dirs(path)
        if not dirs:
            raise EfflmError(f"{path!r} holds no training run (no metrics.jsonl beside a "
                             "config.yaml)")
        for d in dirs:
            if os.path.realpath(d) in seen:
                continue
            seen.add(os.path.realpath(d))
            run = _describe(d)
            variant = variants.setdefault(run.variant, Variant(run.variant))
            twin = next((r for r in variant.runs if r.seed == run.seed), None)
            if twin is not None:
                raise EfflmError(f"two runs would be {run.variant!r} seed {run.seed}: "
                                 f"{twin.workdir} and {d}; report them separately")
            variant.runs.append(run)
    order = []
    for path in paths:  # a sweep's variants in its plan's order (the first is the base)
        plan = os.path.join(path, "plan.json")
        if os.path.isfile(plan):
            with open(plan) as f:
                order += list(json.load(f)["variants"])
    rank = {name: i for i, name in enumerate(order)}
    return sorted(variants.values(), key=lambda v: rank.get(v.name, len(rank)))


def mean_std(values: list[float]) -> tuple[float, float | None]:
    """Mean and sample standard deviation (None for a single value)."""
    mean = statistics.fmean(values)
    return mean, (statistics.stdev(values) if len(values) > 1 else None)


# Student's t at 0.975 (two-sided 5%) for 1..30 degrees of freedom.
_T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201,
         2.179, 2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074,
         2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042)


def differs(a: list[float], b: list[float]) -> bool:
    """Welch's t-test at the two-sided 5% level: whether two samples' means differ by
    more than t(0.975, df) standard errors of the difference, df by Welch-Satterthwaite
    rounded down (so never too lenient; 2.042 past 30). False with fewer than two values
    on either side."""
    if len(a) < 2 or len(b) < 2:
        return False
    va, vb = statistics.variance(a) / len(a), statistics.variance(b) / len(b)
    gap = abs(statistics.fmean(a) - statistics.fmean(b))
    if va + vb == 0:
        return gap > 0
    df = (va + vb) ** 2 / (va ** 2 / (len(a) - 1) + vb ** 2 / (len(b) - 1))
    t = _T975[min(max(int(df), 1), len(_T975)) - 1]
    return gap > t * math.sqrt(va + vb)


def _fmt(values: list[float], digits: int = 4) -> str:
    if not values:
        return "—"
    mean, std = mean_std(values)
    return f"{mean:.{digits}f}" + (f" ± {std:.{digits}f}" if std is not None else "")


def _final_and_best(runs: list[RunResult], key: str) -> tuple[list[float], list[float]]:
    final, best = [], []
    for r in runs:
        points = r.evals(key)
        if points:
            final.append(points[-1][1])
            best.append(min(v for _, v in points))
    return final, best


def _tail_means(runs: list[RunResult], key: str) -> list[float]:
    return [m for m in (r.tail_mean(key) for r in runs) if m is not None]


def table(variants: list[Variant]) -> list[str]:
    """The Markdown table (module docstring); a recall column where a run measured recall
    (`eval_recall_accuracy`, the final value), and a column for each MoE statistic
    (`efflm.layers.moe.REPORT_STATISTICS`) that a run logged: the mean over the last
    tenth of its steps, then over seeds."""
    from efflm.layers.moe import REPORT_STATISTICS

    recall = any(r.evals("eval_recall_accuracy") for v in variants for r in v.runs)
    routers = [(title, key) for title, key in REPORT_STATISTICS
               if any(r.evals(key) for v in variants for r in v.runs)]
    lines = ["| variant | seeds | params (active) | train FLOPs/token | steps | "
             "final eval loss | best eval loss | final bits/byte | best bits/byte | "
             "tokens/s | MFU | step memory MiB |" + (" recall |" if recall else "")
             + "".join(f" {title} |" for title, _ in routers),
             "|---" * (12 + recall + len(routers)) + "|"]
    reference = None
    for v in variants:
        runs = v.runs
        loss, best_loss = _final_and_best(runs, "eval_loss")
        bpb, best_bpb = _final_and_best(runs, "eval_bits_per_byte")
        judged = bpb or loss
        mark = ""
        if reference is None:
            reference = judged
        elif differs(judged, reference):
            mark = " *"
        first = runs[0]
        params = f"{first.params / 1e6:.2f}M" + (
            f" ({first.active / 1e6:.2f}M)" if first.active != first.params else "")
        steps = sorted({max((r["step"] for r in run.rows), default=0) for run in runs})
        speeds = [s for s in (r.median("tokens_per_sec") for r in runs) if s is not None]
        mfus = [m for m in (r.median("mfu") for r in runs) if m is not None]
        memory = [m / 2 ** 20 for m in (r.median("step_memory_bytes") for r in runs)
                  if m is not None]
        lines.append(
            f"| {v.name} | {len(runs)} | {params} | {first.flops_per_token / 1e6:.2f}M | "
            f"{', '.join(map(str, steps))} | {_fmt(loss)}{'' if bpb else mark} | "
            f"{_fmt(best_loss)} | {_fmt(bpb)}{mark if bpb else ''} | {_fmt(best_bpb)} | "
            f"{_fmt(speeds, 0)} | {_fmt([100 * m for m in mfus], 2) + '%' if mfus else '—'} | "
            f"{_fmt(memory, 1)} |"
            + (f" {_fmt(_final_and_best(runs, 'eval_recall_accuracy')[0], 3)} |"
               if recall else "")
            + "".join(f" {_fmt(_tail_means(runs, key), 3)} |" for _, key in routers))
    return lines


def _curves(v: Variant, x_of):
    """Steps shared by every seed's eval rows -> (x, mean, low, high) of eval_loss."""
    per_run = [dict(r.evals("eval_loss")) for r in v.runs]
    steps = sorted(set.intersection(*(set(p) for p in per_run))) if per_run else []
    xs, mean, low, high = [], [], [], []
    for s in steps:
        values = [p[s] for p in per_run]
        xs.append(x_of(v.runs[0], s))
        mean.append(statistics.fmean(values))
        low.append(min(values))
        high.append(max(values))
    return xs, mean, low, high


def plots(variants: list[Variant], out: str) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    axes_of = {"loss_vs_steps.png": ("training step", lambda r, s: s),
               "loss_vs_flops.png": ("training FLOPs",
                                     lambda r, s: s * r.flops_per_token * r.tokens_per_step)}
    for name, (label, x_of) in axes_of.items():
        fig, ax = plt.subplots(figsize=(6.4, 4.2))
        for v in variants:
            xs, mean, low, high = _curves(v, x_of)
            if xs:
                line, = ax.plot(xs, mean, marker="o", markersize=3, label=v.name)
                if len(v.runs) > 1:
                    ax.fill_between(xs, low, high, color=line.get_color(), alpha=0.2)
        ax.set_xlabel(label)
        ax.set_ylabel("validation loss (nats/token)")
        if name == "loss_vs_flops.png":
            ax.set_xscale("log")
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        path = os.path.join(out, name)
        fig.savefig(path, dpi=120)
        plt.close(fig)
        written.append(path)
    fig, axes = plt.subplots(1, 2, figsize=(9.6, 3.6), sharey=True)
    names = [v.name for v in variants]
    for ax, key, label, scale in (
            (axes[0], "tokens_per_sec", "tokens/s (median step, mean over seeds)", 1),
            (axes[1], "step_memory_bytes", "train step memory per device (MiB)", 2 ** 20)):
        values = [statistics.fmean([m for m in (r.median(key) for r in v.runs)
                                    if m is not None] or [0.0]) / scale for v in variants]
        ax.barh(names, values)
        ax.set_xlabel(label)
    fig.tight_layout()
    path = os.path.join(out, "throughput_memory.png")
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return written + [path]


def write_report(paths: list[str], out: str) -> str:
    """Collect, write out/report.md and the plots, print the table; returns the report's
    path."""
    variants = collect(paths)
    os.makedirs(out, exist_ok=True)
    lines = table(variants)
    images = plots(variants, out)
    notes = ["", "`*`: the final bits/byte (loss where bits/byte were not measured) differs "
             "from the first row's by Welch's t-test at the two-sided 5% level (seeds as "
             "samples; needs two seeds on both sides). ± is the sample "
             "standard deviation over seeds; — where the runs did not record a figure.", "",
             *[f"![{os.path.basename(p)}]({os.path.basename(p)})" for p in images]]
    path = os.path.join(out, "report.md")
    with open(path, "w") as f:
        f.write("\n".join(["# Runs: " + ", ".join(paths), "", *lines, *notes]) + "\n")
    print("\n".join(lines))
    return path
