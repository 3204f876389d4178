"""Every random draw of a federation, from integers (seed, round, client): which clients train in a
round, and the seed of each client's local run. `fedtreelora.flower.strategy.PersonalisedStrategy`
(the round loop of `fedtreelora simulate`, of the experiment on Flower and of the drop-in
`fedtreelora.flower.FedTreeLoRA`) and the ClientPool / `fedtreelora.flower.training_seed` all draw
here, so a given (seed, round) selects the same clients and a given (seed, round, client) trains
from the same seed wherever the run happens. numpy only.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np

__all__ = ["derived_seed", "draw_clients", "sample_size", "TRAIN_DRAW", "EVALUATE_DRAW"]

TRAIN_DRAW, EVALUATE_DRAW = 1, 2   # the draw's stream: who trains, who is evaluated


def derived_seed(*parts: int) -> int:
    """A 32-bit seed from integers (seed, round, client, ...), independent for different tuples.

    Examples
    --------
    >>> derived_seed(0, 3, 1) == derived_seed(0, 3, 1) != derived_seed(0, 3, 2)
    True
    """
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1)[0])


def draw_clients(seed: int, global_round: int, candidates: Sequence[int], n_selected: int,
                 stream: int = TRAIN_DRAW) -> list[int]:
    """`n_selected` of `candidates` (without replacement), drawn from (seed, global_round, stream); sorted.

    Parameters
    ----------
    seed : int
        The run's seed.
    global_round : int
        0-based round, warm-up rounds counted (Flower's `server_round` - 1).
    candidates : sequence of int
        Client indices or node ids, in a fixed order (sorted node ids on Flower).
    n_selected : int
        How many to draw, 0 <= n_selected <= len(candidates).
    stream : int
        `TRAIN_DRAW` or `EVALUATE_DRAW`: independent draws for the same round.

    Examples
    --------
    >>> draw_clients(0, 2, [10, 11, 12, 13], 2) == draw_clients(0, 2, [10, 11, 12, 13], 2)
    True
    >>> draw_clients(0, 2, [10, 11, 12, 13], 4)
    [10, 11, 12, 13]
    """
    candidates = list(candidates)
    if not 0 <= n_selected <= len(candidates):
        raise ValueError(f"n_selected must lie in [0, {len(candidates)}] (the candidates), got {n_selected}")
    picked = np.random.default_rng([int(seed), int(global_round), int(stream)]).choice(len(candidates), n_selected,
                                                                                       replace=False)
    return sorted(candidates[i] for i in picked.tolist())


def sample_size(fraction: float, n: int, count: str = "fedavg") -> int:
    """How many of `n` clients a `fraction` samples, before any minimum.

    Parameters
    ----------
    fraction : float
        In [0, 1].
    n : int
        The clients to sample from.
    count : {"fedavg", "nearest"}
        "fedavg": int(fraction * n), FedAvg's count (the drop-in Strategy's); "nearest":
        round(fraction * n), the count of `fedtreelora simulate`'s `client_fraction` (kept so that
        its recorded and benchmarked runs select what they always did).

    Examples
    --------
    >>> sample_size(0.75, 6), sample_size(0.75, 6, "nearest"), sample_size(0.6, 4), sample_size(0.6, 4, "nearest")
    (4, 4, 2, 2)
    >>> sample_size(0.7, 5), sample_size(0.7, 5, "nearest")
    (3, 4)
    """
    if count == "nearest":
        return int(round(fraction * n))
    if count == "fedavg":
        return int(fraction * n)
    raise ValueError(f'count must be "fedavg" or "nearest", got {count!r}')
