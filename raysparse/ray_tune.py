"""Hyperparameter sweeps on Ray Tune, each trial a full Ray Train + DeepSpeed run: `raysparse tune` and
`jobs/tune.py`. What is searched, each trial's config, the trial table and the best trial's export are Ray-free
and live in raysparse.sweep; this module runs them on Ray.

Driver, `run_tune(config, tune_config, resume)`:
  1. Checks before Ray starts (`sweep.check_tune`, `preflight.check_static`, the DeepSpeed config of every
     option): a bad sweep is one ConfigError before anything starts.
  2. Prepares the data once (`ray_data.prepare_for_ray`), puts it in the object store and builds the
     training-example dataset once; every trial's trainer reads the same objects.
  3. Warms the item-text embedding cache once (`sweep.warm_text_cache`): with a frozen text tower, that is
     all the encoder work a trial would do, so trials reuse it instead of recomputing it.
  4. `Tuner.fit()` (or `Tuner.restore(...)` with --resume) over `tune_trial`, ASHA on `metric` by default.
  5. Reads each trial back from Tune and its Train run folder (`collect_trials`); `sweep.finish_sweep` writes
     <output>/trials.csv and exports the best trial's best checkpoint to <output>/best.

Trial, `tune_trial(point, shared)`: a Tune function trainable that builds the run's `TorchTrainer` with
`ray_train.build_trainer` (its own folder <output>/trials/<trial_id>) and forwards the trainer's reports to
Tune with `TuneReportCallback` (the Train V2 pattern: https://docs.ray.io/en/latest/train/user-guides/
hyperparameter-optimization.html). The trial actor itself reserves no CPU (see TRIAL_RESOURCES), so
floor(CPUs / (num_workers x cpus_per_worker)) trials run side by side without deadlock, and a trial that
Tune ends early gives its workers' CPUs back at once (`raysparse.ray_placement`, a workaround for Ray Train V2).

Resume: Tune restores its experiment (<output>/tune); a trial that did not finish runs its function again,
and its TorchTrainer, pointed at the same run folder, continues from that run's latest checkpoint (Ray
Train V2 restores from an existing run folder).

Ray is imported inside functions, so `raysparse tune --help` and the checks run without starting it.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from raysparse.config import Config, config_from_dict
from raysparse.engine import deepspeed_config
from raysparse.preflight import absolute_paths, check_before_start, check_new_or_resume, check_static, run_location
from raysparse.ray_train import build_trainer, cluster_capacity, connect, training_dataset
from raysparse.step import SELECT_METRIC
from raysparse.sweep import (SWEEP_JSON, Param, TrialRecord, TuneConfig, check_metric, check_same_sweep, check_tune,
                             decoded_point, experiment_path, finish_sweep, is_finite, prepare_trial_folder,
                             shared_cache_dir, sweep_record, trial_concurrency, trial_config, trial_paths,
                             warm_text_cache)

if TYPE_CHECKING:
    from ray.tune import ResultGrid, Tuner
    from ray.tune.search.sample import Domain

# The trial function only waits on its TorchTrainer, whose workers reserve the CPUs. Tune rejects an empty
# request ({"cpu": 0}), and {"cpu": 0.01} (RAY_NOTES) leaves 1.98 of 2 CPUs, so a second 1-CPU trial waited
# for the first to end (seen here: two 1-worker trials ran one after the other). A token of memory is a
# non-empty request that takes no CPU: both ran side by side.
TRIAL_RESOURCES = {"cpu": 0, "memory": 1 << 20}


def search_domain(param: Param) -> "Domain":
    """The Tune search domain of one dimension of the space."""
    from ray import tune

    if param.kind == "choice":
        return tune.choice(param.categories())
    lower, upper = param.values
    if param.kind == "uniform":
        return tune.uniform(lower, upper)
    if param.kind == "loguniform":
        return tune.loguniform(lower, upper)
    return tune.randint(lower, upper + 1)  # Tune's upper bound is exclusive; ours is included


# ------------------------------------------------------------------------------------------------ trial

def trial_name(trial) -> str:
    return f"trial_{trial.trial_id}"


def tune_trial(point: dict, shared: dict) -> None:
    """Tune function trainable: one distributed training run for `point` (SECTION.KEY -> Tune's value).
    shared: base config (dict), params, prepared (ObjectRef of Prepared), dataset, n_examples, cache_dir,
    keep_all_checkpoints, releaser (PlacementGroupReleaser actor or None)."""
    import ray.tune
    from ray.tune.integration.ray_train import TuneReportCallback

    trial_id = ray.tune.get_context().get_trial_id()
    config = trial_config(config_from_dict(shared["config"]), shared["params"], point, trial_id,
                          shared["cache_dir"], shared["keep_all_checkpoints"])
    prepare_trial_folder(config, trial_id, shared["params"], point, shared["cache_dir"])
    callbacks = [TuneReportCallback()]
    from raysparse.ray_placement import placement_group_callback  # imports ray

    register = placement_group_callback(shared["releaser"]) if shared.get("releaser") is not None else None
    if register is not None:
        callbacks.append(register)
    build_trainer(config, shared["prepared"], shared["dataset"], shared["n_examples"],
                  deepspeed_config(config, config.ray.num_workers), callbacks=callbacks).fit()


# ------------------------------------------------------------------------------------------------ driver

def check_experiment_folder(path: str, resume: bool) -> None:
    from ray.tune import Tuner

    check_new_or_resume(path, Tuner.can_restore(path), resume, "sweep", "a sweep", "the interrupted sweep")


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
        param_space={p.key: search_domain(p) for p in params},
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
            shown = f"{value:.4f}" if is_finite(value) else "-"
            print(f"[tune] trial {trial.trial_id} epoch {result.get('epoch')}/{epochs}: {metric}={shown} "
                  f"loss={result.get('loss', float('nan')):.4f}", flush=True)

        def on_trial_complete(self, iteration, trials, trial, **info):
            epoch = (trial.last_result or {}).get("epoch", 0)
            how = "completed" if epoch >= epochs else f"stopped early by the scheduler after epoch {epoch}"
            print(f"[tune] trial {trial.trial_id} {how}", flush=True)

        def on_trial_error(self, iteration, trials, trial, **info):
            print(f"[tune] trial {trial.trial_id} failed; see {trial.path}/error.txt", flush=True)

    return Progress()


def collect_trials(grid: "ResultGrid", config: Config, params: tuple[Param, ...]) -> list[TrialRecord]:
    """Each trial of the finished (or interrupted) sweep, as Tune and its Train run folder recorded it."""
    # Tune's own trial states tell an ended trial from one an interrupted sweep left running or pending; the
    # ResultGrid has no public view of them.
    states = {t.trial_id: t.status for t in getattr(getattr(grid, "_experiment_analysis", None), "trials", [])}
    records = []
    for result in grid:
        trial_id = Path(result.path).name.removeprefix("trial_")
        _, run_dir = run_location(config.replace(**trial_paths(config, trial_id)))
        error = str(result.error).strip().splitlines()[-1][:200] if result.error is not None else ""
        records.append(TrialRecord.from_run(trial_id, decoded_point(params, result.config or {}), run_dir,
                                            states.get(trial_id, "TERMINATED"), error, config.train.epochs))
    return records


def run_tune(config: Config, tc: TuneConfig, resume: bool = False, log: Callable[[str], None] = print) -> dict:
    """Run (or resume) the sweep on the current Ray cluster. Returns {"best": best/summary.json's content,
    "trials": rows of trials.csv, "table": the printed table, "experiment": Tune's folder}."""
    import ray
    from ray import tune

    from raysparse.ray_data import prepare_for_ray  # imports ray
    from raysparse.ray_placement import start_releaser, stop_releaser  # imports ray

    t0 = time.perf_counter()
    config = absolute_paths(config)
    params = check_tune(config, tc)
    check_static(config)
    for p in params:  # every option's DeepSpeed config (train.lr etc. feed it)
        for value in p.config_values():
            deepspeed_config(config.replace(**{p.key: value}), config.ray.num_workers)
    out = Path(config.output)
    cache_dir = shared_cache_dir(config)
    sweep = sweep_record(config, tc, params)
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
    if prepared.item_text_note:
        log(prepared.item_text_note)
    warm_text_cache(config, params, prepared, cache_dir, log)
    dataset, n_examples = training_dataset(config, prepared)
    out.mkdir(parents=True, exist_ok=True)
    (out / SWEEP_JSON).write_text(json.dumps(sweep, indent=2))

    releaser = start_releaser()
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
        released = stop_releaser(releaser, 60.0)
    if released:
        log(f"released {released} placement group(s) of Train runs whose trial Tune ended")

    result = finish_sweep(collect_trials(grid, config, params), params, tc, config, prepared, sweep, log)
    log(f"sweep done in {time.perf_counter() - t0:.0f} s")
    return result
