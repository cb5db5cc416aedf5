"""Reward scorers (eval/reward_scorers.py): the first-logit convention of NVIDIA's Select/Reward cards,
a sequence classifier read at each conversation's own last token, kind detection, the /pooling endpoint
(eval.serve_rm as a real process) against the local scorer, and the eval's length rule (eval/prompts.py)."""
from __future__ import annotations

import subprocess
import sys

import pytest

from .conftest import REPO_ROOT

pytestmark = pytest.mark.timeout(300)

CONVERSATIONS = [
    [{"role": "user", "content": f"Question {i}: " + "tell me more " * (2 * i)},
     {"role": "assistant", "content": "An answer " * (i + 1)}]
    for i in range(5)
]


@pytest.fixture(scope="module")
def gold_dir() -> str:
    from eval.reward_scorers import TINY_GOLD, resolve_spec

    return resolve_spec(TINY_GOLD)


def test_first_logit_is_the_cards_generate_one_token_scores_0_0_0(gold_dir):
    """Nemotron-70B-Reward-HF / Select cards: apply_chat_template(add_generation_prompt=False), generate one
    token with output_scores, reward = scores[0][0][0]. The batched forward pass gives the same numbers."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from eval.reward_scorers import load_scorer

    scorer = load_scorer(gold_dir, batch_size=3)
    assert scorer.kind == "first_logit"  # detected from config.json (LlamaForCausalLM)
    scores = scorer.score(CONVERSATIONS)
    model, tok = AutoModelForCausalLM.from_pretrained(gold_dir).eval(), AutoTokenizer.from_pretrained(gold_dir)
    for conversation, value in zip(CONVERSATIONS, scores):
        ids = tok.apply_chat_template(conversation, tokenize=True, add_generation_prompt=False, return_tensors="pt",
                                      return_dict=True)
        with torch.no_grad():
            out = model.generate(**ids, max_new_tokens=1, return_dict_in_generate=True, output_scores=True,
                                 do_sample=False, pad_token_id=tok.pad_token_id)
        assert value == pytest.approx(out.scores[0][0][0].item(), abs=1e-4)
    assert len({round(s, 5) for s in scores}) > 1


def test_seqcls_reads_the_last_token_even_when_pad_is_the_end_of_turn_token(tiny_rm_dir, tmp_path):
    """A tokenizer whose pad token is <|eot_id|> (Llama's usual choice): transformers' classifier pools at the
    rightmost token that is not the pad id, i.e. before the closing <|eot_id|>. The scorer pads with an id the
    batch does not contain, so each conversation is read at its own last token, batched or not."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from eval.reward_scorers import load_scorer

    model = AutoModelForSequenceClassification.from_pretrained(tiny_rm_dir)
    tok = AutoTokenizer.from_pretrained(tiny_rm_dir)
    tok.pad_token = "<|eot_id|>"
    model.config.pad_token_id = tok.pad_token_id
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)

    scorer = load_scorer(str(tmp_path), batch_size=5)
    assert scorer.kind == "seqcls"
    batched = scorer.score(CONVERSATIONS)
    scorer.batch_size = 1
    assert batched == pytest.approx(scorer.score(CONVERSATIONS), abs=1e-5)
    model.eval()
    for conversation, value in zip(CONVERSATIONS, batched):
        ids = torch.tensor([tok.apply_chat_template(conversation, tokenize=True, return_dict=False)])
        assert ids[0, -1].item() == tok.pad_token_id  # the conversation ends with the pad id
        with torch.no_grad():
            last = model.model(input_ids=ids).last_hidden_state[0, -1]
            expected = model.score(last)[0].item()
            library = model(input_ids=ids).logits[0, 0].item()  # pooled before the <|eot_id|>
        assert value == pytest.approx(expected, abs=1e-5)
        assert library != pytest.approx(expected, abs=1e-5)


def test_kinds_and_bad_specs(tiny_model_dir, tiny_rm_dir, tmp_path):
    from eval.reward_scorers import detect_kind, load_scorer
    from hs3.io import UserError

    assert detect_kind(str(tiny_rm_dir)) == "seqcls" and detect_kind(str(tiny_model_dir)) == "first_logit"
    with pytest.raises(UserError, match="kind 'pairwise'"):
        load_scorer(str(tiny_rm_dir), "pairwise")
    with pytest.raises(UserError, match="no such directory"):
        load_scorer(str(tmp_path / "missing"))
    (tmp_path / "config.json").write_text('{"architectures": ["BertModel"]}')
    with pytest.raises(UserError, match="neither a sequence classifier nor a causal LM"):
        detect_kind(str(tmp_path))


