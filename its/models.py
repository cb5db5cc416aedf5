"""The loop's four models behind two small clients, each with an on-disk cache so a rerun resumes.

Generator (policy, feedback, edit): a checkpoint dir (eval.engines.HFEngine) or an OpenAI-compatible
endpoint (eval.engines.HTTPEngine). A request is (messages, seed): every sampled request carries its own
seed (its.loop.request_seed: run seed, prompt id, step, index), so N responses, F feedback texts and E
edits are independent draws, and a rerun asks with the same seeds; a greedy request's text does not
depend on its seed (it is computed once). Every client is safe to call from many threads at once (the
loop keeps its.prompts_in_flight prompts in flight):
    endpoint      up to its concurrency requests in flight (its.concurrency, or its.concurrency_by_role
                  for this role), each retried by the openai client with backoff; a request still failing
                  comes back as a Generation with its error and is recorded, not raised;
    local model   one worker thread per loaded model (roles on one dir share it) takes the queued
                  requests of every prompt in flight, batch_size at a time (requests with the same
                  sampling settings share a batch; each row samples with its own seed).
Scorer (select): eval.reward_scorers.load_scorer (seqcls or first_logit, local or /pooling endpoint); an
endpoint is asked one conversation per request (up to its concurrency in flight), a local model scores a
prompt's candidates in one call on its own worker thread. A score that is NaN or infinite is a failed
request (recorded with its error, never cached, never a candidate's score).
Both count calls, cached rows, errors, completion tokens and busy seconds (wall time with at least one
request of the model in flight), per role. A model that answered none of its first FAIL_FAST requests
stops the run with one line.
"""
from __future__ import annotations

import hashlib
import json
import math
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Optional, Sequence

from omegaconf import OmegaConf

from eval.engines import GenerationCache, Generation, HFEngine, HTTPEngine, Sampling, is_endpoint
from eval.target import Settings, model_settings
from hs3.io import UserError, dumps_json

Messages = list[dict]
FAIL_FAST = 8  # a model whose first this many requests all failed (and that has nothing cached) is unusable


class Stopped(Exception):
    """The run is stopping (another prompt failed, or an interrupt): no new request is sent."""


@dataclass
class Stats:
    calls: int = 0  # requests sent to the model (cached rows are not calls)
    cached: int = 0
    errors: int = 0
    completion_tokens: int = 0
    seconds: float = 0.0  # busy wall time: at least one request of this role in flight
    errors_seen: list = field(default_factory=list)

    def as_dict(self) -> dict:
        d = asdict(self)
        d["errors_seen"] = d["errors_seen"][:5]
        d["seconds"] = round(d["seconds"], 3)
        return d


class _Busy:
    """Counts a role's requests in flight and adds the wall time during which there was any to stats.seconds."""

    def __init__(self, stats: Stats, lock: threading.Lock):
        self.stats, self.lock = stats, lock
        self.in_flight = 0
        self.since = 0.0

    def __enter__(self):
        with self.lock:
            if self.in_flight == 0:
                self.since = time.monotonic()
            self.in_flight += 1

    def __exit__(self, *exc):
        with self.lock:
            self.in_flight -= 1
            if self.in_flight == 0:
                self.stats.seconds += time.monotonic() - self.since


class LocalWorker(threading.Thread):
    """The one thread that runs a local model: queued jobs, oldest first. A generation job joins the
    queued jobs with the same sampling settings (seeds aside) into one batch of up to batch_size rows; a
    scoring job (a prompt's candidates) runs alone, as one call."""

    def __init__(self, name: str, batch_size: int):
        super().__init__(name=f"its-{name}", daemon=True)
        self.batch_size = batch_size
        self.jobs: list[tuple] = []
        self.cond = threading.Condition()
        self.stopping = False
        self.start()

    def submit(self, kind: str, payload, future: Future) -> Future:
        with self.cond:
            if self.stopping:
                future.set_exception(Stopped())
                return future
            self.jobs.append((kind, payload, future))
            self.cond.notify()
        return future

    def stop(self) -> None:
        with self.cond:
            self.stopping = True
            for _, _, future in self.jobs:
                future.set_exception(Stopped())
            self.jobs.clear()
            self.cond.notify()

    def _take(self) -> list[tuple]:
        with self.cond:
            while not self.jobs and not self.stopping:
                self.cond.wait()
            if self.stopping:
                return []
            kind, payload, _ = self.jobs[0]
            if kind != "generate":
                return [self.jobs.pop(0)]
            engine, sampling = payload[0], replace(payload[2], seed=0)
            batch = [j for j in self.jobs if j[0] == "generate" and j[1][0] is engine
                     and replace(j[1][2], seed=0) == sampling][:self.batch_size]
            for job in batch:
                self.jobs.remove(job)
            return batch

    def run(self) -> None:
        while True:
            batch = self._take()
            if not batch:
                return
            try:
                if batch[0][0] == "generate":
                    engine, _, sampling, _ = batch[0][1]
                    results = engine.generate([job[1][1] for job in batch], sampling,
                                              seeds=[job[1][3] for job in batch])
                    for job, result in zip(batch, results):
                        job[2].set_result(result)
                else:
                    scorer, conversations = batch[0][1]
                    batch[0][2].set_result(scorer.score(conversations))
            except BaseException as exc:  # noqa: BLE001 - handed to the waiting prompt thread, which re-raises it
                for job in batch:
                    if not job[2].done():
                        job[2].set_exception(exc)


