"""Every tokenizer through the pipeline and the CLI: evaluation rows carry each target's
bytes of text, so bits per byte count every validation byte once whatever the
tokenizer; `tiny` trains, evaluates and generates with each; the tokenizer file's hash
guards resumes and eval; `efflm data tokenizer` and its bad input."""

import json
import os
import shutil

import numpy as np
import pytest
from conftest import SMALL
from test_bpe import corpus

from efflm.cli import main
from efflm.config import load_config
from efflm.data import data_tokenizer, make_eval_iterator
from efflm.data.bpe import Bpe
from efflm.data.sentencepiece import Sentencepiece
from efflm.train.step import loss_mask


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """(root, data overrides for a files source, {tokenizer: its overrides})."""
    root = tmp_path_factory.mktemp("tokenizers")
    texts = corpus(60, seed=1)
    (root / "train.jsonl").write_text("".join(json.dumps({"text": t}) + "\n"
                                              for t in texts[:50]), encoding="utf-8")
    (root / "val.jsonl").write_text("".join(json.dumps({"text": t}) + "\n"
                                            for t in texts[50:]), encoding="utf-8")
    data = ["data.source=files", f"data.files.paths=[{root / 'train.jsonl'}]",
            f"data.files.val_paths=[{root / 'val.jsonl'}]"]
    Bpe.train(corpus(), 320, str(root / "bpe.json"))
    Sentencepiece.train(corpus(), 320, str(root / "sp.model"))
    kinds = {"byte": ["data.tokenizer=byte"],
             "bpe": ["data.tokenizer=bpe", f"data.bpe.path={root / 'bpe.json'}"],
             "sentencepiece": ["data.tokenizer=sentencepiece",
                               f"data.sentencepiece.path={root / 'sp.model'}"]}
    return root, data, kinds, texts[50:]


@pytest.mark.parametrize("kind", ["byte", "bpe", "sentencepiece"])
def test_eval_rows_count_every_validation_byte_once(files, kind):
    """Over the whole split, the scored targets' bytes are the split's UTF-8 bytes
    (documents cut into several rows at seq_len 16); where a token's bytes are fixed,
    each target carries its own, in the sampled evaluation too."""
    _, data, kinds, val = files
    cfg = load_config("tiny", [*SMALL, *data, *kinds[kind], "data.seq_len=16"])
    tok = data_tokenizer(cfg.data)
    fixed = None if kind == "sentencepiece" else tok.token_byte_lengths()
    for batches in (0, 3):
        total = 0
        for row in make_eval_iterator(cfg.data, tok, global_batch=8, num_batches=batches):
            mask = loss_mask(row)
            total += int(row["target_bytes"][mask].sum())
            assert not row["target_bytes"][~mask].any()
            if fixed is not None:
                np.testing.assert_array_equal(row["target_bytes"][mask],
                                              fixed[row["targets"][mask]])
        if not batches:
            assert total == sum(len(t.encode("utf-8")) for t in val)


