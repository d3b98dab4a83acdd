"""Item text: render a template per item, tokenize each item once, and build a user's history text.

A user's text is their history items' texts, most recent first, joined by the tokenizer's separator and
truncated to `max_length` tokens: `[CLS] newest [SEP] older [SEP] ... [SEP]`. Tokenizing once per item
and concatenating ids costs O(history) per example instead of re-tokenizing strings every step.
"""

from __future__ import annotations

import re
import string
from typing import Sequence

import numpy as np
import pandas as pd
import torch


class _Blank(dict):
    def __missing__(self, key: str) -> str:  # a column the catalogue lacks renders as empty
        return ""


def template_fields(template: str) -> list[str]:
    return [name for _, name, _, _ in string.Formatter().parse(template) if name]


def catalogue_text_columns(items: pd.DataFrame) -> list[str]:
    """The catalogue's text columns, in its order: every column but the id (and the readers' bookkeeping)."""
    return [c for c in items.columns if c != "item_id" and not str(c).startswith("_")]


OTHER_COLUMNS = "*"   # `{*}` in a template: every catalogue text column the template does not name


def render_catalogue_texts(items: pd.DataFrame, template: str) -> tuple[list[str], str]:
    """(one text per catalogue row, a note for the run's log: "" when there is nothing to say).

    `{*}` in the template stands for the catalogue's text columns the template does not name, in the catalogue's
    order: configs/accuracy.yaml names the fields of the catalogues it knows and is run unchanged on others, where
    `name` may stand for `title` and `about` for `description`; named fields alone would silently drop those. A
    template that names none of the catalogue's columns would give every item an empty text, so it reads every
    text column too. Either way the note says which columns came in, and a catalogue whose texts are all empty is
    said as well.
    """
    fields = template_fields(template)
    columns = catalogue_text_columns(items)
    unnamed = [c for c in columns if c not in fields]
    note = ""
    if OTHER_COLUMNS in fields:
        template = template.replace("{" + OTHER_COLUMNS + "}", ". ".join("{" + c + "}" for c in unnamed))
        if unnamed:
            note = (f"item text: {{{OTHER_COLUMNS}}} in data.text_template reads the catalogue's columns it does "
                    f"not name: {', '.join(unnamed)}.")
    elif fields and not set(fields) & set(items.columns) and columns:
        template = ". ".join("{" + c + "}" for c in columns)
        note = (f"item text: data.text_template names none of the catalogue's columns "
                f"({', '.join(columns)}), so item texts come from all of them: {template!r}. Set "
                f"data.text_template to choose the fields.")
    texts = render_item_texts(items, template)
    if not any(texts):
        note = (f"item text: every item's text is empty (data.text_template {template!r}; catalogue columns: "
                f"{', '.join(columns) or 'none but item_id'}); the text tower, the text prior and the text "
                f"baselines have nothing to read. Add a text column (title, description, ...) to the catalogue.")
    return texts, note


def render_item_texts(items: pd.DataFrame, template: str) -> list[str]:
    """One string per catalogue row. Empty fields leave no dangling punctuation ("Title. . " -> "Title.")."""
    columns = [c for c in template_fields(template) if c in items.columns]
    records = items[columns].fillna("").astype(str).to_dict("records") if columns else [{}] * len(items)
    texts = []
    for record in records:
        text = template.format_map(_Blank(record))
        text = re.sub(r"(\s*[.,;:]\s*)+(?=[.,;:]|$)", "", text)     # drop separators before nothing
        text = re.sub(r"^\s*[.,;:]\s*", "", text)
        texts.append(re.sub(r"\s+", " ", text).strip())
    return texts


class ItemText:
    """Token ids of every item (no special tokens), as one flat array plus offsets."""

    def __init__(self, token_lists: Sequence[Sequence[int]], cls_id: int, sep_id: int, pad_id: int):
        lengths = np.array([len(t) for t in token_lists], dtype=np.int64)
        self.offsets = np.zeros(len(token_lists) + 1, np.int64)
        np.cumsum(lengths, out=self.offsets[1:])
        self.tokens = np.fromiter((tok for t in token_lists for tok in t), dtype=np.int64, count=int(lengths.sum()))
        self.cls_id, self.sep_id, self.pad_id = cls_id, sep_id, pad_id

    @classmethod
    def build(cls, tokenizer, texts: Sequence[str], max_item_tokens: int = 64) -> "ItemText":
        """Tokenize every item text once; each item is capped at `max_item_tokens` so one long description
        cannot crowd the rest of a history out of the text budget."""
        encoded = tokenizer(list(texts), add_special_tokens=False, truncation=True, max_length=max_item_tokens)
        cls_id = tokenizer.cls_token_id if tokenizer.cls_token_id is not None else tokenizer.bos_token_id
        sep_id = tokenizer.sep_token_id if tokenizer.sep_token_id is not None else tokenizer.eos_token_id
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        if cls_id is None or sep_id is None:
            raise ValueError("the tokenizer has neither CLS/SEP nor BOS/EOS tokens; use a BERT-style encoder.")
        return cls(encoded["input_ids"], cls_id, sep_id, pad_id)

    @property
    def n_items(self) -> int:
        return len(self.offsets) - 1

    def item_tokens(self, item_idx: int) -> np.ndarray:
        return self.tokens[self.offsets[item_idx]:self.offsets[item_idx + 1]]

    def user_tokens(self, history_newest_first: Sequence[int], max_length: int) -> list[int]:
        """[CLS] newest [SEP] older [SEP] ... truncated to max_length (always ends with [SEP])."""
        out = [self.cls_id]
        for item in history_newest_first:
            toks = self.item_tokens(int(item)).tolist()
            room = max_length - len(out) - 1
            if room <= 0:
                break
            out.extend(toks[:room])
            out.append(self.sep_id)
        if out[-1] != self.sep_id:
            out.append(self.sep_id)
        return out

    def batch(self, histories_newest_first: Sequence[Sequence[int]], max_length: int) -> dict[str, torch.Tensor]:
        """input_ids / attention_mask (B, L), padded to the longest row."""
        rows = [self.user_tokens(h, max_length) for h in histories_newest_first]
        return pad_token_rows(rows, self.pad_id)


def pad_token_rows(rows: Sequence[Sequence[int]], pad_id: int) -> dict[str, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, :len(r)] = torch.as_tensor(r, dtype=torch.long)
        mask[i, :len(r)] = 1
    return {"input_ids": ids, "attention_mask": mask}
