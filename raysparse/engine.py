"""DeepSpeed for a raysparse model, without Ray: the DeepSpeed config of a run (generated from train.* and
ray.*, ray.deepspeed_config's JSON merged over it, checked), the engine (`deepspeed.initialize` with the param
groups and schedule of `raysparse.step`), `EngineStepper` (one step through the engine: what
`raysparse.step.PlainStepper` is for torch AdamW) and `DeepSpeedTraining` (what one worker of a distributed
run holds: the model, its engine, a full-precision Recommender for validation and the artifact, the files
of an epoch's checkpoint).

Ray Train workers (`raysparse.ray_train`) and `raysparse bench gpu` (a GPU machine without Ray) use it.
deepspeed is imported inside the functions that need it: the config and its checks run without it.
"""

from __future__ import annotations

import copy
import json
import os
import time
from pathlib import Path
from typing import Any

import torch

from raysparse.build import Prepared, build_batches, build_model
from raysparse.config import Config
from raysparse.data.examples import all_item_bags
from raysparse.errors import ConfigError
from raysparse.local import item_table
from raysparse.loop import distributed_ranks
from raysparse.metrics import flatten, summarize, user_ndcg
from raysparse.recommender import Recommender
from raysparse.step import USER_NDCG, compute_loss, param_groups, warmup_decay

# ------------------------------------------------------------------------------------------------ config

def resolved_precision(config: Config) -> str:
    """'auto' -> bf16 on GPU, fp32 on CPU."""
    precision = config.ray.precision
    if precision == "auto":
        return "bf16" if config.ray.use_gpu else "fp32"
    return precision


