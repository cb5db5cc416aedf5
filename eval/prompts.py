"""The eval's length rule for a prompt longer than the eval's budget (eval.max_prompt_tokens; by default
the data build's --max-seq-len, i.e. the length training rows were held to).

Validation rows are never dropped for length: the data step keeps them and flags their lines
(`over_max_seq_len`). Before a prompt goes to the model (in process or to an endpoint, so the rule works
on messages, not token ids), `shorten_messages` applies one rule:

    keep   BOS and the template's header (the chat template renders them: nothing is cut from the
           token sequence itself), every system turn, and the last `keep_last` turns whole (for an edit
           prompt: the original response and the edit request, the feedback included);
    cut    the middle of the earliest remaining turns, one turn at a time from the first: its first and
           last tokens stay, the middle is replaced by MARKER, and a turn is cut down to the marker alone
           before the next one is touched.

If the kept turns alone are still too long, the conversation is returned as shortened as it gets
(the model or endpoint then sees it whole; the eval counts it). The budget counts the template's tokens.
Reward scorers cut conversations by recipes/reward.py's token-level rule instead (BOS + system header kept,
then the last tokens), the one rule rm training and the RL reward use.
"""
from __future__ import annotations

from typing import Optional

MARKER = "\n[...]\n"


def count_tokens(tokenizer, messages: list[dict], add_generation_prompt: bool) -> int:
    return len(tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=add_generation_prompt,
                                             return_dict=False))


def shorten_messages(tokenizer, messages: list[dict], max_tokens: Optional[int], keep_last: int = 2,
                     add_generation_prompt: bool = True) -> tuple[list[dict], bool]:
    """(messages within max_tokens by the rule above, whether anything was cut). max_tokens None: no limit."""
    if not max_tokens:
        return messages, False
    excess = count_tokens(tokenizer, messages, add_generation_prompt) - max_tokens
    if excess <= 0:
        return messages, False
    messages = [dict(m) for m in messages]
    marker_len = len(tokenizer(MARKER, add_special_tokens=False)["input_ids"])
    cuttable = [i for i in range(max(0, len(messages) - keep_last)) if messages[i]["role"] != "system"]
    for i in cuttable:
        ids = tokenizer(messages[i]["content"], add_special_tokens=False)["input_ids"]
        while excess > 0 and ids:
            keep = max(0, len(ids) - excess - marker_len)
            head, tail = ids[:(keep + 1) // 2], ids[len(ids) - keep // 2:] if keep // 2 else []
            messages[i]["content"] = (tokenizer.decode(head) + MARKER + tokenizer.decode(tail)) if keep else MARKER
            excess = count_tokens(tokenizer, messages, add_generation_prompt) - max_tokens
            if not keep:
                break
            ids = head + tail  # re-tokenising a decoded cut may differ by a token or two: cut again
        if excess <= 0:
            break
    return messages, True
