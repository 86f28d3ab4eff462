"""Sweeps (`efflm sweep`) and the report (`efflm report`): budgets, the runner's skip,
resume and failure handling, the table's statistics, the plots and bad sweep files."""

import json
import os
import statistics

import pytest
import yaml

from efflm.cli import main
from efflm.config import load_config
from efflm.flops import train_flops_per_step
from efflm.train import sweep as sweep_lib
from efflm.train.report import RunResult, Variant, differs, table

MICRO = ["model.d_model=32", "model.num_layers=1", "model.attention.num_heads=2",
         "model.mlp.d_ff=64", "model.max_seq_len=32", "data.seq_len=16",
         "train.batch_size=8", "train.eval_every=2", "train.eval_batches=1",
         "optimizer.warmup_steps=1"]


def _write(tmp_path, name="s.yaml", **fields):
    path = tmp_path / name
    path.write_text(yaml.safe_dump({"base": "tiny", "overrides": MICRO, **fields},
                                   sort_keys=False))
    return str(path)


def _in_process(stop_after=None):
    """A runner that trains in this process (the real one starts a process per run);
    `stop_after`: {label: steps}, runs killed after that many steps (exit 1)."""
    calls = []

    def run(run, base, log_path):
        calls.append(run.label)
        extra = []
        if stop_after and run.label in stop_after:
            extra = [f"train.steps={stop_after[run.label]}"]
        code = main(["train", "--config", base, *run.overrides, *extra,
                     f"train.workdir={run.workdir}", "logging.progress=false"])
        return (1, "killed") if extra else (code, "")
    return run, calls


