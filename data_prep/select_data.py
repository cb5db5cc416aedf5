"""HelpSteer3 `preference` subset -> Select-model preference pairs (select/{train,validation}.jsonl).

A row holds a context, two responses and `overall_preference` in -3..3 (negative: response1 is better;
its size is the strength, 1 slightly / 2 better / 3 much better), plus `individual_preference` (each
annotator's score and reasoning; carried into metadata, not used). One pair per row:
  {"id", "prompt": context turns, "chosen": [assistant: the better response], "rejected": [...],
   "weight": |overall_preference|, "overall_preference", "domain", "language", "source"}
`weight` scales the pair's Bradley-Terry loss in the select stage (scaled BT, as in
HelpSteer2-Preference). The field is deliberately not called `margin`: TRL's RewardTrainer reads a
`margin` column as an additive margin inside the sigmoid (Llama-2 style), a different loss.

Ties (overall_preference 0) order nothing: the row is rejected with reason `tie` and counted (NeMo-RL's
own HelpSteer3 loader keeps them with chosen = rejected; we do not). Rows whose two responses are equal
after whitespace normalisation are rejected as `equal_pairs`.
"""
from __future__ import annotations

from data_prep import is_copy
from data_prep.feedback_data import RESPONSES, leak_keys
from data_prep.schema import EQUAL_PAIRS, check_typed_row

__all__ = ["check_preference_row", "emit_select", "leak_keys"]

FIELDS = {"domain": str, "language": str, "context": list, "response1": str, "response2": str,
          "overall_preference": int}
TIE = "tie"
BAD_PREFERENCE = "preference_out_of_range"


def check_preference_row(record) -> tuple[str, str] | None:
    """None when the row follows the preference subset's schema and orders its responses, else (reason, detail)."""
    problem = check_typed_row(record, FIELDS, RESPONSES)
    if problem:
        return problem
    preference = record["overall_preference"]
    if not -3 <= preference <= 3:
        return BAD_PREFERENCE, f"overall_preference is {preference}, must be in -3..3"
    if preference == 0:
        return TIE, "overall_preference is 0: the responses are rated equal, no order to learn"
    if is_copy(record["response1"], record["response2"]):
        return EQUAL_PAIRS, "response1 equals response2 after whitespace normalisation"
    return None


def emit_select(row, extra: dict) -> None:
    """row.outputs = {"select": [the pair]}."""
    record = row.record
    preference = record["overall_preference"]
    chosen, rejected = ("response1", "response2") if preference < 0 else ("response2", "response1")
    prompt = [{"role": t["role"], "content": t["content"]} for t in record["context"]]
    row.outputs = {"select": [{
        "id": row.key, "prompt": prompt,
        "chosen": [{"role": "assistant", "content": record[chosen]}],
        "rejected": [{"role": "assistant", "content": record[rejected]}],
        "weight": abs(preference), "overall_preference": preference,
        "domain": record["domain"], "language": record["language"],
        "source": {"subset": row.subset, "split": row.split, "row": row.row, "chosen": chosen},
        **({"metadata": extra} if extra else {}),
    }]}


def extra_fields(record: dict) -> dict:
    return {k: v for k, v in record.items() if k not in FIELDS and v is not None}