@pytest.fixture(scope="module")
def rm_server(gold_dir):
    """`python -m eval.serve_rm` as a real process on 127.0.0.1 (any free port)."""
    proc = subprocess.Popen([sys.executable, "-m", "eval.serve_rm", "--model", gold_dir, "--port", "0", "--name", "gold"],
                            cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        line = proc.stdout.readline()
        assert line.startswith("serving reward model"), f"server did not start: {line!r}"
        yield line.split()[-1]
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_endpoint_scores_equal_the_local_scorer_and_a_failed_row_is_recorded(rm_server, gold_dir):
    from eval.reward_scorers import HTTPScorer, load_scorer
    from hs3.io import UserError

    local = load_scorer(gold_dir).score(CONVERSATIONS)
    remote = load_scorer(rm_server + "/v1", concurrency=3, max_retries=0)  # /v1 suffix tolerated
    assert isinstance(remote, HTTPScorer) and remote.model == "gold"  # found through GET /v1/models
    assert remote.score(CONVERSATIONS) == pytest.approx(local, abs=1e-4)
    # one conversation the server refuses (content not a string: 400): None for it, the rest scored
    bad = [{"role": "user", "content": ["not", "a", "string"]}, {"role": "assistant", "content": "x"}]
    scores = remote.score([CONVERSATIONS[0], bad, CONVERSATIONS[1]])
    assert scores[1] is None and scores[0] == pytest.approx(local[0], abs=1e-4)
    assert remote.failed == 1 and "BadRequestError" in remote.errors[1]
    with pytest.raises(UserError, match="every request failed"):
        remote.score([bad])
    # vLLM's per-token reward rows: the last token's value
    assert HTTPScorer.parse({"data": [{"data": [[0.1], [0.2], [0.7]]}]}) == 0.7
    assert HTTPScorer.parse({"data": [{"data": 1.5}]}) == 1.5


def test_shorten_keeps_bos_system_and_the_edit_request_and_cuts_the_earliest_turn_first(tiny_model_dir):
    from transformers import AutoTokenizer

    from eval.prompts import MARKER, count_tokens, shorten_messages

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    request = "Edit the response to the previous prompt based on the following feedback:\n\nBe brief."
    messages = [{"role": "system", "content": "You are helpful."},
                {"role": "user", "content": "first question " * 60 + "END-OF-FIRST"},
                {"role": "assistant", "content": "first answer " * 60},
                {"role": "user", "content": "second question " * 5},
                {"role": "assistant", "content": "The original response."},
                {"role": "user", "content": request}]
    full = count_tokens(tok, messages, True)
    assert shorten_messages(tok, messages, full) == (messages, False)  # fits: untouched
    budget = full - 100
    short, cut = shorten_messages(tok, messages, budget)
    assert cut and count_tokens(tok, short, True) <= budget
    ids = tok.apply_chat_template(short, tokenize=True, add_generation_prompt=True, return_dict=False)
    assert ids[0] == tok.bos_token_id
    assert short[0] == messages[0] and short[-2:] == messages[-2:]  # system, original and request kept whole
    assert MARKER in short[1]["content"] and short[1]["content"].startswith("first question")
    assert short[1]["content"].rstrip().endswith("END-OF-FIRST")  # the middle is cut, not the end
    assert short[2:] == messages[2:]  # a later turn is only cut once the earliest is used up
    # a budget that needs more than the first turn: it becomes the marker alone, the next one is cut
    shorter, _ = shorten_messages(tok, messages, count_tokens(tok, messages, True) - 200)
    assert shorter[1]["content"] == MARKER and MARKER in shorter[2]["content"] and shorter[3:] == messages[3:]


def test_the_proxy_scorer_is_the_shared_reward_function_with_its_truncation_rule(tiny_rm_dir):
    """eval's training-RM scorer and recipes.reward.score_conversations (rm training, RL reward) give the same
    numbers, also for a conversation over max_length (cut by that module's one rule, BOS kept)."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from eval.reward_scorers import load_scorer
    from recipes.reward import conversation_length, score_conversations

    long = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "context " * 300},
            {"role": "assistant", "content": "The edit."}]
    conversations = [*CONVERSATIONS, long]
    scorer = load_scorer(str(tiny_rm_dir), "seqcls", max_length=128, batch_size=4)
    ours = scorer.score(conversations)
    model = AutoModelForSequenceClassification.from_pretrained(tiny_rm_dir)
    shared = score_conversations(model, AutoTokenizer.from_pretrained(tiny_rm_dir), conversations, 128, batch_size=2)
    assert ours == pytest.approx(shared, abs=1e-5)
    assert conversation_length(scorer.tokenizer, long) > 128 and scorer.shortened == 1


def test_the_prompt_budget_defaults_to_the_data_builds_max_seq_len(tiny_model_dir, tmp_path):
    import json

    from eval.engines import HFEngine
    from eval.run import prompt_budget
    from recipes.config import compose

    (tmp_path / "manifest.json").write_text(json.dumps({"options": {"max_seq_len": 333}}))
    cfg = compose("eval", ["model=tiny", f"data={tmp_path}"])
    assert prompt_budget(cfg, engine=None) == 333
    assert prompt_budget(compose("eval", ["model=tiny", f"data={tmp_path}", "eval.max_prompt_tokens=50"]), None) == 50
    (tmp_path / "manifest.json").write_text(json.dumps({"options": {"max_seq_len": None}}))
    assert prompt_budget(cfg, engine=None) is None  # an endpoint, no data limit: prompts sent whole

    # a local model: its context (the tiny model's 2048 positions) minus max_new_tokens; none when no room is left
    local = HFEngine.load(cfg.model, None)
    assert prompt_budget(compose("eval", ["model=tiny", f"data={tmp_path}", "eval.max_new_tokens=100"]), local) == 1948
    assert prompt_budget(cfg, local) is None  # 4096 new tokens: no room, prompts go whole
