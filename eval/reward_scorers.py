"""Reward scorers: one number per conversation, from a local model or an HTTP endpoint.

    from eval.reward_scorers import load_scorer
    scorer = load_scorer("runs/x/rm/final")                  # kind auto-detected from config.json
    scorer = load_scorer("/models/Llama-3.3-Nemotron-70B-Select", kind="first_logit")
    scorer = load_scorer("http://rm-host:8000")              # an endpoint speaking /pooling (below)
    scores = scorer.score([[{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]])

`load_scorer(spec, kind=None, ...) -> Scorer`; `Scorer.score(conversations: list[list[dict]]) -> list[float | None]`
(None only for an endpoint that kept failing on that conversation after its retries: the caller counts it).
Used by the eval (the gold scorer, eval.gold_rm) and importable by anything else that needs a reward
(e.g. the ITS loop's Select step).

Kinds (`kind=`, or auto-detected from a local dir's config.json `architectures`):
    seqcls       a sequence classifier with one output (our rm stage's final/, Skywork-style RMs,
                 *ForSequenceClassification): the reward is that output at the last token of the
                 conversation formatted with the model's chat template.
    first_logit  a causal LM whose reward is the logit of token id 0 at the first generated position
                 (NVIDIA's Llama-3.3-Nemotron-70B-Select and Llama-3.1-Nemotron-70B-Reward-HF: their cards
                 template [user, assistant] with add_generation_prompt=False, generate one token with
                 output_scores, and read scores[0][0][0]). One forward pass gives the same number: the
                 next-token logits after the last template token, id 0 (greedy scores are the raw logits).

Specs: a local directory; `builtin:tiny-gold` (a tiny random causal LM built here with seed 7, independent
of anything trained: the smoke run's gold scorer, first_logit, numbers meaningless); or an http(s) URL.

Endpoint protocol: vLLM's Pooling API. POST {root}/pooling with {"model": NAME, "messages": [...]} and
read data[0].data from the reply: a number, or a list whose first element is the reward (a one-output
head), or a list of per-token rows of which the last row's first element is taken. `python -m
eval.serve_rm --model DIR [--kind ...]` serves any local scorer of either kind this way (so a first_logit
model such as Select, which vLLM's pooling runners do not score this way, is served by it on a GPU node);
`vllm serve RM_DIR --runner pooling` serves a sequence-classification RM. {root} is the URL without a
trailing /v1. Each request is retried with backoff on connection errors, timeouts, 408/409/429 and 5xx
(the openai client's own retry rules); a conversation that still fails scores None.

Length: a conversation longer than max_length tokens is shortened by eval.prompts.shorten_messages (the
middle of the earliest non-system turns is cut; BOS, system turns and the last `keep_last` turns are
kept) before scoring, and `self.shortened` counts them.
"""
from __future__ import annotations

import json
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Optional, Sequence

from recipes.io import UserError

Messages = list[dict]
Progress = Optional[Callable[[int], None]]
KINDS = ("seqcls", "first_logit")
TINY_GOLD = "builtin:tiny-gold"
TINY_GOLD_SEED = 7  # any seed but the tiny model's 0: a scorer that shares no weights with the policy or the rm


def detect_kind(path: str) -> str:
    """seqcls or first_logit, from config.json's architectures."""
    config = Path(path) / "config.json"
    try:
        architectures = json.loads(config.read_text(encoding="utf-8")).get("architectures") or []
    except (OSError, ValueError):
        raise UserError(f"{path}: no readable config.json to tell the reward model's kind (pass its kind)") from None
    if any(a.endswith("ForSequenceClassification") for a in architectures):
        return "seqcls"
    if any(a.endswith("ForCausalLM") for a in architectures):
        return "first_logit"
    raise UserError(f"{path}: architectures {architectures} are neither a sequence classifier nor a causal LM "
                    f"(pass the kind: seqcls or first_logit)")


def resolve_spec(spec: str) -> str:
    """A local dir for builtin:tiny-gold (built once in the cache), the spec itself otherwise."""
    if spec != TINY_GOLD:
        return spec
    from recipes.config import compose
    from recipes.models import CACHE_DIR
    from recipes.tiny_model import ensure_tiny_model

    return str(ensure_tiny_model(compose("eval", ["model=tiny"]).model, CACHE_DIR / "models", seed=TINY_GOLD_SEED))


def load_scorer(spec: str, kind: Optional[str] = None, *, dtype: str = "float32", batch_size: int = 8,
                max_length: Optional[int] = None, keep_last: int = 1, concurrency: int = 16, max_retries: int = 5,
                timeout_s: float = 600.0, api_model: Optional[str] = None,
                api_key_env: str = "OPENAI_API_KEY") -> "Scorer":
    """A scorer for a local dir, builtin:tiny-gold or an endpoint (see the module docstring)."""
    if kind is not None and kind not in KINDS:
        raise UserError(f"reward model kind {kind!r}: expected one of {', '.join(KINDS)}")
    spec = str(spec)
    if spec.startswith(("http://", "https://")):
        return HTTPScorer(spec, api_model, concurrency, max_retries, timeout_s, api_key_env)
    path = resolve_spec(spec)
    if not Path(path).is_dir():
        raise UserError(f"reward model {spec}: no such directory (a local model dir, {TINY_GOLD}, or an http(s) endpoint)")
    return LocalScorer(path, kind or detect_kind(path), dtype, batch_size, max_length, keep_last)


class Scorer:
    """The interface: name, kind, score(conversations, progress=None) -> list[float | None]."""

    name: str
    kind: str
    shortened: int = 0
    failed: int = 0

    def score(self, conversations: Sequence[Messages], progress: Progress = None) -> list[Optional[float]]:
        raise NotImplementedError


