"""The loop's four models behind two small clients, each with an on-disk cache so a rerun resumes.

Generator (policy, feedback, edit): a checkpoint dir (eval.engines.HFEngine: batched, left padding) or an
OpenAI-compatible endpoint (eval.engines.HTTPEngine: `concurrency` requests in flight, the openai
client's retries with backoff; a request still failing comes back as a Generation with its error and
is recorded, not raised). A request is (messages, sample index): sample j of an endpoint request is
sent with seed + j, so N samples of one prompt differ; greedy requests ignore j (computed once).
Scorer (select): eval.reward_scorers.load_scorer (seqcls or first_logit, local or /pooling endpoint).
Both count calls, cached rows, errors, completion tokens and seconds, per model.
"""
from __future__ import annotations

import hashlib
import json
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Optional, Sequence

from eval.engines import GenerationCache, Generation, HFEngine, HTTPEngine, Sampling, is_endpoint
from hs3.io import UserError, dumps_json

Messages = list[dict]


@dataclass
class Stats:
    calls: int = 0  # requests sent to the model (cached rows are not calls)
    cached: int = 0
    errors: int = 0
    completion_tokens: int = 0
    seconds: float = 0.0
    errors_seen: list = field(default_factory=list)

    def as_dict(self) -> dict:
        d = asdict(self)
        d["errors_seen"] = d["errors_seen"][:5]
        d["seconds"] = round(d["seconds"], 3)
        return d


class Generator:
    def __init__(self, role: str, spec: str, engine, cache_path: Path, concurrency: int):
        self.role, self.spec, self.engine = role, spec, engine
        self.cache = GenerationCache(cache_path)
        self.concurrency = concurrency
        self.stats = Stats()

    @staticmethod
    def request_key(model_id: str, messages: Messages, sampling: Sampling, sample: int) -> str:
        base = GenerationCache.key(model_id, list(messages), sampling)
        if sampling.temperature <= 0:  # greedy: every sample is the same text
            return base
        return hashlib.sha256(f"{base}#{sample}".encode()).hexdigest()

    def generate(self, requests: Sequence[tuple[Messages, int]], sampling: Sampling) -> list[Generation]:
        """One Generation per (messages, sample index), cached ones read back; failures returned, not cached."""
        keys = [self.request_key(self.engine.model_id, m, sampling, j) for m, j in requests]
        first: dict[str, int] = {}
        for row, key in enumerate(keys):
            first.setdefault(key, row)
        todo = [k for k in first if k not in self.cache.entries]
        self.stats.cached += len(keys) - len(todo)
        failed: dict[str, Generation] = {}
        started = time.monotonic()

        def arrived(key: str, generation: Generation) -> None:
            self.stats.calls += 1
            self.stats.completion_tokens += generation.completion_tokens
            if generation.error is None:
                self.cache.add([(key, generation)])
            else:
                failed[key] = generation
                self.stats.errors += 1
                self.stats.errors_seen.append(generation.error)

        try:
            if todo and isinstance(self.engine, HTTPEngine):
                with ThreadPoolExecutor(max_workers=self.concurrency) as pool:
                    futures = {}
                    for key in todo:
                        messages, sample = requests[first[key]]
                        seeded = replace(sampling, seed=sampling.seed + sample)
                        futures[pool.submit(self.engine.complete_or_error, messages, seeded)] = key
                    try:
                        for future in as_completed(futures):
                            arrived(futures[future], future.result())
                    except BaseException:
                        for future in futures:
                            future.cancel()
                        raise
            elif todo:  # one batched call: rows of one conversation in a batch draw different samples
                self.engine.generate([requests[first[k]][0] for k in todo], sampling,
                                     on_result=lambda i, g: arrived(todo[i], g))
        finally:
            self.stats.seconds += time.monotonic() - started
        # A model that has never answered (nothing cached, nothing succeeded) and failed every request of a
        # step is unusable: stop with one line. Otherwise failures are the rows' own (recorded, run goes on).
        never_answered = not self.cache.entries and self.stats.errors == self.stats.calls
        if todo and len(failed) == len(todo) and len(todo) > 1 and never_answered:
            raise UserError(f"{self.role} model {self.spec}: every one of {len(todo)} requests failed after retries "
                            f"({next(iter(failed.values())).error})")
        return [self.cache.entries[k] if k in self.cache.entries else failed[k] for k in keys]


