"""The eval's metrics, one function each, on plain Python values (no models here).

Per row (generation on edit/validation):
    copy_exact        the edit equals the original after whitespace normalisation
    near_copy         chrF(edit, original) >= threshold (95 by default)
    chrf_stats        chrF++ sufficient statistics of the edit against the human edit (sacrebleu): the
                      report's chrF++ is the corpus score over the rows' summed statistics
    chrf              sentence-level chrF++ of the edit against the human edit (0-100): its mean is the
                      second chrF++ figure
    rouge_l           ROUGE-L F1 of the edit against the human edit (rouge-score, 0-1)
    length_ratio      characters of the edit / characters of the original
    empty, truncated  no text; stopped by max_new_tokens before the end-of-turn token
    gold_win_vs_original, gold_win_vs_reference
                      the gold reward model (independent of training, eval.gold_rm) scores the edit above
                      the original response / the human edit: 1, 0.5 on a tie, else 0
    gold_judge_win_vs_original, gold_judge_win_vs_reference
                      the LLM judge's pairwise verdict (JUDGE_TEMPLATE), both orders, ties half
    proxy_win_vs_original, proxy_win_vs_reference
                      the same with the training reward model: the proxy the policy was optimised against
Per pair (edit_quality/validation): a reward model (training rm, gold rm) prefers the chosen side (good
edit) over the rejected one (bad edit, or the unedited original); the policy gives the good edit a higher
length-normalised log-likelihood than the bad one.

Every figure comes with a percentile-bootstrap 95% confidence interval, overall and per group; two evals
on the same rows are compared with a paired bootstrap (`paired_difference`).
"""
from __future__ import annotations

import re
from functools import lru_cache
from typing import Callable, Iterable, Optional, Sequence

import numpy as np

from data_prep import is_copy  # one definition of a copy for data, rl and eval

# Headline metrics in the order reports show them: (key, label, higher is better). The headline leads
# with what the policy was not optimised against: copies, the gold win rates, chrF++ and ROUGE-L.
GENERATION_METRICS = (
    ("copy_rate", "copy rate (exact)", False),
    ("gold_reward_win_rate", "gold RM win rate vs original", True),
    ("gold_reward_win_rate_vs_reference", "gold RM win rate vs human edit", True),
    ("gold_judge_win_rate", "gold LLM-judge win rate vs original", True),
    ("gold_judge_win_rate_vs_reference", "gold LLM-judge win rate vs human edit", True),
    ("chrf", "chrF++ vs human edit (corpus)", True),
    ("rouge_l", "ROUGE-L vs human edit", True),
    ("near_copy_rate", "near-copy rate (chrF >= threshold)", False),
    ("chrf_sentence_mean", "chrF++ vs human edit (sentence mean)", True),
    ("proxy_reward_win_rate", "training RM (optimised against) win rate vs original", True),
    ("proxy_reward_win_rate_vs_reference", "training RM (optimised against) win rate vs human edit", True),
    ("length_ratio", "length ratio edit/original", None),
    ("empty_rate", "empty outputs", False),
    ("truncated_rate", "truncated outputs", False),
)
LIKELIHOOD_METRICS = (
    ("gold_rm_accuracy", "gold RM accuracy, all pairs", True),
    ("gold_rm_accuracy_good_vs_bad", "gold RM accuracy good > bad", True),
    ("gold_rm_accuracy_good_vs_original", "gold RM accuracy good > original", True),
    ("rm_accuracy", "training RM accuracy, all pairs", True),
    ("rm_accuracy_good_vs_bad", "training RM accuracy good > bad", True),
    ("rm_accuracy_good_vs_original", "training RM accuracy good > original", True),
    ("policy_pref_accuracy", "policy log-lik. good > bad", True),
)
# Which per-row field each metric aggregates (a mean, except the corpus metrics below).
ROW_FIELD = {
    "copy_rate": "copy_exact",
    "gold_reward_win_rate": "gold_win_vs_original",
    "gold_reward_win_rate_vs_reference": "gold_win_vs_reference",
    "gold_judge_win_rate": "gold_judge_win_vs_original",
    "gold_judge_win_rate_vs_reference": "gold_judge_win_vs_reference",
    "chrf": "chrf_stats",
    "rouge_l": "rouge_l",
    "near_copy_rate": "near_copy",
    "chrf_sentence_mean": "chrf",
    "proxy_reward_win_rate": "proxy_win_vs_original",
    "proxy_reward_win_rate_vs_reference": "proxy_win_vs_reference",
    "length_ratio": "length_ratio",
    "empty_rate": "empty",
    "truncated_rate": "truncated",
    # per pair (likelihood.jsonl): 1 when the good edit wins, else 0
    "gold_rm_accuracy": "gold_rm_correct",
    "gold_rm_accuracy_good_vs_bad": "gold_rm_correct_good_vs_bad",
    "gold_rm_accuracy_good_vs_original": "gold_rm_correct_good_vs_original",
    "rm_accuracy": "rm_correct",
    "rm_accuracy_good_vs_bad": "rm_correct_good_vs_bad",
    "rm_accuracy_good_vs_original": "rm_correct_good_vs_original",
    "policy_pref_accuracy": "policy_correct",
}
# Gold and proxy win rates side by side (eval-compare's over-optimisation plot).
PROXY_GOLD = (("proxy_reward_win_rate", "gold_reward_win_rate"), ("proxy_reward_win_rate", "gold_judge_win_rate"))


