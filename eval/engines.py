"""Where generated edits come from: a model in this process (transformers), or any
OpenAI-compatible chat-completions endpoint (vLLM, TRT-LLM, NIM, or eval.serve).

Both engines take a list of conversations (lists of {role, content}) and return one
`Generation` per conversation, in order; `on_result(index, generation)` hears of each one as soon
as it exists. `generate_cached` puts an on-disk cache in front of either, keyed by (model,
conversation, sampling settings) and written as results arrive, so a rerun after a crash resumes
where it stopped instead of regenerating.
"""
from __future__ import annotations

import hashlib
import json
import os
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

from hs3.io import UserError, dumps_json

Messages = list[dict]
OnResult = Optional[Callable[[int, "Generation"], None]]


@dataclass(frozen=True)
class Sampling:
    max_new_tokens: int = 256
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    seed: int = 1234


@dataclass
class Generation:
    text: str
    finish_reason: str  # "stop" (end of turn), "length" (hit max_new_tokens) or "error" (request failed)
    completion_tokens: int
    error: Optional[str] = None  # why an endpoint request failed after its retries (never cached)


def is_endpoint(path: str) -> bool:
    return str(path).startswith(("http://", "https://"))


def gpu_device_map() -> Optional[str]:
    """"auto" (the model spread over every visible GPU) when there is one; None keeps it on the CPU."""
    import torch

    return "auto" if torch.cuda.is_available() else None


def dir_fingerprint(path: str) -> str:
    """A short hash of a local directory's file names, sizes and modification times ('' for a hub id)."""
    root = Path(path)
    if not root.is_dir():
        return ""
    stats = sorted((str(p.relative_to(root)), p.stat().st_size, p.stat().st_mtime_ns)
                   for p in root.rglob("*") if p.is_file())
    return hashlib.sha256(json.dumps(stats).encode()).hexdigest()[:16]


# --- in-process transformers ----------------------------------------------------------------------

