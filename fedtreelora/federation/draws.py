"""Every random draw of a federation, from integers (seed, round, client): which clients train in a
round, and the seed of each client's local run. The in-process schedule, the experiment's Flower
driver and the drop-in `fedtreelora.flower.FedTreeLoRA` Strategy (with its ClientApps'
`fedtreelora.flower.training_seed`) all draw here, so a given (seed, round) selects the same clients
and a given (seed, round, client) trains from the same seed wherever the run happens. numpy only.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np

__all__ = ["derived_seed", "draw_clients", "TRAIN_DRAW", "EVALUATE_DRAW"]

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