@pytest.mark.parametrize("kind", ["bpe", "sentencepiece"])
def test_tiny_trains_evaluates_generates_and_guards_its_tokenizer(files, kind, tmp_path,
                                                                   capsys):
    root, data, kinds, _ = files
    own = [*kinds[kind]]
    path = own[1].split("=", 1)[1]
    local = str(tmp_path / os.path.basename(path))
    shutil.copy(path, local)
    own[1] = f"{own[1].split('=')[0]}={local}"
    workdir = str(tmp_path / "run")
    run = ["train", "--config", "tiny", *SMALL, *data, *own, f"train.workdir={workdir}"]
    assert main([*run, "train.steps=2", "train.eval_every=2"]) == 0
    saved = open(os.path.join(workdir, "config.yaml")).read()
    assert f"sha256: {data_tokenizer(load_config('tiny', [*data, *own]).data).sha256}" in saved
    capsys.readouterr()
    assert main(["eval", "--workdir", workdir, "--batches", "2"]) == 0
    first = json.loads(capsys.readouterr().out)
    assert first["eval_bits_per_byte"] > 0
    # The same file elsewhere: pass its new path.
    moved = str(tmp_path / ("moved" + os.path.splitext(local)[1]))
    shutil.copy(local, moved)
    assert main(["eval", "--workdir", workdir, "--batches", "2",
                 f"data.{kind}.path={moved}"]) == 0
    assert json.loads(capsys.readouterr().out) == first
    assert main(["generate", "--workdir", workdir, "--prompt", "def f(", "--max-new-tokens",
                 "8"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("def f(") and len(out) > len("def f(\n")
    # Another tokenizer under the same path: a resume, eval and generate refuse it, in one
    # line, and leave the workdir as it was.
    (Bpe if kind == "bpe" else Sentencepiece).train(corpus(seed=5), 300, local)
    before = {n: open(os.path.join(workdir, n), "rb").read()
              for n in ("config.yaml", "metrics.jsonl")}
    # Another tokenizer over the same weights, by override: refused.
    assert main(["eval", "--workdir", workdir, "data.tokenizer=byte"]) == 2
    assert "holds checkpoints of a different model" in capsys.readouterr().err
    stale = "is not the file this config was written for"
    for args, words in (([*run, "train.steps=4"], f"data.{kind}.sha256"),
                        (["eval", "--workdir", workdir], stale),
                        (["generate", "--workdir", workdir, "--prompt", "x"], stale)):
        assert main(args) == 2
        err = capsys.readouterr().err
        assert words in err and err.count("\n") == 1, err
    assert before == {n: open(os.path.join(workdir, n), "rb").read() for n in before}


@pytest.mark.parametrize("args, words", [
    (["byte", "--vocab-size", "300"], "tokenizer 'byte' cannot be trained; choose one of: "
                                      "bpe, sentencepiece"),
    (["bpe", "--vocab-size", "0"], "--vocab-size must be a positive number"),
    (["bpe", "--vocab-size", "100"], "below what byte-level BPE needs"),
    (["bpe", "--vocab-size", "300", "--out", "{exists}"], "exists; pass --overwrite"),
    (["bpe", "--vocab-size", "300", "data.source=mqar"], "yields token ids, not text"),
])
def test_data_tokenizer_bad_input_is_one_line_exit_2(files, tmp_path, capsys, args, words):
    exists = tmp_path / "exists.json"
    exists.write_text("keep me")
    args = [a.format(exists=exists) for a in args]
    if "--out" not in args:
        args = [args[0], "--out", str(tmp_path / "new.json"), *args[1:]]
    assert main(["data", "tokenizer", *args]) == 2
    err = capsys.readouterr().err
    assert words in err and err.count("\n") == 1, err
    assert exists.read_text() == "keep me" and not (tmp_path / "new.json").exists()


def test_data_tokenizer_trains_on_the_configured_source(files, tmp_path, capsys):
    out = tmp_path / "tok.json"
    out.write_text("replace me")
    args = ["data", "tokenizer", "bpe", "--vocab-size", "300", "--out", str(out), *files[1]]
    assert main([*args, "--overwrite"]) == 0
    assert "bpe: trained 300 ids on 50 documents" in capsys.readouterr().out
    tok = data_tokenizer(load_config("tiny", [*files[1], "data.tokenizer=bpe",
                                              f"data.bpe.path={out}"]).data)
    assert tok.vocab_size == 300 and tok.decode(tok.encode("def x")) == "def x"


@pytest.mark.parametrize("overrides, words", [
    (["data.tokenizer=bpe"], "data.tokenizer=bpe needs data.bpe.path"),
    (["data.tokenizer=bpe", "data.bpe.path=/no/such/tok.json"], "does not exist"),
    (["data.tokenizer=sentencepiece", "data.sentencepiece.path={root}/bpe.json"],
     "is not a SentencePiece model"),
    (["data.tokenizer=bpe", "data.bpe.path={root}/sp.model"], "is not a tokenizers file"),
    (["data.tokenizer=bpe", "data.bpe.path={root}/bpe.json", "model.vocab_size=256"],
     "model.vocab_size=256 is smaller than the data's vocabulary (320 token ids)"),
    (["data.tokenizer=bpe", "data.bpe.path={root}/bpe.json", "data.bpe.sha256=abc"],
     "is not the file this config was written for"),
])
def test_bad_tokenizer_settings_are_one_line_exit_2(files, tmp_path, capsys, overrides,
                                                    words):
    overrides = [o.format(root=files[0]) for o in overrides]
    assert main(["train", "--config", "tiny", *SMALL, *overrides,
                 f"train.workdir={tmp_path / 'w'}"]) == 2
    err = capsys.readouterr().err
    assert words in err and err.count("\n") == 1, err
    assert not (tmp_path / "w").exists()
