"""The seed's exact conventions: edit request bytes, feedback selection, message layout."""
from __future__ import annotations

from data_prep import build_edit_conversation
from data_prep.build import feedback_permutations
from data_prep.feedback import data_step_feedback, edit_request, select_feedback, selected_indices


def test_edit_request_bytes():
    assert edit_request(["First item.", "Second item.", "Third item."]) == (
        "Edit the response to the previous prompt based on the following feedback:\n\n"
        "First item.\n\nSecond item.\n\nThird item."
    )
    assert edit_request([]) == "Edit the response to the previous prompt based on the following feedback:\n\n<None>"


def test_build_edit_conversation_multi_turn_layout():
    context = [
        {"role": "user", "content": "Hi, can you help me plan a trip?"},
        {"role": "assistant", "content": "Of course. Where to?", "extra": "dropped"},
        {"role": "user", "content": "Kyoto, three days."},
    ]
    messages = build_edit_conversation(context, "Day 1: temples.", ["Too short.", "It lacks days 2 and 3."])
    assert messages == [
        {"role": "user", "content": "Hi, can you help me plan a trip?"},
        {"role": "assistant", "content": "Of course. Where to?"},
        {"role": "user", "content": "Kyoto, three days."},
        {"role": "assistant", "content": "Day 1: temples."},
        {"role": "user", "content": "Edit the response to the previous prompt based on the following feedback:\n\n"
                                    "Too short.\n\nIt lacks days 2 and 3."},
    ]
    assert "extra" in context[1]  # the caller's context is not modified


def test_build_edit_conversation_without_feedback_says_none():
    messages = build_edit_conversation([{"role": "user", "content": "Q"}], "A", [])
    assert messages[-1] == {"role": "user", "content": "Edit the response to the previous prompt based on the "
                                                       "following feedback:\n\n<None>"}


def test_build_edit_conversation_selects_when_more_than_three():
    feedback = ["zero", "one but", "two However improve", "three lack", "four"]
    messages = build_edit_conversation([{"role": "user", "content": "Q"}], "A", feedback)
    assert messages[-1]["content"].endswith("\n\ntwo However improve\n\none but\n\nthree lack")


def test_selection_sorts_by_score_and_keeps_ties_in_input_order():
    feedback = ["plain", "tie one but", "tie two lack", "top However improve", "tie three benefit"]
    assert select_feedback(feedback) == ["top However improve", "tie one but", "tie two lack"]


def test_selection_skips_items_starting_with_perfectly():
    feedback = ["The response is perfectly fine. However, but but but", "a but", "b", "c", "d"]
    assert select_feedback(feedback) == ["a but", "b", "c"]
    # Only a prefix skips: the phrase elsewhere in an item does not.
    feedback = ["x", "Overall, The response is perfectly fine but", "y", "z"]
    assert select_feedback(feedback) == ["Overall, The response is perfectly fine but", "x", "y"]
    # Too many skipped: fewer than 3 come back.
    feedback = ["The response is perfectly clear.", "one", "The response is perfectly short but", "two"]
    assert select_feedback(feedback) == ["one", "two"]


def test_selection_counts_case_sensitive_substrings():
    # `but` inside `attribute` and `contribute` counts; `however` (lower case) and `Improve` do not.
    feedback = ["however, Improve the tone", "an attribute and a contribution", "Lacking", "but lacking"]
    assert select_feedback(feedback) == ["an attribute and a contribution", "but lacking", "however, Improve the tone"]
    # Every occurrence counts, not just whether a keyword appears.
    feedback = ["but", "but but but", "improve improve", "x"]
    assert select_feedback(feedback) == ["but but but", "improve improve", "but"]


def test_select_feedback_is_the_seeds_filter_for_three_or_fewer_items_too():
    """The seed's filter_feedback sorts and skips for every input length (it failed before: lists of 3
    or fewer came back unchanged)."""
    three = ["The response is perfectly fine.", "no keyword", "However it lacks but"]
    assert select_feedback(three) == ["However it lacks but", "no keyword"]
    assert select_feedback(["plain", "improve this"]) == ["improve this", "plain"]
    assert select_feedback(["The response is perfectly helpful."]) == []
    assert select_feedback(["only one"]) == ["only one"]
    assert select_feedback([]) == []
    assert select_feedback(["a", "b but"], max_items=1) == ["b but"]
    # The request the ITS loop builds from it, byte for byte.
    assert edit_request(select_feedback(three)) == (
        "Edit the response to the previous prompt based on the following feedback:\n\n"
        "However it lacks but\n\nno keyword")


