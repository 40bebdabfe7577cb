"""Command line: `dpo-lora train CONFIG [dotted.key=value ...]` and helpers.

Heavy libraries are imported inside the commands so `--help` answers at once.
"""

from __future__ import annotations

import argparse
import sys

from dpo_lora.errors import UserError


def _cmd_train(args) -> int:
    from dpo_lora.config import load_config
    from dpo_lora.trainer import train

    overrides = list(args.overrides)
    if args.resume or args.force_resume:
        overrides.append(f"train.resume={'force' if args.force_resume else 'auto'}")
    if args.overwrite:
        overrides.append("overwrite=true")
    config = load_config(args.config, overrides)
    results = train(config)
    if _is_main_rank():
        if "before" in results and "after" in results:
            print(_before_after_table(results["before"], results["after"]))
        if not results["stopped"]:  # a stopped run said where its checkpoint is; it has no adapter yet
            print(f"dpo-lora: the adapter is in {config.output_dir}/adapter")
    return 0


def _cmd_config(args) -> int:
    from dpo_lora.config import describe, dump_yaml, load_config

    if args.list:
        for key, default, help_text in describe():
            print(f"{key} = {default!r}  # {help_text}")
        return 0
    print(dump_yaml(load_config(args.config, args.overrides)), end="")
    return 0


def _cmd_serve(args) -> int:
    from dpo_lora.serve.server import serve

    return serve(args)


def _cmd_fetch(args) -> int:
    from dpo_lora.default_model import fetch_default_model

    print(fetch_default_model(args.dir))
    return 0


def _cmd_plan(args) -> int:
    import json
    from dataclasses import replace

    from dpo_lora.checkpointing import fewest_fitting
    from dpo_lora.config import load_config
    from dpo_lora.plan import checkpointing_hint, data_lengths, largest_fitting, plan, recommendation
    from dpo_lora.sizes import parse_size

    config = load_config(args.config, args.overrides)
    budget = parse_size(args.gpu_memory, flag="--gpu-memory")
    auto = None
    if config.model.gradient_checkpointing and config.model.checkpoint_layers == "auto":  # what a run would pick
        auto = fewest_fitting(config, budget, args.gpus)
        config = replace(config, model=replace(config.model, checkpoint_layers=auto[0]))
    planned = plan(config, world_size=args.gpus)
    at_data = plan(config, world_size=args.gpus, lengths=data_lengths(config)) if args.data else None
    fits = planned.total_bytes <= budget
    largest = {key: largest_fitting(config, planned, budget, key) for key in ("micro_batch_size", "max_length")}
    if not fits:
        advice = recommendation(config, planned, budget)
    else:  # auto's count is already the fewest that fit
        advice = None if auto else checkpointing_hint(config, planned, budget, args.gpus)
    if args.json:
        print(json.dumps({"total_bytes": planned.total_bytes, "fits": fits, "gpu_memory_bytes": budget,
                          "components": planned.components, "largest_micro_batch_size": largest["micro_batch_size"],
                          "largest_max_length": largest["max_length"], "recommendation": advice,
                          "data_total_bytes": at_data and at_data.total_bytes,
                          "checkpoint_layers": config.model.checkpoint_layers}, indent=2))  # fmt: skip
        return 0
    print(f"per-rank device memory of {args.config or 'the defaults'} on {args.gpus} rank(s), "
          f"micro-batch of {planned.rows} row(s) x {planned.tokens_per_row} tokens:")  # fmt: skip
    for name, size in planned.components.items():
        print(f"  {name:<52}{size / 2**30:>9.2f} GiB")
    verdict = "fits" if fits else "does NOT fit"
    print(f"  {'total':<52}{planned.total_bytes / 2**30:>9.2f} GiB  ({verdict} {budget / 2**30:.1f} GiB)")
    print(f"largest train.micro_batch_size that fits: {largest['micro_batch_size']} (at data.max_length="
          f"{config.data.max_length}); largest data.max_length: {largest['max_length']} (at micro-batch "
          f"{config.train.micro_batch_size})")  # fmt: skip
    if auto:
        print(f"model.checkpoint_layers=auto: {auto[0]} of {auto[2]} layers checkpointed (the fewest that fit)")
    if at_data:
        print(f"at {config.data.train}'s longest pair ({at_data.rows} row(s) x {at_data.tokens_per_row} tokens): "
              f"{at_data.total_bytes / 2**30:.2f} GiB (activations "
              f"{(at_data.total_bytes - planned.total_bytes) / 2**30:+.2f} GiB against the worst case)")  # fmt: skip
    if advice:
        print(f"recommendation: {advice}")
    return 0


