"""Hyperparameter sweeps on Ray Tune, each trial a full Ray Train + DeepSpeed run: `raysparse tune` and
`jobs/tune.py`.

    raysparse tune --config configs/tune_tiny.yaml --num-samples 8 --output runs/sweep
    raysparse tune --config configs/tune_tiny.yaml --output runs/sweep --resume      # after an interruption

The sweep is declared in a `tune:` section of the same YAML file as the run (`TuneConfig`; `--set tune.KEY=V`):

    tune:
      num_samples: 8
      scheduler: asha              # stop weak trials early on `metric` ("none": every trial runs all epochs)
      search: random               # or optuna (Tune's OptunaSearch, TPE)
      space:                       # SECTION.KEY of the run config -> one distribution; omitted: DEFAULT_SPACE
        model.fusion_dim: {choice: [64, 128, 256]}
        model.dmf_user_layers: {choice: [[128, 64], [256, 128]]}
        train.lr: {loguniform: [1.0e-4, 1.0e-2]}
        model.finetune_top_layers: {randint: [0, 2]}        # both ends included

Driver, `run_tune(config, tune_config, resume)`:
  1. Checks that need neither Ray nor data (`check_tune`, `ray_train.check_static`): every space key is a
     tunable config key, every choice value and range bound passes the real `Config` validation, ranges
     are ordered, loguniform bounds are positive, the metric/mode/scheduler make sense. A bad sweep is one
     ConfigError before anything starts.
  2. Prepares the data once (`ray_data.prepare_for_ray`), puts it in the object store and builds the
     training-example dataset once; every trial's trainer reads the same objects.
  3. Warms the item-text embedding cache once (`raysparse.build.build_model` on the base config, and on
     each tuned encoder/pooling choice): with a frozen text tower, that is all the encoder work a trial
     would do, so trials reuse it instead of recomputing it (`cached_item_embeddings` is keyed by
     encoder + pooling + texts).
  4. `Tuner.fit()` (or `Tuner.restore(...)` with --resume) over `tune_trial`, ASHA on `metric` by default.
  5. Collects each trial's epochs from its Train run folder, prints and saves <output>/trials.csv, copies
     the best trial's best checkpoint's `artifact/` to <output>/best/ with best/summary.json.

Trial, `tune_trial(point, shared)`: a Tune function trainable that builds the run's `TorchTrainer` with
`ray_train.build_trainer` (its own folder <output>/trials/<trial_id>) and forwards the trainer's reports to
Tune with `TuneReportCallback` (the Train V2 pattern: https://docs.ray.io/en/latest/train/user-guides/
hyperparameter-optimization.html). The trial actor itself reserves no CPU (see TRIAL_RESOURCES), so
floor(CPUs / (num_workers x cpus_per_worker)) trials run side by side without deadlock, and a trial that
Tune ends early gives its workers' CPUs back at once (`PlacementGroupReleaser`).

Resume: Tune restores its experiment (<output>/tune); a trial that did not finish runs its function again,
and its TorchTrainer, pointed at the same run folder, continues from that run's latest checkpoint (Ray
Train V2 restores from an existing run folder).

Ray is imported inside functions: the config, space parsing and checks run without Ray.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import itertools
import json
import math
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from raysparse.config import SECTIONS, Config, coerce_value, config_from_dict, option, parse_set_value
from raysparse.errors import ConfigError

if TYPE_CHECKING:
    import pandas as pd
    from ray.tune import ResultGrid, Tuner

DEFAULT_METRIC = "val/overall/ndcg@10"
TUNE_DIR = "tune"            # Tune's experiment folder under the storage path
TRIALS_DIR = "trials"        # <output>/trials/<trial_id>: each trial's run (output, Train run folder)
BEST_DIR = "best"            # the exported artifact of the best trial
TRIALS_CSV = "trials.csv"
SWEEP_JSON = "sweep.json"    # the base config + sweep settings, checked again on --resume
SPACE_KINDS = ("choice", "uniform", "loguniform", "randint")

# The trial function only waits on its TorchTrainer, whose workers reserve the CPUs. Tune rejects an empty
# request ({"cpu": 0}), and {"cpu": 0.01} (RAY_NOTES) leaves 1.98 of 2 CPUs, so a second 1-CPU trial waited
# for the first to end (seen here: two 1-worker trials ran one after the other). A token of memory is a
# non-empty request that takes no CPU: both ran side by side.
TRIAL_RESOURCES = {"cpu": 0, "memory": 1 << 20}

# Keys of the run config a sweep may not vary, and why.
NOT_TUNABLE = {
    "train.epochs": "it is the sweep's budget per trial (ASHA's max_t); set it in the train section",
    "train.example_mode": "the training examples are built once for all trials; set it in the train section",
}

# Used when `tune.space` is empty: the list, limited to what the base config uses (text keys only
# with a text tower, the fine-tuning depth only with finetune=top, the encoder's learning rate only when it
# trains).
DEFAULT_SPACE: dict[str, dict] = {
    "model.fusion_dim": {"choice": [64, 128, 256]},
    "model.text_dim": {"choice": [64, 128, 256]},
    "model.dmf_user_layers": {"choice": [[128, 64], [256, 128], [512, 256]]},
    "model.dmf_item_layers": {"choice": [[128, 64], [256, 128], [512, 256]]},
    "train.lr": {"loguniform": [3e-4, 1e-2]},
    "train.text_lr": {"loguniform": [1e-5, 2e-4]},
    "model.finetune_top_layers": {"choice": [1, 2, 4]},
}


# ------------------------------------------------------------------------------------------------ search space

def tunable_keys() -> list[str]:
    """SECTION.KEY of every config field a sweep may vary: the model and train sections."""
    keys = [f"{s}.{f.name}" for s in ("model", "train") for f in dataclasses.fields(SECTIONS[s])]
    return [k for k in keys if k not in NOT_TUNABLE]


def default_space(config: Config) -> dict[str, dict]:
    """DEFAULT_SPACE without the keys that would have no effect on `config`."""
    mc = config.model
    skip = set()
    if not mc.uses_text:
        skip |= {"model.text_dim", "train.text_lr", "model.finetune_top_layers"}
    if not mc.uses_dmf:
        skip |= {"model.dmf_user_layers", "model.dmf_item_layers"}
    if mc.finetune != "top":
        skip.add("model.finetune_top_layers")
    if mc.finetune == "frozen":
        skip.add("train.text_lr")
    return {k: json.loads(json.dumps(v)) for k, v in DEFAULT_SPACE.items() if k not in skip}


@dataclass(frozen=True)
class Param:
    """One dimension of the search space. choice: `values` are the options; uniform/loguniform/randint:
    `values` = (lower, upper), both included."""

    key: str
    kind: str
    values: tuple

    @property
    def encoded(self) -> bool:
        # Optuna's categorical distribution takes scalars only, so list options (layer widths) travel through
        # Tune as JSON strings and are decoded in the trial.
        return self.kind == "choice" and any(isinstance(v, (list, dict)) for v in self.values)

    def domain(self):
        """The Tune search domain."""
        from ray import tune

        if self.kind == "choice":
            return tune.choice([json.dumps(v) for v in self.values] if self.encoded else list(self.values))
        lower, upper = self.values
        if self.kind == "uniform":
            return tune.uniform(lower, upper)
        if self.kind == "loguniform":
            return tune.loguniform(lower, upper)
        return tune.randint(lower, upper + 1)  # Tune's upper bound is exclusive; ours is included

    def decode(self, value: Any) -> Any:
        return json.loads(value) if self.encoded and isinstance(value, str) else value

    def describe(self) -> str:
        return f"{self.key}: {{{self.kind}: {json.dumps(list(self.values))}}}"


def parse_space(raw: Any, base: Config) -> tuple[Param, ...]:
    """Validate `tune.space` against the real config; ConfigError naming the key, the value and the fix."""
    if not isinstance(raw, dict):
        raise ConfigError(f"tune.space must map SECTION.KEY to a distribution, e.g. "
                          f"{{model.fusion_dim: {{choice: [64, 128]}}}}; got {raw!r}.")
    if not raw:
        raise ConfigError("tune.space is empty: there is nothing to search. Name at least one parameter, e.g. "
                          "--set 'tune.space.train.lr={loguniform: [1e-4, 1e-2]}', or leave `space` out of the "
                          "tune section to use the default space.")
    valid = tunable_keys()
    params = []
    for key, spec in raw.items():
        where = f"tune.space[{key!r}]"
        if key in NOT_TUNABLE:
            raise ConfigError(f"{where}: {key} cannot be tuned: {NOT_TUNABLE[key]}.")
        if key not in valid:
            close = difflib.get_close_matches(str(key), valid, n=3, cutoff=0.6)
            hint = f" Did you mean {', '.join(close)}?" if close else ""
            raise ConfigError(f"{where}: unknown parameter {key!r}.{hint} Tunable keys (SECTION.KEY): "
                              f"{', '.join(valid)}.")
        if not isinstance(spec, dict) or len(spec) != 1 or next(iter(spec)) not in SPACE_KINDS:
            raise ConfigError(f"{where}={spec!r} must be one of {{choice: [a, b, ...]}}, {{uniform: [lower, upper]}}, "
                              f"{{loguniform: [lower, upper]}}, {{randint: [lower, upper]}}; e.g. "
                              f"{key}: {{choice: [{json.dumps(getattr_dotted(base, key))}]}}.")
        kind, values = next(iter(spec.items()))
        if kind == "choice":
            if not isinstance(values, list) or not values:
                raise ConfigError(f"{where}: choice needs a non-empty list of options, got {values!r}; e.g. "
                                  f"{{choice: [{json.dumps(getattr_dotted(base, key))}]}}.")
        else:
            if (not isinstance(values, list) or len(values) != 2
                    or any(isinstance(v, bool) or not isinstance(v, (int, float)) for v in values)):
                raise ConfigError(f"{where}: {kind} needs [lower, upper] (two numbers), got {values!r}.")
            lower, upper = values
            if lower > upper:
                raise ConfigError(f"{where}: {kind} lower bound {lower!r} > upper bound {upper!r}; write "
                                  f"[lower, upper] with lower <= upper, e.g. [{upper!r}, {lower!r}].")
            if kind == "loguniform" and lower <= 0:
                raise ConfigError(f"{where}: loguniform bounds must be > 0, got lower={lower!r}; use uniform for "
                                  f"ranges that include 0 or negative values.")
            if kind == "randint" and not all(isinstance(v, int) for v in values):
                raise ConfigError(f"{where}: randint bounds must be integers, got {values!r}.")
        param = Param(str(key), kind, tuple(values))
        # Every option (or both bounds) must make a valid run config: type, range, allowed values.
        for value in param.values:
            if kind in ("uniform", "loguniform"):
                value = float(value)
            try:
                base.replace(**{key: value})
            except ConfigError as err:
                raise ConfigError(f"{where}: the {kind} value {value!r} is not a valid {key}: {err}") from None
        params.append(param)
    return tuple(params)


def getattr_dotted(config: Config, key: str) -> Any:
    section, name = key.split(".", 1)
    return getattr(getattr(config, section), name)


def apply_point(base: Config, params: tuple[Param, ...], point: dict) -> Config:
    """The run config of one sampled point (Tune's values, decoded), validated by `Config`."""
    overrides = {p.key: p.decode(point[p.key]) for p in params if p.key in point}
    try:
        return base.replace(**overrides)
    except ConfigError as err:
        raise ConfigError(f"the sampled point {overrides} is not a valid config: {err}") from None


# ------------------------------------------------------------------------------------------------ TuneConfig

@dataclass(frozen=True)
class TuneConfig:
    """The sweep: the `tune:` section of the run's YAML file, or --set tune.KEY=VALUE."""

    num_samples: int = option(8, "Trials (points drawn from the space); --num-samples overrides it.")
    metric: str = option(DEFAULT_METRIC, "Reported metric that ranks trials and checkpoints, and that ASHA stops on: "
                                         "a validation metric (val/GROUP/NAME, e.g. val/cohort/hr@10) or 'loss'.")
    mode: str = option("max", "'max' or 'min': whether a larger `metric` is better.")
    scheduler: str = option("asha", "'asha': stop weak trials early (Tune's ASHAScheduler over epochs); 'none': "
                                    "every trial trains train.epochs epochs.")
    search: str = option("random", "'random' (Tune's random search) or 'optuna' (Tune's OptunaSearch, TPE).")
    max_concurrent_trials: int = option(0, "Trials at once; 0 = what the cluster holds: floor(CPUs / "
                                           "(ray.num_workers x ray.cpus_per_worker)) (and GPUs / ray.num_workers "
                                           "with ray.use_gpu).")
    grace_period: int = option(1, "ASHA: epochs every trial trains before it may be stopped.")
    reduction_factor: int = option(2, "ASHA: keep the best 1/reduction_factor of trials at each rung (>= 2).")
    seed: int = option(0, "Seed of the search (random draws or Optuna's sampler).")
    space: dict = option({}, "SECTION.KEY -> {choice: [..]} | {uniform: [lo, hi]} | {loguniform: [lo, hi]} | "
                             "{randint: [lo, hi]} (bounds included). Empty: the default space (fusion_dim, text_dim, "
                             "DMF layer widths, lr, text_lr, finetune_top_layers, as far as the model uses them). "
                             "--set 'tune.space.KEY={...}' adds or replaces one key; =null removes it.")

    def __post_init__(self) -> None:
        def allowed(name: str, value: Any, options: tuple) -> None:
            if value not in options:
                raise ConfigError(f"tune.{name}={value!r} is not allowed; choose one of "
                                  f"{', '.join(map(repr, options))}.")

        allowed("mode", self.mode, ("max", "min"))
        allowed("scheduler", self.scheduler, ("asha", "none"))
        allowed("search", self.search, ("random", "optuna"))
        if self.num_samples < 1:
            raise ConfigError(f"tune.num_samples={self.num_samples} must be >= 1 (e.g. --num-samples 8).")
        if self.max_concurrent_trials < 0:
            raise ConfigError(f"tune.max_concurrent_trials={self.max_concurrent_trials} must be >= 0 "
                              f"(0 = derived from the cluster).")
        if self.grace_period < 1:
            raise ConfigError(f"tune.grace_period={self.grace_period} must be >= 1 epoch.")
        if self.reduction_factor < 2:
            raise ConfigError(f"tune.reduction_factor={self.reduction_factor} must be >= 2.")
        if not self.metric:
            raise ConfigError(f"tune.metric is empty; use e.g. {DEFAULT_METRIC}.")
        if not isinstance(self.space, dict):
            raise ConfigError(f"tune.space must be a mapping, got {self.space!r}.")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def tune_config_from_dict(raw: dict | None, overrides: dict[str, Any] | None = None) -> TuneConfig:
    """TuneConfig from the YAML `tune:` mapping plus dotted overrides (KEY or space.SECTION.KEY)."""
    raw = json.loads(json.dumps(raw or {}))
    if not isinstance(raw, dict):
        raise ConfigError(f"The tune section must be a mapping of keys, got {raw!r}.")
    fields = {f.name: f for f in dataclasses.fields(TuneConfig)}
    space = raw.pop("space", None)
    if space is None:
        space = {}
    if not isinstance(space, dict):
        raise ConfigError(f"tune.space must map SECTION.KEY to a distribution, got {space!r}.")
    for key, value in (overrides or {}).items():
        if key.startswith("space."):
            param = key[len("space."):]
            if value is None:
                space.pop(param, None)
            else:
                space[param] = value
        else:
            raw[key] = value
    kwargs: dict[str, Any] = {"space": space}
    for key, value in raw.items():
        if key not in fields or key == "space":
            raise ConfigError(f"Unknown config key 'tune.{key}'. Known keys of 'tune': {', '.join(fields)}.")
        kwargs[key] = coerce_value(f"tune.{key}", value, fields[key].type)
    return TuneConfig(**kwargs)


def load_tune_config(path: str | Path | None, sets: list[str] | None = None) -> tuple[Config, TuneConfig]:
    """The run config and the sweep from one YAML file (its `tune:` section) and `--set` strings; `tune.*`
    keys go to the sweep, the rest to the run. An empty `tune.space` becomes the default space for this
    config before `--set tune.space.KEY=...` overrides apply."""
    from raysparse.config import read_config_file

    raw = read_config_file(path)
    tune_raw = raw.pop("tune", None) or {}
    run_sets: dict[str, Any] = {}
    tune_sets: dict[str, Any] = {}
    for item in sets or []:
        if "=" not in item:
            raise ConfigError(f"--set {item!r} must look like SECTION.KEY=VALUE, e.g. model.fusion_dim=64 or "
                              f"tune.num_samples=4.")
        key, value = item.split("=", 1)
        key = key.strip()
        if key.startswith("tune."):
            tune_sets[key[len("tune."):]] = parse_set_value(value)
        else:
            run_sets[key] = parse_set_value(value, key)    # string options keep the text as written
    config = config_from_dict(raw, run_sets)
    if isinstance(tune_raw, dict) and not tune_raw.get("space"):
        tune_raw = dict(tune_raw, space=default_space(config))
    return config, tune_config_from_dict(tune_raw, tune_sets)


def describe_tune_config() -> str:
    lines = ["Sweep keys (the `tune:` section of the YAML file, or --set tune.KEY=VALUE):"]
    for f in dataclasses.fields(TuneConfig):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        lines.append(f"  tune.{f.name} = {default!r}\n      {f.metadata['help']}")
    lines.append("\nDefault space:\n" + "\n".join(f"  {k}: {json.dumps(v)}" for k, v in DEFAULT_SPACE.items()))
    lines.append(f"\nTunable keys: {', '.join(tunable_keys())}")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------ checks

def check_tune(config: Config, tc: TuneConfig) -> tuple[Param, ...]:
    """Everything about the sweep that can be checked without Ray or data; returns the parsed space."""
    params = parse_space(tc.space or default_space(config), config)
    if tc.scheduler == "asha" and tc.grace_period > config.train.epochs:
        raise ConfigError(f"tune.grace_period={tc.grace_period} > train.epochs={config.train.epochs}: ASHA could "
                          f"never stop a trial. Lower tune.grace_period or raise train.epochs.")
    if tc.search == "optuna":
        try:
            import optuna  # noqa: F401
        except ImportError:
            raise ConfigError("tune.search='optuna' needs optuna: pip install optuna (or use tune.search=random).") \
                from None
    return params


REPORTED_KEYS = ("loss", "train_seconds", "examples_per_s", "steady_examples_per_s")


def check_metric(tc: TuneConfig, split) -> None:
    """The metric must be one the training loop reports (its validation keys depend on the split's cohorts)."""
    import numpy as np

    from raysparse.metrics import flatten, summarize

    users = split.evaluated_users
    valid = set(REPORTED_KEYS) | set(flatten(summarize(np.ones(len(users), np.int64), split, users), "val/"))
    if tc.metric not in valid:
        shown = sorted(k for k in valid if k.startswith("val/overall/")) + list(REPORTED_KEYS)
        raise ConfigError(f"tune.metric={tc.metric!r} is not reported by training. Use one of {', '.join(shown)} "
                          f"(or another val/GROUP/NAME: groups overall, warm, cohort, cohort_kK).")


def trial_concurrency(config: Config, tc: TuneConfig, capacity: dict[str, float]) -> int:
    """tune.max_concurrent_trials, or as many trials as the cluster's CPUs (and GPUs) hold, at least 1."""
    if tc.max_concurrent_trials:
        return tc.max_concurrent_trials
    rc = config.ray
    fits = int(capacity.get("CPU", 0.0) // (rc.num_workers * rc.cpus_per_worker))
    if rc.use_gpu:
        fits = min(fits, int(capacity.get("GPU", 0.0) // rc.num_workers))
    return max(1, fits)


def experiment_path(config: Config) -> str:
    """Where Tune keeps the experiment: <ray.storage_path or output>/tune."""
    storage = config.ray.storage_path or str(Path(config.output).resolve())
    return storage.rstrip("/") + "/" + TUNE_DIR


def check_experiment_folder(path: str, resume: bool) -> None:
    from ray.tune import Tuner

    exists = Tuner.can_restore(path)
    if resume and not exists:
        raise ConfigError(f"--resume: there is no sweep to continue at {path}; start it without --resume (or point "
                          f"--output / ray.storage_path at the interrupted sweep).")
    if not resume and exists:
        raise ConfigError(f"{path} already holds a sweep. Pass --resume to continue it, or choose another --output "
                          f"(or delete that folder to start over).")


def check_same_sweep(output: Path, sweep: dict) -> None:
    """--resume with a different base config or space would mix trials of two sweeps."""
    file = output / SWEEP_JSON
    if not file.is_file():
        return
    before = json.loads(file.read_text())
    old, new = _flat(before.get("config", {})), _flat(sweep.get("config", {}))
    for flat in (old, new):
        flat.pop("ray.address", None)           # which cluster runs it is not part of the sweep
    changed = [k for k, same in (("config", old == new), ("space", before.get("space") == sweep.get("space")))
               if not same]
    if changed:
        keys = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
        what = f" (config keys: {', '.join(keys)})" if keys else ""
        verb = "differs" if len(changed) == 1 else "differ"
        raise ConfigError(f"--resume: the {' and '.join(changed)} {verb} from the interrupted sweep's{what}, saved in "
                          f"{file}. Resume with the same config file and --set values, or start a new sweep in "
                          f"another --output.")


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


# ------------------------------------------------------------------------------------------------ placement groups

class PlacementGroupReleaser:
    """Removes the placement group of a Train run whose controller died without removing it.

    When ASHA stops a trial (or a trial reaches ASHA's max_t), Tune ends the trial actor at once; the Train
    controller it owns dies with it, before it can remove its workers' placement group. Ray Train V2 leaves
    that to its PlacementGroupCleaner, which asks the State API (the dashboard) whether the controller lives.
    Without a dashboard, or with two local Ray instances on one machine ("Found multiple active Ray
    instances", seen here), the cleaner cannot ask, the group keeps its CPUs until the driver exits, and the
    next trial waits forever. This actor (no CPU, owned by the sweep's driver) is told each controller and
    its group when the worker group starts, pings the controller every `interval_s`, and removes the group
    once the controller is dead and the group is still there.
    """

    def __init__(self, interval_s: float = 1.0):
        import threading

        self._entries: list[tuple[Any, Any]] = []     # (controller ActorHandle, PlacementGroup)
        self._lock = threading.Lock()
        self._interval_s = interval_s
        self.released = 0
        threading.Thread(target=self._loop, name="PlacementGroupReleaser", daemon=True).start()

    def register(self, controller, placement_group) -> None:
        with self._lock:
            self._entries.append((controller, placement_group))

    def drain(self, timeout_s: float = 60.0) -> int:
        """Wait until every registered controller is gone and its group handled; returns groups released."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            with self._lock:
                if not self._entries:
                    break
            time.sleep(self._interval_s / 2)
        return self.released

    def _loop(self) -> None:
        import ray
        from ray.util.placement_group import placement_group_table, remove_placement_group

        while True:
            time.sleep(self._interval_s)
            with self._lock:
                entries = list(self._entries)
            for entry in entries:
                controller, pg = entry
                try:
                    ray.get(controller.__ray_ready__.remote(), timeout=10)
                    continue                                      # alive: its own shutdown removes the group
                except ray.exceptions.RayActorError:
                    pass                                          # dead (or unreachable for good)
                except Exception:  # noqa: BLE001 - a timeout or a hiccup: ask again next round
                    continue
                with self._lock:
                    self._entries.remove(entry)
                try:
                    if placement_group_table(pg).get("state") not in (None, "REMOVED"):
                        remove_placement_group(pg)
                        self.released += 1
                except Exception:  # noqa: BLE001 - already gone, or the cluster is shutting down
                    pass


def placement_group_callback(releaser):
    """A Train callback (run in the controller) that registers each worker group's placement group with
    `releaser`. Ray Train V2 adds run_config callbacks that are not UserCallbacks to its internal ones
    (DataParallelTrainer._create_default_callbacks: "allows custom workarounds built on top of internal
    callbacks"). None when this Ray version has no such hook."""
    import ray

    try:
        from ray.train.v2._internal.execution.callback import WorkerGroupCallback
    except ImportError:
        return None

    class RegisterPlacementGroup(WorkerGroupCallback):
        def __init__(self, releaser):
            self.releaser = releaser

        def after_worker_group_start(self, worker_group) -> None:
            try:
                pg = worker_group.get_worker_group_state().placement_group_handle.placement_group
                self.releaser.register.remote(ray.get_runtime_context().current_actor, pg)
            except Exception:  # noqa: BLE001 - best effort: Ray's own cleaner still runs
                pass

    return RegisterPlacementGroup(releaser)


# ------------------------------------------------------------------------------------------------ trial

def trial_name(trial) -> str:
    return f"trial_{trial.trial_id}"


def trial_output(sweep_output: str | Path, trial_id: str) -> Path:
    return Path(sweep_output) / TRIALS_DIR / trial_id


def trial_config(base: Config, params: tuple[Param, ...], point: dict, trial_id: str, cache_dir: str,
                 keep_all_checkpoints: bool) -> Config:
    """The run config of one trial: the sampled point, its own output and Train storage, the shared cache."""
    config = apply_point(base, params, point)
    overrides: dict[str, Any] = {"output": str(trial_output(base.output, trial_id)), "data.cache_dir": cache_dir}
    if base.ray.storage_path:
        overrides["ray.storage_path"] = f"{base.ray.storage_path.rstrip('/')}/{TRIALS_DIR}/{trial_id}"
    if keep_all_checkpoints:  # Train keeps checkpoints by NDCG@10; another metric may pick any epoch
        overrides["ray.keep_checkpoints"] = max(config.ray.keep_checkpoints, config.train.epochs)
    return config.replace(**overrides)


def _link_cache(link: Path, cache_dir: str) -> None:
    """ray_train's workers cache item-text embeddings in <output>/cache; a trial's output is its own folder,
    so that path points at the sweep's shared cache."""
    if link.is_symlink() or link.exists():
        return
    link.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.symlink(cache_dir, link, target_is_directory=True)
    except FileExistsError:
        pass


def tune_trial(point: dict, shared: dict) -> None:
    """Tune function trainable: one distributed training run for `point` (SECTION.KEY -> Tune's value).
    shared: base config (dict), params, prepared (ObjectRef of Prepared), dataset, n_examples, cache_dir,
    keep_all_checkpoints, releaser (PlacementGroupReleaser actor)."""
    import ray.tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from raysparse.ray_train import build_trainer, deepspeed_config

    trial_id = ray.tune.get_context().get_trial_id()
    base = config_from_dict(shared["config"])
    config = trial_config(base, shared["params"], point, trial_id, shared["cache_dir"],
                          shared["keep_all_checkpoints"])
    out = Path(config.output)
    out.mkdir(parents=True, exist_ok=True)
    _link_cache(out / "cache", shared["cache_dir"])
    (out / "trial.json").write_text(json.dumps({"trial_id": trial_id, "point": decoded_point(shared["params"], point),
                                                "config": config.to_dict()}, indent=2))
    trainer = build_trainer(config, shared["prepared"], shared["dataset"], shared["n_examples"],
                            deepspeed_config(config, config.ray.num_workers))
    # build_trainer's RunConfig has no callbacks argument; Train V2 reads run_config.callbacks at fit().
    trainer.run_config.callbacks.append(TuneReportCallback())
    register = placement_group_callback(shared["releaser"]) if shared.get("releaser") is not None else None
    if register is not None:
        trainer.run_config.callbacks.append(register)
    trainer.fit()


def decoded_point(params: tuple[Param, ...], point: dict) -> dict:
    return {p.key: p.decode(point[p.key]) for p in params if p.key in point}


# ------------------------------------------------------------------------------------------------ driver

def warm_text_cache(config: Config, params: tuple[Param, ...], prepared, cache_dir: str,
                    log: Callable[[str], None]) -> int:
    """Compute the item-text embeddings every trial will ask for, once, into `cache_dir` (the base config's
    encoder, and each option of a tuned variant / text_model / pooling). Returns how many were warmed."""
    from raysparse.build import build_model

    keys = ("model.variant", "model.text_model", "model.pooling")
    options = [[(p.key, v) for v in p.values] for p in params if p.key in keys and p.kind == "choice"]
    warmed = 0
    seen = set()
    for combo in itertools.product(*options) if options else [()]:
        cfg = config.replace(**dict(combo)) if combo else config
        mc = cfg.model
        if not mc.uses_text or (mc.text_model, mc.pooling) in seen:
            continue
        seen.add((mc.text_model, mc.pooling))
        t0 = time.perf_counter()
        build_model(cfg, prepared.split.n_users, prepared.split.n_items, prepared.item_texts, cache_dir)
        log(f"item-text embeddings ({mc.text_model or 'default encoder'}, {mc.pooling} pooling) ready in "
            f"{cache_dir} ({time.perf_counter() - t0:.1f} s); trials reuse them")
        warmed += 1
    return warmed


def build_tuner(config: Config, tc: TuneConfig, params: tuple[Param, ...], trainable, concurrency: int,
                resume: bool) -> "Tuner":
    """A new Tuner, or the interrupted one restored (--resume)."""
    from ray import tune

    path = experiment_path(config)
    if resume:
        return tune.Tuner.restore(path, trainable=trainable, resume_errored=True)
    scheduler = None
    if tc.scheduler == "asha":
        from ray.tune.schedulers import ASHAScheduler

        # time_attr=epoch (reported by every epoch), not Tune's iteration count: a trial resumed from its
        # Train checkpoint restarts that count, but continues its epochs.
        scheduler = ASHAScheduler(time_attr="epoch", max_t=config.train.epochs, grace_period=tc.grace_period,
                                  reduction_factor=tc.reduction_factor)
    # The concurrency cap: TuneConfig.max_concurrent_trials wraps a Searcher (Optuna) in a ConcurrencyLimiter,
    # but Tune ignores it for the random-search generator, which takes its own max_concurrent.
    if tc.search == "optuna":
        import optuna
        from ray.tune.search.optuna import OptunaSearch

        search, limit = OptunaSearch(sampler=optuna.samplers.TPESampler(seed=tc.seed)), concurrency
    else:
        from ray.tune.search import BasicVariantGenerator

        search, limit = BasicVariantGenerator(random_state=tc.seed, max_concurrent=concurrency), None
    storage, name = path.rsplit("/", 1)
    return tune.Tuner(
        trainable,
        param_space={p.key: p.domain() for p in params},
        tune_config=tune.TuneConfig(metric=tc.metric, mode=tc.mode, num_samples=tc.num_samples, scheduler=scheduler,
                                    search_alg=search, max_concurrent_trials=limit,
                                    trial_name_creator=trial_name, trial_dirname_creator=trial_name),
        # Tune's own console tables list every reported metric (~80 here); one line per event instead.
        run_config=tune.RunConfig(name=name, storage_path=storage, verbose=0,
                                  callbacks=[progress_callback(tc.metric, config.train.epochs)]),
    )


def progress_callback(metric: str, epochs: int):
    """A Tune callback that prints one line per trial result, stop and error."""
    from ray.tune import Callback

    class Progress(Callback):
        def on_trial_result(self, iteration, trials, trial, result, **info):
            value = result.get(metric)
            shown = f"{value:.4f}" if _finite(value) else "-"
            print(f"[tune] trial {trial.trial_id} epoch {result.get('epoch')}/{epochs}: {metric}={shown} "
                  f"loss={result.get('loss', float('nan')):.4f}", flush=True)

        def on_trial_complete(self, iteration, trials, trial, **info):
            epoch = (trial.last_result or {}).get("epoch", 0)
            how = "completed" if epoch >= epochs else f"stopped early by the scheduler after epoch {epoch}"
            print(f"[tune] trial {trial.trial_id} {how}", flush=True)

        def on_trial_error(self, iteration, trials, trial, **info):
            print(f"[tune] trial {trial.trial_id} failed; see {trial.path}/error.txt", flush=True)

    return Progress()


@dataclass
class TrialRecord:
    """One trial as the sweep ends: its point, status and per-epoch records (from its Train run)."""

    trial_id: str
    point: dict
    status: str                      # completed | stopped early | error | unfinished (interrupted sweep)
    history: list[dict]              # reported records, epoch order
    checkpoints: dict[int, str]      # epoch -> checkpoint folder holding artifact/
    error: str = ""

    def best(self, metric: str, mode: str) -> tuple[int, float] | None:
        """(epoch, value) of the best checkpointed epoch by `metric`."""
        scored = [(r["epoch"], r[metric]) for r in self.history
                  if r.get("epoch") in self.checkpoints and _finite(r.get(metric))]
        if not scored:
            return None
        return (max if mode == "max" else min)(scored, key=lambda ev: ev[1])


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _fs(path: str):
    import pyarrow.fs as pafs

    return pafs.FileSystem.from_uri(path) if "://" in path else (pafs.LocalFileSystem(), path)


def read_train_run(run_dir: str) -> tuple[list[dict], dict[int, str]]:
    """(history, {epoch: checkpoint folder}) of a Ray Train run folder written by ray_train: the history is
    the latest checkpoint's train_state.json; only checkpoints holding artifact/ count."""
    import pyarrow.fs as pafs

    fs, inner = _fs(run_dir)
    info = fs.get_file_info(inner)
    if info.type != pafs.FileType.Directory:
        return [], {}
    checkpoints: dict[int, str] = {}
    history: list[dict] = []
    latest = -1
    for entry in fs.get_file_info(pafs.FileSelector(inner)):
        name = entry.base_name
        if entry.type != pafs.FileType.Directory or not name.startswith("epoch_"):
            continue
        try:
            with fs.open_input_stream(f"{entry.path}/train_state.json") as stream:
                state = json.loads(stream.read())
        except (OSError, ValueError):
            continue                  # a checkpoint that was being written when the run stopped
        epoch = int(state["epoch"])
        if fs.get_file_info(f"{entry.path}/artifact/format.json").type == pafs.FileType.File:
            prefix = run_dir.split("://", 1)[0] + "://" if "://" in run_dir else ""
            checkpoints[epoch] = prefix + entry.path
        if epoch > latest:
            latest, history = epoch, state["history"]
    return history, checkpoints


def collect_trials(grid: "ResultGrid", config: Config, params: tuple[Param, ...]) -> list[TrialRecord]:
    from raysparse.ray_train import RUN_NAME, run_location

    # Tune's own trial states tell an ended trial from one an interrupted sweep left running or pending.
    states = {t.trial_id: t.status for t in getattr(getattr(grid, "_experiment_analysis", None), "trials", [])}
    records = []
    for result in grid:
        trial_id = Path(result.path).name.removeprefix("trial_")
        tcfg = config.replace(**{"output": str(trial_output(config.output, trial_id))})
        if config.ray.storage_path:
            tcfg = tcfg.replace(**{"ray.storage_path": f"{config.ray.storage_path.rstrip('/')}/{TRIALS_DIR}/{trial_id}"})
        _, run_dir = run_location(tcfg)
        assert run_dir.endswith(RUN_NAME)
        history, checkpoints = read_train_run(run_dir)
        if result.error is not None or states.get(trial_id) == "ERROR":
            status = "error"
        elif states.get(trial_id, "TERMINATED") != "TERMINATED":
            status = "unfinished"
        elif history and history[-1]["epoch"] >= config.train.epochs:
            status = "completed"
        else:
            status = "stopped early"
        error = str(result.error).strip().splitlines()[-1][:200] if result.error is not None else ""
        records.append(TrialRecord(trial_id, decoded_point(params, result.config or {}), status, history,
                                   checkpoints, error))
    return records


def trials_frame(records: list[TrialRecord], params: tuple[Param, ...], tc: TuneConfig) -> "pd.DataFrame":
    """One row per trial: params, status, epochs, best and final metric, final loss; best first."""
    import pandas as pd

    rows = []
    for r in records:
        best = r.best(tc.metric, tc.mode)
        last = r.history[-1] if r.history else {}
        row: dict[str, Any] = {"trial_id": r.trial_id, "status": r.status}
        for p in params:
            value = r.point.get(p.key)
            row[p.key] = json.dumps(value) if isinstance(value, (list, dict)) else value
        row.update({"epochs": last.get("epoch", 0), "best_epoch": best[0] if best else None,
                    f"best_{tc.metric}": best[1] if best else float("nan"),
                    f"final_{tc.metric}": last.get(tc.metric, float("nan")),
                    "final_loss": last.get("loss", float("nan")), "error": r.error})
        rows.append(row)
    frame = pd.DataFrame(rows)
    if len(frame):
        frame = frame.sort_values(f"best_{tc.metric}", ascending=tc.mode == "min", na_position="last",
                                  kind="stable").reset_index(drop=True)
    return frame


def format_table(frame: "pd.DataFrame", tc: TuneConfig) -> str:
    """The trial table for the console: short parameter names, 4 significant digits."""
    short = frame.drop(columns=["error"] if not frame["error"].astype(bool).any() else [])
    short = short.rename(columns=lambda c: c.split(".", 1)[1] if c.startswith(("model.", "train.")) else
                         c.replace(tc.metric, tc.metric.rsplit("/", 1)[-1]))
    return short.to_string(index=False, float_format=lambda v: f"{v:.4g}", na_rep="-")


def export_best(records: list[TrialRecord], tc: TuneConfig, config: Config, prepared, sweep: dict,
                log: Callable[[str], None]) -> dict:
    """Copy the best trial's best checkpoint's artifact to <output>/best and write best/summary.json."""
    import pyarrow.fs as pafs

    from raysparse.build import build_batches
    from raysparse.local import validation_metrics
    from raysparse.recommender import Recommender

    scored = [(r, r.best(tc.metric, tc.mode)) for r in records]
    scored = [(r, b) for r, b in scored if b is not None]
    if not scored:
        raise ConfigError(f"no trial produced a checkpoint with {tc.metric}; see the trial table above and the "
                          f"errors in {experiment_path(config)}.")
    record, (epoch, value) = (max if tc.mode == "max" else min)(scored, key=lambda rb: rb[1][1])
    checkpoint = record.checkpoints[epoch]
    out = Path(config.output)
    best, tmp = out / BEST_DIR, out / (BEST_DIR + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    fs, inner = _fs(checkpoint)
    pafs.copy_files(f"{inner}/artifact", str(tmp), source_filesystem=fs,
                    destination_filesystem=pafs.LocalFileSystem())
    shutil.rmtree(best, ignore_errors=True)
    tmp.rename(best)

    # Test metrics of the exported weights, in one process on the prepared split (as `raysparse train`).
    rec = Recommender.load(best)
    rec.builder = build_batches(rec.config, prepared.split, rec.builder.item_text)
    test = validation_metrics(rec, prepared, "test", sampled=True)
    metrics = next(r for r in record.history if r["epoch"] == epoch)
    summary = {
        "trial_id": record.trial_id, "metric": tc.metric, "mode": tc.mode, "value": value, "best_epoch": epoch,
        "metrics": metrics, "test": test, "params": record.point, "config": rec.config.to_dict(),
        "source": {"checkpoint": checkpoint, "trial_output": str(trial_output(config.output, record.trial_id)),
                   "experiment": experiment_path(config), "trials_csv": str(out / TRIALS_CSV)},
        "sweep": sweep,
    }
    (best / "summary.json").write_text(json.dumps(summary, indent=2, default=float))
    log(f"best: trial {record.trial_id}, epoch {epoch}, {tc.metric}={value:.4f} -> {best}")
    return summary


def run_tune(config: Config, tc: TuneConfig, resume: bool = False, log: Callable[[str], None] = print) -> dict:
    """Run (or resume) the sweep on the current Ray cluster. Returns {"best": best/summary.json's content,
    "trials": rows of trials.csv, "table": the printed table, "experiment": Tune's folder}."""
    import ray
    from ray import tune

    from raysparse.ray_data import prepare_for_ray
    from raysparse.ray_train import (SELECT_METRIC, absolute_paths, check_before_start, check_static,
                                     cluster_capacity, connect, deepspeed_config, training_dataset)

    t0 = time.perf_counter()
    config = absolute_paths(config)
    params = check_tune(config, tc)
    check_static(config)
    for p in params:  # every option's DeepSpeed config (train.lr etc. feed it)
        for value in p.values:
            deepspeed_config(config.replace(**{p.key: float(value) if p.kind in ("uniform", "loguniform") else value}),
                             config.ray.num_workers)
    out = Path(config.output)
    cache_dir = str(Path(config.data.resolved_cache_dir).resolve()) if "://" not in config.data.resolved_cache_dir \
        else config.data.resolved_cache_dir
    sweep = {"config": config.to_dict(), "tune": {k: v for k, v in tc.to_dict().items() if k != "space"},
             "space": {p.key: {p.kind: list(p.values)} for p in params}}
    if resume:
        check_same_sweep(out, sweep)
    check_experiment_folder(experiment_path(config), resume)
    log("search space:\n" + "\n".join(f"  {p.describe()}" for p in params))

    connect(config)
    capacity = cluster_capacity()
    check_before_start(config, capacity)
    concurrency = trial_concurrency(config, tc, capacity)

    prepared = prepare_for_ray(config)
    check_metric(tc, prepared.split)
    log(f"data ({prepared.report.get('reader', 'pandas')} reader): {json.dumps(prepared.split.stats)}")
    warm_text_cache(config, params, prepared, cache_dir, log)
    dataset, n_examples = training_dataset(config, prepared)
    out.mkdir(parents=True, exist_ok=True)
    (out / SWEEP_JSON).write_text(json.dumps(sweep, indent=2))

    releaser = ray.remote(num_cpus=0, max_concurrency=4)(PlacementGroupReleaser).remote()
    shared = {"config": config.to_dict(), "params": params, "prepared": ray.put(prepared), "dataset": dataset,
              "n_examples": int(n_examples), "cache_dir": cache_dir,
              "keep_all_checkpoints": tc.metric != SELECT_METRIC or tc.mode != "max", "releaser": releaser}
    trainable = tune.with_resources(tune.with_parameters(tune_trial, shared=shared), TRIAL_RESOURCES)
    log(f"{'resuming' if resume else 'starting'} sweep: {tc.num_samples} trials, up to {concurrency} at once "
        f"({config.ray.num_workers} workers x {config.ray.cpus_per_worker:g} CPU each), scheduler={tc.scheduler}, "
        f"search={tc.search}, metric={tc.metric} ({tc.mode}); experiment {experiment_path(config)}")
    tuner = build_tuner(config, tc, params, trainable, concurrency, resume)
    try:
        grid = tuner.fit()
    finally:
        released = ray.get(releaser.drain.remote(60.0))
        ray.kill(releaser)
    if released:
        log(f"released {released} placement group(s) of Train runs whose trial Tune ended")

    records = collect_trials(grid, config, params)
    frame = trials_frame(records, params, tc)
    frame.to_csv(out / TRIALS_CSV, index=False)
    table = format_table(frame, tc)
    log(f"trials ({out / TRIALS_CSV}):\n{table}")
    unfinished = sum(r.status == "unfinished" for r in records)
    if unfinished:
        log(f"the sweep was interrupted with {unfinished} trial(s) unfinished; the best so far is exported below. "
            f"Continue it with --resume (same --config, --set and --output).")
    best = export_best(records, tc, config, prepared, sweep, log)
    log(f"sweep done in {time.perf_counter() - t0:.0f} s")
    return {"best": best, "trials": frame.to_dict("records"), "table": table, "experiment": experiment_path(config)}


# ------------------------------------------------------------------------------------------------ CLI

def add_tune_arguments(parser: argparse.ArgumentParser) -> None:
    from raysparse.train_cli import add_config_arguments

    add_config_arguments(parser)
    parser.add_argument("--num-samples", type=int, default=None, help="Trials; overrides tune.num_samples.")
    parser.add_argument("--resume", action="store_true", help="Continue the interrupted sweep in <output>.")


def tune_configs_from_args(args: argparse.Namespace) -> tuple[Config, TuneConfig]:
    sets = list(args.sets)
    if getattr(args, "output", None):
        sets.append(f"output={args.output}")
    if args.num_samples is not None:
        sets.append(f"tune.num_samples={args.num_samples}")
    return load_tune_config(args.config, sets)


def register_tune(subparsers) -> None:
    from raysparse.config import describe_config

    parser = subparsers.add_parser(
        "tune", help="Hyperparameter sweep: each trial a distributed training run (Ray Tune + Ray Train).",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Sweep the `tune:` section's space; writes <output>/trials.csv and <output>/best (the best "
                    "trial's artifact with summary.json).\n\n" + describe_tune_config() + "\n\n" + describe_config())
    add_tune_arguments(parser)
    parser.set_defaults(func=run_tune_command)


def run_tune_command(args: argparse.Namespace) -> int:
    config, tc = tune_configs_from_args(args)
    result = run_tune(config, tc, resume=args.resume)
    best = result["best"]
    print(json.dumps({"best_trial": best["trial_id"], "best_epoch": best["best_epoch"], best["metric"]: best["value"],
                      "artifact": str(Path(config.output).resolve() / BEST_DIR)}, indent=2))
    return 0
