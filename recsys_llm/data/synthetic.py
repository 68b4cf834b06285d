"""The embedded default data set: synthetic CTR logs whose clicks depend on text semantics.

Users and items live in a world of 12 topics (sci-fi, cooking, sports, ...). Every item
has one topic that appears **only in its text** (title and description drawn from the
topic's vocabulary); its category is a media format (book, video, podcast, ...)
unrelated to the topic. Every user has one to three interest topics written into a
profile text with words of the same vocabularies. The click probability is::

    p(click) = sigmoid(b0 + a * (affinity(u, i) - 0.5) + user_bias_u + item_quality_i
                       + 0.3 * pop_z_i + hour/device/format/tag/price effects)
    affinity(u, i) = sum_t interest_u[t] * S[t, topic_i]

with ``pop_z`` the item's standardised log popularity and ``S`` a topic similarity matrix (1 on
the diagonal, 0.4 for related topics such as sci-fi/technology). A fraction of the items
(``cold_item_fraction``) never occurs in the training split, only in valid/test (extra column
``is_cold_item``): an ID-only model knows nothing about them, while a model that reads the item
and user texts can still match topic words ("starship" vs "astronaut").

Generation is vectorised numpy, deterministic given ``seed`` and streamed to Parquet in
chunks, so any size from thousands to tens of millions of rows fits in bounded memory.
"""

import dataclasses
import os
from typing import Dict, List, Optional, Tuple

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from tqdm import tqdm

from recsys_llm.atomic_dir import write_file_atomically
from recsys_llm.data.parquet_writer import ITEM_CATALOG, SplitWriter, arrow_schema_for, list_array
from recsys_llm.data.schema import DatasetSchema, FieldKind, FieldSpec
from recsys_llm.data.validation import check_number
from recsys_llm.progress import bar_options

# ---- the world --------------------------------------------------------------------------------------
TOPICS: Dict[str, List[str]] = {
    "science fiction": ["spaceship", "galaxy", "alien", "astronaut", "time travel", "starship", "android", "planet",
                        "cyborg", "wormhole", "nebula", "space station", "laser", "dystopia", "interstellar"],
    "cooking": ["recipe", "pasta", "baking", "chef", "kitchen", "sourdough", "spices", "dessert", "grill", "soup",
                "noodles", "pastry", "barbecue", "sauces", "casserole"],
    "sports": ["football", "basketball", "marathon", "tennis", "stadium", "championship", "coach", "soccer",
               "cycling", "athletes", "league", "goalkeeper", "sprint", "olympics", "playoffs"],
    "finance": ["stocks", "investing", "budget", "retirement savings", "bonds", "dividends", "mortgage", "portfolio",
                "taxes", "cryptocurrency", "banking", "inflation", "index funds", "credit", "wealth"],
    "travel": ["backpacking", "beaches", "passport", "hotels", "road trip", "islands", "flights", "tourism",
               "resorts", "city breaks", "cruises", "luggage", "sightseeing", "hostels", "guidebook"],
    "music": ["guitar", "concert", "jazz", "piano", "album", "drums", "orchestra", "songwriting", "vinyl records",
              "hip hop", "choir", "melody", "festival", "violin", "rock band"],
    "gaming": ["video games", "consoles", "esports", "multiplayer", "quests", "dungeon", "controller", "speedrun",
               "level design", "arcade", "role-playing", "boss fights", "pixel art", "game streaming", "strategy games"],
    "fashion": ["dresses", "sneakers", "runway", "handbags", "jewelry", "tailoring", "streetwear", "denim",
                "designer labels", "makeup", "fabrics", "wardrobe", "accessories", "vintage clothing", "outfits"],
    "health": ["fitness", "yoga", "nutrition", "sleep", "meditation", "workout", "vitamins", "wellness", "cardio",
               "stretching", "mental health", "diet", "hydration", "immunity", "posture"],
    "history": ["ancient Rome", "medieval castles", "empires", "archaeology", "world war", "pharaohs", "revolution",
                "dynasties", "knights", "manuscripts", "museums", "civilizations", "battles", "monarchy", "vikings"],
    "gardening": ["roses", "seedlings", "compost", "vegetable garden", "pruning", "greenhouse", "tulips", "soil",
                  "houseplants", "herbs", "orchard", "flower beds", "lawn care", "succulents", "watering"],
    "technology": ["smartphones", "laptops", "artificial intelligence", "software", "programming", "gadgets",
                   "cloud computing", "cybersecurity", "startups", "semiconductors", "databases", "open source",
                   "apps", "wireless networks", "robotics"],
}
TOPIC_NAMES: List[str] = list(TOPICS)
RELATED_TOPICS: List[Tuple[str, str]] = [
    ("science fiction", "technology"), ("science fiction", "gaming"), ("gaming", "technology"),
    ("cooking", "health"), ("cooking", "gardening"), ("sports", "health"), ("finance", "technology"),
    ("travel", "history"), ("music", "fashion"),
]
FORMATS: List[str] = ["book", "video", "podcast", "article", "online course", "event ticket", "product"]
FORMAT_EFFECT = np.array([0.0, 0.1, -0.1, -0.2, 0.0, 0.15, 0.05])
TAGS: List[str] = ["new release", "bestseller", "on sale", "award winning", "for beginners", "for experts",
                   "family friendly", "limited edition", "short", "long form"]
