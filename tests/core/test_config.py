"""Config loading: shipped files, overrides, and one-line errors naming the key."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from dpo_lora.core.config import dump_yaml, load_config
from dpo_lora.core.errors import UserError
from dpo_lora.core.schema import Config, describe

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("path", sorted((REPO / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_yaml_loads(path):
    config = load_config(path)
    assert isinstance(config, Config)
    assert (REPO / config.deepspeed).is_file(), f"{path.name} names a missing DeepSpeed JSON"


def test_overrides_are_typed_and_nested(tmp_path):
    config = load_config(
        None, ["train.lr=1e-4", "lora.target_modules=[q_proj, v_proj]", "data.eval=null", "dpo.loss=ipo"]
    )
    assert config.train.lr == 1e-4
    assert config.lora.target_modules == ["q_proj", "v_proj"]
    assert config.data.eval is None and config.dpo.loss == "ipo"


def test_int_is_accepted_for_float_but_not_the_reverse():
    assert load_config(None, ["train.lr=1"]).train.lr == 1.0
    with pytest.raises(UserError, match="'train.micro_batch_size' must be int"):
        load_config(None, ["train.micro_batch_size=2.5"])


@pytest.mark.parametrize(
    "override, message",
    [
        ("train.lrr=1", "unknown config key 'train.lrr'"),
        ("modle.path=x", "unknown config key 'modle'"),
        ("model.quantization=nf3", "'model.quantization' must be one of"),
        ("model.gradient_checkpointing=maybe", "'model.gradient_checkpointing' must be bool"),
        ("data.max_prompt_length=600", "'data.max_prompt_length' must be smaller"),
        ("dpo.label_smoothing=0.5", "'dpo.label_smoothing'"),
        ("train", "must look like dotted.key=value"),
        ("wandb.project=team/project", "'wandb.project' must be 1-128 letters, digits"),
        ("wandb.entity=my team", "'wandb.entity' must be 1-128 letters"),
        ("wandb.mode=sync", "'wandb.mode' must be one of"),
        (f"wandb.tags=[ok, {'x' * 65}]", "'wandb.tags' each tag must be 1-64 characters"),
    ],
)
def test_bad_values_name_the_key(override, message):
    with pytest.raises(UserError, match=message):
        load_config(None, [override])


def test_prompt_limit_is_derived_from_max_length_when_unset():
    assert load_config(None, ["data.max_length=256"]).data.max_prompt_length == 128  # was an error
    assert load_config(None).data.max_prompt_length == 256
    assert load_config(None, ["data.max_length=256", "data.max_prompt_length=200"]).data.max_prompt_length == 200
    with pytest.raises(UserError, match="'data.max_prompt_length' must be >= 1"):
        load_config(None, ["data.max_length=1"])


def test_a_loss_is_one_name_or_a_list_of_terms_with_weights():
    config = load_config(None, ["dpo.loss=[sigmoid, sft]", "dpo.loss_weights=[1, 0.5]"])
    assert config.dpo.loss == ["sigmoid", "sft"] and config.dpo.loss_weights == [1.0, 0.5]
    assert config.dpo.terms == [("sigmoid", 1.0), ("sft", 0.5)] and config.dpo.uses_reference
    assert load_config(None, ["dpo.loss=simpo"]).dpo.terms == [("simpo", 1.0)]
    assert not load_config(None, ["dpo.loss=[orpo, sft]"]).dpo.uses_reference
    assert load_config(None, ["dpo.loss=[sigmoid, robust]", "dpo.label_smoothing=0.1"]).dpo.label_smoothing == 0.1


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["dpo.loss=[sigmoid, sfft]"], "'dpo.loss' must be one of"),
        (["dpo.loss=[]"], "'dpo.loss' must be str or list"),
        (["dpo.loss=[sigmoid, sigmoid]"], "'dpo.loss' names a term twice"),
        (["dpo.loss=[sft, bco_pair]"], "'dpo.loss' must list bco_pair first"),
        (["dpo.loss=[sigmoid, sft]", "dpo.loss_weights=[1]"], "'dpo.loss_weights' has 1 weight\\(s\\) for 2"),
        (["dpo.loss_weights=[-1]"], "'dpo.loss_weights' must be >= 0"),
        (["dpo.loss_weights=[x]"], "'dpo.loss_weights' must be list"),
        (["dpo.simpo_gamma=-1"], "'dpo.simpo_gamma' must be >= 0"),
        (["train.pad_to_multiple_of=-8"], "'train.pad_to_multiple_of' must be >= 0"),
        (["dpo.loss=[kto, sft]"], "'dpo.loss' kto trains on unpaired rows and can't be mixed"),
        (["dpo.kto_undesirable_weight=-0.5"], "'dpo.kto_undesirable_weight' must be >= 0"),
        (["monitor.window_pairs=0"], "'monitor.window_pairs' must be >= 1"),
        (["monitor.length_correlation=1.5"], "'monitor.length_correlation' must be in \\(0, 1\\)"),
        (["dpo.wpo=true", "dpo.loss=[sigmoid, aot]"], "'dpo.wpo' weighs each pair's loss; aot's losses belong"),
        (
            ["dpo.f_divergence=js_divergence", "dpo.loss=[sigmoid, nca_pair]"],
            "'dpo.f_divergence' only changes losses on the chosen-minus-rejected difference, not nca_pair",
        ),  # fmt: skip
        (["dpo.f_divergence=kl"], "'dpo.f_divergence' must be one of"),
        (["dpo.f_divergence=alpha_divergence", "dpo.f_alpha=1.5"], "'dpo.f_alpha' must be in \\(0, 1\\)"),
        (["dpo.wpo=true", "dpo.loss=kto"], "'dpo.wpo' weighs each pair's loss; kto's rows are not pairs"),
    ],
)
def test_bad_loss_terms_name_the_key(overrides, message):
    with pytest.raises(UserError, match=message):
        load_config(None, overrides)


@pytest.mark.parametrize("loss", ["hinge", "ipo", "bco_pair", "nca_pair", "sppo_hard", "apo_zero", "apo_down"])
def test_label_smoothing_on_a_loss_that_ignores_it_is_an_error(loss):
    with pytest.raises(UserError, match=f"'dpo.label_smoothing' has no effect on dpo.loss '{loss}'"):
        load_config(None, [f"dpo.loss={loss}", "dpo.label_smoothing=0.1"])
    for smoothed in ("sigmoid", "robust", "exo_pair", "aot", "aot_unpaired"):
        assert load_config(None, [f"dpo.loss={smoothed}", "dpo.label_smoothing=0.1"]).dpo.label_smoothing == 0.1


def test_bad_yaml_file_is_a_user_error(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed\n")
    with pytest.raises(UserError, match="not valid YAML"):
        load_config(bad)
    with pytest.raises(UserError, match="not found"):
        load_config(tmp_path / "missing.yaml")


def test_resolved_config_round_trips(tmp_path):
    config = load_config(None, ["train.max_steps=7", "output_dir=elsewhere"])
    saved = tmp_path / "config.yaml"
    saved.write_text(dump_yaml(config))
    assert load_config(saved) == config


def test_readme_config_table_matches_the_config_tree():
    readme = (REPO / "docs" / "configuration.md").read_text()
    table = readme.split("<!-- config-table")[1].split("<!-- /config-table -->")[0]
    documented = [line for line in table.splitlines() if line.startswith("| `")]
    expected = [f"| `{key}` | `{default!r}` | {help_text} |" for key, default, help_text in describe()]
    assert documented == expected, "regenerate: dpo-lora config --list --markdown > docs/configuration.md"


def test_the_configuration_page_is_what_the_command_prints(capsys):
    from dpo_lora.cli import main

    assert main(["config", "--list", "--markdown"]) == 0
    assert capsys.readouterr().out == (REPO / "docs" / "configuration.md").read_text(), (
        "docs/configuration.md is stale: dpo-lora config --list --markdown > docs/configuration.md"
    )


def test_every_varlen_kernel_can_be_configured():
    from dpo_lora.data.layout import VARLEN_KERNELS

    for kernel in VARLEN_KERNELS:  # pack_sequences runs only on these, so each must be choosable
        assert load_config(None, [f"model.attn_implementation={kernel}"]).model.attn_implementation == kernel


@pytest.mark.parametrize(
    ("dtype", "quantization", "refused"),
    [("float32", "nf4", False), ("bfloat16", "none", False), ("bfloat16", "nf4", True), ("bfloat16", "int8", True)],
)
def test_a_run_saved_before_float32_residual_resumes_unless_it_would_now_train_differently(
    dtype, quantization, refused
):
    from dpo_lora.core.config import resume_differences, to_dict
    from dpo_lora.model.precision import resolved

    current = load_config(None, [f"model.dtype={dtype}", f"model.quantization={quantization}"])
    saved = to_dict(current)
    del saved["model"]["float32_residual"]  # as versions before the key wrote it: they trained without it
    # A run resolves `auto` for its device before comparing: all bf16 on a GPU, as those versions trained.
    assert resume_differences(saved, dataclasses.replace(current, model=resolved(current.model, True))) == []
    kept = load_config(
        None, [f"model.dtype={dtype}", f"model.quantization={quantization}", "model.float32_residual=true"]
    )
    expected = ["model.float32_residual: False -> True"] if refused else []
    assert resume_differences(saved, kept) == expected
    with_key = load_config(
        None, [f"model.dtype={dtype}", f"model.quantization={quantization}", "model.float32_residual=false"]
    )
    assert resume_differences(saved, with_key) == []  # the way to continue such a run exactly


def test_a_run_saved_before_fused_lora_and_compile_resumes_and_turning_them_on_is_a_difference():
    from dpo_lora.core.config import resume_differences, to_dict

    current = load_config(None, [])
    saved = to_dict(current)
    del saved["model"]["fused_lora"], saved["model"]["compile"]  # as versions before the keys wrote them
    assert resume_differences(saved, current) == []
    changed = load_config(None, ["model.fused_lora=true", "model.compile=layers"])
    assert resume_differences(saved, changed) == ["model.compile: 'off' -> 'layers'", "model.fused_lora: False -> True"]


def test_the_collective_timeout_must_be_positive():
    with pytest.raises(UserError, match="'train.collective_timeout_s' must be >= 1"):
        load_config(None, ["train.collective_timeout_s=0"])


def test_a_choice_yaml_reads_as_a_boolean_is_the_word_written(tmp_path):
    """YAML 1.1 reads an unquoted `off` as false: a field whose choices include it gets the word."""
    assert load_config(None, ["model.compile=off"]).model.compile == "off"
    path = tmp_path / "run.yaml"
    path.write_text("model:\n  compile: off\n")
    config = load_config(path, [])
    assert config.model.compile == "off"
    assert load_config(None, [f"model.compile={config.model.compile}"]).model.compile == "off"
    saved = tmp_path / "saved.yaml"
    saved.write_text(dump_yaml(config))
    assert load_config(saved, []).model.compile == "off"
    with pytest.raises(UserError, match="'model.compile' must be str, got True"):  # `on` is no choice of it
        load_config(None, ["model.compile=on"])
    with pytest.raises(UserError, match="'data.train' must be str, got False"):  # no choices: as before
        load_config(None, ["data.train=off"])
