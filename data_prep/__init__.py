"""HelpSteer3 -> edit SFT conversations, preference pairs and RL prompts (`python -m data_prep`).

The public API (later stages and the eval import it) is import-light: no torch, no datasets.
"""
from __future__ import annotations

from data_prep.feedback import data_step_feedback, edit_request, select_feedback

__all__ = ["build_edit_conversation", "data_step_feedback", "edit_request", "is_copy", "normalise_whitespace", "select_feedback"]


def build_edit_conversation(context: list[dict], original_response: str, feedback: list[str],
                            keep_perfect: bool = False) -> list[dict]:
    """The messages up to and including the edit request:
    context + {"assistant": original_response} + {"user": edit_request(data_step_feedback(feedback))}.

    The data step's policy (data_prep.feedback): feedback with more than 3 items is reduced by
    `select_feedback` (the seed's selection); 3 or fewer are used in the order given (pass a permutation
    to get that order) without the items that start `The response is perfectly` (`keep_perfect=True`:
    kept). No item left: `<None>`. To ask exactly as the seed does for any length, pass
    `select_feedback(feedback)`. Each turn keeps only role and content.
    """
    messages = [{"role": turn["role"], "content": turn["content"]} for turn in context]
    messages.append({"role": "assistant", "content": original_response})
    messages.append({"role": "user", "content": edit_request(data_step_feedback(feedback, keep_perfect=keep_perfect))})
    return messages


def normalise_whitespace(text: str) -> str:
    """Runs of whitespace as one space, none at the ends: how texts are compared everywhere."""
    return " ".join(text.split())


def is_copy(edit: str, original: str) -> bool:
    """The edit is the original after whitespace normalisation: a pair the data step does not emit,
    the copy rate the rl stage logs and the eval reports."""
    return normalise_whitespace(edit) == normalise_whitespace(original)