TAG_EFFECT = np.array([0.1, 0.2, 0.15, 0.1, 0.0, -0.05, 0.0, 0.05, 0.0, -0.1])
AGE_BUCKETS: List[str] = ["under 18", "18 to 24", "25 to 34", "35 to 44", "45 to 54", "55 to 64", "65 or older"]
GENDERS: List[str] = ["female", "male", "non-binary"]
OCCUPATIONS: List[str] = ["student", "engineer", "teacher", "nurse", "chef", "artist", "accountant", "retired person",
                          "athlete", "writer", "salesperson", "programmer"]
DEVICES: List[str] = ["mobile phone", "desktop computer", "tablet"]
DEVICE_EFFECT = np.array([0.1, -0.05, 0.0])
TITLE_WORDS: List[str] = ["Ultimate", "Hidden", "Modern", "Essential", "Secret", "Complete", "Little", "Great",
                          "Practical", "Curious", "Golden", "Everyday"]
TITLE_FORMS: List[str] = ["Guide to", "World of", "Book of", "Story of", "Art of", "Notes on"]

CHUNK_ROWS = 1 << 18
SPLIT_FRACTIONS = (("train", 0.8), ("valid", 0.1), ("test", 0.1))
# the item's side of a row (what ``elec.distill.swap_fields`` re-pairs); the rest is user and context
ITEM_FIELDS = ("item_id", "item_category", "item_tags", "item_price_log", "item_freshness")


def topic_similarity() -> np.ndarray:
    """(T, T) similarity between topics: 1 on the diagonal, 0.4 for related pairs, else 0."""
    sim = np.eye(len(TOPIC_NAMES))
    for a, b in RELATED_TOPICS:
        i, j = TOPIC_NAMES.index(a), TOPIC_NAMES.index(b)
        sim[i, j] = sim[j, i] = 0.4
    return sim