@lru_cache(maxsize=2)
def _chrf(word_order: int):
    from sacrebleu.metrics import CHRF

    return CHRF(word_order=word_order)


def chrf(hypothesis: str, reference: str, word_order: int = 2) -> float:
    """Sentence-level chrF (word_order=0) or chrF++ (word_order=2, the default), 0-100."""
    return float(_chrf(word_order).sentence_score(hypothesis, [reference]).score)


def chrf_stats(hypothesis: str, reference: str) -> list[int]:
    """chrF++'s sufficient statistics of one segment (sacrebleu's own, as its corpus_score sums them)."""
    return [int(x) for x in _chrf(2)._extract_corpus_statistics([hypothesis], [[reference]])[0]]


def corpus_chrf(stats: np.ndarray) -> float:
    """Corpus chrF++ from per-segment statistics: their sum (or mean: the score is a ratio of counts),
    scored as sacrebleu's CHRF.corpus_score does."""
    total = np.asarray(stats, dtype=np.float64)
    total = total.sum(axis=0) if total.ndim == 2 else total
    return float(_chrf(2)._compute_score_from_stats(list(total)).score)


# Metrics computed over the corpus, not as a mean of per-row values: key -> statistic of the rows'
# (summed or averaged) vectors.
CORPUS: dict[str, Callable[[np.ndarray], float]] = {"chrf": corpus_chrf}


class _UnicodeWords:
    """rouge-score's default tokenizer drops every non-ASCII character, which would score most of
    HelpSteer3's 13 languages as empty. Lower-cased word tokens instead, and one token per CJK
    character (those scripts do not separate words with spaces)."""

    _TOKEN = re.compile(r"[\u3040-\u30ff\u3400-\u9fff\uf900-\ufaff]|[^\W\u3040-\u30ff\u3400-\u9fff\uf900-\ufaff]+")

    def tokenize(self, text: str) -> list[str]:
        return self._TOKEN.findall(text.lower())


@lru_cache(maxsize=1)
def _rouge():
    from rouge_score.rouge_scorer import RougeScorer

    return RougeScorer(["rougeL"], tokenizer=_UnicodeWords())


def rouge_l(hypothesis: str, reference: str) -> float:
    """ROUGE-L F1, 0-1."""
    return float(_rouge().score(reference, hypothesis)["rougeL"].fmeasure)


def length_ratio(edit: str, original: str) -> float:
    return len(edit) / max(len(original), 1)


def win(score_a: float, score_b: float) -> float:
    """1 if a beats b, 0.5 on a tie, 0 otherwise (ties count half, as in pairwise win rates)."""
    return 1.0 if score_a > score_b else 0.5 if score_a == score_b else 0.0


def row_metrics(edit: str, original: str, reference: str, finish_reason: str, near_copy_chrf: float = 95.0) -> dict:
    """Every reward-free metric of one generated edit."""
    return {
        "copy_exact": float(is_copy(edit, original)),
        "near_copy": float(chrf(edit, original, word_order=0) >= near_copy_chrf),
        "chrf": chrf(edit, reference),
        "chrf_stats": chrf_stats(edit, reference),
        "rouge_l": rouge_l(edit, reference),
        "length_ratio": length_ratio(edit, original),
        "empty": float(not edit.strip()),
        "truncated": float(finish_reason == "length"),
    }