def _by_length(lengths: Sequence[int], batch_size: int):
    """Index batches, longest first (less padding; an out-of-memory error shows up at once)."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    for start in range(0, len(order), batch_size):
        yield order[start:start + batch_size]


class LocalScorer(Scorer):
    """A model loaded in this process (spread over the GPUs when there are any)."""

    def __init__(self, path: str, kind: str, dtype: str = "float32", batch_size: int = 8,
                 max_length: Optional[int] = None, keep_last: int = 1):
        from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

        from eval.engines import gpu_device_map
        from recipes.models import load_pretrained, torch_dtype

        auto = AutoModelForSequenceClassification if kind == "seqcls" else AutoModelForCausalLM
        self.name, self.kind = path, kind
        self.model = load_pretrained(auto, path, dtype=torch_dtype(dtype), device_map=gpu_device_map()).eval()
        self.tokenizer = load_pretrained(AutoTokenizer, path)
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.batch_size = batch_size
        self.max_length = max_length or getattr(self.model.config, "max_position_embeddings", None)
        self.keep_last = keep_last
        self.shortened = 0

    def encode(self, conversation: Messages) -> list[int]:
        """Token ids of the whole conversation under the chat template (no generation prompt)."""
        from eval.prompts import shorten_messages

        messages, shortened = shorten_messages(self.tokenizer, list(conversation), self.max_length, self.keep_last,
                                               add_generation_prompt=False)
        self.shortened += shortened
        return self.tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=False,
                                                  return_dict=False)

    def score(self, conversations: Sequence[Messages], progress: Progress = None) -> list[Optional[float]]:
        import torch

        ids = [self.encode(c) for c in conversations]
        scores: list[Optional[float]] = [None] * len(ids)
        for batch in _by_length([len(x) for x in ids], self.batch_size):
            width = max(len(ids[i]) for i in batch)
            # Padding with an id no row of the batch contains: a classifier pools at the rightmost
            # token that is not the pad id, which is then each row's own last token, even when the
            # tokenizer's pad token is the end-of-turn token the conversation ends with.
            present = {t for i in batch for t in ids[i]}
            pad = next(t for t in range(len(present) + 1) if t not in present)
            input_ids = torch.full((len(batch), width), pad, dtype=torch.long)
            attention = torch.zeros((len(batch), width), dtype=torch.long)
            for b, i in enumerate(batch):  # right padding: the last real token is at len - 1
                input_ids[b, :len(ids[i])] = torch.tensor(ids[i])
                attention[b, :len(ids[i])] = 1
            last = torch.tensor([len(ids[i]) - 1 for i in batch])
            with torch.inference_mode():
                inputs = {"input_ids": input_ids.to(self.model.device), "attention_mask": attention.to(self.model.device)}
                if self.kind == "seqcls":
                    self.model.config.pad_token_id = pad
                    values = self.model(**inputs).logits[:, 0]
                else:  # logits after the last template token, token id 0
                    logits = self.model(**inputs).logits
                    values = logits[torch.arange(len(batch), device=logits.device), last.to(logits.device), 0]
            for i, value in zip(batch, values.float().tolist()):
                scores[i] = value
            if progress:
                progress(len(batch))
        return scores


class HTTPScorer(Scorer):
    """An endpoint speaking vLLM's Pooling API (see the module docstring)."""

    kind = "endpoint"

    def __init__(self, url: str, model: Optional[str] = None, concurrency: int = 16, max_retries: int = 5,
                 timeout_s: float = 600.0, api_key_env: str = "OPENAI_API_KEY"):
        from openai import OpenAI

        root = url.rstrip("/")
        root = root[:-3] if root.endswith("/v1") else root
        self.name, self.root, self.concurrency = url, root, concurrency
        self.client = OpenAI(base_url=root, api_key=os.environ.get(api_key_env) or "EMPTY", max_retries=max_retries,
                             timeout=timeout_s)
        self.model = model or self._first_model()
        self.failed = 0
        self.errors: dict[int, str] = {}

    def _first_model(self) -> str:
        import openai

        try:
            reply = self.client.get("/v1/models", cast_to=object)
            return reply["data"][0]["id"]
        except (openai.APIError, KeyError, IndexError, TypeError) as exc:
            raise UserError(f"reward endpoint {self.root}: cannot list its models ({type(exc).__name__}); is the "
                            f"server up?") from None

    @staticmethod
    def parse(reply) -> float:
        data = reply["data"][0]["data"]
        if isinstance(data, (int, float)):
            return float(data)
        if data and isinstance(data[0], list):  # per-token rows: the last token's
            return float(data[-1][0])
        return float(data[0])

    def score_one(self, conversation: Messages) -> float:
        reply = self.client.post("/pooling", cast_to=object, body={"model": self.model, "messages": list(conversation)})
        return self.parse(reply)

    def score(self, conversations: Sequence[Messages], progress: Progress = None) -> list[Optional[float]]:
        import openai

        def one(i: int) -> Optional[float]:
            try:
                return self.score_one(conversations[i])
            except (openai.APIError, KeyError, IndexError, TypeError, ValueError) as exc:
                self.errors[i] = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:300]
                return None
            finally:
                if progress:
                    progress(1)

        self.errors = {}
        with ThreadPoolExecutor(max_workers=self.concurrency) as pool:
            scores = list(pool.map(one, range(len(conversations))))
        self.failed += len(self.errors)
        if conversations and len(self.errors) == len(conversations):
            raise UserError(f"reward endpoint {self.root}: every request failed ({next(iter(self.errors.values()))})")
        return scores
