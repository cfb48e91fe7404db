"""Where metrics go: DIR/metrics.jsonl, TensorBoard events (DIR/tb), a progress bar. Process 0 only."""

from __future__ import annotations

import json
import os

import jax


class MetricsWriter:
    def __init__(self, workdir: str, resume_step: int = 0, total_steps: int = 0, progress: bool = True):
        self.enabled = jax.process_index() == 0
        self.path = os.path.join(workdir, "metrics.jsonl")
        self._tb = None
        self._bar = None
        if not self.enabled:
            return
        if os.path.exists(self.path):
            self._truncate_after(resume_step)
        self._file = open(self.path, "a")
        try:
            from tensorboardX import SummaryWriter

            self._tb = SummaryWriter(os.path.join(workdir, "tb"))
        except ImportError:  # pragma: no cover - tensorboardX is a dependency
            self._tb = None
        if progress and total_steps:
            from tqdm import tqdm

            self._bar = tqdm(total=total_steps, initial=resume_step, unit="step", dynamic_ncols=True)

    def _truncate_after(self, step: int):
        """On resume, records past the restored step are dropped: the run writes them again."""
        with open(self.path) as f:
            lines = [ln for ln in f if ln.strip()]
        kept = [ln for ln in lines if json.loads(ln).get("step", 0) <= step]
        if len(kept) != len(lines):
            print(f"resuming at step {step}: {len(lines) - len(kept)} later metric records will be rewritten")
            with open(self.path, "w") as f:
                f.writelines(kept)

    def write(self, record: dict):
        if not self.enabled:
            return
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self._tb is not None:
            for k, v in record.items():
                if isinstance(v, (int, float)) and k != "step":
                    self._tb.add_scalar(k, v, record["step"])

    def progress(self, step: int, **postfix):
        if self._bar is not None:
            self._bar.n = step
            self._bar.set_postfix(postfix, refresh=False)
            self._bar.refresh()

    def close(self):
        if not self.enabled:
            return
        self._file.close()
        if self._tb is not None:
            self._tb.close()
        if self._bar is not None:
            self._bar.close()
