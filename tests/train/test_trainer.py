"""The training loop (`train/trainer.py`): metrics and files of a run, bitwise resume,
workdir checks, eval and generate from a workdir, signals."""

import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import time

import jax
import pytest
import yaml
from conftest import SMALL, random_batch

from efflm import mesh as mesh_lib
from efflm.cli import main
from efflm.config import MOVED_KEYS, load_config, to_dict
from efflm.errors import ConfigError
from efflm.flops import train_flops_per_step
from efflm.train.generate import sample
from efflm.train.step import build_program, compiled_memory, count_params
from efflm.train.trainer import (
    load_workdir_config,
    optimizer_differences,
    restore_run,
    shape_differences,
    train,
)

# Constant learning rate: a run of 5 steps then 8 follows the same path as 8 at once.
RESUME = [*SMALL, "optimizer.schedule=constant", "optimizer.warmup_steps=0",
          "logging.every=1", "train.eval_every=0", "checkpoint.every=3", "checkpoint.keep=3",
          "checkpoint.async_save=true"]


def _losses(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    return [r["loss"] for r in rows if "loss" in r], rows


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("straight"))
    train(load_config("tiny", [*RESUME, "train.steps=8", f"train.workdir={workdir}"]))
    return _losses(workdir)[0]


def test_metrics_and_files_of_a_run(tmp_path, uninterrupted, capsys):
    workdir = str(tmp_path)
    cfg = load_config("tiny", [*SMALL, "train.steps=4", "logging.every=2", "train.eval_every=4",
                               "logging.tensorboard=true", f"train.workdir={workdir}"])
    train(cfg)
    _, rows = _losses(workdir)
    assert [r["step"] for r in rows] == [2, 4, 4]
    for key in ("loss", "grad_norm", "learning_rate", "tokens_per_sec", "mfu", "step_time_s"):
        assert key in rows[1]
    assert 0 < rows[1]["mfu"] < 1 and rows[1]["tokens_per_sec"] > 0 and rows[1]["peak_flops"] > 0
    assert rows[1]["mfu"] == pytest.approx(train_flops_per_step(cfg.model, 32, 8)
                                           / rows[1]["step_time_s"] / rows[1]["peak_flops"])
    assert rows[2]["eval_loss"] > 0 and rows[2]["eval_bits_per_byte"] > 0
    # The first row records the compiled step's memory (XLA's memory_analysis): the
    # same figures as the step compiled again here, from the persistent cache.
    program = build_program(cfg)
    with program.context():
        state = program.init(jax.random.key(0))
        batch = mesh_lib.global_batch(random_batch(cfg), program.mesh)
        memory = compiled_memory(program.train_step.lower(state, batch).compile())
    assert {k: rows[0][k] for k in memory} == memory and "step_memory_bytes" not in rows[1]
    assert memory["step_memory_bytes"] == (memory["memory_argument_bytes"] + memory[
        "memory_output_bytes"] + memory["memory_temp_bytes"] - memory["memory_alias_bytes"])
    assert memory["memory_argument_bytes"] > 4 * count_params(state.params) / 8  # 8 devices
    # `efflm eval --batches N` evaluates the same sample as training did.
    capsys.readouterr()
    assert main(["eval", "--workdir", workdir, "--batches", "2"]) == 0
    again = json.loads(capsys.readouterr().out)
    for key in ("eval_loss", "eval_bits_per_byte", "eval_tokens"):
        assert again[key] == pytest.approx(rows[2][key], rel=1e-5)
    assert os.listdir(os.path.join(workdir, "tensorboard"))
    assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["4"]
    assert load_config(os.path.join(workdir, "config.yaml")).train.steps == 4
    assert len(uninterrupted) == 8 and uninterrupted[-1] < uninterrupted[0]


