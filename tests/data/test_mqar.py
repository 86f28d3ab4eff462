"""Multi-query associative recall (`efflm/data/mqar.py`): the generator's structure, the
loss on the answers only, accuracy from eval, a softmax model that learns easy MQAR,
bad settings."""

import json
import os

import jax
import numpy as np
import pytest
from conftest import SMALL, fast_jit

from efflm import mesh as mesh_lib
from efflm.cli import main
from efflm.config import load_config
from efflm.data import IGNORE, data_tokenizer, make_eval_iterator, make_train_iterator
from efflm.data.mqar import MqarSettings, example, key_ids, value_ids
from efflm.errors import ConfigError
from efflm.train.step import build_program
from efflm.train.trainer import train

MQAR = ["data.source=mqar", "data.mqar.vocab=32", "data.mqar.pairs=4"]


@pytest.mark.parametrize("vocab, pairs, seq_len", [(32, 4, 32), (21, 10, 64), (256, 16, 63)])
def test_every_query_finds_its_key_earlier_with_that_value(vocab, pairs, seq_len):
    """Each example: the pairs first (distinct keys and values), then each key queried
    once at a later position, scored with its value; nothing else scored; filler never
    a key; 0 (padding) never generated."""
    own = MqarSettings(vocab=vocab, pairs=pairs)
    keys, values = set(key_ids(vocab)), set(value_ids(vocab))
    for split in ("train", "val"):
        for index in range(20):
            ex = example(own, seq_len, split, index)
            inputs, targets = ex["inputs"], ex["targets"]
            assert inputs.shape == targets.shape == (seq_len,) and 0 not in inputs
            context = dict(zip(inputs[:2 * pairs:2].tolist(), inputs[1:2 * pairs:2].tolist()))
            assert len(context) == pairs and set(context) <= keys
            assert len(set(context.values())) == pairs and set(context.values()) <= values
            scored = np.flatnonzero(targets != IGNORE)
            assert len(scored) == pairs and scored.min() >= 2 * pairs
            assert sorted(inputs[scored].tolist()) == sorted(context)
            assert all(targets[i] == context[inputs[i]] for i in scored)
            # The next input after a query is its answer (teacher forcing).
            assert all(inputs[i + 1] == targets[i] for i in scored if i + 1 < seq_len)
            rest = np.ones(seq_len, bool)
            rest[:2 * pairs] = False
            rest[scored] = False
            assert not set(inputs[rest].tolist()) & keys


def test_same_seed_same_rows_across_processes_and_resumes(small_config):
    """Rows depend on data.mqar.seed and train.seed only: two processes get disjoint
    shares of the examples, and a restored state continues the same rows."""
    data = small_config(*MQAR).data
    tok = data_tokenizer(data)

    def rows(index, count, n, state=None):
        it = make_train_iterator(data, tok, global_batch=4, seed=0, process_index=index,
                                 process_count=count)
        if state is not None:
            it.set_state(state)
        return [next(it) for _ in range(n)], it

    alone, _ = rows(0, 1, 3)
    again, _ = rows(0, 1, 3)
    for a, b in zip(alone, again):
        for key in a:
            np.testing.assert_array_equal(a[key], b[key])
    first, it = rows(0, 1, 1)
    resumed, _ = rows(0, 1, 2, json.loads(json.dumps(it.get_state())))
    np.testing.assert_array_equal(resumed[0]["inputs"], alone[1]["inputs"])
    shares = [rows(p, 2, 2)[0] for p in (0, 1)]
    seen = [{r.tobytes() for b in s for r in b["inputs"]} for s in shares]
    assert len(seen[0]) == len(seen[1]) == 4 and not seen[0] & seen[1]
    other = small_config(*MQAR, "data.mqar.seed=1").data
    moved = next(make_train_iterator(other, tok, global_batch=4, seed=0))
    assert not np.array_equal(moved["inputs"], alone[0]["inputs"])


@pytest.fixture(scope="module")
def program():
    cfg = load_config("tiny", [*SMALL, *MQAR, "train.loss_impl=xla"])
    return build_program(cfg, mesh_lib.make_mesh(cfg.mesh, jax.devices()[:1]))


