"""The edit request, byte for byte as the seed (arXiv 2503.04378, HelpSteer3 edit) writes it.

    context + assistant(original_response) + user(EDIT_REQUEST)

EDIT_REQUEST is EDIT_REQUEST_PREFIX followed by the feedback items joined by a blank line, or by
the literal `<None>` when there is no feedback.

Two feedback selections:
    select_feedback       the seed's `filter_feedback`, for every input length: stable sort by
                          `feedback_score` descending, skip items starting with `The response is
                          perfectly`, keep the first 3. The Feedback-Edit inference (ITS) loop uses it.
    data_step_feedback    the data step's policy: rows with more than 3 items are reduced by
                          `select_feedback`; rows with 3 or fewer keep their items in the given order
                          (the data step then trains on every order of them) minus the items that start
                          with `The response is perfectly`, as the paper's Edit demonstrations do (praise
                          carries nothing to edit by). A row left with no item asks with `<None>`, the
                          seed's convention for an empty list. `keep_perfect=True` is the earlier policy
                          (3 or fewer items kept exactly as given): python -m data_prep
                          --keep-perfect-feedback, prep.keep_perfect_feedback=true.
"""
from __future__ import annotations

EDIT_REQUEST_PREFIX = "Edit the response to the previous prompt based on the following feedback:\n\n"
NO_FEEDBACK = "<None>"
FEEDBACK_SEPARATOR = "\n\n"

# Case-sensitive substrings whose occurrences score a feedback item (substring counts: the `but`
# inside `attribute` counts, `However` does not match `however`).
SELECTION_KEYWORDS = ("However", "improve", "lack", "benefit", "but")
# Items that only praise the response carry nothing to edit by.
SKIPPED_PREFIX = "The response is perfectly"


def feedback_score(item: str) -> int:
    return sum(item.count(keyword) for keyword in SELECTION_KEYWORDS)


def select_feedback(feedback: list[str], max_items: int = 3) -> list[str]:
    """At most `max_items` feedback items, exactly as the seed's `filter_feedback` selects them, for
    any number of items: sort by `feedback_score` descending, ties kept in input order (a stable
    sort), skip items starting with `The response is perfectly`, keep the first `max_items` (fewer
    when too many were skipped)."""
    return [feedback[i] for i in seed_indices(feedback, max_items)]


def seed_indices(feedback: list[str], max_items: int = 3) -> list[int]:
    """`select_feedback` as positions in the input list."""
    # sorted() is stable, also with reverse=True: equal scores keep their input order.
    ranked = sorted(range(len(feedback)), key=lambda i: feedback_score(feedback[i]), reverse=True)
    return [i for i in ranked if not feedback[i].startswith(SKIPPED_PREFIX)][:max_items]


def is_perfect(item: str) -> bool:
    """An item that only says the response is perfectly helpful (nothing to edit by)."""
    return item.startswith(SKIPPED_PREFIX)


def data_step_feedback(feedback: list[str], max_items: int = 3, keep_perfect: bool = False) -> list[str]:
    """The data step's policy: with more than `max_items` items, `select_feedback`; with `max_items`
    or fewer, the list in its order without the perfectly-helpful items (with `keep_perfect`: unchanged)."""
    return [feedback[i] for i in selected_indices(feedback, max_items, keep_perfect)]


def selected_indices(feedback: list[str], max_items: int = 3, keep_perfect: bool = False) -> list[int]:
    """`data_step_feedback` as positions in the input list (the data step records them)."""
    if len(feedback) <= max_items:
        return [i for i, item in enumerate(feedback) if keep_perfect or not is_perfect(item)]
    return seed_indices(feedback, max_items)


def edit_request(feedback: list[str]) -> str:
    """The user turn that asks for the edit (feedback used as given: select first if needed)."""
    return EDIT_REQUEST_PREFIX + (FEEDBACK_SEPARATOR.join(feedback) if feedback else NO_FEEDBACK)
