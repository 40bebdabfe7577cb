"""Command line: the parser of every verb, and `main`, which runs the verb's module.

Each verb is a module (`dpo_lora/commands/`, and `dpo_lora/serve/server.py` for `serve`) imported
by name only once it runs: torch, transformers and DeepSpeed load then, so `--help` answers at once
(the one place the project imports its own modules lazily, by `importlib`).
"""

from __future__ import annotations

import argparse
import importlib
import sys

from dpo_lora.core.console import quiet_third_party
from dpo_lora.core.cpu_memory import huge_pages_for_tensors
from dpo_lora.core.errors import UserError
from dpo_lora.core.rundir import error_line
from dpo_lora.model.gguf_mixes import GGUF_TYPES


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dpo-lora", description="DPO training of LoRA adapters on quantized models.")
    # The DeepSpeed launcher passes --local_rank; LOCAL_RANK in the environment says the same.
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    commands = parser.add_subparsers(dest="command", required=True)

    train = commands.add_parser("train", help="train an adapter from a YAML config")
    train.add_argument("config", help="YAML config file")
    train.add_argument("overrides", nargs="*", help="dotted.key=value overrides, e.g. train.lr=1e-4")
    train.add_argument("--resume", action="store_true", help="continue from the newest complete checkpoint")
    train.add_argument("--force-resume", action="store_true", help="resume even if the config changed")
    train.add_argument("--overwrite", action="store_true", help="replace a previous run in output_dir")
    train.set_defaults(handler="dpo_lora.commands.train:run")

    config = commands.add_parser("config", help="print the resolved config (or --list every knob)")
    config.add_argument("config", nargs="?", help="YAML config file (defaults only when omitted)")
    config.add_argument("overrides", nargs="*", help="dotted.key=value overrides")
    config.add_argument("--list", action="store_true", help="list every key with its default and meaning")
    config.add_argument("--markdown", action="store_true", help="with --list: as docs/configuration.md")
    config.set_defaults(handler="dpo_lora.commands.config:run")

    plan = commands.add_parser("plan", help="predict per-rank GPU memory from the config alone (no weights read)")
    plan.add_argument("config", nargs="?", help="YAML config file (defaults only when omitted)")
    plan.add_argument("overrides", nargs="*", help="dotted.key=value overrides")
    plan.add_argument("--gpu-memory", default="24GiB", help="memory of one GPU, e.g. 24GiB or 80GB")
    plan.add_argument("--gpus", type=int, default=1, help="ranks the run uses (ZeRO splits optimizer state over them)")
    plan.add_argument("--json", action="store_true", help="one JSON object: total_bytes, fits, components, ...")
    plan.add_argument(
        "--data",
        action="store_true",
        help="also plan at data.train's longest pair (tokenizes it) besides the worst case",
    )
    plan.add_argument(
        "--time",
        action="store_true",
        help="also quote steps, trained tokens and time on this machine's device (tokenizes data.train)",
    )
    plan.set_defaults(handler="dpo_lora.commands.plan:run")

    export = commands.add_parser("export", help="merge the adapter into its base and write a standalone model folder")
    export.add_argument("source", nargs="?", help="run folder, adapter folder, or checkpoint folder")
    export.add_argument(
        "--checkpoint", help="a checkpoint of the run instead of its final adapter: best, latest or a step"
    )
    export.add_argument("--out", help="output folder (a Hugging Face model folder); required without --spec")
    export.add_argument("--spec", help="a JSON file of these options (source, out, merge_into, ...) instead")
    export.add_argument("--base", help="base model folder (default: the run's model.path)")
    export.add_argument(
        "--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"], help="stored weight dtype"
    )
    export.add_argument("--max-shard-size", default="5GB", help="largest safetensors shard, e.g. 5GB")
    export.add_argument(
        "--merge-into",
        default="original",
        choices=["original", "dequantized"],
        help="original: unquantized base (for serving); dequantized: exactly the trained function",
    )
    export.add_argument("--adapter-only", action="store_true", help="copy the adapter with a model card, no merge")
    export.add_argument(
        "--format",
        choices=("safetensors", "gguf"),
        default="safetensors",
        help="gguf: one GGUF file for llama.cpp/Ollama (Llama-family models), from a float32 merge",
    )
    export.add_argument(
        "--gguf-type",
        choices=GGUF_TYPES,
        default="f16",
        help="GGUF weight type: one type throughout, or llama.cpp's mixes (q2_k to q5_k_m, iq4_nl)",
    )
    export.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    export.add_argument("--push", metavar="REPO", help="also upload to this Hugging Face Hub repo")
    export.set_defaults(handler="dpo_lora.commands.export:run")

    evaluate = commands.add_parser("eval", help="held-out reward accuracy, margin, log-probs and KL of a run")
    evaluate.add_argument("run", help="run folder, adapter folder, or checkpoint folder")
    evaluate.add_argument(
        "--checkpoint", help="a checkpoint of the run instead of its final adapter: best, latest or a step"
    )
    evaluate.add_argument("--data", help="held-out pairs (default: the run's data.eval)")
    evaluate.add_argument("--batch-size", type=int, default=8, help="pairs per forward")
    evaluate.add_argument("--out", help="JSON report path (default: RUN/eval.json)")
    evaluate.set_defaults(handler="dpo_lora.commands.eval:run")

    generate = commands.add_parser("generate", help="sample policy and reference side by side, with rewards and KL")
    generate.add_argument("run", help="run folder, adapter folder, or checkpoint folder")
    generate.add_argument(
        "--checkpoint", help="a checkpoint of the run instead of its final adapter: best, latest or a step"
    )
    generate.add_argument("--prompts", required=True, help=".txt (one prompt per line) or .jsonl with a 'prompt' field")
    generate.add_argument("--n", type=int, default=4, help="samples per prompt for each side")
    generate.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (0: greedy)")
    generate.add_argument("--max-new-tokens", type=int, default=64, help="longest sample")
    generate.add_argument("--reward", help="module:function scoring a completion text (text -> float)")
    generate.add_argument("--seed", type=int, default=0, help="sampling seed")
    generate.add_argument("--out", help="JSON path (default: RUN/generations.json)")
    generate.add_argument("--batch-size", type=int, default=16, help="prompts per generate call (left-padded)")
    generate.add_argument("--show", type=int, default=3, help="prompts printed side by side (all go to the JSON)")
    generate.set_defaults(handler="dpo_lora.commands.generate:run")

    plot = commands.add_parser("plot", help="PNG charts of a run's metrics into RUN/plots/")
    plot.add_argument("run", help="run folder")
    plot.set_defaults(handler="dpo_lora.commands.plot:run")

    serve = commands.add_parser("serve", help="an OpenAI-compatible fine-tuning jobs API over this machine's GPUs")
    serve.add_argument("--state-dir", default="serve-state", help="job store, uploaded files and job folders")
    serve.add_argument("--host", default="127.0.0.1", help="address to bind (beyond loopback needs API keys)")
    serve.add_argument(
        "--api-keys",
        help='JSON file of projects\' API keys, {"team-a": "KEY", ...}: each key sees only its project\'s files, '
        "jobs and fine-tuned models (DPO_LORA_API_KEY is the project 'default')",
    )
    serve.add_argument("--port", type=int, default=8000, help="port to bind")
    serve.add_argument("--gpus", default="all", help="GPUs jobs may use: all, or indices like 0,1")
    serve.add_argument("--cpu-slots", type=int, default=1, help="without GPUs: CPU ranks that may run at once")
    serve.add_argument(
        "--device-memory",
        help="memory of one device that a job's plan must fit, e.g. 24GiB (default: the GPUs' free memory at "
        "start; on CPU slots and SLURM unchecked)",
    )
    serve.add_argument("--models", nargs="+", default=["models"], help="base model folders (or folders of them)")
    serve.add_argument("--config", help="base YAML config of every job (default: dpo-lora's defaults)")
    serve.add_argument("--db", help="SQLAlchemy URL of the job store (default: SQLite in --state-dir)")
    serve.add_argument("--grace-seconds", type=float, default=120.0, help="pause: SIGKILL after this long")
    serve.add_argument("--max-upload-size", default="1GiB", help="largest upload accepted (413 past it), e.g. 500MB")
    serve.add_argument("--max-streams", type=int, default=64, help="open event streams per API key (429 past it)")
    serve.add_argument(
        "--rate-limit", type=int, default=0, metavar="N",
        help="/v1 requests one API key may send a minute (429 with retry-after past it; an open dashboard sends "
        "a few every 2 s); 0: no limit",
    )  # fmt: skip
    serve.add_argument(
        "--project-devices", type=int, default=0,
        help="the most devices one project's running jobs may hold at once, all servers on the store (0: no cap)",
    )  # fmt: skip
    serve.add_argument(
        "--project-jobs", type=int, default=0,
        help="the most jobs one project may have queued, running or paused at once (429 past it; 0: no cap)",
    )  # fmt: skip
    serve.add_argument(
        "--project-storage", default="0",
        help="the most bytes of files one project may hold, e.g. 10GiB (413 past it; 0: no cap)",
    )  # fmt: skip
    serve.add_argument(
        "--preempt-after", type=float, default=0.0, metavar="SECONDS",
        help="when the next queued job has waited this long for devices that projects over their share (by "
        "--api-keys weights) hold, stop one of their jobs at a checkpoint and queue it again; 0: never",
    )  # fmt: skip
    serve.add_argument(
        "--adopt-after", type=float, default=600.0, metavar="SECONDS",
        help="take over the running jobs of a server on the same store silent this long, where this one can "
        "reach them (SLURM's; local ones on its own host); 0: never",
    )  # fmt: skip
    serve.add_argument(
        "--backend",
        choices=("local", "slurm"),
        default="local",
        help="run jobs on this machine, or submit them to SLURM (--state-dir on a shared filesystem)",
    )
    serve.add_argument("--slurm-max-ranks", type=int, default=64, help="slurm: ranks submitted at once, all jobs")
    serve.add_argument("--slurm-gpus-per-rank", type=int, default=1, help="slurm: GPUs per rank (0 on CPU nodes)")
    serve.add_argument("--slurm-cpus-per-rank", type=int, default=8, help="slurm: CPUs per rank")
    serve.add_argument(
        "--slurm-option",
        action="append",
        metavar="OPTION",
        help="slurm: an sbatch option for every job, e.g. --slurm-option=--partition=gpu (repeatable)",
    )
    serve.add_argument("--slurm-script", help="slurm: the batch script template (default: launch/slurm.sbatch)")
    serve.add_argument(
        "--inference-devices",
        default="auto",
        help="where /v1/chat/completions runs: auto (the CPU; on GPUs, one no job holds, lent while in use), cpu, "
        "or GPU indices like 3 (kept from jobs)",
    )
    serve.add_argument("--inference-adapters", type=int, default=8, help="adapters one loaded base holds (LRU)")
    serve.add_argument("--inference-idle-seconds", type=float, default=600.0, help="unload a base idle this long")
    serve.set_defaults(handler="dpo_lora.serve.server:serve")

    fetch = commands.add_parser("fetch-default-model", help="make a model folder of SmolLM2-135M-Instruct")
    fetch.add_argument("dir", help="target folder (kept as a cache: a complete folder is reused)")
    fetch.set_defaults(handler="dpo_lora.commands.fetch:run")
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Overrides may stand before or after flags (`train CONFIG --resume a.b=1 c.d=2`)."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    stray = [item for item in extra if item.startswith("-") or "=" not in item]
    if stray or (extra and not hasattr(args, "overrides")):
        parser.error(f"unrecognized arguments: {' '.join(stray or extra)}")
    if extra:
        args.overrides = [*args.overrides, *extra]
    if args.command in ("config", "plan") and args.config and "=" in args.config:
        args.overrides, args.config = [args.config, *args.overrides], None  # overrides of the defaults
    return args


def main(argv: list[str] | None = None) -> int:
    huge_pages_for_tensors()  # before torch is imported: torch reads it once
    args = parse_args(argv)
    try:
        quiet_third_party()
        module, function = args.handler.split(":")
        return getattr(importlib.import_module(module), function)(args)
    except UserError as err:
        print(error_line(str(err)), file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("dpo-lora: interrupted", file=sys.stderr)
        return 130
    except Exception as err:
        from dpo_lora.core.distributed import rank_failure_message  # torch: not loaded for --help

        message = rank_failure_message(err)
        if message is None:
            raise
        print(message, file=sys.stderr)
        return 1
