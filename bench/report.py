"""Printing a benchmark's markdown table and recording it under bench/results/."""

import datetime
import functools
import json
import math
import os
import platform
import re
import statistics

import jax


def emit(lines: list[str], out: str = "", append: bool = False) -> None:
    """Print the table; also write (or append) it to `out` when given."""
    table = "\n".join(lines) + "\n"
    print(table)
    if out:
        os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
        with open(out, "a" if append else "w", encoding="utf-8") as f:
            f.write(table + ("\n" if append else ""))


def header(name: str, argv: list[str]) -> list[str]:
    """Title (date, device, jax version) and the command that reproduces the table."""
    device = jax.devices()[0]
    kind = getattr(device, "device_kind", device.platform)
    cpu = platform.processor() or platform.machine()
    return [f"efflm bench {name} — {datetime.date.today()} — {jax.device_count()} x {kind} "
            f"({cpu}, {os.cpu_count()} cores), jax {jax.__version__}",
            f"command: efflm bench {' '.join(argv)}", ""]


def train_and_evaluate(preset: str, overrides: list[str], steps: int, workdir: str) -> dict:
    """Train `preset` for `steps` steps in `workdir`, then evaluate the final state.

    Returns validation bits per byte over `train.eval_batches` batches, the median step
    time from metrics.jsonl (the compiling first step is not logged there), and the
    `(cfg, program, state)` restored from the final checkpoint for further reporting.
    """
    from efflm.config import load_config
    from efflm.train.trainer import evaluate, restore_run, train

    cfg = load_config(preset, ["logging.progress=false", "logging.tensorboard=false",
                               f"train.steps={steps}", f"train.workdir={workdir}",
                               "train.eval_every=0", f"checkpoint.every={steps}",
                               *overrides])
    train(cfg)
    with open(os.path.join(workdir, "metrics.jsonl"), encoding="utf-8") as f:
        rows = [json.loads(line) for line in f]
    times = [r["step_time_s"] for r in rows if "step_time_s" in r]
    cfg, program, state, tokenizer, _ = restore_run(workdir)
    return {"bpb": evaluate(program, state, tokenizer,
                            cfg.train.eval_batches)["eval_bits_per_byte"],
            "step_time": statistics.median(times) if times else float("nan"),
            "restored": (cfg, program, state)}


COLLECTIVES = ("all-to-all", "all-gather", "reduce-scatter", "all-reduce", "collective-permute")
_SHAPE = re.compile(r"\b(pred|[fsu]\d+|bf16)\[([\d,]*)\]")
_COMPUTATION = re.compile(r"^(?:ENTRY )?%([\w.\-]+) \(.*\{$")
_CALLEES = re.compile(r"(?:calls|to_apply|body|true_computation|false_computation)=%([\w.\-]+)")
_BRANCHES = re.compile(r"branch_computations=\{([^}]*)\}")
_TRIP_COUNT = re.compile(r'"known_trip_count":\{"n":"(\d+)"\}')


def _shape_bytes(text: str) -> list[int]:
    sizes = []
    for dtype, dims in _SHAPE.findall(text):
        size = {"pred": 1, "bf16": 2}.get(dtype) or int(dtype[1:]) // 8
        for d in filter(None, dims.split(",")):
            size *= int(d)
        sizes.append(size)
    return sizes


def _op_bytes(op: str, result: str) -> int:
    """Bytes in the results of one collective: its result shapes, or, for an async
    all-gather or collective-permute start (operands then results in one tuple, then
    scalar contexts), the second half of its array shapes."""
    sizes = _shape_bytes(result)
    if result.rstrip().endswith("-start") and op in ("all-gather", "collective-permute"):
        arrays = [s for s, text in zip(sizes, _SHAPE.findall(result)) if text[1]]
        return sum(arrays[len(arrays) // 2:])
    return sum(sizes)


def group_size(attributes: str) -> int:
    """Devices per replica group of a collective, from its HLO attributes: explicit
    groups `{{0,1},{2,3}}`, an iota `[groups,size]<=[n]`, or mesh axes
    `mesh['axis_0'=2,'axis_1'=4] {'axis_1'}`."""
    explicit = re.search(r"replica_groups=\{\{([\d,]*)\}", attributes)
    if explicit:
        return len(explicit.group(1).split(","))
    iota = re.search(r"replica_groups=\[[\d,]*?(\d+)\]<=", attributes)
    if iota:
        return int(iota.group(1))
    mesh = re.search(r"replica_groups=mesh\[([^\]]*)\] \{([^}]*)\}", attributes)
    if mesh:
        sizes = dict(re.findall(r"'(\w+)'=(\d+)", mesh.group(1)))
        return math.prod(int(sizes[a]) for a in re.findall(r"'(\w+)'", mesh.group(2)))
    raise ValueError(f"cannot read the replica groups of: {attributes[:200]}")


# Bytes each device receives per byte of a collective's result, in a group of n devices
# (bandwidth-optimal ring algorithms; a permute delivers its result).
RECEIVED = {"all-gather": lambda n: (n - 1) / n, "all-to-all": lambda n: (n - 1) / n,
            "reduce-scatter": lambda n: n - 1, "all-reduce": lambda n: 2 * (n - 1) / n,
            "collective-permute": lambda n: 1}


def collective_bytes(hlo: str, received: bool = False) -> dict[str, int]:
    """Bytes in the results of each kind of collective op executed by one run of a
    compiled HLO module (per device), or with `received` the bytes each device receives
    (`RECEIVED`): ops inside a while loop's body count once per iteration (its known
    trip count), inside a conditional once for its largest branch. Raises ValueError for
    a loop holding collectives whose trip count is unknown."""
    ops, calls = {}, {}
    name = None
    for line in hlo.splitlines():
        header = _COMPUTATION.match(line)
        if header:
            name = header.group(1)
            ops[name], calls[name] = dict.fromkeys(COLLECTIVES, 0), []
            if line.startswith("ENTRY"):
                entry = name
            continue
        if name is None or "=" not in line:
            continue
        lhs, rhs = line.split("=", 1)
        for op in COLLECTIVES:
            found = re.search(rf"\s{op}(-start)?\(", rhs)
            if found:
                size = _op_bytes(op, rhs[:found.end() - 1])
                if received and op != "collective-permute":
                    size *= RECEIVED[op](group_size(rhs))
                ops[name][op] += size
        trips = _TRIP_COUNT.search(rhs)
        for callee in _CALLEES.findall(rhs):
            is_body = f"body=%{callee}" in rhs
            calls[name].append(([callee], int(trips.group(1)) if trips else None)
                               if is_body else ([callee], 1))
        for branches in _BRANCHES.findall(rhs):
            calls[name].append(([b.strip().lstrip("%") for b in branches.split(",")], 1))

    @functools.cache
    def total(comp: str) -> tuple[int, ...]:
        sums = [ops[comp][op] for op in COLLECTIVES]
        for callees, times in calls[comp]:
            inner = [total(c) for c in callees if c in ops]
            if not inner or not any(map(any, inner)):
                continue
            if times is None:
                raise ValueError(f"a loop in {comp} holds collectives but has no known "
                                 "trip count")
            largest = max(inner, key=sum)
            sums = [a + times * b for a, b in zip(sums, largest)]
        return tuple(sums)

    return {op: int(b) for op, b in zip(COLLECTIVES, total(entry))}
