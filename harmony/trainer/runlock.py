"""One live run per run folder: a lock file ``<run_dir>/.lock`` holding the owner's pid, host and start time.

Taken by rank 0 before anything in the folder is written, released when the run ends. A second run into a
folder whose lock belongs to a live process stops at once, naming that process. A lock left by a process
that is gone (same host, dead pid: a killed run, or the previous attempt of a torchrun restart) is taken
over with a warning. A lock from another host cannot be checked from here and counts as live; the message
says to delete the file if no run uses the folder.
"""
from __future__ import annotations

import json
import os
import socket
import time
import warnings
from pathlib import Path
from typing import Optional

from harmony.config import ConfigError

LOCK_NAME = ".lock"


class RunFolderBusy(ConfigError):
    """Another live run holds the run folder."""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def _read(path: Path) -> Optional[dict]:
    try:
        info = json.loads(path.read_text())
        return info if isinstance(info, dict) else None
    except (OSError, ValueError):
        return None


class RunLock:
    """``RunLock(run_dir).acquire()`` ... ``.release()`` (also a context manager)."""

    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / LOCK_NAME
        self.held = False

    def _try_create(self) -> bool:
        info = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S")}
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as fh:
            json.dump(info, fh)
        return True

    def acquire(self) -> "RunLock":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(3):  # a stale lock is removed and creation retried (another run may win the race)
            if self._try_create():
                self.held = True
                return self
            info = _read(self.path)
            if info is None:  # being written right now, or damaged: look again shortly
                time.sleep(0.2)
                info = _read(self.path)
            host, pid = (info or {}).get("host"), (info or {}).get("pid")
            if info is not None and host == socket.gethostname() and isinstance(pid, int) and not _alive(pid):
                warnings.warn(f"{self.path.parent}: taking over the lock of a run that is gone (pid {pid} on {host}, "
                              f"started {info.get('started', '?')})", RuntimeWarning, stacklevel=2)
                self.path.unlink(missing_ok=True)
                continue
            if info is None:
                raise RunFolderBusy(f"log.run_dir={str(self.path.parent)!r} has an unreadable lock file {self.path}; "
                                    "if no run uses this folder, delete that file")
            where = "" if host == socket.gethostname() else " (on another host: delete the lock file if that " \
                                                              "run is gone)"
            raise RunFolderBusy(f"log.run_dir={str(self.path.parent)!r} is in use by another run (pid {pid} on "
                                f"{host}, started {info.get('started', '?')}){where}; wait for it, or choose "
                                "another --log.run_dir")
        raise RunFolderBusy(f"log.run_dir={str(self.path.parent)!r}: could not take the lock {self.path}")

    def release(self) -> None:
        if not self.held:
            return
        info = _read(self.path)
        if info is not None and info.get("pid") == os.getpid():
            self.path.unlink(missing_ok=True)
        self.held = False

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
