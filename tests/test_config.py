"""ExperimentConfig is validated on construction (the tree settings included), before any training."""
import importlib.util
import typing
from pathlib import Path

import pytest

from fedtreelora.core import TreeConfig
from fedtreelora.federation.config import CALIBRATED_TAU, ExperimentConfig, Scheduler


@pytest.mark.parametrize("key, value, allowed", [
    ("linkage", "avrage", "average"), ("metric", "euclid", "frobenius"), ("scheduler", "cosin", "cosine")])
def test_a_bad_choice_names_the_key_and_the_allowed_values(key, value, allowed):
    with pytest.raises(ValueError, match=rf"config {key} must be one of \[.*'{allowed}'.*\], got '{value}'"):
        ExperimentConfig(**{key: value})


@pytest.mark.parametrize("changes, message", [
    (dict(window=0), "window must be an integer >= 1"), (dict(tau=2.0), "tau must be a number in"),
    (dict(num_clients=0), "num_clients must be >= 1"), (dict(train_fraction=1.0), "train_fraction"),
    (dict(num_groups=17), r"num_groups \(17\) exceeds num_clients \(16\)"), (dict(dp_noise_multiplier=1.0), "dp_clip_norm"),
    (dict(warmup_rounds=0), "warmup_rounds must be >= 1")])
def test_bad_numbers_fail_on_construction(changes, message):
    with pytest.raises(ValueError, match=message):
        ExperimentConfig(**changes)
    with pytest.raises(ValueError, match=message):
        ExperimentConfig().replace(**changes)


def test_tree_defaults_have_one_home():
    # TreeConfig holds the library's defaults; the experiment takes them all but tau, which is
    # calibrated for the experiment's default setting and shipped in that setting's config file
    cfg, tree = ExperimentConfig(), TreeConfig()
    assert cfg.tree_config() == TreeConfig(linkage=tree.linkage, metric=tree.metric, window=tree.window,
                                           tau=CALIBRATED_TAU, head=tree.head)
    assert tree.tau == 0.1 and CALIBRATED_TAU == 0.11
    import argparse
    from fedtreelora.cli import aggregate as command
    parser = argparse.ArgumentParser()
    command.add_arguments(parser)
    args = parser.parse_args(["a", "--out", "o"])
    assert (args.linkage, args.metric, args.window, args.tau, args.head) == \
        (tree.linkage, tree.metric, tree.window, tree.tau, tree.head)


