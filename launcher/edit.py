"""`./launch.sh edit`: try an Edit model on one example.

    ./launch.sh edit model=DIR|URL [context=FILE|-] [prompt=TEXT] response=TEXT|@FILE|- feedback=TEXT
                     [feedback=TEXT ...] [--diff] [--show-request] [eval.max_new_tokens=N eval.temperature=T ...]

The conversation is built exactly as the data step builds the training rows
(data_prep.build_edit_conversation): the context turns, the original response as the assistant's turn,
then the user's edit request "Edit the response to the previous prompt based on the following
feedback:\\n\\n" + the feedback items joined by a blank line (more than 3 items: the seed's selection;
items that start "The response is perfectly" dropped; none: <None>). The model's edit is printed; --diff
adds a unified diff against the original response, --show-request the request's messages as JSON.

model= is a checkpoint dir (generated in process, eval.engines.HFEngine, at the model's own dtype) or an
OpenAI-compatible endpoint http(s)://HOST:PORT/v1 (vLLM, NIM, python -m eval.serve; eval.api_model names
the served model). context= is a JSON file (a list of {role, content} turns ending with a user turn; or
an object with "context", and optionally "original_response" and "feedback", e.g. a HelpSteer3 edit row),
or a plain text file (one user turn); `-` reads it from stdin. prompt=TEXT is a one-turn context.
Generation keys are the eval's (eval.max_new_tokens, eval.temperature, eval.top_p, seed).
"""
from __future__ import annotations

import difflib
import json
import sys
from pathlib import Path

from hs3.io import UserError

OWN_KEYS = ("model", "context", "prompt", "response", "feedback")
ROLES = ("system", "user", "assistant")


def _text(value: str, key: str, stdin_used: list) -> str:
    """TEXT, @FILE (its content) or - (stdin, once)."""
    if value == "-":
        if stdin_used:
            raise UserError(f"{key}=-: stdin is already read by {stdin_used[0]}=-")
        stdin_used.append(key)
        return sys.stdin.read()
    if value.startswith("@"):
        try:
            return Path(value[1:]).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise UserError(f"{key}={value}: cannot read {value[1:]} ({type(exc).__name__})") from None
    return value


def read_context(value: str, stdin_used: list) -> tuple[list[dict], dict]:
    """(context turns, other fields of a row: original_response, feedback) from context=FILE|-."""
    if value == "-":
        text = _text("-", "context", stdin_used)
    else:
        try:
            text = Path(value).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise UserError(f"context={value}: cannot read it ({type(exc).__name__})") from None
    try:
        data = json.loads(text)
    except ValueError:
        data = None
    extra: dict = {}
    if isinstance(data, dict):
        extra = {k: data[k] for k in ("original_response", "response", "feedback") if k in data}
        data = data.get("context", data.get("messages"))
    if data is None or isinstance(data, str):
        turns = [{"role": "user", "content": text.strip() if data is None else data}]
    else:
        turns = data
    return check_context(turns, f"context={value}"), extra


def check_context(turns, where: str) -> list[dict]:
    if not isinstance(turns, list) or not turns:
        raise UserError(f"{where}: expected a list of {{role, content}} turns")
    for i, turn in enumerate(turns):
        if not (isinstance(turn, dict) and turn.get("role") in ROLES and isinstance(turn.get("content"), str)):
            raise UserError(f"{where}: turn {i} is not a {{role: system|user|assistant, content: text}}")
    if turns[-1]["role"] != "user":
        raise UserError(f"{where}: the context ends with a {turns[-1]['role']} turn; it must end with the user's "
                        "turn that the original response answers")
    return turns


def parse(argv: list[str]) -> tuple[dict, list[str], set[str]]:
    own: dict = {"feedback": []}
    rest, flags = [], set()
    for arg in argv:
        if arg in ("--diff", "--show-request"):
            flags.add(arg)
            continue
        if arg.startswith("-"):
            raise UserError(f"edit: unknown option {arg} (--diff, --show-request)")
        key, sep, value = arg.partition("=")
        if not sep:
            raise UserError(f"edit: expected key=value, got {arg!r}")
        if key == "feedback":
            own["feedback"].append(value)
        elif key in OWN_KEYS:
            own[key] = value
        else:
            rest.append(arg)
    return own, rest, flags


def main(argv: list[str]) -> int:
    from data_prep import build_edit_conversation
    from eval.engines import Sampling
    from eval.target import generation_engine, model_under_test
    from recipes.config import compose

    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__.strip())
        return 0
    own, rest, flags = parse(argv)
    if "model" not in own:
        raise UserError("edit: model=DIR|URL is required (a checkpoint dir, or an endpoint http://HOST:PORT/v1)")
    stdin_used: list = []
    if "context" in own and "prompt" in own:
        raise UserError("edit: context= and prompt= together (prompt=TEXT is a one-turn context)")
    if "context" in own:
        context, row = read_context(own["context"], stdin_used)
    elif "prompt" in own:
        context, row = check_context([{"role": "user", "content": own["prompt"]}], "prompt="), {}
    else:
        raise UserError("edit: give the conversation: context=FILE|- (JSON turns, a HelpSteer3 row, or text) or prompt=TEXT")
    if "response" in own:
        original = _text(own["response"], "response", stdin_used)
    elif isinstance(row.get("original_response", row.get("response")), str):
        original = row.get("original_response", row.get("response"))
    else:
        raise UserError("edit: response=TEXT|@FILE|- (the original response to edit) is required")
    feedback = [_text(f, "feedback", stdin_used) for f in own["feedback"]]
    if not feedback and isinstance(row.get("feedback"), list):
        feedback = [str(f) for f in row["feedback"]]

    cfg = compose("eval", [f"model={own['model']}", *rest])
    target = model_under_test(cfg)
    messages = build_edit_conversation(context, original, feedback)
    if "--show-request" in flags:
        print(json.dumps(messages, ensure_ascii=False, indent=1), file=sys.stderr)
    engine = generation_engine(cfg, target)
    sampling = Sampling(max_new_tokens=cfg.eval.max_new_tokens, temperature=cfg.eval.temperature, top_p=cfg.eval.top_p,
                        seed=cfg.seed)
    generation = engine.generate([messages], sampling)[0]
    if generation.finish_reason == "error":
        raise UserError(f"edit: the model gave no edit: {generation.error}")
    print(generation.text)
    if generation.finish_reason == "length":
        print(f"# the edit was cut at eval.max_new_tokens={cfg.eval.max_new_tokens}", file=sys.stderr)
    if "--diff" in flags:
        diff = difflib.unified_diff(original.splitlines(keepends=True), generation.text.splitlines(keepends=True),
                                    "original", "edit", lineterm="")
        lines = [line.rstrip("\n") for line in diff]
        print("\n".join(lines) if lines else "# the edit is the original, unchanged")
    return 0
