"""The model client shared by every model-facing stage: request cache, concurrency, rate limits, retries,
failures, cost ledger.

    client = Client(ClientConfig.from_params(params["llm"], params["generate"]))
    rows, stats, failures = client.run(requests, AppendLog("data/cache/generate.jsonl"), "generate",
                                       sampling, make_row, desc="generate")

- `requests` (`Requests`) builds each request's messages only when it is sent: each carries its image as
  base64, and 60,000 of them do not fit in memory at once. A request that cannot be built (an unreadable
  image) fails its record only.
- Each request is hashed over (backend, model, messages, sampling); a local model's identity includes a
  fingerprint of its files. A hash already in the log is never sent again,
  and identical requests in one run are sent once. Each reply is appended to the log (flush + fsync) the
  moment it arrives, so `kill -9` at any point loses no finished reply, and a rerun sends only the rest.
- Online mode: `concurrency` requests in flight (asyncio), paced by `requests_per_minute` and
  `tokens_per_minute`, retried on 429/5xx/timeouts with exponential backoff and jitter (never sooner than
  the server's Retry-After) up to `max_attempts`; then the request becomes a `Failure` and the run goes on.
  If nothing succeeds (20 failures and no reply, or every request failed) the run stops with the first error.
- A reply the stage cannot use (`rejected`, replies.entry_rejected: unparseable or a refusal) is asked again
  once, under its own key: the same request hashed with `reask: 1` (on Ray, by the worker, at once). That
  answer is cached like any other (with `reask_of`, the first reply's hash), so a rerun or a `kill -9` never
  pays for it twice, and the row is made from it. What is rejected again is the stage's to record; `vital cache evict --rejected`
  removes such replies from the cache so that the next run asks them again.
- Batch mode (`mode: batch`, openai only): the OpenAI Batch API at half price; see batch.py.
- The ledger: requests, tokens and cost of this run (price table `prices`, USD per million tokens), and
  what every reply in the cache cost. It counts the usage the server reports for the replies kept: a reply
  that arrived unreadable and was retried, and providers' discounts for cached prompt tokens, are not in it.
"""
from __future__ import annotations

import asyncio
import re
import sys
import time
from collections import Counter
from dataclasses import dataclass, field, fields
from typing import Callable

from tqdm import tqdm

from ..schema import AppendLog, Failure, request_hash
from .backends import (Fatal, OpenAIBackend, RequestFailed, Retryable, TransformersBackend, VLLMBackend, backoff,
                       parts, redact)
from .offline import OfflineBackend
from .ray_engine import Engine, RayModel, run_requests


@dataclass
class ClientConfig:
    backend: str = "offline"  # offline | openai | transformers | vllm
    model: str = "gpt-4o"  # API model name, or a local path / hub name for transformers and vllm
    base_url: str | None = None  # any OpenAI-compatible server; the Azure resource endpoint for Azure
    api_version: str | None = None  # set for Azure OpenAI
    api_key_env: str = "OPENAI_API_KEY"  # the environment variable holding the key (AZURE_OPENAI_API_KEY for Azure)
    mode: str = "online"  # online | batch (OpenAI Batch API)
    concurrency: int = 16  # requests in flight
    requests_per_minute: float = 0  # client-side pacing; 0: none
    tokens_per_minute: float = 0  # estimated prompt + max_tokens per request; 0: none
    max_attempts: int = 6
    timeout_s: float = 120
    backoff_s: float = 1.0  # first retry waits about this long, doubling up to max_backoff_s
    max_backoff_s: float = 60
    batch_size: int = 4  # transformers, vllm: requests generated together
    device: str = "auto"  # transformers: auto | cpu | cuda[:n]
    vllm: dict = field(default_factory=dict)  # vllm: engine arguments for vllm.LLM (max_model_len, ...)
    prices: dict = field(default_factory=dict)  # model -> [input, output] USD per million tokens
    batch_discount: float = 0.5  # price factor of Batch API requests
    batch_max_requests: int = 50_000  # per shard (the Batch API limit)
    batch_max_mb: float = 190  # per shard file (the Batch API limit is 200 MB)
    batch_poll_s: float = 60
    batch_wait_s: float = 86_400  # then stop; a rerun resumes polling

    def __post_init__(self):
        if self.mode not in ("online", "batch"):
            raise Fatal(f"mode {self.mode!r}: choose online or batch")
        if self.max_attempts < 1 or self.concurrency < 1 or self.batch_size < 1:
            raise Fatal("max_attempts, concurrency and batch_size must be at least 1")

    @classmethod
    def from_params(cls, shared: dict, stage: dict) -> "ClientConfig":
        """The `llm` params section (every key must be known) with the stage's own endpoint keys on top."""
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(shared) - names)
        if unknown:
            raise Fatal(f"params.yaml llm: unknown key(s) {', '.join(unknown)}; known: {', '.join(sorted(names))}")
        for k in [*shared, *stage]:
            if re.search(r"(^|_)(api_key|key|secret|password|token)$", k):
                raise Fatal(f"params.yaml: {k!r} looks like a credential. Keys live in the environment only "
                            "(see api_key_env); remove it from params.yaml")
        return cls(**{**shared, **{k: v for k, v in stage.items() if k in names}})


