"""`raysparse bench accuracy` end to end on a small planted dataset: the rows it reports are the models' own
numbers, later seeds reuse the first seed's tuned hyper-parameters, and --jobs 2 reports what --jobs 1 does."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest

from conftest import planted_frames


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    folder = tmp_path_factory.mktemp("planted")
    interactions, items = planted_frames(n_users=160, n_items=40)
    interactions.to_parquet(folder / "interactions.parquet")
    items.to_parquet(folder / "items.parquet")
    return folder


def bench(dataset, out, *extra: str) -> dict:
    from raysparse.cli import main

    code = main(["bench", "accuracy", "--data", str(dataset), "--seeds", "2", "--fast", "--trainer", "local",
                 "--baselines", "popularity,ease", "--variants", "dmf", "--out", str(out),
                 "--set", "model.attention_dim=16", "--set", "model.residual_hidden_dim=16",
                 "--set", "model.dmf_user_layers=[16]", "--set", "model.dmf_item_layers=[16]",
                 *(extra if "--our-grid" in extra else ("--our-grid", "", *extra))])
    assert code == 0
    return json.loads((out / "accuracy.json").read_text())


def test_rows_are_the_models_own_numbers_and_jobs_do_not_change_them(dataset, tmp_path):
    from raysparse.bench.baselines import Popularity
    from raysparse.build import prepare_data
    from raysparse.config import load_config
    from raysparse.bench.accuracy import ACCURACY_CONFIG, user_ndcg
    from raysparse.bench.common import load_frames
    from raysparse.metrics import evaluate, flatten

    serial = bench(dataset, tmp_path / "serial")
    parallel = bench(dataset, tmp_path / "parallel", "--jobs", "2")
    for result in (serial, parallel):
        assert [sorted(rows) for rows in result["per_seed"]] == [["ease", "ours:dmf", "popularity"]] * 2
        # the second seed reuses the EASE lambda the first seed chose on its validation split
        assert result["per_seed"][1]["ease"]["params"] == result["per_seed"][0]["ease"]["params"]
        assert (tmp_path / "serial" / "accuracy.md").exists() and (tmp_path / "serial" / "accuracy.png").exists()
    for seed in (0, 1):
        # popularity on this seed's split, computed here from scratch (the cohort draw depends on the seed)
        config = load_config(str(ACCURACY_CONFIG), [f"data.path={dataset}", f"data.split_seed={seed}"])
        split = prepare_data(config, load_frames(str(dataset))).split
        expected = flatten(evaluate(Popularity().fit(split).score, split, "test"), "test/")
        for result in (serial, parallel):
            got = result["per_seed"][seed]["popularity"]["test"]
            assert got["test/overall/ndcg@10"] == pytest.approx(expected["test/overall/ndcg@10"])
            assert got["test/cohort/hr@10"] == pytest.approx(expected["test/cohort/hr@10"])
        # deterministic rows agree across --jobs; ours ran its one epoch on each seed
        for row in ("popularity", "ease"):
            a, b = serial["per_seed"][seed][row], parallel["per_seed"][seed][row]
            assert a["params"] == b["params"]
            np.testing.assert_allclose([a["test"][k] for k in sorted(a["test"])],
                                       [b["test"][k] for k in sorted(a["test"])], rtol=1e-6)
        for result in (serial, parallel):
            assert result["per_seed"][seed]["ours:dmf"]["best_epoch"] == 1
            # each row's per-user test ranks (for the paired intervals) are the ranks its metrics came from
            for row in result["per_seed"][seed].values():
                assert len(row["test_ranks"]) == len(split.evaluated_users)
                assert user_ndcg(row["test_ranks"]).mean() == pytest.approx(row["test"]["test/overall/ndcg@10"])


@pytest.mark.parametrize("jobs", ["1", "2"])
def test_our_grid_is_chosen_on_the_first_seeds_validation_and_used_by_every_row(dataset, tmp_path, jobs):
    result = bench(dataset, tmp_path / "grid", "--variants", "ids,fused", "--baselines", "",
                   "--our-grid", "model.dropout=0.0|0.5", "--jobs", jobs)
    choice = result["our_choice"]
    grid = choice["grid"]
    assert list(grid) == ["ours:fused[model.dropout=0.0]", "ours:fused[model.dropout=0.5]"]
    best = max(grid, key=grid.get)                      # ties keep the first point, as max does
    assert choice["chosen"] == [best[len("ours:fused["):-1]]
    # the first seed's fused row is that grid fit itself; every row of ours on every seed uses the choice
    assert result["per_seed"][0]["ours:fused"]["val"]["val/overall/ndcg@10"] == grid[best]
    for rows in result["per_seed"]:
        assert sorted(rows) == ["ours:fused", "ours:ids"]
        for row in rows.values():
            assert row["overrides"][-1] == choice["chosen"][0]
    from raysparse.bench.accuracy import parse_grid
    from raysparse.errors import UserError

    assert parse_grid("a.b=1|2,c.d=x") == [["a.b=1", "c.d=x"], ["a.b=2", "c.d=x"]] and parse_grid("") == [[]]
    with pytest.raises(UserError, match="must look like KEY=V1|V2"):
        parse_grid("model.dropout")


def test_later_seeds_baselines_go_to_a_free_process_before_our_fits_queued_earlier():
    from raysparse.bench.accuracy import baselines_first
    waiting = [("ours", 0, "ids"), ("ours", 1, "fused"), ("baselines", 1, {}), ("ours", 2, "ids"), ("baselines", 2, {})]
    assert baselines_first(waiting) == [("baselines", 1, {}), ("baselines", 2, {}), ("ours", 0, "ids"),
                                        ("ours", 1, "fused"), ("ours", 2, "ids")]


def test_bad_jobs_or_seeds_and_parallel_jobs_with_the_ray_trainer_are_refused_with_the_fix(dataset, tmp_path):
    from raysparse.bench.accuracy import register_bench
    from raysparse.errors import UserError
    import argparse

    parser = argparse.ArgumentParser()
    register_bench(parser.add_subparsers())
    args = parser.parse_args(["accuracy", "--data", str(dataset), "--jobs", "2", "--trainer", "ray",
                              "--out", str(tmp_path)])
    with pytest.raises(UserError, match="use --jobs 1 with --trainer ray"):
        args.func(args)
    args = parser.parse_args(["accuracy", "--data", str(dataset), "--jobs", "0", "--out", str(tmp_path)])
    with pytest.raises(UserError, match="1 or more"):
        args.func(args)
    args = parser.parse_args(["accuracy", "--data", str(dataset), "--seeds", "0", "--out", str(tmp_path)])
    with pytest.raises(UserError, match=r"--seeds 0: .* 1 or more"):
        args.func(args)



def test_a_bad_ablation_key_fails_before_any_fit(dataset, tmp_path, capsys):
    """The last row's override is checked up front: no baseline or model is fitted for a run that would fail."""
    from raysparse.bench.accuracy import register_bench
    from raysparse.errors import ConfigError
    import argparse

    parser = argparse.ArgumentParser()
    register_bench(parser.add_subparsers())
    args = parser.parse_args(["accuracy", "--data", str(dataset), "--trainer", "local", "--fast", "--seeds", "1",
                              "--ablation", "typo:model.dropuot=0.2", "--out", str(tmp_path / "bad")])
    with pytest.raises(ConfigError, match="Unknown config key 'model.dropuot'"):
        args.func(args)
    printed = capsys.readouterr().out
    assert "test ndcg@10" not in printed and "training" not in printed
    assert not (tmp_path / "bad" / "accuracy.json").exists()


