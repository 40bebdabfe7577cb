"""Does llama.cpp read dpo-lora's GGUF types as transformers (with the `gguf` package's dequantizers) does?

    python bench/gguf_llama_cpp.py [--work /tmp/gguf-llama-cpp] [--tokens 10]

A random 256-wide, 2-layer Llama with SmolLM2's tokenizer (models/SmolLM2-135M-Instruct; its weights
scaled so greedy choices have margins) is written by dpo-lora's `write_gguf`: once per low-bit type with
only its token embedding in that type and the rest f16 (llama.cpp reads an embedding through its own C
dequantizer, with no rounding of activations), and once per k-quant mix. llama.cpp (node-llama-cpp
3.21.1 from npm, CPU; installed into --work) and transformers then continue "The movie was" greedily.
Printed per file: how many tokens agree, and where they part, transformers' log-probs of its own choice
and of llama.cpp's (a near tie there is rounding, not a wrong layout). Needs node and npm.
"""

from __future__ import annotations

import argparse
import json
import subprocess
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
GREEDY_JS = """
import {getLlama} from "node-llama-cpp";
const [file, prompt, n] = [process.argv[2], process.argv[3], Number(process.argv[4])];
const llama = await getLlama({gpu: false});
const model = await llama.loadModel({modelPath: file});
const sequence = (await model.createContext({contextSize: 256})).getSequence();
const prompt_ids = model.tokenize(prompt), ids = [];
for await (const token of sequence.evaluate(prompt_ids, {temperature: 0})) {
  ids.push(token);
  if (ids.length >= n) break;
}
console.log(JSON.stringify({prompt_ids, ids}));
process.exit(0);
"""
EMBEDDING_ONLY = ("Q2_K", "Q3_K", "IQ4_NL", "Q4_K", "Q5_K", "Q6_K")
MIXES = ("q2_k", "q3_k_m", "iq4_nl", "q4_k_s", "q4_k_m", "q5_k_m")


def random_model(folder: Path) -> None:
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(REPO / "models/SmolLM2-135M-Instruct")
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=256, intermediate_size=768, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         tie_word_embeddings=False)  # fmt: skip
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() == 2:
                param.mul_(5)  # std 0.1: the layers carry the input through
        model.lm_head.weight.mul_(10)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def write_files(model: Path, work: Path) -> list[Path]:
    from dpo_lora.model import gguf_export

    stored_type, files = gguf_export.stored_type, []
    try:
        for kind in EMBEDDING_ONLY:
            gguf_export.stored_type = lambda shape, t, target, *rest, kind=kind: (
                kind if target == "token_embd.weight" else stored_type(shape, "f16", target, *rest)
            )
            files.append(work / f"embedding-{kind}.gguf")
            gguf_export.write_gguf(model, files[-1], "f16", "wide")
    finally:
        gguf_export.stored_type = stored_type
    for mix in MIXES:
        files.append(work / f"mix-{mix}.gguf")
        gguf_export.write_gguf(model, files[-1], mix, "wide")
    return files


def transformers_scores(file: Path, prompt_ids: list[int], tokens: int, theirs: list[int]) -> dict:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(file.parent), gguf_file=file.name, dtype=torch.float32)
    ours = model.generate(torch.tensor([prompt_ids]), max_new_tokens=tokens, do_sample=False)[0, len(prompt_ids) :]
    ours = ours.tolist()
    agree = next((i for i, (a, b) in enumerate(zip(ours, theirs, strict=False)) if a != b), min(len(ours), len(theirs)))
    result = {"agree": agree, "of": tokens}
    if agree < tokens:
        logprobs = model(torch.tensor([prompt_ids + ours[:agree]])).logits[0, -1].log_softmax(-1)
        result |= {"transformers_pick": float(logprobs[ours[agree]]), "llama_cpp_pick": float(logprobs[theirs[agree]])}
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path("/tmp/gguf-llama-cpp"))
    parser.add_argument("--tokens", type=int, default=10)
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    if not (args.work / "node_modules/node-llama-cpp").is_dir():
        subprocess.run(
            ["npm", "install", "--no-audit", "--no-fund", "node-llama-cpp@3.21.1"], cwd=args.work, check=True
        )
    (args.work / "greedy.mjs").write_text(GREEDY_JS)
    random_model(args.work / "model")
    for file in write_files(args.work / "model", args.work):
        node = subprocess.run(["node", "greedy.mjs", str(file), "The movie was", str(args.tokens)], cwd=args.work,
                              capture_output=True, text=True, timeout=300)  # fmt: skip
        theirs = json.loads(node.stdout.strip().splitlines()[-1])
        scores = transformers_scores(file, theirs["prompt_ids"], args.tokens, theirs["ids"])
        print(f"{file.name}: {json.dumps(scores)}", flush=True)


if __name__ == "__main__":
    main()