def deep_merge(base: dict, override: dict) -> dict:
    """`base` with `override`'s keys written over it, nested dicts merged key by key."""
    out = dict(base)
    for key, value in override.items():
        out[key] = deep_merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def read_user_deepspeed_config(path: str) -> dict:
    """The JSON of ray.deepspeed_config, or a ConfigError saying what is wrong with it."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"ray.deepspeed_config={path!r} does not exist; pass the path of a DeepSpeed JSON file "
                          f"or leave it empty to use the generated config.")
    try:
        user = json.loads(p.read_text())
    except json.JSONDecodeError as err:
        raise ConfigError(f"ray.deepspeed_config={path!r} is not valid JSON ({err}); fix the file.") from None
    if not isinstance(user, dict):
        raise ConfigError(f"ray.deepspeed_config={path!r} must hold a JSON object, got {type(user).__name__}.")
    return user


def deepspeed_config(config: Config, world_size: int) -> dict:
    """The DeepSpeed config of a run: generated from train.* and ray.*, then ray.deepspeed_config's JSON
    merged over it (its keys win). Raises ConfigError for combinations DeepSpeed would reject later.

    Generated: micro-batch = train.batch_size_per_worker, gradient_accumulation_steps, gradient_clipping
    (0 = off), AdamW (torch's multi-tensor implementation, as the plain loop: runs on CPU and GPU without
    compiled extensions) with weight_decay, ZeRO stage, bf16 / fp16 / fp32. The learning rates come from the
    param groups (train.lr, train.text_lr) and the warm-up + decay schedule; a "scheduler" in the user JSON
    replaces that schedule and applies one learning rate to every group.
    """
    tc, rc = config.train, config.ray
    precision = resolved_precision(config)
    generated: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": tc.batch_size_per_worker,
        "gradient_accumulation_steps": tc.grad_accum_steps,
        "gradient_clipping": float(tc.grad_clip),
        "optimizer": {"type": "AdamW", "params": {"lr": tc.lr, "weight_decay": tc.weight_decay,
                                                  "torch_adam": True, "foreach": True}},
        "zero_optimization": {"stage": rc.zero_stage},
        "bf16": {"enabled": precision == "bf16"},
        "fp16": {"enabled": precision == "fp16"},
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
    }
    user = read_user_deepspeed_config(rc.deepspeed_config) if rc.deepspeed_config else {}
    merged = deep_merge(generated, user)
    micro, accum = merged["train_micro_batch_size_per_gpu"], merged["gradient_accumulation_steps"]
    for key, value in (("train_micro_batch_size_per_gpu", micro), ("gradient_accumulation_steps", accum)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ConfigError(f"DeepSpeed {key}={value!r} must be a positive integer; fix ray.deepspeed_config or "
                              f"set train.batch_size_per_worker / train.grad_accum_steps.")
    expected = micro * accum * world_size
    if "train_batch_size" in user and user["train_batch_size"] != expected:
        raise ConfigError(f"ray.deepspeed_config sets train_batch_size={user['train_batch_size']}, but micro-batch "
                          f"{micro} x accumulation {accum} x {world_size} workers = {expected}. Remove "
                          f"train_batch_size from the JSON (it is derived) or make the three agree.")
    merged["train_batch_size"] = expected
    if not rc.use_gpu and (merged.get("bf16", {}).get("enabled") or merged.get("fp16", {}).get("enabled")):
        raise ConfigError("ray.deepspeed_config enables bf16/fp16, but ray.use_gpu=false: on CPU DeepSpeed trains "
                          "in fp32. Disable them in the JSON or set ray.use_gpu=true on a GPU cluster.")
    stage = merged.get("zero_optimization", {}).get("stage", 0)
    if stage not in (0, 1, 2, 3):
        raise ConfigError(f"DeepSpeed zero_optimization.stage={stage!r} must be 0, 1, 2 or 3.")
    return merged


def engine_dtype(ds_config: dict) -> torch.dtype:
    if ds_config.get("bf16", {}).get("enabled"):
        return torch.bfloat16
    if ds_config.get("fp16", {}).get("enabled"):
        return torch.float16
    return torch.float32


def first_run_compilation_note(config: Config, extensions_dir: str | None = None) -> str:
    """On CPU, DeepSpeed's torch backend compiles its shared-memory all-reduce op (deepspeed_shm_comm) the first
    time a worker starts on a machine, about a minute on 2 cores, then reuses torch's extension cache. Say so
    before it happens rather than leave a silent minute; '' when the cache already holds it (or on GPU)."""
    if config.ray.use_gpu:
        return ""
    root = Path(extensions_dir or os.environ.get("TORCH_EXTENSIONS_DIR")
                or Path.home() / ".cache" / "torch_extensions")
    if any(root.glob("*/deepspeed_shm_comm/*.so")):
        return ""
    return (f"first run on this machine: each worker's DeepSpeed compiles its CPU shared-memory all-reduce "
            f"(deepspeed_shm_comm, about a minute on 2 cores); later runs reuse it from {root}")


# ------------------------------------------------------------------------------------------------ engine

def build_engine(model: torch.nn.Module, config: Config, ds_config: dict, total_steps: int):
    """deepspeed.initialize around `model` with the param groups of raysparse.step (text encoder at
    train.text_lr, the rest at train.lr) and warm-up + decay over `total_steps` optimizer steps. DeepSpeed
    keeps each group's lr (checked in tests) and steps the schedule at accumulation boundaries."""
    import deepspeed

    schedule = warmup_decay(max(1, total_steps), config.train.warmup_ratio)
    scheduler = None if "scheduler" in ds_config else (
        lambda optimizer: torch.optim.lr_scheduler.LambdaLR(optimizer, schedule))
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=param_groups(model, config.train),
                                           config=ds_config, lr_scheduler=scheduler)
    if engine.dp_world_size == 1 and engine.zero_optimization_stage() == 0:
        # Averaging gradients over one rank is the identity, yet DeepSpeed still copies every gradient
        # through flat all-reduce buffers: ~7% of a CPU step of the tiny model (profiled). ZeRO >= 1 keeps
        # it (its optimizer moves gradients into partitions there).
        engine.enable_backward_allreduce = False
    if engine.zero_optimization_stage() == 0 and type(engine.optimizer).__module__.startswith("torch.optim"):
        # DeepSpeed's zero_grad walks every named parameter (frozen encoder layers included) from Python;
        # the optimizer's own set_to_none walk does the same job for the parameters that have gradients.
        engine.zero_grad = lambda: engine.optimizer.zero_grad(set_to_none=True)
    return engine


