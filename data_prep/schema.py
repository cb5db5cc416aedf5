"""HelpSteer3's edit and edit_quality row schemas, and the reason a row cannot be used.

Every check returns a (reason, detail) pair: `reason` is a stable code counted in the manifest and
the summary line, `detail` says which field and why, for a person reading rejected.jsonl.
"""
from __future__ import annotations

SUBSETS = ("edit", "edit_quality")
SPLITS = ("train", "validation")

# Field -> required? (all are strings unless listed in LIST_FIELDS)
FIELDS = {
    "edit": {"domain": True, "language": True, "context": True, "original_response": True,
             "edited_response": True, "feedback": True, "change_summary": False},
    "edit_quality": {"domain": True, "language": True, "context": True, "original_response": True,
                     "good_edited_response": True, "bad_edited_response": True, "feedback": True},
}
LIST_FIELDS = ("context", "feedback")
# Responses that must hold text (not empty, not only whitespace).
RESPONSE_FIELDS = {
    "edit": ("original_response", "edited_response"),
    "edit_quality": ("original_response", "good_edited_response", "bad_edited_response"),
}
ROLES = ("user", "assistant")

# Reason codes, in the order a row is checked.
INVALID_UTF8 = "invalid_utf8"
MALFORMED_JSON = "malformed_json"
NOT_AN_OBJECT = "not_an_object"
MISSING_FIELD = "missing_field"
WRONG_TYPE = "wrong_type"
EMPTY_CONTEXT = "empty_context"
BAD_ROLE = "context_bad_role"
FIRST_NOT_USER = "context_first_not_user"
ROLES_NOT_ALTERNATING = "context_roles_not_alternating"
LAST_NOT_USER = "context_last_not_user"
EMPTY_RESPONSE = "empty_response"
FEEDBACK_NOT_STRING = "feedback_item_not_string"
LEAKED = "leaked"
EQUAL_PAIRS = "equal_pairs"
TOO_LONG = "too_long"


def check_row(subset: str, record) -> tuple[str, str] | None:
    """None when the row follows the schema, else (reason, detail)."""
    if not isinstance(record, dict):
        return NOT_AN_OBJECT, f"a row must be a JSON object, got {type(record).__name__}"
    for name, required in FIELDS[subset].items():
        value = record.get(name)
        if value is None:  # the hub's Arrow tables give None for a field a row lacks
            if required:
                return MISSING_FIELD, f"{name} is missing"
            continue
        expected = list if name in LIST_FIELDS else str
        if not isinstance(value, expected):
            return WRONG_TYPE, f"{name} must be a {expected.__name__}, got {type(value).__name__}"
    problem = check_context(record["context"])
    if problem:
        return problem
    for name in RESPONSE_FIELDS[subset]:
        if not record[name].strip():
            return EMPTY_RESPONSE, f"{name} is empty"
    for i, item in enumerate(record["feedback"]):
        if not isinstance(item, str):
            return FEEDBACK_NOT_STRING, f"feedback[{i}] must be a str, got {type(item).__name__}"
    return None


def check_typed_row(record, fields: dict[str, type], responses: tuple[str, ...]) -> tuple[str, str] | None:
    """The checks every subset's row starts with: a JSON object, each of `fields` present with its type
    (a bool is not an int), a well-formed context, each of `responses` holding text."""
    if not isinstance(record, dict):
        return NOT_AN_OBJECT, f"a row must be a JSON object, got {type(record).__name__}"
    for name, expected in fields.items():
        value = record.get(name)
        if value is None:
            return MISSING_FIELD, f"{name} is missing"
        if not isinstance(value, expected) or isinstance(value, bool):
            return WRONG_TYPE, f"{name} must be a {expected.__name__}, got {type(value).__name__}"
    problem = check_context(record["context"])
    if problem:
        return problem
    for name in responses:
        if not record[name].strip():
            return EMPTY_RESPONSE, f"{name} is empty"
    return None


def check_context(context: list) -> tuple[str, str] | None:
    """Turns are {role, content}; roles alternate, starting and ending with the user."""
    if not context:
        return EMPTY_CONTEXT, "context has no turns"
    for i, turn in enumerate(context):
        if not isinstance(turn, dict):
            return WRONG_TYPE, f"context[{i}] must be an object, got {type(turn).__name__}"
        for key in ("role", "content"):
            if not isinstance(turn.get(key), str):
                kind = "missing" if turn.get(key) is None else f"a {type(turn[key]).__name__}"
                return (MISSING_FIELD if turn.get(key) is None else WRONG_TYPE), f"context[{i}].{key} is {kind}, must be a str"
        if turn["role"] not in ROLES:
            return BAD_ROLE, f"context[{i}].role is {turn['role']!r}, must be user or assistant"
    if context[0]["role"] != "user":
        return FIRST_NOT_USER, "context[0] must be a user turn"
    for i in range(1, len(context)):
        if context[i]["role"] == context[i - 1]["role"]:
            return ROLES_NOT_ALTERNATING, f"context[{i - 1}] and context[{i}] are both {context[i]['role']} turns"
    if context[-1]["role"] != "user":
        return LAST_NOT_USER, "the last context turn must be a user turn"
    return None


def extra_fields(subset: str, record: dict) -> dict:
    """Fields HelpSteer3's schema does not name: carried into the outputs' metadata."""
    return {k: v for k, v in record.items() if k not in FIELDS[subset] and v is not None}
