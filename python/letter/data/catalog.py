"""A seeded generator of large catalogs (10k to millions of items), written in bounded memory.

Where `make_synthetic` builds a small Dataset in memory, `write_catalog` streams a LETTER folder
(<Name>.inter.json + <Name>.item.json) to disk: per-item state is a few numpy arrays (8-16 bytes
per item), users are drawn in chunks and written as they are made, so memory grows with the
catalog by O(items) numpy bytes and not at all with the number of users.

Shape of the data (Amazon-5-core-like):
- popularity: Zipf with exponent `zipf` over a seeded random ranking of the whole catalog;
- items fall into latent categories of `category_size` items (contiguous ids); each user prefers
  one category, a history step picks, with probability `p_category`, an item of that category by
  the same Zipf law within it, else an item of the whole catalog by popularity;
- sequential structure: with probability `p_follow` the next item is the previous item's fixed
  successor (the next id in its category), so a sequence model has something to learn;
- history lengths: 5 + a geometric tail with mean `mean_length` - 5, at most `max_length`
  (the 5-core minimum; Amazon Beauty/Sports/Toys 5-core means are 8.3-8.9);
- item text: title and description from the category's pseudo-word vocabulary (12 words per
  category), plus brand, categories and the latent "category" id (as `make_synthetic`).

Same arguments and seed -> byte-identical files.
"""
import json
import os

import numpy as np

from letter.data.readers import INTER_SUFFIX, ITEM_SUFFIX
from letter.runs import atomic_path

SYLLABLES = ("ka", "lo", "mi", "ren", "sa", "tu", "vor", "zel", "qui", "bra", "dun", "ex", "po", "ni", "gar", "ul")
ADJECTIVES = ("premium", "professional", "compact", "heavy", "lightweight", "durable", "classic", "deluxe", "portable")
CHUNK = 8192  # items or users drawn and written per step: bounds the working set
WORDS_PER_CATEGORY = 12


def _zipf_cdf(n: int, exponent: float) -> np.ndarray:
    weights = 1.0 / np.arange(1, n + 1, dtype=np.float64) ** exponent
    cdf = np.cumsum(weights)
    return cdf / cdf[-1]


def _draw(cdf: np.ndarray, rng: np.random.Generator, size) -> np.ndarray:
    """Ranks drawn by inverse CDF (searchsorted: O(log n) per draw, no per-draw table)."""
    return np.minimum(np.searchsorted(cdf, rng.random(size), side="right"), len(cdf) - 1)


def _category_words(num_categories: int, rng: np.random.Generator) -> np.ndarray:
    """[C, 12] pseudo-words: 3-syllable words from 16 syllables, distinct within a category."""
    syllables = np.array(SYLLABLES)
    picks = rng.integers(0, len(SYLLABLES), size=(num_categories, WORDS_PER_CATEGORY, 3))
    words = np.char.add(np.char.add(syllables[picks[..., 0]], syllables[picks[..., 1]]), syllables[picks[..., 2]])
    return words