def test_paired_bootstrap_known_answers():
    """Ratios and differences of per-user NDCG@10 with known values: rank 1 scores 1, rank 3 scores 0.5."""
    from raysparse.bench.accuracy import paired_bootstrap

    cohort_k = [0, 0, 0, 1, 2, 3]
    same = [{"ours:fused": {"test_ranks": [1, 5, 30, 2, 1, 9], "test_cohort_k": cohort_k},
             "sasrec": {"test_ranks": [1, 5, 30, 2, 1, 9]}}] * 2
    tie = paired_bootstrap(same, "ours:fused", "sasrec", "overall")
    assert (tie["ratio"], tie["ratio_lo"], tie["ratio_hi"], tie["diff"]) == (1.0, 1.0, 1.0, 0.0)
    assert tie["users"] == 12
    # ours ranks each cohort user's item first, SASRec third: 2x on the cohort whatever the resample;
    # on warm users SASRec is first and ours out of the top 10
    split = [{"ours:fused": {"test_ranks": [50, 50, 50, 1, 1, 1], "test_cohort_k": cohort_k},
              "sasrec": {"test_ranks": [1, 1, 1, 3, 3, 3]}}]
    cohort = paired_bootstrap(split, "ours:fused", "sasrec", "cohort")
    assert cohort["ratio"] == pytest.approx(2.0) and cohort["ratio_lo"] == pytest.approx(2.0)
    assert cohort["diff"] == pytest.approx(0.5) and cohort["users"] == 3
    warm = paired_bootstrap(split, "ours:fused", "sasrec", "warm")
    assert warm["ratio"] == 0.0 and warm["diff"] == pytest.approx(-1.0)
    overall = paired_bootstrap(split, "ours:fused", "sasrec", "overall")
    assert overall["ratio"] == pytest.approx(3 / 4.5)     # (3 x 1) / (3 x 1 + 3 x 0.5)
    # noisy ranks: the interval holds the point estimate
    rng = np.random.default_rng(0)
    noisy = [{"ours:fused": {"test_ranks": rng.integers(1, 30, 200).tolist(), "test_cohort_k": [0] * 200},
              "sasrec": {"test_ranks": rng.integers(1, 30, 200).tolist()}} for _ in range(3)]
    result = paired_bootstrap(noisy, "ours:fused", "sasrec", "overall")
    assert result["ratio_lo"] < result["ratio"] < result["ratio_hi"]
    assert result["diff_lo"] < result["diff"] < result["diff_hi"]
    assert paired_bootstrap([{"ours:fused": {}, "sasrec": {}}], "ours:fused", "sasrec", "overall") is None