def _cmd_export(args) -> int:
    import json

    from dpo_lora.export import export_model

    report = export_model(
        args.source, out=args.out, base=args.base, dtype=args.dtype, max_shard_size=args.max_shard_size,
        merge_into=args.merge_into, adapter_only=args.adapter_only, overwrite=args.overwrite, push=args.push,
    )  # fmt: skip
    print(json.dumps(report, indent=2))
    return 0


def _cmd_eval(args) -> int:
    from dpo_lora.report import evaluate_run, format_table

    report = evaluate_run(args.run, data=args.data, batch_size=args.batch_size, out=args.out)
    print(format_table(report))
    return 0


def _cmd_generate(args) -> int:
    import json

    from dpo_lora.sampling import generate_run, side_by_side

    result = generate_run(
        args.run, args.prompts, n=args.n, temperature=args.temperature, max_new_tokens=args.max_new_tokens,
        reward=args.reward, seed=args.seed, out=args.out, batch_size=args.batch_size,
    )  # fmt: skip
    print(side_by_side(result, prompts=args.show) + "\n")
    print(json.dumps(result["summary"], indent=2))
    return 0


def _cmd_plot(args) -> int:
    from dpo_lora.plots import plot_run

    for path in plot_run(args.run):
        print(path)
    return 0


def _is_main_rank() -> bool:
    import os

    return os.environ.get("RANK", "0") == "0"


