"""The training loop: data -> step -> metrics -> checkpoints, resumable."""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import shutil
import signal
import time

import flax
import jax
import jax.numpy as jnp
import numpy as np
import yaml

from efflm import distributed
from efflm import mesh as mesh_lib
from efflm.config import (
    DATA_ORDER_KEYS,
    FAMILIES,
    RESUMABLE_MODEL_KEYS,
    SHAPE_KEYS,
    Config,
    config_from_dict,
    flatten,
    load_config,
    to_dict,
    to_yaml,
)
from efflm.data import (
    SOURCES,
    TOKENIZERS,
    data_tokenizer,
    make_eval_iterator,
    make_train_iterator,
)
from efflm.data.sources import make_source, mixture_parts
from efflm.errors import CheckpointError, ConfigError, EfflmError
from efflm.flops import PeakMeter, inactive_params, train_flops_per_step
from efflm.layers.contract import CALIBRATION
from efflm.layers.plan import check_mesh, not_causal
from efflm.layers.quant import QUANT
from efflm.train.checkpoint import Checkpointer, abstract_with_shardings
from efflm.train.metrics import MetricsWriter, truncate_jsonl
from efflm.train.optim import OPTIMIZERS
from efflm.train.step import (
    Program,
    TrainState,
    build_program,
    compiled_memory,
    count_params,
    loss_mask,
)

log = logging.getLogger("efflm")

CONFIG_FILE = "config.yaml"
CHECKPOINT_DIR = "checkpoints"


def shape_differences(old: Config, new: Config) -> list[str]:
    """`key: old -> new` for every model-shape setting that differs, leaving out the own
    settings of kinds neither run uses (and model.quant.* where the new run adds learned
    quantisation scales to a full-precision one: `adds_quant_scales`)."""
    a, b = flatten(to_dict(old)), flatten(to_dict(new))
    adding = adds_quant_scales(old, new)
    # The tokenizer's own settings that fix its ids (its file's hash, its specials).
    tokenizer = _fixed_own_keys("data", new.data.tokenizer, TOKENIZERS[new.data.tokenizer])
    unused = tuple(f"{f.path}.{kind}." for f in FAMILIES for kind in f.kinds()
                   if kind not in f.chosen(old) | f.chosen(new))
    return [f"{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in sorted(set(a) | set(b))
            if (k.startswith(SHAPE_KEYS) and k not in RESUMABLE_MODEL_KEYS or k in tokenizer)
            and a.get(k) != b.get(k) and not k.startswith(unused)
            and not (adding and k.startswith("model.quant."))]


def adds_quant_scales(old: Config, new: Config) -> bool:
    """Whether `new` resumes full-precision `old` to train learned quantisation step
    sizes alone (train.trainable=quant_scales, EfficientQAT's end-to-end phase)."""
    fmt = QUANT[new.model.quant.kind]
    return (QUANT[old.model.quant.kind] is None and new.train.trainable == "quant_scales"
            and fmt is not None and bool(fmt.scale_params))


def state_layout_changes(old: Config, new: Config) -> list[str]:
    """What a resume from `old`'s checkpoints changes in the train state's layout, one
    line each (a run that continues as it was: [])."""
    lines = []
    if adds_quant_scales(old, new):
        lines.append(f"model.quant.kind none -> {new.model.quant.kind}: its step sizes and "
                     "zero points start from the restored weights' ranges")
    if old.train.trainable != new.train.trainable:
        lines.append(f"train.trainable {old.train.trainable} -> {new.train.trainable}: the "
                     "optimizer state of the frozen parameters is dropped, and the "
                     "trained ones start from a fresh one")
    return lines


def data_order_differences(old: Config, new: Config) -> list[tuple[str, object, object]]:
    """(key, old, new) for every setting of the data order that differs."""
    # With the source's own settings that fix its items (each mixed source's too).
    names = [new.data.source, *(n for n, _, _ in mixture_parts(new.data) or ())]
    own = [k for name in names for k in _fixed_own_keys("data", name, SOURCES[name])]
    return _differences(old, new, (*DATA_ORDER_KEYS, *own))