def test_text_prior_line_names_each_rows_choice_per_seed_and_skips_rows_that_never_chose_one():
    from raysparse.bench.accuracy import text_prior_line

    per_seed = [{"ours:fused": {"text_prior": [0.5, 8.0, "max"]}, "ours:ids": {"text_prior": [0.0, 0.0, "mean"]},
                 "sasrec": {}},
                {"ours:fused": {"text_prior": [0.0, 0.0, "mean"]}, "ours:ids": {"text_prior": [0.0, 0.0, "mean"]},
                 "sasrec": {}},
                {"ours:fused": {"text_prior": [1.0, 2.0]}, "sasrec": {}}]           # a run before the form
    assert text_prior_line(per_seed) == ("\n\nText prior chosen on each seed's validation (text_prior/"
                                         "text_prior_items form): Fused: ids + text + DMF (ours): 0.5/8 max, 0/0, 1/2")
    assert text_prior_line([{"ours:ids": {"text_prior": [0.0, 0.0]}}]) == ""


def _parsed(*argv: str):
    import argparse

    from raysparse.bench.accuracy import register_bench

    parser = argparse.ArgumentParser()
    register_bench(parser.add_subparsers())
    return parser.parse_args(["accuracy", *argv])


def test_planned_fits_count_the_runs_fits():
    """Known answers: the default run on 3 seeds fits ours 4 rows x 3 seeds + the second grid point (the first
    seed's fused row is the chosen grid fit itself) = 13 times, and SASRec at its 2 grid points on the first
    seed + once on each later seed = 4 times."""
    from raysparse.bench.accuracy import planned_fits

    assert planned_fits(_parsed("--seeds", "3")) == (13, 4)
    assert planned_fits(_parsed("--seeds", "3", "--our-grid", "")) == (12, 4)
    # no fused row to reuse a grid fit for: both grid fits come on top of the ids row's 2 seeds
    assert planned_fits(_parsed("--seeds", "2", "--variants", "ids", "--baselines", "ease")) == (4, 0)
    assert planned_fits(_parsed("--seeds", "1", "--variants", "fused", "--ablation", "x:model.dropout=0.1",
                                "--our-grid", "model.dropout=0.3|0.5|0.7")) == (4, 2)


