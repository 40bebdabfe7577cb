"""Train and eval splits, checked and tokenized once, then cached on disk by a fingerprint.

The fingerprint covers the data bytes, the tokenizer, the truncation settings and the bad-row
policy, so a second run (or every rank after the first) loads the tokenized pairs at once with
`datasets.load_from_disk`, and any change re-tokenizes.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

from dpo_lora.core.errors import UserError
from dpo_lora.data.rows import collect_rows
from dpo_lora.data.tokenization import tokenize_pair

CACHE_VERSION = "4"  # bump when tokenization or normalization changes (4: middle-cut prompts, counted)


def cache_root() -> Path:
    return Path(os.environ.get("DPO_LORA_CACHE", Path.home() / ".cache" / "dpo-lora")) / "tokenized"


def _source_digest(source: str) -> str:
    path = Path(source)
    digest = hashlib.sha256()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path] if path.is_file() else []
    if not files:
        return "hub:" + source  # a hub id: its revision is the hub's business
    for file in files:
        digest.update(str(file.relative_to(path) if path.is_dir() else file.name).encode())
        with file.open("rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def _tokenizer_digest(tokenizer) -> str:
    parts = [getattr(tokenizer, "chat_template", None) or "", repr(tokenizer.all_special_tokens)]
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        parts.append(backend.to_str())
    else:
        from datasets.fingerprint import Hasher

        parts.append(Hasher.hash(tokenizer))
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()


def _tokenize(batch: dict, *, tokenizer, max_length: int, max_prompt_length: int) -> dict:

    out = {"prompt_ids": [], "chosen_ids": [], "rejected_ids": [], "prompt_truncated": []}
    for i in range(len(batch["prompt"])):
        row = {key: batch[key][i] for key in ("prompt", "chosen", "rejected", "chat")}
        ids = tokenize_pair(row, tokenizer, max_length=max_length, max_prompt_length=max_prompt_length)
        for key, value in ids.items():
            out[key].append(value)
    return out


def tokenized_split(source: str, tokenizer, data_config):
    """(tokenized datasets.Dataset, bad-row report) for one source, from the cache when possible."""
    import datasets

    datasets.disable_progress_bars()
    key = hashlib.sha256(
        json.dumps(
            [
                CACHE_VERSION,
                _source_digest(source),
                _tokenizer_digest(tokenizer),
                data_config.max_length,
                data_config.max_prompt_length,
                data_config.on_bad_rows,
            ]
        ).encode()
    ).hexdigest()[:32]
    folder = cache_root() / key
    if (folder / "report.json").is_file():
        return datasets.load_from_disk(str(folder / "pairs")), json.loads((folder / "report.json").read_text())

    rows, report = collect_rows(source, tokenizer, data_config.on_bad_rows)
    columns = {name: [row[name] for row in rows] for name in rows[0]}
    fn_kwargs = {
        "tokenizer": tokenizer,
        "max_length": data_config.max_length,
        "max_prompt_length": data_config.max_prompt_length,
    }
    pairs = datasets.Dataset.from_dict(columns).map(
        _tokenize,
        batched=True,
        fn_kwargs=fn_kwargs,
        remove_columns=["prompt", "chosen", "rejected", "chat"],
        num_proc=data_config.num_proc,
    )
    report["prompts_truncated"] = sum(pairs["prompt_truncated"])  # cut to data.max_prompt_length
    tmp = folder.with_name(folder.name + f".tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    pairs.save_to_disk(str(tmp / "pairs"))
    (tmp / "report.json").write_text(json.dumps(report))
    try:
        tmp.rename(folder)
    except OSError:  # another process finished the same entry first
        shutil.rmtree(tmp, ignore_errors=True)
    return datasets.load_from_disk(str(folder / "pairs")), report


def prepare_splits(data_config, tokenizer, seed: int, report_dir: Path | None = None):
    """(train, eval or None) tokenized datasets; writes REPORT_DIR/data_report.json when rows were
    dropped or prompts truncated."""
    train_set, train_report = tokenized_split(data_config.train, tokenizer, data_config)
    eval_set, eval_report = None, None
    if data_config.eval:
        eval_set, eval_report = tokenized_split(data_config.eval, tokenizer, data_config)
    elif data_config.eval_fraction > 0:
        if len(train_set) < 2:
            raise UserError(f"{data_config.train}: too few rows to hold out data.eval_fraction for eval")
        split = train_set.train_test_split(test_size=data_config.eval_fraction, seed=seed)
        train_set, eval_set = split["train"], split["test"]
    reports = {"train": train_report, "eval": eval_report}
    if report_dir is not None and any(r and (r["dropped"] or r.get("prompts_truncated")) for r in reports.values()):
        report_dir.mkdir(parents=True, exist_ok=True)
        (report_dir / "data_report.json").write_text(json.dumps(reports, indent=2))
    return train_set, eval_set
