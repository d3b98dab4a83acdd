"""Build what a run needs from a Config: the prepared data and the model. Shared by every entry point
(local training, Ray workers, Tune trials, benchmarks), so they all train the same thing."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch

from raysparse.config import Config
from raysparse.data.dataset import IndexedLog, index_interactions
from raysparse.data.examples import BatchBuilder
from raysparse.data.split import Split, split_last_item
from raysparse.data.text import ItemText, render_catalogue_texts
from raysparse.model.hybrid import HybridRecommender
from raysparse.model.text import TextTower, cached_item_embeddings, load_encoder, resolve_text_model


@dataclass
class Prepared:
    """Validated, indexed and split data plus the rendered item texts."""

    log: IndexedLog
    split: Split
    items: pd.DataFrame          # catalogue in item_idx order
    item_texts: list[str]        # rendered template, item_idx order
    report: dict                 # validation report (rows in / used / quarantined)
    item_text_note: str = ""     # for the run's log: columns the template took through {*} or no match, or no text


def dataset_path(config: Config) -> str:
    """The configured dataset, or the embedded synthetic one (generated once under <output>/data)."""
    if config.data.path:
        return config.data.path
    from raysparse.data.synthetic import generate_synthetic

    out = Path(config.output) / "data"
    if not (out / "interactions.parquet").exists():
        generate_synthetic(str(out), n_users=config.data.synthetic_users, n_items=config.data.synthetic_items,
                           seed=config.data.split_seed)
    return str(out)


def prepare_data(config: Config, frames: tuple[pd.DataFrame, pd.DataFrame] | None = None) -> Prepared:
    """Read + validate (or take `frames` = (interactions, items) already read), index, split."""
    from raysparse.data.io import load_dataset

    report: dict = {}
    if frames is None:
        interactions, items, validation = load_dataset(
            dataset_path(config), config.data.items_path, on_bad_rows=config.data.on_bad_rows,
            quarantine_dir=config.output)
        report = validation.to_dict()
    else:
        interactions, items = frames
    log = index_interactions(interactions, items)
    split = split_last_item(log, config.data.cohort_fraction, list(config.data.cohort_ks), config.data.split_seed,
                            use_ratings=config.data.use_ratings)
    items = items.reset_index(drop=True)
    texts, note = render_catalogue_texts(items, config.data.text_template)
    return Prepared(log=log, split=split, items=items, item_texts=texts, report=report, item_text_note=note)


def build_model(config: Config, n_users: int, n_items: int, item_texts: list[str], cache_dir: str | None = None
                ) -> tuple[HybridRecommender, object | None, ItemText | None]:
    """(model, tokenizer, item token table). Text variants load the encoder and embed item texts once."""
    torch.manual_seed(config.train.seed)
    mc = config.model
    if not mc.uses_text:
        return HybridRecommender(mc, n_users, n_items, max_history=config.data.max_history), None, None
    encoder, tokenizer = load_encoder(mc.text_model, mc.trust_remote_code)
    item_emb = cached_item_embeddings(encoder, tokenizer, item_texts, mc.pooling,
                                      resolve_text_model(mc.text_model), cache_dir,
                                      max_length=config.data.item_text_tokens)
    tower = TextTower(encoder, mc.pooling, mc.finetune, mc.finetune_top_layers, mc.text_user_dim,
                      config.data.max_history, item_emb)
    item_text = ItemText.build(tokenizer, item_texts)
    return HybridRecommender(mc, n_users, n_items, tower, config.data.max_history), tokenizer, item_text


def build_batches(config: Config, split: Split, item_text: ItemText | None) -> BatchBuilder:
    mc = config.model
    return BatchBuilder(split, item_text, max_history=config.data.max_history, max_length=config.data.max_length,
                        negatives=config.train.negatives_per_positive,
                        with_tokens=mc.uses_text and mc.finetune != "frozen",
                        short_history_prob=config.train.short_history_prob,
                        short_history_ks=tuple(config.data.cohort_ks),
                        with_columns=mc.uses_dmf_items)


