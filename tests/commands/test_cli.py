"""The command line: fast help, one-line errors with a non-zero exit and no traceback."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest

from dpo_lora.cli import main

from ..conftest import REPO


def run_cli(*args: str, cwd=REPO) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "dpo_lora", *args], capture_output=True, text=True, cwd=cwd, timeout=300
    )


def test_help_answers_without_heavy_imports():
    code = "import sys; from dpo_lora.cli import build_parser; build_parser(); print(sorted(m for m in ('torch', 'deepspeed', 'transformers') if m in sys.modules))"
    start = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
    assert time.perf_counter() - start < 30  # a sanity bound, not a benchmark


def test_config_list_names_every_section(capsys):
    assert main(["config", "--list"]) == 0
    out = capsys.readouterr().out
    for key in (
        "model.quantization",
        "lora.r",
        "data.max_length",
        "dpo.beta",
        "train.grad_accum",
        "deepspeed",
        "output_dir",
    ):
        assert key in out


@pytest.mark.parametrize(
    "args, message",
    [
        (["train", "configs/demo.yaml", "train.lrr=1"], "unknown config key 'train.lrr'"),
        (["train", "nope.yaml"], "config file not found: nope.yaml"),
        (
            ["train", "configs/demo.yaml", "model.path=/nonexistent/model"],
            "'model.path': no model at /nonexistent/model",
        ),
    ],
)
def test_user_errors_are_one_line_with_exit_2(tmp_path, args, message):
    result = run_cli(*args, f"output_dir={tmp_path / 'out'}")
    assert result.returncode == 2
    lines = [line for line in result.stderr.splitlines() if line.startswith("dpo-lora: error:")]
    assert len(lines) == 1 and message in lines[0], result.stderr
    assert "Traceback" not in result.stderr


def test_bad_data_names_file_and_row(tmp_path, tiny_model_dir):
    data = tmp_path / "pairs.jsonl"
    data.write_text(
        json.dumps({"prompt": "p", "chosen": "a", "rejected": "b"})
        + "\n"
        + json.dumps({"prompt": "p", "chosen": "a"})
        + "\n"
    )
    result = run_cli(
        "train", "configs/demo.yaml", f"model.path={tiny_model_dir}", f"data.train={data}", "data.eval=null",
        f"output_dir={tmp_path / 'out'}",
    )  # fmt: skip
    assert result.returncode == 2, result.stderr
    assert f"dpo-lora: error: {data}: 1 bad row(s): row 2: missing field 'rejected'" in result.stderr
    assert "Traceback" not in result.stderr


def test_overrides_may_follow_flags(capsys):
    from dpo_lora.cli import parse_args

    args = parse_args(["train", "c.yaml", "a.b=1", "--overwrite", "train.lr=2e-4", "--resume"])
    assert args.overrides == ["a.b=1", "train.lr=2e-4"] and args.overwrite and args.resume
    with pytest.raises(SystemExit):
        parse_args(["train", "c.yaml", "--overwrite", "stray"])
    assert "unrecognized arguments: stray" in capsys.readouterr().err