def _batch(cfg):
    """Two validation rows, the second half padding whose targets the argmax would
    match (they must not count)."""
    batch = dict(next(make_eval_iterator(cfg.data, data_tokenizer(cfg.data),
                                         global_batch=cfg.train.batch_size)))
    batch = {k: np.asarray(v[:2]) for k, v in batch.items()}
    batch["segment_ids"][1, 16:] = 0
    return batch


def test_loss_and_accuracy_count_the_answers_only(program):
    """The loss (blockwise xla path) is the cross-entropy over the answer positions of
    real tokens, from the full logits; the accuracy counts those whose argmax is the
    answer."""
    cfg = program.cfg
    with program.context():
        state = program.init(jax.random.key(0))
        batch = _batch(cfg)
        logits = np.asarray(fast_jit(program.model.apply)(
            {"params": state.params}, batch["inputs"], batch["positions"],
            batch["segment_ids"]), np.float64)
        scored = (batch["targets"] != IGNORE) & (batch["segment_ids"] > 0)
        batch["targets"][1, 16:] = logits[1, 16:].argmax(-1)  # padding: never scored
        out = jax.device_get(program.eval_step(state.params, state.model_state, batch))
    lse = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
    picked = np.take_along_axis(logits, np.maximum(batch["targets"], 0)[..., None], -1)[..., 0]
    assert 0 < scored.sum() < scored.size // 4 and out["tokens"] == scored.sum()
    np.testing.assert_allclose(out["loss_sum"], (lse - picked)[scored].sum(), rtol=1e-5)
    hits = (logits.argmax(-1) == batch["targets"]) & scored
    assert out["correct"] == hits.sum() and "bytes" not in out


def test_softmax_learns_easy_mqar_and_eval_reports_recall(tmp_path, capsys):
    """200 steps of a 2-layer softmax model on 4 pairs at length 32 recall more than half
    the answers (copying any value of the context scores 1/4); eval rows carry the
    recall accuracy and no bits per byte, and so does `efflm eval`."""
    workdir = str(tmp_path / "mqar")
    run = [*SMALL, *MQAR, "model.attention.num_heads=2", "train.batch_size=64",
           "optimizer.lr=2e-3", "optimizer.schedule=constant", "optimizer.warmup_steps=20",
           "train.steps=200", "train.eval_every=200", "train.eval_batches=4",
           "checkpoint.every=200", "logging.every=100", f"train.workdir={workdir}"]
    cfg = load_config("tiny", run)
    assert cfg.model.vocab_size == 32  # the task's vocabulary
    train(cfg)
    with open(os.path.join(workdir, "metrics.jsonl"), encoding="utf-8") as f:
        rows = [json.loads(line) for line in f]
    ev = [r for r in rows if "eval_loss" in r][-1]
    assert ev["eval_recall_accuracy"] > 0.5 and "eval_bits_per_byte" not in ev, ev
    assert rows[0]["tokens"] == 64 * 4  # the scored targets: one answer per pair
    assert "recall accuracy" in capsys.readouterr().out
    assert main(["eval", "--workdir", workdir, "--batches", "4"]) == 0
    again = json.loads(capsys.readouterr().out)
    assert again["eval_recall_accuracy"] == pytest.approx(ev["eval_recall_accuracy"])
    # Token ids take no text prompt.
    assert main(["generate", "--workdir", workdir, "--prompt", "def"]) == 2
    assert "token ids" in capsys.readouterr().err
    # Other examples do not fit the saved data position.
    with pytest.raises(ConfigError, match="data.mqar.seed=0 \\(now 1\\)"):
        train(load_config("tiny", [*run, "data.mqar.seed=1", "train.steps=201"]))


@pytest.mark.parametrize("overrides, message", [
    (["data.mqar.pairs=9"], "data.mqar.pairs=9 does not fit data.seq_len=32"),
    (["data.mqar.vocab=8"], "data.mqar.vocab=8 is too small for data.mqar.pairs=4"),
    (["model.vocab_size=16"], "model.vocab_size=16 is smaller than the data's vocabulary"),
    (["data.tokenizer=byte"], "data.tokenizer does not apply"),
    (["data.bpe.path=tok.json"], "data.bpe.path does not apply"),
    (["data.mqar.pairs=0"], "data.mqar.pairs"),
])
def test_bad_settings_exit_2_in_one_line(capsys, overrides, message):
    assert main(["config", "show", "--config", "tiny", *SMALL, *MQAR, *overrides]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
