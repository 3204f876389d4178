"""`fedtreelora aggregate`: real save_pretrained folders in, PeftModel-loadable personalised adapters out."""
import json
import warnings

import pytest
import torch
from peft import PeftModel, get_peft_model_state_dict, set_peft_model_state_dict
from safetensors.torch import load_file

import fedtreelora as ftl
from fedtreelora.cli import aggregate as aggregate_command
from peft_fixtures import tiny_peft_model

warnings.filterwarnings("ignore", category=UserWarning)
warnings.filterwarnings("ignore", category=FutureWarning)


def main(argv):
    """`fedtreelora aggregate ...` through the subcommand's own parser (the CLI imports every subcommand)."""
    import argparse

    assert argv[0] == "aggregate"
    parser = argparse.ArgumentParser(prog="fedtreelora aggregate")
    aggregate_command.add_arguments(parser)
    return aggregate_command.run(parser.parse_args(argv[1:]))


def _base():
    import transformers as tf
    from peft_fixtures import SMALL

    torch.manual_seed(0)
    return tf.BertForSequenceClassification(tf.BertConfig(**SMALL, num_labels=3))


@pytest.fixture
def client_dirs(tmp_path):
    """Four BERT LoRA clients in two planted groups, saved with save_pretrained."""
    dirs = []
    g = torch.Generator().manual_seed(1)
    model, _ = tiny_peft_model("bert")
    template = get_peft_model_state_dict(model)
    centres = {k: torch.randn(2, *v.shape, generator=g) * 3 for k, v in template.items()}
    for k in range(4):
        state = {key: centres[key][k // 2] + 0.05 * torch.randn(v.shape, generator=g) for key, v in template.items()}
        peft_model, _ = tiny_peft_model("bert")
        set_peft_model_state_dict(peft_model, state)
        folder = tmp_path / f"client{k}"
        peft_model.save_pretrained(folder)
        dirs.append(folder)
    return dirs


def test_round_trip_through_the_command(client_dirs, tmp_path):
    out = tmp_path / "out"
    assert main(["aggregate", *map(str, client_dirs), "--out", str(out), "--weights", "10", "20", "30", "40"]) == 0
    inputs = {d.name: load_file(d / "adapter_model.safetensors") for d in client_dirs}
    expected = ftl.aggregate(inputs, weights=[10, 20, 30, 40])
    assert expected.tree.n_clusters.tolist() == [2, 2, 2]
    tree = ftl.AggregationTree.from_json(out / "tree.json")
    assert torch.equal(tree.labels, expected.tree.labels) and tree.client_names == list(inputs)
    assert (out / "tree.png").stat().st_size > 10_000
    for name in inputs:
        model = PeftModel.from_pretrained(_base(), out / name)
        model.load_adapter(out / name / "external", adapter_name="external")
        for adapter, want in (("default", expected.cluster_states[name]), ("external", expected.external_states[name])):
            loaded = get_peft_model_state_dict(model, adapter_name=adapter)
            assert set(loaded) == set(want)
            for key in want:
                assert torch.equal(loaded[key], want[key]), (name, adapter, key)
        assert not torch.equal(get_peft_model_state_dict(model)[next(iter(want))], inputs[name][next(iter(want))])

    # the next round reuses the stored tree
    out2 = tmp_path / "round2"
    assert main(["aggregate", *map(str, client_dirs), "--out", str(out2), "--tree", str(out / "tree.json")]) == 0
    assert json.loads((out2 / "tree.json").read_text())["labels"] == json.loads((out / "tree.json").read_text())["labels"]


def test_refusals(client_dirs, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("user data")
    assert main(["aggregate", *map(str, client_dirs), "--out", str(out)]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert main(["aggregate", *map(str, client_dirs), "--out", str(out), "--overwrite"]) == 0
    assert (out / "keep.txt").read_text() == "user data"

    fresh = tmp_path / "fresh"
    assert main(["aggregate", *map(str, client_dirs), "--out", str(fresh), "--names", "a", "..", "c", "d"]) == 2
    assert "'..'" in capsys.readouterr().err and not fresh.exists()
    assert main(["aggregate", *map(str, client_dirs), "--out", str(fresh), "--names", "a", "../evil", "c", "d"]) == 2
    assert main(["aggregate", *map(str, client_dirs), "--out", str(fresh), "--names", "a", "a", "c", "d"]) == 2
    assert "unique" in capsys.readouterr().err

    pickle_dir = tmp_path / "pickled"
    pickle_dir.mkdir()
    (pickle_dir / "adapter_config.json").write_text((client_dirs[0] / "adapter_config.json").read_text())
    torch.save({}, pickle_dir / "adapter_model.bin")
    assert main(["aggregate", str(pickle_dir), *map(str, client_dirs[1:]), "--out", str(fresh)]) == 2
    assert "adapter_model.bin" in capsys.readouterr().err

    assert main(["aggregate", *map(str, client_dirs), "--out", str(fresh), "--weights", "1", "2"]) == 2
    assert "--weights" in capsys.readouterr().err
    assert not fresh.exists()