class Generator:
    def __init__(self, role: str, spec: str, engine, cache_path: Path, concurrency: int,
                 worker: Optional[LocalWorker] = None, stop: Optional[threading.Event] = None):
        self.role, self.spec, self.engine = role, spec, engine
        self.cache = GenerationCache(cache_path)
        self.concurrency = concurrency
        self.worker = worker
        self.stop = stop or threading.Event()
        self.pool = ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix=f"its-{role}") \
            if isinstance(engine, HTTPEngine) else None
        self.stats = Stats()
        self.lock = threading.Lock()
        self.busy = _Busy(self.stats, threading.Lock())
        self.in_flight: dict[str, Future] = {}
        self.answered = 0

    @staticmethod
    def request_key(model_id: str, messages: Messages, sampling: Sampling, seed: int) -> str:
        base = GenerationCache.key(model_id, list(messages), sampling)
        if sampling.temperature <= 0:  # greedy: every seed gives the same text
            return base
        return hashlib.sha256(f"{base}#seed={seed}".encode()).hexdigest()

    def _send(self, messages: Messages, sampling: Sampling, seed: int) -> Future:
        if isinstance(self.engine, HTTPEngine):
            return self.pool.submit(self.engine.complete_or_error, messages, replace(sampling, seed=seed))
        return self.worker.submit("generate", (self.engine, messages, sampling, seed), Future())

    def _arrived(self, key: str, generation: Generation) -> None:
        with self.lock:
            self.stats.calls += 1
            self.stats.completion_tokens += generation.completion_tokens
            if generation.error is None:
                self.answered += 1
                self.cache.add([(key, generation)])
            else:
                self.stats.errors += 1
                self.stats.errors_seen.append(generation.error)
            unusable = not self.answered and not self.cache.entries and self.stats.errors >= FAIL_FAST
        if unusable:
            raise UserError(f"{self.role} model {self.spec}: its first {self.stats.errors} requests all failed after "
                            f"retries ({generation.error})")

    def generate(self, requests: Sequence[tuple[Messages, int]], sampling: Sampling) -> list[Generation]:
        """One Generation per (messages, seed), cached ones read back; failures returned, not cached.
        Blocks until all are there; safe to call from several threads at once (a request another thread
        is asking right now is waited for, not sent twice)."""
        if self.stop.is_set():
            raise Stopped()
        keys = [self.request_key(self.engine.model_id, m, sampling, seed) for m, seed in requests]
        waiting: dict[str, Future] = {}
        mine: dict[str, tuple[Messages, int]] = {}
        with self.lock:
            for (messages, seed), key in zip(requests, keys):
                if key in self.cache.entries or key in waiting:
                    self.stats.cached += 1  # read back, or the same request twice in one call (asked once)
                elif key in self.in_flight:
                    waiting[key] = self.in_flight[key]
                else:
                    waiting[key] = self.in_flight[key] = Future()
                    mine[key] = (messages, seed)
        try:
            with self.busy:
                sent = {key: self._send(messages, sampling, seed) for key, (messages, seed) in mine.items()}
                for key, future in sent.items():
                    generation = future.result()  # a local model's error or Stopped is raised here
                    self._arrived(key, generation)
                    waiting[key].set_result(generation)
            results = {key: future.result() for key, future in waiting.items()}
        except BaseException as exc:
            for key in mine:
                if not waiting[key].done():  # another prompt waiting for it must not wait forever
                    waiting[key].set_exception(exc if isinstance(exc, Exception) else Stopped())
            raise
        finally:
            with self.lock:
                for key in mine:
                    self.in_flight.pop(key, None)
        return [self.cache.entries[k] if k in self.cache.entries else results[k] for k in keys]

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=False, cancel_futures=True)