def test_resume_is_bitwise_exact(tmp_path, uninterrupted):
    workdir = str(tmp_path)
    cfg = [*RESUME, f"train.workdir={workdir}"]
    train(load_config("tiny", [*cfg, "train.steps=5"]))
    assert sorted(int(s) for s in os.listdir(os.path.join(workdir, "checkpoints"))) == [3, 5]
    train(load_config("tiny", [*cfg, "train.steps=8"]))
    assert _losses(workdir)[0] == uninterrupted


def _to_earlier_layout(d: dict) -> dict:
    """A nested config dict as efflm wrote it before kinds had their own sections: each
    moved key back at its flat place, the emptied sections gone."""
    flat = {}

    def walk(node, prefix):
        for k, v in node.items():
            if isinstance(v, dict) and v:
                walk(v, f"{prefix}{k}.")
            elif not isinstance(v, dict):
                flat[f"{prefix}{k}"] = v

    walk(d, "")
    for old, new in MOVED_KEYS.items():
        if new in flat:
            flat[old] = flat.pop(new)
    out = {}
    for key, value in flat.items():
        node = out
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return out


def test_a_workdir_of_the_earlier_layout_resumes_bitwise(tmp_path, uninterrupted, caplog,
                                                         capsys):
    """A config.yaml saved with the earlier flat keys is read with them moved (one line
    says so): the run resumes bitwise, and eval reads the workdir."""
    workdir = str(tmp_path)
    cfg = [*RESUME, f"train.workdir={workdir}"]
    train(load_config("tiny", [*cfg, "train.steps=5"]))
    path = os.path.join(workdir, "config.yaml")
    with open(path) as f:
        saved = yaml.safe_load(f)
    earlier = _to_earlier_layout(saved)
    assert earlier["model"]["attention"]["gate_rank"] == 16 and "files" not in earlier["data"]
    with open(path, "w") as f:
        yaml.safe_dump(earlier, f)
    capsys.readouterr()
    assert main(["eval", "--workdir", workdir, "--batches", "1"]) == 0
    assert json.loads(capsys.readouterr().out)["step"] == 5
    train(load_config("tiny", [*cfg, "train.steps=8"]))
    assert _losses(workdir)[0] == uninterrupted
    assert any("keys of an earlier efflm" in r.getMessage() for r in caplog.records)
    with open(path) as f:  # rewritten by the resumed run in the current layout
        assert yaml.safe_load(f) == saved | {"train": {**saved["train"], "steps": 8}}


def test_corrupt_latest_checkpoint_falls_back(tmp_path, uninterrupted, caplog):
    workdir = str(tmp_path)
    cfg = [*RESUME, f"train.workdir={workdir}"]
    train(load_config("tiny", [*cfg, "train.steps=5"]))
    latest = os.path.join(workdir, "checkpoints", "5", "state")
    for root, _, files in os.walk(latest):
        for name in files:
            with open(os.path.join(root, name), "wb") as f:
                f.write(b"\x00garbage")
    train(load_config("tiny", [*cfg, "train.steps=8"]))
    assert "step 5" in caplog.text and "could not be read" in caplog.text
    assert _losses(workdir)[0] == uninterrupted  # rows 4..5 were redone from step 3


def test_raising_train_steps_continues_the_schedule(tmp_path):
    workdir = str(tmp_path)
    cfg = [*SMALL, "optimizer.warmup_steps=1", "optimizer.lr=1e-3", "optimizer.min_lr_ratio=0.1",
           "logging.every=1", "train.eval_every=0", f"train.workdir={workdir}"]
    saved = lambda: load_config(os.path.join(workdir, "config.yaml")).optimizer.decay_steps
    train(load_config("tiny", [*cfg, "train.steps=4"]))
    assert saved() == 4  # 0 resolved when the run was first written
    train(load_config("tiny", [*cfg, "train.steps=6"]))
    assert saved() == 4
    lrs = [r["learning_rate"] for r in _losses(workdir)[1]]
    assert len(lrs) == 6 and lrs[1] > lrs[2] > lrs[3] > lrs[4]  # decaying until step 4,
    assert lrs[4] == lrs[5] == pytest.approx(1e-4)  # then held, not stretched
    # An explicit decay_steps is a new plan: it wins over the saved one.
    train(load_config("tiny", [*cfg, "train.steps=7", "optimizer.decay_steps=20"]))
    assert saved() == 20 and _losses(workdir)[1][-1]["learning_rate"] > 1e-4


