"""Checks and fixes before a distributed training run starts, none of which needs Ray, data or a worker: the
static checks of a config (its DeepSpeed config, the encoder, impossible combinations), whether a cluster's
resources can host the workers, where the run's folder is and what a new run or --resume needs there, and
the local paths made absolute for workers that run in other folders.

`raysparse.ray_train` and `raysparse.ray_tune` call these before they start anything, so a bad config is one
ConfigError on the driver; `raysparse.ray_train.cluster_capacity` asks Ray for the resources checked here.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pyarrow.fs as pafs
import yaml

from raysparse.config import Config
from raysparse.engine import deepspeed_config
from raysparse.errors import ConfigError
from raysparse.model.text import resolve_text_model

LAUNCHER_CONFIG = "~/ray_bootstrap_config.yaml"  # written by `ray up` on the head node


def launcher_max_resources(path: str = LAUNCHER_CONFIG) -> dict[str, float]:
    """Most resources the cluster launcher's autoscaler may add (sum over node types of resources x
    max_workers), read from the config `ray up` leaves on the head; {} when there is none."""
    file = Path(path).expanduser()
    if not file.is_file():
        return {}
    try:
        launcher = yaml.safe_load(file.read_text()) or {}
    except (OSError, yaml.YAMLError):
        return {}
    total: dict[str, float] = {}
    head = launcher.get("head_node_type")
    for name, node_type in (launcher.get("available_node_types") or {}).items():
        count = 1 if name == head else int(node_type.get("max_workers", launcher.get("max_workers", 0)) or 0)
        for key, value in (node_type.get("resources") or {}).items():
            total[key] = total.get(key, 0.0) + float(value) * count
    return total


def check_static(config: Config) -> dict:
    """Checks that need no cluster: DeepSpeed JSON, encoder availability, impossible combinations.
    Returns the DeepSpeed config for `ray.num_workers` workers."""
    rc, mc = config.ray, config.model
    ds = deepspeed_config(config, rc.num_workers)
    if mc.uses_text:
        resolve_text_model(mc.text_model)  # ConfigError when the packaged MiniLM is missing
    if rc.use_gpu and rc.cpus_per_worker < 1:
        raise ConfigError(f"ray.cpus_per_worker={rc.cpus_per_worker} with ray.use_gpu=true: a GPU worker needs at "
                          f"least 1 CPU to feed it; set ray.cpus_per_worker >= 1.")
    return ds


def check_before_start(config: Config, capacity: dict[str, float]) -> None:
    """ConfigError when the cluster cannot host the workers (`capacity` as from `cluster_capacity`)."""
    rc = config.ray
    cpus, gpus = capacity.get("CPU", 0.0), capacity.get("GPU", 0.0)
    if rc.use_gpu and gpus < 1:
        raise ConfigError(f"ray.use_gpu=true, but the Ray cluster has no GPUs (resources: CPU={cpus:g}, GPU=0). "
                          f"Set ray.use_gpu=false to train on CPU, or connect to a GPU cluster (ray.address; "
                          f"see cluster.yaml).")
    if rc.use_gpu and gpus < rc.num_workers:
        raise ConfigError(f"ray.num_workers={rc.num_workers} with one GPU each, but the cluster has {gpus:g} GPUs; "
                          f"lower ray.num_workers to {int(gpus)} or add GPU nodes.")
    need = rc.num_workers * rc.cpus_per_worker
    if need > cpus:
        raise ConfigError(f"ray.num_workers={rc.num_workers} x ray.cpus_per_worker={rc.cpus_per_worker:g} = {need:g} "
                          f"CPUs, but the Ray cluster has {cpus:g}. Lower ray.num_workers or ray.cpus_per_worker, "
                          f"or add nodes.")


RUN_NAME = "train"  # the Ray Train run's folder under ray.storage_path


def run_location(config: Config) -> tuple[str, str]:
    """(storage_path, run folder). Local paths are made absolute (workers run in other folders)."""
    storage = config.ray.storage_path or str(Path(config.output).resolve() / "ray")
    if "://" not in storage:
        storage = str(Path(storage).resolve())
    return storage, storage.rstrip("/") + "/" + RUN_NAME


SNAPSHOT = "checkpoint_manager_snapshot.json"  # Ray Train V2's record of a run's checkpoints


def check_new_or_resume(path: str, exists: bool, resume: bool, thing: str, held: str, stopped: str) -> None:
    """The rule every run folder follows (a training run here, a sweep in ray_tune): a new start needs `path`
    free, --resume needs something there to continue. thing/held/stopped name it in the messages."""
    if resume and not exists:
        raise ConfigError(f"--resume: there is no {thing} to continue at {path}; start it without --resume "
                          f"(or point --output / ray.storage_path at {stopped}).")
    if not resume and exists:
        raise ConfigError(f"{path} already holds {held}. Pass --resume to continue it, or choose another --output / "
                          f"ray.storage_path (or delete that folder to start over).")


def check_run_folder(run_dir: str, resume: bool, epochs: int | None = None) -> None:
    """A new run needs an empty run folder; --resume needs an existing one with epochs left to train."""
    fs, inner = (pafs.FileSystem.from_uri(run_dir) if "://" in run_dir else (pafs.LocalFileSystem(), run_dir))
    info = fs.get_file_info(inner)
    exists = info.type == pafs.FileType.Directory and bool(fs.get_file_info(pafs.FileSelector(inner)))
    check_new_or_resume(run_dir, exists, resume, "run", "a training run", "the stopped run")
    if resume and epochs is not None:
        done = 0
        try:
            with fs.open_input_stream(f"{inner.rstrip('/')}/{SNAPSHOT}") as stream:
                latest = json.loads(stream.read()).get("latest_checkpoint_result") or {}
            done = int((latest.get("metrics") or {}).get("epoch", 0))
        except (OSError, ValueError):
            pass
        if done >= epochs:
            raise ConfigError(f"--resume: the run at {run_dir} already trained {done} epochs and train.epochs="
                              f"{epochs}; raise train.epochs (e.g. --set train.epochs={done + 1}) to train more.")


def absolute_paths(config: Config) -> Config:
    """Workers do not run in the driver's folder: local paths in the config become absolute."""
    overrides: dict[str, Any] = {"output": str(Path(config.output).resolve())}
    text_model = config.model.text_model
    if text_model and Path(text_model).exists():
        overrides["model.text_model"] = str(Path(text_model).resolve())
    if config.ray.deepspeed_config:
        overrides["ray.deepspeed_config"] = str(Path(config.ray.deepspeed_config).resolve())
    return config.replace(**overrides)
