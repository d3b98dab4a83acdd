"""History attention: reads a user's history as an ordered sequence instead of a bag.

Under the last-item protocol the next item follows the latest ones, and *which* earlier items matter depends on
what came last: a recency-weighted bag cannot express that, self-attention can (SASRec, Kang & McAuley 2018).
Each history item becomes one token:

    token = item embedding (learned, per item id)          -- when the variant reads the interaction matrix
          + W_text . cached text embedding of the item      -- when the variant reads text

Tokens sit oldest to newest; a few pre-LayerNorm transformer layers mix them with *causal* attention whose
position signal is a linear penalty on the distance between query and key (ALiBi, Press et al., ICLR 2022),
with one learned slope per head. Because the output at position t depends only on the items up to t and on
their distances to t, it equals the output of the same model run on that prefix alone: one pass over a
training sequence yields the user vector after every prefix (train.example_mode='sequence'). Attention kept
inside blocks of k positions (in every layer) turns one row into many histories of 1..k recent items: the
sparse users of test time.

The user vector is the output at the newest position. The text term is what sparse users gain: an item seen
by a handful of users still has a meaningful token. A user known only by a free text is a one-token history
whose token is that text's embedding (no item id).
"""

from __future__ import annotations

import torch
from torch import nn

from raysparse.model.dmf import bag_counts

PAD = -1  # item id of an empty slot in a padded sequence


def alibi_slopes(heads: int) -> list[float]:
    """ALiBi's geometric per-head slopes 2^(-8h/H), h = 1..H."""
    return [2.0 ** (-8.0 * (h + 1) / heads) for h in range(heads)]


def block_ids(length: int, window: torch.Tensor, device=None) -> torch.Tensor:
    """(B, L) block of each position: blocks of window[b] positions counted from the right end; one block
    (0) for the whole row where window[b] <= 0."""
    from_end = (length - 1 - torch.arange(length, device=device))[None, :]      # 0 at the newest position
    k = window[:, None]
    return torch.where(k > 0, torch.div(from_end, k.clamp(min=1), rounding_mode="floor"),
                       torch.zeros_like(from_end))


def block_starts(length: int, window: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """First position of the block holding (rows, cols); 0 where the row has no window."""
    k = window[rows]
    block = torch.div(length - 1 - cols, k.clamp(min=1), rounding_mode="floor")
    return torch.where(k > 0, (length - (block + 1) * k).clamp(min=0), torch.zeros_like(cols))


class HistoryAttention(nn.Module):
    def __init__(self, n_items: int, dim: int, layers: int, heads: int, dropout: float, text_hidden: int = 0,
                 use_item_ids: bool = True):
        super().__init__()
        if not use_item_ids and not text_hidden:
            raise ValueError("history attention needs item ids, item text, or both")
        self.dim, self.heads = dim, heads
        self.item_emb = nn.Embedding(n_items, dim) if use_item_ids else None
        if self.item_emb is not None:
            nn.init.normal_(self.item_emb.weight, std=dim ** -0.5)
        self.text_in = nn.Linear(text_hidden, dim) if text_hidden else None
        # ALiBi's geometric slopes 2^(-8h/H) as the starting point, learned from there (log scale: stays > 0).
        self.log_slopes = nn.Parameter(torch.log(torch.tensor(alibi_slopes(heads))))
        self.drop = nn.Dropout(dropout)
        layer = nn.TransformerEncoderLayer(dim, heads, dim_feedforward=2 * dim, dropout=dropout,
                                           activation="gelu", batch_first=True, norm_first=True)
        self.layers = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(dim)

    def tokens(self, items: torch.Tensor, item_text_emb: torch.Tensor | None) -> torch.Tensor:
        """items (...) item ids, PAD allowed -> (..., dim) token vectors (zero at PAD)."""
        safe = items.clamp(min=0)
        out = torch.zeros(*items.shape, self.dim, device=items.device, dtype=self.log_slopes.dtype)
        if self.item_emb is not None:
            out = out + self.item_emb(safe)
        if self.text_in is not None:
            out = out + self.text_in(item_text_emb[safe].to(out.dtype))
        return out * (items >= 0).unsqueeze(-1).to(out.dtype)

    def encode(self, x: torch.Tensor, valid: torch.Tensor, window: torch.Tensor | None = None) -> torch.Tensor:
        """x (B, L, dim) tokens oldest -> newest, valid (B, L); window (B,): 0 = whole history; k = the row is
        read as blocks of k consecutive items (from the newest end), each position seeing its own block up to
        itself: histories of 1..k items, as sparse users have. -> (B, L, dim); position t depends on tokens
        <= t only."""
        batch, length, _ = x.shape
        pos = torch.arange(length, device=x.device)
        dist = (pos[:, None] - pos[None, :])                                   # query t, key s: t - s
        allowed = (dist >= 0)[None] & valid[:, None, :]                        # (B, L, L)
        if window is not None:
            # Blocks of k positions counted from the newest end; attention stays inside a block in every
            # layer, so nothing from an earlier block reaches a position through the layers in between.
            block = block_ids(length, window, x.device)                        # (B, L)
            allowed = allowed & (block[:, :, None] == block[:, None, :])
        allowed = allowed | torch.eye(length, dtype=torch.bool, device=x.device)  # a padding query sees itself
        slopes = torch.exp(self.log_slopes)
        bias = -slopes[None, :, None, None] * dist.clamp(min=0).to(x.dtype)[None, None]     # (1, H, L, L)
        mask = bias.masked_fill(~allowed[:, None], float("-inf"))              # (B, H, L, L)
        mask = mask.reshape(batch * self.heads, length, length)
        # Tokens enter at sqrt(dim) times their scale, as in the Transformer and SASRec, so that beside the
        # layers' additions the newest item's own embedding stays prominent in the output (the next item is
        # most often like the last one). Seed-0 validation NDCG@10 at epoch 11, residual fusion: 0.0457 with
        # the scale, 0.0400 without (docs/ACCURACY.md).
        out = self.layers(self.drop(x * self.dim ** 0.5), mask=mask)
        return self.norm(out)

    def forward_sequence(self, seq: torch.Tensor, item_text_emb: torch.Tensor | None,
                         window: torch.Tensor | None = None) -> torch.Tensor:
        """seq (B, L) item ids oldest -> newest, left-padded with PAD -> (B, L, dim), the user after each prefix."""
        return self.encode(self.tokens(seq, item_text_emb), seq >= 0, window)

    def forward(self, items: torch.Tensor, offsets: torch.Tensor, positions: torch.Tensor,
                item_text_emb: torch.Tensor | None, query_emb: torch.Tensor | None = None) -> torch.Tensor:
        """Bags as the batch builder makes them: items (N,) newest first, offsets (B,), positions (N,)
        0 = newest -> (B, dim) user vectors. query_emb (B, H): free-text users, one token each."""
        batch = len(offsets)
        counts = bag_counts(offsets, items.numel())
        length = max(int(counts.max()) if batch and items.numel() else 1, 1)
        rows = torch.repeat_interleave(torch.arange(batch, device=items.device), counts)
        seq = torch.full((batch, length), PAD, dtype=torch.long, device=items.device)
        seq[rows, length - 1 - positions] = items                              # newest at the right end
        x = self.tokens(seq, item_text_emb)
        valid = seq >= 0
        if query_emb is not None:
            if self.text_in is None:
                raise ValueError("this history encoder reads no text; a free-text user cannot be scored")
            x[:, -1] = self.text_in(query_emb.to(x.dtype))
        valid[:, -1] = True  # an empty history is one zero token: finite, the same for every such user
        return self.encode(x, valid)[:, -1]