class ScoreCache:
    """JSONL lines {key, score}: a score is written as soon as it exists (a half-written last line is ignored)."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.entries: dict[str, float] = {}
        if self.path.is_file():
            for line in self.path.read_text(encoding="utf-8").splitlines():
                try:
                    entry = json.loads(line)
                    self.entries[entry["key"]] = float(entry["score"])
                except (ValueError, KeyError, TypeError):
                    continue

    def add(self, items: list[tuple[str, float]]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a", encoding="utf-8") as f:
            for key, score in items:
                self.entries[key] = score
                f.write(dumps_json({"key": key, "score": score}) + "\n")


class Selector:
    def __init__(self, spec: str, scorer, cache_path: Path):
        self.spec, self.scorer = spec, scorer
        self.model_id = spec if is_endpoint(spec) else f"{spec}@{_fingerprint(spec)}"
        self.cache = ScoreCache(cache_path)
        self.stats = Stats()

    def key(self, conversation: Messages) -> str:
        blob = json.dumps({"model": self.model_id, "messages": conversation}, sort_keys=True, ensure_ascii=False)
        return hashlib.sha256(blob.encode("utf-8")).hexdigest()

    def score(self, conversations: Sequence[Messages]) -> list[Optional[float]]:
        keys = [self.key(list(c)) for c in conversations]
        first: dict[str, int] = {}
        for row, key in enumerate(keys):
            first.setdefault(key, row)
        todo = [k for k in first if k not in self.cache.entries]
        self.stats.cached += len(keys) - len(todo)
        failed: set[str] = set()
        if todo:
            started = time.monotonic()
            try:
                scores = self.scorer.score([conversations[first[k]] for k in todo])
            except UserError:
                if not self.cache.entries:  # it never answered: unusable, stop with its one line
                    raise
                scores = [None] * len(todo)  # an endpoint that answered before: this step's rows are recorded
            finally:
                self.stats.seconds += time.monotonic() - started
            self.stats.calls += len(todo)
            errors = getattr(self.scorer, "errors", {}) or {}
            self.cache.add([(k, s) for k, s in zip(todo, scores) if s is not None])
            for i, (k, s) in enumerate(zip(todo, scores)):
                if s is None:
                    failed.add(k)
                    self.stats.errors += 1
                    self.stats.errors_seen.append(errors.get(i, "no score"))
        return [self.cache.entries.get(k) for k in keys]


def _fingerprint(path: str) -> str:
    from eval.engines import dir_fingerprint

    return dir_fingerprint(path)


class Models:
    """The four models of one run, each loaded once (a dir used in two roles shares one engine)."""

    ROLES = ("policy", "feedback_model", "edit_model")

    def __init__(self, cfg, cache_dir: Path, endpoints: Optional[dict[str, str]] = None):
        its = cfg.its
        endpoints = endpoints or {}
        missing = [r for r in (*self.ROLES, "select_model") if not (endpoints.get(r) or its[r])]
        if missing:
            raise UserError("its needs " + ", ".join(f"{r}=M" for r in missing) +
                            " (a checkpoint dir or an OpenAI-compatible endpoint)")
        engines: dict[str, object] = {}
        self.generators: dict[str, Generator] = {}
        for role in self.ROLES:
            spec = str(endpoints.get(role) or its[role])
            if spec not in engines:
                engines[spec] = self._engine(cfg, role, spec)
            self.generators[role] = Generator(role, spec, engines[spec], cache_dir / f"{role}.jsonl", its.concurrency)
        spec = str(endpoints.get("select_model") or its.select_model)
        from eval.reward_scorers import load_scorer

        scorer = load_scorer(spec, its.select_kind, dtype=cfg.model.dtype, batch_size=its.batch_size,
                             concurrency=its.concurrency, max_retries=its.max_retries,
                             timeout_s=its.request_timeout_s, api_key_env=its.api_key_env)
        self.selector = Selector(spec, scorer, cache_dir / "select_model.jsonl")

    @staticmethod
    def _engine(cfg, role: str, spec: str):
        its = cfg.its
        if is_endpoint(spec):
            return HTTPEngine(spec, None, its.concurrency, its.max_retries, its.request_timeout_s, its.api_key_env)
        if spec == str(cfg.model.path) and not Path(spec).is_dir():  # the configured model itself (builtin:tiny, a hub id)
            return HFEngine.load(cfg.model, None, batch_size=its.batch_size)
        if not Path(spec).is_dir():
            raise UserError(f"{role}={spec}: no such directory (a checkpoint dir or an http(s) endpoint)")
        return HFEngine.load(cfg.model, spec, batch_size=its.batch_size)

    def stats(self) -> dict:
        out = {role: {"model": g.spec, **g.stats.as_dict()} for role, g in self.generators.items()}
        out["select_model"] = {"model": self.selector.spec, "kind": self.selector.scorer.kind,
                               **self.selector.stats.as_dict()}
        return out
