"""TFDS data (`efflm/data/tfds.py`, `efflm/data/build.py`): a corpus built with
`efflm data build` reads back through `data.source=tfds` as the same documents, resumes
to the same batches, trains, and refuses what it cannot read in one line."""

import collections
import json
import os
import shutil

import pytest
from conftest import SMALL

from efflm.cli import main
from efflm.config import DataConfig
from efflm.data import make_train_iterator
from efflm.data.build import build
from efflm.data.sources import file_source, make_source
from efflm.data.tfds import TfdsSettings
from efflm.data.tokenizer import ByteTokenizer
from efflm.errors import DataError

SHAKESPEARE = os.path.join(os.path.dirname(__file__), "..", "..", "..", "shared", "data",
                           "tinyshakespeare.txt")


def _corpus(folder):
    """A folder of generated documents: a .txt file and a .jsonl file of 30 lines."""
    folder.mkdir()
    (folder / "notes.txt").write_text("def f(x):\n    return x + 1\n" * 50, encoding="utf-8")
    lines = [json.dumps({"text": f"document {i}: " + "é漢 word " * (i % 7 + 1)})
             for i in range(30)]
    (folder / "docs.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return str(folder)


def _cfg(root, **tfds):
    return DataConfig(source="tfds", seq_len=32,
                      tfds=TfdsSettings(name="corpus", data_dir=str(root), **tfds))


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """(inputs, data_dir) of the dataset `corpus` built from a generated folder."""
    root = tmp_path_factory.mktemp("tfds")
    inputs = _corpus(root / "in")
    result = build("corpus", [inputs], str(root / "data"), val_fraction=0.1)
    assert result["built"] and result["train"] == 1 + 27 and result["validation"] == 1 + 3
    return inputs, root / "data"


def test_the_built_splits_read_back_as_the_files_documents(built):
    """Equal as multisets (records come back in hashed order), and building again with
    the same inputs does nothing."""
    inputs, data_dir = built
    for split, name in (("train", "train"), ("val", "validation")):
        got = make_source(_cfg(data_dir), split)
        want = file_source([inputs], "--from", 0.1, split)
        assert collections.Counter(got[i] for i in range(len(got))) == collections.Counter(
            want[i] for i in range(len(want))), name
    assert not build("corpus", [inputs], str(data_dir), val_fraction=0.1)["built"]


def test_build_trains_a_tokenizer_beside_the_dataset(built, capsys):
    inputs, data_dir = built
    args = ["data", "build", "corpus", "--from", inputs, "--data-dir", str(data_dir),
            "--val-fraction", "0.1", "--tokenizer", "bpe", "--vocab-size", "300"]
    assert main(args) == 0
    path = str(data_dir / "corpus" / "tokenizers" / "bpe_300.json")
    out = capsys.readouterr().out
    assert "bpe: trained 300 ids on 28 documents" in out
    assert f"data.tokenizer=bpe data.bpe.path={path}" in out
    assert main(args) == 0 and f"bpe: up to date in {path}" in capsys.readouterr().out
    assert main([*args[:-1], "-3"]) == 2
    assert "--vocab-size must be a positive" in capsys.readouterr().err


def test_a_changed_input_is_refused_unless_overwritten(built, tmp_path):
    inputs, data_dir = built
    data, copy = tmp_path / "data", tmp_path / "in"
    shutil.copytree(data_dir, data)
    shutil.copytree(inputs, copy)
    with open(copy / "docs.jsonl", "a", encoding="utf-8") as f:
        f.write(json.dumps({"text": "one more"}) + "\n")
    # The inputs' paths are part of what was built: the copy is another corpus.
    with pytest.raises(DataError, match="changed since it was built"):
        build("corpus", [str(copy)], str(data), val_fraction=0.1)
    assert build("corpus", [str(copy)], str(data), 0.1, overwrite=True)["train"] == 29


@pytest.mark.skipif(not os.path.isfile(SHAKESPEARE),
                    reason="../shared/data/tinyshakespeare.txt is not present")
def test_a_shared_corpus_reads_back_whole(tmp_path):
    build("shakespeare", [SHAKESPEARE], str(tmp_path), val_fraction=0.05)
    cfg = DataConfig(source="tfds", tfds=TfdsSettings(name="shakespeare",
                                                      data_dir=str(tmp_path)))
    text = open(SHAKESPEARE, encoding="utf-8").read()
    train, val = make_source(cfg, "train"), make_source(cfg, "val")
    assert train[0] + val[0] == text and len(val[0]) == round(0.05 * len(text))


def test_resumed_batches_are_the_same(built):
    cfg = _cfg(built[1])
    first = make_train_iterator(cfg, ByteTokenizer(), global_batch=4, seed=3)
    next(first)
    state = json.loads(json.dumps(first.get_state()))
    expected = [next(first) for _ in range(3)]
    again = make_train_iterator(cfg, ByteTokenizer(), global_batch=4, seed=3)
    again.set_state(state)
    for want in expected:
        got = next(again)
        assert all((got[k] == want[k]).all() for k in want)


def test_trains_on_it_and_a_resume_keeps_the_dataset(built, tmp_path, capsys):
    data = ["data.source=tfds", "data.tfds.name=corpus", f"data.tfds.data_dir={built[1]}"]
    workdir = f"train.workdir={tmp_path / 'run'}"
    assert main(["train", "--config", "tiny", *SMALL, *data, "train.steps=2",
                 "train.eval_every=2", workdir]) == 0
    assert json.loads(open(tmp_path / "run" / "metrics.jsonl").readlines()[-1])[
        "eval_loss"] > 0
    capsys.readouterr()
    assert main(["train", "--config", "tiny", *SMALL, *data[:2], "data.tfds.val_split=train",
                 "train.steps=3", workdir]) == 2
    assert "data.tfds.val_split" in capsys.readouterr().err


@pytest.mark.parametrize("overrides, words", [
    (["data.tfds.name=absent"], "is not prepared in"),
    (["data.tfds.name=corpus", "data.tfds.val_split=test"], "has no split 'test'"),
    (["data.tfds.name=corpus", "data.tfds.text_feature=body"], "is not a feature"),
    (["data.tfds.name=no-such-name"], "is not a TFDS dataset name"),
    ([], "needs data.tfds.name"),
])
def test_what_it_cannot_read_is_one_line_exit_2(built, tmp_path, capsys, overrides, words):
    assert main(["train", "--config", "tiny", *SMALL, "data.source=tfds",
                 f"data.tfds.data_dir={built[1]}", *overrides,
                 f"train.workdir={tmp_path / 'w'}"]) == 2
    err = capsys.readouterr().err
    assert words in err and err.count("\n") == 1, err
    assert not [f for _, _, files in os.walk(tmp_path / "w") for f in files]


@pytest.mark.parametrize("args, words", [
    (["9lives", "--from", "{inputs}"], "must be a letter followed by"),
    (["ok", "--from", "{missing}"], "does not exist"),
    (["ok", "--from", "{inputs}", "--val-fraction", "0"], "--val-fraction must be in"),
])
def test_bad_builds_are_one_line_exit_2(built, tmp_path, capsys, args, words):
    args = [a.format(inputs=built[0], missing=tmp_path / "missing") for a in args]
    assert main(["data", "build", *args, "--data-dir", str(tmp_path / "d")]) == 2
    err = capsys.readouterr().err
    assert words in err and err.count("\n") == 1, err
