"""One owner per run folder (train, finetune and sweep work directories).

`RunLock(DIR)` takes an exclusive `fcntl.flock` on DIR/.lock (DIR/.lock.N for process N > 0 of
a multi-process run, so the processes of one run do not exclude each other) and writes the
holder's PID and host into it. The kernel drops the lock when the process ends, however it
ends (kill -9 included), so a crash never leaves a folder locked; the file itself stays and
means nothing without the lock. A second process on the folder gets a RunLockError naming the
holder: `DIR is in use by PID 1234 on HOST (DIR/.lock); ...`.

Also the checks every command makes on its folder before building anything
(`workdir_problem`) and `make_workdir`, which remembers what it created so that a command that
fails can remove the folders it left empty (`remove_if_empty`).
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import time

LOCK_FILE = ".lock"


class RunLockError(RuntimeError):
    """The folder is held by another process; the message names its PID and host."""


class WorkdirError(ValueError):
    """The folder cannot be used (a file, under a file, read-only); the message names it."""


def lock_path(directory: str, process_index: int = 0) -> str:
    name = LOCK_FILE if process_index == 0 else f"{LOCK_FILE}.{process_index}"
    return os.path.join(directory, name)


def _holder(fd: int) -> str:
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        info = json.loads(os.read(fd, 4096).decode() or "{}")
        return f"PID {info['pid']} on {info['host']}"
    except (OSError, ValueError, KeyError, TypeError):
        return "another process"  # it has the lock but has not written its name yet


class RunLock:
    """Holds DIR's lock from construction to `release()` (or the end of the process)."""

    def __init__(self, directory: str, process_index: int = 0, what: str = "run folder"):
        self.path = lock_path(directory, process_index)
        self.created = not os.path.exists(self.path)
        try:
            self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            writable = True
        except OSError as e:
            if e.errno not in (errno.EROFS, errno.EACCES, errno.EPERM) or not os.path.isfile(self.path):
                raise
            self._fd = os.open(self.path, os.O_RDONLY)  # a read-only folder: lock, cannot sign
            writable = False
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder(self._fd)
            os.close(self._fd)
            self._fd = None
            raise RunLockError(
                f"{directory} is in use by {holder} ({self.path}); one process per {what}: wait for it, stop it, "
                "or use another folder"
            ) from None
        if writable:
            info = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%Y-%m-%dT%H:%M:%S")}
            os.ftruncate(self._fd, 0)
            os.pwrite(self._fd, (json.dumps(info) + "\n").encode(), 0)

    def release(self, remove: bool = False) -> None:
        """Drops the lock; `remove` deletes the file too (only when this lock created it)."""
        if self._fd is None:
            return
        if remove and self.created:
            try:
                os.remove(self.path)
            except OSError:
                pass
        os.close(self._fd)
        self._fd = None

    def undo(self, created: list[str]) -> None:
        """After a command that failed or stopped before its work: drop the lock with its file and
        remove the folders `make_workdir` created, if they are empty."""
        self.release(remove=bool(created))
        remove_if_empty(created)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.release()


def workdir_problem(directory: str, write: bool = True) -> str | None:
    """Why `directory` cannot be used as a run folder, or None: it is a file, a path under a
    file, or (with `write`) a folder this process cannot create files in."""
    path = os.path.abspath(directory)
    if os.path.exists(path) and not os.path.isdir(path):
        return f"workdir {directory} is a file, not a folder"
    parent = path
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        return f"workdir {directory} is under {parent}, which is a file"
    if write and not _writable(parent):
        where = "" if parent == path else f" ({parent} cannot be written)"
        return f"workdir {directory} is read-only{where}"
    return None


def _writable(folder: str) -> bool:
    """Whether a file can be created in `folder` (tried, not os.access: root and read-only
    mounts disagree about access())."""
    probe = os.path.join(folder, f".write-test-{os.getpid()}")
    try:
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except OSError as e:
        return e.errno not in (errno.EROFS, errno.EACCES, errno.EPERM)
    os.close(fd)
    os.remove(probe)
    return True


def make_workdir(directory: str) -> list[str]:
    """os.makedirs(directory); returns the folders it created, deepest first."""
    path = os.path.abspath(directory)
    created = []
    while not os.path.isdir(path):
        created.append(path)
        path = os.path.dirname(path)
    os.makedirs(directory, exist_ok=True)
    return created


def remove_if_empty(created: list[str]) -> None:
    """Removes the folders `make_workdir` created that are empty now, deepest first (with the
    empty folders inside them: left by a command that stopped before writing anything)."""
    for folder in created:
        if not os.path.isdir(folder):
            continue
        for root, _dirs, files in os.walk(folder, topdown=False):
            if not files and not os.listdir(root):
                try:
                    os.rmdir(root)
                except OSError:
                    pass
        if os.path.isdir(folder):
            return  # something is in it: it and its parents stay
