"""Batch mode: the OpenAI Batch API (half the price, answers within 24 h) behind the same request cache.

    dvc exp run -S generate.backend=openai -S generate.mode=batch

1. Requests that are neither cached nor in a submitted batch are written to shard files of at most
   `batch_max_requests` lines and `batch_max_mb` each; each shard is uploaded and becomes one batch.
2. Each step is recorded in the stage's batch state log (append-only, fsynced, `persist: true`) before
   the next one. A shard is recorded before its batch is created, and the batch carries the shard id in
   its metadata, so a crash in between is found again on rerun by listing batches: nothing is submitted
   (or paid for) twice.
3. The run polls every `batch_poll_s` until every batch has ended, or until `batch_wait_s` has passed:
   then it stops with a message, and a rerun resumes polling the same batches.
4. Output and error files are downloaded and merged into the cache. Requests that an ended batch did not
   answer (errors, expiry) become failures, and the next run submits them again.
"""
from __future__ import annotations

import asyncio
import json
import tempfile
import time
import uuid
from pathlib import Path

from ..schema import AppendLog
from .backends import Fatal, Retryable, backoff, reply_from_body

ENDED = ("completed", "failed", "expired", "cancelled")


class BatchesInFlight(Fatal):
    pass


class _Shard:
    def __init__(self, directory: str):
        self.file = tempfile.NamedTemporaryFile("wb", suffix=".jsonl", dir=directory, delete=False)
        self.hashes: list[str] = []
        self.bytes = 0

    def add(self, h: str, line: bytes) -> None:
        self.file.write(line)
        self.hashes.append(h)
        self.bytes += len(line)


async def api_call(client, method, *args, **kwargs):
    """A Batch/Files API call, retried like a request; a call that keeps failing stops the run (a rerun resumes)."""
    cfg = client.cfg
    for attempt in range(1, cfg.max_attempts + 1):
        try:
            return await client.backend.call(method, *args, **kwargs)
        except Retryable as e:
            if attempt == cfg.max_attempts:
                raise Fatal(f"Batch API: {e} (after {attempt} attempts). Nothing is lost: rerun the stage to resume")
            await asyncio.sleep(backoff(cfg, attempt, e.retry_after))


async def run_batches(client, pending, sampling: dict, state: AppendLog, on_reply, on_failure) -> None:
    cfg, api = client.cfg, client.backend.client
    shards: dict[str, dict] = {}
    for row in state.rows():
        s = shards.setdefault(row["shard"], {"shard": row["shard"], "hashes": [], "batch_id": None, "ended": False})
        if row["event"] == "shard":
            s["hashes"] = row["hashes"]
        elif row["event"] == "batch":
            s["batch_id"] = row["batch_id"]
        elif row["event"] == "ended":
            s["ended"] = True
    open_shards = [s for s in shards.values() if not s["ended"]]
    await _adopt_orphans(client, open_shards, state)
    open_shards = [s for s in open_shards if s["batch_id"]]
    in_flight = {h for s in open_shards for h in s["hashes"]}

    # 1. new requests -> shards -> batches
    max_bytes = int(cfg.batch_max_mb * 1e6)
    with tempfile.TemporaryDirectory() as tmp:
        shard = _Shard(tmp)
        for h, messages in pending:
            if h in in_flight:
                continue
            body = {"model": client.model, "messages": messages, **sampling}
            line = (json.dumps({"custom_id": h, "method": "POST", "url": "/v1/chat/completions", "body": body},
                               ensure_ascii=False) + "\n").encode()
            if len(line) > max_bytes:
                raise Fatal(f"request {h} alone is larger than llm.batch_max_mb; lower max_image_side")
            if shard.hashes and (len(shard.hashes) >= cfg.batch_max_requests or shard.bytes + len(line) > max_bytes):
                open_shards.append(await _submit(client, shard, state))
                shard = _Shard(tmp)
            shard.add(h, line)
        if shard.hashes:
            open_shards.append(await _submit(client, shard, state))

    # 2. poll until every batch has ended, merging each as it ends
    deadline = time.monotonic() + cfg.batch_wait_s
    while open_shards:
        for s in list(open_shards):
            b = await api_call(client, api.batches.retrieve, s["batch_id"])
            if b.status in ENDED:
                await _merge(client, b, s, on_reply, on_failure)
                state.append({"event": "ended", "shard": s["shard"], "batch_id": b.id, "status": b.status})
                open_shards.remove(s)
            else:
                counts = b.request_counts
                done = f"{counts.completed}/{counts.total}" if counts else "?"
                print(f"[batch] {b.id}: {b.status}, {done} done")
        if not open_shards:
            break
        if time.monotonic() >= deadline:
            ids = ", ".join(s["batch_id"] for s in open_shards)
            raise BatchesInFlight(f"{len(open_shards)} batch(es) still running after batch_wait_s="
                                  f"{cfg.batch_wait_s}: {ids}. Nothing is lost: rerun the stage (dvc repro) "
                                  "to resume polling them")
        await asyncio.sleep(cfg.batch_poll_s)