def optimizer_differences(old: Config, new: Config) -> list[tuple[str, object, object]]:
    """(key, old, new) for the optimizer settings that shape its state: its name, and
    its own settings that are not `resumable`."""
    name = new.optimizer.name
    return _differences(old, new, ("optimizer.name",
                                   *_fixed_own_keys("optimizer", name, OPTIMIZERS[name])))


def _fixed_own_keys(section: str, name: str, kind) -> list[str]:
    """`section.name.field` for each of a kind's own settings a resume may not change."""
    fields = dataclasses.fields(kind.settings) if kind.settings else ()
    return [f"{section}.{name}.{f.name}" for f in fields if f.name not in kind.resumable]


def _differences(old: Config, new: Config, keys) -> list[tuple[str, object, object]]:
    a, b = flatten(to_dict(old)), flatten(to_dict(new))
    return [(k, a.get(k), b[k]) for k in keys if a.get(k) != b[k]]


def load_workdir_config(workdir: str) -> Config:
    path = os.path.join(workdir, CONFIG_FILE)
    if not os.path.isfile(path):
        raise CheckpointError(f"{workdir!r} is not a training workdir (no {CONFIG_FILE}); "
                              "pass the train.workdir of a run")
    try:
        with open(path, encoding="utf-8") as f:
            saved = yaml.safe_load(f)
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{path} cannot be read ({first}); rewrite it, e.g. with "
                              f"efflm config show --config NAME [key=value ...] > {path}"
                              ) from None
    if not isinstance(saved, dict):
        raise CheckpointError(f"{path} must be a mapping of config keys, not a "
                              f"{type(saved).__name__}; rewrite it, e.g. with efflm config "
                              f"show --config NAME [key=value ...] > {path}")
    return config_from_dict(saved, path)


def resumed_config(cfg: Config) -> Config | None:
    """The config the workdir's checkpoints were written under, when this run resumes
    them; else None."""
    workdir = cfg.train.workdir
    ckpt_dir = os.path.join(workdir, CHECKPOINT_DIR)
    if (cfg.train.fresh or not os.path.isdir(ckpt_dir)
            or not any(name.isdigit() for name in os.listdir(ckpt_dir))
            or not os.path.isfile(os.path.join(workdir, CONFIG_FILE))):
        return None
    return load_workdir_config(workdir)


def check_workdir(cfg: Config) -> Config | None:
    """Refuse to resume into an incompatible checkpoint; write nothing. Returns the
    config the checkpoints this run resumes were written under (`resumed_config`).

    Resolves `optimizer.decay_steps=0` in `cfg` in place: a resumed run keeps the
    schedule it was saved with, a new one decays over `train.steps`.
    """
    workdir = cfg.train.workdir
    if not workdir.strip():
        raise ConfigError("train.workdir is empty; name a directory, e.g. train.workdir=runs/x")
    if os.path.exists(workdir) and not os.path.isdir(workdir):
        raise ConfigError(f"train.workdir={workdir!r} exists and is not a directory")
    saved = resumed_config(cfg)
    if saved is not None:
        diffs = shape_differences(saved, cfg)
        if diffs:
            raise ConfigError(
                f"{workdir!r} holds checkpoints of a different model ({'; '.join(diffs)}); "
                "use another train.workdir, or pass train.fresh=true to discard them")
        order = data_order_differences(saved, cfg)
        if order:
            raise ConfigError(
                f"{workdir!r} holds checkpoints of a run with "
                + ", ".join(f"{k}={old} (now {new})" for k, old, new in order)
                + ", and their saved data position fits only that order of the data; to "
                "resume, pass " + " ".join(f"{k}={old}" for k, old, _ in order)
                + " (or use another train.workdir to train with the new value)")
        state = optimizer_differences(saved, cfg)
        if state:
            raise ConfigError(
                f"{workdir!r} holds checkpoints whose optimizer state fits "
                + ", ".join(f"{k}={old} (now {new})" for k, old, new in state)
                + "; to resume, pass " + " ".join(f"{k}={old}" for k, old, _ in state)
                + ", or pass train.fresh=true to start over")
        if not cfg.optimizer.decay_steps:
            cfg.optimizer.decay_steps = saved.optimizer.decay_steps or saved.train.steps
    if not cfg.optimizer.decay_steps:
        cfg.optimizer.decay_steps = cfg.train.steps
    return saved


