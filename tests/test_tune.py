"""Hyperparameter sweeps (raysparse.sweep, run on Ray Tune around Ray Train by raysparse.ray_tune).

Fast tests (no Ray instance): the `tune:` section and its --set overrides (every key), the default space,
every bad search space as one ConfigError before anything starts, the Tune domains (list options, inclusive
randint), trial concurrency, and that a trial's run is read from Ray Train's record of its checkpoints.
`@pytest.mark.ray`: a 2-trial sweep on the planted data (1 worker per trial, frozen tiny BERT): trial table,
exported best artifact and its summary; the same sweep with one trial's worker SIGKILLed by its pid, ending
with exactly the uninterrupted sweep's per-trial metrics (issue 16); slow: the sweep with Optuna + ASHA, its
driver SIGKILLed once a trial's epoch-1 checkpoint is registered, then --resume.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from raysparse.cli import main
from raysparse.errors import ConfigError
from raysparse.ray_tune import run_tune, search_domain, tune_trial
from raysparse.recommender import Recommender
from raysparse.sweep import (DEFAULT_METRIC, TRIALS_CSV, Param, TuneConfig, check_tune, default_space,
                             load_tune_config, parse_space, read_train_run, trial_concurrency, tunable_keys)

ROOT = Path(__file__).resolve().parents[1]
TUNE_TINY = ROOT / "configs" / "tune_tiny.yaml"


def write_yaml(path: Path, tune: dict | None = None, **sections) -> Path:
    raw = {"output": str(path.parent / "out"), **sections}
    if tune is not None:
        raw["tune"] = tune
    path.write_text(yaml.safe_dump(raw))
    return path


# ------------------------------------------------------------------------------------------------ config

def test_tune_section_is_read_and_stripped_and_set_overrides_apply(tmp_path):
    path = write_yaml(tmp_path / "cfg.yaml", tune={"num_samples": 3, "mode": "min", "metric": "loss",
                                                   "space": {"train.lr": {"loguniform": [1e-4, 1e-2]}}},
                      model={"fusion_dim": 32})
    config, tc = load_tune_config(path, ["model.text_dim=8", "tune.num_samples=5", "tune.search=optuna",
                                         "tune.space.model.fusion_dim={choice: [8, 16]}"])
    assert config.model.fusion_dim == 32 and config.model.text_dim == 8       # the run config, tune stripped
    assert (tc.num_samples, tc.mode, tc.metric, tc.search) == (5, "min", "loss", "optuna")
    assert tc.space == {"train.lr": {"loguniform": [1e-4, 1e-2]}, "model.fusion_dim": {"choice": [8, 16]}}
    _, tc = load_tune_config(path, ["tune.space.train.lr=null"])                # null removes a key
    text, _ = load_tune_config(path, ["data.text_template={title}"])             # a string option, as written
    assert text.data.text_template == "{title}"
    assert tc.space == {}
    with pytest.raises(ConfigError, match=r"Unknown config key 'tune.num_sample'\. Did you mean num_samples\? "
                                          r"Known keys of 'tune': num_samples"):
        load_tune_config(path, ["tune.num_sample=4"])
    with pytest.raises(ConfigError, match=r"tune.space must map SECTION.KEY to a distribution"):
        load_tune_config(path, ["tune.space=5"])
    with pytest.raises(ConfigError, match=r"tune.num_samples='many' has the wrong type: expected int"):
        load_tune_config(path, ["tune.num_samples=many"])
    with pytest.raises(ConfigError, match=r"tune.scheduler='hyperband' is not allowed; choose one of 'asha', 'none'"):
        load_tune_config(path, ["tune.scheduler=hyperband"])


# One value per tune key, as --set text and as TuneConfig holds it (none of them the default).
SET_VALUES = {
    "num_samples": ("3", 3), "metric": ("loss", "loss"), "mode": ("min", "min"), "scheduler": ("none", "none"),
    "search": ("optuna", "optuna"), "max_concurrent_trials": ("2", 2), "grace_period": ("2", 2),
    "reduction_factor": ("3", 3), "seed": ("7", 7),
    "space": ("{train.lr: {uniform: [0.001, 0.01]}}", {"train.lr": {"uniform": [0.001, 0.01]}}),
}


def test_every_tune_key_takes_set_and_is_in_the_help(tmp_path, capsys):
    assert set(SET_VALUES) == {f.name for f in dataclasses.fields(TuneConfig)}      # a new key needs a row here
    path = write_yaml(tmp_path / "cfg.yaml", tune={"space": {"model.fusion_dim": {"choice": [8, 16]}}})
    for key, (text, expected) in SET_VALUES.items():
        _, tc = load_tune_config(path, [f"tune.{key}={text}"])
        assert getattr(tc, key) == expected != getattr(TuneConfig(), key), key
    with pytest.raises(SystemExit):
        main(["tune", "--help"])
    shown = capsys.readouterr().out
    for key in SET_VALUES:
        assert f"tune.{key} = " in shown
    assert "model.fusion_dim = " in shown                                          # and every run key


def test_default_space_follows_what_the_model_uses(tmp_path):
    config, tc = load_tune_config(write_yaml(tmp_path / "a.yaml", model={"finetune": "top"}))
    assert set(tc.space) == {"model.fusion_dim", "model.text_dim", "model.dmf_user_layers", "model.dmf_item_layers",
                             "train.lr", "train.text_lr", "model.finetune_top_layers"}
    assert tc.metric == DEFAULT_METRIC and tc.mode == "max" and tc.scheduler == "asha"
    frozen, _ = load_tune_config(write_yaml(tmp_path / "b.yaml", model={"finetune": "frozen"}))
    assert set(default_space(frozen)) == {"model.fusion_dim", "model.text_dim", "model.dmf_user_layers",
                                          "model.dmf_item_layers", "train.lr"}
    dmf, _ = load_tune_config(write_yaml(tmp_path / "c.yaml", model={"variant": "dmf"}))
    assert set(default_space(dmf)) == {"model.fusion_dim", "model.dmf_user_layers", "model.dmf_item_layers",
                                       "train.lr"}
    residual, _ = load_tune_config(write_yaml(tmp_path / "d.yaml", model={
        "finetune": "frozen", "history_encoder": "attention", "fusion": "residual"}))
    assert set(default_space(residual)) == {"model.dmf_user_layers", "model.dmf_item_layers", "train.lr"}
    assert len(check_tune(config, tc)) == 7                                      # the defaults are valid


@pytest.mark.parametrize("space, message", [
    ({"model.fusion_dim": {"choice": []}}, r"tune.space\['model.fusion_dim'\]: choice needs a non-empty list"),
    ({"train.lr": {"loguniform": [1e-2, 1e-4]}},
     r"tune.space\['train.lr'\]: loguniform lower bound 0.01 > upper bound 0.0001; .*lower <= upper"),
    ({"model.fusion_dimm": {"choice": [8]}},
     r"unknown parameter 'model.fusion_dimm'\. Did you mean model.fusion_dim.*Tunable keys.*train.lr"),
    ({"optimizer.lr": {"choice": [0.1]}}, r"unknown parameter 'optimizer.lr'\..*Tunable keys \(SECTION.KEY\)"),
    ({"data.max_history": {"choice": [5, 10]}}, r"unknown parameter 'data.max_history'"),
    ({"train.epochs": {"choice": [1, 2]}}, r"train.epochs cannot be tuned: it is the sweep's budget"),
    ({"train.lr": {"loguniform": [0, 1e-2]}}, r"loguniform bounds must be > 0, got lower=0"),
    ({"train.lr": {"uniform": [1e-3]}}, r"uniform needs \[lower, upper\] \(two numbers\), got \[0.001\]"),
    ({"train.lr": {"normal": [0, 1]}}, r"must be one of \{choice: \[a, b, ...\]\}"),
    ({"train.lr": 0.01}, r"tune.space\['train.lr'\]=0.01 must be one of"),
    ({"model.fusion_dim": {"choice": [64, 0]}},
     r"the choice value 0 is not a valid model.fusion_dim: model.fusion_dim=0 must be > 0"),
    ({"model.fusion_dim": {"uniform": [8, 64]}},
     r"the uniform value 8.0 is not a valid model.fusion_dim: .*wrong type: expected int"),
    ({"model.dmf_user_layers": {"choice": [[64, 32], []]}}, r"model.dmf_user_layers=\[\] must be a non-empty list"),
    ({"model.finetune": {"choice": ["top", "half"]}}, r"model.finetune='half' is not allowed"),
    ({"model.finetune_top_layers": {"randint": [0, 1.5]}}, r"randint bounds must be integers"),
    ({}, r"tune.space is empty: there is nothing to search"),
])
def test_bad_search_space_is_one_clear_error(tmp_path, space, message):
    config, _ = load_tune_config(write_yaml(tmp_path / "cfg.yaml"))
    with pytest.raises(ConfigError, match=message):
        parse_space(space, config)


def test_bad_sweep_fails_before_ray_or_any_trial_starts(tmp_path, capsys):
    """Through the CLI: one error line, exit 2, no Ray started, nothing written."""
    import ray

    path = write_yaml(tmp_path / "cfg.yaml", tune={"space": {"train.lr": {"uniform": [0.1, 0.01]}}})
    assert main(["tune", "--config", str(path), "--num-samples", "2"]) == 2
    assert "error: tune.space['train.lr']: uniform lower bound 0.1 > upper bound 0.01" in capsys.readouterr().err
    path = write_yaml(tmp_path / "cfg.yaml", tune={"grace_period": 3}, train={"epochs": 2})
    assert main(["tune", "--config", str(path)]) == 2
    assert "tune.grace_period=3 > train.epochs=2" in capsys.readouterr().err
    assert main(["tune", "--config", str(path), "--set", "tune.grace_period=1", "--resume"]) == 2
    assert "--resume: there is no sweep to continue" in capsys.readouterr().err
    assert not ray.is_initialized()
    assert not (tmp_path / "out").exists()


def test_list_options_and_inclusive_randint_become_tune_domains(tmp_path):
    layers = Param("model.dmf_user_layers", "choice", ([64, 32], [128, 64]))
    assert layers.encoded                                          # Optuna's categoricals take scalars only
    assert search_domain(layers).categories == ["[64, 32]", "[128, 64]"]
    assert layers.decode("[128, 64]") == [128, 64]
    depth = Param("model.finetune_top_layers", "randint", (0, 2))
    domain = search_domain(depth)
    assert (domain.lower, domain.upper) == (0, 3)                  # Tune's upper bound is exclusive
    draws = {domain.sample(random_state=np.random.default_rng(i)) for i in range(60)}
    assert draws == {0, 1, 2}
    assert not Param("model.fusion_dim", "choice", (8, 16)).encoded


def test_trial_concurrency_fits_the_cluster(tmp_path):
    config, tc = load_tune_config(write_yaml(tmp_path / "cfg.yaml", ray={"num_workers": 1, "cpus_per_worker": 1}))
    assert trial_concurrency(config, tc, {"CPU": 2.0}) == 2
    assert trial_concurrency(config.replace(**{"ray.num_workers": 2}), tc, {"CPU": 2.0}) == 1
    assert trial_concurrency(config.replace(**{"ray.num_workers": 3}), tc, {"CPU": 2.0}) == 1    # at least 1
    assert trial_concurrency(config.replace(**{"ray.cpus_per_worker": 0.5}), tc, {"CPU": 2.0}) == 4
    gpu = config.replace(**{"ray.use_gpu": True, "ray.num_workers": 2})
    assert trial_concurrency(gpu, tc, {"CPU": 16.0, "GPU": 4.0}) == 2
    assert trial_concurrency(config, TuneConfig(max_concurrent_trials=1), {"CPU": 8.0}) == 1
    assert "model.fusion_dim" in tunable_keys() and "train.epochs" not in tunable_keys()


def test_a_trials_run_is_read_from_ray_trains_record_not_from_its_folders(tmp_path):
    """Issue 16: a run killed while copying epoch 2's checkpoint leaves epoch_0002/ with some files (here its
    train_state.json and artifact/format.json, not its weights) that Ray Train never recorded. The trial
    table and the best export read only the checkpoints Ray's snapshot lists: epoch 1, whose history is the
    trial's."""
    from raysparse.preflight import SNAPSHOT

    run = tmp_path / "ray" / "train"
    history = [{"epoch": 1, DEFAULT_METRIC: 0.1}, {"epoch": 2, DEFAULT_METRIC: 0.9}]
    for epoch in (1, 2):
        folder = run / f"epoch_{epoch:04d}"
        (folder / "artifact").mkdir(parents=True)
        (folder / "artifact" / "format.json").write_text("{}")
        (folder / "train_state.json").write_text(json.dumps({"epoch": epoch, "history": history[:epoch]}))
    assert read_train_run(str(run)) == ([], {})                   # nothing recorded yet: no snapshot
    recorded = {"checkpoint_dir_name": "epoch_0001", "metrics": history[0]}
    (run / SNAPSHOT).write_text(json.dumps({"checkpoint_results": [recorded], "latest_checkpoint_result": recorded}))
    assert read_train_run(str(run)) == (history[:1], {1: str(run / "epoch_0001")})


