"""Shared fixtures: a small planted dataset and a tiny BERT built from a config (no network)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

TOPIC_WORDS = [["galaxy", "rocket", "alien", "orbit"], ["castle", "dragon", "sword", "wizard"],
               ["detective", "murder", "clue", "alibi"], ["love", "wedding", "kiss", "romance"]]


def planted_frames(n_users: int = 120, n_items: int = 40, seed: int = 0) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Items belong to 4 topics whose words are in their titles; each user watches items of one topic in a
    fixed cyclic order, so both the text and the sequence predict the next item."""
    rng = np.random.default_rng(seed)
    topic_of = np.arange(n_items) % 4
    items = pd.DataFrame({
        "item_id": [f"i{i:03d}" for i in range(n_items)],
        "title": [" ".join(rng.choice(TOPIC_WORDS[t], 2)) + f" {i}" for i, t in enumerate(topic_of)],
        "genres": [f"genre{t}" for t in topic_of],
    })
    rows = []
    for u in range(n_users):
        topic = u % 4
        pool = np.flatnonzero(topic_of == topic)
        length = int(rng.integers(4, 9))
        start = int(rng.integers(0, len(pool)))
        for t in range(length):
            rows.append((f"u{u:03d}", f"i{pool[(start + t) % len(pool)]:03d}", 1000 + 10 * t + u))
    return pd.DataFrame(rows, columns=["user_id", "item_id", "timestamp"]), items


@pytest.fixture(scope="session")
def frames():
    return planted_frames()


@pytest.fixture(scope="session")
def dataset_dir(tmp_path_factory, frames):
    """The planted frames as a parquet folder (interactions + items), as jobs and the CLI read data."""
    folder = tmp_path_factory.mktemp("planted")
    frames[0].to_parquet(folder / "interactions.parquet")
    frames[1].to_parquet(folder / "items.parquet")
    return folder


@pytest.fixture(scope="session")
def tiny_encoder(tmp_path_factory, frames):
    from raysparse.data.text import render_item_texts
    from raysparse.model.text import build_tiny_encoder

    texts = render_item_texts(frames[1], "{title}. {genres}")
    return build_tiny_encoder(tmp_path_factory.mktemp("tiny_bert"), texts + ["space opera"])


def make_artifact(tmp_path_factory, frames, encoder: str, seed: int = 0, variant: str = "fused") -> str:
    """A tiny trained artifact, built once per pytest session (cached under the session's base temp dir)."""
    from pathlib import Path

    from raysparse.build import prepare_data
    from raysparse.config import config_from_dict
    from raysparse.local import run_local

    out = Path(tmp_path_factory.getbasetemp()) / f"serve_artifact_{variant}_{seed}"
    if not (out / "artifact" / "format.json").exists():
        cfg = config_from_dict({
            "output": str(out), "data": {"text_template": "{title}. {genres}", "max_length": 32},
            "model": {"variant": variant, "text_model": encoder, "finetune": "top", "text_dim": 16,
                      "fusion_dim": 16, "dmf_user_layers": [32, 16], "dmf_item_layers": [32, 16]},
            "train": {"epochs": 1, "batch_size_per_worker": 64, "negatives_per_positive": 16, "seed": seed}})
        run_local(cfg, prepare_data(cfg, frames), log=lambda _: None)
    return str(out / "artifact")


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ray_instance():
    """A local 2-CPU Ray for one test module (the Ray Train, Tune tests), shut down after it."""
    import ray

    if ray.is_initialized():
        ray.shutdown()
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=True)
    ray.data.DataContext.get_current().enable_progress_bars = False
    yield ray
    ray.shutdown()