class RateLimiter:
    """At most `per_minute` units a minute, spread evenly (each acquire books the next free slot)."""

    def __init__(self, per_minute: float):
        self.interval = 60.0 / per_minute if per_minute else 0.0
        self.next = 0.0

    async def acquire(self, units: float = 1.0) -> None:
        if not self.interval:
            return
        now = time.monotonic()
        start = max(self.next, now)
        self.next = start + units * self.interval
        if start > now:
            await asyncio.sleep(start - now)


def estimate_tokens(messages: list[dict], sampling: dict) -> int:
    """Rough prompt size (4 characters a token, 765 an image, as a high-detail 512 px tile) plus max_tokens."""
    chars = images = 0
    for m in messages:
        for p in parts(m["content"]):
            if p["type"] == "text":
                chars += len(p["text"])
            else:
                images += 1
    return chars // 4 + 765 * images + int(sampling.get("max_tokens", 0) or 0)


def make_backend(cfg, engine: Engine | None = None):
    """The backend named by `cfg.backend` (a ClientConfig); a local model on Ray when `engine` says ray."""
    if cfg.backend in ("transformers", "vllm") and engine and engine.ray:
        return RayModel(cfg.backend, cfg.model, cfg.device, cfg.vllm, engine)
    if cfg.backend == "offline":
        return OfflineBackend()
    if cfg.backend == "openai":
        return OpenAIBackend(cfg.model, cfg.base_url, cfg.api_version, cfg.timeout_s, cfg.api_key_env)
    if cfg.backend == "transformers":
        return TransformersBackend(cfg.model, cfg.batch_size, cfg.device)
    if cfg.backend == "vllm":
        return VLLMBackend(cfg.model, cfg.batch_size, cfg.vllm)
    raise Fatal(f"unknown backend {cfg.backend!r}; choose offline, openai, transformers or vllm")


class Requests:
    """(key, messages) pairs, built only when iterated: each request carries its image as base64."""

    def __init__(self, items: list[tuple[str, object]], build: Callable[[object], list[dict]]):
        self.items, self.build = items, build

    def __len__(self):
        return len(self.items)


