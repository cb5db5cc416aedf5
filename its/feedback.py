"""Which feedback texts an edit is asked with.

Feedback that begins `The response is perfectly` carries nothing to edit by and is dropped
(data_prep.feedback.SKIPPED_PREFIX). Of the rest, at most `max_kept` are kept:
    random    a seeded random draw (the paper's base setting), kept in the order drawn;
    keywords  the seed's keyword rerank, data_prep.feedback.select_feedback (stable sort by keyword
              score, perfectly-helpful skipped, the first max_kept): the scaled setting.
"""
from __future__ import annotations

import random

from data_prep.feedback import SKIPPED_PREFIX, select_feedback


def usable(feedback: list[str]) -> list[str]:
    """The feedback texts an edit can use: not empty, not perfectly helpful (order kept)."""
    return [f for f in feedback if f.strip() and not f.startswith(SKIPPED_PREFIX)]


def pick_sets(feedback: list[str], mode: str, max_kept: int, sets: int, seed: str) -> list[list[str]]:
    """Up to `sets` feedback sets for one response (none when no feedback is usable). `seed` names the
    response (run seed, prompt id, response index) so a rerun draws the same sets."""
    kept = usable(feedback)
    if not kept:
        return []
    if mode == "keywords":
        return [select_feedback(kept, max_kept)]
    if mode != "random":
        raise ValueError(f"feedback pick {mode!r}: expected random or keywords")
    rng = random.Random(seed)  # a str seed is hashed with SHA-512: the same on every run and machine
    return [rng.sample(kept, min(max_kept, len(kept))) for _ in range(sets)]