def test_a_resumed_runs_estimate_counts_only_the_fits_left():
    """Known answers on the default 3-seed run (13 fits of ours, 4 of SASRec): a finished grid fit and a later
    seed's ids row are 2 of ours; seed 0's baselines hold SASRec's 2 grid fits and seed 1's one more; a job of a
    seed or row this run does not plan, and the seed-0 fused row (the grid's own fit), count for nothing."""
    from raysparse.bench.accuracy import BASELINE_NAMES, fits_left

    baselines = {"baselines": BASELINE_NAMES, "reused": {}}
    finished = [("ours", 0, ["ours:fused[model.dropout=0.3]", ["model.variant=fused", "model.dropout=0.3"]]),
                ("ours", 1, ["ours:ids", ["model.variant=ids", "model.dropout=0.5"]]),
                ("baselines", 0, baselines), ("baselines", 1, baselines),
                ("ours", 0, ["ours:fused", ["model.variant=fused", "model.dropout=0.5"]]),
                ("ours", 5, ["ours:ids", ["model.variant=ids", "model.dropout=0.5"]]),
                ("ours", 0, ["ours:other", ["model.dropout=0.1"]])]
    assert fits_left(_parsed("--seeds", "3"), []) == (13, 4)
    assert fits_left(_parsed("--seeds", "3"), finished) == (11, 1)
    no_sasrec = {"baselines": ["ease"], "reused": {}}
    assert fits_left(_parsed("--seeds", "3"), [("baselines", 0, no_sasrec)]) == (13, 4)


def test_a_grid_runs_the_fits_planned_fits_counts(dataset, tmp_path, capfd):
    from raysparse.bench.accuracy import planned_fits

    argv = ["--variants", "ids,fused", "--baselines", "", "--our-grid", "model.dropout=0.0|0.5"]
    bench(dataset, tmp_path / "count", *argv)
    trained = [line for line in capfd.readouterr().out.splitlines() if ": training ours:" in line]
    assert len(trained) == planned_fits(_parsed("--seeds", "2", *argv))[0] == 5


def test_the_time_estimate_times_real_steps_and_counts_an_epochs_targets(dataset, tmp_path):
    """The estimate's epoch is the epoch training runs: as many steps, and the targets counted batch by batch
    over a whole epoch; its fit is that epoch's measured cost times the configured epochs."""
    import numpy as np

    from raysparse.bench.accuracy import _PREPARED, estimate_line, prepared_seed, seed_config, time_estimate
    from raysparse.local import build_recommender

    args = _parsed("--data", str(dataset), "--seeds", "2", "--trainer", "local", "--baselines", "ease,sasrec",
                   "--out", str(tmp_path), "--set", f"data.path={dataset}", "--set", "model.attention_dim=16",
                   "--set", "model.residual_hidden_dim=16", "--set", "model.dmf_user_layers=[16]",
                   "--set", "train.epochs=7")
    _PREPARED.clear()
    est = time_estimate(args)
    config = seed_config(args, 0, ["model.variant=fused", "model.dropout=0.3"])
    builder = build_recommender(config, prepared_seed(args, 0)[1]).builder
    batches = list(builder.iterate_epoch(config.train.batch_size_per_worker, np.random.default_rng(0),
                                         config.train.example_mode))
    assert est["steps"] == len(batches) and est["targets"] == sum(len(b["target_pos"]) for b in batches)
    assert est["epochs"] == 7
    assert est["fit_seconds"] == pytest.approx(7 * (est["epoch_seconds"] + est["validation_seconds"]))
    assert 3 <= est["timed_steps"] <= 50 and est["epoch_seconds"] > 0
    assert (est["ours_fits"], est["sasrec_fits"]) == (4 * 2 + 1, 2 + 1)
    assert est["minutes"] == pytest.approx((9 + 3) * est["fit_seconds"] / 60)
    assert f"~{est['minutes']:.0f} min" in estimate_line(est, 1)
    _PREPARED.clear()