# ------------------------------------------------------------------------------------------------ on Ray


def registered_epochs(out: Path) -> dict[str, int]:
    """trial_id -> the epoch of the latest checkpoint Ray Train has registered for that trial (its run's
    checkpoint manager snapshot: what a restored run continues from)."""
    done = {}
    for snapshot in out.glob("trials/*/ray/train/checkpoint_manager_snapshot.json"):
        try:
            latest = json.loads(snapshot.read_text()).get("latest_checkpoint_result") or {}
        except (OSError, ValueError):
            continue                                               # being written
        done[snapshot.parents[2].name] = int((latest.get("metrics") or {}).get("epoch", 0))
    return done


def interrupt_sweep(ray_instance, out: Path, sets: list[str], log: Path) -> dict[str, int]:
    """`raysparse tune` in a subprocess on this test's Ray cluster, SIGKILLed by pid (as a crashed driver would
    be) as soon as Ray Train has registered any trial's epoch-1 checkpoint. Returns `registered_epochs` once
    the driver's trials are gone (their placement groups removed)."""
    cmd = [sys.executable, "-m", "raysparse.cli", "tune", "--config", str(TUNE_TINY), "--output", str(out),
           *[arg for item in sets for arg in ("--set", item)],
           "--set", f"ray.address={ray_instance.get_runtime_context().gcs_address}"]
    with open(log, "w") as stream:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=stream, stderr=subprocess.STDOUT, env=dict(os.environ))
        try:
            deadline = time.monotonic() + 300
            while not any(registered_epochs(out).values()):
                assert proc.poll() is None, f"the sweep ended before it was interrupted:\n{log.read_text()[-3000:]}"
                assert time.monotonic() < deadline, f"no trial reached epoch 1:\n{log.read_text()[-3000:]}"
                time.sleep(0.2)
        finally:
            proc.kill()
            proc.wait()
    deadline = time.monotonic() + 60                               # the driver's actors die with it
    while any(pg["state"] != "REMOVED" for pg in ray_instance.util.placement_group_table().values()):
        assert time.monotonic() < deadline, "the killed sweep's trials still hold their placement groups"
        time.sleep(0.5)
    return registered_epochs(out)