class Client:
    def __init__(self, cfg: ClientConfig, backend=None, engine: Engine | None = None):
        self.cfg = cfg
        self.backend = backend or make_backend(cfg, engine)
        self.name, self.model = self.backend.name, self.backend.model
        self.limits = RateLimiter(cfg.requests_per_minute), RateLimiter(cfg.tokens_per_minute)
        if cfg.mode == "batch" and self.name != "openai":
            raise Fatal(f"mode: batch needs backend: openai (the Batch API), not {self.name!r}")

    # ------------------------------------------------------------ public

    def run(self, requests: Requests, log: AppendLog, task: str, sampling: dict,
            make_row: Callable[[str, dict], object], desc: str, batch_state: AppendLog | None = None,
            rejected: Callable[[dict], str | None] | None = None):
        """{key: make_row(key, cache entry)} for every request that has a reply, the run's stats, and failures.
        `rejected(entry)` (replies.entry_rejected): a reply it rejects is asked again once, and its row is made
        from that second answer (stats `reasked`)."""
        if self.cfg.mode == "batch" and batch_state is None:
            raise Fatal(f"{desc}: mode batch is not offered for this stage; use mode online")
        try:
            return asyncio.run(self._run(requests, log, task, sampling, make_row, desc, batch_state, rejected))
        finally:
            log.close()
            if batch_state:
                batch_state.close()

    def complete(self, messages: list[dict], task: str, sampling: dict | None = None) -> str | None:
        """One uncached request with the same retries (the evaluation judge); None if it failed."""
        async def one():
            try:
                reply, _ = await self._attempts(messages, task, sampling or {}, Counter())
                return reply.text if reply else None
            finally:
                await self.backend.aclose()
        return asyncio.run(one())

    # ------------------------------------------------------------ the run

    async def _run(self, requests, log, task, sampling, make_row, desc, batch_state, rejected=None):
        done = log.load("request_hash")
        rows, failures, entries = {}, [], {}  # entries: key -> the cache entry its row was made from
        stats = Counter(requests=0, cached=0, failed=0, retries=0, **({"reasked": 0} if rejected else {}),
                        prompt_tokens=0, completion_tokens=0)
        self._spent = 0.0
        identity = {"backend": self.name, "model": getattr(self.backend, "identity", self.model)}
        reask_of: dict[str, str] = {}  # re-ask hash -> the hash of the rejected first reply
        ahead: set[str] = set()  # re-asks a Ray worker answered with their first ask: computed, not cached

        def request_key(messages, reask: bool) -> str:
            # a re-ask is the same request under its own key (so its answer is cached too); a first ask's key
            # is what it always was, so existing caches stay valid
            extra = {"reask": 1} if reask else {}
            return request_hash({**identity, "messages": messages, "sampling": sampling, **extra})

        async def ask(items, reask: bool, label: str):
            waiting: dict[str, list[str]] = {}
            bar = tqdm(total=len(items), desc=label, unit="req", disable=None, dynamic_ncols=True)

            def keep(key, entry):
                rows[key], entries[key] = make_row(key, entry), entry
                bar.update()

            def pending():
                for key, item in items:
                    try:
                        messages = requests.build(item)
                    except (OSError, ValueError) as e:  # e.g. an image that cannot be read: this record only
                        rows.pop(key, None)
                        failures.append(Failure(request_hash="", keys=[key], task=task, attempts=0,
                                                error=f"could not build the request: {type(e).__name__}: {e}"))
                        stats["failed"] += 1
                        bar.update()
                        continue
                    h = request_key(messages, reask)
                    if reask:
                        reask_of[h] = entries[key]["request_hash"]
                    elif rejected and h in done and rejected(done[h]):  # a batch may bring its re-ask's answer
                        reask_of[request_key(messages, True)] = h
                    if h in done or h in waiting:  # paid for already, or asked for earlier in this run
                        if h in ahead:
                            ahead.discard(h)
                        else:
                            stats["cached"] += 1
                        if h in done:
                            keep(key, done[h])
                        else:
                            waiting[h].append(key)
                        continue
                    waiting[h] = [key]
                    yield h, messages

            def on_reply(h: str, reply, via: str, sync: bool = True, first: str = "") -> None:
                if h in done:  # a batch answered what another run already has
                    return
                if first:  # a re-ask answered with its first ask (`first`: that reply's hash)
                    reask_of[h] = first
                    ahead.add(h)
                entry = {"request_hash": h, "backend": self.name, "model": self.model, "task": task,
                         "reply": reply.text, "finish_reason": reply.finish_reason, "via": via,
                         "usage": {"prompt_tokens": reply.prompt_tokens, "completion_tokens": reply.completion_tokens},
                         **({"reask_of": reask_of[h]} if h in reask_of else {})}
                log.append(entry, sync=sync)
                done[h] = entry
                stats["requests"] += 1
                stats["prompt_tokens"] += reply.prompt_tokens
                stats["completion_tokens"] += reply.completion_tokens
                self._spent += self.cost(entry) or 0.0
                for key in waiting.pop(h, []):  # a batch may answer a request this run no longer asks for
                    keep(key, entry)
                bar.set_postfix(new=stats["requests"], retries=stats["retries"], failed=stats["failed"],
                                usd=f"{self._spent:.2f}", refresh=False)

            def on_failure(h: str, error: str, attempts: int) -> None:
                if h not in waiting:
                    return
                keys = waiting.pop(h)
                for key in keys:  # a re-ask that failed: no row (not the rejected reply); a rerun asks again
                    rows.pop(key, None)
                failures.append(Failure(request_hash=h, keys=keys, task=task, error=redact(error), attempts=attempts))
                stats["failed"] += 1
                bar.update(len(keys))
                if self.cfg.mode == "online" and stats["failed"] >= 20 and stats["requests"] == 0:  # nothing has worked: stop paying for retries
                    raise Fatal(f"the first {stats['failed']} requests all failed, none succeeded; first error: "
                                f"{failures[0].error}")

            try:
                if self.cfg.mode == "batch":
                    from .batch import run_batches
                    await run_batches(self, pending(), sampling, batch_state, on_reply, on_failure)
                elif isinstance(self.backend, RayModel):
                    # a worker asks a rejected reply again at once, so a pass of re-asks (and its model
                    # loads) is seldom needed
                    again = (task, rejected, lambda m: request_key(m, True)) if rejected and not reask else None
                    run_requests(self.backend, pending(), sampling, on_reply, on_failure, log.sync, again)
                else:
                    await self._online(pending(), task, sampling, on_reply, on_failure, stats, log.sync)
            finally:
                bar.close()

        try:
            await ask(requests.items, False, desc)
            if rejected:  # once: what is rejected again is the stage's to record
                again = [(key, item) for key, item in requests.items if key in entries and rejected(entries[key])]
                stats["reasked"] = len(again)
                if again:
                    await ask(again, True, f"{desc} (asked again)")
        except BaseExceptionGroup as group:  # task groups wrap what a worker raised; show that
            while isinstance(group, BaseExceptionGroup):
                group = group.exceptions[0]
            raise group from None
        finally:
            await self.backend.aclose()
        if failures and not rows:
            raise Fatal(f"all {len(failures)} requests failed; first error: {failures[0].error}")
        return rows, self.ledger(stats, done), failures

    async def _online(self, pending, task, sampling, on_reply, on_failure, stats, sync):
        """`n` workers send requests; one recorder writes what comes back. A worker sends its next request
        before the last reply is written, and the recorder fsyncs all replies waiting together (each reply
        is on disk before the run counts it), so bookkeeping never holds up the requests in flight."""
        n = max(self.cfg.concurrency, getattr(self.backend, "batch_size", 1))
        todo: asyncio.Queue = asyncio.Queue(n)
        finished: asyncio.Queue = asyncio.Queue()

        async def produce():
            for item in pending:
                await todo.put(item)
            for _ in range(n):
                await todo.put(None)

        async def work():
            while (item := await todo.get()) is not None:
                h, messages = item
                finished.put_nowait((h, *await self._attempts(messages, task, sampling, stats)))

        async def send():
            async with asyncio.TaskGroup() as workers:
                for _ in range(n):
                    workers.create_task(work())
            finished.put_nowait(None)

        async def record():
            while True:
                group = [await finished.get()]
                while not finished.empty():
                    group.append(finished.get_nowait())
                for item in group:
                    if item is None:
                        sync()
                        return
                    h, reply, error = item
                    if reply is not None:
                        on_reply(h, reply, "online", sync=False)
                    else:
                        on_failure(h, *error)
                sync()

        async with asyncio.TaskGroup() as group:  # a Fatal error anywhere cancels the rest
            group.create_task(produce())
            group.create_task(send())
            group.create_task(record())

    async def _attempts(self, messages, task, sampling, stats):
        """(reply, None) or (None, (error, attempts)), retrying what is worth retrying."""
        cfg = self.cfg
        requests_limit, tokens_limit = self.limits
        tokens = estimate_tokens(messages, sampling)
        for attempt in range(1, cfg.max_attempts + 1):
            await requests_limit.acquire()
            await tokens_limit.acquire(tokens)
            try:
                return await self.backend.acomplete(messages, task, sampling), None
            except Retryable as e:
                if attempt == cfg.max_attempts:
                    return None, (f"gave up after {attempt} attempts: {e}", attempt)
                stats["retries"] += 1
                await asyncio.sleep(backoff(cfg, attempt, e.retry_after))
            except RequestFailed as e:
                return None, (str(e), attempt)
        raise AssertionError("unreachable")

    # ------------------------------------------------------------ the ledger

    def cost(self, entry: dict) -> float | None:
        """USD for one cached reply; None when an API model has no price in `prices`."""
        if entry["backend"] != "openai":
            return 0.0  # nothing is billed
        price = self.cfg.prices.get(entry["model"])
        if price is None:
            return None
        usage = entry.get("usage") or {}
        usd = (usage.get("prompt_tokens", 0) * price[0] + usage.get("completion_tokens", 0) * price[1]) / 1e6
        return usd * (self.cfg.batch_discount if entry.get("via") == "batch" else 1.0)

    def ledger(self, stats: Counter, cache: dict) -> dict:
        priced = self.cost({"backend": self.name, "model": self.model}) is not None
        costs = [self.cost(e) for e in cache.values()]
        unpriced = sorted({e["model"] for e, c in zip(cache.values(), costs) if c is None})
        if unpriced or not priced:
            print(f"[ledger] no price for {', '.join(unpriced or [self.model])} in llm.prices: cost is reported as null",
                  file=sys.stderr)
        return {**dict(stats), "mode": self.cfg.mode, "cost_usd": round(self._spent, 4) if priced else None,
                "cache_replies": len(cache), "cache_cost_usd": None if unpriced else round(sum(costs), 4)}
