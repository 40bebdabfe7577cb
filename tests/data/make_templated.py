"""The tests' preference data: a hand-templated controlled-sentiment task (the project's first
bundled data; the demo's data is now model-sampled, see data/make_sentiment.py). Easy on purpose:
the tiny test models learn it in a few steps, so the tests' "it learns" checks mean something.
The user asks for one sentence continuing a movie review; the chosen reply is positive, the
rejected one negative, about the same aspect of the same film.

Everything here is constructed from the word lists below (no third-party text). The eval split
uses film titles, openings and adjectives that never occur in train, so a rise in held-out reward
accuracy shows the adapter learned "prefer positive", not the training sentences.

    python tests/data/make_templated.py   # rewrites tests/data/templated/{train,eval}.jsonl
"""

from __future__ import annotations

import json
import random
from pathlib import Path

ASPECTS = [
    "acting", "plot", "soundtrack", "dialogue", "cinematography", "pacing", "ending",
    "lead performance", "script", "visual effects", "editing", "humour", "supporting cast", "score",
]  # fmt: skip
TITLES = {
    "train": [
        "The Silent Harbor",
        "Midnight in Cairo",
        "Paper Lanterns",
        "The Long Winter",
        "Echoes of Mars",
        "A Quiet Rebellion",
        "Glass Mountains",
        "The Last Orchard",
        "River of Stars",
        "Iron Meadow",
        "The Clockmaker's Son",
        "Northern Lights",
        "Velvet Storm",
        "The Forgotten Road",
        "Salt and Honey",
        "Burning Bridges",
        "The Lighthouse Keeper",
        "Wild Horses",
        "City of Kites",
        "The Blue Hour",
    ],
    "eval": [
        "Copper Sky",
        "The Hollow Crown",
        "Summer of Foxes",
        "Distant Thunder",
        "The Marble Garden",
        "Neon Tide",
        "The Paper Moon",
        "Winter Orchids",
    ],
}
OPENINGS = {
    "train": [
        "I watched {title} last night, and",
        "Going into {title}, I had no expectations, but",
        "My friends dragged me to {title}, and",
        "Having seen {title} twice now, I can say",
        "I finally caught {title} at the cinema and",
        "{title} opened this weekend, and",
    ],
    "eval": [
        "I streamed {title} on a rainy evening, and",
        "After all the buzz around {title},",
        "We saw {title} at a small festival, and",
    ],
}
POSITIVE = {
    "train": [
        "wonderful",
        "brilliant",
        "moving",
        "delightful",
        "superb",
        "charming",
        "gripping",
        "beautiful",
        "masterful",
        "uplifting",
        "stunning",
        "heartfelt",
    ],
    "eval": ["magnificent", "enchanting", "inspired", "touching", "exquisite"],
}
NEGATIVE = {
    "train": [
        "dreadful",
        "boring",
        "clumsy",
        "lifeless",
        "tedious",
        "awful",
        "messy",
        "bland",
        "shallow",
        "painful",
        "forgettable",
        "irritating",
    ],
    "eval": ["dismal", "tiresome", "hollow", "sloppy", "grating"],
}
POSITIVE_CLOSERS = [
    "and I left the theatre smiling.", "and I would happily watch it again.",
    "and it stayed with me for days.", "and I recommend it to everyone.",
]  # fmt: skip
NEGATIVE_CLOSERS = [
    "and I nearly walked out.", "and I regret buying the ticket.",
    "and I forgot it by the next morning.", "and I would not recommend it to anyone.",
]  # fmt: skip
REPLY = "the {aspect} was {adjective}, {closer}"


def make_pairs(split: str, count: int, rng: random.Random) -> list[dict]:
    pairs = []
    for _ in range(count):
        title = rng.choice(TITLES[split])
        opening = rng.choice(OPENINGS[split]).format(title=title)
        aspect = rng.choice(ASPECTS)
        chosen = REPLY.format(aspect=aspect, adjective=rng.choice(POSITIVE[split]), closer=rng.choice(POSITIVE_CLOSERS))
        rejected = REPLY.format(
            aspect=aspect, adjective=rng.choice(NEGATIVE[split]), closer=rng.choice(NEGATIVE_CLOSERS)
        )
        request = f'Continue this movie review with one sentence: "{opening}"'
        pairs.append(
            {
                "prompt": [{"role": "user", "content": request}],
                "chosen": [{"role": "assistant", "content": chosen[0].upper() + chosen[1:]}],
                "rejected": [{"role": "assistant", "content": rejected[0].upper() + rejected[1:]}],
            }
        )
    return pairs


def main() -> None:
    out = Path(__file__).parent / "templated"
    out.mkdir(exist_ok=True)
    rng = random.Random(0)
    for split, count in (("train", 320), ("eval", 64)):
        with (out / f"{split}.jsonl").open("w") as f:
            for pair in make_pairs(split, count, rng):
                f.write(json.dumps(pair) + "\n")


if __name__ == "__main__":
    main()