def _sweep_sets(dataset_dir: Path, encoder: str, cache: Path) -> list[str]:
    """The default suite's sweep: 2 trials (1 worker each, run at once on 2 CPUs), 3 capped epochs."""
    return [f"data.path={dataset_dir}", f"model.text_model={encoder}", f"data.cache_dir={cache}", "train.epochs=3",
            "train.max_steps_per_epoch=3", "tune.num_samples=2", "tune.scheduler=none"]


@pytest.fixture(scope="module")
def clean_sweep(ray_instance, tmp_path_factory, tiny_encoder, dataset_dir) -> tuple[Path, list[str], dict]:
    """(output, sets, run_tune's result) of the sweep that nothing interrupts, run once for the module."""
    folder = tmp_path_factory.mktemp("clean_sweep")
    sets = _sweep_sets(dataset_dir, tiny_encoder, folder / "cache")
    config, tc = load_tune_config(TUNE_TINY, [f"output={folder / 'sweep'}", *sets])
    t0 = time.monotonic()
    result = run_tune(config, tc)
    return folder / "sweep", sets, {**result, "seconds": time.monotonic() - t0}


def _epoch_results_by_point(out: Path) -> dict[str, list[dict]]:
    """Each trial's training losses and validation metrics per epoch, keyed by its point (trial ids differ
    between sweeps; the seeded search draws the same points)."""
    trials = pd.read_csv(out / TRIALS_CSV)
    results = {}
    for _, row in trials.iterrows():
        history, _ = read_train_run(str(out / "trials" / row.trial_id / "ray" / "train"))
        point = json.dumps({k: str(row[k]) for k in trials.columns if k.startswith(("model.", "train."))},
                           sort_keys=True)
        results[point] = [{k: v for k, v in r.items() if k in ("loss", "z_vs_best") or k.startswith("val/")}
                          for r in history]
    return results


