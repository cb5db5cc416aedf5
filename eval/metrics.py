"""The eval's metrics, one function each, on plain Python values (no models here).

Per row (generation on edit/validation):
    copy_exact        the edit equals the original after whitespace normalisation
    near_copy         chrF(edit, original) >= threshold (95 by default)
    chrf              chrF++ of the edit against the human edit (sacrebleu, 0-100)
    rouge_l           ROUGE-L F1 of the edit against the human edit (rouge-score, 0-1)
    length_ratio      characters of the edit / characters of the original
    empty, truncated  no text; stopped by max_new_tokens before the end-of-turn token
    win_vs_original   1 if the reward model scores the edit above the original, 0.5 on a tie, else 0
    win_vs_reference  the same against the human edit
Per pair (edit_quality/validation): the reward model prefers the chosen side (good edit) over the
rejected one (bad edit, or the unedited original); the policy gives the good edit a higher
length-normalised log-likelihood than the bad one.

Every mean comes with a percentile-bootstrap 95% confidence interval, overall and per group.
"""
from __future__ import annotations

import re
from functools import lru_cache
from typing import Iterable, Optional, Sequence

import numpy as np

from data_prep import is_copy  # one definition of a copy for data, rl and eval

# Headline metrics in the order reports show them: (key, label, higher is better).
GENERATION_METRICS = (
    ("reward_win_rate", "reward win rate vs original", True),
    ("reward_win_rate_vs_reference", "reward win rate vs human edit", True),
    ("copy_rate", "copy rate (exact)", False),
    ("near_copy_rate", "near-copy rate (chrF >= threshold)", False),
    ("chrf", "chrF++ vs human edit", True),
    ("rouge_l", "ROUGE-L vs human edit", True),
    ("length_ratio", "length ratio edit/original", None),
    ("empty_rate", "empty outputs", False),
    ("truncated_rate", "truncated outputs", False),
    ("judge_win_rate", "LLM-judge win rate vs human edit", True),
)
LIKELIHOOD_METRICS = (
    ("rm_accuracy", "RM accuracy, all pairs", True),
    ("rm_accuracy_good_vs_bad", "RM accuracy good > bad", True),
    ("rm_accuracy_good_vs_original", "RM accuracy good > original", True),
    ("policy_pref_accuracy", "policy log-lik. good > bad", True),
)
# Which per-row field each generation metric averages.
ROW_FIELD = {
    "reward_win_rate": "win_vs_original",
    "reward_win_rate_vs_reference": "win_vs_reference",
    "copy_rate": "copy_exact",
    "near_copy_rate": "near_copy",
    "chrf": "chrf",
    "rouge_l": "rouge_l",
    "length_ratio": "length_ratio",
    "empty_rate": "empty",
    "truncated_rate": "truncated",
    "judge_win_rate": "judge_win",
    # per pair (likelihood.jsonl): 1 when the good edit wins, else 0
    "rm_accuracy": "rm_correct",
    "rm_accuracy_good_vs_bad": "rm_correct_good_vs_bad",
    "rm_accuracy_good_vs_original": "rm_correct_good_vs_original",
    "policy_pref_accuracy": "policy_correct",
}


@lru_cache(maxsize=2)
def _chrf(word_order: int):
    from sacrebleu.metrics import CHRF

    return CHRF(word_order=word_order)


def chrf(hypothesis: str, reference: str, word_order: int = 2) -> float:
    """Sentence-level chrF (word_order=0) or chrF++ (word_order=2, the default), 0-100."""
    return float(_chrf(word_order).sentence_score(hypothesis, [reference]).score)


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
        "rouge_l": rouge_l(edit, reference),
        "length_ratio": length_ratio(edit, original),
        "empty": float(not edit.strip()),
        "truncated": float(finish_reason == "length"),
    }


def reward_wins(edit: str, original: str, reference: str, score_edit: float, score_original: float,
                score_reference: float) -> dict:
    """Win of the edit over the original and over the human edit. Identical texts are a tie by
    definition, not by whatever rounding noise two forward passes of the same text produce."""
    return {
        "win_vs_original": 0.5 if is_copy(edit, original) else win(score_edit, score_original),
        "win_vs_reference": 0.5 if is_copy(edit, reference) else win(score_edit, score_reference),
    }