@dataclasses.dataclass(frozen=True)
class SyntheticConfig:
    """Size and shape of the synthetic data set.

    Args:
        num_rows (int): impressions over all splits (80/10/10 train/valid/test).
        seed (int): everything is a function of this seed.
        num_users (Optional[int]): users; default ``clip(num_rows // 40, 200, 2_000_000)``.
        num_items (Optional[int]): items; default ``clip(num_rows // 100, 100, 500_000)``.
        rows_per_group (int): Parquet row group size.
        cold_item_fraction (float): share of items that never occur in training.
        cold_row_fraction (float): share of valid/test rows drawn to show a cold item; a topic without a
            cold item shows a warm one there, so small worlds get fewer (about 0.25 at 20k rows,
            0.30 at 200k).
        affinity_weight (float): ``a`` in the click model (strength of the text signal).
    """

    num_rows: int = 100_000
    seed: int = 0
    num_users: Optional[int] = None
    num_items: Optional[int] = None
    rows_per_group: int = 65536
    cold_item_fraction: float = 0.1
    cold_row_fraction: float = 0.3
    affinity_weight: float = 3.0

    def __post_init__(self) -> None:
        check_number("SyntheticConfig.num_rows", self.num_rows, integer=True, minimum=10)
        check_number("SyntheticConfig.seed", self.seed, integer=True, minimum=0)
        check_number("SyntheticConfig.num_users", self.num_users, integer=True, minimum=1, optional=True)
        check_number("SyntheticConfig.num_items", self.num_items, integer=True, minimum=1, optional=True)
        check_number("SyntheticConfig.rows_per_group", self.rows_per_group, integer=True, minimum=1)
        # every item cold would leave the training split without its own items
        check_number("SyntheticConfig.cold_item_fraction", self.cold_item_fraction, minimum=0, below=1)
        check_number("SyntheticConfig.cold_row_fraction", self.cold_row_fraction, minimum=0, maximum=1)
        check_number("SyntheticConfig.affinity_weight", self.affinity_weight)

    @property
    def users(self) -> int:
        return self.num_users or int(np.clip(self.num_rows // 40, 200, 2_000_000))

    @property
    def items(self) -> int:
        return self.num_items or int(np.clip(self.num_rows // 100, 100, 500_000))


# ---- entities ------------------------------------------------------------------------------------------
@dataclasses.dataclass
class _Users:
    interest: np.ndarray  # (U + 1, T) weights summing to 1 (row 0: padding)
    bias: np.ndarray  # (U + 1,)
    activity: np.ndarray  # (U + 1,) sampling weight (0 for padding)
    age: np.ndarray  # (U + 1,) 1-based bucket ids
    gender: np.ndarray
    occupation: np.ndarray
    text: List[str]


@dataclasses.dataclass
class _Items:
    topic: np.ndarray  # (I + 1,) topic index
    cold: np.ndarray  # (I + 1,) bool
    quality: np.ndarray
    popularity: np.ndarray  # (I + 1,) sampling weight
    pop_z: np.ndarray  # standardised log popularity
    format: np.ndarray  # 1-based format ids
    price_log: np.ndarray
    freshness: np.ndarray
    tag_lengths: np.ndarray  # (I + 1,)
    tag_values: np.ndarray  # flat 1-based tag ids
    tag_offsets: np.ndarray  # (I + 2,)
    text: List[str]


def _join(words: List[str]) -> str:
    return words[0] if len(words) == 1 else ", ".join(words[:-1]) + " and " + words[-1]


def _make_users(config: SyntheticConfig, rng: np.random.Generator) -> _Users:
    n, t = config.users, len(TOPIC_NAMES)
    count = rng.choice([1, 2, 3], size=n + 1, p=[0.3, 0.45, 0.25])
    order = np.argsort(rng.random((n + 1, t)), axis=1)[:, :3]  # distinct interest topics per user
    raw = np.array([0.6, 0.3, 0.1])[None, :] * (np.arange(3)[None, :] < count[:, None])
    raw = raw * rng.uniform(0.7, 1.3, size=raw.shape)
    weights = raw / raw.sum(axis=1, keepdims=True)
    interest = np.zeros((n + 1, t))
    np.put_along_axis(interest, order, weights, axis=1)
    interest[0] = 1.0 / t
    activity = rng.lognormal(0.0, 0.8, size=n + 1)
    activity[0] = 0.0
    age = rng.integers(1, len(AGE_BUCKETS) + 1, size=n + 1)
    gender = rng.integers(1, len(GENDERS) + 1, size=n + 1)
    occupation = rng.integers(1, len(OCCUPATIONS) + 1, size=n + 1)
    word_pick = rng.integers(0, 15, size=(n + 1, 3, 3))
    texts = ["unknown user"]
    for u in range(1, n + 1):
        likes = [TOPICS[TOPIC_NAMES[order[u, k]]][word_pick[u, k, j]] for k in range(count[u]) for j in range(3 - k)]
        likes = list(dict.fromkeys(likes))
        texts.append(
            f"A {GENDERS[gender[u] - 1]} {OCCUPATIONS[occupation[u] - 1]} aged {AGE_BUCKETS[age[u] - 1]} "
            f"who is interested in {_join(likes)}."
        )
    return _Users(interest, rng.normal(0.0, 0.5, size=n + 1), activity, age, gender, occupation, texts)


def _make_items(config: SyntheticConfig, rng: np.random.Generator) -> _Items:
    n, t = config.items, len(TOPIC_NAMES)
    topic = rng.integers(0, t, size=n + 1)
    cold = np.zeros(n + 1, dtype=bool)
    # a fraction below 1 leaves at least one warm item (rounding, e.g. 0.96 of 10, would make all cold)
    num_cold = min(int(round(config.cold_item_fraction * n)), n - 1)
    cold[1 + rng.permutation(n)[:num_cold]] = True
    popularity = 1.0 / (rng.permutation(n + 1) + 10.0) ** 0.8
    popularity[0] = 0.0
    log_pop = np.log(popularity[1:])
    pop_z = np.zeros(n + 1)
    pop_z[1:] = (log_pop - log_pop.mean()) / (log_pop.std() + 1e-9)
    fmt = rng.integers(1, len(FORMATS) + 1, size=n + 1)
    price_log = rng.normal(0.0, 1.0, size=n + 1) + 0.3 * (fmt == FORMATS.index("product") + 1)
    tag_lengths = rng.choice([0, 1, 2, 3], size=n + 1, p=[0.3, 0.35, 0.25, 0.1])
    tag_lengths[0] = 0
    tag_values = np.concatenate(
        [1 + rng.permutation(len(TAGS))[:k] for k in tag_lengths] or [np.zeros(0, dtype=np.int64)]
    ).astype(np.int64)
    tag_offsets = np.zeros(n + 2, dtype=np.int64)
    np.cumsum(tag_lengths, out=tag_offsets[1:])
    words = rng.integers(0, 15, size=(n + 1, 5))
    adjective = rng.integers(0, len(TITLE_WORDS), size=n + 1)
    form = rng.integers(0, len(TITLE_FORMS), size=n + 1)
    texts = ["unknown item"]
    for i in range(1, n + 1):
        vocab = TOPICS[TOPIC_NAMES[topic[i]]]
        w = list(dict.fromkeys(vocab[k] for k in words[i]))
        title = f"The {TITLE_WORDS[adjective[i]]} {TITLE_FORMS[form[i]]} {w[0].title()}"
        kind = FORMATS[fmt[i] - 1]
        texts.append(f"{title}. {'An' if kind[0] in 'aeiou' else 'A'} {kind} about {_join(w[1:] or w)}.")
    return _Items(
        topic, cold, rng.normal(0.0, 0.3, size=n + 1), popularity, pop_z, fmt, price_log.astype(np.float32),
        rng.random(n + 1).astype(np.float32), tag_lengths, tag_values, tag_offsets, texts,
    )


# ---- impressions ---------------------------------------------------------------------------------------
def _sample_grouped(rng: np.random.Generator, group: np.ndarray, members: List[np.ndarray], cum: List[np.ndarray]) -> np.ndarray:
    """For every row, draws a member of its group with probability proportional to its weight."""
    out = np.zeros(group.shape[0], dtype=np.int64)
    for g, (ids, c) in enumerate(zip(members, cum)):
        rows = np.nonzero(group == g)[0]
        if rows.size:
            out[rows] = ids[np.minimum(np.searchsorted(c, rng.random(rows.size) * c[-1]), len(ids) - 1)]
    return out


class _Generator:
    """Draws impression rows for a split, chunk by chunk."""

    def __init__(self, config: SyntheticConfig, users: _Users, items: _Items) -> None:
        self._config = config
        self._users = users
        self._items = items
        self._sim = topic_similarity()
        self._user_cum = np.cumsum(users.activity)
        t = len(TOPIC_NAMES)
        all_ids = np.arange(len(items.topic))
        self._warm = [all_ids[(items.topic == k) & ~items.cold & (all_ids > 0)] for k in range(t)]
        self._cold = [all_ids[(items.topic == k) & items.cold & (all_ids > 0)] for k in range(t)]
        # tiny worlds: a topic without (warm/cold) items borrows from the topic's other list, then from all items
        any_warm = all_ids[~items.cold & (all_ids > 0)]
        fallback = any_warm if any_warm.size else all_ids[1:]
        self._cold = [c if c.size else w if w.size else fallback for c, w in zip(self._cold, self._warm)]
        self._warm = [w if w.size else fallback for w in self._warm]
        self._warm_cum = [np.cumsum(items.popularity[w]) for w in self._warm]
        self._cold_cum = [np.cumsum(items.popularity[c]) for c in self._cold]

    def rows(self, rng: np.random.Generator, n: int, allow_cold: bool) -> Dict[str, np.ndarray]:
        users, items, t = self._users, self._items, len(TOPIC_NAMES)
        user = np.minimum(np.searchsorted(self._user_cum, rng.random(n) * self._user_cum[-1]), len(users.activity) - 1)
        # half of the impressions follow the user's interests, the rest are random topics
        interest_cum = np.cumsum(users.interest[user], axis=1)  # (n, T)
        from_interest = (rng.random((n, 1)) < interest_cum).argmax(axis=1)
        topic = np.where(rng.random(n) < 0.5, from_interest, rng.integers(0, t, size=n))
        cold_row = (rng.random(n) < self._config.cold_row_fraction) if allow_cold else np.zeros(n, dtype=bool)
        item = np.where(
            cold_row,
            _sample_grouped(rng, np.where(cold_row, topic, -1), self._cold, self._cold_cum),
            _sample_grouped(rng, np.where(cold_row, -1, topic), self._warm, self._warm_cum),
        )
        hour = rng.integers(0, 24, size=n)
        device = rng.choice(len(DEVICES), size=n, p=[0.6, 0.3, 0.1])
        affinity = (users.interest[user] * self._sim[:, items.topic[item]].T).sum(axis=1)  # (n,)
        tag_len = items.tag_lengths[item]
        tag_off = np.zeros(n + 1, dtype=np.int64)
        np.cumsum(tag_len, out=tag_off[1:])
        gather = np.arange(tag_off[-1]) - np.repeat(tag_off[:-1] - items.tag_offsets[item], tag_len)
        tags = items.tag_values[gather]
        tag_effect = np.add.reduceat(np.append(TAG_EFFECT[tags - 1], 0.0), np.minimum(tag_off[:-1], tags.size)) * (tag_len > 0)
        evening = ((hour >= 18) & (hour <= 23)).astype(np.float64)
        logit = (
            -1.0
            + self._config.affinity_weight * (affinity - 0.5)
            + users.bias[user]
            + items.quality[item]
            + 0.3 * items.pop_z[item]
            + 0.2 * evening
            + DEVICE_EFFECT[device]
            + FORMAT_EFFECT[items.format[item] - 1]
            + tag_effect
            - 0.15 * items.price_log[item]
        )
        label = (rng.random(n) < 1.0 / (1.0 + np.exp(-logit))).astype(np.int8)
        return {
            "user_id": user,
            "item_id": item,
            "item_category": items.format[item],
            "item_tags": list_array(tag_len, tags),
            "user_age_bucket": users.age[user],
            "user_gender": users.gender[user],
            "user_occupation": users.occupation[user],
            "hour_of_day": hour + 1,
            "device": device + 1,
            "item_price_log": items.price_log[item],
            "user_activity_log": np.log(users.activity[user]).astype(np.float32),
            "item_freshness": items.freshness[item],
            "label": label,
            "is_cold_item": items.cold[item].astype(np.int8),
        }


# ---- schema and text files -----------------------------------------------------------------------------
def synthetic_schema(config: SyntheticConfig) -> DatasetSchema:
    """The schema of a synthetic data set of the given size."""
    fields = [
        FieldSpec("user_id", FieldKind.SPARSE, config.users + 1, description="id of the user who saw the item (0 = unknown)",
                  value_text="text/user_id.parquet"),
        FieldSpec("item_id", FieldKind.SPARSE, config.items + 1,
                  description="id of the recommended item; its text is the item's title and description",
                  value_text="text/item_id.parquet"),
        FieldSpec("item_category", FieldKind.SPARSE, len(FORMATS) + 1,
                  description="media format of the item (book, video, podcast, ...)", value_text="text/item_category.parquet"),
        FieldSpec("item_tags", FieldKind.SEQUENCE, len(TAGS) + 1, max_length=3,
                  description="marketing tags attached to the item (bestseller, on sale, ...)", value_text="text/item_tags.parquet"),
        FieldSpec("user_age_bucket", FieldKind.SPARSE, len(AGE_BUCKETS) + 1, description="age group of the user",
                  value_text="text/user_age_bucket.parquet"),
        FieldSpec("user_gender", FieldKind.SPARSE, len(GENDERS) + 1, description="gender of the user",
                  value_text="text/user_gender.parquet"),
        FieldSpec("user_occupation", FieldKind.SPARSE, len(OCCUPATIONS) + 1, description="occupation of the user",
                  value_text="text/user_occupation.parquet"),
        FieldSpec("hour_of_day", FieldKind.SPARSE, 25, description="hour of the day when the item was shown",
                  value_text="text/hour_of_day.parquet"),
        FieldSpec("device", FieldKind.SPARSE, len(DEVICES) + 1, description="device the user browsed on",
                  value_text="text/device.parquet"),
        FieldSpec("item_price_log", FieldKind.DENSE, description="standardised logarithm of the item's price"),
        FieldSpec("user_activity_log", FieldKind.DENSE, description="logarithm of how often the user visits"),
        FieldSpec("item_freshness", FieldKind.DENSE, description="how recently the item was published, 0 (old) to 1 (new)"),
    ]
    return DatasetSchema(
        name="synthetic",
        fields=fields,
        label="label",
        row_key="row_id",
        splits={name: f"{name}.parquet" for name, _ in SPLIT_FRACTIONS},
        extra_columns=["is_cold_item"],
    )


def write_value_text(path: str, texts: List[str]) -> None:
    """Writes an id -> text table (ids 0..len-1) as Parquet with columns ``id`` int64, ``text`` string."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    table = pa.table({"id": pa.array(np.arange(len(texts)), pa.int64()), "text": pa.array(texts, pa.string())})
    pq.write_table(table, path, compression="zstd")


def write_item_catalog(path: str, items: "_Items") -> None:
    """One row per item id 1..I: the ``ITEM_FIELDS`` columns as the splits hold them, plus ``is_cold_item``."""
    ids = np.arange(1, len(items.topic))
    tag_lengths = items.tag_lengths[ids]
    tags = np.concatenate([items.tag_values[items.tag_offsets[i]:items.tag_offsets[i + 1]] for i in ids] or
                          [np.zeros(0, dtype=np.int64)])
    table = pa.table({
        "item_id": pa.array(ids, pa.int64()),
        "item_category": pa.array(items.format[ids].astype(np.int64)),
        "item_tags": list_array(tag_lengths, tags),
        "item_price_log": pa.array(items.price_log[ids]),
        "item_freshness": pa.array(items.freshness[ids]),
        "is_cold_item": pa.array(items.cold[ids].astype(np.int8)),
    })
    write_file_atomically(path, lambda handle: pq.write_table(table, handle, compression="zstd"))


def _hour_text(hour: int) -> str:
    part = "night" if hour < 6 else "morning" if hour < 12 else "afternoon" if hour < 18 else "evening"
    return f"{hour}:00, in the {part}"


def split_sizes(num_rows: int) -> Dict[str, int]:
    """Rows of each split of ``num_rows`` generated ones (``SPLIT_FRACTIONS``; the last split takes the rest)."""
    sizes = {split: int(num_rows * fraction) for split, fraction in SPLIT_FRACTIONS[:-1]}
    sizes[SPLIT_FRACTIONS[-1][0]] = num_rows - sum(sizes.values())
    return sizes


def generate_synthetic(
    out_dir: str,
    num_rows: int,
    seed: int = 0,
    num_users: Optional[int] = None,
    num_items: Optional[int] = None,
    rows_per_group: int = 65536,
    cold_item_fraction: float = 0.1,
    progress: bool = False,
    config: Optional[SyntheticConfig] = None,
) -> DatasetSchema:
    """Generates the synthetic data set into ``out_dir`` and returns its schema.

    Writes ``train/valid/test.parquet`` (80/10/10 of ``num_rows``; row ids are global and
    ordered like time), ``text/<field>.parquet`` value-text files, the item catalogue
    ``ITEM_CATALOG`` (:func:`write_item_catalog`) and ``schema.json``.
    Columns: ``row_id``, the fields of :func:`synthetic_schema`, ``label`` and ``is_cold_item``.

    Args:
        out_dir (str): output directory (created).
        num_rows (int): impressions over all splits.
        seed (int): the output is a pure function of the arguments.
        num_users (Optional[int]): see :class:`SyntheticConfig`.
        num_items (Optional[int]): see :class:`SyntheticConfig`.
        rows_per_group (int): Parquet row group size.
        cold_item_fraction (float): share of items that occur only in valid/test.
        progress (bool): show a tqdm bar.
        config (Optional[SyntheticConfig]): every setting at once (then the arguments from
            ``num_rows`` to ``cold_item_fraction`` are ignored).

    Example::

        schema = generate_synthetic("data/synthetic", 100_000, seed=0)
        reader = ParquetBatchReader(schema, "train", batch_size=1024)
    """
    if config is None:
        config = SyntheticConfig(num_rows, seed, num_users, num_items, rows_per_group, cold_item_fraction)
    seed, num_rows, rows_per_group = config.seed, config.num_rows, config.rows_per_group
    entity_rng = np.random.default_rng([seed, 0])
    users = _make_users(config, entity_rng)
    items = _make_items(config, entity_rng)
    schema = synthetic_schema(config)
    schema.root = os.path.abspath(out_dir)
    os.makedirs(out_dir, exist_ok=True)

    texts = {
        "user_id": users.text,
        "item_id": items.text,
        "item_category": ["unknown format"] + FORMATS,
        "item_tags": ["no tag"] + TAGS,
        "user_age_bucket": ["unknown age"] + [f"aged {a}" for a in AGE_BUCKETS],
        "user_gender": ["unknown gender"] + GENDERS,
        "user_occupation": ["unknown occupation"] + OCCUPATIONS,
        "hour_of_day": ["unknown hour"] + [_hour_text(h) for h in range(24)],
        "device": ["unknown device"] + DEVICES,
    }
    for name, values in texts.items():
        write_value_text(os.path.join(out_dir, schema.field(name).value_text), values)
    write_item_catalog(os.path.join(out_dir, ITEM_CATALOG), items)

    generator = _Generator(config, users, items)
    arrow_schema = arrow_schema_for(schema, {"is_cold_item": pa.int8()})
    bar = tqdm(total=num_rows, desc="synthetic rows", unit="row", disable=not progress,
               **bar_options())
    row_start = 0
    for index, (split, split_rows) in enumerate(split_sizes(num_rows).items()):
        path = os.path.join(out_dir, schema.splits[split])
        with SplitWriter(path, arrow_schema, rows_per_group) as writer:
            for chunk, start in enumerate(range(0, split_rows, CHUNK_ROWS)):
                n = min(CHUNK_ROWS, split_rows - start)
                rng = np.random.default_rng([seed, 1 + index, chunk])
                columns = generator.rows(rng, n, allow_cold=split != "train")
                columns["row_id"] = np.arange(row_start + start, row_start + start + n, dtype=np.int64)
                writer.write(columns)
                bar.update(n)
        row_start += split_rows
    bar.close()
    schema.save(os.path.join(out_dir, "schema.json"))
    return schema