def prepare_workdir(cfg: Config, writer: bool) -> None:
    """After `check_workdir`: (the writer) clear the workdir under `train.fresh` and
    create it."""
    workdir = cfg.train.workdir
    if writer and cfg.train.fresh and os.path.isdir(workdir):
        for name in (CHECKPOINT_DIR, "tensorboard"):
            shutil.rmtree(os.path.join(workdir, name), ignore_errors=True)
        for name in ("metrics.jsonl", CONFIG_FILE):
            if os.path.exists(os.path.join(workdir, name)):
                os.remove(os.path.join(workdir, name))
    if writer:
        try:
            os.makedirs(workdir, exist_ok=True)
        except OSError as e:
            raise ConfigError(f"train.workdir={workdir!r} cannot be created "
                              f"({e.strerror or e}); name a directory you can write") from None


def write_config(cfg: Config) -> None:
    """Save the resolved config as the workdir's config.yaml (once its checkpoint fits)."""
    saved = config_from_dict(to_dict(cfg))
    saved.train.fresh = False  # running the saved config again resumes
    tmp = os.path.join(cfg.train.workdir, CONFIG_FILE + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(to_yaml(saved))
    os.replace(tmp, os.path.join(cfg.train.workdir, CONFIG_FILE))


def _eval_sums(program: Program, state, tokenizer, data_cfg, num_batches: int) -> dict:
    """Summed loss, scored tokens (and bytes, correct predictions) of the validation
    split of `data_cfg`."""
    cfg = program.cfg
    it = make_eval_iterator(data_cfg, tokenizer, global_batch=cfg.train.batch_size,
                            process_index=jax.process_index(),
                            process_count=jax.process_count(), num_batches=num_batches)
    sums: dict = {}
    with program.context():
        for local in it:
            local = dict(local)
            if "target_bytes" in local:  # rows of text: each scored target's bytes
                local["target_bytes"] = np.where(loss_mask(local), local["target_bytes"],
                                                 0).astype(np.int32)
            out = program.eval_step(state.params, state.model_state,
                                    mesh_lib.global_batch(local, program.mesh))
            for k, v in out.items():
                sums[k] = sums.get(k, 0.0) + float(v)
    if sums.get("tokens", 0.0) == 0:
        raise EfflmError("the validation split produced no scored tokens; add data or "
                         "raise data.val_fraction")
    return sums


def _named(sums: dict, prefix: str, accuracy: str | None) -> dict:
    tokens = sums["tokens"]
    loss = sums["loss_sum"] / tokens
    result = {f"{prefix}loss": loss, f"{prefix}perplexity": math.exp(min(loss, 50.0))}
    if "bytes" in sums:
        result[f"{prefix}bits_per_byte"] = sums["loss_sum"] / math.log(2) / max(
            sums["bytes"], 1.0)
        result[f"{prefix}bytes"] = sums["bytes"]  # of text the scored targets stand for
    if "correct" in sums:
        result[f"{prefix}{accuracy}_accuracy"] = sums["correct"] / tokens
    result[f"{prefix}tokens"] = tokens
    return result


def evaluate(program: Program, state, tokenizer, num_batches: int) -> dict:
    """Validation loss and perplexity of the model in the TrainState `state` (parameters
    and model state), with bits per byte where the tokens stand for text and the
    source's accuracy where it reports one (`eval_recall_accuracy` for mqar).

    `num_batches` > 0: over a fixed sample of that many batches drawn from across the
    split (`eval_*` names, as logged during training); 0: over the whole split
    (`full_eval_*` names). A mixture of sources is also evaluated per source
    (`eval_<source>_loss`, ...), each on its own sample of `num_batches` batches.
    """
    cfg = program.cfg
    source = SOURCES[cfg.data.source]
    prefix = "eval_" if num_batches else "full_eval_"
    result = _named(_eval_sums(program, state, tokenizer, cfg.data, num_batches), prefix,
                    source.accuracy)
    for name, _, sub in mixture_parts(cfg.data) or ():
        result.update(_named(_eval_sums(program, state, tokenizer, sub, num_batches),
                             f"{prefix}{name}_", SOURCES[name].accuracy))
    if not_causal(cfg.model):  # the loss saw later tokens: not comparable to causal runs
        result["causal"] = False
    return result


def eval_summary(ev: dict) -> str:
    """`eval_loss 1.2345, bits/byte 0.9876` (or the accuracy where it was measured)."""
    parts = [f"eval_loss {ev['eval_loss']:.4f}"]
    if "eval_bits_per_byte" in ev:
        parts.append(f"bits/byte {ev['eval_bits_per_byte']:.4f}")
    parts += [f"{k[len('eval_'):].replace('_', ' ')} {v:.4f}" for k, v in ev.items()
              if k.startswith("eval_") and k.endswith("_accuracy")]
    return ", ".join(parts)


class _StopFlag:
    """Set by SIGTERM/SIGINT so the loop can save a checkpoint and exit cleanly.

    With several processes a signal may reach only some of them, or reach them at
    different steps, so SIGTERM is left to JAX's preemption service, which agrees on
    one step for all processes (`Checkpointer.reached_preemption`), and SIGINT keeps
    its default (the process exits; the others follow on the missed heartbeats).
    """

    def __init__(self, signals):
        self.signum = 0
        self._signals = signals
        self._old = {}

    def __enter__(self):
        for sig in self._signals:
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread
                pass
        return self

    def _handle(self, signum, frame):
        if self.signum:  # a second signal: stop at once
            raise KeyboardInterrupt
        self.signum = signum

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)


