"""Bits per byte of one model under several tokenizers, at equal training bytes.

    efflm bench tokenizers [--config tiny] [--variants byte,bpe:4096,bpe:16384]
                           [--steps 300] [--root DIR] [--batches 20] [--out FILE]
                           [key=value ...]

Each variant is `byte` or `NAME:VOCAB` (bpe, sentencepiece), trained by
`efflm data tokenizer` on the training split of `--config`'s data (default pycode) into
`--root` (kept: a second run reuses it). Every row trains for `--steps` steps with the
same batch, seed and learning-rate schedule; a row's `data.seq_len` is the byte
tokenizer's divided by its tokenizer's bytes per token (measured on every 10th training
document), rounded to a multiple of 8, so every row sees about the same bytes of text per
step and the same context in bytes. Then: bits per byte over the whole validation split
(`efflm eval --batches 0`; each row's scored bytes are listed, and equal across rows when
the byte counts are exact), the training pipeline's tokens and bytes per second in the
calling thread (over `--batches` batches after the first), the model FLOPs per step and
the median step time. Equal bytes and steps, not equal compute: a larger vocabulary
costs head FLOPs, shorter rows save the rest.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

from efflm.bench.report import emit, header, train_and_evaluate


def _variant(text: str) -> tuple[str, int]:
    """`byte` or `NAME:VOCAB` -> (name, vocabulary size; 0 for none)."""
    name, _, vocab = text.partition(":")
    if vocab and not vocab.isdigit():
        raise argparse.ArgumentTypeError(f"{text!r}: the vocabulary after ':' must be a "
                                         "number, e.g. bpe:4096")
    return name, int(vocab) if vocab else 0


def bytes_per_token(tokenizer, docs) -> float:
    """Bytes of text per token over every 10th document of `docs`."""
    nbytes = ntokens = 0
    for i in range(0, len(docs), 10):
        text = docs[i]
        nbytes += len(text.encode("utf-8", errors="replace"))
        ntokens += len(tokenizer.encode(text))
    return nbytes / max(ntokens, 1)


def main(argv: list[str] | None = None) -> int:
    from efflm.bench.data import pipeline_tokens_per_sec
    from efflm.config import load_config
    from efflm.data import data_tokenizer
    from efflm.data.build import train_tokenizer
    from efflm.data.sources import make_source
    from efflm.flops import train_flops_per_step
    from efflm.train.trainer import evaluate

    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(prog="efflm bench tokenizers")
    p.add_argument("which", nargs="?")
    p.add_argument("--config", default="tiny")
    variants = lambda text: [_variant(v) for v in text.split(",")]  # noqa: E731
    p.add_argument("--variants", default=variants("byte,bpe:4096,bpe:16384"), type=variants)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batches", type=int, default=20)
    p.add_argument("--root", default="")
    p.add_argument("--out", default="")
    p.add_argument("overrides", nargs="*")
    args = p.parse_intermixed_args(argv)
    root = args.root or tempfile.mkdtemp(prefix="efflm_bench_tokenizers_")
    base = load_config(args.config, ["logging.progress=false", *args.overrides])
    train_docs = make_source(base.data, "train")
    rows = []
    for name, vocab in args.variants:
        text = f"{name}:{vocab}" if vocab else name
        overrides = [*args.overrides, f"data.tokenizer={name}"]
        if vocab:
            path = os.path.join(root, f"{name}_{vocab}")
            if not os.path.isfile(path):
                train_tokenizer(name, train_docs, vocab, path)
            overrides.append(f"data.{name}.path={path}")
        cfg = load_config(args.config, ["logging.progress=false", *overrides])
        tokenizer = data_tokenizer(cfg.data)
        per_token = bytes_per_token(tokenizer, train_docs)
        seq_len = max(8, round(base.data.seq_len / per_token / 8) * 8)
        overrides.append(f"data.seq_len={seq_len}")
        cfg = load_config(args.config, ["logging.progress=false", *overrides])
        rate = pipeline_tokens_per_sec(cfg, args.batches, 0)
        workdir = os.path.join(root, "run_" + text.replace(":", "_"))
        result = train_and_evaluate(args.config, overrides, args.steps, workdir)
        cfg, program, state = result["restored"]
        full = evaluate(program, state, tokenizer, 0)
        tokens, scored = full["full_eval_tokens"], full["full_eval_bytes"]
        flops = train_flops_per_step(cfg.model, seq_len, cfg.train.batch_size)
        rows.append(f"| {text} | {tokenizer.vocab_size} | {per_token:.3f} | {seq_len} | "
                    f"{flops / 1e9:.1f} | "
                    f"{cfg.train.batch_size * seq_len * per_token * args.steps / 2**20:.1f} | "
                    f"{full['full_eval_bits_per_byte']:.4f} | {tokens:,.0f} | {scored:,.0f} | "
                    f"{rate:,.0f} | {rate * per_token:,.0f} | {result['step_time']:.3f} |")
    emit([*header("tokenizers", argv),
          f"`{args.config}` for {args.steps} steps per row (batch {base.train.batch_size}); "
          "bits per byte over the whole validation split; pipeline in the calling thread "
          f"over {args.batches} batches.", "",
          "| tokenizer | vocabulary | bytes/token (train) | seq_len | model GFLOP/step | "
          "training MiB of text | "
          "bits/byte | validation tokens | validation bytes | pipeline tokens/s | "
          "pipeline bytes/s | step s |",
          "|---|---|---|---|---|---|---|---|---|---|---|---|", *rows], args.out)
    return 0