def _before_after_table(before: dict, after: dict) -> str:
    lines = [f"{'held-out metric':<26}{'before':>10}{'after':>10}"]
    for key in (
        "eval/rewards/accuracies",
        "eval/rewards/margins",
        "eval/loss",
        "eval/logps/chosen",
        "eval/logps/rejected",
    ):
        lines.append(f"{key:<26}{before[key]:>10.4f}{after[key]:>10.4f}")
    return "\n".join(lines)


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
    train.set_defaults(handler=_cmd_train)

    config = commands.add_parser("config", help="print the resolved config (or --list every knob)")
    config.add_argument("config", nargs="?", help="YAML config file (defaults only when omitted)")
    config.add_argument("overrides", nargs="*", help="dotted.key=value overrides")
    config.add_argument("--list", action="store_true", help="list every key with its default and meaning")
    config.set_defaults(handler=_cmd_config)

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
    plan.set_defaults(handler=_cmd_plan)

    export = commands.add_parser("export", help="merge the adapter into its base and write a standalone model folder")
    export.add_argument("source", help="run folder, adapter folder, or checkpoint folder")
    export.add_argument("--out", required=True, help="output folder (a Hugging Face model folder)")
    export.add_argument("--base", help="base model folder (default: the run's model.path)")
    export.add_argument(
        "--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"], help="stored weight dtype"
    )
    export.add_argument("--max-shard-size", default="5GB", help="largest safetensors shard, e.g. 5GB")
    export.add_argument(
        "--merge-into", default="original", choices=["original", "dequantized"],
        help="original: unquantized base (for serving); dequantized: exactly the trained function",
    )  # fmt: skip
    export.add_argument("--adapter-only", action="store_true", help="copy the adapter with a model card, no merge")
    export.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    export.add_argument("--push", metavar="REPO", help="also upload to this Hugging Face Hub repo")
    export.set_defaults(handler=_cmd_export)

    evaluate = commands.add_parser("eval", help="held-out reward accuracy, margin, log-probs and KL of a run")
    evaluate.add_argument("run", help="run folder, adapter folder, or checkpoint folder")
    evaluate.add_argument("--data", help="held-out pairs (default: the run's data.eval)")
    evaluate.add_argument("--batch-size", type=int, default=8, help="pairs per forward")
    evaluate.add_argument("--out", help="JSON report path (default: RUN/eval.json)")
    evaluate.set_defaults(handler=_cmd_eval)

    generate = commands.add_parser("generate", help="sample policy and reference side by side, with rewards and KL")
    generate.add_argument("run", help="run folder, adapter folder, or checkpoint folder")
    generate.add_argument("--prompts", required=True, help=".txt (one prompt per line) or .jsonl with a 'prompt' field")
    generate.add_argument("--n", type=int, default=4, help="samples per prompt for each side")
    generate.add_argument("--temperature", type=float, default=1.0, help="sampling temperature")
    generate.add_argument("--max-new-tokens", type=int, default=64, help="longest sample")
    generate.add_argument("--reward", help="module:function scoring a completion text (text -> float)")
    generate.add_argument("--seed", type=int, default=0, help="sampling seed")
    generate.add_argument("--out", help="JSON path (default: RUN/generations.json)")
    generate.add_argument("--batch-size", type=int, default=16, help="prompts per generate call (left-padded)")
    generate.add_argument("--show", type=int, default=3, help="prompts printed side by side (all go to the JSON)")
    generate.set_defaults(handler=_cmd_generate)

    plot = commands.add_parser("plot", help="PNG charts of a run's metrics into RUN/plots/")
    plot.add_argument("run", help="run folder")
    plot.set_defaults(handler=_cmd_plot)

    serve = commands.add_parser("serve", help="an OpenAI-compatible fine-tuning jobs API over this machine's GPUs")
    serve.add_argument("--state-dir", default="serve-state", help="job store, uploaded files and job folders")
    serve.add_argument("--host", default="127.0.0.1", help="address to bind (beyond loopback needs DPO_LORA_API_KEY)")
    serve.add_argument("--port", type=int, default=8000, help="port to bind")
    serve.add_argument("--gpus", default="all", help="GPUs jobs may use: all, or indices like 0,1")
    serve.add_argument("--cpu-slots", type=int, default=1, help="without GPUs: CPU ranks that may run at once")
    serve.add_argument("--models", nargs="+", default=["models"], help="base model folders (or folders of them)")
    serve.add_argument("--config", help="base YAML config of every job (default: dpo-lora's defaults)")
    serve.add_argument("--db", help="SQLAlchemy URL of the job store (default: SQLite in --state-dir)")
    serve.add_argument("--grace-seconds", type=float, default=120.0, help="pause: SIGKILL after this long")
    serve.add_argument("--max-upload-size", default="1GiB", help="largest upload accepted (413 past it), e.g. 500MB")
    serve.add_argument("--max-streams", type=int, default=64, help="open event streams per API key (429 past it)")
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
    serve.set_defaults(handler=_cmd_serve)

    fetch = commands.add_parser("fetch-default-model", help="make a model folder of SmolLM2-135M-Instruct")
    fetch.add_argument("dir", help="target folder (kept as a cache: a complete folder is reused)")
    fetch.set_defaults(handler=_cmd_fetch)
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
    from dpo_lora.cpu_memory import huge_pages_for_tensors

    huge_pages_for_tensors()  # before torch is imported: torch reads it once
    args = parse_args(argv)
    try:
        from dpo_lora.console import quiet_third_party

        quiet_third_party()
        return args.handler(args)
    except UserError as err:
        print(f"dpo-lora: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("dpo-lora: interrupted", file=sys.stderr)
        return 130
    except Exception as err:
        from dpo_lora.distributed import rank_failure_message

        message = rank_failure_message(err)
        if message is None:
            raise
        print(message, file=sys.stderr)
        return 1
