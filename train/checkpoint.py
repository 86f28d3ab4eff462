"""Orbax checkpoints of the train state and the data iterator."""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
from typing import Any

import flax
import jax
import orbax.checkpoint as ocp
from etils import epath

from efflm.config import CheckpointConfig
from efflm.errors import CheckpointError, EfflmError

log = logging.getLogger("efflm")


class DataStateHandler(ocp.CheckpointHandler):
    """Saves each process's data iterator position as `process_I-of-N.json`.

    Every process writes its own file, since each reads its own shard of the data.
    The iterator needs `get_state() -> dict` and `set_state(dict)`.
    """

    @staticmethod
    def _file(directory: epath.Path) -> epath.Path:
        return directory / f"process_{jax.process_index()}-of-{jax.process_count()}.json"

    def save(self, directory: epath.Path, args: DataStateSave):
        self._file(directory).write_text(json.dumps(args.iterator.get_state()))

    def restore(self, directory: epath.Path, args: DataStateRestore):
        path = self._file(directory)
        if not path.exists():
            raise FileNotFoundError(f"{path} is missing (saved by a different process count?)")
        args.iterator.set_state(json.loads(path.read_text()))
        return args.iterator

    def metadata(self, directory):
        return None

    def finalize(self, directory):
        pass

    def close(self):
        pass


@ocp.args.register_with_handler(DataStateHandler, for_save=True)
@dataclasses.dataclass
class DataStateSave(ocp.args.CheckpointArgs):
    iterator: Any


@ocp.args.register_with_handler(DataStateHandler, for_restore=True)
@dataclasses.dataclass
class DataStateRestore(ocp.args.CheckpointArgs):
    iterator: Any


@functools.cache
def _plain_array_writes_on_cpu() -> None:
    """On CPU, write each array from one replica, as orbax already does on GPUs: its
    replica-parallel default slices every replicated array with eager ops (compiled
    once per shape), seconds for a first save that buy nothing on one host."""
    if jax.default_backend() == "cpu":
        ocp.type_handlers.register_type_handler(
            jax.Array, ocp.type_handlers.ArrayHandler(use_replica_parallel=False),
            override=True)


class Checkpointer:
    """Saves every `cfg.every` steps (async), keeps the last `cfg.keep`, restores the
    newest checkpoint that can be read, falling back to older ones."""

    def __init__(self, directory: str, cfg: CheckpointConfig, create: bool = True):
        """`create=False` only reads: the directory must exist and is not written."""
        _plain_array_writes_on_cpu()
        self.directory = os.path.abspath(directory)
        self.cfg = cfg
        if create:
            options = ocp.CheckpointManagerOptions(
                max_to_keep=cfg.keep, enable_async_checkpointing=cfg.async_save, create=True)
        else:
            options = ocp.CheckpointManagerOptions(
                read_only=True, create=False, save_interval_steps=0, max_to_keep=None)
        self.manager = ocp.CheckpointManager(self.directory, options=options,
                                             item_names=("state", "data"))

    def steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def save(self, step: int, state, data_iterator, force: bool = False) -> bool:
        if not force and (self.cfg.every == 0 or step % self.cfg.every):
            return False
        if step in self.manager.all_steps():
            return False
        args = ocp.args.Composite(state=ocp.args.StandardSave(state),
                                  data=DataStateSave(data_iterator))
        return self.manager.save(step, args=args, force=True)

    def restore(self, abstract_state, data_iterator):
        """(state, step) from the newest readable checkpoint, or None if there is none.

        `data_iterator` (or None to skip it) is set to its saved position in place.
        """
        steps = sorted(self.manager.all_steps(), reverse=True)
        for step in steps:
            self._check_fields(step, abstract_state)
            try:
                items = {"state": ocp.args.StandardRestore(abstract_state)}
                if data_iterator is not None:
                    items["data"] = DataStateRestore(data_iterator)
                args = ocp.args.Composite(**items)
                restored = self.manager.restore(step, args=args)
            except EfflmError as e:  # readable, but saved by other settings
                raise CheckpointError(f"the checkpoint at step {step} in {self.directory} "
                                      f"does not fit this run: {e}") from None
            except Exception as e:  # corrupt or incompatible: report, try an older one
                first = str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e)
                log.warning("checkpoint at step %d in %s could not be read (%s); trying an "
                            "earlier one", step, self.directory, first)
                continue
            return restored.state, step
        if steps:
            raise CheckpointError(
                f"none of the checkpoints in {self.directory} (steps {steps}) could be read; "
                "move the directory away or pass train.fresh=true to start over")
        return None

    def _check_fields(self, step: int, abstract_state) -> None:
        """Refuse a checkpoint whose train state lacks fields this version keeps (one
        written before they existed), naming them, instead of trying older ones."""
        try:
            meta = ocp.StandardCheckpointer().metadata(
                os.path.join(self.directory, str(step), "state"))
            saved = set(meta.item_metadata.tree)
        except Exception:  # unreadable metadata: restore reports it
            return
        missing = sorted(set(flax.serialization.to_state_dict(abstract_state)) - saved)
        if missing:
            raise CheckpointError(
                f"the checkpoint at step {step} in {self.directory} has no "
                f"{', '.join(missing)}: an earlier version of efflm wrote it; continue it "
                "with that version, or train into another train.workdir")

    def reached_preemption(self, step: int) -> bool:
        """True on every process at the one step where they all stop for a SIGTERM."""
        return self.manager.reached_preemption(step)

    def wait(self):
        self.manager.wait_until_finished()

    def close(self):
        self.manager.wait_until_finished()
        self.manager.close()


def abstract_with_shardings(abstract, shardings):
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                        abstract, shardings)
