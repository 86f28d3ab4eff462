"""Metric sinks: metrics.jsonl, TensorBoard event files and a progress bar."""

from __future__ import annotations

import json
import math
import os

from tqdm import tqdm


def truncate_jsonl(path: str, last_step: int) -> None:
    """Drop rows logged after `last_step` (a resumed run logs them again)."""
    if not os.path.exists(path):
        return
    keep = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut short by a crash
            if row.get("step", 0) <= last_step:
                keep.append(line if line.endswith("\n") else line + "\n")
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.writelines(keep)
    os.replace(tmp, path)


class MetricsWriter:
    """Writes each row to every enabled sink; only process 0 writes."""

    def __init__(self, workdir: str, *, enabled: bool, tensorboard: bool, progress: bool,
                 total_steps: int, start_step: int):
        self.enabled = enabled
        self.jsonl = None
        self.tb = None
        self.bar = None
        if not enabled:
            return
        self.jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a", encoding="utf-8")
        if tensorboard:
            from tensorboardX import SummaryWriter

            # TensorBoard hides the points a run logged after the step it resumes from.
            self.tb = SummaryWriter(os.path.join(workdir, "tensorboard"),
                                    purge_step=start_step + 1)
        if progress:
            self.bar = tqdm(total=total_steps, initial=start_step, dynamic_ncols=True,
                            unit="step", desc="train")

    def write(self, row: dict) -> None:
        if not self.enabled:
            return
        clean = {k: (float(v) if not isinstance(v, (int, str)) else v) for k, v in row.items()}
        self.jsonl.write(json.dumps(clean) + "\n")
        self.jsonl.flush()
        step = int(row["step"])
        if self.tb is not None:
            for k, v in clean.items():
                if k != "step" and isinstance(v, (int, float)) and math.isfinite(v):
                    self.tb.add_scalar(k, v, step)
        if self.bar is not None:
            shown = {k: clean[k] for k in ("loss", "eval_loss", "tokens_per_sec", "mfu")
                     if k in clean}
            self.bar.set_postfix({k: f"{v:.4g}" for k, v in shown.items()}, refresh=False)
            self.bar.update(step - self.bar.n)

    def message(self, text: str) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(text)
        else:
            print(text, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.tb is not None:
            self.tb.close()
        if self.jsonl is not None:
            self.jsonl.close()
