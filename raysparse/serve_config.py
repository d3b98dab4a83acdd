"""ServeConfig: how an artifact is served (address, replicas, autoscaling, batching), and where it is read from.

The same mechanism as the run's config: a YAML file (its `serve:` section) plus `--set serve.KEY=VALUE`, each
key typed and checked by config.py's helpers. `raysparse serve` also keeps one flag per key (`--port 8001`,
the shortcut of `--set serve.port=8001`). Later wins: file, then --set, then flags. Ray-free: the plain server
reads it as well as the Serve deployment.
"""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from raysparse.config import Config, option, parse_set_value, read_config_file, section_from_dict
from raysparse.errors import ConfigError

TEXT_ENCODER_DTYPES = ("auto", "float32", "bfloat16")   # ServeConfig.text_encoder_dtype's choices


@dataclass(frozen=True)
class ServeConfig:
    """How the model is served. The model itself comes from the artifact; its config has no serve section."""

    host: str = option("127.0.0.1", "Address the HTTP proxy binds to. 127.0.0.1 keeps the API on this machine; "
                                    "0.0.0.0 opens it to the network (put authentication in front first).")
    port: int = option(8000, "HTTP port of the Serve proxy.")
    app_name: str = option("raysparse", "Serve application name; deploying again under this name hot-swaps the "
                                        "model of the running app.")
    route_prefix: str = option("/", "URL prefix of the API, e.g. /recsys.")
    num_replicas: int = option(1, "Replicas when autoscaling is off (max_replicas = 0).")
    min_replicas: int = option(1, "Autoscaling: fewest replicas (>= 1, so the model stays loaded).")
    max_replicas: int = option(0, "Autoscaling: most replicas; > 0 turns autoscaling on, 0 keeps num_replicas.")
    target_ongoing_requests: float = option(8.0, "Autoscaling: in-flight requests per replica it aims for.")
    num_cpus_per_replica: float = option(1.0, "CPUs reserved per replica; also torch's thread count there.")
    num_gpus_per_replica: float = option(0.0, "GPUs reserved per replica (0 on CPU machines).")
    max_ongoing_requests: int = option(64, "Requests one replica works on at once; >= max_batch_size, or text "
                                           "batches can never fill.")
    max_batch_size: int = option(32, "Most requests scored together (text and user/history requests batch apart).")
    batch_wait_timeout_s: float = option(0.0, "user_id/history requests: extra wait for a batch to fill after its "
                                              "first request. 0: take what queued while the previous batch ran (no "
                                              "added latency when idle).")
    text_batch_wait_timeout_s: float = option(0.005, "text requests: the same wait. An encoder pass costs ~10 ms a "
                                                    "text alone but a fraction of that in a batch, so waiting pays "
                                                    "under load.")
    max_queued_requests: int = option(100, "Requests Serve's proxy holds for a busy deployment before answering "
                                           "503 with Retry-After (back-pressure instead of queueing for seconds); "
                                           "-1: no limit.")
    max_queued_texts: int = option(32, "Text requests one replica holds (queued for or inside an encoder batch) "
                                       "before answering 503 with Retry-After; 0: no limit.")
    retry_after_s: int = option(1, "Seconds a 503 (back-pressure) tells the client to wait (Retry-After).")
    access_log: bool = option(True, "Log one line per request (proxy and replicas); off for load tests.")
    text_encoder_dtype: str = option("auto", "Weights of the text encoder for free-text queries: float32, bfloat16, "
                                             "or auto (bfloat16 for a frozen encoder on a CPU with native bfloat16, "
                                             "AVX512-BF16 or AMX; float32 elsewhere). MiniLM: 9.4 -> 7.6 ms a text "
                                             "on one core, embeddings at cosine >= 0.9999.")

    def __post_init__(self) -> None:
        types = {"str": str, "int": int, "float": (int, float), "bool": bool}
        for f in dataclasses.fields(self):
            value, expected = getattr(self, f.name), types[f.type]
            if isinstance(value, bool) != (f.type == "bool") or not isinstance(value, expected):
                raise ConfigError(f"serve.{f.name}={value!r} has the wrong type: expected {f.type} "
                                  f"(flag --{_flag(f.name)}).")
        if not 1 <= self.port <= 65535:
            raise ConfigError(f"serve.port={self.port} must be in [1, 65535]; e.g. --port 8000.")
        if not self.host:
            raise ConfigError("serve.host is empty; use --host 127.0.0.1 (this machine only) or an address.")
        if not self.route_prefix.startswith("/"):
            raise ConfigError(f"serve.route_prefix={self.route_prefix!r} must start with '/'; e.g. "
                              f"--route-prefix /recsys.")
        if not self.app_name:
            raise ConfigError("serve.app_name is empty; use e.g. --app-name raysparse.")
        if self.num_replicas < 1:
            raise ConfigError(f"serve.num_replicas={self.num_replicas} must be >= 1.")
        if self.max_replicas == 0 and self.min_replicas != 1:
            raise ConfigError(f"serve.min_replicas={self.min_replicas} needs autoscaling: also set --max-replicas "
                              f"(>= min), or drop --min-replicas and use --num-replicas.")
        if self.max_replicas < 0 or (self.max_replicas > 0 and not 1 <= self.min_replicas <= self.max_replicas):
            raise ConfigError(f"autoscaling needs 1 <= serve.min_replicas <= serve.max_replicas, got "
                              f"min_replicas={self.min_replicas}, max_replicas={self.max_replicas}; e.g. "
                              f"--min-replicas 1 --max-replicas 4.")
        if self.target_ongoing_requests <= 0:
            raise ConfigError(f"serve.target_ongoing_requests={self.target_ongoing_requests} must be > 0.")
        for name in ("num_cpus_per_replica", "num_gpus_per_replica", "batch_wait_timeout_s",
                     "text_batch_wait_timeout_s"):
            if getattr(self, name) < 0:
                raise ConfigError(f"serve.{name}={getattr(self, name)} must be >= 0 (flag --{_flag(name)}).")
        if self.max_queued_requests < 1 and self.max_queued_requests != -1:
            raise ConfigError(f"serve.max_queued_requests={self.max_queued_requests} must be >= 1, or -1 for no "
                              f"limit (flag --max-queued-requests).")
        if self.max_queued_texts < 0:
            raise ConfigError(f"serve.max_queued_texts={self.max_queued_texts} must be >= 0 (0: no limit; flag "
                              f"--max-queued-texts).")
        if self.text_encoder_dtype not in TEXT_ENCODER_DTYPES:
            raise ConfigError(f"serve.text_encoder_dtype={self.text_encoder_dtype!r} must be one of "
                              f"{', '.join(TEXT_ENCODER_DTYPES)} (flag --text-encoder-dtype).")
        if self.retry_after_s < 1:
            raise ConfigError(f"serve.retry_after_s={self.retry_after_s} must be >= 1 (flag --retry-after-s).")
        if self.max_batch_size < 1:
            raise ConfigError(f"serve.max_batch_size={self.max_batch_size} must be >= 1 (1 turns batching off).")
        if self.max_ongoing_requests < self.max_batch_size:
            raise ConfigError(f"serve.max_ongoing_requests={self.max_ongoing_requests} is below "
                              f"serve.max_batch_size={self.max_batch_size}, so a batch could never fill; raise "
                              f"--max-ongoing-requests to at least {self.max_batch_size}.")

    def check_capacity(self, capacity: dict[str, float], with_text: bool) -> None:
        """ConfigError when the cluster (`capacity`: CPU/GPU totals, as `ray_train.cluster_capacity` gives them)
        cannot hold the replicas a deploy starts; Serve itself would wait for them forever. Each deployment, the
        ingress and (when the model reads text) the text encoder's, starts num_replicas (autoscaling:
        min_replicas) replicas of num_cpus_per_replica CPUs and num_gpus_per_replica GPUs. A hot swap needs
        room for twice that while it runs (new replicas start before old ones stop); that is not checked here."""
        deployments = 2 if with_text else 1
        replicas = self.min_replicas if self.autoscaling else self.num_replicas
        for resource, per_replica, flag in (("CPU", self.num_cpus_per_replica, "num-cpus-per-replica"),
                                            ("GPU", self.num_gpus_per_replica, "num-gpus-per-replica")):
            need, have = deployments * replicas * per_replica, capacity.get(resource, 0.0)
            if need > have:
                raise ConfigError(
                    f"serving needs {need:g} {resource}s ({deployments} deployment(s)"
                    f"{' (the ingress and the text encoder)' if with_text else ''} x {replicas} replica(s) x "
                    f"{per_replica:g} {resource}), but the Ray cluster has {have:g}. Lower --{flag} or the "
                    f"replicas, or add nodes.")

    @property
    def autoscaling(self) -> bool:
        return self.max_replicas > 0

    @property
    def torch_threads(self) -> int:
        return max(1, int(self.num_cpus_per_replica))

    def url(self) -> str:
        host = "127.0.0.1" if self.host in ("0.0.0.0", "::") else self.host
        return f"http://{host}:{self.port}{self.route_prefix.rstrip('/')}"


