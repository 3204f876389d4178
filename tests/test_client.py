"""Local training and evaluation of one client (the code path every method shares)."""
import numpy as np
import pytest
import torch

from fedtreelora.client.trainer import ClientState, LocalTrainer
from fedtreelora.federation.data import partition
from fedtreelora.client.models import add_lora, load_classifier, load_tokenizer, tokenize
from tiny_models import save_tiny_bert, tiny_config, tiny_dataset


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    torch.set_num_threads(1)
    path = save_tiny_bert(tmp_path_factory.mktemp("bert"))
    cfg = tiny_config(path, local_steps=6, lr=3e-2)
    ds = tiny_dataset(200)
    features = tokenize(load_tokenizer(path), ds.texts, cfg.max_length)
    model = add_lora(load_classifier(path, ds.num_labels, seed=0), cfg, seed=0)
    client = partition(ds.labels, 1, 80, seed=0)[0]
    return LocalTrainer(model, features, cfg), client, cfg


def test_training_lowers_loss_and_reports_counts(setup):
    trainer, client, cfg = setup
    start = trainer.initial_state()
    saved = {k: v.clone() for k, v in start.adapter.items()}
    trainer.load(start)
    before = trainer.evaluate(client.train_idx, client.train_labels)
    info = trainer.train(client.train_idx, client.train_labels, seed=1)
    after = trainer.evaluate(client.train_idx, client.train_labels)
    assert info["steps"] == cfg.local_steps and info["num_samples"] == len(client.train_idx) == 53
    assert trainer.evaluate(client.test_idx, client.test_labels)["num_samples"] == len(client.test_idx) == 27
    assert after["loss"] < before["loss"]           # the optimiser fits the client's own data
    assert 0.0 <= after["accuracy"] <= 1.0
    assert all(torch.equal(v, saved[k]) for k, v in start.adapter.items())   # the caller's state is untouched


def test_same_seed_same_result_other_seed_differs(setup):
    trainer, client, _ = setup
    start = trainer.initial_state()
    results = []
    for seed in (5, 5, 6):
        trainer.load(start)
        trainer.train(client.train_idx, client.train_labels, seed=seed)
        results.append(trainer.state().adapter)
    assert all(torch.equal(results[0][k], results[1][k]) for k in results[0])
    assert not all(torch.equal(results[0][k], results[2][k]) for k in results[0])


def test_epochs_override_steps(setup):
    trainer, client, cfg = setup
    trainer.config = cfg.replace(local_epochs=1.5)
    try:
        assert trainer.num_steps(53) == int(np.ceil(1.5 * 53 / cfg.batch_size))
    finally:
        trainer.config = cfg


def test_lam_trains_only_with_an_external_expert(setup):
    trainer, client, _ = setup
    start = trainer.initial_state()
    trainer.load(start)
    trainer.train(client.train_idx, client.train_labels, seed=2)
    trained = trainer.state()
    assert all(torch.equal(trained.logits[g], start.logits[g]) for g in start.logits)   # no external: lam unused
    external = {k: v + 0.5 for k, v in trained.adapter.items() if "lora_" in k}
    trainer.load(start, external)
    trainer.train(client.train_idx, client.train_labels, seed=2)
    mixed = trainer.state()
    assert all(not torch.equal(mixed.logits[g], start.logits[g]) for g in start.logits)


def test_bad_state_is_named(setup):
    trainer, _, _ = setup
    state = trainer.initial_state()
    with pytest.raises(KeyError, match="mixing logits"):
        trainer.load(ClientState(state.adapter, {"layer_9": torch.tensor(0.0)}))
    with pytest.raises(ValueError, match="no training documents"):
        trainer.train(np.array([], dtype=np.int64), np.array([], dtype=np.int64), seed=0)
