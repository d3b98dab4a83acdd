"""A hyperparameter sweep without Ray: what `raysparse tune` searches, how each trial is configured, and what
the sweep reports. raysparse.ray_tune runs it on Ray Tune; nothing here imports Ray.

The sweep is declared in a `tune:` section of the same YAML file as the run (`TuneConfig`); `--set tune.KEY=V`
and the section are read like the run's own sections (raysparse.config):

    tune:
      num_samples: 8
      scheduler: asha              # stop weak trials early on `metric` ("none": every trial runs all epochs)
      search: random               # or optuna (Tune's OptunaSearch, TPE)
      space:                       # SECTION.KEY of the run config -> one distribution; omitted: DEFAULT_SPACE
        model.fusion_dim: {choice: [64, 128, 256]}
        model.dmf_user_layers: {choice: [[128, 64], [256, 128]]}
        train.lr: {loguniform: [1.0e-4, 1.0e-2]}
        model.finetune_top_layers: {randint: [0, 2]}        # both ends included

This module owns:
  - the search-space language: `parse_space` checks each SECTION.KEY -> distribution against the real `Config`
    (every choice value and range bound must make a valid run), `Param` is one dimension, `apply_point` turns
    one sampled point into a run config;
  - `TuneConfig`, its loading (`load_tune_config`) and the checks that need neither Ray nor data
    (`check_tune`), or only the prepared split (`check_metric`), or the interrupted sweep (`check_same_sweep`);
  - the sweep's folder and each trial's config and folder (`trial_config`, `prepare_trial_folder`), and the
    item-text cache the trials share (`warm_text_cache`);
  - the results: each trial read back from its Train run folder (`TrialRecord.from_run`), the trial table
    (`trials_frame`, `format_table`) and the export of the best trial (`export_best`, `finish_sweep`).

The sweep's folder (`output`):
    sweep.json            the base config and the sweep's settings, checked again on --resume
    tune/                 Tune's experiment (what --resume restores)
    trials/<trial_id>/    each trial's run: trial.json (its point and config), cache -> the shared cache,
                          ray/train (its Ray Train run: checkpoints epoch_NNNN/ with train_state.json, artifact/)
    trials.csv            one row per trial, best first
    best/                 the best trial's best checkpoint's artifact, with summary.json
"""

from __future__ import annotations

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
from typing import Any, Callable

import numpy as np
import pandas as pd
import pyarrow.fs as pafs

from raysparse.artifact import replace_directory
from raysparse.build import Prepared, build_batches, build_model
from raysparse.config import (SECTIONS, Config, config_from_dict, describe_section, option, parse_sets,
                              read_config_file, section_from_dict)
from raysparse.data.split import Split
from raysparse.errors import ConfigError
from raysparse.local import validation_metrics
from raysparse.metrics import flatten, strict_json, summarize
from raysparse.preflight import SNAPSHOT
from raysparse.recommender import Recommender

DEFAULT_METRIC = "val/overall/ndcg@10"
TUNE_DIR = "tune"            # Tune's experiment folder under the storage path
TRIALS_DIR = "trials"        # <output>/trials/<trial_id>: each trial's run (output, Train run folder)
BEST_DIR = "best"            # the exported artifact of the best trial
TRIALS_CSV = "trials.csv"
SWEEP_JSON = "sweep.json"    # the base config + sweep settings, checked again on --resume
SPACE_KINDS = ("choice", "uniform", "loguniform", "randint")
REPORTED_KEYS = ("loss", "train_seconds", "examples_per_s", "steady_examples_per_s")  # besides val/GROUP/NAME

# Keys of the run config a sweep may not vary, and why.
NOT_TUNABLE = {
    "train.epochs": "it is the sweep's budget per trial (ASHA's max_t); set it in the train section",
    "train.example_mode": "the training examples are built once for all trials; set it in the train section",
}

# Used when `tune.space` is empty: the list, limited to what the base config uses (text keys only
# with a text tower, the fine-tuning depth only with finetune=top, the encoder's learning rate only when it
# trains, text_dim only with the bag encoder, fusion_dim only with concat fusion).
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
    if mc.history_encoder == "attention":
        skip.add("model.text_dim")          # the attention reads item text embeddings itself (text_user_dim)
    if mc.fusion == "residual":
        skip.add("model.fusion_dim")        # vectors have attention_dim entries; residual_hidden_dim is the width
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
        # the search as JSON strings and are decoded in the trial.
        return self.kind == "choice" and any(isinstance(v, (list, dict)) for v in self.values)

    def categories(self) -> list:
        """A choice's options as the search draws them (JSON strings when `encoded`)."""
        return [json.dumps(v) for v in self.values] if self.encoded else list(self.values)

    def config_values(self) -> list:
        """Every option, or both bounds, as the run config takes them (uniform/loguniform bounds as floats)."""
        return [float(v) for v in self.values] if self.kind in ("uniform", "loguniform") else list(self.values)

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
        for value in param.config_values():
            try:
                base.replace(**{key: value})
            except ConfigError as err:
                raise ConfigError(f"{where}: the {kind} value {value!r} is not a valid {key}: {err}") from None
        params.append(param)
    return tuple(params)