@pytest.mark.ray
def test_two_trial_sweep_exports_the_best_trial(clean_sweep):
    """The sweep end to end without interruption (the default suite); the resume path is the slow test below."""
    out, _, _ = clean_sweep
    trials = pd.read_csv(out / TRIALS_CSV)
    assert len(trials) == 2 and set(trials.status) == {"completed"}
    best = Recommender.load(out / "best")
    recs = best.recommend(user_ids=["u000"], k=5)[0]
    assert len(recs) == 5
    summary = json.loads((out / "best" / "summary.json").read_text())
    top = trials.iloc[0]
    assert summary["trial_id"] == top.trial_id
    assert summary["value"] == summary["metrics"][DEFAULT_METRIC] == max(trials[f"best_{DEFAULT_METRIC}"])
    assert best.config.model.fusion_dim == summary["params"]["model.fusion_dim"] == top["model.fusion_dim"]


def _kill_a_trials_worker(out: Path, epochs: int, killed: dict, done) -> None:
    """From outside the sweep: once any trial's Ray Train run has recorded a checkpoint and its rank 0 has not
    logged the last epoch, SIGKILL that trial's worker by the pid it logged in <trial>/logs/workers.jsonl."""
    import signal

    while not done.is_set():
        for trial_id, recorded in registered_epochs(out).items():
            logs = out / "trials" / trial_id / "logs"
            try:
                logged = len((logs / "metrics.jsonl").read_text().splitlines())
                pid = json.loads((logs / "workers.jsonl").read_text().splitlines()[0])["workers"][0]["pid"]
            except (OSError, ValueError, IndexError, KeyError):
                continue
            if recorded >= 1 and logged < epochs:
                os.kill(pid, signal.SIGKILL)
                killed.update(trial_id=trial_id, pid=pid, after_epoch=recorded, at=time.monotonic())
                return
        time.sleep(0.05)