def batch_to_device(batch: dict[str, torch.Tensor], device: torch.device, dtype: torch.dtype
                    ) -> dict[str, torch.Tensor]:
    """Move a batch; float inputs (history/column weights) take the engine's dtype (bf16/fp16 modules need
    EmbeddingBag weights of their own dtype)."""
    out = {}
    for key, value in batch.items():
        if value.is_floating_point() and value.dtype != dtype:
            value = value.to(dtype)
        out[key] = value.to(device, non_blocking=True)
    return out


class EngineStepper:
    """One training step through a DeepSpeed engine (`build_engine`): the batch moves to the engine's device
    and dtype; DeepSpeed accumulates, clips and steps the optimizer and the schedule. A
    `raysparse.loop.Stepper`."""

    def __init__(self, engine, loss: str, dtype: torch.dtype):
        self.engine, self.loss, self.dtype = engine, loss, dtype
        self.optimizer = engine.optimizer

    def start_epoch(self) -> None:
        self.engine.train()

    def step(self, batch: dict[str, torch.Tensor]) -> float:
        loss = compute_loss(self.engine(batch_to_device(batch, self.engine.device, self.dtype)), self.loss)
        self.engine.backward(loss)
        self.engine.step()
        return float(loss.item())


# ------------------------------------------------------------------------------------------------ one worker

