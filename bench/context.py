"""Per-device memory and communication of a train step under sequence parallelism.

    efflm bench context [--lengths 2048,4096,...] [--budget-mib 1024] [--out FILE]
                        [key=value ...]                          (needs 8 devices)
    efflm bench context --compare [--lengths 4096,16384] [--time-steps 3] [--out FILE]

Side by side in one run, for each sequence length: the `tiny` model (one sequence per
step) on one device, and on 8 devices with `mesh.sequence=8` under each
`model.attention.context_parallel` strategy (ring, allgather). Each train step is only
compiled (never run): its per-device memory is the compiled program's
`memory_analysis()` (temp: activations and scratch; peak: arguments + outputs + temp -
aliased), and the bytes each device receives per step through each kind of collective
are read from its HLO (`efflm.bench.report.collective_bytes`: each op's result size
times what a bandwidth-optimal algorithm delivers per device in its group, a ring loop's
ops counted once per iteration). The one-device
step attends in 8 query blocks (`model.attention.softmax.block_size` = length / 8), each
over the keys up to its own block. The longest length that fits `--budget-mib` of peak
memory per device is marked for each column. Ratios are of temp memory; the last one
sets ring attention at a length against one device at an eighth of it (the same tokens
per device): close to 1 when the per-device memory is that of the device's own share.

On a CPU run: XLA_FLAGS=--xla_force_host_platform_device_count=8.
"""

from __future__ import annotations

import argparse
import sys

from efflm.bench.report import COLLECTIVES, collective_bytes, emit, header
from efflm.config import load_config

STRATEGIES = ("ring", "allgather")
MIB = 2 ** 20
# --compare: every strategy at mesh.sequence=4 (Ulysses splits tiny's 4 heads), the halo
# with `sliding` (window 64, no sinks) and the all-scan with `gla`, each beside its kind
# on one device.
COMPARED = ("zigzag", "ring", "ulysses", "allgather", "halo", "allscan")
KIND_OF = {"halo": ("model.attention.kind=sliding", "model.attention.sliding.window=64",
                    "model.attention.sliding.sinks=0"),
           "allscan": ("model.attention.kind=gla",)}


def ring_work(strategy: str, n: int) -> tuple[float, float]:
    """(busiest device, mean) attention work of one layer's forward pass, in chunk x chunk
    blocks as the XLA path computes them: the ring's device i attends to i + 1 chunks
    (its own as a whole masked tile), zig-zag's every device to its own halves (three
    half x half tiles) and to half a chunk from each other device."""
    if strategy == "ring":
        return float(n), (n + 1) / 2
    each = 3 / 4 + (n - 1) / 2
    return each, each


def _compare(args, argv) -> list[str]:
    import jax

    from efflm.bench.mfu import measure

    lengths = [int(n) for n in args.lengths.split(",")]
    lines = [*header("context", argv),
             "`tiny`, one sequence per step, mesh.sequence=4 on 4 devices; per-device MiB "
             "from the compiled train step's memory_analysis(), MiB received per device "
             "per step by collective (counted as in the first table); `halo` runs "
             "`sliding` (window 64, no sinks) and `allscan` `gla`, each beside its kind on "
             "one device.", "",
             "| length | strategy | temp MiB | peak MiB | "
             + " | ".join(COLLECTIVES) + " |", "|---|---|---|---|" + "---|" * len(COLLECTIVES)]
    for length in lengths:
        rows = [("one device", (f"model.attention.softmax.block_size={length // 4}",), 1),
                *((f"{kind[0].split('=')[1]}, one device", kind, 1)
                  for kind in KIND_OF.values())]
        rows += [(s, (*KIND_OF.get(s, ()), "mesh.sequence=4",
                      f"model.attention.context_parallel={s}"), 4) for s in COMPARED]
        for name, extra, devices in rows:
            cfg = _config(length, args.overrides, "mesh.data=1", *extra)
            r = step_memory_and_traffic(cfg, jax.devices()[:devices])
            lines.append(f"| {length} | {name} | {r['temp'] / MIB:.1f} | {r['peak'] / MIB:.1f}"
                         " | " + " | ".join(f"{r['moved'][op] / MIB:.1f}"
                                            for op in COLLECTIVES) + " |")
            print(lines[-1], flush=True)
    n, length = 4, lengths[0]
    lines += ["", f"Zig-zag against the plain ring at {length} tokens, mesh.sequence={n} x "
              "data=2 (8 host devices sharing the CPU's cores, so the time follows the total "
              "work, not the busiest device's): attention work per layer in chunk x chunk "
              "blocks (analytic: `ring_work`) and the measured median step time over "
              f"{args.time_steps} steps.", "",
              "| strategy | busiest device's blocks | mean blocks | step s |", "|---|---|---|---|"]
    for s in ("ring", "zigzag"):
        cfg = _config(length, args.overrides, "mesh.data=2", f"mesh.sequence={n}",
                      "train.batch_size=2", f"model.attention.context_parallel={s}")
        r = measure(cfg, args.time_steps, 1)
        busiest, mean = ring_work(s, n)
        lines.append(f"| {s} | {busiest:.2f} | {mean:.2f} | {r['step_time']:.3f} |")
        print(lines[-1], flush=True)
    return lines