def test_incompatible_workdir_is_refused_and_left_alone(tmp_path):
    workdir = str(tmp_path)
    train(load_config("tiny", [*SMALL, "train.steps=2", "train.eval_every=0",
                               f"train.workdir={workdir}"]))
    before = {p: os.path.getmtime(os.path.join(workdir, p)) for p in os.listdir(workdir)}
    with pytest.raises(ConfigError, match="model.d_model: 64 -> 32.*train.fresh=true"):
        train(load_config("tiny", [*SMALL, "model.d_model=32", f"train.workdir={workdir}"]))
    # Another optimizer's state does not fit; its hyperparameters may change.
    with pytest.raises(ConfigError, match="optimizer.name=adamw .now lion.*train.fresh=true"):
        train(load_config("tiny", [*SMALL, "optimizer.name=lion", f"train.workdir={workdir}"]))
    saved = load_config("tiny", [*SMALL, "optimizer.name=adafactor"])
    now = load_config("tiny", [*SMALL, "optimizer.name=adafactor",
                               "optimizer.adafactor.factored=false",
                               "optimizer.adafactor.decay_rate=0.9"])
    assert optimizer_differences(saved, now) == [("optimizer.adafactor.factored", True, False)]
    assert {p: os.path.getmtime(os.path.join(workdir, p)) for p in os.listdir(workdir)} == before
    train(load_config("tiny", [*SMALL, "model.d_model=32", "train.steps=2", "train.fresh=true",
                               "train.eval_every=0", f"train.workdir={workdir}"]))
    assert load_config(os.path.join(workdir, "config.yaml")).model.d_model == 32


def _tree(workdir):
    """Every file and folder under `workdir`, with its size and modification time."""
    return {os.path.join(r, n): (os.path.getsize(os.path.join(r, n)),
                                 os.path.getmtime(os.path.join(r, n)))
            for r, dirs, names in os.walk(workdir) for n in dirs + names}


def test_resume_may_change_how_the_model_is_computed(tmp_path):
    workdir = str(tmp_path)
    cfg = [*SMALL, "train.eval_every=0", "logging.every=1", f"train.workdir={workdir}"]
    train(load_config("tiny", [*cfg, "train.steps=2"]))
    with pytest.raises(ConfigError, match="model.scan_layers: False -> True"):
        train(load_config("tiny", [*cfg, "train.steps=3", "model.scan_layers=true"]))
    train(load_config("tiny", [*cfg, "train.steps=3", "model.remat=full",
                               "model.attention.impl=xla", "model.attention.softmax.block_size=16",
                               "model.dtype=bfloat16", "model.max_seq_len=128",
                               "model.init_std=0.05"]))
    assert [r["step"] for r in _losses(workdir)[1]] == [1, 2, 3]
    assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["2", "3"]


def test_a_changed_default_blocks_only_the_runs_it_changes(tmp_path):
    """A workdir saved before gated_deltanet.value_expansion and conv_init existed ran
    values as wide as keys and uniform taps: its config reads so (written since: what it
    says). The setting blocks resuming a
    gated DeltaNet run, not a run of another kind."""
    saved = to_dict(load_config("tiny_gdn"))
    for key in ("value_expansion", "conv_init"):
        del saved["model"]["attention"]["gated_deltanet"][key]
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(saved))
    read = (load_workdir_config(str(tmp_path)),
            load_config(str(tmp_path / "config.yaml"), saved=True))
    assert [c.model.attention.gated_deltanet.value_expansion for c in read] == [1, 1]
    assert [c.model.attention.gated_deltanet.conv_init for c in read] == ["uniform"] * 2
    assert shape_differences(read[0], load_config("tiny_gdn")) == [
        "model.attention.gated_deltanet.value_expansion: 1 -> 2"]
    softmax = load_config("tiny", ["model.attention.gated_deltanet.value_expansion=1"])
    assert shape_differences(softmax, load_config("tiny")) == []