# ---- a stopped run goes on where it stopped (--fresh: it does not) ---------------------------------------------
RESUME_ARGV = ["--variants", "ids,fused", "--baselines", "popularity,ease", "--our-grid", "model.dropout=0.0|0.5"]


def _bench_seeds(dataset, out, seeds: str, *extra: str) -> dict:
    from raysparse.cli import main

    code = main(["bench", "accuracy", "--data", str(dataset), "--seeds", seeds, "--fast", "--trainer", "local",
                 "--out", str(out), "--set", "model.attention_dim=16", "--set", "model.residual_hidden_dim=16",
                 "--set", "model.dmf_user_layers=[16]", "--set", "model.dmf_item_layers=[16]", *RESUME_ARGV, *extra])
    assert code == 0
    return json.loads((out / "accuracy.json").read_text())


def _rows(result: dict) -> list[dict]:
    """Every number a run reports per seed and row, without the fields that time it."""
    return [{row: {k: v for k, v in fields.items() if k not in ("seconds", "fit_seconds")}
             for row, fields in rows.items()} for rows in result["per_seed"]]


@pytest.mark.parametrize("jobs", ["1", "2"])
def test_resume_runs_only_the_jobs_left_and_reports_what_one_run_does(dataset, tmp_path, capfd, jobs):
    """A 2-seed run whose seed-1 ids fit never finished (its saved file removed, as a killed run leaves it):
    the same command trains that one fit alone and reports every number the whole run reported. Known counts: the run
    has 2 baseline jobs + 2 grid fits + ids on seed 0 + ids and fused on seed 1 = 7 jobs."""
    out = tmp_path / "run"
    whole = _bench_seeds(dataset, out, "2", "--jobs", jobs)
    saved = sorted((out / "finished").glob("*.json"))
    assert len(saved) == 7
    capfd.readouterr()
    killed = [p for p in saved if p.name.startswith("ours-seed1-")
              and json.loads(p.read_text())["identity"]["payload"][0] == "ours:ids"]
    assert len(killed) == 1
    killed[0].unlink()
    resumed = _bench_seeds(dataset, out, "2", "--jobs", jobs)
    printed = capfd.readouterr().out
    assert [line for line in printed.splitlines() if ": training ours:" in line] == ["  seed 1: training ours:ids ..."]
    assert "resuming: 6 finished job(s)" in printed
    assert printed.count("[finished in an earlier run]") == 2 * 2 + 4   # 2 baseline rows a seed + 4 fits
    assert _rows(resumed) == _rows(whole)
    assert resumed["our_choice"] == whole["our_choice"]
    assert "6 job(s) finished in an earlier run and reused" in (out / "accuracy.md").read_text()


def test_more_seeds_reuse_the_first_seeds_jobs_and_changed_settings_reuse_nothing(dataset, tmp_path, capfd):
    out = tmp_path / "run"
    one = _bench_seeds(dataset, out, "1")
    capfd.readouterr()
    two = _bench_seeds(dataset, out, "2")
    printed = capfd.readouterr().out
    trained = [line.strip() for line in printed.splitlines() if ": training ours:" in line]
    assert trained == ["seed 1: training ours:ids ...", "seed 1: training ours:fused ..."]
    assert _rows(two)[0] == _rows(one)[0]
    # another --set is another run: its jobs are not reused; with --fresh the run says what it did not reuse
    changed = _bench_seeds(dataset, out, "1", "--set", "model.text_prior=0.5")
    printed = capfd.readouterr().out
    assert "resuming" not in printed and "[finished in an earlier run" not in printed
    assert len([line for line in printed.splitlines() if ": training ours:" in line]) == 3
    assert changed["per_seed"][0]["popularity"]["test"] == one["per_seed"][0]["popularity"]["test"]
    _bench_seeds(dataset, out, "1", "--fresh")
    printed = capfd.readouterr().out
    # 7 saved jobs: seed 0's baselines, 2 grid fits and ids row; seed 1's baselines, ids and fused rows
    assert "--fresh: the 7 finished job(s)" in printed and "every job runs again" in printed
    assert len([line for line in printed.splitlines() if ": training ours:" in line]) == 3


