"""Helpers the fault tests use to see, from outside a run, the moment to inject a fault (issue 16).

No library code is changed or hooked: the tests watch the run's folders as an operator's tools would, and
kill processes or nodes by their ids. `python tests/faults.py RUN_DIR PID...` is the killer of the
checkpoint-write test (see `kill_during_checkpoint_copy`).
"""

from __future__ import annotations

import ctypes
import json
import os
import select
import signal
import struct
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

_IN_CREATE, _IN_MOVED_TO, _IN_ISDIR = 0x100, 0x80, 0x40000000
_EVENT = struct.Struct("iIII")  # wd, mask, cookie, len; then `len` bytes of name
SNAPSHOT = "checkpoint_manager_snapshot.json"  # = raysparse.preflight.SNAPSHOT (this file imports no raysparse)


class CreationWatch:
    """Linux inotify on one folder: `wait(name)` returns as soon as an entry is created (or renamed) in it.
    Polling the folder every few milliseconds would see a small checkpoint only after it has been copied;
    the kernel's event comes while its first file is being written."""

    def __init__(self, folder: Path):
        self._libc = ctypes.CDLL(None, use_errno=True)
        self.fd = self._libc.inotify_init1(os.O_CLOEXEC)
        if self.fd < 0:
            raise OSError(ctypes.get_errno(), "inotify_init1")
        if self._libc.inotify_add_watch(self.fd, str(folder).encode(), _IN_CREATE | _IN_MOVED_TO) < 0:
            raise OSError(ctypes.get_errno(), f"inotify_add_watch {folder}")
        self._pending: list[tuple[str, bool]] = []

    def next(self, timeout_s: float, alive=lambda: True, files_only: bool = False) -> str | None:
        """The name of the next entry (with files_only, the next file) created, or None after `timeout_s` (or
        once `alive()` is false)."""
        deadline = time.monotonic() + timeout_s
        while files_only and self._pending and self._pending[0][1]:
            self._pending.pop(0)
        while not self._pending:
            if time.monotonic() > deadline or not alive():
                return None
            ready, _, _ = select.select([self.fd], [], [], 0.2)
            if not ready:
                continue
            data = os.read(self.fd, 65536)
            offset = 0
            while offset < len(data):
                _, mask, _, length = _EVENT.unpack_from(data, offset)
                offset += _EVENT.size
                is_dir = bool(mask & _IN_ISDIR)
                if not (files_only and is_dir):
                    self._pending.append((data[offset:offset + length].rstrip(b"\0").decode(), is_dir))
                offset += length
        return self._pending.pop(0)[0]

    def close(self) -> None:
        os.close(self.fd)


class RealTime:
    """`with RealTime():` the calling thread runs under SCHED_FIFO (root on Linux): woken by an event, it runs
    at once, ahead of the processes it watches, instead of queueing behind them on a loaded machine. Without
    the permission, the thread keeps its normal policy (`self.on` False)."""

    def __enter__(self) -> "RealTime":
        try:
            os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(10))
            self.on = True
        except OSError:
            self.on = False
        return self

    def __exit__(self, *exc) -> None:
        if self.on:
            os.sched_setscheduler(0, os.SCHED_OTHER, os.sched_param(0))


@contextmanager
def running_beside(watcher, *args):
    """Run `watcher(*args, done)` in a daemon thread while the body runs (the run a test injects a fault into);
    `done` (a threading.Event) is set when the body ends, however it ends, and the thread is joined."""
    done = threading.Event()
    thread = threading.Thread(target=watcher, args=(*args, done), daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join()


def recorded_epoch(run: Path) -> int:
    """The epoch of the latest checkpoint Ray Train has recorded in the run folder; 0 before the first."""
    try:
        return int(json.loads((run / SNAPSHOT).read_text())["latest_checkpoint_result"]["metrics"]["epoch"])
    except (OSError, ValueError, KeyError, TypeError):
        return 0


def kill_during_checkpoint_copy(run: Path, pids: list[int], timeout_s: float = 600) -> dict:
    """SIGKILL `pids` (the workers first, then the driver) as soon as the first file (not folder) appears at
    the top of an epoch_NNNN folder that Ray Train starts after it has recorded a checkpoint: a checkpoint
    being copied into the run folder, its folders made and some of its files begun. A checkpoint of the tiny config is copied in a few milliseconds; this runs in its
    own process (no other thread holds its interpreter lock) and in real time, so the kill lands within
    about a millisecond of the event. Returns {target, recorded, entries, seconds_to_kill_ms, realtime}."""
    alive = lambda: all(Path(f"/proc/{pid}").exists() for pid in pids)  # noqa: E731
    with RealTime() as rt:
        watch = CreationWatch(run)
        try:
            while True:
                name = watch.next(timeout_s, alive)
                if name is None:
                    return {"target": None}
                if not name.startswith("epoch_") or recorded_epoch(run) < 1:
                    continue
                target = run / name
                inside = CreationWatch(target)
                t0 = time.perf_counter()
                first = next((e for e in os.listdir(target) if (target / e).is_file()), None) or inside.next(
                    60, alive, files_only=True)
                for pid in pids:
                    os.kill(pid, signal.SIGKILL)
                ms = (time.perf_counter() - t0) * 1000
                inside.close()
                return {"target": name, "first": first, "recorded": recorded_epoch(run),
                        "entries": sorted(str(p.relative_to(target)) for p in target.rglob("*")),
                        "seconds_to_kill_ms": ms, "realtime": rt.on}
        finally:
            watch.close()


def wait_for(path: Path, timeout_s: float, alive=lambda: True) -> bool:
    """Polls (every 20 ms) until `path` exists."""
    deadline = time.monotonic() + timeout_s
    while not path.exists():
        if time.monotonic() > deadline or not alive():
            return False
        time.sleep(0.02)
    return True


def files_of(folder: Path) -> dict[str, int]:
    """Relative path -> size of every file under `folder` ({} when it is missing)."""
    return {str(p.relative_to(folder)): p.stat().st_size for p in sorted(folder.rglob("*")) if p.is_file()}


if __name__ == "__main__":
    print(json.dumps(kill_during_checkpoint_copy(Path(sys.argv[1]), [int(p) for p in sys.argv[2:]])), flush=True)