def write_catalog(out_dir: str, num_items: int, num_users: int | None = None, *, seed: int = 0, name: str = "Catalog",
                  zipf: float = 1.0, category_size: int = 500, p_category: float = 0.7, p_follow: float = 0.3,
                  mean_length: float = 8.5, max_length: int = 100) -> dict:
    """Write the seeded catalog to out_dir/<name>.inter.json and <name>.item.json (each atomically);
    returns its statistics (users, items, interactions, mean length). num_users defaults to num_items."""
    num_users = num_items if num_users is None else num_users
    if num_items < 2 * category_size:
        raise ValueError(f"need num_items >= 2 * category_size, got {num_items} and {category_size}")
    if num_users < 1:
        raise ValueError(f"need num_users >= 1, got {num_users}")
    if not 5 < mean_length <= max_length:
        raise ValueError(f"need 5 < mean_length <= max_length, got {mean_length} and {max_length}")
    rng = np.random.default_rng(seed)
    num_categories = num_items // category_size
    # category c holds ids [start[c], start[c] + size[c]); the last one takes the remainder
    start = np.arange(num_categories, dtype=np.int64) * category_size
    size = np.full(num_categories, category_size, dtype=np.int64)
    size[-1] = num_items - start[-1]
    category = np.minimum(np.arange(num_items, dtype=np.int64) // category_size, num_categories - 1)
    popular = rng.permutation(num_items)  # popular[r]: the item of global popularity rank r
    within = np.concatenate([rng.permutation(s) for s in size])  # within[start[c] + r]: offset of rank r in c
    global_cdf = _zipf_cdf(num_items, zipf)
    # ranks within a category follow the common size's law (the last category's extra items are
    # reached through global popularity and successors)
    category_cdf = _zipf_cdf(category_size, zipf)
    words = _category_words(num_categories, rng)

    def next_in_category(items: np.ndarray) -> np.ndarray:  # an item's fixed successor
        c = category[items]
        return start[c] + (items - start[c] + 1) % size[c]

    os.makedirs(out_dir, exist_ok=True)
    # an error removes both temporary files; the item text is put in place first (the inner
    # context), as <Name>.inter.json is what makes the folder a dataset (see write_letter)
    with atomic_path(os.path.join(out_dir, name + INTER_SUFFIX)) as inter_tmp, \
            atomic_path(os.path.join(out_dir, name + ITEM_SUFFIX)) as item_tmp:
        with open(item_tmp, "w") as f:
            f.write("{")
            for chunk_start in range(0, num_items, CHUNK):
                ids = np.arange(chunk_start, min(chunk_start + CHUNK, num_items))
                cats = category[ids]
                picks = rng.integers(0, WORDS_PER_CATEGORY, size=(len(ids), 11))
                brands = rng.integers(1, 6, size=len(ids))
                adjectives = rng.integers(0, len(ADJECTIVES), size=len(ids))
                parts = []
                for row, (item, c) in enumerate(zip(ids.tolist(), cats.tolist())):
                    w = words[c][picks[row]]
                    brand = f"C{c}B{brands[row]}"
                    record = {"title": f"{brand} {ADJECTIVES[adjectives[row]]} {w[0]} {w[1]} model {item}",
                              "description": f"A {' '.join(w[2:10])} for {w[10]} use.",
                              "brand": brand, "categories": f"Synthetic,Category{c}", "category": c}
                    parts.append(f"{',' if item else ''}{json.dumps(str(item))}: {json.dumps(record)}")
                f.write("\n".join(parts))
            f.write("}\n")

        interactions = 0
        with open(inter_tmp, "w") as f:
            f.write("{")
            for chunk_start in range(0, num_users, CHUNK):
                n = min(CHUNK, num_users - chunk_start)
                lengths = np.minimum(5 + rng.geometric(1.0 / (mean_length - 4), size=n) - 1, max_length)
                steps = int(lengths.max())
                liked = rng.integers(0, num_categories, size=n)
                in_category = rng.random((n, steps)) < p_category
                follow = rng.random((n, steps)) < p_follow
                global_pick = popular[_draw(global_cdf, rng, (n, steps))]
                ranks = _draw(category_cdf, rng, (n, steps))
                seq = np.empty((n, steps), dtype=np.int64)
                for t in range(steps):
                    pick = np.where(in_category[:, t], start[liked] + within[start[liked] + ranks[:, t]], global_pick[:, t])
                    if t:
                        prev = seq[:, t - 1]
                        pick = np.where(follow[:, t], next_in_category(prev), pick)
                        pick = np.where(pick == prev, next_in_category(pick), pick)  # no immediate repeat
                    seq[:, t] = pick
                parts = []
                for row in range(n):
                    user = chunk_start + row
                    items = seq[row, : lengths[row]].tolist()
                    parts.append(f"{',' if user else ''}\"{user}\": {json.dumps(items)}")
                interactions += int(lengths.sum())
                f.write("\n".join(parts))
            f.write("}\n")
    return {"users": num_users, "items": num_items, "categories": num_categories, "interactions": interactions,
            "mean_length": interactions / num_users}