def test_an_unreadable_saved_job_runs_again_and_says_why(dataset, tmp_path, capfd):
    out = tmp_path / "run"
    whole = _bench_seeds(dataset, out, "1", "--our-grid", "", "--variants", "ids")
    saved = sorted((out / "finished").glob("ours-*.json"))
    assert len(saved) == 1
    saved[0].write_text('{"identity": ')                 # cut short, as a full disk leaves a file
    capfd.readouterr()
    again = _bench_seeds(dataset, out, "1", "--our-grid", "", "--variants", "ids")
    printed = capfd.readouterr().out
    assert f"{saved[0]}: unreadable" in printed and "running this job again" in printed
    assert [line for line in printed.splitlines() if ": training ours:" in line] == ["  seed 0: training ours:ids ..."]
    assert _rows(again) == _rows(whole)
    assert json.loads(saved[0].read_text())["result"]["ours:ids"]["val"] == whole["per_seed"][0]["ours:ids"]["val"]


def test_finished_jobs_fingerprint_names_the_code_config_data_and_flags(tmp_path):
    """Known answers: a changed source file, config, data file or flag gives another fingerprint; the same
    inputs give the same one; a stored result comes back only when resuming and only for its own job."""
    from raysparse.bench.finished_jobs import FinishedJobs, folder_listing, run_fingerprint, source_digest

    package = tmp_path / "pkg"
    package.mkdir()
    (package / "a.py").write_text("x = 1\n")
    before = source_digest(package)
    (package / "a.py").write_text("x = 2\n")
    assert source_digest(package) != before
    data = tmp_path / "data"
    data.mkdir()
    (data / "ratings.csv").write_text("u,i\n1,2\n")
    listing = folder_listing(data)
    assert [row[:2] for row in listing] == [["ratings.csv", 8]]
    (data / "ratings.csv").write_text("u,i\n1,2\n3,4\n")
    assert folder_listing(data) != listing
    config = tmp_path / "c.yaml"
    config.write_text("model: {}\n")
    base = run_fingerprint(str(config), ["a=1"], str(data), False, "local", 1)
    assert run_fingerprint(str(config), ["a=1"], str(data), False, "local", 1) == base
    assert run_fingerprint(str(config), ["a=2"], str(data), False, "local", 1) != base
    assert run_fingerprint(str(config), ["a=1"], str(data), False, "local", 2) != base
    config.write_text("model: {dropout: 0.5}\n")
    assert run_fingerprint(str(config), ["a=1"], str(data), False, "local", 1) != base
    config.write_text("model: {}\n")
    encoder = tmp_path / "encoder"
    encoder.mkdir()
    (encoder / "config.json").write_text("{}")
    with_encoder = run_fingerprint(str(config), ["a=1"], str(data), False, "local", 1, str(encoder))
    assert with_encoder != base and with_encoder["text_model"][0][:2] == ["config.json", 2]
    assert set(base["libraries"]) >= {"python", "torch", "numpy", "transformers", "implicit"}

    store = FinishedJobs(tmp_path / "finished", base, resume=True)
    store.put("ours", 0, ["ours:ids", ["model.variant=ids"]], {"ours:ids": {"val": 0.25}})
    assert store.get("ours", 0, ("ours:ids", ["model.variant=ids"])) == {"ours:ids": {"val": 0.25}}
    assert store.get("ours", 1, ["ours:ids", ["model.variant=ids"]]) is None
    assert store.get("ours", 0, ["ours:ids", ["model.variant=ids", "model.dropout=0.5"]]) is None
    assert FinishedJobs(tmp_path / "finished", base, resume=False).get("ours", 0, ["ours:ids",
                                                                                   ["model.variant=ids"]]) is None
    other = dict(base, sets=["a=2"])
    assert FinishedJobs(tmp_path / "finished", other, resume=True).get("ours", 0, ["ours:ids",
                                                                                   ["model.variant=ids"]]) is None
    # numpy numbers come back as Python's; a result JSON cannot hold is reported, and the run goes on
    store.put("ours", 2, ["ours:ids", []], {"ndcg": np.float32(0.5), "ranks": np.arange(3)})
    assert store.get("ours", 2, ["ours:ids", []]) == {"ndcg": 0.5, "ranks": [0, 1, 2]}
    store.put("ours", 3, ["ours:ids", []], {"model": object()})
    assert store.get("ours", 3, ["ours:ids", []]) is None
    store.path("ours", 4, ["ours:ids", []]).write_text("[1, 2]")          # valid JSON, not a saved job
    assert store.get("ours", 4, ["ours:ids", []]) is None
    # what a resumed run finds: the two saved jobs, not the one that could not be saved nor the foreign file
    assert sorted(store.matching(), key=str) == [("ours", 0, ["ours:ids", ["model.variant=ids"]]),
                                                 ("ours", 2, ["ours:ids", []])]
    assert not list((tmp_path / "finished").glob("*.partial"))


