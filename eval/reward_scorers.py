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
                 next-token logits after the last template token, id 0 (greedy scores are the raw logits;
                 a generation_config that samples would divide the card's number by its temperature,
                 which changes no comparison between two responses).

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

Length and format: one definition with rm training and the RL reward (recipes/reward.py): the whole
conversation under the chat template, and a conversation over max_length tokens keeps BOS + the system
header and its last tokens (that module's truncation rule); `self.shortened` counts those cut. A
sequence classifier is scored by recipes.reward.score_conversations itself (pad distinct from the
end-of-turn token); a first_logit model reads the same token ids.
"""
from __future__ import annotations

import json
import math
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Optional, Sequence

from hs3.io import UserError

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
                max_length: Optional[int] = None, concurrency: int = 16, max_retries: int = 5,
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
    return LocalScorer(path, kind or detect_kind(path), dtype, batch_size, max_length)


class Scorer:
    """The interface: name, kind, score(conversations, progress=None) -> list[float | None]."""

    name: str
    kind: str
    shortened: int = 0
    failed: int = 0

    def score(self, conversations: Sequence[Messages], progress: Progress = None) -> list[Optional[float]]:
        raise NotImplementedError


class LocalScorer(Scorer):
    """A model loaded in this process (spread over the GPUs when there are any)."""

    def __init__(self, path: str, kind: str, dtype: str = "float32", batch_size: int = 8,
                 max_length: Optional[int] = None):
        from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

        from eval.engines import gpu_device_map
        from recipes.models import load_pretrained, torch_dtype

        auto = AutoModelForSequenceClassification if kind == "seqcls" else AutoModelForCausalLM
        self.name, self.kind = path, kind
        self.model = load_pretrained(auto, path, dtype=torch_dtype(dtype), device_map=gpu_device_map()).eval()
        self.tokenizer = load_pretrained(AutoTokenizer, path)
        self.batch_size = batch_size
        self.max_length = max_length or getattr(self.model.config, "max_position_embeddings", None)
        self.shortened = 0

    def score(self, conversations: Sequence[Messages], progress: Progress = None) -> list[Optional[float]]:
        from recipes.reward import conversation_length, score_conversations

        if self.max_length:
            self.shortened += sum(conversation_length(self.tokenizer, c) > self.max_length for c in conversations)
        if self.kind == "seqcls":
            try:
                return score_conversations(self.model, self.tokenizer, conversations, self.max_length, self.batch_size,
                                           progress=progress)
            except ValueError as exc:  # no pad token distinct from the end-of-turn token
                raise UserError(f"reward model {self.name}: {exc}") from None
        return self._first_logits(conversations, progress)

    def _first_logits(self, conversations: Sequence[Messages], progress: Progress) -> list[Optional[float]]:
        """Logit of token id 0 after each conversation's last token (right padding, any pad id: a causal
        LM's logits at a real position do not depend on the padding after it)."""
        import torch

        from recipes.reward import _by_length, reward_input_ids

        ids = [reward_input_ids(self.tokenizer, list(c), self.max_length) for c in conversations]
        scores: list[Optional[float]] = [None] * len(ids)
        for batch in _by_length([len(x) for x in ids], self.batch_size):
            width = max(len(ids[i]) for i in batch)
            input_ids = torch.zeros((len(batch), width), dtype=torch.long)
            attention = torch.zeros((len(batch), width), dtype=torch.long)
            for b, i in enumerate(batch):
                input_ids[b, :len(ids[i])] = torch.tensor(ids[i])
                attention[b, :len(ids[i])] = 1
            with torch.inference_mode():
                logits = self.model(input_ids=input_ids.to(self.model.device),
                                    attention_mask=attention.to(self.model.device)).logits
                last = torch.tensor([len(ids[i]) - 1 for i in batch], device=logits.device)
                values = logits[torch.arange(len(batch), device=logits.device), last, 0]
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
        """The reward in a /pooling reply; ValueError for a non-finite one (NaN, inf: a failed request)."""
        data = reply["data"][0]["data"]
        if isinstance(data, (int, float)):
            value = float(data)
        elif data and isinstance(data[0], list):  # per-token rows: the last token's
            value = float(data[-1][0])
        else:
            value = float(data[0])
        if not math.isfinite(value):
            raise ValueError(f"non-finite score {value}")
        return value

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