def _flag(name: str) -> str:
    return name.replace("_", "-")


# A run's YAML file may carry a `serve:` section beside the run's own keys; `raysparse serve` leaves those to
# train and tune (the served model's config comes from the artifact).
RUN_KEYS = tuple(f.name for f in dataclasses.fields(Config)) + ("tune",)


def load_serve_config(path: str | Path | None = None, sets: list[str] | None = None,
                      flags: dict[str, Any] | None = None) -> ServeConfig:
    """ServeConfig from a YAML file's `serve:` section, then `--set serve.KEY=VALUE` strings, then per-key flag
    values (`{"port": 8001}`); each later one wins. Unknown keys and wrong types raise a ConfigError."""
    raw = read_config_file(path)
    if path:
        other = [key for key in raw if key != "serve" and key not in RUN_KEYS]
        if other:
            raise ConfigError(f"Unknown top-level key(s) {other} in config file {str(path)!r}; serve keys go under "
                              f"`serve:`, e.g. `serve: {{port: 8001}}`.")
        if not isinstance(raw.get("serve"), dict):
            raise ConfigError(f"Config file {str(path)!r} has no `serve:` section; put the serve keys under it, "
                              f"e.g. `serve: {{port: 8001}}`.")
    values = dict(raw.get("serve") or {})
    for item in sets or []:
        key, eq, text = item.partition("=")
        section, _, name = key.strip().partition(".")
        if not eq or section != "serve":
            raise ConfigError(f"--set {item!r} must look like serve.KEY=VALUE, e.g. serve.port=8001 (the model's "
                              f"own keys come from the artifact).")
        values[name] = parse_set_value(text, f"serve.{name}", {"serve": ServeConfig})
    values.update(flags or {})
    return section_from_dict("serve", ServeConfig, values)


