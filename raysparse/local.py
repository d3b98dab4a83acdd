"""Train in one process (`raysparse train --local`): prepare data, build the model, train with a plain torch
optimizer, keep the best epoch by validation NDCG@10, report test metrics, write the serving artifact."""

from __future__ import annotations

import copy
import json
import time
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd

from raysparse.build import Prepared, build_batches, build_model, prepare_data
from raysparse.config import Config
from raysparse.loop import train_local
from raysparse.metrics import evaluate_ranks, flatten, strict_json, user_ndcg
from raysparse.recommender import Recommender
from raysparse.step import SELECT_METRIC, USER_NDCG, Z_VS_BEST
from raysparse.text_prior import choose_text_prior


def item_table(prepared: Prepared) -> pd.DataFrame:
    table = prepared.items.copy()
    table["text"] = prepared.item_texts
    return table


def build_recommender(config: Config, prepared: Prepared, cache_dir: str | None = None) -> Recommender:
    """An untrained Recommender around a freshly built model (also what each Ray worker builds)."""
    model, tokenizer, item_text = build_model(config, prepared.split.n_users, prepared.split.n_items,
                                              prepared.item_texts, cache_dir)
    builder = build_batches(config, prepared.split, item_text)
    return Recommender(model, config, prepared.log.users, prepared.log.items, builder, tokenizer,
                       item_table(prepared))


def validation_metrics(rec: Recommender, prepared: Prepared, stage: str = "val", sampled: bool = False) -> dict:
    return stage_metrics(rec, prepared, stage, sampled)[0]


def stage_metrics(rec: Recommender, prepared: Prepared, stage: str = "val", sampled: bool = False
                  ) -> tuple[dict, np.ndarray]:
    """(flat metrics of `stage`, the full-ranking rank of each evaluated user's held-out item) from one scoring
    pass over the evaluated users."""
    # Eval mode once for the whole pass: toggled per scored batch, the walk over every submodule (the frozen
    # encoder's included) was a seventh of a validation pass on Amazon Scientific.
    with rec.inference():
        rec.refresh()
        result, ranks = evaluate_ranks(rec.score_users, prepared.split, stage,
                                       batch_size=rec.config.train.eval_batch_size, sampled=sampled,
                                       seed=rec.config.data.split_seed)
    return flatten(result, f"{stage}/"), ranks


def run_local(config: Config, prepared: Prepared | None = None, log: Callable[[str], None] = print,
              save: bool = True) -> tuple[Recommender, dict]:
    """Returns the best-epoch Recommender and a summary {history, best_epoch, val, test, seconds}."""
    t0 = time.perf_counter()
    prepared = prepared or prepare_data(config)
    log(f"data: {json.dumps(prepared.split.stats)}")
    if prepared.item_text_note:
        log(prepared.item_text_note)
    rec = build_recommender(config, prepared, config.data.resolved_cache_dir)
    best: dict = {"score": -1.0}

    def on_epoch(model, epoch: int) -> dict:
        metrics, ranks = stage_metrics(rec, prepared, "val")
        if metrics[SELECT_METRIC] > best["score"]:
            best.update(score=metrics[SELECT_METRIC], epoch=epoch, state=copy.deepcopy(model.state_dict()))
        return {**metrics, USER_NDCG: user_ndcg(ranks)}   # per user, for train.patience_z

    history = train_local(config, rec.model, rec.builder, log=lambda r: log(epoch_line(r)), evaluate_fn=on_epoch,
                          say=log)
    rec.model.load_state_dict(best["state"])
    if config.train.choose_text_prior:
        apply_text_prior_choice(rec, prepared, log)
    val = validation_metrics(rec, prepared, "val", sampled=True)
    test, test_ranks = stage_metrics(rec, prepared, "test", sampled=True)
    summary = {"history": history, "best_epoch": best["epoch"], "val": val, "test": test,
               "test_ranks": test_ranks.tolist(),   # split.evaluated_users order, for paired comparisons
               "seconds": time.perf_counter() - t0, "data": prepared.split.stats, "validation": prepared.report}
    if save:
        out = Path(config.output)
        out.mkdir(parents=True, exist_ok=True)
        rec.save(out / "artifact", metrics={"val": val, "test": test, "best_epoch": best["epoch"]})
        (out / "summary.json").write_text(strict_json(summary, indent=2))
        log(f"artifact: {out / 'artifact'}")
    return rec, summary


def apply_text_prior_choice(rec: Recommender, prepared: Prepared, log: Callable[[str], None] = print) -> bool:
    """Choose model.text_prior / text_prior_items / text_prior_form on validation (train.choose_text_prior)
    and set them on `rec.config`, so the scores, the metrics and the saved artifact all carry the choice. False
    (nothing chosen) for a model without text."""
    if rec.model.text is None:
        return False
    rec.refresh()
    split = prepared.split
    (weight, items, form), table = choose_text_prior(
        lambda users, inputs: rec.score_users(users, inputs, text_prior=False), rec.text_prior_scores, split,
        split.evaluated_users, rec.config.data.max_history, rec.config.train.eval_batch_size)
    rec.config = rec.config.replace(**{"model.text_prior": weight, "model.text_prior_items": items,
                                       "model.text_prior_form": form})
    shown = " ".join(f"{f} {w:g}/{h:g}={v:.4f}" for (w, h, f), v in table.items())
    log(f"text prior chosen on validation: text_prior={weight:g} text_prior_items={items:g} text_prior_form={form} "
        f"(val NDCG@10 by text_prior_form text_prior/text_prior_items: {shown})")
    return True


def epoch_line(record: dict) -> str:
    keys = ["val/overall/ndcg@10", "val/warm/ndcg@10", "val/cohort/ndcg@10", "val/overall/hr@10"]
    shown = " ".join(f"{k.split('/', 1)[1]}={record[k]:.4f}" for k in keys if k in record)
    if Z_VS_BEST in record:
        shown += f" z_vs_best={record[Z_VS_BEST]:+.2f}"
    return (f"epoch {record['epoch']}: loss={record['loss']:.4f} {record['examples_per_s']:.0f} ex/s "
            f"({record['train_seconds']:.1f}s) {shown}")
