"""Byte-level BPE (`efflm/data/bpe.py`): trained and applied, round trips exactly, each
token's byte count is the bytes it spells, and files it cannot count exactly are
refused."""

import json
import random

import numpy as np
import pytest

from efflm.config import DataConfig
from efflm.data import get_tokenizer
from efflm.data.bpe import SPECIALS, Bpe, BpeSettings
from efflm.errors import ConfigError, DataError

ALPHABET = "abcdefgh ijk\n\t()=:_.,éü漢字🙂 "


def corpus(n=200, seed=0):
    rng = random.Random(seed)
    words = ["def", "return", "self", "import", "class", "  ", "    ", "x", "None", "für"]
    return [" ".join(rng.choice(words) + "".join(rng.choice(ALPHABET) for _ in range(3))
                     for _ in range(rng.randrange(5, 60))) for _ in range(n)]


@pytest.fixture(scope="module")
def bpe_path(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("bpe") / "bpe.json")
    assert Bpe.train(corpus(), 400, path) == 400
    return path


def load(path, **specials):
    return get_tokenizer(DataConfig(tokenizer="bpe", bpe=BpeSettings(path=path, **specials)))


def gpt2_byte_of_char() -> dict:
    """GPT-2's byte-level alphabet, written out: printable bytes stand for themselves,
    the others for the characters from 256 up, in byte order."""
    printable = [*range(33, 127), *range(161, 173), *range(174, 256)]
    chars = dict(zip(printable, printable))
    extra = 256
    for b in range(256):
        if b not in chars:
            chars[b], extra = extra, extra + 1
    return {chr(c): b for b, c in chars.items()}


TEXTS = ["", "def f(x):\n\treturn x  # für 漢字 🙂", "  leading and trailing spaces  ",
         "<|eos|> is text here, as is <|bos|><|pad|>", "\r\n\x00\x7f", "é" * 40,
         "".join(random.Random(3).choice(ALPHABET) for _ in range(500))]


def test_round_trip_exact_and_each_tokens_bytes_are_its_spelling(bpe_path):
    tok = load(bpe_path)
    assert (tok.pad_id, tok.bos_id, tok.eos_id) == (0, 1, 2) and tok.vocab_size == 400
    byte_of = gpt2_byte_of_char()
    for text in TEXTS:
        ids, counts = tok.encode_counted(text)
        assert ids.dtype == np.int32 and tok.decode(ids) == text
        assert (ids > 2).all(), "a special matched in text"
        spelled = [bytes(byte_of[c] for c in tok.hf.id_to_token(int(i))) for i in ids]
        assert b"".join(spelled) == text.encode("utf-8")
        np.testing.assert_array_equal(counts, [len(s) for s in spelled])
        np.testing.assert_array_equal(tok.encode(text), ids)
    # A lone surrogate (possible in JSON text) is counted as the '?' it is encoded as.
    ids, counts = tok.encode_counted("a\ud800b")
    assert tok.decode(ids) == "a?b" and counts.sum() == 3
    assert tok.decode([tok.bos_id, *tok.encode("hi"), tok.eos_id, 10_000]) == "hi"


def test_merges_are_learned(bpe_path):
    """Trained on the corpus, a common word is fewer tokens than bytes."""
    tok = load(bpe_path)
    assert len(tok.encode("return self")) < len("return self") / 2


def _edited(path, tmp_path, edit):
    spec = json.loads(open(path, encoding="utf-8").read())
    edit(spec)
    out = tmp_path / "edited.json"
    out.write_text(json.dumps(spec), encoding="utf-8")
    return str(out)


@pytest.mark.parametrize("edit, words", [
    (lambda s: s.update(normalizer={"type": "NFKC"}), r"it normalises text \(NFKC\)"),
    (lambda s: s["pre_tokenizer"].update(add_prefix_space=True), "adds a prefix space"),
    (lambda s: s.update(pre_tokenizer={"type": "Whitespace"}), "not byte-level"),
    (lambda s: s.update(decoder=None), "its decoder is not byte-level"),
    (lambda s: s["model"].update(dropout=0.1), "samples its merges"),
    (lambda s: s.update(pre_tokenizer={"type": "Sequence", "pretokenizers": [
        {"type": "WhitespaceSplit"}, s["pre_tokenizer"]]}), "WhitespaceSplit drops text"),
    (lambda s: s["model"]["vocab"].pop("Ā"), "lacks 1 of the 256 byte-level tokens"),
])
def test_a_file_whose_bytes_are_not_fixed_per_token_is_refused(bpe_path, tmp_path, edit,
                                                               words):
    with pytest.raises(ConfigError, match=words):
        load(_edited(bpe_path, tmp_path, edit))


def test_a_gpt2_style_file_with_one_special_serves(bpe_path, tmp_path):
    """A Sequence pre-tokenizer holding ByteLevel, and specials named by settings."""
    def edit(spec):
        spec["pre_tokenizer"] = {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": r"\s+"}, "behavior": "Isolated",
             "invert": False},
            {**spec["pre_tokenizer"], "use_regex": False}]}

    path = _edited(bpe_path, tmp_path, edit)
    tok = load(path, pad=SPECIALS[2], bos=SPECIALS[2])
    assert tok.pad_id == tok.bos_id == tok.eos_id == 2
    assert tok.decode(tok.encode(TEXTS[1])) == TEXTS[1]
    with pytest.raises(ConfigError, match=r"data.bpe.eos='<\|end\|>' is not a special token"
                                          r".*<\|bos\|>, <\|eos\|>, <\|pad\|>"):
        load(path, eos="<|end|>")


def test_truncation_in_the_file_is_ignored_and_pickling_keeps_specials_as_text(bpe_path,
                                                                             tmp_path):
    import pickle

    path = _edited(bpe_path, tmp_path, lambda s: s.update(truncation={
        "direction": "Right", "max_length": 4, "strategy": "LongestFirst", "stride": 0}))
    tok = pickle.loads(pickle.dumps(load(path)))
    text = TEXTS[3] * 3
    assert tok.decode(tok.encode(text)) == text and (tok.encode(text) > 2).all()


def test_training_below_the_byte_alphabet_is_refused(tmp_path):
    with pytest.raises(DataError, match="below what byte-level BPE needs: 256 bytes"):
        Bpe.train(corpus(5), 200, str(tmp_path / "t.json"))
    assert not list(tmp_path.iterdir())
