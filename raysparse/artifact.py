"""The self-contained serving artifact: everything `Recommender.load` needs, and nothing that unpickles.

This module knows the files; `Recommender.load/save` call it (it never imports the Recommender, so the two do
not import each other).

    <dir>/format.json            {"format": "raysparse-artifact", "version": 1}
    <dir>/config.json            the full Config
    <dir>/model.safetensors      model weights (encoder included) and the cached item text embeddings
    <dir>/interactions.safetensors  training histories as CSR (known users, DMF item columns)
    <dir>/users.json  items.json  vocabularies (raw id <-> index)
    <dir>/items.parquet          the item table (id, catalogue fields, rendered text)
    <dir>/encoder/  tokenizer/   Hugging Face encoder config and tokenizer files (text variants)
    <dir>/metrics.json           optional: metrics of the weights saved
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from raysparse.build import build_batches
from raysparse.config import config_from_dict
from raysparse.data.split import Split
from raysparse.data.text import ItemText
from raysparse.data.vocab import Vocab
from raysparse.errors import UserError
from raysparse.model.hybrid import HybridRecommender
from raysparse.model.text import TextTower

FORMAT = "raysparse-artifact"
VERSION = 1
# Weights older artifacts may carry that today's model does not build (see load_artifact).
DEAD_UNDER_ATTENTION = frozenset({"text.proj.weight", "text.proj.bias", "text.recency_logits"})


def upgrade_saved_config(raw: dict) -> dict:
    """An artifact's config.json as today's Config reads it. An artifact holds every key of the Config it was
    saved with, so a key it lacks tells its age: before model.residual_hidden_dim existed, model.fusion_dim
    also set the hidden width of the residual DMF projection; such an artifact keeps that width."""
    model = raw.get("model") or {}
    if model.get("fusion") == "residual" and "residual_hidden_dim" not in model and "fusion_dim" in model:
        raw = {**raw, "model": {**model, "residual_hidden_dim": model["fusion_dim"]}}
    return raw


def write_config(path: str | Path, config) -> None:
    """<path>/config.json: the Config the artifact's model is loaded and scored with. Also rewritten alone
    when a choice made after training changes only scoring (model.text_prior), not the weights."""
    (Path(path) / "config.json").write_text(json.dumps(config.to_dict(), indent=2))


def read_config(path: str | Path):
    """The Config in <path>/config.json (`write_config`'s), read as today's Config reads it, without loading
    the model."""
    return config_from_dict(upgrade_saved_config(json.loads((Path(path) / "config.json").read_text())))


def save_artifact(rec, path: str | Path, metrics: dict | None = None) -> Path:
    """Write `rec` (a Recommender) to `path` atomically (a temp dir renamed into place)."""
    import pandas as pd

    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    (tmp / "format.json").write_text(json.dumps({"format": FORMAT, "version": VERSION}))
    write_config(tmp, rec.config)
    state = {k: v.detach().cpu().contiguous() for k, v in rec.model.state_dict().items()}
    save_file(state, str(tmp / "model.safetensors"))
    split = rec.builder.split
    save_file({"train_indptr": torch.from_numpy(split.train_indptr),
               "train_items": torch.from_numpy(split.train_items),
               "train_weights": torch.from_numpy(split.train_weights)}, str(tmp / "interactions.safetensors"))
    rec.users.save(tmp / "users.json")
    rec.items.save(tmp / "items.json")
    table = rec.item_table if rec.item_table is not None else pd.DataFrame({"item_id": rec.items.raw_ids})
    table.to_parquet(tmp / "items.parquet", index=False)
    if rec.model.text is not None:
        rec.model.text.encoder.config.save_pretrained(tmp / "encoder")
        rec.tokenizer.save_pretrained(tmp / "tokenizer")
    if metrics is not None:
        (tmp / "metrics.json").write_text(json.dumps(metrics, indent=2, default=float))
    replace_directory(tmp, path)
    return path


def replace_directory(new: str | Path, dest: str | Path) -> None:
    """Move the complete folder `new` to `dest`, replacing the folder there, so that a process killed at any
    moment leaves a complete folder to load: `dest` (old or new) or, in the instant between two renames, the
    old one at `<dest>.old` beside the new one at `new`. Deleting `dest` first and then renaming (as before
    issue 16) left a half-deleted `dest` to a kill during the delete. Same file system (renames)."""
    new, dest = Path(new), Path(dest)
    old = dest.with_name(dest.name + ".old")
    shutil.rmtree(old, ignore_errors=True)  # left by an export killed after its first rename
    if dest.exists():
        dest.rename(old)
    new.rename(dest)
    shutil.rmtree(old, ignore_errors=True)


def load_artifact(path: str | Path) -> dict:
    """The Recommender's constructor arguments, rebuilt from an artifact directory (weights via safetensors,
    never pickle): model, config, users, items, builder, tokenizer, item_table."""
    import pandas as pd

    path = Path(path)
    fmt_file = path / "format.json"
    if not fmt_file.exists():
        raise UserError(f"{str(path)!r} is not a raysparse artifact (no format.json); point to the directory "
                        f"written by `raysparse train` (<output>/artifact) or Tune's <output>/best.")
    fmt = json.loads(fmt_file.read_text())
    if fmt.get("format") != FORMAT or fmt.get("version") != VERSION:
        raise UserError(f"artifact {str(path)!r} has format {fmt}; this raysparse reads version {VERSION}.")
    config = read_config(path)
    users, items = Vocab.load(path / "users.json"), Vocab.load(path / "items.json")
    arrays = load_file(str(path / "interactions.safetensors"))
    n_users, n_items = len(users), len(items)
    split = Split(n_users=n_users, n_items=n_items, train_indptr=arrays["train_indptr"].numpy(),
                  train_items=arrays["train_items"].numpy(), train_weights=arrays["train_weights"].numpy(),
                  val_item=np.full(n_users, -1), test_item=np.full(n_users, -1), cohort_k=np.zeros(n_users, np.int64))
    state = load_file(str(path / "model.safetensors"))
    table = pd.read_parquet(path / "items.parquet")
    tokenizer = item_text = None
    text_tower = None
    if config.model.uses_text:
        from transformers import AutoConfig, AutoModel, AutoTokenizer

        enc_config = AutoConfig.from_pretrained(path / "encoder", trust_remote_code=config.model.trust_remote_code)
        encoder = AutoModel.from_config(enc_config, trust_remote_code=config.model.trust_remote_code)
        tokenizer = AutoTokenizer.from_pretrained(path / "tokenizer")
        text_tower = TextTower(encoder, config.model.pooling, config.model.finetune, config.model.finetune_top_layers,
                               config.model.text_user_dim, config.data.max_history, state["text.item_text_emb"])
        item_text = ItemText.build(tokenizer, table["text"].fillna("").tolist())
    model = HybridRecommender(config.model, n_users, n_items, text_tower, config.data.max_history)
    # Artifacts saved before the text tower under history attention lost its pooled-user projection and recency
    # weights carry them; nothing ever read them, so they are left out rather than refused.
    expected = model.state_dict()
    state = {k: v for k, v in state.items() if k in expected or k not in DEAD_UNDER_ATTENTION}
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise UserError(f"artifact {str(path)!r} does not match its config: missing weights {missing[:5]}, "
                        f"unexpected {unexpected[:5]}. Re-export it with this raysparse version.")
    builder = build_batches(config, split, item_text)
    return dict(model=model, config=config, users=users, items=items, builder=builder, tokenizer=tokenizer,
                item_table=table)