def bootstrap_ci(values: Sequence[float], samples: int = 1000, seed: int = 0, level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean."""
    data = np.asarray(values, dtype=np.float64)
    if data.size == 0:
        return (float("nan"), float("nan"))
    rng = np.random.default_rng(seed)
    means = np.empty(samples)
    chunk = max(1, 4_000_000 // data.size)  # bound memory: resample in chunks of at most ~4M draws
    for start in range(0, samples, chunk):
        stop = min(start + chunk, samples)
        means[start:stop] = data[rng.integers(0, data.size, size=(stop - start, data.size))].mean(axis=1)
    alpha = (1.0 - level) / 2
    low, high = np.quantile(means, [alpha, 1.0 - alpha])
    return float(low), float(high)


def summarize(values: Iterable[Optional[float]], samples: int = 1000, seed: int = 0) -> Optional[dict]:
    """{"value": mean, "ci": [low, high], "n"} over the values that exist; None when none do."""
    present = [float(v) for v in values if v is not None]
    if not present:
        return None
    low, high = bootstrap_ci(present, samples=samples, seed=seed)
    return {"value": float(np.mean(present)), "ci": [low, high], "n": len(present)}


def summarize_rows(rows: list[dict], samples: int = 1000, seed: int = 0) -> dict:
    """Each metric over the rows (generated edits and pairs) whose `metrics` dict has its field;
    metrics no row has are left out."""
    out = {}
    for key, _, _ in GENERATION_METRICS + LIKELIHOOD_METRICS:
        summary = summarize((r["metrics"].get(ROW_FIELD[key]) for r in rows), samples, seed)
        if summary is not None:
            out[key] = summary
    return out


def summarize_groups(rows: list[dict], field: str, samples: int = 1000, seed: int = 0) -> dict:
    """summarize_rows per value of rows[i][field] (domain, language), groups sorted by name."""
    groups: dict[str, list[dict]] = {}
    for row in rows:
        groups.setdefault(str(row.get(field) or "unknown"), []).append(row)
    return {name: summarize_rows(groups[name], samples, seed) for name in sorted(groups)}


def pair_accuracy(chosen_scores: Sequence[float], rejected_scores: Sequence[float]) -> list[float]:
    """Per pair: 1 when the chosen side scores strictly higher, else 0 (a tie is not a success)."""
    return [1.0 if c > r else 0.0 for c, r in zip(chosen_scores, rejected_scores, strict=True)]


def rm_pair_metrics(kind: str, score_chosen: float, score_rejected: float) -> dict:
    """One pair's reward-model outcome, under the pooled field and its kind's field."""
    correct = pair_accuracy([score_chosen], [score_rejected])[0]
    return {"reward_chosen": score_chosen, "reward_rejected": score_rejected,
            "rm_correct": correct, f"rm_correct_{kind}": correct}


# --- optional LLM judge -------------------------------------------------------------------------

JUDGE_TEMPLATE = """You compare two edits of an AI assistant's response. The conversation, the original \
response, and the feedback the edit had to address are given below. Decide which edit better applies \
the feedback while keeping what was already right.

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

Answer with exactly one letter: A or B."""


def parse_judge_verdict(reply: str) -> Optional[str]:
    """'A' or 'B' from a judge's reply (the first standalone letter), None when it gives neither."""
    match = re.search(r"\b([AB])\b", reply.strip())
    return match.group(1) if match else None


def judge_win(verdict_edit_first: Optional[str], verdict_edit_second: Optional[str]) -> Optional[float]:
    """The model's edit against the human edit, judged in both orders to cancel position bias:
    the edit is A in the first call and B in the second. Each order gives 1 (edit wins) or 0;
    an unparseable verdict gives no score for that order; None when neither order parsed."""
    scores = []
    if verdict_edit_first is not None:
        scores.append(1.0 if verdict_edit_first == "A" else 0.0)
    if verdict_edit_second is not None:
        scores.append(1.0 if verdict_edit_second == "B" else 0.0)
    return sum(scores) / len(scores) if scores else None
