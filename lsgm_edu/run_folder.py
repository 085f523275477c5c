"""A training run's folder: one holder at a time, no orphaned temporary files, nothing left by
a start that failed.

`RunFolder.open(out)` creates `out` if needed, takes an exclusive lock on `out/.lock` (an
advisory `flock`, released by the kernel when the process dies, so a `kill -9` never leaves a
stale lock) and writes the holder's PID there; a second training or a `--resume` of the same
folder is refused with that PID. It removes the `.tmp` files an interrupted atomic write left
(`checkpoint.atomic_write_bytes` names them `.<name>.<random>.tmp`). Until `started()` is called,
`discard()` removes everything the run created (config.yaml, log.csv, tensorboard/, and the
folder itself if it was new), so a failed start leaves the folder as it found it.
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

try:
    import fcntl
except ImportError:  # Windows: no advisory locks; runs are not protected from each other there
    fcntl = None

LOCK_NAME = ".lock"


class RunFolderBusy(RuntimeError):
    """Another process holds the run folder's lock."""


class RunFolder:
    def __init__(self, path: Path, existed: bool, before: set[str], lock_file):
        self.path, self.existed, self.before, self._lock_file = path, existed, before, lock_file
        self.is_started = False

    @classmethod
    def open(cls, path: str | Path) -> RunFolder:
        path = Path(path)
        if path.exists() and not path.is_dir():
            raise NotADirectoryError(f"{path}: the run folder is a file; choose another --out")
        existed = path.is_dir()
        before = {p.name for p in path.iterdir()} if existed else set()
        path.mkdir(parents=True, exist_ok=True)
        lock_file = _lock(path, created=not existed)
        folder = cls(path, existed, before, lock_file)
        remove_orphaned_tmp_files(path)
        return folder

    def started(self) -> None:
        """The run is under way: from now on a failure keeps what the run wrote."""
        self.is_started = True

    def discard(self) -> None:
        """Remove what this run created before `started()` (the whole folder if it was new)."""
        if self.is_started:
            return
        if not self.existed:
            shutil.rmtree(self.path, ignore_errors=True)
            return
        for p in self.path.iterdir():
            if p.name not in self.before and p.name != LOCK_NAME:
                shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)

    def close(self) -> None:
        if self._lock_file is not None:
            self._lock_file.close()  # closing the descriptor releases the flock
            self._lock_file = None


def _lock(path: Path, created: bool):
    if fcntl is None:
        return None
    lock_path = path / LOCK_NAME
    f = open(lock_path, "a+")  # noqa: SIM115  (held open: the lock lives as long as the file)
    try:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        f.seek(0)
        holder = f.read().strip() or "unknown"
        f.close()
        raise RunFolderBusy(
            f"{path}: the run folder is in use by another training ({holder}); wait for it to "
            f"finish or stop it, or choose another --out") from None
    f.seek(0)
    f.truncate()
    f.write(f"PID {os.getpid()} on {os.uname().nodename}, since "
            f"{time.strftime('%Y-%m-%d %H:%M:%S')}")
    f.flush()
    return f


def remove_orphaned_tmp_files(path: Path) -> list[Path]:
    """Delete the `.<name>.<random>.tmp` files interrupted atomic writes left under `path`."""
    removed = []
    for tmp in path.rglob(".*.tmp"):
        if tmp.is_file():
            tmp.unlink(missing_ok=True)
            removed.append(tmp)
    return removed