def test_select_feedback_matches_the_seed_rule_for_every_length():
    """Every length 0..6 over a pool with ties, skipped items and keyword counts: sort by score
    descending (stable), drop `The response is perfectly...` items, keep 3."""
    import itertools

    pool = ["The response is perfectly fine but", "x", "lack lack", "but", "y", "The response is perfectly.",
            "improve benefit However"]
    for n in range(len(pool) + 1):
        for items in itertools.permutations(pool, n) if n <= 3 else [tuple(pool[:n]), tuple(reversed(pool[:n]))]:
            items = list(items)
            scores = {i: sum(items[i].count(k) for k in ("However", "improve", "lack", "benefit", "but")) for i in range(n)}
            expected = [items[i] for i in sorted(range(n), key=lambda i: (-scores[i], i))
                        if not items[i].startswith("The response is perfectly")][:3]
            assert select_feedback(items) == expected, items


def test_data_step_drops_perfectly_helpful_items_for_every_length_and_keeps_the_rest_as_given():
    """The paper's Edit demonstrations never carry "The response is perfectly ..." items: with 3 or fewer
    items they are dropped too (in the given order otherwise); the earlier policy stays as keep_perfect."""
    three = ["The response is perfectly fine.", "no keyword", "However it lacks but"]
    assert data_step_feedback(three) == ["no keyword", "However it lacks but"]  # no reordering
    assert selected_indices(three) == [1, 2]
    assert data_step_feedback(three, keep_perfect=True) == three and selected_indices(three, keep_perfect=True) == [0, 1, 2]
    assert data_step_feedback(["only one"]) == ["only one"] and data_step_feedback([]) == []
    # only "starts with" counts (case-sensitive), as in the seed's filter
    assert data_step_feedback(["Overall, The response is perfectly fine", "the response is perfectly fine"]) == [
        "Overall, The response is perfectly fine", "the response is perfectly fine"]
    # More than 3: the seed's selection, with either option.
    five = ["zero", "one but", "two However improve", "three lack", "The response is perfectly four but but"]
    assert data_step_feedback(five) == select_feedback(five) == ["two However improve", "one but", "three lack"]
    assert data_step_feedback(five, keep_perfect=True) == select_feedback(five)
    assert selected_indices(five) == [2, 1, 3]
    # build_edit_conversation applies the data step's policy: a given permutation stays in that order.
    messages = build_edit_conversation([{"role": "user", "content": "Q"}], "A", list(reversed(three)))
    assert messages[-1]["content"].endswith("following feedback:\n\nHowever it lacks but\n\nno keyword")
    messages = build_edit_conversation([{"role": "user", "content": "Q"}], "A", list(reversed(three)), keep_perfect=True)
    assert messages[-1]["content"].endswith("However it lacks but\n\nno keyword\n\nThe response is perfectly fine.")


def test_a_row_whose_every_item_is_perfectly_helpful_asks_with_none():
    """The seed's convention for an empty feedback list (`<None>`) holds for a list emptied by the rule."""
    praise = ["The response is perfectly helpful.", "The response is perfectly helpful and concise."]
    assert data_step_feedback(praise) == [] == select_feedback(praise)
    messages = build_edit_conversation([{"role": "user", "content": "Q"}], "A", praise)
    assert messages[-1]["content"] == "Edit the response to the previous prompt based on the following feedback:\n\n<None>"
    assert messages[-1]["content"] == build_edit_conversation([{"role": "user", "content": "Q"}], "A", [])[-1]["content"]


def test_feedback_permutations():
    every = feedback_permutations(3, "all", 0, "edit/train/0")
    assert len(every) == 6 and len(set(every)) == 6 and every[0] == (0, 1, 2)
    assert feedback_permutations(3, "given", 0, "r") == [(0, 1, 2)]
    assert feedback_permutations(0, "all", 0, "r") == [()]
    assert feedback_permutations(2, "all", 0, "r") == [(0, 1), (1, 0)]
    two = feedback_permutations(3, 2, 7, "edit/train/5")
    assert len(two) == 2 and len(set(two)) == 2 and set(two) <= set(every)
    assert two == feedback_permutations(3, 2, 7, "edit/train/5")  # same seed, same draw
    draws = {tuple(feedback_permutations(3, 2, seed, "edit/train/5")) for seed in range(20)}
    assert len(draws) > 1  # the seed chooses
    assert feedback_permutations(3, 6, 7, "r") == every and feedback_permutations(3, 10, 7, "r") == every