@pytest.mark.ray
def test_a_sweep_whose_trial_loses_its_worker_finishes_with_the_uninterrupted_results(
        clean_sweep, ray_instance, tmp_path):
    """Issue 16, Tune under faults: the same sweep as `clean_sweep`; the test SIGKILLs one trial's worker by
    its pid once that trial's Ray Train run has recorded epoch 1. The trial's Train run (ray.max_failures=1 in
    configs/tune_tiny.yaml) starts a new worker that restores the recorded checkpoint, so Tune never sees the
    trial fail: both trials complete, the killed one restored once, and every trial's losses and validation
    metrics equal those of the same point in the uninterrupted sweep exactly (one worker per trial, seeded
    data order and draws: see tests/test_ray_train.py). <output>/best loads and is the same trial's point."""
    from faults import running_beside

    clean_out, sets, clean = clean_sweep
    out = tmp_path / "sweep"
    config, tc = load_tune_config(TUNE_TINY, [f"output={out}", *sets])
    epochs = config.train.epochs
    killed: dict = {}
    t0 = time.monotonic()
    with running_beside(_kill_a_trials_worker, out, epochs, killed):
        result = run_tune(config, tc)
    end = time.monotonic()
    assert killed, "no trial's worker was killed: the trials ended before one recorded a checkpoint"
    trials = pd.read_csv(out / TRIALS_CSV)
    assert len(trials) == 2 and set(trials.status) == {"completed"}
    history, _ = read_train_run(str(out / "trials" / killed["trial_id"] / "ray" / "train"))
    k = killed["after_epoch"]
    assert [r.get("restored_from_epoch") for r in history] == [None] * k + [k] * (epochs - k)
    groups = [json.loads(line) for line in
              (out / "trials" / killed["trial_id"] / "logs" / "workers.jsonl").read_text().splitlines()]
    assert [g["first_epoch"] for g in groups] == [1, k + 1] and killed["pid"] == groups[0]["workers"][0]["pid"]
    faulted, uninterrupted = _epoch_results_by_point(out), _epoch_results_by_point(clean_out)
    diff = max(abs(a[key] - b[key]) for p in faulted for a, b in zip(faulted[p], uninterrupted[p]) for key in a)
    print(f"RELIABILITY tune-worker-kill after_epoch={k} kill_to_end_s={end - killed['at']:.1f} "
          f"sweep_s={end - t0:.1f} uninterrupted_sweep_s={clean['seconds']:.1f} max_diff={diff!r}")
    assert faulted == uninterrupted
    best = json.loads((out / "best" / "summary.json").read_text())
    assert best["params"] == clean["best"]["params"] and best["value"] == clean["best"]["value"]
    assert len(Recommender.load(out / "best").recommend(user_ids=["u000"], k=5)[0]) == 5
    assert result["best"]["trial_id"] == best["trial_id"]


