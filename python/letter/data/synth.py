"""A seeded synthetic dataset with latent categories and sequential structure.

Each item belongs to one latent category; its title/description are drawn from that category's
vocabulary (so text embeddings see the categories) and item.json keeps the category id in the
field "category" (so tokenizers can be checked against it). Each user prefers one to three
categories; a history is a walk where, with probability `p_follow`, the next item is one of the
previous item's few fixed successors (within its category, so sequence models have something to
learn), and otherwise a popular item (Zipf within the category) of a preferred category.
"""
from dataclasses import dataclass

import numpy as np

from letter.data.dataset import Dataset
from letter.errors import SettingError
from letter.settings import Settings, setting

# Vocabularies of the first categories; further categories get generated pseudo-words.
THEMES = [
    ("Guitars", "guitar string fret acoustic electric pick neck maple rosewood strap capo tuner"),
    ("Drums", "drum snare cymbal kick stick hihat tom drumhead pedal percussion rim throne"),
    ("Keyboards", "keyboard piano synthesizer keys midi organ weighted sustain pedal octave digital stand"),
    ("Microphones", "microphone condenser dynamic vocal cardioid shock mount pop filter studio xlr capsule"),
    ("Cables", "cable cord jack connector shielded patch adapter plug braided length gold insulated"),
    ("Amplifiers", "amplifier amp speaker watt tube combo cabinet gain reverb head preamp tone"),
    ("Lab", "beaker flask pipette glass laboratory tube measuring borosilicate burette funnel graduated rack"),
    ("Safety", "glove goggles mask respirator safety protective nitrile helmet vest earplug shield visor"),
    ("Tools", "wrench screwdriver pliers hammer drill bit socket ratchet torque hex clamp vise"),
    ("Electronics", "resistor capacitor transistor breadboard solder circuit diode led voltage arduino relay sensor"),
    ("Adhesives", "tape glue adhesive epoxy sealant duct masking bond resin silicone caulk strip"),
    ("Measuring", "caliper gauge ruler thermometer multimeter scale micrometer meter level tape digital probe"),
    ("Cleaning", "brush sponge cleaner wipe detergent mop spray microfiber scrub towel bucket polish"),
    ("Storage", "box bin container organizer drawer shelf case rack tray cabinet bag crate"),
    ("Lighting", "lamp bulb flashlight lantern headlamp torch lumen beam battery spotlight floodlight dimmer"),
    ("Plumbing", "pipe valve faucet fitting hose washer drain coupling elbow gasket sealing pvc"),
    ("Fasteners", "screw bolt nut washer rivet anchor nail pin stainless hex zinc threaded"),
    ("Office", "pen paper notebook stapler folder binder marker envelope clip label desk calendar"),
    ("Garden", "shovel rake hose sprinkler pruner soil seed planter trowel watering gloves fertilizer"),
    ("Audio", "headphone earbud speaker bluetooth wireless stereo bass noise cancelling audio driver volume"),
]
ADJECTIVES = "premium professional compact heavy duty lightweight durable classic deluxe portable".split()


def _pseudo_words(rng: np.random.Generator, n: int) -> list[str]:
    syllables = ["ka", "lo", "mi", "ren", "sa", "tu", "vor", "zel", "qui", "bra", "dun", "ex"]
    return ["".join(rng.choice(syllables, size=rng.integers(2, 4))) for _ in range(n)]


@dataclass
class SyntheticSettings(Settings):
    """The generator's settings (`letter data synth`, the pipeline's data.synthetic section)."""

    section = "data.synthetic"

    num_users: int = setting(3000, "Number of users.", low=1, flag="users")
    num_items: int = setting(1000, "Number of items.", low=4, flag="items")
    num_categories: int = setting(20, "Latent item categories (<= items/4).", low=1, flag="categories")
    min_length: int = setting(5, "Shortest history.", low=3)
    max_length: int = setting(20, "Longest history (>= min_length).", low=3)
    p_follow: float = setting(0.6, "Probability that the next item is a successor of the previous one (< 1: a walk "
                              "must be able to leave a cycle of successors).", low=0, high=1, high_open=True, cli=False)
    seed: int = setting(0, "Random seed.", low=0, high=2**32 - 1)

    def check(self) -> None:
        # 4 items per category at least, so a walk can always avoid its last 3 items
        if self.num_items < 4 * self.num_categories:
            raise SettingError("num_categories", f"<= num_items / 4 is required, got {self.num_categories} and "
                               f"{self.num_items}", "num_items", section=self.section)
        if self.min_length > self.max_length:
            raise SettingError("min_length", f"<= max_length is required, got {self.min_length} and "
                               f"{self.max_length}", "max_length", section=self.section)


def make_synthetic(settings: SyntheticSettings | None = None, name: str = "Synth", **values) -> Dataset:
    """Build the synthetic Dataset of `settings` with `values` (its fields) replaced (same settings
    -> identical data)."""
    settings = (settings or SyntheticSettings()).replace(**values)
    num_users, num_items, num_categories = settings.num_users, settings.num_items, settings.num_categories
    min_length, max_length, p_follow, seed = settings.min_length, settings.max_length, settings.p_follow, settings.seed
    rng = np.random.default_rng(seed)

    vocab, cat_names = [], []
    for c in range(num_categories):
        if c < len(THEMES):
            cat_names.append(THEMES[c][0])
            vocab.append(THEMES[c][1].split())
        else:
            cat_names.append(f"Category{c}")
            vocab.append(_pseudo_words(rng, 12))

    category = np.sort(rng.permutation(np.arange(num_items) % num_categories))  # balanced, contiguous
    members = [np.flatnonzero(category == c) for c in range(num_categories)]
    # Zipf popularity within each category; successors: 3 fixed items of the same category
    popularity = [1.0 / np.arange(1, len(m) + 1) ** 1.1 for m in members]
    popularity = [p / p.sum() for p in popularity]
    popularity = [p[rng.permutation(len(p))] for p in popularity]
    successors = np.array(
        [rng.choice(members[category[i]], size=3) for i in range(num_items)], dtype=np.int64
    )

    item_text = []
    for i in range(num_items):
        c = category[i]
        words = rng.choice(vocab[c], size=3, replace=False)
        brand = f"{cat_names[c][:3].upper()}{rng.integers(1, 6)}"
        item_text.append(
            {
                "title": f"{brand} {rng.choice(ADJECTIVES)} {words[0]} {words[1]} model {i}",
                "description": "A " + " ".join(rng.choice(vocab[c], size=8)) + f" for {words[2]} use.",
                "brand": brand,
                "categories": f"Synthetic,{cat_names[c]}",
                "category": int(c),
            }
        )

    sequences = []
    for _ in range(num_users):
        liked = rng.choice(num_categories, size=rng.integers(1, min(3, num_categories) + 1), replace=False)
        length = int(rng.integers(min_length, max_length + 1))
        seq: list[int] = []
        while len(seq) < length:
            if seq and rng.random() < p_follow:
                item = int(rng.choice(successors[seq[-1]]))
            else:
                c = int(rng.choice(liked))
                item = int(rng.choice(members[c], p=popularity[c]))
            if item not in seq[-3:]:  # no immediate repeats
                seq.append(item)
        sequences.append(seq)

    return Dataset(
        name=name,
        user_ids=[str(u) for u in range(num_users)],
        sequences=sequences,
        item_ids=[str(i) for i in range(num_items)],
        item_text=item_text,
        source="synthetic",
    )
