"""OpenAI hyperparameters and dpo_lora knobs -> the run's config."""

from __future__ import annotations

import pytest

from dpo_lora.serve.jobspec import SpecError, build_spec

from ..conftest import REPO


def spec(hyperparameters=None, extra=None, devices=4, seed=None):
    return build_spec(None, "/models/m", "/job/train.jsonl", None, "/job/run", "/job/deepspeed.json",
                      hyperparameters or {}, extra or {}, seed, devices)  # fmt: skip


@pytest.mark.parametrize("batch_size", [1, 2, 3, 4, 6, 8, 12, 16, 30, 64])
@pytest.mark.parametrize("ranks", [1, 2, 3])
def test_batch_size_is_exactly_micro_times_accumulation_times_ranks(batch_size, ranks):
    if batch_size % ranks:
        with pytest.raises(SpecError) as caught:
            spec({"batch_size": batch_size}, {"gpus": ranks})
        assert caught.value.param == "batch_size"
        return
    train = spec({"batch_size": batch_size}, {"gpus": ranks}).config.train
    assert train.micro_batch_size * train.grad_accum * ranks == batch_size
    assert train.micro_batch_size <= 4  # never more per forward than the base config allows


def test_auto_resolves_to_the_base_config_and_values_map_to_their_knobs():
    auto = spec({"beta": "auto", "batch_size": "auto", "learning_rate_multiplier": "auto", "n_epochs": "auto"})
    assert auto.hyperparameters == {"beta": 0.1, "n_epochs": 1, "learning_rate_multiplier": 1.0, "batch_size": 4}
    given = spec({"beta": 0.3, "n_epochs": 2, "learning_rate_multiplier": 0.5}, {"lora.r": 4}, seed=9)
    config = given.config
    assert (config.dpo.beta, config.train.epochs, config.train.lr) == (0.3, 2.0, 2.5e-5)
    assert (config.lora.r, config.train.seed, config.model.path, config.output_dir) == (4, 9, "/models/m", "/job/run")


@pytest.mark.parametrize(
    ("extra", "hyperparameters", "param"),
    [
        ({"dpo": {"beta": 0.2}}, {"beta": 0.3}, "beta"),
        ({"data": {"train": "x.jsonl"}}, {}, "data.train"),
        ({"train": {"resume": "auto"}}, {}, "train.resume"),
        ({"lora": {"alpah": 4}}, {}, "lora.alpah"),
        ({"gpus": 5}, {}, "gpus"),
        ({}, {"learning_rate_multiplier": -1}, "learning_rate_multiplier"),
    ],
)
def test_what_the_config_tree_refuses_names_the_field(extra, hyperparameters, param):
    with pytest.raises(SpecError) as caught:
        spec(hyperparameters, extra)
    assert caught.value.param == param


# -- hostile requests (the hardening issue): every path, module or command key is the service's --
@pytest.mark.parametrize(
    "key",
    [" model.trust_remote_code", "model.trust_remote_code ", "model.trust_remote_code=true #", "model..path",
     "Model.path", "model.path\n", "model.\u0070ath "],
)  # fmt: skip
def test_a_key_spelled_past_the_guard_is_refused_not_normalised(key):
    with pytest.raises(SpecError, match="is not a dotted name"):
        spec(extra={key: True})


@pytest.mark.parametrize(
    "extra, key",
    [({"deepspeed": "../../files/file-x.json"}, "deepspeed"), ({"lora": {"init_adapter": "/etc"}}, "lora.init_adapter"),
     ({"model": {"trust_remote_code": True}}, "model.trust_remote_code"), ({"data.num_proc": 512}, "data.num_proc"),
     ({"model.path": "/etc"}, "model.path"), ({"data": {"eval": "/etc/passwd"}}, "data.eval")],
)  # fmt: skip
def test_reserved_keys_are_refused_in_every_spelling(extra, key):
    with pytest.raises(SpecError, match="set by the service") as caught:
        spec(extra=extra)
    assert caught.value.param == key


