"""Printing a benchmark's markdown table and recording it under bench/results/."""

import datetime
import os
import platform

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
