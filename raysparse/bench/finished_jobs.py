"""The accuracy bench's finished jobs on disk, so that a stopped run can go on where it stopped.

On a data set larger than the dev sets the bench runs for hours (its printed time estimate says how many), and
a run that stops in its third hour (a killed job, a full disk, a reboot) would otherwise start again from zero.
Each job (one seed's baselines, or one fit of ours) is written to `<--out>/finished/` when it ends;
the next run of the same command reads back the jobs whose fingerprint matches and runs only the others
(`--fresh` runs every job again).

A job's fingerprint is everything its result depends on: raysparse's source files, the config file, the
--set overrides, the data folder's files (names, sizes, modification times), --fast, the trainer, the torch
threads a fit gets (they change float rounding, so a resumed run reports what one uninterrupted run would),
the text model's files, the libraries' versions, and the job itself (its kind, seed and overrides, or the
baselines and the hyper-parameters they reuse). --seeds, --out and the rows asked for are not in it: a 1-seed
run's jobs are the first seed's jobs of a 3-seed run with the same settings, and are reused by it.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
from importlib import metadata
from pathlib import Path

import numpy as np

PACKAGE_ROOT = Path(__file__).resolve().parents[1]


def source_digest(root: Path = PACKAGE_ROOT) -> str:
    """sha256 over every .py file of the package (relative path and bytes): any code change gives a new one."""
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*.py")):
        digest.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()


def folder_listing(folder: str | Path) -> list[list]:
    """[relative path, size, modification time (ns)] of every file under `folder`, sorted: a changed, added or
    removed file changes it, without reading gigabytes of logs."""
    root = Path(folder)
    return sorted([str(p.relative_to(root)), p.stat().st_size, p.stat().st_mtime_ns]
                  for p in root.rglob("*") if p.is_file())


LIBRARIES = ("torch", "numpy", "scipy", "transformers", "implicit", "deepspeed", "ray")


def library_versions() -> dict[str, str]:
    """Installed versions of the libraries the fits compute with (without importing them)."""
    versions = {"python": platform.python_version()}
    for name in LIBRARIES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "absent"
    return versions


def run_fingerprint(config_path: str, sets: list[str], data_folder: str, fast: bool, trainer: str,
                    threads_per_fit: int, text_model_folder: str = "") -> dict:
    """What every job of one bench run depends on besides the job itself (see the module docstring);
    `text_model_folder`: the encoder the config resolves to, when it is a local folder (the packaged MiniLM)."""
    text_model = folder_listing(text_model_folder) if text_model_folder and Path(text_model_folder).is_dir() else []
    return {"source": source_digest(), "config": hashlib.sha256(Path(config_path).read_bytes()).hexdigest(),
            "sets": list(sets), "data": folder_listing(data_folder), "text_model": text_model, "fast": fast,
            "trainer": trainer, "threads_per_fit": threads_per_fit, "libraries": library_versions()}


def _plain(value):
    """json.dumps' fallback: numpy numbers and arrays as Python numbers and lists."""
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


class FinishedJobs:
    """Results of finished jobs in `folder`, one JSON file a job, named by the hash of its fingerprint.

    `get` returns a stored result only when resuming and only when the file's whole fingerprint equals this
    run's (a hash collision or a hand-edited file cannot pass for a match); `put` always writes, atomically
    (a temporary file renamed), so a run killed while writing leaves no half-written result behind.
    """

    def __init__(self, folder: str | Path, fingerprint: dict, resume: bool):
        self.folder = Path(folder)
        self.fingerprint = fingerprint
        self.resume = resume
        self.reused = 0

    def _identity(self, kind: str, seed: int, payload) -> dict:
        # json round trip: a payload given as tuples equals the lists read back from a file
        return json.loads(json.dumps({"run": self.fingerprint, "kind": kind, "seed": seed, "payload": payload}))

    def path(self, kind: str, seed: int, payload) -> Path:
        text = json.dumps(self._identity(kind, seed, payload), sort_keys=True)
        return self.folder / f"{kind}-seed{seed}-{hashlib.sha256(text.encode()).hexdigest()[:16]}.json"

    def get(self, kind: str, seed: int, payload):
        """The stored result of this job, or None (not resuming, never finished, another fingerprint, or a file
        that cannot be read: that job simply runs again, and the reason is printed)."""
        if not self.resume:
            return None
        path = self.path(kind, seed, payload)
        if not path.exists():
            return None
        try:
            stored = json.loads(path.read_text())
        except (OSError, ValueError) as err:
            print(f"  {path}: unreadable ({err}); running this job again", flush=True)
            return None
        if not isinstance(stored, dict) or "result" not in stored:
            print(f"  {path}: not a saved job (no 'identity' and 'result'); running this job again", flush=True)
            return None
        if stored.get("identity") != self._identity(kind, seed, payload):
            return None
        self.reused += 1
        return stored["result"]

    def put(self, kind: str, seed: int, payload, result) -> None:
        """Store a finished job's result (JSON: tuples come back as lists, numpy numbers as Python's). A result
        that cannot be saved (a full disk, a type JSON cannot hold) is reported and the run goes on: it only
        loses the chance to reuse that job, never the job's result."""
        path = self.path(kind, seed, payload)
        partial = path.with_name(path.name + f".{os.getpid()}.partial")
        try:
            text = json.dumps({"identity": self._identity(kind, seed, payload), "result": result}, default=_plain)
            self.folder.mkdir(parents=True, exist_ok=True)
            partial.write_text(text)
            partial.replace(path)
        except (OSError, TypeError, ValueError) as err:
            partial.unlink(missing_ok=True)
            print(f"  could not save this job to {path} ({err}); the run goes on, but a rerun will run it again",
                  flush=True)

    def matching(self) -> list[tuple[str, int, object]]:
        """(kind, seed, job) of every stored file with this run's fingerprint: what a resumed run finds."""
        if not self.folder.is_dir():
            return []
        run = self._identity("", 0, None)["run"]
        found = []
        for path in sorted(self.folder.glob("*.json")):
            try:
                stored = json.loads(path.read_text())
            except (OSError, ValueError):
                continue
            identity = stored.get("identity") if isinstance(stored, dict) else None
            if isinstance(identity, dict) and identity.get("run") == run and "result" in stored:
                found.append((identity["kind"], identity["seed"], identity["payload"]))
        return found