def restore_or_init(program: Program, checkpointer: Checkpointer, data_iterator,
                    previous: Config | None = None):
    """(state, step): the newest readable checkpoint, or a fresh state at step 0.

    `previous`: the config the checkpoints were written under, when this run's state
    has another layout (`state_layout_changes`): they are read with its layout, then
    carried into a fresh state of this one (`carried_state`)."""
    cfg = program.cfg
    key = jax.random.key(cfg.train.seed)
    source = program if previous is None else build_program(previous, program.mesh)
    abstract = jax.eval_shape(source._init, key)
    with program.context():
        restored = checkpointer.restore(
            abstract_with_shardings(abstract, source.state_shardings), data_iterator)
        if restored is None:
            return program.init(key), 0
        if previous is None:
            return restored
        return carried_state(program, restored[0]), restored[1]


def carried_state(program: Program, old) -> TrainState:
    """A state of `program`'s layout from `old`, restored under another: every parameter
    the two share, the new ones (learned quantisation scales) computed from those weights
    by the format (`CALIBRATION`), model state where its layout holds, a fresh optimizer
    state, and the old step and key."""
    fresh = program.init(jax.random.key(program.cfg.train.seed))
    old_params = flax.traverse_util.flatten_dict(old.params)
    new_params = flax.traverse_util.flatten_dict(fresh.params)
    merged = {p: old_params[p] if p in old_params and old_params[p].shape == v.shape else v
              for p, v in new_params.items()}
    params = flax.traverse_util.unflatten_dict(merged)
    dummy = jnp.zeros((1, program.cfg.data.seq_len), jnp.int32)
    _, computed = jax.jit(lambda v: program.model.apply(v, dummy, mutable=[CALIBRATION]))(
        {"params": params, **fresh.model_state})
    computed = flax.traverse_util.flatten_dict(computed.get(CALIBRATION, {}))
    for path, param in new_params.items():
        if path in old_params:
            continue
        if path not in computed:
            raise CheckpointError(f"resuming adds the parameter {'/'.join(path)}, which "
                                  "its format cannot compute from the restored weights")
        value = computed[path]
        if value.shape != param.shape:  # a scan whose parameters are broadcast
            value = value[0]
        merged[path] = jax.device_put(value, param.sharding)
    same = jax.tree.structure(old.model_state) == jax.tree.structure(fresh.model_state)
    return TrainState(step=old.step, params=flax.traverse_util.unflatten_dict(merged),
                      model_state=old.model_state if same else fresh.model_state,
                      opt_state=fresh.opt_state, rng=old.rng)