class HFEngine:
    """Batched generation with left padding (a decoder generates at the right end of every row)."""

    def __init__(self, model, tokenizer, batch_size: int = 8, model_id: Optional[str] = None,
                 cache_implementation: Optional[str] = "auto"):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        # The KV cache generate() uses: auto = "static" on CUDA (transformers then compiles the decoding step:
        # generation/utils.py _valid_auto_compile_criteria), its dynamic default elsewhere; or static | dynamic.
        if cache_implementation == "auto":
            cache_implementation = "static" if model.device.type == "cuda" else "dynamic"
        self.cache_implementation = None if cache_implementation == "dynamic" else cache_implementation
        # What the generation cache keys on: the checkpoint's path and its files' sizes and times,
        # so a checkpoint retrained in place is not served stale generations.
        self.model_id = model_id or str(getattr(model, "name_or_path", "")) or type(model).__name__
        eos = model.generation_config.eos_token_id
        eos = eos if isinstance(eos, list) else [eos] if eos is not None else []
        self.stop_ids = set(eos) | ({tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set())

    @classmethod
    def load(cls, model_cfg, path: Optional[str], batch_size: int = 8) -> "HFEngine":
        """The configured model (path=None) or a checkpoint of ours, with its own tokenizer."""
        from recipes.models import load_causal_lm, load_tokenizer, resolve_model_path

        source = path or resolve_model_path(model_cfg)
        model_id = f"{source}@{dir_fingerprint(source)}"
        model = load_causal_lm(model_cfg, path, device_map=gpu_device_map())
        return cls(model, load_tokenizer(model_cfg, path), batch_size, model_id)

    def prompt_texts(self, conversations: Sequence[Messages]) -> list[str]:
        return [self.tokenizer.apply_chat_template(list(m), tokenize=False, add_generation_prompt=True)
                for m in conversations]

    def generate(self, conversations: Sequence[Messages], sampling: Sampling, on_result: OnResult = None,
                 seeds: Optional[Sequence[int]] = None) -> list[Generation]:
        """All conversations, batch_size at a time, longest first (similar lengths share a batch,
        and an out-of-memory error shows up on the first batch rather than the last). Sampled rows draw
        with their own seed: `seeds[i]`, or sampling.seed + i (SeededRowSampler)."""
        texts = self.prompt_texts(conversations)
        lengths = [len(self.tokenizer(t, add_special_tokens=False)["input_ids"]) for t in texts]
        order = sorted(range(len(texts)), key=lambda i: -lengths[i])
        seeds = list(seeds) if seeds is not None else [sampling.seed + i for i in range(len(texts))]
        results: list[Optional[Generation]] = [None] * len(texts)
        for start in range(0, len(order), self.batch_size):
            batch = order[start:start + self.batch_size]
            generations = self._generate_batch([texts[i] for i in batch], sampling, seeds=[seeds[i] for i in batch])
            for i, generation in zip(batch, generations):
                results[i] = generation
                if on_result:
                    on_result(i, generation)
        return results  # type: ignore[return-value]

    def _generate_batch(self, texts: list[str], sampling: Sampling, stopping_criteria=None,
                        seeds: Optional[Sequence[int]] = None) -> list[Generation]:
        """One left-padded batch; `stopping_criteria` (transformers') can end rows early (eval.serve: a
        client that has gone). Sampled rows draw with their own seeds (default sampling.seed + row)."""
        import torch
        from transformers import LogitsProcessorList

        self.tokenizer.padding_side = "left"
        inputs = self.tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(self.model.device)
        kwargs = {"cache_implementation": self.cache_implementation} if self.cache_implementation else {}
        if sampling.temperature > 0:
            seeds = list(seeds) if seeds is not None else [sampling.seed + i for i in range(len(texts))]
            kwargs["logits_processor"] = LogitsProcessorList([SeededRowSampler(seeds, sampling, self.model.device)])
        with torch.inference_mode():
            output = self.model.generate(
                **inputs, max_new_tokens=sampling.max_new_tokens, pad_token_id=self.tokenizer.pad_token_id,
                stopping_criteria=stopping_criteria, do_sample=False, **kwargs)
        new_tokens = output[:, inputs["input_ids"].shape[1]:].tolist()
        return [self._finish(tokens, sampling.max_new_tokens) for tokens in new_tokens]

    def _finish(self, tokens: list[int], max_new_tokens: int) -> Generation:
        """Cut at the first stop token; no stop token within the budget = truncated."""
        for n, token in enumerate(tokens):
            if token in self.stop_ids:
                return Generation(self.tokenizer.decode(tokens[:n], skip_special_tokens=True), "stop", n + 1)
        text = self.tokenizer.decode(tokens, skip_special_tokens=True)
        return Generation(text, "length" if len(tokens) >= max_new_tokens else "stop", len(tokens))


class SeededRowSampler:
    """A transformers logits processor that samples each row's next token with that row's own
    torch.Generator (temperature, then top-p, as vLLM and the OpenAI API apply them; no top-k) and leaves
    only that token possible, so that greedy decoding emits it. A row's draws then depend on its seed
    and its own logits only, not on which rows share its batch or how many batches came before: the same
    request gives the same text, and two requests with different seeds are independent draws (a batch
    re-seeded with one seed would repeat the same draws in every batch)."""

    def __init__(self, seeds: Sequence[int], sampling: Sampling, device):
        import torch
        from transformers import TemperatureLogitsWarper, TopPLogitsWarper

        self.generators = [torch.Generator(device=device).manual_seed(int(s) % (1 << 64)) for s in seeds]
        self.warpers = [TemperatureLogitsWarper(sampling.temperature)]
        if sampling.top_p < 1.0:
            self.warpers.append(TopPLogitsWarper(sampling.top_p))

    def __call__(self, input_ids, scores):
        import torch

        for warper in self.warpers:
            scores = warper(input_ids, scores)
        # Inverse-CDF draw: one uniform number per row from that row's generator, then one vectorised search
        # (a multinomial call per row costs ~10x more on CPU).
        cdf = torch.softmax(scores.float(), dim=-1).cumsum_(dim=-1)
        u = torch.cat([torch.rand(1, generator=g, device=cdf.device) for g in self.generators])
        chosen = torch.searchsorted(cdf, (u * cdf[:, -1]).unsqueeze(1), right=True).clamp_(max=cdf.shape[1] - 1)
        out = torch.full_like(scores, float("-inf"))
        return out.scatter_(1, chosen, 0.0)


# --- OpenAI-compatible endpoint -------------------------------------------------------------------

class MalformedReply(Exception):
    """A 200 reply that is not a chat completion (not JSON, HTML from a proxy, no choices, no message)."""


def parse_chat_completion(body: str) -> Generation:
    """The Generation in a chat-completion reply body, or MalformedReply naming what is wrong with it."""
    try:
        reply = json.loads(body)
    except ValueError:
        raise MalformedReply(f"not JSON: {body[:80]!r}") from None
    choices = reply.get("choices") if isinstance(reply, dict) else None
    if not isinstance(choices, list) or not choices:
        raise MalformedReply(f"no choices in the reply: {body[:80]!r}")
    message = choices[0].get("message") if isinstance(choices[0], dict) else None
    if not isinstance(message, dict):
        raise MalformedReply(f"choices[0].message is {message!r}, not a message")
    content = message.get("content")
    if content is not None and not isinstance(content, str):
        raise MalformedReply(f"choices[0].message.content is a {type(content).__name__}, not text")
    usage = reply.get("usage")
    tokens = usage.get("completion_tokens") if isinstance(usage, dict) else None
    return Generation(content or "", "length" if choices[0].get("finish_reason") == "length" else "stop",
                      tokens if isinstance(tokens, int) and not isinstance(tokens, bool) else 0)


class HTTPEngine:
    """Chat completions against an OpenAI-compatible server, `concurrency` requests in flight.
    Retries with exponential backoff (429, 5xx, timeouts, refused connections) are the openai
    client's own (`max_retries`); a 200 reply that is not a chat completion (not JSON, an HTML page,
    `choices: []`, `message: null`) is retried the same number of times with the same backoff here. A
    request that still fails (or is refused, e.g. a prompt over the server's context length) becomes that
    row's Generation with finish_reason "error" and its error message: the other rows go on. Only when
    every request fails is it an error (the endpoint is unusable)."""

    def __init__(self, base_url: str, model: Optional[str] = None, concurrency: int = 16, max_retries: int = 5,
                 timeout_s: float = 600.0, api_key_env: str = "OPENAI_API_KEY"):
        from openai import OpenAI

        self.base_url = base_url.rstrip("/")
        self.concurrency = concurrency
        self.max_retries = max_retries
        self.client = OpenAI(base_url=self.base_url, api_key=os.environ.get(api_key_env) or "EMPTY",
                             max_retries=max_retries, timeout=timeout_s)
        self.model = model or self._first_model()

    def _first_model(self) -> str:
        import openai

        try:
            models = [m.id for m in self.client.models.list()]
        except (openai.APIError, ValueError, TypeError, AttributeError, KeyError) as exc:
            raise UserError(f"endpoint {self.base_url}: cannot list its models ({type(exc).__name__}: {exc}); "
                            f"is the server up? (set eval.api_model to skip this call)") from None
        if not models:
            raise UserError(f"endpoint {self.base_url} serves no model")
        return models[0]

    @property
    def model_id(self) -> str:
        return f"{self.base_url}#{self.model}"

    def complete(self, messages: Messages, sampling: Sampling) -> Generation:
        """One request; the reply body is checked here (parse_chat_completion), not trusted to the client."""
        raw = self.client.chat.completions.with_raw_response.create(
            model=self.model, messages=list(messages), max_tokens=sampling.max_new_tokens,
            temperature=sampling.temperature, top_p=sampling.top_p, seed=sampling.seed, n=1)
        return parse_chat_completion(raw.text)

    def complete_or_error(self, messages: Messages, sampling: Sampling) -> Generation:
        import openai

        for attempt in range(self.max_retries + 1):
            try:
                return self.complete(messages, sampling)
            except MalformedReply as exc:
                error = f"MalformedReply: {exc}"
                if attempt < self.max_retries:  # as the client backs off (0.5 s doubling, at most 8 s)
                    time.sleep(min(0.5 * 2 ** attempt, 8.0))
            except openai.APIError as exc:
                message = str(exc).splitlines()[0] if str(exc) else ""
                return Generation("", "error", 0, error=f"{type(exc).__name__}: {message}"[:500])
        return Generation("", "error", 0, error=error[:500])

    def generate(self, conversations: Sequence[Messages], sampling: Sampling, on_result: OnResult = None) -> list[Generation]:
        results: list[Optional[Generation]] = [None] * len(conversations)
        with ThreadPoolExecutor(max_workers=self.concurrency) as pool:
            futures = {pool.submit(self.complete_or_error, m, sampling): i for i, m in enumerate(conversations)}
            try:
                for future in as_completed(futures):
                    i = futures[future]
                    results[i] = future.result()
                    if on_result:
                        on_result(i, results[i])
            except BaseException:
                for future in futures:  # do not wait for requests never started
                    future.cancel()
                raise
        if results and all(r.error is not None for r in results):  # type: ignore[union-attr]
            raise UserError(f"endpoint {self.base_url}: every request failed after retries ({results[0].error})")
        return results  # type: ignore[return-value]


# --- the cache in front of both -------------------------------------------------------------------

class GenerationCache:
    """An append-only JSONL file of finished generations. A line is written (and flushed) as soon
    as its generation exists, so a crash loses at most the requests in flight; a half-written
    last line is ignored on reading."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.entries: dict[str, Generation] = {}
        if self.path.is_file():
            for line in self.path.read_text(encoding="utf-8").splitlines():
                try:
                    entry = json.loads(line)
                    self.entries[entry["key"]] = Generation(**entry["generation"])
                except (ValueError, KeyError, TypeError):
                    continue

    @staticmethod
    def key(model_id: str, messages: Messages, sampling: Sampling) -> str:
        blob = json.dumps({"model": model_id, "messages": messages, "sampling": asdict(sampling)},
                          sort_keys=True, ensure_ascii=False)
        return hashlib.sha256(blob.encode("utf-8")).hexdigest()

    def add(self, items: list[tuple[str, Generation]]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a", encoding="utf-8") as f:
            for key, generation in items:
                self.entries[key] = generation
                f.write(dumps_json({"key": key, "generation": asdict(generation)}) + "\n")
            f.flush()


def generate_cached(engine, conversations: Sequence[Messages], sampling: Sampling, cache: GenerationCache,
                    progress: Optional[Callable[[int], None]] = None) -> list[Generation]:
    """Generations for every conversation: cached ones read back, the rest generated (each cached
    the moment it arrives; a failed request is returned with its error but not cached, so a rerun
    retries it). `progress(n)` is told how many rows finished each time."""
    keys = [GenerationCache.key(engine.model_id, list(m), sampling) for m in conversations]
    rows_of: dict[str, list[int]] = {}
    for row, key in enumerate(keys):
        rows_of.setdefault(key, []).append(row)
    todo = [k for k in rows_of if k not in cache.entries]  # each distinct request once
    if progress:
        progress(len(keys) - sum(len(rows_of[k]) for k in todo))

    failed: dict[str, Generation] = {}

    def arrived(index: int, generation: Generation) -> None:
        if generation.error is None:
            cache.add([(todo[index], generation)])
        else:
            failed[todo[index]] = generation
        if progress:
            progress(len(rows_of[todo[index]]))

    if todo:
        engine.generate([conversations[rows_of[k][0]] for k in todo], sampling, on_result=arrived)
    return [cache.entries[k] if k in cache.entries else failed[k] for k in keys]
