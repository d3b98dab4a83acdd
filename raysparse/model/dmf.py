"""Deep Matrix Factorization towers (Xue et al., IJCAI 2017, https://www.ijcai.org/proceedings/2017/0447.pdf).

The user tower reads the user's row of the interaction matrix and the item tower the item's column, each
through an MLP. A row is sparse, so the first layer is a weighted sum of one embedding per non-zero entry
(EmbeddingBag): memory and compute grow with interactions, not users x items, and a new user's row gets a
vector by a forward pass (fold-in).

The first layer is split from the rest (`bag_sums` then `head`) because it is linear: to remove one entry
from a bag (the training user from the column of the item it is asked to predict) we subtract that entry's
embedding instead of rebuilding the bag.
"""

from __future__ import annotations

import torch
from torch import nn


class SparseMLP(nn.Module):
    """Sparse row (indices + weights) -> vector. First layer = sum of embeddings / sqrt(#entries)."""

    def __init__(self, n_inputs: int, widths: list[int], dropout: float = 0.0):
        super().__init__()
        self.bag = nn.EmbeddingBag(n_inputs, widths[0], mode="sum")
        nn.init.normal_(self.bag.weight, std=0.05)
        self.bias = nn.Parameter(torch.zeros(widths[0]))
        layers: list[nn.Module] = []
        for w_in, w_out in zip(widths[:-1], widths[1:]):
            layers += [nn.ReLU(), nn.Dropout(dropout), nn.Linear(w_in, w_out)]
        self.mlp = nn.Sequential(*layers)
        self.out_dim = widths[-1]

    def bag_sums(self, indices: torch.Tensor, offsets: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """indices (N,), offsets (B,), weights (N,) -> (B, H) weighted sums of entry embeddings."""
        return self.bag(indices, offsets, per_sample_weights=weights)

    def head(self, sums: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """sums (B, H), counts (B,) entries per bag -> (B, out_dim)."""
        scale = counts.clamp(min=1).to(sums.dtype).rsqrt()[:, None]
        return self.mlp(sums * scale + self.bias)

    def forward(self, indices: torch.Tensor, offsets: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        counts = bag_counts(offsets, indices.numel())
        return self.head(self.bag_sums(indices, offsets, weights), counts)


def bag_counts(offsets: torch.Tensor, total: int) -> torch.Tensor:
    """Entries per bag from EmbeddingBag offsets (B,) and the total number of entries."""
    ends = torch.cat([offsets[1:], torch.tensor([total], dtype=offsets.dtype, device=offsets.device)])
    return ends - offsets
