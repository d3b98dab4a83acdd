"""The embedded synthetic dataset: planted topics that both the text tower and DMF can learn.

Generative story (all vectorized numpy; 10M interactions in seconds, deterministic for a seed):
  * Topics. Each of `n_topics` topics has a genre name and a small vocabulary of distinctive words; items
    have 1-2 topics and their title, genres and description use words of their topics only (plus shared
    filler words), so a text encoder can learn the topics from the words.
  * Items. Popularity is Zipf-like (weight 1 / rank^zipf_exponent over a random ranking), so a few items
    get most interactions and a long tail gets few.
  * Users. Activity is log-normal (heavy tailed): >= 40% of users have <= 5 interactions, a few have 100+.
    Each user prefers 1-2 topics with Dirichlet weights.
  * Interactions. Each draw comes, with probability `topic_share` (0.85), from the current topic (weighted
    by item popularity), else from global popularity. The current topic drifts slowly: it is the previous
    draw's topic with probability `topic_stickiness` (0.5), else drawn from the user's preferences -- the
    sequential structure that "predict the last item" needs. (user, item) pairs are unique; timestamps
    strictly increase per user.
Ids are strings ("u00042", "i00007") so every run exercises string-id handling.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from raysparse.errors import ConfigError

# (genre name, distinctive words). Every word belongs to exactly one topic and to no filler list.
_TOPICS: list[tuple[str, list[str]]] = [
    ("Space", ["galaxy", "rocket", "orbit", "astronaut", "nebula", "comet", "starship", "planet", "meteor", "cosmos"]),
    ("Ocean", ["reef", "tide", "sailor", "whale", "harbor", "coral", "lighthouse", "lagoon", "dolphin", "voyage"]),
    ("Jungle", ["vine", "jaguar", "canopy", "explorer", "temple", "monsoon", "parrot", "rainforest", "orchid",
                "expedition"]),
    ("Cooking", ["recipe", "chef", "pastry", "spice", "oven", "feast", "bakery", "saucepan", "dumpling", "cookbook"]),
    ("Fantasy", ["knight", "dragon", "sword", "throne", "kingdom", "wizard", "castle", "quest", "armor", "princess"]),
    ("Music", ["melody", "guitar", "concert", "rhythm", "choir", "drummer", "album", "ballad", "symphony", "encore"]),
    ("Robots", ["android", "circuit", "laser", "cyborg", "machine", "hacker", "neural", "drone", "reactor", "silicon"]),
    ("Desert", ["dune", "cactus", "caravan", "oasis", "mirage", "camel", "sandstorm", "canyon", "nomad", "scorpion"]),
    ("Winter", ["glacier", "snowfall", "sled", "blizzard", "frost", "igloo", "avalanche", "reindeer", "icicle",
                "tundra"]),
    ("Mystery", ["detective", "clue", "alibi", "suspect", "inspector", "riddle", "witness", "verdict", "fingerprint",
                 "cipher"]),
    ("Farm", ["tractor", "barn", "orchard", "meadow", "cattle", "scarecrow", "haystack", "rooster", "vineyard",
              "pasture"]),
    ("Sports", ["stadium", "striker", "marathon", "coach", "trophy", "referee", "sprinter", "league", "goalkeeper",
                "champion"]),
]
FILLER_WORDS = ["the", "of", "and", "a", "story", "night", "return", "secret", "last", "great", "little",
                "journey", "legend", "day", "world", "tale", "lost", "new", "old", "home"]
_SYLLABLES = ["ka", "lo", "mi", "ru", "te", "zan", "vo", "pel", "qui", "dor", "bex", "sul"]
WORDS_PER_TOPIC = 10


def topic_vocabulary(n_topics: int) -> list[tuple[str, list[str]]]:
    """(genre name, distinctive words) per topic. The first 12 are English themes; beyond that, made-up
    words that are still unique to their topic."""
    topics = list(_TOPICS[:n_topics])
    for k in range(len(topics), n_topics):
        # Base-12 syllables of a running number: unique by construction, never an English word above.
        words = []
        for j in range(WORDS_PER_TOPIC):
            number, word = k * WORDS_PER_TOPIC + j, ""
            for _ in range(3):
                number, digit = divmod(number, len(_SYLLABLES))
                word += _SYLLABLES[digit]
            words.append(word)
        topics.append((f"Topic{k}", words))
    return topics


@dataclass
class SyntheticData:
    """One generated dataset, in memory. U users, I items, E interactions."""

    interactions: pd.DataFrame   # (E, 4) user_id str, item_id str, rating float32, timestamp int64; by user, time
    items: pd.DataFrame          # (I, 4) item_id, title, genres, description
    user_topics: np.ndarray      # (U, 2) int64 preferred topics, -1 where the user has only one
    item_topics: np.ndarray      # (I, 2) int64 topics of each item, -1 where the item has only one
    user_idx: np.ndarray         # (E,) int64 dense user of each interaction (row i of `interactions`)
    item_idx: np.ndarray         # (E,) int64 dense item of each interaction


def _id_strings(prefix: str, n: int) -> list[str]:
    width = max(5, len(str(n - 1)))
    return [f"{prefix}{i:0{width}d}" for i in range(n)]


def _segment_starts(lengths: np.ndarray) -> np.ndarray:
    return np.concatenate(([0], np.cumsum(lengths)[:-1])).astype(np.int64)


def _first_per_user(user: np.ndarray, item: np.ndarray, n_items: int) -> np.ndarray:
    """Mask of rows that repeat an earlier (user, item) pair."""
    key = user * n_items + item
    order = np.argsort(key, kind="stable")  # stable: among equal keys, earliest row first
    sorted_key = key[order]
    repeat = np.zeros(len(key), bool)
    repeat[order[1:][sorted_key[1:] == sorted_key[:-1]]] = True
    return repeat


def _item_texts(rng: np.random.Generator, item_topics: np.ndarray, vocab: list[tuple[str, list[str]]]
                ) -> tuple[list[str], list[str], list[str]]:
    """Titles, genres and descriptions whose distinctive words come from the items' own topics."""
    n = len(item_topics)
    words = np.array([w for _, ws in vocab for w in ws], dtype=object)      # (T * W,)
    genres_by_topic = [g for g, _ in vocab]
    second = np.where(item_topics[:, 1] >= 0, item_topics[:, 1], item_topics[:, 0])
    # Title: filler + a word of the first topic + a word of the second (the first again for 1-topic items).
    title_words = np.stack([
        words[item_topics[:, 0] * WORDS_PER_TOPIC + rng.integers(0, WORDS_PER_TOPIC, n)],
        words[second * WORDS_PER_TOPIC + rng.integers(0, WORDS_PER_TOPIC, n)]], axis=1)
    title_filler = np.array(FILLER_WORDS, dtype=object)[rng.integers(0, len(FILLER_WORDS), n)]
    # Description: 6 topic words (alternating topics) and 6 filler words, shuffled per item.
    topic_of_slot = np.where(np.arange(6) % 2 == 0, item_topics[:, [0]], second[:, None])          # (I, 6)
    desc_topic = words[topic_of_slot * WORDS_PER_TOPIC + rng.integers(0, WORDS_PER_TOPIC, (n, 6))]
    desc_filler = np.array(FILLER_WORDS, dtype=object)[rng.integers(0, len(FILLER_WORDS), (n, 6))]
    desc = np.concatenate([desc_topic, desc_filler], axis=1)
    desc = np.take_along_axis(desc, rng.random(desc.shape).argsort(axis=1), axis=1)
    titles = [f"{f.capitalize()} {a.capitalize()} {b.capitalize()}" for f, (a, b) in zip(title_filler, title_words)]
    genres = [genres_by_topic[a] if b < 0 else f"{genres_by_topic[a]}, {genres_by_topic[b]}"
              for a, b in item_topics.tolist()]
    descriptions = [" ".join(row).capitalize() + "." for row in desc.tolist()]
    return titles, genres, descriptions


