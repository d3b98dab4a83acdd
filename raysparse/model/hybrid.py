"""The hybrid recommender: text user vector (+) DMF user vector -> fusion MLP; scored against item vectors.

Variants differ in the user side: 'fused' uses both towers, 'dmf' only the interaction row (Xue et al.'s
DMF), 'text' only the history text. With fusion='concat' the item side is the DMF item tower over the item's
column, plus the item's cached text embedding when the variant reads text (ModelConfig.item_text).

With history attention and fusion='residual' the head is SASRec's instead: the user vector is the attention
output, an item's vector its own input token (id embedding + projected text), and the DMF row is added to the
user through a zero-initialised projection (ModelConfig.fusion; its hidden width ModelConfig.residual_hidden_dim,
where concat fusion's vectors have ModelConfig.fusion_dim entries). The ablations 'ids' and 'ids_text' (residual
only) read no DMF row: the sequence model alone, without or with text.

Batches are dicts of tensors built by raysparse.data.examples (names and shapes documented there).
"""

from __future__ import annotations

import torch
from torch import nn

from raysparse.config import ModelConfig
from raysparse.model.dmf import SparseMLP, bag_counts
from raysparse.model.sequence import HistoryAttention, block_starts
from raysparse.model.text import TextTower


class HybridRecommender(nn.Module):
    def __init__(self, cfg: ModelConfig, n_users: int, n_items: int, text_tower: TextTower | None = None,
                 max_history: int = 50):
        super().__init__()
        if cfg.uses_text and text_tower is None:
            raise ValueError(f"model.variant={cfg.variant!r} needs a text tower")
        self.cfg = cfg
        self.n_users, self.n_items = n_users, n_items
        self.text = text_tower if cfg.uses_text else None
        self.dmf_user = SparseMLP(n_items, cfg.dmf_user_layers, cfg.dropout) if cfg.uses_dmf else None
        # history_encoder='attention': one sequence part (item ids if DMF is used, item text if text is used)
        # takes the place of the text tower's pooled vector; in 'fused' the DMF row stays beside it.
        self.history = None
        if cfg.history_encoder == "attention":
            self.history = HistoryAttention(
                n_items, cfg.attention_dim, cfg.attention_layers, cfg.attention_heads, cfg.dropout,
                text_hidden=text_tower.hidden_size if cfg.uses_text else 0, use_item_ids=cfg.uses_item_ids)
        self.residual = cfg.fusion == "residual"
        self.dmf_item = SparseMLP(n_users, cfg.dmf_item_layers, cfg.dropout) if cfg.uses_dmf_items else None
        if self.residual:
            # SASRec's scoring (user = attention output, item = its own input token, tied) with the DMF row added
            # to the user through a projection that starts at zero: training starts from the sequence model.
            hidden = cfg.residual_hidden_dim
            self.fusion = (nn.Sequential(nn.Linear(cfg.dmf_user_layers[-1], hidden), nn.ReLU(),
                                         nn.Dropout(cfg.dropout), nn.Linear(hidden, cfg.attention_dim))
                           if cfg.uses_dmf else None)
            if self.fusion is not None:
                nn.init.zeros_(self.fusion[-1].weight)
                nn.init.zeros_(self.fusion[-1].bias)
            self.item_proj = self.item_text_proj = self.item_id_proj = None
        else:
            d = cfg.fusion_dim
            first_dim = cfg.attention_dim if self.history is not None else cfg.text_dim
            user_in = (first_dim if cfg.uses_text or self.history is not None else 0) + \
                (cfg.dmf_user_layers[-1] if cfg.uses_dmf else 0)
            self.fusion = nn.Sequential(nn.Linear(user_in, d), nn.ReLU(), nn.Dropout(cfg.dropout), nn.Linear(d, d))
            self.item_proj = nn.Linear(cfg.dmf_item_layers[-1], d)
            self.item_text_proj = (nn.Linear(text_tower.hidden_size, d, bias=False)
                                   if cfg.uses_text and cfg.item_text else None)
            # The history attention's item embeddings also describe items as targets (SASRec shares them too).
            self.item_id_proj = (nn.Linear(cfg.attention_dim, d, bias=False)
                                 if self.history is not None and self.history.item_emb is not None else None)
        # One weight per recency slot of the DMF row (slot 0 = newest), exp(0) = 1 at the start.
        # (Not with history attention: there order is the attention's job, and an unweighted row lets one pass
        # over a sequence give every prefix's row as a running sum.)
        self.row_recency = (nn.Parameter(torch.zeros(max_history))
                            if cfg.uses_dmf and cfg.recency and self.history is None else None)

    # ---- user side -------------------------------------------------------------------------------------
    def user_vectors(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """(B, D) from the history bag (hist_items/hist_offsets/hist_weights) and/or the text inputs."""
        parts = []
        if self.history is not None:
            parts.append(self.history(batch["hist_items"], batch["hist_offsets"], batch["hist_pos"],
                                      self.text.item_text_emb if self.text is not None else None,
                                      batch.get("query_emb")))
        elif self.text is not None:
            parts.append(self.text(batch))
        if self.dmf_user is not None:
            weights = batch["hist_weights"]
            if self.row_recency is not None:
                slots = batch["hist_pos"].clamp(max=len(self.row_recency) - 1)
                weights = weights * torch.exp(self.row_recency[slots])
            parts.append(self.dmf_user(batch["hist_items"], batch["hist_offsets"], weights))
        return self._fuse(parts)

    def _fuse(self, parts: list[torch.Tensor]) -> torch.Tensor:
        """User parts (B, *) each, history lengths (B,) -> (B, D): modality dropout, fusion."""
        if self.residual:
            if len(parts) == 1:
                return parts[0]
            sequence, dmf = parts
            if self.training and self.cfg.modality_dropout > 0:
                # Drop the DMF addition for a share of examples, so the sequence part alone stays a good user.
                keep = torch.rand(dmf.shape[0], 1, device=dmf.device) >= self.cfg.modality_dropout
                dmf = dmf * keep.to(dmf.dtype)
            return sequence + self.fusion(dmf)
        if self.training and self.cfg.variant == "fused" and self.cfg.modality_dropout > 0:
            parts = self._modality_dropout(parts)
        return self.fusion(torch.cat(parts, dim=1))

    def _modality_dropout(self, parts: list[torch.Tensor]) -> torch.Tensor:
        # Per example, drop the DMF part or the text part (never both) with probability p each, so that
        # each path learns to carry a user alone: text for near-empty rows, DMF for users without text.
        text, dmf = parts
        u = torch.rand(text.shape[0], 1, device=text.device)
        p = self.cfg.modality_dropout
        keep_text = (u >= p).to(text.dtype)
        keep_dmf = ((u < p) | (u >= 2 * p)).to(dmf.dtype)
        return [text * keep_text, dmf * keep_dmf]

    # ---- item side -------------------------------------------------------------------------------------
    def _item_out(self, dmf_hidden: torch.Tensor | None, items: torch.Tensor) -> torch.Tensor:
        if self.residual:
            return self.history.tokens(items, self.text.item_text_emb if self.text is not None else None)
        vec = self.item_proj(dmf_hidden)
        if self.item_text_proj is not None:
            vec = vec + self.item_text_proj(self.text.item_text_emb[items].to(vec.dtype))
        if self.item_id_proj is not None:
            vec = vec + self.item_id_proj(self.history.item_emb(items))
        return vec

    def item_vectors(self, items: torch.Tensor, col_users: torch.Tensor, col_offsets: torch.Tensor,
                     col_weights: torch.Tensor) -> torch.Tensor:
        """items (M,) with their columns as bags (users who interacted in training) -> (M, D)."""
        if self.dmf_item is None:
            return self._item_out(None, items)
        return self._item_out(self.dmf_item(col_users, col_offsets, col_weights), items)

    # ---- scoring ---------------------------------------------------------------------------------------
    def score(self, users: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        """(B, D) x (M, D) -> (B, M) logits."""
        return users @ items.T

    def score_pairs(self, users: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        """(B, D) x (B, D) -> (B,) logits of matching rows."""
        return (users * items).sum(-1)

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if "seq" in batch:
            return self.forward_sequence(batch)
        return self.forward_examples(batch)

    def forward_examples(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Training forward: logits of each example's target and of the shared candidate items.

        Returns pos (B,), cand (B, M) and neg_mask (B, M) (which candidates are valid negatives).
        The target's item vector is rebuilt with the example's own user removed from the target's column
        (target_col_weight = that entry's weight): the user's interaction with the target must not be an
        input when scoring the target. Negatives never contain the user (they are unseen items).
        """
        return self._training_logits(self.user_vectors(batch), batch["user_idx"], batch)

    def _training_logits(self, users: torch.Tensor, user_idx: torch.Tensor, batch: dict[str, torch.Tensor]
                         ) -> dict[str, torch.Tensor]:
        """users (S, D) and their user indices (S,) -> cand (S, M), neg_mask (S, M) and pos (S,), the logit of
        each row's target. The target's column loses this user's own entry (its weight: target_col_weight)
        before the target is scored."""
        if self.dmf_item is None:          # residual: an item's vector is its own token, no column to remove from
            cand = self._item_out(None, batch["cand_items"])
            return {"cand": self.score(users, cand), "neg_mask": batch["neg_mask"],
                    "pos": self.score_pairs(users, cand[batch["target_pos"]])}
        sums = self.dmf_item.bag_sums(batch["col_users"], batch["col_offsets"], batch["col_weights"])
        counts = bag_counts(batch["col_offsets"], batch["col_users"].numel())
        cand = self._item_out(self.dmf_item.head(sums, counts), batch["cand_items"])
        out = {"cand": self.score(users, cand), "neg_mask": batch["neg_mask"]}
        pos_idx = batch["target_pos"]
        own = self.dmf_item.bag.weight[user_idx] * batch["target_col_weight"][:, None]
        removed = (batch["target_col_weight"] != 0).to(counts.dtype)
        pos_hidden = self.dmf_item.head(sums[pos_idx] - own, counts[pos_idx] - removed)
        pos_items = self._item_out(pos_hidden, batch["cand_items"][pos_idx])
        out["pos"] = self.score_pairs(users, pos_items)
        return out

    def forward_sequence(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Training forward over whole sequences (train.example_mode='sequence', history attention only).

        batch: seq / seq_weights (B, L) oldest -> newest, left-padded with PAD; window (B,) (0 = full history,
        k = blocks of k items, see HistoryAttention.encode); pred_row / pred_col (S,) the positions that predict
        targets; target_pos, target_col_weight (S,): each position's target (its next item); cand_items
        with their column bags; neg_mask (S, M). The user after each prefix comes from one causal pass
        (attention) and running sums (DMF row, linear first layer), so position t reads items <= t only.
        Returns cand (S, M), neg_mask (S, M) and pos (S,) (see `_training_logits`).
        """
        return self._training_logits(self.sequence_users(batch), batch["user_idx"][batch["pred_row"]], batch)

    def sequence_users(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """(S, D): the user vector at each scoring position (pred_row, pred_col) of a sequence batch, which all
        of that position's targets are scored from; equal to `user_vectors` of the history the position reads
        (tested)."""
        seq, window = batch["seq"], batch["window"]
        rows, cols = batch["pred_row"], batch["pred_col"]
        valid = (seq >= 0)
        # What each prediction reads: positions start..col (start > 0 inside a short-history block), as running
        # totals minus the totals before start.
        prev = block_starts(seq.shape[1], window, rows, cols) - 1
        use_prev = prev >= 0
        running = valid.long().cumsum(1)
        counts = running[rows, cols] - running[rows, prev.clamp(min=0)] * use_prev
        parts = []
        text_table = self.text.item_text_emb if self.text is not None else None
        hidden = self.history.forward_sequence(seq, text_table, window)
        parts.append(hidden[rows, cols])
        if self.dmf_user is not None:
            w = (batch["seq_weights"] * valid).unsqueeze(-1)
            running_sums = (self.dmf_user.bag.weight[seq.clamp(min=0)] * w).cumsum(1)          # (B, L, H)
            sums = running_sums[rows, cols] - running_sums[rows, prev.clamp(min=0)] * use_prev[:, None]
            parts.append(self.dmf_user.head(sums, counts))
        return self._fuse(parts)