# Slow (two sweeps' worth of trials: the interrupted one and its resume): it runs in `make test-all`.
@pytest.mark.ray
@pytest.mark.slow
def test_interrupted_two_trial_sweep_resumes_and_exports_the_best_trial(ray_instance, tmp_path, tiny_encoder,
                                                                       dataset_dir):
    from ray import tune

    cache = tmp_path / "cache"
    out = tmp_path / "sweep"
    # Four whole epochs: after its first (slow: start-up) epoch a trial has seconds of training left, so the
    # trial seen at epoch 1 is still running when the killed driver's actors die (capped 3-step epochs after
    # the first took 0.1 s: a trial could finish between the kill and its actors' end).
    epochs = 4
    sets = [f"data.path={dataset_dir}", f"model.text_model={tiny_encoder}", f"data.cache_dir={cache}",
            f"train.epochs={epochs}", "train.max_steps_per_epoch=0", "tune.num_samples=2", "tune.search=optuna"]
    at_kill = interrupt_sweep(ray_instance, out, sets, tmp_path / "killed.log")
    assert 1 <= max(at_kill.values()) < epochs, at_kill
    assert tune.Tuner.can_restore(out / "tune")
    assert not (out / "best").exists()

    config, tc = load_tune_config(TUNE_TINY, [f"output={out}", *sets])
    result = run_tune(config, tc, resume=True)
    # Trials that Tune ended (ASHA's stop) left no placement group holding CPUs.
    live = [pg for pg in ray_instance.util.placement_group_table().values() if pg["state"] != "REMOVED"]
    assert live == []

    # The trial table: one row per trial, config -> metrics, best first.
    trials = pd.read_csv(out / TRIALS_CSV)
    assert len(trials) == 2
    assert set(trials.status) <= {"completed", "stopped early"} and "completed" in set(trials.status)
    assert {"model.fusion_dim", "model.text_dim", "model.dmf_user_layers", "train.lr", "epochs", "best_epoch",
            f"best_{DEFAULT_METRIC}", f"final_{DEFAULT_METRIC}"} <= set(trials.columns)
    assert "fusion_dim" in result["table"] and "best_ndcg@10" in result["table"]
    # Every trial trained epochs 1.. in order: all of them when completed, fewer when ASHA stopped it (at the
    # first report at or past a rung it had not passed: a resumed trial can skip the rung's own epoch); each
    # trial that went on after the interruption continued from the checkpoint registered before it, not from
    # scratch.
    continued = []
    for _, row in trials.iterrows():
        history, _ = read_train_run(str(out / "trials" / row.trial_id / "ray" / "train"))
        trained = [r["epoch"] for r in history]
        last = epochs if row.status == "completed" else trained[-1]
        assert trained == list(range(1, last + 1)) and row.epochs == last and 1 <= last <= epochs, row
        done = at_kill.get(row.trial_id, 0)
        if 0 < done < last:
            assert history[done]["restored_from_epoch"] == done
            continued.append(row.trial_id)
    # The trial seen at epoch 1 was the first at ASHA's first rung (never stopped there) and had epochs left.
    assert continued, (at_kill, trials)

    # The exported best: loads, recommends, and its summary is the best trial's.
    best = Recommender.load(out / "best")
    recs = best.recommend(user_ids=["u000"], k=5)[0]
    assert len(recs) == 5 and str(recs[0].item_id).startswith("i")
    summary = json.loads((out / "best" / "summary.json").read_text())
    top = trials.iloc[0]
    assert summary["trial_id"] == top.trial_id
    assert summary["value"] == summary["metrics"][DEFAULT_METRIC] == top[f"best_{DEFAULT_METRIC}"]
    assert summary["value"] == max(trials[f"best_{DEFAULT_METRIC}"])
    assert summary["best_epoch"] == summary["metrics"]["epoch"] == top.best_epoch
    assert summary["config"]["model"]["fusion_dim"] == summary["params"]["model.fusion_dim"] == top["model.fusion_dim"]
    assert best.config.model.fusion_dim == summary["params"]["model.fusion_dim"]
    assert summary["source"]["checkpoint"].endswith(f"epoch_{summary['best_epoch']:04d}")
    assert summary["test"]["test/overall/users"] == 120

    # ... and equals what Tune itself recorded for that trial.
    grid = tune.Tuner.restore(result["experiment"], trainable=tune_trial).get_results()
    reported = {Path(r.path).name.removeprefix("trial_"): r.metrics_dataframe for r in grid}
    assert set(reported) == set(trials.trial_id)
    assert reported[summary["trial_id"]][DEFAULT_METRIC].max() == summary["value"]

    # Frozen text tower: the item-text embeddings were computed once, before any trial, and shared.
    cached = list(cache.glob("item_text_*.safetensors"))
    assert len(cached) == 1
    for trial_id in trials.trial_id:
        folder = out / "trials" / trial_id
        assert (folder / "cache").resolve() == cache.resolve()
        assert cached[0].stat().st_mtime < (folder / "trial.json").stat().st_mtime

    # --resume of the finished sweep exports the same best; a new sweep refuses the folder; a changed
    # config cannot resume it.
    again = run_tune(config, tc, resume=True)
    assert (again["best"]["trial_id"], again["best"]["value"]) == (summary["trial_id"], summary["value"])
    with pytest.raises(ConfigError, match="already holds a sweep. Pass --resume"):
        run_tune(config, tc)
    with pytest.raises(ConfigError, match=r"--resume: the config differs.*model.fusion_dim"):
        run_tune(config.replace(**{"model.fusion_dim": 64}), tc, resume=True)