class DeviceRecommender(Recommender):
    """The core Recommender with its model on `device` (a GPU worker's): inputs move there, vectors and
    scores come back to CPU. Same arithmetic as Recommender.refresh / score_inputs; on CPU it is the same
    computation (the distributed-validation test compares its metrics with the core class's)."""

    def __init__(self, model, device, *args, **kwargs):
        self.device = torch.device(device)
        super().__init__(model, *args, **kwargs)

    @torch.no_grad()
    def refresh(self) -> None:
        was_training = self.model.training
        self.model.eval()
        keys = ("cand_items", "col_users", "col_offsets", "col_weights")
        vecs = [self.model.item_vectors(*(b[k].to(self.device) for k in keys)).float().cpu()
                for b in all_item_bags(self.builder)]
        self.item_vectors = torch.cat(vecs).float()
        self.refresh_item_text()
        self.model.train(was_training)

    @torch.no_grad()
    def score_inputs(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        was_training = self.model.training
        self.model.eval()
        users = self.model.user_vectors({k: v.to(self.device) for k, v in inputs.items()}).float().cpu()
        self.model.train(was_training)
        return self.model.score(users, self.item_vectors)


class DeepSpeedTraining:
    """What worker `rank` of `world` holds to train with DeepSpeed on the prepared data: the model and its
    batches (`raysparse.build`), the engine (ZeRO stage, precision, accumulation and clipping from
    `ds_config`; warm-up + decay over `total_steps` optimizer steps) and its `stepper`, the full-precision
    Recommender `rec` that validation and the artifact read, and the files of an epoch's checkpoint."""

    def __init__(self, config: Config, prepared: Prepared, ds_config: dict, total_steps: int, rank: int = 0,
                 world: int = 1):
        self.config, self.split, self.rank, self.world = config, prepared.split, rank, world
        model, tokenizer, item_text = build_model(config, self.split.n_users, self.split.n_items,
                                                  prepared.item_texts, config.data.resolved_cache_dir)
        self.builder = build_batches(config, self.split, item_text)
        dtype = engine_dtype(ds_config)
        self.zero_stage = ds_config.get("zero_optimization", {}).get("stage", 0)
        # Validation and the artifact read full fp32 weights: a separate copy (on the worker's device) when the
        # engine's weights are half precision or partitioned (ZeRO-3); otherwise the engine's module itself.
        eval_copy = copy.deepcopy(model).float() if dtype != torch.float32 or self.zero_stage == 3 else None
        self.engine = build_engine(model, config, ds_config, total_steps)  # after the copy: ZeRO-3 partitions
        self.stepper = EngineStepper(self.engine, config.train.loss, dtype)
        self.device = self.engine.device
        self.eval_copy = None if eval_copy is None else eval_copy.to(self.device)
        eval_model = self.engine.module if self.eval_copy is None else self.eval_copy
        self.rec = DeviceRecommender(eval_model, self.device, config, prepared.log.users, prepared.log.items,
                                     self.builder, tokenizer, item_table(prepared))

    def restore(self, folder: Path) -> list[dict]:
        """Load the checkpoint `save` wrote in `folder`; returns its history. DeepSpeed restores the weights, the
        optimizer (its shard of it under ZeRO 1-2), the LR schedule's step and the optimizer-step count; the
        micro-batch count, which places DeepSpeed's accumulation boundaries and which DeepSpeed does not save,
        comes from train_state.json. Not saved: a gradient half-accumulated when an epoch ends (only when
        steps per epoch is not a multiple of train.grad_accum_steps). The data order and the dropout,
        negative-sampling and augmentation draws are seeded per epoch by the worker loop; early stopping
        reads the history."""
        self.engine.load_checkpoint(str(folder / "deepspeed"), tag="state")
        state = json.loads((folder / "train_state.json").read_text())
        self.engine.micro_steps = int(state.get("micro_steps", self.engine.micro_steps))  # older checkpoints lack it
        return state["history"]

    def evaluate(self) -> dict:
        """Validation metrics ("val/...", full ranking) of the current weights, and val_seconds. Each worker
        ranks a disjoint slice of the users and the ranks are gathered: every worker returns exactly what one
        process would compute."""
        t0 = time.perf_counter()
        self._sync_eval_weights()
        self.rec.refresh()
        users = self.split.evaluated_users
        ranks = distributed_ranks(self.rec.score_users, self.split, users, "val", self.config.train.eval_batch_size,
                                  self.rank, self.world)
        metrics = flatten(summarize(ranks, self.split, users), "val/")
        metrics["val_seconds"] = time.perf_counter() - t0
        metrics[USER_NDCG] = user_ndcg(ranks)      # per user, for train.patience_z; the loop pops it
        return metrics

    def _sync_eval_weights(self) -> None:
        if self.eval_copy is None:
            return
        module = self.engine.module
        if self.zero_stage == 3:
            import deepspeed

            with deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None):
                state = {k: v.detach().float().clone() for k, v in module.state_dict().items()}
        else:
            state = {k: v.detach().float() for k, v in module.state_dict().items()}
        self.eval_copy.load_state_dict(state)

    def save(self, folder: Path, record: dict, history: list[dict], artifact: bool = True) -> None:
        """The checkpoint of the epoch of `record` in `folder`: deepspeed/ from every rank (weights, optimizer,
        LR schedule; one optimizer shard per rank under ZeRO 1-2), and from rank 0 train_state.json (epoch,
        history, DeepSpeed's micro-batch count) and, with `artifact`, artifact/ (the serving artifact, with the
        epoch's validation metrics)."""
        self.engine.save_checkpoint(str(folder / "deepspeed"), tag="state")
        if self.rank != 0:
            return
        state = {"epoch": record["epoch"], "history": history, "micro_steps": int(self.engine.micro_steps)}
        (folder / "train_state.json").write_text(json.dumps(state, default=float))
        if artifact:
            val = {k: v for k, v in record.items() if k.startswith("val/")}
            self.rec.save(folder / "artifact", metrics={"val": val, "epoch": record["epoch"]})
