"""Generate the bundled preference data: the DPO paper's controlled-sentiment task, small.

Prompts ask SmolLM2-135M-Instruct to continue the opening of a movie review (openings built from
the project's own word lists: no third-party text). Completions are sampled from SmolLM2 itself,
SAMPLES per prompt; the most positive becomes `chosen` and the least positive `rejected`, as judged
by VADER (data/sentiment_scorer.py). Prompts whose samples differ by less than MIN_GAP in score are
dropped: no preference to learn. Eval prompts use titles and openings never seen in train.

    dpo-lora fetch-default-model models/SmolLM2-135M-Instruct
    python data/make_sentiment.py   # rewrites data/sentiment/{train,eval}.jsonl (~10 min, 2 cores)
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from data.sentiment_scorer import score  # noqa: E402

MODEL = Path(__file__).resolve().parent.parent / "models" / "SmolLM2-135M-Instruct"
SAMPLES, MIN_GAP, MAX_NEW_TOKENS, BATCH = 4, 0.3, 40, 32
TITLES = {
    "train": [
        "The Silent Harbor", "Midnight in Cairo", "Paper Lanterns", "The Long Winter", "Echoes of Mars",
        "A Quiet Rebellion", "Glass Mountains", "The Last Orchard", "River of Stars", "Iron Meadow",
        "The Clockmaker's Son", "Northern Lights", "Velvet Storm", "The Forgotten Road", "Salt and Honey",
        "Burning Bridges", "The Lighthouse Keeper", "Wild Horses", "City of Kites", "The Blue Hour",
    ],
    "eval": ["Copper Sky", "The Hollow Crown", "Summer of Foxes", "Distant Thunder", "The Marble Garden", "Neon Tide"],
}  # fmt: skip
OPENINGS = {
    "train": [
        "I watched {title} last night, and", "Going into {title}, I had no expectations, but",
        "My friends dragged me to {title}, and", "Having seen {title} twice now, I can say that",
        "I finally caught {title} at the cinema and", "{title} opened this weekend, and",
        "The trailer for {title} promised a lot, and", "Two hours of {title} later,",
        "As a fan of the director, I went to {title} and", "The first half of {title}",
    ],
    "eval": [
        "I streamed {title} on a rainy evening, and", "After all the buzz around {title},",
        "We saw {title} at a small festival, and", "The ending of {title}",
    ],
}  # fmt: skip
PROMPTS = {"train": 256, "eval": 64}  # before dropping prompts without a preference


def request(opening: str) -> str:
    return f'Continue this movie review with one sentence: "{opening}"'


def prompts(split: str, rng: random.Random) -> list[str]:
    combos = [o.format(title=t) for t in TITLES[split] for o in OPENINGS[split]]
    return [request(rng.choice(combos)) for _ in range(PROMPTS[split])]


@torch.no_grad()
def sample(model, tokenizer, texts: list[str]) -> list[list[str]]:
    """SAMPLES completions for each request, batched with left padding."""
    chats = [
        tokenizer.apply_chat_template([{"role": "user", "content": t}], tokenize=False, add_generation_prompt=True)
        for t in texts
    ]
    batch = tokenizer(chats, return_tensors="pt", padding=True, add_special_tokens=False)
    out = model.generate(
        **batch, do_sample=True, temperature=1.0, top_p=1.0, max_new_tokens=MAX_NEW_TOKENS,
        num_return_sequences=SAMPLES, pad_token_id=tokenizer.pad_token_id,
    )  # fmt: skip
    decoded = tokenizer.batch_decode(out[:, batch["input_ids"].shape[1] :], skip_special_tokens=True)
    return [[d.strip() for d in decoded[i * SAMPLES : (i + 1) * SAMPLES]] for i in range(len(texts))]


def make_pairs(split: str, model, tokenizer, rng: random.Random) -> list[dict]:
    texts, pairs = prompts(split, rng), []
    for start in range(0, len(texts), BATCH):
        chunk = texts[start : start + BATCH]
        for text, completions in zip(chunk, sample(model, tokenizer, chunk), strict=True):
            scored = sorted((score(c), c) for c in completions if c)
            if len(scored) < 2 or scored[-1][0] - scored[0][0] < MIN_GAP:
                continue
            pairs.append({
                "prompt": [{"role": "user", "content": text}],
                "chosen": [{"role": "assistant", "content": scored[-1][1]}],
                "rejected": [{"role": "assistant", "content": scored[0][1]}],
            })  # fmt: skip
        print(f"{split}: {start + len(chunk)}/{len(texts)} prompts, {len(pairs)} pairs", file=sys.stderr)
    return pairs


def main() -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(MODEL, padding_side="left")
    tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(MODEL, dtype=torch.float32).eval()
    out = Path(__file__).parent / "sentiment"
    out.mkdir(exist_ok=True)
    rng = random.Random(0)
    for split in ("train", "eval"):
        pairs = make_pairs(split, model, tokenizer, rng)
        (out / f"{split}.jsonl").write_text("".join(json.dumps(pair) + "\n" for pair in pairs))


if __name__ == "__main__":
    main()
