"""Each eval metric on hand-made cases whose answers are known, and the bootstrap interval on
distributions whose mean is known."""
from __future__ import annotations

import numpy as np
import pytest

from eval import metrics as M


def test_copy_rate_ignores_whitespace_only():
    assert M.is_copy("Paris is  the capital.\n", " Paris is the capital.")
    assert not M.is_copy("Paris is the capital!", "Paris is the capital.")
    assert M.row_metrics("a\tb  c", "a b c", "x", "stop")["copy_exact"] == 1.0


def test_near_copy_threshold_on_chrf_against_the_original():
    original = "The mitochondria is the powerhouse of the cell, producing most of its chemical energy. " * 3
    one_word_changed = original.replace("chemical", "chemic", 1)
    rewritten = "Cells get their energy mostly from mitochondria, which make ATP."
    assert M.chrf(one_word_changed, original, word_order=0) >= 95
    assert M.row_metrics(one_word_changed, original, "ref", "stop")["near_copy"] == 1.0
    assert M.row_metrics(one_word_changed, original, "ref", "stop")["copy_exact"] == 0.0
    assert M.row_metrics(rewritten, original, "ref", "stop")["near_copy"] == 0.0
    # the threshold is a parameter
    score = M.chrf(rewritten, original, word_order=0)
    assert M.row_metrics(rewritten, original, "ref", "stop", near_copy_chrf=score)["near_copy"] == 1.0


def test_chrf_plus_plus_against_the_human_edit():
    assert M.chrf("the same text", "the same text") == pytest.approx(100.0)
    assert M.chrf("xyz", "abc") == pytest.approx(0.0)
    partial = M.chrf("the cat sat on a mat", "the cat sat on the mat")
    assert 0 < partial < 100
    # character n-grams ignore spaces, so plain chrF sees no difference here; chrF++'s word
    # n-grams do
    assert M.chrf("thecat sat", "the cat sat", word_order=0) == pytest.approx(100.0)
    assert M.chrf("thecat sat", "the cat sat") < 90


def test_rouge_l_known_values():
    # LCS("the cat sat", "the cat sat on the mat") = 3: precision 3/3, recall 3/6, F1 = 2/3
    assert M.rouge_l("the cat sat", "the cat sat on the mat") == pytest.approx(2 / 3)
    assert M.rouge_l("The Cat", "the cat") == pytest.approx(1.0)
    assert M.rouge_l("dog", "cat") == 0.0


def test_rouge_l_scores_non_ascii_text():
    # rouge-score's default tokenizer would drop all of these characters and score 0
    assert M.rouge_l("Le café est très bon", "Le café est bon") == pytest.approx(2 * 1 * 0.8 / 1.8)
    # CJK: one token per character; LCS of 日本語です / 日本語 = 3 -> P 3/5, R 1, F1 = 0.75
    assert M.rouge_l("日本語です", "日本語") == pytest.approx(0.75)


def test_length_ratio_empty_and_truncated():
    m = M.row_metrics("", "abcd", "ref", "length")
    assert m["length_ratio"] == 0.0 and m["empty"] == 1.0 and m["truncated"] == 1.0
    m = M.row_metrics("  \n", "ab", "ref", "stop")
    assert m["empty"] == 1.0 and m["truncated"] == 0.0 and m["length_ratio"] == pytest.approx(1.5)
    assert M.row_metrics("abcdefgh", "abcd", "ref", "stop")["length_ratio"] == 2.0


def test_reward_win_counts_ties_half_and_copies_as_ties():
    assert M.win(1.0, 0.5) == 1.0 and M.win(0.5, 1.0) == 0.0 and M.win(0.3, 0.3) == 0.5
    # an exact copy of the original ties it whatever two forward passes happen to score
    wins = M.reward_wins("same text", "same  text", "better text", 0.2000001, 0.2, 1.0)
    assert wins == {"win_vs_original": 0.5, "win_vs_reference": 0.0}
    assert M.reward_wins("new", "old", "ref", 2.0, 1.0, 3.0, prefix="gold_") == {
        "gold_win_vs_original": 1.0, "gold_win_vs_reference": 0.0}
    # a score a failed scorer request did not give: no win either way
    assert M.reward_wins("new", "old", "ref", None, 1.0, 3.0) == {"win_vs_original": None, "win_vs_reference": None}


def test_pair_accuracy_ties_are_failures():
    assert M.pair_accuracy([1.0, 0.0, 2.0], [0.0, 1.0, 2.0]) == [1.0, 0.0, 0.0]


def test_bootstrap_interval_matches_the_normal_theory_width():
    rng = np.random.default_rng(0)
    values = rng.normal(loc=3.0, scale=2.0, size=2000)
    low, high = M.bootstrap_ci(values, samples=2000, seed=1)
    expected_half_width = 1.96 * 2.0 / np.sqrt(2000)
    assert low < values.mean() < high
    assert (high - low) / 2 == pytest.approx(expected_half_width, rel=0.1)


def test_bootstrap_interval_covers_the_true_mean_about_95_percent_of_the_time():
    rng = np.random.default_rng(42)
    p, trials, covered = 0.3, 300, 0
    for t in range(trials):
        sample = (rng.random(200) < p).astype(float)
        low, high = M.bootstrap_ci(sample, samples=400, seed=t)
        covered += low <= p <= high
    assert 0.90 <= covered / trials <= 0.99