async def _submit(client, shard: _Shard, state: AppendLog) -> dict:
    api = client.backend.client
    shard.file.close()
    sid = uuid.uuid4().hex  # never reused, even when the same requests are submitted again
    state.append({"event": "shard", "shard": sid, "hashes": shard.hashes})
    with open(shard.file.name, "rb") as f:
        uploaded = await api_call(client, api.files.create, file=(f"vital-{sid}.jsonl", f.read()), purpose="batch")
    batch = await api_call(client, api.batches.create, input_file_id=uploaded.id, endpoint="/v1/chat/completions",
                           completion_window="24h", metadata={"vital_shard": sid})
    state.append({"event": "batch", "shard": sid, "batch_id": batch.id, "input_file_id": uploaded.id})
    Path(shard.file.name).unlink()
    print(f"[batch] submitted {batch.id}: {len(shard.hashes)} requests, {shard.bytes / 1e6:.1f} MB")
    return {"shard": sid, "hashes": shard.hashes, "batch_id": batch.id, "ended": False}


async def _adopt_orphans(client, open_shards: list[dict], state: AppendLog) -> None:
    """Shards recorded without a batch id (a crash between upload and the record): find their batch."""
    orphans = {s["shard"]: s for s in open_shards if not s["batch_id"]}
    if not orphans:
        return
    page = await api_call(client, client.backend.client.batches.list, limit=100)
    async for b in page:
        sid = (b.metadata or {}).get("vital_shard")
        if sid in orphans and not orphans[sid]["batch_id"]:
            orphans[sid]["batch_id"] = b.id
            state.append({"event": "batch", "shard": sid, "batch_id": b.id, "input_file_id": b.input_file_id})
    for sid, s in orphans.items():
        if not s["batch_id"]:  # it was never created: its requests go into a new shard
            state.append({"event": "ended", "shard": sid, "batch_id": None, "status": "never created"})


async def _merge(client, b, shard: dict, on_reply, on_failure) -> None:
    answered = set()
    for file_id in (b.output_file_id, b.error_file_id):
        if not file_id:
            continue
        text = (await api_call(client, client.backend.client.files.content, file_id)).text
        for line in text.splitlines():
            if not line.strip():
                continue
            r = json.loads(line)
            h = r["custom_id"]
            answered.add(h)
            response = r.get("response") or {}
            body = response.get("body") or {}
            if response.get("status_code") == 200:
                try:
                    on_reply(h, reply_from_body(body), "batch")
                except Retryable as e:  # a malformed line: that request is submitted again next run
                    on_failure(h, f"batch {b.id}: {e}", 1)
            else:
                error = r.get("error") or body.get("error") or {}
                on_failure(h, f"batch {b.id}: HTTP {response.get('status_code')}: "
                              f"{error.get('message', error) if isinstance(error, dict) else error}", 1)
    why = f"batch {b.id} ended {b.status} without answering it"
    if b.status == "failed" and getattr(b, "errors", None) and b.errors.data:
        why += ": " + "; ".join(e.message or "" for e in b.errors.data)
    for h in shard["hashes"]:
        if h not in answered:
            on_failure(h, why, 1)
