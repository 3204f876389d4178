"""ExperimentConfig is validated on construction (the tree settings included), before any training."""
import typing

import pytest

from fedtreelora.core import TreeConfig
from fedtreelora.federation.config import ExperimentConfig, Scheduler


@pytest.mark.parametrize("key, value, allowed", [
    ("linkage", "avrage", "average"), ("metric", "euclid", "frobenius"), ("scheduler", "cosin", "cosine")])
def test_a_bad_choice_names_the_key_and_the_allowed_values(key, value, allowed):
    with pytest.raises(ValueError, match=rf"config {key} must be one of \[.*'{allowed}'.*\], got '{value}'"):
        ExperimentConfig(**{key: value})


@pytest.mark.parametrize("changes, message", [
    (dict(window=0), "window must be an integer >= 1"), (dict(tau=2.0), "tau must be a number in"),
    (dict(num_clients=0), "num_clients must be >= 1"), (dict(train_fraction=1.0), "train_fraction"),
    (dict(num_groups=9), "num_groups"), (dict(dp_noise_multiplier=1.0), "dp_clip_norm")])
def test_bad_numbers_fail_on_construction(changes, message):
    with pytest.raises(ValueError, match=message):
        ExperimentConfig(**changes)
    with pytest.raises(ValueError, match=message):
        ExperimentConfig().replace(**changes)


def test_tree_defaults_have_one_home():
    cfg, tree = ExperimentConfig(), TreeConfig()
    assert cfg.tree_config() == TreeConfig(linkage=tree.linkage, metric=tree.metric, window=tree.window, tau=tree.tau)
    import argparse
    from fedtreelora.cli import aggregate as command
    parser = argparse.ArgumentParser()
    command.add_arguments(parser)
    args = parser.parse_args(["a", "--out", "o"])
    assert (args.linkage, args.metric, args.window, args.tau, args.head) == \
        (tree.linkage, tree.metric, tree.window, tree.tau, tree.head)


def test_scheduler_choices_are_transformers_schedulers():
    from transformers import SchedulerType
    assert set(typing.get_args(Scheduler)) == {s.value for s in SchedulerType}


def test_simulate_rejects_a_typo_before_training(tmp_path, capsys):
    from fedtreelora.cli import main
    assert main(["simulate", "--set", "linkage=avrage", "--run-dir", str(tmp_path / "run"), "--no-progress"]) == 2
    assert "config linkage must be one of" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()
