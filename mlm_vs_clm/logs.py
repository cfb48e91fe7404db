"""Where metrics go: DIR/metrics.jsonl, TensorBoard events (DIR/tb), a progress bar. Process 0 only."""

from __future__ import annotations

import json
import logging
import os
import sys
import threading

import jax

# Library log lines that say nothing a user can act on (absl's Python logger carries them):
# orbax reading a checkpoint written without its optional _CHECKPOINT_METADATA file or clearing
# the unfinished save a crash left, and the
# tracebacks its background threads log for a full disk (the command reports that in one line).
_NOISE = ("Metadata file does not exist", "Attempted to create temporary directory")
_DISK_FULL = "No space left on device"


class _DropNoise(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.msg, str) and record.msg.startswith(_NOISE):
            return False
        text = record.getMessage() + (str(record.exc_info[1]) if record.exc_info and record.exc_info[1] else "")
        return _DISK_FULL not in text


def quiet_library_noise() -> None:
    """Drops the library warnings of _NOISE (once per process, idempotent)."""
    logger = logging.getLogger("absl")
    if not any(isinstance(f, _DropNoise) for f in logger.filters):
        logger.addFilter(_DropNoise())


# tensorstore hands each write it finishes to the asyncio loop that awaits it, from its own
# threads (`loop.call_soon_threadsafe`), and passes any error there to sys.unraisablehook (a bare
# traceback on stderr). When a checkpoint save or restore fails, orbax's coroutine ends at the
# first error and closes its loop while the other writes are still running; as each of them ends,
# that call raises "RuntimeError: Event loop is closed". Those are orphans of the failed operation,
# whose own error is reported; any other unraisable error is printed as usual.
class OrphanedCallbacks:
    """A sys.unraisablehook that holds closed-loop callback errors until the checkpoint operation
    in flight settles: dropped if it failed (and from then on), printed if it succeeded."""

    def __init__(self, previous):
        self.previous = previous
        self._lock = threading.Lock()
        self._held = []
        self._failed = False

    def __call__(self, unraisable):
        if not _closed_loop_callback(unraisable):
            self.previous(unraisable)
            return
        with self._lock:
            if not self._failed:
                self._held.append(unraisable)

    def settle(self, failed: bool) -> None:
        with self._lock:
            held, self._held = self._held, []
            self._failed = self._failed or failed
        if not failed:
            for unraisable in held:  # no failed operation explains them
                self.previous(unraisable)


_ASYNCIO_LOOP = os.path.join("asyncio", "base_events.py")


def _closed_loop_callback(unraisable) -> bool:
    """asyncio's loop.call_soon_threadsafe refusing a callback (called from outside Python)."""
    e, tb = unraisable.exc_value, unraisable.exc_traceback
    if unraisable.object is not None or type(e) is not RuntimeError or str(e) != "Event loop is closed" or tb is None:
        return False
    code = tb.tb_frame.f_code  # the outermost frame: the caller is not Python code
    return code.co_name == "call_soon_threadsafe" and code.co_filename.endswith(_ASYNCIO_LOOP)


def orphaned_callbacks() -> OrphanedCallbacks:
    """The installed OrphanedCallbacks hook (installed over the current hook if it is not)."""
    if not isinstance(sys.unraisablehook, OrphanedCallbacks):
        sys.unraisablehook = OrphanedCallbacks(sys.unraisablehook)
    return sys.unraisablehook


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

            # On resume, TensorBoard drops the earlier events past the restored step, which the
            # run writes again (as metrics.jsonl's records, cut back below).
            self._tb = SummaryWriter(os.path.join(workdir, "tb"), purge_step=resume_step + 1 if resume_step else None)
        except ImportError:  # pragma: no cover - tensorboardX is a dependency
            self._tb = None
        if progress and total_steps:
            from tqdm import tqdm

            self._bar = tqdm(total=total_steps, initial=resume_step, unit="step", dynamic_ncols=True)

    def _truncate_after(self, step: int):
        """On resume, records past the restored step are dropped: the run writes them again. A
        line that does not parse (a write cut short by a crash or a full disk) is dropped with a
        warning. The file is replaced in one step, so a crash here loses nothing."""
        with open(self.path) as f:
            lines = [ln if ln.endswith("\n") else ln + "\n" for ln in f if ln.strip()]
        records, broken = [], 0
        for ln in lines:
            try:
                records.append((ln, json.loads(ln)))
            except json.JSONDecodeError:
                broken += 1
        kept = [ln for ln, r in records if r.get("step", 0) <= step]
        if broken:
            print(f"warning: {self.path}: {broken} unreadable line(s) dropped (a write cut short)", flush=True)
        if len(kept) != len(lines):
            if len(records) != len(kept):
                print(f"resuming at step {step}: {len(records) - len(kept)} later metric records will be rewritten")
            tmp = f"{self.path}.tmp{os.getpid()}"
            with open(tmp, "w") as f:
                f.writelines(kept)
            os.replace(tmp, self.path)

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