def test_changed_data_order_says_which_setting_and_how_to_resume(tmp_path, capsys):
    workdir = str(tmp_path / "w")
    cfg = [*SMALL, "train.eval_every=0", f"train.workdir={workdir}"]
    train(load_config("tiny", [*cfg, "train.steps=2"]))
    before = _tree(workdir)
    for change, words in [("train.batch_size=16", "train.batch_size=8 (now 16)"),
                          ("data.seq_len=16", "data.seq_len=32 (now 16)"),
                          ("train.seed=3", "train.seed=0 (now 3)"),
                          ("data.source=files data.files.paths=x.txt",
                           "data.source=pycode (now files)")]:
        assert main(["train", *cfg, "train.steps=3", *change.split()]) == 2
        err = capsys.readouterr().err
        assert words in err and "to resume, pass" in err and err.count("\n") == 1
        assert "fresh" not in err
        assert _tree(workdir) == before
    # Without the saved config, the checkpoint's own data position names the setting.
    os.remove(os.path.join(workdir, "config.yaml"))
    assert main(["train", *cfg, "train.steps=3", "train.batch_size=16"]) == 2
    err = capsys.readouterr().err
    assert "train.batch_size: saved 8, now 16" in err and "set these back" in err
    assert not os.path.exists(os.path.join(workdir, "config.yaml"))
    assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["2"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A workdir with a 2-step run (a checkpoint at step 2); copy it before changing it."""
    workdir = str(tmp_path_factory.mktemp("trained"))
    train(load_config("tiny", [*SMALL, "train.steps=2", "train.eval_every=0",
                               f"train.workdir={workdir}"]))
    return workdir


def test_eval_and_generate_cli(tmp_path, capsys, trained):
    workdir = trained
    before = _tree(workdir)
    capsys.readouterr()
    assert main(["eval", "--workdir", workdir, "--batches", "2"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["step"] == 2 and result["eval_bits_per_byte"] > 0
    assert result["eval_perplexity"] == pytest.approx(2.718281828 ** result["eval_loss"])
    # Without --batches: the whole split, under its own names.
    val = tmp_path / "val.txt"
    val.write_text("def f(x):\n    return x + 1\n" * 20)
    assert main(["eval", "--workdir", workdir, "data.source=files", f"data.files.paths={val}",
                 f"data.files.val_paths={val}"]) == 0
    full = json.loads(capsys.readouterr().out)
    assert full["full_eval_tokens"] == len(val.read_text()) + 1 and "eval_loss" not in full
    # Greedy sampling: the continuation is what `sample` gives, whatever the seed.
    outs = []
    for seed in ("1", "2"):
        assert main(["generate", "--workdir", workdir, "--prompt", "def ", "--max-new-tokens",
                     "5", "--temperature", "0", "--seed", seed]) == 0
        outs.append(capsys.readouterr().out)
    cfg, program, state, tokenizer, _ = restore_run(workdir)
    with program.context():
        ids = sample(program.model, state.variables(), tokenizer.encode("def "),
                     max_new_tokens=5, temperature=0.0, top_k=0, seed=0,
                     stop_id=tokenizer.eos_id, bos_id=tokenizer.bos_id)
    assert len(ids) == 5 and tokenizer.decode(ids)
    assert outs[0] == outs[1] == "def " + tokenizer.decode(ids) + "\n"
    # The checkpoint is layout-free: under sequence parallelism (ring attention in eval,
    # the cache when sampling) the same numbers and text.
    ring = ["mesh.data=2", "mesh.sequence=4"]
    assert main(["eval", "--workdir", workdir, "--batches", "2", *ring]) == 0
    assert json.loads(capsys.readouterr().out)["eval_loss"] == pytest.approx(
        result["eval_loss"], rel=1e-5)
    assert main(["generate", "--workdir", workdir, "--prompt", "def ", "--max-new-tokens",
                 "5", "--temperature", "0", *ring]) == 0
    assert capsys.readouterr().out == outs[0]
    assert _tree(workdir) == before  # eval and generate only read
    assert main(["eval", "--workdir", str(tmp_path / "nope")]) == 2
    assert "not a training workdir" in capsys.readouterr().err


@pytest.mark.parametrize("args, words", [
    (["model.d_modle=3"], "unknown config key"),
    (["train.steps=ten"], "train.steps"),
    (["mesh.data=3"], "mesh sizes"),
    (["train.batch_size=12"], "not divisible by the 8 data shards"),
    (["data.source=files", "data.files.paths=/does/not/exist.txt"], "does not exist"),
    (["data.seq_len=100"], "larger than the model supports"),
    (["model.attention.head_dim=7"], "head_dim=7 is odd"),
    (["optimizer.lr=nan"], "optimizer.lr must be a finite number"),
    (["model.attention.rope_theta=0"], "model.attention.rope_theta must be > 0"),
    (["model.norm_eps=-1"], "model.norm_eps must be > 0"),
    (["train.workdir={tmp}/file/w"], "cannot be created"),
    (["mesh.data=1", "mesh.sequence=8", "data.seq_len=36"],
     "data.seq_len=36 is not divisible by mesh.sequence=8"),
    (["mesh.data=2", "mesh.sequence=4", "model.attention.kind=linear",
      "model.attention.context_parallel=ring"],
     "model.attention.kind=linear has no context_parallel=ring form"),
    (["model.attention.context_parallel=rings"], "model.attention.context_parallel"),
    (["mesh.data=2", "mesh.sequence=4", "data.seq_len=36",
      "model.attention.context_parallel=zigzag"],
     "data.seq_len=36 is not divisible by 2 x mesh.sequence=4"),
    (["mesh.data=2", "mesh.sequence=4", "model.attention.kind=power",
      "model.attention.context_parallel=allscan"],
     "model.attention.kind=power has no context_parallel=allscan form"),
    (["mesh.data=1", "mesh.sequence=8", "model.attention.context_parallel=ulysses"],
     "4 query heads per tensor shard do not divide over mesh.sequence=8"),
    (["mesh.data=2", "mesh.sequence=4", "model.attention.kind=sliding",
      "model.attention.context_parallel=halo"],
     "model.attention.sliding.sinks=4 under mesh.sequence=4: the halo strategy carries no"),
])
def test_bad_input_exits_2_with_one_line(tmp_path, capsys, args, words):
    (tmp_path / "file").write_text("not a directory")
    args = [a.format(tmp=tmp_path) for a in args]
    assert main(["train", "--config", "tiny", *SMALL, f"train.workdir={tmp_path}/w",
                 *args]) == 2
    err = capsys.readouterr().err
    assert words in err and err.count("\n") == 1
    assert [p for p in _tree(tmp_path) if os.path.isfile(p)] == [str(tmp_path / "file")]


@pytest.mark.parametrize("command, config, words", [
    (["eval", "--batches", "-1"], None, "--batches must be >= 0"),
    (["generate", "--prompt", "a", "--top-k", "100000"], None, "--top-k 100000 is larger"),
    (["generate", "--prompt", "a", "--max-new-tokens", "-1"], None,
     "max_new_tokens must be >= 1"),
    (["eval"], "model: [256\n", "cannot be read"),
    (["eval"], "- model\n- data\n", "must be a mapping of config keys, not a list"),
    (["eval"], "", "must be a mapping"),
    (["generate", "--prompt", "a"], "- 1\n", "must be a mapping"),
    (["eval"], "checkpoints", "has no checkpoint yet"),
])
def test_bad_eval_and_generate_input_exits_2_touching_nothing(tmp_path, capsys, trained,
                                                                command, config, words):
    workdir = str(tmp_path / "w")
    shutil.copytree(trained, workdir)
    if config == "checkpoints":
        shutil.rmtree(os.path.join(workdir, "checkpoints"))
    elif config is not None:
        with open(os.path.join(workdir, "config.yaml"), "w") as f:
            f.write(config)
    before = _tree(workdir)
    assert main([command[0], "--workdir", workdir, *command[1:]]) == 2
    err = capsys.readouterr().err
    assert words in err and err.count("\n") == 1
    assert _tree(workdir) == before


def test_resumed_run_leaves_no_duplicate_tensorboard_points(tmp_path):
    workdir = str(tmp_path)
    cfg = [*SMALL, "train.steps=4", "logging.every=1", "train.eval_every=3",
           "checkpoint.every=2", "logging.tensorboard=true", f"train.workdir={workdir}"]
    train(load_config("tiny", cfg))
    shutil.rmtree(os.path.join(workdir, "checkpoints", "4"))  # as if it crashed before saving
    time.sleep(1.1)  # event files are named by the second
    train(load_config("tiny", cfg))  # resumes at 2: steps 3 and 4 again
    points = _tensorboard_points(os.path.join(workdir, "tensorboard"))
    assert sorted(step for tag, step in points if tag == "loss") == [1, 2, 3, 4]
    assert sorted(step for tag, step in points if tag == "eval_loss") == [3, 4]


def _tensorboard_points(logdir):
    """(tag, step) of every scalar TensorBoard shows: a SessionLog START at step S hides
    the points logged before it at steps >= S."""
    from tensorboardX.proto.event_pb2 import Event, SessionLog

    points = []
    for name in sorted(os.listdir(logdir)):
        with open(os.path.join(logdir, name), "rb") as f:
            data = f.read()
        offset = 0
        while offset < len(data):
            (length,) = struct.unpack("<Q", data[offset:offset + 8])
            event = Event.FromString(data[offset + 12:offset + 12 + length])
            offset += 12 + length + 4
            if event.session_log.status == SessionLog.START:
                points = [(tag, step) for tag, step in points if step < event.step]
            points += [(v.tag, event.step) for v in event.summary.value]
    return points


def test_empty_data_file_is_an_error(tmp_path, capsys):
    (tmp_path / "empty.txt").write_text("")
    assert main(["train", *SMALL, "data.source=files", f"data.files.paths={tmp_path}/empty.txt",
                 f"train.workdir={tmp_path}/w"]) == 2
    assert "empty" in capsys.readouterr().err


def _cli(*args):
    return [sys.executable, "-m", "efflm.cli", *args]


def test_sigterm_saves_and_the_same_command_resumes(tmp_path):
    workdir = str(tmp_path / "run")
    args = _cli("train", "--config", "tiny", *SMALL, "train.steps=40", "logging.every=1",
                "train.eval_every=0", "checkpoint.every=0", f"train.workdir={workdir}")
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    metrics = os.path.join(workdir, "metrics.jsonl")
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if os.path.exists(metrics) and len(open(metrics).readlines()) >= 3:
            break
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, out
    stopped = int(os.listdir(os.path.join(workdir, "checkpoints"))[0])
    assert 3 <= stopped < 40 and f"at step {stopped}" in out
    done = subprocess.run(args, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    resumed, _ = _losses(workdir)
    straight = str(tmp_path / "straight")
    train(load_config("tiny", [*SMALL, "train.steps=40", "logging.every=1",
                               "train.eval_every=0", f"train.workdir={straight}"]))
    assert resumed == _losses(straight)[0]