def getattr_dotted(config: Config, key: str) -> Any:
    section, name = key.split(".", 1)
    return getattr(getattr(config, section), name)


def decoded_point(params: tuple[Param, ...], point: dict) -> dict:
    """A sampled point (SECTION.KEY -> the search's value) with list options decoded."""
    return {p.key: p.decode(point[p.key]) for p in params if p.key in point}


def apply_point(base: Config, params: tuple[Param, ...], point: dict) -> Config:
    """The run config of one sampled point (the search's values, decoded), validated by `Config`."""
    overrides = decoded_point(params, point)
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
                             "--set 'tune.space={...}' replaces it; --set 'tune.space.KEY={...}' adds or replaces "
                             "one key, =null removes it.")

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


def _space_mapping(value: Any) -> dict:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ConfigError(f"tune.space must map SECTION.KEY to a distribution, e.g. "
                          f"{{model.fusion_dim: {{choice: [64, 128]}}}}; got {value!r}.")
    return value


def tune_config_from_dict(raw: dict | None, overrides: dict[str, Any] | None = None) -> TuneConfig:
    """TuneConfig from the YAML `tune:` mapping plus dotted overrides: KEY, `space` (the whole space) or
    space.SECTION.KEY (one parameter; None removes it)."""
    raw = json.loads(json.dumps(raw or {}))
    if not isinstance(raw, dict):
        raise ConfigError(f"The tune section must be a mapping of keys, got {raw!r}.")
    space = _space_mapping(raw.get("space"))
    for key, value in (overrides or {}).items():
        if key == "space":
            space = _space_mapping(value)
        elif key.startswith("space."):
            param = key[len("space."):]
            if value is None:
                space.pop(param, None)
            else:
                space[param] = value
        else:
            raw[key] = value
    return section_from_dict("tune", TuneConfig, {**raw, "space": space})


def load_tune_config(path: str | Path | None, sets: list[str] | None = None) -> tuple[Config, TuneConfig]:
    """The run config and the sweep from one YAML file (its `tune:` section) and `--set` strings; `tune.*`
    keys go to the sweep, the rest to the run. An empty `tune.space` becomes the default space for this
    config before `--set tune.space.KEY=...` overrides apply."""
    raw = read_config_file(path)
    tune_raw = raw.pop("tune", None) or {}
    overrides = parse_sets(sets, {"tune": TuneConfig})
    config = config_from_dict(raw, {k: v for k, v in overrides.items() if not k.startswith("tune.")})
    if isinstance(tune_raw, dict) and not tune_raw.get("space"):
        tune_raw = dict(tune_raw, space=default_space(config))
    tune_sets = {k[len("tune."):]: v for k, v in overrides.items() if k.startswith("tune.")}
    return config, tune_config_from_dict(tune_raw, tune_sets)


def describe_tune_config() -> str:
    """Every sweep key with its default and help, the default space and the tunable keys (for --help)."""
    lines = ["Sweep keys (the `tune:` section of the YAML file, or --set tune.KEY=VALUE):"]
    lines += describe_section("tune", TuneConfig)
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
            import optuna  # noqa: F401  (optional: only this search needs it)
        except ImportError:
            raise ConfigError("tune.search='optuna' needs optuna: pip install optuna (or use tune.search=random).") \
                from None
    return params


def check_metric(tc: TuneConfig, split: Split) -> None:
    """The metric must be one the training loop reports (its validation keys depend on the split's cohorts)."""
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


def sweep_record(config: Config, tc: TuneConfig, params: tuple[Param, ...]) -> dict:
    """What makes the sweep: the base config, the settings and the parsed space (<output>/sweep.json)."""
    return {"config": config.to_dict(), "tune": {k: v for k, v in tc.to_dict().items() if k != "space"},
            "space": {p.key: {p.kind: list(p.values)} for p in params}}


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


# ------------------------------------------------------------------------------------------------ trials

def trial_output(sweep_output: str | Path, trial_id: str) -> Path:
    return Path(sweep_output) / TRIALS_DIR / trial_id