def test_every_config_key_a_client_may_set_holds_no_path():
    """The audit: a client may set numbers, flags, closed choices and two audited strings. A string
    key added later is the service's until it is added to FREE_STRINGS on purpose."""
    from dpo_lora.core.schema import knobs
    from dpo_lora.serve.jobspec import FREE_STRINGS, SERVICE_KEYS, client_may_set

    settable = {key for key in knobs() if client_may_set(key)}
    for key, field in knobs().items():
        if key in settable:
            assert key not in SERVICE_KEYS
            free_string = "str" in str(field.type) and not field.metadata.get("choices")
            assert not free_string or key in FREE_STRINGS, key
    assert {"deepspeed", "output_dir", "model.path", "data.train", "data.eval", "lora.init_adapter"}.isdisjoint(
        settable
    )
    assert {"dpo.beta", "train.lr", "lora.r", "model.quantization", "lora.target_modules"} <= settable


def test_a_nested_or_non_finite_value_is_refused_naming_its_key():
    for extra, param in (({"train": {"lr": {"x": 1}}}, "train.lr"), ({"train.lr": float("nan")}, "train.lr"),
                         ({"train.max_steps": 2**80}, "train.max_steps"), ({"train.lr": [[1]]}, "train.lr")):  # fmt: skip
        with pytest.raises(SpecError) as caught:
            spec(extra=extra)
        assert caught.value.param == param, extra
    for hyperparameters, param in (({"beta": float("nan")}, "beta"), ({"learning_rate_multiplier": float("inf")},
                                   "learning_rate_multiplier"), ({"n_epochs": 0.5}, "n_epochs"), ({"beta": -1}, "beta")):  # fmt: skip
        with pytest.raises(SpecError) as caught:
            spec(hyperparameters)
        assert caught.value.param == param, hyperparameters


def test_a_client_picks_a_shipped_zero_configuration_by_name():
    import json

    from dpo_lora.core.dsconfig import zero_config

    assert spec(extra={"zero_stage": 3, "offload": True}).deepspeed == zero_config(3, True)
    assert spec(extra={"zero_stage": 0}).deepspeed == zero_config(0)
    assert spec().config.deepspeed == "/job/deepspeed.json"  # the job's own copy, whatever the base named
    assert spec().deepspeed == json.loads((REPO / "deepspeed_configs" / "zero2.json").read_text())
    for extra, param in (({"zero_stage": 4}, "zero_stage"), ({"zero_stage": True}, "zero_stage"),
                         ({"zero_stage": 1, "offload": True}, "offload"), ({"offload": "yes"}, "offload")):  # fmt: skip
        with pytest.raises(SpecError) as caught:
            spec(extra=extra)
        assert caught.value.param == param, extra


def test_dora_is_a_knob_at_every_zero_stage():
    for stage in (2, 3):
        made = spec(extra={"lora": {"dora": True}, "zero_stage": stage})
        assert made.config.lora.dora is True and made.deepspeed["zero_optimization"]["stage"] == stage


def test_the_shipped_zero_files_are_the_configurations_the_service_writes():
    import json

    from dpo_lora.core.dsconfig import zero_config

    for stage, offload in ((0, False), (1, False), (2, False), (2, True), (3, False), (3, True)):
        name = f"zero{stage}{'_offload' if offload else ''}.json"
        assert json.loads((REPO / "deepspeed_configs" / name).read_text()) == zero_config(stage, offload), name


def test_a_client_may_choose_the_loss_terms_and_their_weights():
    config = spec(extra={"dpo": {"loss": ["sigmoid", "sft"], "loss_weights": [1, 0.5], "simpo_gamma": 1.0}}).config
    assert config.dpo.terms == [("sigmoid", 1.0), ("sft", 0.5)] and config.dpo.simpo_gamma == 1.0
    with pytest.raises(SpecError, match="'dpo.loss' must be one of") as caught:
        spec(extra={"dpo.loss": ["sigmoid", "/etc/passwd"]})
    assert caught.value.param == "dpo.loss"
