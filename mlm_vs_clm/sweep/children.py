"""The sweep's child processes (the train and finetune commands), which end with the sweep:
each runs in a process group of its own with PR_SET_PDEATHSIG = SIGTERM (Linux), so a sweep
killed with -9 still stops them, each saving its checkpoint; `stop_children()` (the sweep's
SIGTERM and SIGINT handler) sends them SIGTERM and the sweep starts nothing more."""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import shlex
import signal
import subprocess
import sys

_PR_SET_PDEATHSIG = 1
_LIBC = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True) if sys.platform.startswith("linux") else None

_children: set = set()  # the running train / finetune processes (subprocess.Popen)
_stopping = [False]  # set by a signal handler: a plain flag (an Event's lock could deadlock there)


class SweepStopped(RuntimeError):
    """The sweep was asked to stop (SIGTERM, SIGINT); its children saved their checkpoints."""


def stop_children(signum=None, frame=None) -> None:
    """Start nothing more and send SIGTERM to every running child (train saves its checkpoint).
    A signal handler: no locks (the main thread may be inside run_child)."""
    _stopping[0] = True
    for proc in list(_children):
        _terminate(proc)


def stopping() -> bool:
    return _stopping[0]


def _terminate(proc) -> None:
    try:
        os.kill(proc.pid, signal.SIGTERM)
    except ProcessLookupError:
        pass


def _die_with_parent(parent: int):
    """preexec_fn of a child: SIGTERM when the sweep dies (however: kill -9 too), and an exit at
    once if it died between fork and here."""

    def setup():
        if _LIBC is not None:
            _LIBC.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
        if os.getppid() != parent:
            os._exit(1)

    return setup


def run_child(args: list[str], log_path: str) -> None:
    """Runs `python -m ARGS` into log_path as a child that ends with the sweep (module docstring);
    SweepStopped when the sweep was asked to stop, whatever the child's status."""
    if _stopping[0]:
        raise SweepStopped(f"{args[0]} not started: the sweep is stopping")
    with open(log_path, "a") as log:
        log.write("$ python -m " + " ".join(shlex.quote(a) for a in args) + "\n")
        log.flush()
        proc = subprocess.Popen([sys.executable, "-m", *args], stdout=log, stderr=subprocess.STDOUT,
                                process_group=0, preexec_fn=_die_with_parent(os.getpid()))
        _children.add(proc)
        try:
            if _stopping[0]:  # the handler ran before the child was registered
                _terminate(proc)
            proc.wait()
        except BaseException:
            _terminate(proc)
            proc.wait()
            raise
        finally:
            _children.discard(proc)
            try:  # anything the child left in its group (data loader workers) goes with it
                os.killpg(proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
    if _stopping[0]:
        raise SweepStopped(f"{args[0]} stopped (status {proc.returncode}); rerun the sweep to resume")
    if proc.returncode != 0:
        with open(log_path) as f:
            tail = [ln.strip() for ln in f.readlines() if ln.strip()][-1:]
        raise RuntimeError(f"{args[0]} exited with status {proc.returncode}: {tail[0] if tail else ''} "
                           f"(log {log_path})")
