"""OpenAI hyperparameters and dpo_lora knobs -> the run's config."""

from __future__ import annotations

import pytest

from dpo_lora.serve.jobspec import SpecError, build_spec


def spec(hyperparameters=None, extra=None, devices=4, seed=None):
    return build_spec(None, "/models/m", "/job/train.jsonl", None, "/job/run", hyperparameters or {}, extra or {},
                      seed, devices)  # fmt: skip


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