def test_sweep_resumes_records_failures_and_reports(tmp_path, capsys):
    """Two variants x two seeds: one run killed halfway is recorded and the others
    finish; the rerun trains only that one (resuming it) and writes the table (mean and
    standard deviation of the seeds' final figures) and valid PNG plots; a variant
    changed afterwards is refused by name, finished runs untouched."""
    path = _write(tmp_path, variants={"softmax": [], "linear": ["model.attention.kind=linear"]},
                  seeds=2, budget={"kind": "tokens", "steps": 2})
    out = str(tmp_path / "out")
    runner, calls = _in_process(stop_after={"linear seed 1": 1})
    assert sweep_lib.run_sweep(path, out, runner) == 1
    status = json.load(open(os.path.join(out, "status.json")))
    assert status["linear/seed-1"]["state"] == "failed"
    assert sum(s["state"] == "done" for s in status.values()) == 3
    runner, calls = _in_process()
    assert sweep_lib.run_sweep(path, out, runner) == 0
    assert calls == ["linear seed 1"]
    rows = [json.loads(line) for line in open(os.path.join(out, "linear", "seed-1",
                                                           "metrics.jsonl"))]
    assert [r["step"] for r in rows if "loss" in r] == [1, 2]  # resumed, not restarted
    finals = [[json.loads(line) for line in open(os.path.join(out, v, f"seed-{s}",
                                                              "metrics.jsonl"))]
              for v in ("softmax", "linear") for s in (0, 1)]
    bpb = [[r["eval_bits_per_byte"] for r in rows if "eval_bits_per_byte" in r][-1]
           for rows in finals]
    report = open(os.path.join(out, "report.md")).read()
    lines = [line for line in report.splitlines() if line.startswith("| softmax")
             or line.startswith("| linear")]
    assert [line.split("|")[1].strip() for line in lines] == ["softmax", "linear"]
    for line, values in zip(lines, (bpb[:2], bpb[2:])):
        cells = [c.strip() for c in line.split("|")]
        want = f"{statistics.fmean(values):.4f} ± {statistics.stdev(values):.4f}"
        assert cells[8].rstrip(" *") == want, (cells, want)
    for name in ("loss_vs_steps.png", "loss_vs_flops.png", "throughput_memory.png"):
        with open(os.path.join(out, name), "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    before = open(os.path.join(out, "softmax", "seed-0", "metrics.jsonl")).read()
    changed = _write(tmp_path, variants={"softmax": ["optimizer.lr=0.1"],
                                         "linear": ["model.attention.kind=linear"]},
                     seeds=2, budget={"kind": "tokens", "steps": 2})
    capsys.readouterr()
    assert main(["sweep", changed, "--out", out]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "variant 'softmax' changed" in err[0], err
    assert open(os.path.join(out, "softmax", "seed-0", "metrics.jsonl")).read() == before
    assert main(["sweep", path, "--out", out, "--steps", "3"]) == 2  # another budget
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "use another --out" in err[0], err


def test_flop_matched_budget_equalises_training_flops(tmp_path):
    """Checked on the plan, without training: a variant that costs more per step gets
    fewer steps, and every variant's steps x FLOPs per step equals the base's within one
    step's worth; the warm-up scales with the steps."""
    variants = {"base": [], "wide": ["model.mlp.d_ff=512"], "narrow": ["model.mlp.d_ff=16"]}
    sweep = sweep_lib.load_sweep(_write(tmp_path, variants=variants,
                                        budget={"kind": "flops", "steps": 40}))
    runs = {r.variant: r for r in sweep_lib.plan(sweep, str(tmp_path / "out"))}
    flops = {name: train_flops_per_step(*(lambda c: (c.model, c.data.seq_len,
                                                     c.train.batch_size))(
        load_config("tiny", MICRO + own))) for name, own in variants.items()}
    assert runs["wide"].steps < runs["base"].steps == 40 < runs["narrow"].steps
    budget = 40 * flops["base"]
    for name, run in runs.items():
        assert abs(run.steps * flops[name] - budget) <= flops[name] / 2 + 1e-6
    warmup = [o for o in runs["narrow"].overrides if o.startswith("optimizer.warmup_steps=")]
    assert warmup[-1] == f"optimizer.warmup_steps={round(runs['narrow'].steps / 40)}"


def test_time_budget_measures_each_config_once(tmp_path, monkeypatch):
    """Equal time: a variant whose step takes half the base's trains twice the steps;
    a recorded plan keeps its steps and the base's time without measuring again."""
    measured = []

    def calibrate(base, overrides, steps):
        measured.append(overrides)
        return 0.5 if "model.mlp.d_ff=16" in overrides else 1.0

    monkeypatch.setattr(sweep_lib, "calibrate", calibrate)
    sweep = sweep_lib.load_sweep(_write(tmp_path, variants={"base": [], "fast": [
        "model.mlp.d_ff=16"]}, budget={"kind": "time", "steps": 10}))
    runs = sweep_lib.plan(sweep, str(tmp_path))
    assert [(r.variant, r.steps) for r in runs] == [("base", 10), ("fast", 20)]
    assert measured == [MICRO, MICRO + ["model.mlp.d_ff=16"]]  # each distinct config once
    recorded = {"base_cost": sweep.base_cost, "variants": {
        "base": {"overrides": [], "steps": 10}}}
    measured.clear()
    assert [r.steps for r in sweep_lib.plan(sweep, str(tmp_path), recorded)] == [10, 20]
    assert measured == [MICRO + ["model.mlp.d_ff=16"]]  # the new variant alone


def test_grid_crossed_with_variants_and_shipped_sweeps(tmp_path):
    """A grid crosses every variant; its values (floats, booleans, text with a colon)
    name the folders and pass as overrides. Every shipped sweep file resolves."""
    sweep = sweep_lib.load_sweep(_write(tmp_path, variants={"a": [], "b": [
        "model.mlp.d_ff=16"]}, grid={"optimizer.lr": [0.001, 0.003],
                                     "model.sparsity.nm": ["2:4", ""]},
        budget={"kind": "tokens", "steps": 4}))
    assert list(sweep.variants) == ["a,lr=0.001,nm=2_4", "a,lr=0.001,nm=_",
                                    "a,lr=0.003,nm=2_4", "a,lr=0.003,nm=_",
                                    "b,lr=0.001,nm=2_4", "b,lr=0.001,nm=_",
                                    "b,lr=0.003,nm=2_4", "b,lr=0.003,nm=_"]
    assert sweep.variants["b,lr=0.003,nm=2_4"] == ["model.mlp.d_ff=16", "optimizer.lr=0.003",
                                                   "model.sparsity.nm=2:4"]
    shipped = os.path.join(os.path.dirname(sweep_lib.configs.__file__), "sweeps")
    names = sorted(f[:-5] for f in os.listdir(shipped))
    assert names == ["attention", "blockffn", "depth", "moe_leverage", "moe_routers",
                     "moe_steps", "number_formats", "optimizers"]
    for name in names:
        assert len(sweep_lib.load_sweep(name).variants) >= 2, name


def test_table_marks_differences_beyond_seed_noise():
    """Mean ± sample standard deviation over seeds; `*` where the final bits per byte
    differs from the first row's by Welch's t-test at 5%, not with one seed; a recall
    column where runs measured recall; router statistics where logged."""
    assert differs([1.0, 1.1, 0.9], [2.0, 2.1, 1.9])
    assert not differs([1.0, 1.5, 0.5], [1.2, 0.7, 1.7])
    assert not differs([1.0], [5.0])
    # Two seeds each, 3 standard errors apart: beyond 2 (a normal's 5%), not beyond
    # t(0.975, 2) = 4.30 (Welch's df here is 2).
    assert not differs([0.0, 2.0], [3 * 2 ** 0.5, 3 * 2 ** 0.5 + 2])
    assert differs([0.0, 2.0], [5 * 2 ** 0.5, 5 * 2 ** 0.5 + 2])

    def variant(name, bpbs, recall=None):
        runs = [RunResult(name, seed, "", [{"step": 5, "eval_loss": b, "eval_bits_per_byte": b,
                                            **({"eval_recall_accuracy": recall}
                                               if recall is not None else {})}],
                          1000, 1000, 6e6, 64) for seed, b in enumerate(bpbs)]
        return Variant(name, runs)

    rows = table([variant("base", [1.0, 1.1, 0.9]), variant("far", [2.0, 2.1, 1.9]),
                  variant("near", [1.0, 1.2]), variant("one", [3.0], recall=0.5)])
    cells = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[1:-1]]
             for line in rows[2:]}
    assert cells["base"][7] == "1.0000 ± 0.1000"
    assert cells["far"][7] == "2.0000 ± 0.1000 *"
    assert not cells["near"][7].endswith("*") and not cells["one"][7].endswith("*")
    assert cells["one"][12] == "0.500" and cells["base"][12] == "—"
    # Router statistics: the mean over the last tenth of the steps, a column if logged.
    cv = [{"step": s, "expert_load_cv": v} for s, v in ((80, 9.0), (90, 0.2), (100, 0.4))]
    runs = [RunResult("moe", 0, "", cv, 1000, 1000, 6e6, 64)]
    rows = table([variant("base", [1.0]), Variant("moe", runs)])
    assert rows[0].endswith(" load CV |") and "sparsity" not in rows[0]
    assert [c.strip() for c in rows[3].split("|")[1:-1]][-1] == "0.300"
    assert [c.strip() for c in rows[2].split("|")[1:-1]][-1] == "—"