def step_memory_and_traffic(cfg, devices) -> dict:
    """Per-device temp and peak bytes of `cfg`'s compiled train step on `devices`, and
    the bytes its collectives move per step."""
    import jax
    import jax.numpy as jnp

    from efflm import mesh as mesh_lib
    from efflm.train.step import build_program

    program = build_program(cfg, mesh_lib.make_mesh(cfg.mesh, devices))
    with program.context():
        state = jax.eval_shape(program.init, jax.random.key(0))
        rows = jax.ShapeDtypeStruct((cfg.train.batch_size, cfg.data.seq_len), jnp.int32,
                                    sharding=mesh_lib.batch_sharding(program.mesh))
        batch = dict.fromkeys(("inputs", "targets", "segment_ids", "positions"), rows)
        compiled = program.train_step.lower(state, batch).compile()
    m = compiled.memory_analysis()
    peak = (m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes
            - m.alias_size_in_bytes)
    return {"temp": m.temp_size_in_bytes, "peak": peak,
            "moved": collective_bytes(compiled.as_text(), received=True)}


def _config(length: int, overrides: list[str], *extra: str):
    return load_config("tiny", ["logging.progress=false", "train.batch_size=1",
                                "train.grad_accum=1", f"data.seq_len={length}",
                                f"model.max_seq_len={length}", *overrides, *extra])


def main(argv: list[str] | None = None) -> int:
    import jax

    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(prog="efflm bench context")
    p.add_argument("which", nargs="?")
    p.add_argument("--lengths", default="512,1024,2048,4096,8192,16384,32768,65536")
    p.add_argument("--budget-mib", type=float, default=1024.0)
    p.add_argument("--out", default="")
    p.add_argument("--compare", action="store_true",
                   help="every strategy at mesh.sequence=4 (--lengths: two or so), and "
                        "zig-zag against the ring in step time")
    p.add_argument("--time-steps", type=int, default=3)
    p.add_argument("overrides", nargs="*")
    args = p.parse_intermixed_args(argv)
    if jax.device_count() < 8:
        raise SystemExit("efflm bench context needs 8 devices; on a CPU set "
                         "XLA_FLAGS=--xla_force_host_platform_device_count=8")
    if args.compare:
        emit(_compare(args, argv), args.out)
        return 0
    lengths = [int(n) for n in args.lengths.split(",")]
    columns = ["one device", *(f"{s} x8" for s in STRATEGIES)]
    results = {}
    for length in lengths:
        one = _config(length, args.overrides, "mesh.data=1",
                      f"model.attention.softmax.block_size={length // 8}")
        results[length] = {"one device": step_memory_and_traffic(one, jax.devices()[:1])}
        for s in STRATEGIES:
            cfg = _config(length, args.overrides, "mesh.data=1", "mesh.sequence=8",
                          f"model.attention.context_parallel={s}")
            results[length][f"{s} x8"] = step_memory_and_traffic(cfg, jax.devices()[:8])
        print(f"length {length}: " + ", ".join(
            f"{c} {results[length][c]['peak'] / MIB:.0f} MiB" for c in columns), flush=True)

    def fits(column):
        ok = [n for n in lengths if results[n][column]["peak"] <= args.budget_mib * MIB]
        return max(ok) if ok else None

    longest = {c: fits(c) for c in columns}
    lines = [*header("context", argv),
             "`tiny`, one sequence per step; per-device MiB from the compiled train step's "
             "memory_analysis() (temp | peak); * = the longest length within "
             f"{args.budget_mib:.0f} MiB of peak per device.", "",
             "| length | " + " | ".join(f"{c} temp | {c} peak" for c in columns)
             + " | ring / one device | ring / allgather | ring / one device at length/8 |",
             "|---|" + "---|---|" * len(columns) + "---|---|---|"]
    for n in lengths:
        r = results[n]
        cells = []
        for c in columns:
            mark = "*" if longest[c] == n else ""
            cells.append(f"{r[c]['temp'] / MIB:.1f} | {r[c]['peak'] / MIB:.1f}{mark}")
        ring = r["ring x8"]["temp"]
        share = results.get(n // 8, {}).get("one device")
        lines.append(f"| {n} | " + " | ".join(cells)
                     + f" | {ring / r['one device']['temp']:.3f} | "
                     f"{ring / r['allgather x8']['temp']:.3f} | "
                     + (f"{ring / share['temp']:.2f} |" if share else "— |"))
    lines += ["", "MiB received per device per step through each collective (all-gather "
              "and all-to-all (n-1)/n of the result, reduce-scatter (n-1)x, all-reduce "
              "2(n-1)/n, a permute its result; ring steps counted per iteration):", "",
              "| length | strategy | " + " | ".join(COLLECTIVES) + " |",
              "|---|---|" + "---|" * len(COLLECTIVES)]
    for n in lengths:
        for s in STRATEGIES:
            moved = results[n][f"{s} x8"]["moved"]
            lines.append(f"| {n} | {s} | "
                         + " | ".join(f"{moved[op] / MIB:.1f}" for op in COLLECTIVES) + " |")
    emit(lines, args.out)
    return 0