def trial_paths(base: Config, trial_id: str) -> dict[str, str]:
    """The overrides that give a trial its own output (and Train storage, when the sweep sets one)."""
    overrides = {"output": str(trial_output(base.output, trial_id))}
    if base.ray.storage_path:
        overrides["ray.storage_path"] = f"{base.ray.storage_path.rstrip('/')}/{TRIALS_DIR}/{trial_id}"
    return overrides


def trial_config(base: Config, params: tuple[Param, ...], point: dict, trial_id: str, cache_dir: str,
                 keep_all_checkpoints: bool) -> Config:
    """The run config of one trial: the sampled point, its own output and Train storage, the shared cache."""
    config = apply_point(base, params, point)
    overrides: dict[str, Any] = {**trial_paths(base, trial_id), "data.cache_dir": cache_dir}
    if keep_all_checkpoints:  # Train keeps checkpoints by NDCG@10; another metric may pick any epoch
        overrides["ray.keep_checkpoints"] = max(config.ray.keep_checkpoints, config.train.epochs)
    return config.replace(**overrides)


def shared_cache_dir(config: Config) -> str:
    """The item-text cache every trial reads (absolute: trials run in other folders)."""
    cache_dir = config.data.resolved_cache_dir
    return cache_dir if "://" in cache_dir else str(Path(cache_dir).resolve())


def prepare_trial_folder(config: Config, trial_id: str, params: tuple[Param, ...], point: dict,
                         cache_dir: str) -> None:
    """The trial's output folder (config.output from `trial_config`) with trial.json, and <output>/cache
    pointing at the sweep's shared cache: ray_train's workers cache item-text embeddings there."""
    out = Path(config.output)
    out.mkdir(parents=True, exist_ok=True)
    link = out / "cache"
    if not (link.is_symlink() or link.exists()):
        try:
            os.symlink(cache_dir, link, target_is_directory=True)
        except FileExistsError:
            pass
    (out / "trial.json").write_text(json.dumps({"trial_id": trial_id, "point": decoded_point(params, point),
                                                "config": config.to_dict()}, indent=2))


def warm_text_cache(config: Config, params: tuple[Param, ...], prepared: Prepared, cache_dir: str,
                    log: Callable[[str], None]) -> int:
    """Compute the item-text embeddings every trial will ask for, once, into `cache_dir` (the base config's
    encoder, and each option of a tuned variant / text_model / pooling). Returns how many were warmed."""
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


# ------------------------------------------------------------------------------------------------ results