def bench_federated():
    """benchmarks/bench_federated.py as a module (it is a script, not part of the package)."""
    spec = importlib.util.spec_from_file_location("bench_federated_for_config",
                                                  Path(__file__).resolve().parents[1] / "benchmarks" / "bench_federated.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_default_setting_is_the_hierarchical_config_file():
    shipped = ExperimentConfig.from_file(Path(__file__).resolve().parents[1] / "configs" / "hierarchical.yaml")
    assert shipped.replace(super_groups=None) == ExperimentConfig()   # None nests 4 groups in 2 super-groups
    assert shipped.super_groups == 2 and shipped.tau == CALIBRATED_TAU


def test_max_length_left_null_is_the_tasks_default():
    # 16 tokens suit the default classification setting but hold no causal-LM response: a causal-LM
    # config that does not set max_length gets room for prompt + response, and an explicit value wins
    from fedtreelora.federation.config import TASK_MAX_LENGTH
    causal = dict(task="causal_lm", model="smollm2", dataset="aclsum")
    assert ExperimentConfig().max_length == TASK_MAX_LENGTH["classification"] == 16
    assert ExperimentConfig.from_dict(causal).max_length == TASK_MAX_LENGTH["causal_lm"] == 128
    assert ExperimentConfig.from_dict({**causal, "max_length": 64}).max_length == 64
    assert ExperimentConfig.from_dict({**causal, "max_length": None}).to_dict()["max_length"] == 128
    assert dict((name, default) for name, default, _ in ExperimentConfig.fields_help())["max_length"] is None
    with pytest.raises(ValueError, match="max_length must be >= 1"):
        ExperimentConfig(max_length=0)


def test_every_config_file_is_a_benchmark_setting_measured_with_exactly_it():
    # The README reports benchmarks/results/federated.json, measured per setting with the config
    # stored beside it: every file in configs/ must be a setting there, and each stored method's
    # results must still hold for the file as it is (bench_federated.still_valid), so a config edited
    # without re-running its benchmark fails here.
    import json
    root = Path(__file__).resolve().parents[1]
    bench = bench_federated()
    stored = json.loads((root / "benchmarks" / "results" / "federated.json").read_text())
    files = sorted(p.stem for p in (root / "configs").glob("*.yaml"))
    assert files == sorted(bench.SETTINGS)
    for name in files:
        cfg = ExperimentConfig.from_file(root / "configs" / f"{name}.yaml").to_dict()
        assert stored["results"].get(name), f"configs/{name}.yaml has no results in federated.json"
        measured = stored["settings"][name]
        if "model" not in measured:   # recorded before whole configs were stored: the keys it varied only
            assert {k: cfg[k] for k in measured} == measured, f"configs/{name}.yaml differs from {measured}"
            continue
        stale = [m for m in stored["results"][name] if not bench.still_valid(m, measured, cfg)]
        assert not stale, f"configs/{name}.yaml is not what {stale} were measured with"


def test_scheduler_choices_are_transformers_schedulers():
    from transformers import SchedulerType
    assert set(typing.get_args(Scheduler)) == {s.value for s in SchedulerType}


def test_simulate_rejects_a_typo_before_training(tmp_path, capsys):
    from fedtreelora.cli import main
    assert main(["simulate", "--set", "linkage=avrage", "--run-dir", str(tmp_path / "run"), "--no-progress"]) == 2
    assert "config linkage must be one of" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("num_groups, expected", [(4, 2), (8, 2), (6, 2), (2, 0), (1, 0), (3, 0), (5, 0)])
def test_setting_num_groups_alone_never_breaks_or_silently_nests(num_groups, expected):
    # The default (hierarchical) run nests its 4 groups in 2 super-groups; overriding num_groups alone
    # must neither fail validation (1, 3, 5 groups) nor drop the label rotation between 2 groups.
    cfg = ExperimentConfig().replace(num_groups=num_groups)
    assert cfg.super_groups is None and cfg.super_group_count == expected


def test_an_explicit_super_groups_wins_and_is_checked():
    assert ExperimentConfig(super_groups=0).super_group_count == 0
    assert ExperimentConfig(num_groups=8, super_groups=4).super_group_count == 4
    with pytest.raises(ValueError, match=r"super_groups must be null .* divisor of num_groups \(4\), got 3"):
        ExperimentConfig(super_groups=3)
    with pytest.raises(ValueError, match="super_groups"):
        ExperimentConfig(super_groups="2")


def test_two_groups_rotate_labels_one_super_group_each_does_not():
    import numpy as np

    from fedtreelora.federation.data import partition
    labels = np.repeat(np.arange(5), 40)
    flat = partition(labels, 4, 12, num_groups=2, alpha=100.0, seed=0,
                     super_groups=ExperimentConfig(num_groups=2).super_group_count)
    # group 1 sees rotated labels: its train labels are not its documents' true classes
    assert any((labels[c.train_idx] != c.train_labels).any() for c in flat if c.group == 1)


def test_a_run_saved_before_a_setting_existed_is_the_same_run(tmp_path):
    # A setting added later (here `head`) defaults to the behaviour before it: a run folder or a
    # benchmark result saved without it is still today's run, and a real change is named.
    import json

    from fedtreelora.federation.checkpoints import RunFolderError
    from fedtreelora.federation.schedule import check_run_folder

    saved = ExperimentConfig().to_dict()
    del saved["head"]
    (tmp_path / "config.json").write_text(json.dumps(saved))
    check_run_folder(tmp_path, ExperimentConfig(), resume=True)
    with pytest.raises(RunFolderError, match=r"differs in \['head'\]"):
        check_run_folder(tmp_path, ExperimentConfig(head="local"), resume=True)

    assert ExperimentConfig.complete({}) == {"head": "deepest"}   # only settings known to be added fill in
    gone = {**ExperimentConfig().to_dict(), "old_setting": 1}
    (tmp_path / "config.json").write_text(json.dumps(gone))
    with pytest.raises(RunFolderError, match=r"settings that no longer exist \(\['old_setting'\]\)"):
        check_run_folder(tmp_path, ExperimentConfig(), resume=True)

    module = bench_federated()
    assert module.still_valid("flat", saved, ExperimentConfig().to_dict())
    assert not module.still_valid("flat", saved, ExperimentConfig(head="local").to_dict())
    assert module.still_valid("flat", saved, ExperimentConfig(tau=0.2).to_dict())          # flat reads no tau
    assert not module.still_valid("fedtreelora", saved, ExperimentConfig(tau=0.2).to_dict())
    assert not module.still_valid("a-method-since-removed", saved, ExperimentConfig(tau=0.2).to_dict())
