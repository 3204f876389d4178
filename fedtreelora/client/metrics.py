"""Text generation metrics: ROUGE-1 F1 through the rouge-score package (the reference implementation)."""
from __future__ import annotations

__all__ = ["rouge1_f1", "rouge1_scores"]

_SCORER = None


def _scorer():
    global _SCORER
    if _SCORER is None:
        try:
            from rouge_score import rouge_scorer
        except ImportError as exc:
            raise ImportError("task causal_lm scores generations with ROUGE-1 from the rouge-score package "
                              '(pip install rouge-score, or pip install "fedtreelora[nlg]")') from exc
        _SCORER = rouge_scorer.RougeScorer(["rouge1"], use_stemmer=True)
    return _SCORER


def rouge1_scores(predictions: list[str], references: list[str]) -> list[float]:
    """ROUGE-1 F1 of each prediction against its reference (rouge-score, Porter stemmer on).

    Parameters
    ----------
    predictions, references : list of str
        Equal-length lists of generated and reference texts.

    Returns
    -------
    list of float
        One F1 in [0, 1] per pair (0 for an empty prediction).
    """
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} references")
    scorer = _scorer()
    return [scorer.score(ref, pred)["rouge1"].fmeasure for pred, ref in zip(predictions, references)]


def rouge1_f1(predictions: list[str], references: list[str]) -> float:
    """Mean ROUGE-1 F1 over the pairs (a fraction in [0, 1]; 0.0 for no pairs)."""
    scores = rouge1_scores(predictions, references)
    return float(sum(scores) / len(scores)) if scores else 0.0