def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    """--config, --set serve.KEY=VALUE and one flag per ServeConfig field (`--max-batch-size`), each flag with
    the field's help text, its key and its default."""
    parser.add_argument("--config", default=None, metavar="FILE",
                        help="YAML file whose `serve:` section sets the keys below (a run's other sections may "
                             "stand beside it).")
    parser.add_argument("--set", dest="sets", action="append", default=[], metavar="serve.KEY=VALUE",
                        help="Set one key below; repeatable; wins over --config, and a key's own flag wins over "
                             "both. E.g. --set serve.port=8001 (or --port 8001).")
    for f in dataclasses.fields(ServeConfig):
        shown = f"{f.metadata['help']} (serve.{f.name}; default: {f.default})"
        if f.type == "bool":
            parser.add_argument(f"--{_flag(f.name)}", dest=f.name, action=argparse.BooleanOptionalAction,
                                default=None, help=shown)
            continue
        kind = {"str": str, "int": int, "float": float}[f.type]
        parser.add_argument(f"--{_flag(f.name)}", dest=f.name, type=kind, default=None, help=shown)


def serve_config_from_args(args: argparse.Namespace) -> ServeConfig:
    """The ServeConfig of parsed `add_serve_arguments` flags: --config, then --set, then the flags given."""
    flags = {f.name: getattr(args, f.name) for f in dataclasses.fields(ServeConfig)
             if getattr(args, f.name) is not None}
    return load_serve_config(args.config, args.sets, flags)