@pytest.mark.parametrize("fields, expected", [
    ({"variants": {"a": [], "b": ["model.nope=1"]}}, "variant 'b'"),
    ({"variants": {"a": ["model.attention.kind=softmx"]}}, "variant 'a'"),
    ({"variants": {"a": []}, "grid": {"optimizer.lr": []}}, "grid"),
    ({"variants": {"a": []}, "grid": {}}, "grid"),
    ({"variants": {"a": [], "b": ["model.mlp.d_ff=4096"]},
      "budget": {"kind": "flops", "steps": 1}}, "variant 'b'"),
    ({"variants": {"a": []}, "seeds": 0}, "seeds"),
    ({"variants": {"a": []}, "budget": {"kind": "energy", "steps": 5}}, "budget.kind"),
    ({"variants": {"a": []}, "budget": 100}, "budget"),
    ({"variants": {"logs": []}}, "variant 'logs'"),
    ({}, "no variants"),
])
def test_bad_sweep_files_exit_2_with_one_line(tmp_path, capsys, fields, expected):
    path = _write(tmp_path, **{"budget": {"kind": "tokens", "steps": 5}, **fields})
    assert main(["sweep", path, "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and expected in err[0], err
    assert not os.path.exists(tmp_path / "out")


def test_duplicate_variant_names_are_refused(tmp_path, capsys):
    path = tmp_path / "dup.yaml"
    path.write_text("base: tiny\nvariants:\n  a: []\n  a: [optimizer.lr=0.1]\n"
                    "budget: {kind: tokens, steps: 5}\n")
    assert main(["sweep", str(path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "'a' appears twice" in err[0], err


def test_report_of_nothing_exits_2(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    for path in (tmp_path / "missing", tmp_path / "empty"):
        assert main(["report", str(path), "--out", str(tmp_path / "out")]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and str(path) in err[0], err
    assert not os.path.exists(tmp_path / "out")


def test_a_run_is_its_own_process(tmp_path):
    """The runner starts `efflm train` in a new process and reports its exit status and
    last line (here a bad setting: exit 2, the message)."""
    run = sweep_lib.Run("v", 0, ["model.attention.kind=nope"], 1, str(tmp_path / "wd"))
    code, last = sweep_lib.launch(run, "tiny", str(tmp_path / "log.txt"))
    assert code == 2 and "model.attention.kind" in last
    assert not os.path.exists(tmp_path / "wd")
