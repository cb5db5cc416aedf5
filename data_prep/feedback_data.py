"""HelpSteer3 `feedback` subset -> Feedback-model SFT conversations (feedback/{train,validation}.jsonl).

A row holds a context, two responses and, for each response, up to 3 annotators' feedback texts
(feedback1, feedback2); every text begins "The response is {not|slightly|partially|mostly|perfectly}
helpful". One SFT conversation = data_prep.feedback_prompt.build_feedback_request(context, response)
+ {"assistant": one feedback text}: the Feedback model learns to write an annotator's feedback.

Which feedback text is the target is not stated by the sources (they count 81,642 demonstrations
for 40,821 rows: 2 per row, one per response). `--feedback-targets`:
  one (default)  one text per response, drawn with a generator seeded by (seed, row, response), so a
                 row's draw does not depend on which other rows exist: 2 demonstrations per row;
  all            every text of every response: up to 6 per row.
Each line also carries `references` (all of that response's texts) and `levels` (their helpfulness
levels), which the Feedback eval compares a generated feedback with.
"""
from __future__ import annotations

import json
import random

from data_prep.feedback_prompt import build_feedback_request, helpfulness_level
from data_prep.schema import FEEDBACK_NOT_STRING, check_typed_row

FEEDBACK_TARGETS = ("one", "all")
RESPONSES = ("response1", "response2")
FEEDBACKS = ("feedback1", "feedback2")
FIELDS = {"domain": str, "language": str, "context": list, "response1": str, "response2": str,
          "feedback1": list, "feedback2": list}

# Reason codes (in rejected.jsonl and the manifest), besides the shared ones of data_prep.schema.
NO_FEEDBACK = "no_feedback"  # a response has no feedback text
FEEDBACK_NO_LEVEL = "feedback_without_helpfulness"  # a text does not begin "The response is X helpful"


def check_feedback_row(record) -> tuple[str, str] | None:
    """None when the row follows the feedback subset's schema, else (reason, detail)."""
    problem = check_typed_row(record, FIELDS, RESPONSES)
    if problem:
        return problem
    for name in FEEDBACKS:
        items = record[name]
        if not items:
            return NO_FEEDBACK, f"{name} has no feedback text"
        for i, item in enumerate(items):
            if not isinstance(item, str):
                return FEEDBACK_NOT_STRING, f"{name}[{i}] must be a str, got {type(item).__name__}"
            if helpfulness_level(item) is None:
                return FEEDBACK_NO_LEVEL, (f"{name}[{i}] does not begin 'The response is "
                                           f"{{not|slightly|partially|mostly|perfectly}} helpful': {item[:60]!r}")
    return None


def leak_keys(record: dict) -> list[str]:
    """(context, response) of each response: what must not be in training when held out."""
    turns = [[t["role"], t["content"]] for t in record["context"]]
    return [json.dumps(turns + [record[name]], ensure_ascii=False) for name in RESPONSES]


def target_indices(n_items: int, targets: str, seed: int, row_key: str, response: int) -> list[int]:
    """Positions of the response's feedback texts that become targets."""
    if targets == "all":
        return list(range(n_items))
    return [random.Random(f"{seed}:{row_key}:{response}").randrange(n_items)]


def emit_feedback(row, targets: str, seed: int, instruction: str | None, extra: dict) -> None:
    """row.outputs = {"feedback": [one line per (response, target text)]}."""
    record = row.record
    lines = []
    for r, (response_field, feedback_field) in enumerate(zip(RESPONSES, FEEDBACKS), start=1):
        items = record[feedback_field]
        request = build_feedback_request(record["context"], record[response_field], instruction)
        for i in target_indices(len(items), targets, seed, row.key, r):
            lines.append({
                "id": f"{row.key}/response{r}/feedback{i}",
                "messages": request + [{"role": "assistant", "content": items[i]}],
                "references": list(items), "levels": [helpfulness_level(item) for item in items],
                "domain": record["domain"], "language": record["language"],
                "source": {"subset": row.subset, "split": row.split, "row": row.row, "response": r, "feedback_item": i},
                **({"metadata": extra} if extra else {}),
            })
    row.outputs = {"feedback": lines}


def extra_fields(record: dict) -> dict:
    return {k: v for k, v in record.items() if k not in FIELDS and v is not None}
