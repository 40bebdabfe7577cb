"""Train a DPO job on the bundled data through the `openai` client, then chat with the result.

Start the server first (README, "Quickstart: the service"), then from the repository root:

    python examples/train_and_chat.py                       # or --base-url URL --api-key KEY
"""

import argparse
import os
import time

from openai import OpenAI

PROMPT = 'Continue this movie review with one sentence: "I watched The Marble Garden last night, and'


def train(client: OpenAI, data: str = "data/sentiment/train.jsonl", model: str = "SmolLM2-135M-Instruct") -> str:
    """Upload the pairs, train, wait; the fine-tuned model's id."""
    file = client.files.create(file=open(data, "rb"), purpose="fine-tune")
    job = client.fine_tuning.jobs.create(model=model, training_file=file.id, method={"type": "dpo"})
    while job.status not in ("succeeded", "failed", "cancelled"):
        time.sleep(5)
        job = client.fine_tuning.jobs.retrieve(job.id)
    print(f"{job.id} {job.status}: {job.fine_tuned_model or job.error}")
    return job.fine_tuned_model


def chat(client: OpenAI, model: str, prompt: str = PROMPT, **sampling) -> dict:
    """One streamed answer, with its first-token latency and decoding speed."""
    start, first, pieces, usage = time.perf_counter(), None, [], None
    messages = [{"role": "user", "content": prompt}]
    options = {"max_tokens": 48, "seed": 0, **sampling}
    for chunk in client.chat.completions.create(
        model=model, messages=messages, stream=True, stream_options={"include_usage": True}, **options
    ):
        if chunk.choices and chunk.choices[0].delta.content:
            first = first or time.perf_counter() - start
            pieces.append(chunk.choices[0].delta.content)
        usage = chunk.usage or usage
    took = time.perf_counter() - start
    answer = {"text": "".join(pieces), "first_token_s": first, "tokens": usage.completion_tokens,
              "tokens_per_s": (usage.completion_tokens - 1) / (took - first) if first and took > first else None}  # fmt: skip
    print(
        f"{model}:\n  {answer['text']!r}\n  first token after {first:.2f} s, then {answer['tokens_per_s']:.1f} tokens/s"
    )
    return answer


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base-url", default="http://127.0.0.1:8000/v1")
    parser.add_argument("--api-key", default=os.environ.get("DPO_LORA_API_KEY", "none"))
    args = parser.parse_args()
    client = OpenAI(base_url=args.base_url, api_key=args.api_key)
    tuned = train(client)
    for model in ("SmolLM2-135M-Instruct", tuned):  # the base, then what DPO made of it
        chat(client, model)
