"""The `efflm` command line: train, eval, generate, export, config show, data build,
data tokenizer, sweep, report, bench."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys

from efflm.errors import EfflmError


def _train(args) -> int:
    from efflm.config import load_config
    from efflm.train.trainer import train

    train(load_config(args.config, args.overrides))
    return 0


def _eval(args) -> int:
    from efflm.train.trainer import evaluate, restore_run

    if args.batches < 0:
        raise EfflmError(f"--batches must be >= 0 (0: the whole validation split), got "
                         f"{args.batches}")
    cfg, program, state, tokenizer, step = restore_run(args.workdir, args.overrides)
    result = {"step": step, **evaluate(program, state, tokenizer, args.batches)}
    print(json.dumps(result))
    return 0


def _generate(args) -> int:
    import numpy as np

    from efflm.train.generate import sample
    from efflm.train.trainer import restore_run

    cfg, program, state, tokenizer, _ = restore_run(args.workdir, args.overrides)
    ids = tokenizer.encode(args.prompt)
    if args.top_k > cfg.model.vocab_size:
        raise EfflmError(f"--top-k {args.top_k} is larger than the vocabulary "
                         f"({cfg.model.vocab_size}); use at most {cfg.model.vocab_size}, "
                         "or 0 for no limit")
    with program.context():
        out = sample(program.model, state.variables(), ids, max_new_tokens=args.max_new_tokens,
                     temperature=args.temperature, top_k=args.top_k, seed=args.seed,
                     stop_id=tokenizer.eos_id, bos_id=tokenizer.bos_id)
    # The continuation as the tokenizer spells it after the prompt (a piece's leading
    # space, a character split across the boundary), not decoded on its own.
    before = tokenizer.decode(ids)
    text = tokenizer.decode(np.concatenate([ids, np.asarray(out, np.int32).reshape(-1)]))
    continuation = text[len(before):] if text.startswith(before) else tokenizer.decode(out)
    sys.stdout.write(args.prompt + continuation + "\n")
    return 0


def _export(args) -> int:
    from efflm.train.export import export_quantized
    from efflm.train.trainer import restore_run

    cfg, program, state, _, step = restore_run(args.workdir, args.overrides)
    out = args.out or os.path.join(args.workdir, "export", "quantized.npz")
    print(json.dumps({"step": step, **export_quantized(program, state, out)}))
    return 0


def _config_show(args) -> int:
    from efflm.config import load_config, to_yaml

    sys.stdout.write(to_yaml(load_config(args.config, args.overrides), used_only=True))
    return 0


def _data_build(args) -> int:
    from efflm.data.build import build

    result = build(args.name, args.paths, args.data_dir, args.val_fraction, args.overwrite,
                   args.tokenizer, args.vocab_size)
    state = "built" if result["built"] else "up to date"
    use = f"data.source=tfds data.tfds.name={result['name']}" + (
        f" data.tfds.data_dir={args.data_dir}" if args.data_dir else "")
    tok = result.get("tokenizer")
    if tok:
        _print_tokenizer(args.tokenizer, tok)
        use += f" data.tokenizer={args.tokenizer} data.{args.tokenizer}.path={tok['path']}"
    print(f"{result['name']}: {state} in {result['path']} ({result['train']} training and "
          f"{result['validation']} validation documents); train on it with {use}")
    return 0


def _print_tokenizer(name: str, result: dict) -> None:
    if result["trained"]:
        print(f"{name}: trained {result['vocab_size']} ids on {result['documents']} "
              f"documents ({result['bytes'] / 2**20:.1f} MiB) in {result['seconds']:.1f} s: "
              f"{result['path']}")
    else:
        print(f"{name}: up to date in {result['path']}")


def _data_tokenizer(args) -> int:
    from efflm.config import load_config
    from efflm.data import SOURCES
    from efflm.data.build import train_tokenizer
    from efflm.data.sources import make_source

    cfg = load_config(args.config, args.overrides)
    if SOURCES[cfg.data.source].tokenizer(cfg.data) is not None:
        raise EfflmError(f"data.source={cfg.data.source} yields token ids, not text: a "
                         "tokenizer trains on text")
    result = train_tokenizer(args.name, make_source(cfg.data, "train"), args.vocab_size,
                             args.out, args.overwrite)
    _print_tokenizer(args.name, result)
    print(f"use it with data.tokenizer={args.name} data.{args.name}.path={args.out}")
    return 0


def _sweep(args) -> int:
    from efflm.train.sweep import run_sweep

    return run_sweep(args.file, args.out, steps=args.steps, seeds=args.seeds)


def _report(args) -> int:
    from efflm.train.report import write_report

    out = args.out
    if not out:
        single = args.paths[0] if len(args.paths) == 1 else ""
        out = single if single and os.path.isfile(os.path.join(single, "plan.json")) else (
            "runs/report")
    print(f"report: {write_report(args.paths, out)}")
    return 0


def _bench(args) -> int:
    from efflm.bench import (
        attention,
        context,
        data,
        depth,
        gdn,
        generate,
        kernels,
        mfu,
        moe,
        optim,
        quant,
        recall,
        tokenizers,
    )
    from efflm.bench import compile as compile_bench

    which = args.rest[0] if args.rest else "mfu"
    benches = {"mfu": mfu.main, "fused_cross_entropy": kernels.main,
               "flash_attention": kernels.main, "grouped_matmul": kernels.main,
               "linear_attention": kernels.main, "selected_attention": kernels.main,
               "compile": compile_bench.main,
               "generate": generate.main, "moe": moe.main, "depth": depth.main,
               "attention": attention.main, "quant": quant.main, "gdn": gdn.main,
               "recall": recall.main, "context": context.main, "data": data.main,
               "optim": optim.main, "tokenizers": tokenizers.main}
    if which not in benches:
        raise EfflmError(f"unknown benchmark {which!r}; choose one of: {', '.join(benches)}")
    return benches[which](args.rest)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="efflm", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train or resume a model")
    t.add_argument("--config", default="tiny", help="preset name in configs/ or a YAML path")
    t.add_argument("overrides", nargs="*", help="key=value, e.g. model.mlp.d_ff=512")
    t.set_defaults(func=_train)

    for name, func, help_ in (("eval", _eval, "validation loss of the latest checkpoint"),
                              ("generate", _generate, "sample text from the latest checkpoint")):
        e = sub.add_parser(name, help=help_)
        e.add_argument("--workdir", required=True, help="train.workdir of a run")
        e.add_argument("overrides", nargs="*", help="key=value overrides (e.g. data settings)")
        e.set_defaults(func=func)
        if name == "eval":
            e.add_argument("--batches", type=int, default=0,
                           help="evaluate the fixed sample of this many batches that "
                                "training evaluates (eval_*); 0: the whole split "
                                "(full_eval_*)")
        else:
            e.add_argument("--prompt", required=True)
            e.add_argument("--max-new-tokens", type=int, default=200)
            e.add_argument("--temperature", type=float, default=0.8)
            e.add_argument("--top-k", type=int, default=40)
            e.add_argument("--seed", type=int, default=0)

    x = sub.add_parser("export", help="write the quantised weights of the latest checkpoint")
    x.add_argument("--workdir", required=True, help="train.workdir of a run")
    x.add_argument("--out", default="", help=".npz path (default: WORKDIR/export/quantized.npz)")
    x.add_argument("overrides", nargs="*", help="key=value overrides")
    x.set_defaults(func=_export)

    c = sub.add_parser("config", help="inspect configs")
    csub = c.add_subparsers(dest="action", required=True)
    show = csub.add_parser("show", help="print the resolved config")
    show.add_argument("--config", default="tiny")
    show.add_argument("overrides", nargs="*")
    show.set_defaults(func=_config_show)

    d = sub.add_parser("data", help="prepare datasets")
    dsub = d.add_subparsers(dest="action", required=True)
    db = dsub.add_parser("build", help="local .txt/.jsonl files as a TFDS dataset "
                                       "(ArrayRecord) for data.source=tfds")
    db.add_argument("name", help="the dataset's name: a letter, then letters, digits, _")
    db.add_argument("--from", dest="paths", nargs="+", required=True,
                    help="files, folders or glob patterns")
    db.add_argument("--data-dir", default="", help="where to write it (default: TFDS's)")
    db.add_argument("--val-fraction", type=float, default=0.02)
    db.add_argument("--overwrite", action="store_true", help="rebuild when inputs changed")
    db.add_argument("--tokenizer", default="", help="also train this tokenizer (bpe, "
                    "sentencepiece) on the training split, kept beside the dataset")
    db.add_argument("--vocab-size", type=int, default=0, help="its number of ids")
    db.set_defaults(func=_data_build)
    dt = dsub.add_parser("tokenizer", help="train a tokenizer on a data source's training "
                                           "split")
    dt.add_argument("name", help="bpe or sentencepiece")
    dt.add_argument("--vocab-size", type=int, required=True, help="its number of ids")
    dt.add_argument("--out", required=True, help="the file to write")
    dt.add_argument("--config", default="tiny", help="preset or YAML whose data settings "
                    "name the source")
    dt.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    dt.add_argument("overrides", nargs="*", help="key=value data settings, e.g. "
                    "data.source=files data.files.paths=[corpus]")
    dt.set_defaults(func=_data_tokenizer)

    w = sub.add_parser("sweep", help="run an ablation from a sweep file (configs/sweeps/)")
    w.add_argument("file", help="a sweep file (YAML), or the name of one in configs/sweeps/")
    w.add_argument("--out", default="", help="its folder (default runs/sweeps/<file name>)")
    w.add_argument("--steps", type=int, help="the base's steps, in place of budget.steps")
    w.add_argument("--seeds", type=int, help="in place of the file's seeds")
    w.set_defaults(func=_sweep)
    r = sub.add_parser("report", help="a table and plots of training runs")
    r.add_argument("paths", nargs="+", help="a sweep's folder, or workdirs")
    r.add_argument("--out", default="", help="where report.md and the plots go (default: "
                   "the sweep's folder, else runs/report)")
    r.set_defaults(func=_report)
    b = sub.add_parser("bench", help="benchmarks (see bench/)")
    b.add_argument("rest", nargs=argparse.REMAINDER)
    b.set_defaults(func=_bench)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    # key=value overrides may follow options (argparse takes positionals in one run).
    if unknown and all("=" in u and not u.startswith("-") for u in unknown) and isinstance(
            getattr(args, "overrides", None), list):
        args.overrides += unknown
    elif unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    logging.basicConfig(level=logging.WARNING, format="efflm: %(message)s")
    logging.getLogger("absl").setLevel(logging.ERROR)
    try:
        return args.func(args)
    except EfflmError as e:
        print(f"efflm: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