def is_finite(value: Any) -> bool:
    """A real number that is not NaN or infinite (a reported metric that can rank)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _fs(path: str) -> tuple[pafs.FileSystem, str]:
    return pafs.FileSystem.from_uri(path) if "://" in path else (pafs.LocalFileSystem(), path)


def read_train_run(run_dir: str) -> tuple[list[dict], dict[int, str]]:
    """(history, {epoch: checkpoint folder}) of a Ray Train run folder written by ray_train, as Ray Train
    recorded it: the checkpoints its snapshot (`preflight.SNAPSHOT`) lists that hold artifact/, and the history
    of the latest one's train_state.json. Ray registers a checkpoint only after every worker has copied its
    part into the folder, so a folder that a run killed while copying left partial (issue 16) is never read.
    (Before, this listed the epoch_* folders: one with train_state.json and artifact/format.json copied and
    its weights not yet counted as a checkpoint and could be exported as the best.)"""
    fs, inner = _fs(run_dir)
    try:
        with fs.open_input_stream(f"{inner.rstrip('/')}/{SNAPSHOT}") as stream:
            snapshot = json.loads(stream.read())
    except (OSError, ValueError):
        return [], {}                 # no checkpoint recorded yet
    latest = (snapshot.get("latest_checkpoint_result") or {}).get("checkpoint_dir_name")
    names = {r["checkpoint_dir_name"] for r in snapshot.get("checkpoint_results") or []} | ({latest} - {None})
    prefix = run_dir.split("://", 1)[0] + "://" if "://" in run_dir else ""
    checkpoints: dict[int, str] = {}
    history: list[dict] = []
    for name in sorted(names):
        path = f"{inner.rstrip('/')}/{name}"
        with fs.open_input_stream(f"{path}/train_state.json") as stream:
            state = json.loads(stream.read())
        if fs.get_file_info(f"{path}/artifact/format.json").type == pafs.FileType.File:
            checkpoints[int(state["epoch"])] = prefix + path
        if name == latest:
            history = state["history"]
    return history, checkpoints


@dataclass
class TrialRecord:
    """One trial as the sweep ends: its point, status and per-epoch records (from its Train run)."""

    trial_id: str
    point: dict
    status: str                      # completed | stopped early | error | unfinished (interrupted sweep)
    history: list[dict]              # reported records, epoch order
    checkpoints: dict[int, str]      # epoch -> checkpoint folder holding artifact/
    error: str = ""

    @classmethod
    def from_run(cls, trial_id: str, point: dict, run_dir: str, tune_status: str, error: str,
                 epochs: int) -> "TrialRecord":
        """A trial from Tune's view of it (status: TERMINATED, ERROR, RUNNING, PENDING, ...; error: one line,
        '' if none) and its Train run folder `run_dir`; `epochs` (train.epochs) tells completed from stopped."""
        history, checkpoints = read_train_run(run_dir)
        if error or tune_status == "ERROR":
            status = "error"
        elif tune_status != "TERMINATED":
            status = "unfinished"
        elif history and history[-1]["epoch"] >= epochs:
            status = "completed"
        else:
            status = "stopped early"
        return cls(trial_id, point, status, history, checkpoints, error)

    def best(self, metric: str, mode: str) -> tuple[int, float] | None:
        """(epoch, value) of the best checkpointed epoch by `metric`."""
        scored = [(r["epoch"], r[metric]) for r in self.history
                  if r.get("epoch") in self.checkpoints and is_finite(r.get(metric))]
        if not scored:
            return None
        return (max if mode == "max" else min)(scored, key=lambda ev: ev[1])


def trials_frame(records: list[TrialRecord], params: tuple[Param, ...], tc: TuneConfig) -> pd.DataFrame:
    """One row per trial: params, status, epochs, best and final metric, final loss; best first."""
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


def format_table(frame: pd.DataFrame, tc: TuneConfig) -> str:
    """The trial table for the console: short parameter names, 4 significant digits."""
    short = frame.drop(columns=["error"] if not frame["error"].astype(bool).any() else [])
    short = short.rename(columns=lambda c: c.split(".", 1)[1] if c.startswith(("model.", "train.")) else
                         c.replace(tc.metric, tc.metric.rsplit("/", 1)[-1]))
    return short.to_string(index=False, float_format=lambda v: f"{v:.4g}", na_rep="-")


def best_trial(records: list[TrialRecord], tc: TuneConfig) -> tuple[TrialRecord, int, float] | None:
    """(trial, epoch, value) of the best checkpointed epoch of any trial by tc.metric; None if none has one."""
    scored = [(r, r.best(tc.metric, tc.mode)) for r in records]
    scored = [(r, b) for r, b in scored if b is not None]
    if not scored:
        return None
    record, (epoch, value) = (max if tc.mode == "max" else min)(scored, key=lambda rb: rb[1][1])
    return record, epoch, value


def export_best(records: list[TrialRecord], tc: TuneConfig, config: Config, prepared: Prepared, sweep: dict,
                log: Callable[[str], None]) -> dict:
    """Copy the best trial's best checkpoint's artifact to <output>/best and write best/summary.json."""
    best_of = best_trial(records, tc)
    if best_of is None:
        raise ConfigError(f"no trial produced a checkpoint with {tc.metric}; see the trial table above and the "
                          f"errors in {experiment_path(config)}.")
    record, epoch, value = best_of
    checkpoint = record.checkpoints[epoch]
    out = Path(config.output)
    best, tmp = out / BEST_DIR, out / (BEST_DIR + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    fs, inner = _fs(checkpoint)
    pafs.copy_files(f"{inner}/artifact", str(tmp), source_filesystem=fs,
                    destination_filesystem=pafs.LocalFileSystem())
    replace_directory(tmp, best)  # a sweep killed while exporting leaves the previous best whole (issue 16)

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
    (best / "summary.json").write_text(strict_json(summary, indent=2))
    log(f"best: trial {record.trial_id}, epoch {epoch}, {tc.metric}={value:.4f} -> {best}")
    return summary


def finish_sweep(records: list[TrialRecord], params: tuple[Param, ...], tc: TuneConfig, config: Config,
                 prepared: Prepared, sweep: dict, log: Callable[[str], None]) -> dict:
    """Write and print the trial table, export the best trial. Returns {"best": best/summary.json's content,
    "trials": rows of trials.csv, "table": the printed table, "experiment": Tune's folder}."""
    out = Path(config.output)
    frame = trials_frame(records, params, tc)
    frame.to_csv(out / TRIALS_CSV, index=False)
    table = format_table(frame, tc)
    log(f"trials ({out / TRIALS_CSV}):\n{table}")
    unfinished = sum(r.status == "unfinished" for r in records)
    if unfinished:
        log(f"the sweep was interrupted with {unfinished} trial(s) unfinished; the best so far is exported below. "
            f"Continue it with --resume (same --config, --set and --output).")
    best = export_best(records, tc, config, prepared, sweep, log)
    return {"best": best, "trials": frame.to_dict("records"), "table": table, "experiment": experiment_path(config)}