def reward_wins(edit: str, original: str, reference: str, score_edit: Optional[float],
                score_original: Optional[float], score_reference: Optional[float], prefix: str = "") -> dict:
    """Win of the edit over the original and over the human edit (keys prefixed: proxy_, gold_).
    Identical texts are a tie by definition, not by whatever rounding noise two forward passes of the
    same text produce. A score that is missing (a scorer request that failed) gives no win."""
    def one(other: str, score_other: Optional[float]) -> Optional[float]:
        if is_copy(edit, other):
            return 0.5
        return None if score_edit is None or score_other is None else win(score_edit, score_other)

    return {f"{prefix}win_vs_original": one(original, score_original),
            f"{prefix}win_vs_reference": one(reference, score_reference)}


def _resampled_means(data: np.ndarray, samples: int, rng, indices: Optional[np.ndarray] = None) -> np.ndarray:
    """Means over `samples` bootstrap resamples of the rows of data ((n,) or (n, d)), in chunks of at
    most ~4M draws; `indices` (samples, n) reuses given resamples (a paired bootstrap)."""
    n = data.shape[0]
    means = np.empty((samples,) + data.shape[1:])
    chunk = max(1, 4_000_000 // (n * (data.shape[1] if data.ndim == 2 else 1)))
    for start in range(0, samples, chunk):
        stop = min(start + chunk, samples)
        idx = indices[start:stop] if indices is not None else rng.integers(0, n, size=(stop - start, n))
        means[start:stop] = data[idx].mean(axis=1)
    return means


def _statistic(key: Optional[str]) -> Callable[[np.ndarray], float]:
    """The figure a metric reports from the mean of its rows: the mean itself, or a corpus score."""
    if key in CORPUS:
        return CORPUS[key]
    return lambda mean: float(mean)


def bootstrap_ci(values: Sequence, samples: int = 1000, seed: int = 0, level: float = 0.95,
                 key: Optional[str] = None) -> tuple[float, float]:
    """Percentile bootstrap interval of the metric `key` (the mean, or a corpus score over row vectors)."""
    data = np.asarray(values, dtype=np.float64)
    if data.size == 0:
        return (float("nan"), float("nan"))
    statistic = _statistic(key)
    means = _resampled_means(data, samples, np.random.default_rng(seed))
    figures = means if key not in CORPUS else np.array([statistic(m) for m in means])
    alpha = (1.0 - level) / 2
    low, high = np.quantile(figures, [alpha, 1.0 - alpha])
    return float(low), float(high)


def summarize(values: Iterable, samples: int = 1000, seed: int = 0, key: Optional[str] = None) -> Optional[dict]:
    """{"value", "ci": [low, high], "n"} over the values that exist; None when none do."""
    present = [v for v in values if v is not None]
    if not present:
        return None
    low, high = bootstrap_ci(present, samples=samples, seed=seed, key=key)
    data = np.asarray(present, dtype=np.float64)
    return {"value": _statistic(key)(data.mean(axis=0)), "ci": [low, high], "n": len(present)}


def summarize_rows(rows: list[dict], samples: int = 1000, seed: int = 0) -> dict:
    """Each metric over the rows (generated edits and pairs) whose `metrics` dict has its field;
    metrics no row has are left out."""
    out = {}
    for key, _, _ in GENERATION_METRICS + LIKELIHOOD_METRICS:
        summary = summarize((r["metrics"].get(ROW_FIELD[key]) for r in rows), samples, seed, key)
        if summary is not None:
            out[key] = summary
    return out


def paired_difference(a_values: Sequence, b_values: Sequence, samples: int = 1000, seed: int = 0,
                      level: float = 0.95, key: Optional[str] = None) -> dict:
    """Metric `key` on two evals of the same rows (a_values[i] and b_values[i] come from row i): both
    figures, their difference a - b, and its paired-bootstrap interval (each resample draws the same
    rows for both). verdict: "within" when the interval contains 0 (no difference shown at this
    level), else "outside"."""
    a, b = np.asarray(a_values, dtype=np.float64), np.asarray(b_values, dtype=np.float64)
    if a.shape != b.shape or a.shape[0] == 0:
        raise ValueError(f"paired values need the same rows on both sides ({a.shape} vs {b.shape})")
    statistic = _statistic(key)
    rng = np.random.default_rng(seed)
    indices = rng.integers(0, a.shape[0], size=(samples, a.shape[0]))
    diffs = np.array([statistic(x) - statistic(y) for x, y in
                      zip(_resampled_means(a, samples, rng, indices), _resampled_means(b, samples, rng, indices))])
    alpha = (1.0 - level) / 2
    low, high = (float(q) for q in np.quantile(diffs, [alpha, 1.0 - alpha]))
    value_a, value_b = statistic(a.mean(axis=0)), statistic(b.mean(axis=0))
    return {"a": value_a, "b": value_b, "diff": value_a - value_b, "ci": [low, high], "n": int(a.shape[0]),
            "verdict": "within" if low <= 0.0 <= high else "outside"}


def summarize_groups(rows: list[dict], field: str, samples: int = 1000, seed: int = 0) -> dict:
    """summarize_rows per value of rows[i][field] (domain, language), groups sorted by name."""
    groups: dict[str, list[dict]] = {}
    for row in rows:
        groups.setdefault(str(row.get(field) or "unknown"), []).append(row)
    return {name: summarize_rows(groups[name], samples, seed) for name in sorted(groups)}


def pair_accuracy(chosen_scores: Sequence[float], rejected_scores: Sequence[float]) -> list[float]:
    """Per pair: 1 when the chosen side scores strictly higher, else 0 (a tie is not a success)."""
    return [1.0 if c > r else 0.0 for c, r in zip(chosen_scores, rejected_scores, strict=True)]


def rm_pair_metrics(kind: str, score_chosen: float, score_rejected: float, field: str = "rm") -> dict:
    """One pair's reward-model outcome, under the pooled field and its kind's field (field: rm for the
    training rm, gold_rm for the gold one)."""
    correct = pair_accuracy([score_chosen], [score_rejected])[0]
    scores = {"reward_chosen": score_chosen, "reward_rejected": score_rejected} if field == "rm" else {
        f"{field}_reward_chosen": score_chosen, f"{field}_reward_rejected": score_rejected}
    return {**scores, f"{field}_correct": correct, f"{field}_correct_{kind}": correct}


# --- the LLM judge (gold) --------------------------------------------------------------------------

# Fixed pairwise prompt: which edit better applies the feedback to the original response. Asked twice
# per comparison with the two edits swapped (position bias cancels); "tie" allowed. Changing this text
# changes every judge figure: keep it fixed across checkpoints that are compared.
JUDGE_TEMPLATE = """You compare two edits of an AI assistant's response. Below are the conversation, the \
assistant's original response, and the feedback on it that an edit has to apply. Decide which edit better \
applies the feedback to the original response, changing what the feedback asks for and keeping what was \
already right. If both apply it equally well (or equally badly), answer tie.

[Conversation]
{conversation}

[Original response]
{original}

[Feedback]
{feedback}

[Edit A]
{edit_a}

[Edit B]
{edit_b}

Answer with exactly one word: A, B or tie."""


def parse_judge_verdict(reply: str) -> Optional[str]:
    """'A', 'B' or 'tie' from a judge's reply (the first standalone one), None when it gives none."""
    match = re.search(r"\b(A|B|tie)\b", reply.strip(), flags=re.IGNORECASE)
    if not match:
        return None
    word = match.group(1)
    return "tie" if word.lower() == "tie" else word.upper() if word in ("A", "B") else None


def judge_win(verdict_edit_first: Optional[str], verdict_edit_second: Optional[str]) -> Optional[float]:
    """The model's edit against another text, judged in both orders to cancel position bias: the edit
    is A in the first call and B in the second. Each order gives 1 (edit wins), 0.5 (tie) or 0; an
    unparseable verdict gives no score for that order; None when neither order parsed."""
    scores = []
    for verdict, edit_slot in ((verdict_edit_first, "A"), (verdict_edit_second, "B")):
        if verdict is not None:
            scores.append(0.5 if verdict == "tie" else 1.0 if verdict == edit_slot else 0.0)
    return sum(scores) / len(scores) if scores else None