def restore_run(workdir: str, overrides: list[str] | tuple[str, ...] = ()) -> tuple:
    """(cfg, program, state, tokenizer, step) of the newest readable checkpoint in `workdir`.

    cfg is the workdir's config.yaml with `overrides` ("key=value") applied. The workdir
    is only read. Raises CheckpointError if `workdir` is not a training workdir (no
    readable config.yaml), ConfigError for an invalid config or override, and EfflmError
    if it has no checkpoint yet.
    """
    saved = load_workdir_config(workdir)  # a clear error if this is no workdir
    cfg = load_config(os.path.join(workdir, CONFIG_FILE), overrides, saved=True)
    diffs = shape_differences(saved, cfg)  # e.g. another tokenizer for the same weights
    if diffs:
        raise ConfigError(f"{workdir!r} holds checkpoints of a different model than these "
                          f"overrides describe ({'; '.join(diffs)}); drop them")
    directory = os.path.join(workdir, CHECKPOINT_DIR)
    if not os.path.isdir(directory) or not any(n.isdigit() for n in os.listdir(directory)):
        raise EfflmError(f"{workdir!r} has no checkpoint yet; train first")
    checkpointer = Checkpointer(directory, cfg.checkpoint, create=False)  # reads only
    try:
        program = build_program(cfg)
        state, step = restore_or_init(program, checkpointer, None)
    finally:
        checkpointer.close()
    return cfg, program, state, data_tokenizer(cfg.data), step