def _check_args(n_users: int, n_items: int, n_topics: int, mean_interactions: float) -> None:
    for name, value in (("n_users", n_users), ("n_items", n_items), ("n_topics", n_topics)):
        if not isinstance(value, (int, np.integer)) or value < 1:
            raise ConfigError(f"{name}={value!r} must be a positive integer.")
    if n_topics < 2:
        raise ConfigError(f"n_topics={n_topics} must be >= 2 (items may have two distinct topics).")
    if n_items < 2 * n_topics:
        raise ConfigError(f"n_items={n_items} is too few for n_topics={n_topics}; use n_items >= {2 * n_topics} "
                          f"so every topic has items.")
    if not mean_interactions > 0:
        raise ConfigError(f"mean_interactions={mean_interactions!r} must be > 0.")


def make_synthetic(n_users: int, n_items: int, seed: int = 0, n_topics: int = 12, *,
                   mean_interactions: float = 25.0, activity_sigma: float = 1.8, zipf_exponent: float = 1.0,
                   topic_share: float = 0.85, topic_stickiness: float = 0.5,
                   start_time: int = 1_500_000_000, text_seed: int | None = None) -> SyntheticData:
    """Generate the dataset in memory (see the module docstring for the story).

    mean_interactions: target mean interactions per user before de-duplication (the log-normal's mean);
    activity_sigma: its spread (1.8 puts about half of the users at <= 5 interactions).
    A user's activity is capped at n_items // 4 so de-duplication rarely has to drop draws.
    text_seed: draw the item texts from their own stream, so that logs of any size with the same seed and
    catalogue share one catalogue text (and one text-embedding cache: `raysparse bench scale`); None draws
    them after the log, from the seed's stream.
    """
    _check_args(n_users, n_items, n_topics, mean_interactions)
    rng = np.random.default_rng(seed)
    vocab = topic_vocabulary(n_topics)

    # Items: 1-2 topics (about 40% have two), Zipf popularity over a random ranking.
    item_topics = np.full((n_items, 2), -1, dtype=np.int64)
    item_topics[:, 0] = np.arange(n_items) % n_topics  # every topic gets items, even for tiny catalogues
    rng.shuffle(item_topics[:, 0])
    two = rng.random(n_items) < 0.4
    item_topics[two, 1] = (item_topics[two, 0] + rng.integers(1, n_topics, two.sum())) % n_topics
    popularity = 1.0 / (rng.permutation(n_items) + 1.0) ** zipf_exponent

    # Per-topic item lists as one flat array; the cumulative weights of topic z span [z, z + 1), so one
    # searchsorted of (z + u) samples "an item of topic z by popularity" for every draw at once.
    member_item = np.concatenate([np.flatnonzero(item_topics[:, 0] == z) for z in range(n_topics)] +
                                 [np.flatnonzero(item_topics[:, 1] == z) for z in range(n_topics)])
    member_topic = np.concatenate([np.full((item_topics[:, 0] == z).sum(), z) for z in range(n_topics)] +
                                  [np.full((item_topics[:, 1] == z).sum(), z) for z in range(n_topics)])
    order = np.argsort(member_topic, kind="stable")
    member_item, member_topic = member_item[order], member_topic[order]
    weights = popularity[member_item]
    topic_totals = np.bincount(member_topic, weights=weights, minlength=n_topics)
    within = np.cumsum(weights) - np.concatenate(([0.0], np.cumsum(topic_totals)[:-1]))[member_topic]
    topic_cdf = member_topic + within / topic_totals[member_topic]
    global_cdf = np.cumsum(popularity) / popularity.sum()

    def sample_topic(z: np.ndarray) -> np.ndarray:
        pos = np.searchsorted(topic_cdf, z + rng.random(len(z)), side="right")
        pos = np.minimum(pos, len(member_item) - 1)
        pos = np.where(member_topic[pos] == z, pos, pos - 1)  # float round-off at a topic's upper edge
        return member_item[pos]

    def sample_global(k: int) -> np.ndarray:
        return np.minimum(np.searchsorted(global_cdf, rng.random(k), side="right"), n_items - 1)

    # Users: 1-2 preferred topics with Dirichlet(1, 1) weights; log-normal activity.
    user_topics = np.full((n_users, 2), -1, dtype=np.int64)
    user_topics[:, 0] = rng.integers(0, n_topics, n_users)
    two = rng.random(n_users) < 0.5
    user_topics[two, 1] = (user_topics[two, 0] + rng.integers(1, n_topics, two.sum())) % n_topics
    gamma = rng.gamma(1.0, size=(n_users, 2))
    first_weight = np.where(two, gamma[:, 0] / gamma.sum(axis=1), 1.0)
    mu = np.log(mean_interactions) - activity_sigma ** 2 / 2  # so the log-normal's mean is mean_interactions
    activity = np.rint(rng.lognormal(mu, activity_sigma, n_users)).astype(np.int64)
    activity = np.clip(activity, 1, max(1, n_items // 4))

    # Draws: the user's topic chain, then items.
    n = int(activity.sum())
    user = np.repeat(np.arange(n_users, dtype=np.int64), activity)
    starts = _segment_starts(activity)
    fresh_topic = np.where(rng.random(n) < first_weight[user], user_topics[user, 0], user_topics[user, 1])
    fresh = rng.random(n) >= topic_stickiness
    fresh[starts] = True
    last_fresh = np.maximum.accumulate(np.where(fresh, np.arange(n), 0))  # starts are fresh: stays per user
    topic = fresh_topic[last_fresh]
    from_topic = rng.random(n) < topic_share
    item = np.empty(n, dtype=np.int64)
    item[from_topic] = sample_topic(topic[from_topic])
    item[~from_topic] = sample_global(int((~from_topic).sum()))

    # Unique (user, item): redraw repeats from the same source, only among users that have repeats.
    repeat = _first_per_user(user, item, n_items)
    for _ in range(8):
        if not repeat.any():
            break
        rows = np.flatnonzero(repeat)
        topical = from_topic[rows]
        item[rows[topical]] = sample_topic(topic[rows[topical]])
        item[rows[~topical]] = sample_global(int((~topical).sum()))
        affected = np.isin(user, np.unique(user[rows]))
        sub = np.flatnonzero(affected)
        repeat = np.zeros(n, bool)
        repeat[sub] = _first_per_user(user[sub], item[sub], n_items)
    keep = ~repeat  # the few draws still repeating after the redraws are dropped (never a user's first)
    user, item, topic, from_topic = user[keep], item[keep], topic[keep], from_topic[keep]
    n = len(user)
    activity = np.bincount(user, minlength=n_users)
    starts = _segment_starts(activity)

    # Ratings 1..5, higher for items of the user's own topics; timestamps strictly increase per user.
    liked = (item_topics[item, 0] == user_topics[user, 0]) | (item_topics[item, 0] == user_topics[user, 1]) | \
            ((item_topics[item, 1] >= 0) & ((item_topics[item, 1] == user_topics[user, 0]) |
                                            (item_topics[item, 1] == user_topics[user, 1])))
    rating = np.clip(np.rint(3.0 + 1.0 * liked + rng.normal(0.0, 0.8, n)), 1, 5).astype(np.float32)
    gaps = 1 + rng.exponential(86_400.0, n).astype(np.int64)       # >= 1 s apart, about a day on average
    gaps[starts] = start_time + rng.integers(0, 365 * 86_400, n_users)  # each user starts somewhere in a year
    cum = np.cumsum(gaps)
    timestamp = cum - np.repeat(cum[starts] - gaps[starts], activity)

    user_ids = pa.array(_id_strings("u", n_users), type=pa.string())
    item_ids = pa.array(_id_strings("i", n_items), type=pa.string())
    interactions = pd.DataFrame({
        "user_id": user_ids.take(pa.array(user)).to_pandas(),
        "item_id": item_ids.take(pa.array(item)).to_pandas(),
        "rating": rating,
        "timestamp": timestamp,
    })
    text_rng = rng if text_seed is None else np.random.default_rng([seed, text_seed])
    titles, genres, descriptions = _item_texts(text_rng, item_topics, vocab)
    items = pd.DataFrame({"item_id": item_ids.to_pandas(), "title": pd.array(titles, dtype="str"),
                          "genres": pd.array(genres, dtype="str"), "description": pd.array(descriptions, dtype="str")})
    return SyntheticData(interactions=interactions, items=items, user_topics=user_topics, item_topics=item_topics,
                         user_idx=user, item_idx=item)


def generate_synthetic(out_dir: str, n_users: int, n_items: int, seed: int = 0, n_topics: int = 12, *,
                       mean_interactions: float = 25.0, **kwargs: float) -> dict:
    """Write `out_dir/interactions.parquet` and `out_dir/items.parquet` (the standard schema).

    Returns counts: {"users", "items", "interactions", "topics"} and the share of users with <= 5
    interactions. Extra keyword arguments go to `make_synthetic`.
    """
    data = make_synthetic(n_users, n_items, seed, n_topics, mean_interactions=mean_interactions, **kwargs)
    os.makedirs(out_dir, exist_ok=True)
    pq.write_table(pa.Table.from_pandas(data.interactions, preserve_index=False),
                   os.path.join(out_dir, "interactions.parquet"))
    pq.write_table(pa.Table.from_pandas(data.items, preserve_index=False), os.path.join(out_dir, "items.parquet"))
    per_user = np.bincount(data.user_idx, minlength=n_users)
    return {"users": int(n_users), "items": int(n_items), "interactions": int(len(data.interactions)),
            "topics": int(n_topics), "share_users_le_5": float((per_user <= 5).mean())}