def test_a_failed_fit_stops_the_run_after_the_running_jobs_are_saved(dataset, tmp_path, capfd):
    """With --jobs 2 a fit that fails mid-run (its text model folder is there but its config.json is cut short:
    the config is valid, the build is not) stops the run, but the jobs that finished are saved; the same command
    with the row mended trains nothing again."""
    broken = tmp_path / "broken-model"
    broken.mkdir()
    (broken / "config.json").write_text('{"model_type": ')
    out = tmp_path / "run"
    argv = ["--variants", "ids", "--our-grid", "", "--jobs", "2"]
    with pytest.raises(Exception):
        _bench_seeds(dataset, out, "1", *argv, "--ablation", f"broken:model.text_model={broken}")
    assert "a job failed (ours, seed 0)" in capfd.readouterr().out
    saved = sorted(p.name.split("-seed")[0] for p in (out / "finished").glob("*.json"))
    assert saved == ["baselines", "ours"]
    capfd.readouterr()
    _bench_seeds(dataset, out, "1", *argv)
    printed = capfd.readouterr().out
    assert ": training ours:" not in printed and "resuming: 2 finished job(s)" in printed


def test_a_text_model_folder_that_is_not_there_is_refused_before_any_fit(dataset, tmp_path, capfd):
    """A mistyped folder used to reach Hugging Face as a hub id ("Repo id must be in the form ..."); it is
    refused up front, naming the setting and the fix, and a folder without config.json likewise."""
    from raysparse.errors import ConfigError
    from raysparse.model.text import resolve_text_model

    from raysparse.cli import main

    code = main(["bench", "accuracy", "--data", str(dataset), "--seeds", "1", "--fast", "--trainer", "local",
                 "--out", str(tmp_path / "run"), "--ablation", f"typo:model.text_model={tmp_path / 'no-model'}"])
    printed = capfd.readouterr()
    assert code == 2 and ": training" not in printed.out and "finished job" not in printed.out
    assert re.search(r"error: model.text_model='.*no-model': that folder does not exist\. Give a Hugging Face "
                     r"encoder folder", printed.err)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="that folder has no config.json"):
        resolve_text_model(str(tmp_path / "empty"))
    assert resolve_text_model("sentence-transformers/all-MiniLM-L6-v2") == "sentence-transformers/all-MiniLM-L6-v2"
