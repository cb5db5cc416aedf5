"""`./launch.sh edit` (issue 19 item 4): one conversation through the exact edit request format, on a
local checkpoint (in process) and through `python -m eval.serve` on localhost."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from .conftest import REPO_ROOT

CONTEXT = [{"role": "user", "content": "Hi!"}, {"role": "assistant", "content": "Hello, how can I help?"},
           {"role": "user", "content": "Give me two tips for sleeping well."}]
ORIGINAL = "Sleep.\nDrink coffee at night."
FEEDBACK = ["The response is partially helpful. However, it lacks detail and one tip is harmful.",
            "The response is perfectly helpful.",
            "The response is slightly helpful but it could improve the second tip.",
            "The response is mostly helpful. It would benefit from reasons; however it is short."]
GENERATE = ["eval.max_new_tokens=12"]


def edit(*args, stdin=None):
    return subprocess.run([sys.executable, "-m", "launcher", "edit", *map(str, args)], cwd=REPO_ROOT, input=stdin,
                          capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def expected(varied_model_dir):
    """The request the data step would build for this row, and the greedy edit of the same model generated
    here in process (eval.engines.HFEngine)."""
    from data_prep import build_edit_conversation, select_feedback
    from eval.engines import HFEngine, Sampling
    from recipes.config import compose

    messages = build_edit_conversation(CONTEXT, ORIGINAL, FEEDBACK)
    assert messages[-1]["content"] == ("Edit the response to the previous prompt based on the following feedback:\n\n"
                                       + "\n\n".join(select_feedback(FEEDBACK)))  # 4 items: the seed's selection
    engine = HFEngine.load(compose("eval", [f"model={varied_model_dir}"]).model, str(varied_model_dir))
    text = engine.generate([messages], Sampling(max_new_tokens=12, seed=1234))[0].text
    assert text.strip()
    return messages, text


@pytest.fixture(scope="module")
def server(varied_model_dir):
    proc = subprocess.Popen([sys.executable, "-m", "eval.serve", "--model", str(varied_model_dir), "--port", "0",
                             "--name", "tiny-edit"], cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        line = proc.stdout.readline()
        assert line.startswith("serving"), f"server did not start: {line!r}"
        yield line.split()[-1]
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_a_local_checkpoint_with_a_helpsteer3_row(varied_model_dir, expected, tmp_path):
    messages, text = expected
    row = tmp_path / "row.json"
    row.write_text(json.dumps({"context": CONTEXT, "original_response": ORIGINAL, "feedback": FEEDBACK}))
    proc = edit(f"model={varied_model_dir}", f"context={row}", "--show-request", "--diff", *GENERATE)
    assert proc.returncode == 0, proc.stderr[-2000:]
    request = json.loads(proc.stderr[:proc.stderr.index("\n]\n") + 2])
    assert request == messages  # exactly the data step's request
    assert proc.stdout.startswith(text + "\n")
    diff = proc.stdout[len(text) + 1:]
    assert diff.startswith("--- original\n+++ edit\n") and "-Drink coffee at night." in diff


def test_context_from_stdin_and_each_feedback_on_the_command_line(varied_model_dir, expected):
    messages, text = expected
    from data_prep import select_feedback

    proc = edit(f"model={varied_model_dir}", "context=-", f"response={ORIGINAL}",
                *[f"feedback={f}" for f in select_feedback(FEEDBACK)], *GENERATE, stdin=json.dumps(CONTEXT))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout == text + "\n"


def test_through_eval_serve_on_localhost(server, expected, tmp_path):
    """The same request over HTTP (eval.serve generates as HFEngine does): the same greedy edit."""
    messages, text = expected
    (tmp_path / "original.txt").write_text(ORIGINAL)
    (tmp_path / "context.json").write_text(json.dumps(CONTEXT))
    proc = edit(f"model={server}", f"context={tmp_path / 'context.json'}", f"response=@{tmp_path / 'original.txt'}",
                *[f"feedback={f}" for f in FEEDBACK], *GENERATE)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout == text + "\n"


@pytest.mark.parametrize("args, message", [
    (["prompt=hi", "response=x"], "model=DIR|URL is required"),
    (["model=/nope", "prompt=hi", "response=x"], "/nope"),
    (["model={model}", "response=x"], "give the conversation"),
    (["model={model}", "prompt=hi"], "response=TEXT|@FILE|- (the original response to edit) is required"),
    (["model={model}", "context={bad}", "response=x"], "it must end with the user's turn"),
    (["model={model}", "prompt=hi", "response=@/no/such/file"], "cannot read /no/such/file"),
    (["model={model}", "prompt=hi", "response=x", "--frobnicate"], "unknown option --frobnicate"),
])
def test_bad_input_is_one_line(varied_model_dir, tmp_path, args, message):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(CONTEXT + [{"role": "assistant", "content": "x"}]))
    proc = edit(*[a.format(model=varied_model_dir, bad=bad) for a in args])
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and message in proc.stderr, proc.stderr