def train(cfg: Config) -> dict:
    """Train (or resume) the run described by `cfg`; returns the last metrics row."""
    distributed.initialize(cfg.distributed)
    is_writer = jax.process_index() == 0
    mesh = mesh_lib.make_mesh(cfg.mesh)
    mesh_lib.check_divisibility(cfg, mesh)  # a mesh that cannot run leaves no workdir
    check_mesh(cfg.model, dict(mesh.shape))
    previous = check_workdir(cfg)
    tokenizer = data_tokenizer(cfg.data)
    program = build_program(cfg, mesh)  # an optimizer the parameters cannot take fails here
    data = make_train_iterator(cfg.data, tokenizer, global_batch=cfg.train.batch_size,
                               seed=cfg.train.seed, process_index=jax.process_index(),
                               process_count=jax.process_count())
    if cfg.train.eval_every:  # a validation split that cannot be read fails before writing
        make_source(cfg.data, "val")
    changes = state_layout_changes(previous, cfg) if previous else []
    prepare_workdir(cfg, is_writer)
    checkpointer = Checkpointer(os.path.join(cfg.train.workdir, CHECKPOINT_DIR), cfg.checkpoint)
    state, start = restore_or_init(program, checkpointer, data,
                                   previous if changes else None)
    metrics_path = os.path.join(cfg.train.workdir, "metrics.jsonl")
    # A state of another layout than the checkpoints': config.yaml keeps describing the
    # checkpoints until the first one in the new layout is saved.
    config_pending = bool(changes) and bool(start)
    if is_writer:
        if not config_pending:
            write_config(cfg)
        truncate_jsonl(metrics_path, start)
    writer = MetricsWriter(cfg.train.workdir, enabled=is_writer,
                           tensorboard=cfg.logging.tensorboard, progress=cfg.logging.progress,
                           total_steps=cfg.train.steps, start_step=start)
    n_params = count_params(state.params)
    inactive = inactive_params(cfg.model)
    active = f" ({(n_params - inactive) / 1e6:.2f}M active per token)" if inactive else ""
    flops_per_step = train_flops_per_step(cfg.model, cfg.data.seq_len, cfg.train.batch_size)
    peak = PeakMeter(cfg.model.dtype)
    writer.message(
        f"efflm: {n_params / 1e6:.2f}M parameters{active}, mesh {dict(program.mesh.shape)}, "
        f"{'resuming at step ' + str(start) if start else 'starting at step 0'}, "
        f"peak {peak.peak / 1e9:.1f} GFLOP/s ({peak.source})")
    generation = ("efflm generate samples by its causal decoding rule"
                  if not not_causal(cfg.model, decoding=True) else "efflm generate refuses it")
    for line in changes if start else ():
        writer.message(f"efflm: resuming with {line}")
    for reason in not_causal(cfg.model):
        writer.message(f"efflm: warning: {reason}; its losses see later tokens (eval rows "
                       f"carry causal=false) and {generation}")
    row: dict = {}
    timer_start, timer_steps = None, 0
    step_fn, memory = None, {}
    try:
        multi = jax.process_count() > 1
        # One process stopping alone would leave the others waiting in a collective.
        signals = () if multi else (signal.SIGTERM, signal.SIGINT)
        with _StopFlag(signals) as stop, program.context():
            for step in range(start, cfg.train.steps):
                batch = mesh_lib.global_batch(next(data), program.mesh)
                if step_fn is None:  # compiled ahead of time, to record its memory
                    step_fn = program.train_step.lower(state, batch).compile()
                    # Logged by a fresh run only: a resumed run's rows stay the same as
                    # an uninterrupted run's.
                    memory = compiled_memory(step_fn) if start == 0 else {}
                state, metrics = step_fn(state, batch)
                done = step + 1
                if timer_start is None:  # the first step compiles: time from its end
                    jax.block_until_ready(metrics)
                    timer_start, timer_steps = time.perf_counter(), 0
                else:
                    timer_steps += 1
                is_last = done == cfg.train.steps
                if multi and checkpointer.reached_preemption(done):
                    stop.signum = signal.SIGTERM
                if done % cfg.logging.every == 0 or is_last or stop.signum:
                    metrics = jax.device_get(metrics)
                    row = {"step": done, "loss": metrics["loss"],
                           "grad_norm": metrics["grad_norm"],
                           "learning_rate": program.learning_rate(step),
                           "tokens": metrics["tokens"]}
                    if metrics["aux_loss"]:
                        row["aux_loss"] = metrics["aux_loss"]
                    row.update(metrics["stats"])
                    row.update(metrics["optimizer"])
                    row.update(memory)  # the first row written after compiling only
                    memory = {}
                    if timer_steps:
                        step_time = (time.perf_counter() - timer_start) / timer_steps
                        row["step_time_s"] = step_time
                        row["tokens_per_sec"] = (
                            cfg.train.batch_size * cfg.data.seq_len / step_time)
                        row["peak_flops"] = peak.update()
                        row["mfu"] = flops_per_step / step_time / row["peak_flops"]
                    if not math.isfinite(row["loss"]):
                        raise EfflmError(f"loss became {row['loss']} at step {done}; lower "
                                         "optimizer.lr or raise optimizer.warmup_steps")
                    writer.write(row)
                    timer_start, timer_steps = time.perf_counter(), 0
                if cfg.train.eval_every and (done % cfg.train.eval_every == 0 or is_last):
                    ev = evaluate(program, state, tokenizer, cfg.train.eval_batches)
                    row = {"step": done, **ev}
                    writer.write(row)
                    writer.message(f"step {done}: " + eval_summary(ev)
                                   + (" (not causal: sees later tokens)"
                                      if ev.get("causal") is False else ""))
                    timer_start, timer_steps = time.perf_counter(), 0
                saved = checkpointer.save(done, state, data, force=is_last or bool(stop.signum))
                if saved and config_pending:
                    checkpointer.wait()
                    if is_writer:
                        write_config(cfg)
                    config_pending = False
                if stop.signum:
                    checkpointer.wait()
                    writer.message(f"stopped by signal {stop.signum} at step {done}; "
                                   "checkpoint saved, run the same command to resume")
                    raise SystemExit(128 + stop.signum)
    finally:
        checkpointer.close()
        writer.close()
    return row