def test_bootstrap_is_deterministic_for_a_seed_and_degenerate_on_constants():
    data = [0.0, 1.0, 1.0, 0.0, 1.0]
    assert M.bootstrap_ci(data, seed=3) == M.bootstrap_ci(data, seed=3)
    assert M.bootstrap_ci([0.7] * 10) == pytest.approx((0.7, 0.7))


def test_summaries_overall_and_per_group():
    rows = [
        {"domain": "code", "language": "python", "metrics": {"copy_exact": 1.0, "chrf": 50.0}},
        {"domain": "code", "language": "bash", "metrics": {"copy_exact": 0.0, "chrf": 70.0}},
        {"domain": "stem", "language": "english", "metrics": {"copy_exact": 0.0, "chrf": 90.0}},
    ]
    overall = M.summarize_rows(rows, samples=100)
    assert overall["copy_rate"]["value"] == pytest.approx(1 / 3) and overall["copy_rate"]["n"] == 3
    assert overall["chrf_sentence_mean"]["value"] == pytest.approx(70.0)
    assert "gold_reward_win_rate" not in overall  # no row has it: left out, not reported as 0
    by_domain = M.summarize_groups(rows, "domain", samples=100)
    assert list(by_domain) == ["code", "stem"]
    assert by_domain["code"]["chrf_sentence_mean"]["value"] == pytest.approx(60.0)
    assert by_domain["stem"]["copy_rate"]["ci"] == [0.0, 0.0]
    assert M.summarize([None, None]) is None


def test_judge_verdicts_in_both_orders_with_ties():
    assert M.parse_judge_verdict("A") == "A"
    assert M.parse_judge_verdict("Answer: B.") == "B"
    assert M.parse_judge_verdict("Tie.") == "tie" and M.parse_judge_verdict("tie") == "tie"
    assert M.parse_judge_verdict("neither") is None and M.parse_judge_verdict("a") is None
    # the edit is A in the first order and B in the second
    assert M.judge_win("A", "B") == 1.0  # edit preferred both times
    assert M.judge_win("A", "A") == 0.5  # position bias: always the first slot
    assert M.judge_win("B", "A") == 0.0
    assert M.judge_win("tie", "B") == 0.75 and M.judge_win("tie", "tie") == 0.5
    assert M.judge_win(None, "B") == 1.0
    assert M.judge_win(None, None) is None


def test_chrf_is_corpus_level_as_sacrebleu_computes_it():
    import sacrebleu

    hyps = ["the cat sat on the mat", "a completely different sentence here", "x"]
    refs = ["the cat sat on a mat", "an entirely different sentence", "a long reference text that x misses"]
    rows = [{"metrics": M.row_metrics(h, "orig", r, "stop")} for h, r in zip(hyps, refs)]
    overall = M.summarize_rows(rows, samples=200)
    corpus = sacrebleu.corpus_chrf(hyps, [refs], word_order=2).score
    sentence_mean = sum(sacrebleu.sentence_chrf(h, [r], word_order=2).score for h, r in zip(hyps, refs)) / 3
    assert overall["chrf"]["value"] == pytest.approx(corpus)
    assert overall["chrf_sentence_mean"]["value"] == pytest.approx(sentence_mean)
    assert abs(corpus - sentence_mean) > 1  # two different figures on this data
    low, high = overall["chrf"]["ci"]
    assert low <= corpus <= high and high - low > 1


def test_paired_bootstrap_difference_and_verdict():
    rng = np.random.default_rng(0)
    base = rng.random(400)
    # same rows, a clear shift: the difference is outside the interval around 0
    shifted = M.paired_difference(base + 0.1, base, samples=500, seed=1)
    assert shifted["diff"] == pytest.approx(0.1) and shifted["verdict"] == "outside"
    assert shifted["ci"] == pytest.approx([0.1, 0.1])  # paired: the per-row noise cancels exactly
    # noise only: the interval contains 0
    noisy = M.paired_difference(base + rng.normal(0, 0.05, 400), base, samples=500, seed=1)
    assert noisy["ci"][0] <= 0 <= noisy["ci"][1] and noisy["verdict"] == "within"
    # a small shift: the paired interval excludes 0 while the two unpaired intervals overlap widely
    small = M.paired_difference(base + 0.01, base, samples=500, seed=1)
    low_a, high_a = M.bootstrap_ci(base + 0.01, samples=500, seed=1)
    low_b, high_b = M.bootstrap_ci(base, samples=500, seed=1)
    assert small["verdict"] == "outside" and low_a < high_b and low_b < high_a
    # corpus chrF++ paired on row statistics
    stats_a = [M.chrf_stats("the cat sat", "the cat sat")] * 5
    stats_b = [M.chrf_stats("a dog ran", "the cat sat")] * 5
    chrf = M.paired_difference(stats_a, stats_b, samples=100, key="chrf")
    assert chrf["a"] == pytest.approx(100.0) and chrf["diff"] > 50 and chrf["verdict"] == "outside"
    with pytest.raises(ValueError, match="same rows"):
        M.paired_difference([1.0, 2.0], [1.0], samples=10)