class ScoreCache:
    """JSONL lines {key, score}: a score is written as soon as it exists (a half-written last line, or a
    score that is not a finite number, is ignored)."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.entries: dict[str, float] = {}
        if self.path.is_file():
            for line in self.path.read_text(encoding="utf-8", errors="replace").splitlines():
                try:
                    entry = json.loads(line)
                    score = float(entry["score"])
                except (ValueError, KeyError, TypeError):
                    continue
                if math.isfinite(score) and isinstance(entry.get("key"), str):
                    self.entries[entry["key"]] = score

    def add(self, items: list[tuple[str, float]]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a", encoding="utf-8") as f:
            for key, score in items:
                self.entries[key] = score
                f.write(dumps_json({"key": key, "score": score}) + "\n")


def check_score(value) -> tuple[Optional[float], Optional[str]]:
    """(score, None) for a finite number; (None, why) for anything else (NaN, inf, None)."""
    if value is None:
        return None, "no score"
    try:
        score = float(value)
    except (TypeError, ValueError):
        return None, f"not a number: {value!r}"[:200]
    if not math.isfinite(score):
        return None, f"non-finite score {score}"
    return score, None


class Selector:
    def __init__(self, spec: str, scorer, cache_path: Path, concurrency: int = 16,
                 worker: Optional[LocalWorker] = None, stop: Optional[threading.Event] = None):
        self.spec, self.scorer = spec, scorer
        self.model_id = spec if is_endpoint(spec) else f"{spec}@{_fingerprint(spec)}"
        self.cache = ScoreCache(cache_path)
        self.stats = Stats()
        self.lock = threading.Lock()
        self.busy = _Busy(self.stats, threading.Lock())
        self.endpoint = is_endpoint(spec)
        self.pool = ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="its-select") if self.endpoint else None
        self.worker = worker
        self.stop = stop or threading.Event()
        self.answered = 0

    def key(self, conversation: Messages) -> str:
        blob = json.dumps({"model": self.model_id, "messages": conversation}, sort_keys=True, ensure_ascii=False)
        return hashlib.sha256(blob.encode("utf-8")).hexdigest()

    def _score_one(self, conversation: Messages) -> tuple[Optional[float], Optional[str]]:
        import openai

        try:
            return check_score(self.scorer.score_one(conversation))
        except (openai.APIError, KeyError, IndexError, TypeError, ValueError) as exc:
            return None, f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:300]

    def _ask(self, conversations: list[Messages]) -> list[tuple[Optional[float], Optional[str]]]:
        if self.endpoint:
            return [f.result() for f in [self.pool.submit(self._score_one, c) for c in conversations]]
        scores = self.worker.submit("score", (self.scorer, conversations), Future()).result()
        return [check_score(s) for s in scores]

    def score(self, conversations: Sequence[Messages]) -> list[Optional[float]]:
        """A score per conversation (None: the request failed, recorded in stats); cached ones read back."""
        if self.stop.is_set():
            raise Stopped()
        keys = [self.key(list(c)) for c in conversations]
        first: dict[str, int] = {}
        for row, key in enumerate(keys):
            first.setdefault(key, row)
        with self.lock:
            todo = [k for k in first if k not in self.cache.entries]
            self.stats.cached += len(keys) - len(todo)
        if todo:
            with self.busy:
                results = self._ask([list(conversations[first[k]]) for k in todo])
            with self.lock:
                self.stats.calls += len(todo)
                for key, (score, error) in zip(todo, results):
                    if error is None:
                        self.answered += 1
                        self.cache.add([(key, score)])
                    else:
                        self.stats.errors += 1
                        self.stats.errors_seen.append(error)
                unusable = not self.answered and not self.cache.entries and self.stats.errors >= FAIL_FAST
            if unusable:
                raise UserError(f"select model {self.spec}: its first {self.stats.errors} requests all failed "
                                f"({self.stats.errors_seen[-1]})")
        return [self.cache.entries.get(k) for k in keys]

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=False, cancel_futures=True)


def _preset(cfg) -> Settings:
    """The composed model preset: what a local model without a record or config.json dtype is loaded at."""
    return Settings(str(cfg.model.dtype), int(cfg.train.seq_len), f"conf/model ({cfg.model.name})",
                    f"conf/model ({cfg.model.name})")


def _fingerprint(path: str) -> str:
    from eval.engines import dir_fingerprint

    return dir_fingerprint(path)


class Models:
    """The four models of one run, each loaded once (a dir used in two roles shares one engine and one
    worker thread)."""

    ROLES = ("policy", "feedback_model", "edit_model")

    def __init__(self, cfg, cache_dir: Path, endpoints: Optional[dict[str, str]] = None):
        its = cfg.its
        endpoints = endpoints or {}
        missing = [r for r in (*self.ROLES, "select_model") if not (endpoints.get(r) or its[r])]
        if missing:
            raise UserError("its needs " + ", ".join(f"{r}=M" for r in missing) +
                            " (a checkpoint dir or an OpenAI-compatible endpoint)")
        self.stop = threading.Event()
        engines: dict[str, object] = {}
        self.workers: dict[str, LocalWorker] = {}
        self.generators: dict[str, Generator] = {}
        for role in self.ROLES:
            spec = str(endpoints.get(role) or its[role])
            if spec not in engines:
                engines[spec] = self._engine(cfg, role, spec)
                if not isinstance(engines[spec], HTTPEngine):
                    self.workers[spec] = LocalWorker(Path(spec).name or role, its.batch_size)
            self.generators[role] = Generator(role, spec, engines[spec], cache_dir / f"{role}.jsonl",
                                              concurrency(cfg, role), self.workers.get(spec), self.stop)
        spec = str(endpoints.get("select_model") or its.select_model)
        from eval.reward_scorers import load_scorer

        local = not is_endpoint(spec) and Path(spec).is_dir()
        settings = model_settings(spec, preset=_preset(cfg)) if local else None
        scorer = load_scorer(spec, its.select_kind, dtype=settings.dtype if settings else cfg.model.dtype,
                             max_length=settings.seq_len if settings else None, batch_size=its.batch_size,
                             concurrency=concurrency(cfg, "select_model"), max_retries=its.max_retries,
                             timeout_s=its.request_timeout_s, api_key_env=its.api_key_env)
        if not is_endpoint(spec):
            self.workers["select_model"] = LocalWorker("select", its.batch_size)
        self.selector = Selector(spec, scorer, cache_dir / "select_model.jsonl", concurrency(cfg, "select_model"),
                                 self.workers.get("select_model"), self.stop)

    @staticmethod
    def _engine(cfg, role: str, spec: str):
        its = cfg.its
        if is_endpoint(spec):
            return HTTPEngine(spec, None, concurrency(cfg, role), its.max_retries, its.request_timeout_s, its.api_key_env)
        if spec == str(cfg.model.path) and not Path(spec).is_dir():  # the configured model itself (builtin:tiny, a hub id)
            return HFEngine.load(cfg.model, None, batch_size=its.batch_size)
        if not Path(spec).is_dir():
            raise UserError(f"{role}={spec}: no such directory (a checkpoint dir or an http(s) endpoint)")
        # a checkpoint at its own dtype (its hs3_training.json, else config.json), never the preset's
        model_cfg = OmegaConf.merge(cfg.model, {"dtype": model_settings(spec, preset=_preset(cfg)).dtype})
        return HFEngine.load(model_cfg, spec, batch_size=its.batch_size)

    def halt(self) -> None:
        """No new request from now on: waiting local jobs fail with Stopped, queued endpoint requests are dropped."""
        self.stop.set()
        for worker in self.workers.values():
            worker.stop()
        for client in (*self.generators.values(), self.selector):
            client.close()

    def close(self) -> None:
        for worker in self.workers.values():
            worker.stop()
        for client in (*self.generators.values(), self.selector):
            client.close()

    def stats(self) -> dict:
        out = {role: {"model": g.spec, "concurrency": g.concurrency if g.pool else None, **g.stats.as_dict()}
               for role, g in self.generators.items()}
        out["select_model"] = {"model": self.selector.spec, "kind": self.selector.scorer.kind,
                               **self.selector.stats.as_dict()}
        return out


def concurrency(cfg, role: str) -> int:
    """Requests in flight to this role's endpoint: its.concurrency_by_role[role], else its.concurrency."""
    by_role = cfg.its.get("concurrency_by_role") or {}
    return int(by_role.get(role, cfg.its.concurrency))
