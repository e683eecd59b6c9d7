"""Throughput of the model client against a local server with a fixed latency, and its bookkeeping cost.

    python benchmarks/generate_throughput.py               # 2,000 requests, 100 ms latency, 60,000 records
    python benchmarks/generate_throughput.py --requests 400 --records 10000    # quicker

Prints, measured side by side in one run:
- requests/s of the client (openai backend, request cache, fsync per reply) at concurrency 1, 8 and 64, as a
  ratio to the ideal concurrency / latency, and to a sequential one-request-at-a-time loop (the paper's
  released code: the SDK called in a loop, the whole output JSON rewritten after every record);
- the same client with a bare aiohttp backend instead of the SDK at concurrency 64: the floor that the
  client's own machinery allows, to show what the SDK's per-request CPU costs on this machine;
- bookkeeping per record at `--records` records (hash, cache lookup, append + fsync, row), with a backend
  that answers instantly, on a first run and on a rerun that finds everything cached.
Goals (issue #3): >= 0.9 of ideal and >= 30x sequential at concurrency 64; <= 1 ms a record.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import openai  # noqa: F401  (imported before any timing)

from vital.llm.backends import Reply
from vital.llm.client import Client, ClientConfig, Requests
from vital.schema import AppendLog


def messages(i: int) -> list[dict]:
    return [{"role": "system", "content": "You write a multi-turn conversation about a biomedical figure."},
            {"role": "user", "content": f"Caption: Figure {i}: axial CT of the chest showing a nodule.\n"
                                        "In-text mentions: (none)"}]


class BareAiohttp:
    """A chat-completions backend with no SDK: aiohttp and json only (reference row, not project code)."""
    name, model = "bare", "bench"

    def __init__(self, base_url: str):
        self.url, self.session = base_url + "/chat/completions", None

    async def acomplete(self, messages, task, sampling):
        import aiohttp
        if self.session is None:
            self.session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0))
        async with self.session.post(self.url, json={"model": self.model, "messages": messages}) as r:
            body = await r.json()
        return Reply(body["choices"][0]["message"]["content"])

    async def aclose(self):
        if self.session:
            await self.session.close()
            self.session = None


def timed_client(base_url: str, n: int, concurrency: int, tmp: Path, backend=None) -> float:
    client = Client(ClientConfig(backend="openai", model="bench", base_url=base_url, concurrency=concurrency),
                    backend)
    log = AppendLog(tmp / f"cache-{concurrency}-{client.name}.jsonl")
    t = time.perf_counter()
    rows, stats, failures = client.run(Requests([(str(i), i) for i in range(n)], messages), log, "generate", {},
                                       lambda k, e: None, f"concurrency {concurrency}")
    elapsed = time.perf_counter() - t
    assert stats["requests"] == n and not failures, (stats, failures[:3])
    return n / elapsed


def timed_sequential(base_url: str, n: int, tmp: Path) -> float:
    from openai import OpenAI

    client = OpenAI(base_url=base_url, api_key="unused", max_retries=0)
    out, path = [], tmp / "sequential.json"
    t = time.perf_counter()
    for i in range(n):
        r = client.chat.completions.create(model="bench", messages=messages(i))
        out.append({"id": i, "reply": r.choices[0].message.content})
        path.write_text(json.dumps(out))  # the released code rewrites its output after every record
    return n / (time.perf_counter() - t)


class Instant:
    name, model = "bench", "instant"

    async def acomplete(self, messages, task, sampling):
        return Reply("User: What is shown?\nAssistant: An axial CT.", 40, 12)

    async def aclose(self):
        pass


def bookkeeping(n: int, tmp: Path) -> tuple[float, float]:
    """ms per record on a first run and on a rerun, with an instant backend."""
    reqs = Requests([(str(i), i) for i in range(n)], messages)
    times = []
    for _ in range(2):
        client = Client(ClientConfig(concurrency=64), Instant())
        t = time.perf_counter()
        client.run(reqs, AppendLog(tmp / "bookkeeping.jsonl"), "generate", {}, lambda k, e: e["reply"], "bookkeeping")
        times.append((time.perf_counter() - t) / n * 1000)
    return times[0], times[1]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--requests", type=int, default=2000)
    ap.add_argument("--latency", type=float, default=0.1)
    ap.add_argument("--records", type=int, default=60_000)
    args = ap.parse_args()
    os.environ.setdefault("TQDM_DISABLE", "1")
    server = subprocess.Popen([sys.executable, "-m", "vital.llm.fakeapi", "--port", "0", "--latency", str(args.latency)],
                              stdout=subprocess.PIPE, text=True)
    base_url = server.stdout.readline().strip()
    try:
        with tempfile.TemporaryDirectory() as d:
            tmp = Path(d)
            print(f"local server {base_url}, latency {args.latency * 1000:.0f} ms, {args.requests} requests each")
            seq = timed_sequential(base_url, args.requests, tmp)
            print(f"sequential loop        {seq:8.1f} req/s")
            for c in (1, 8, 64):
                rate = timed_client(base_url, args.requests, c, tmp)
                ideal = c / args.latency
                print(f"client concurrency {c:3d} {rate:8.1f} req/s  {rate / ideal:5.2f} of ideal ({ideal:.0f}/s)  "
                      f"{rate / seq:6.1f}x sequential")
            rate = timed_client(base_url, args.requests, 64, tmp, BareAiohttp(base_url))
            print(f"bare aiohttp, c=64     {rate:8.1f} req/s  {rate / (64 / args.latency):5.2f} of ideal (reference: no SDK)")
            first, rerun = bookkeeping(args.records, tmp)
            print(f"bookkeeping at {args.records} records: {first:.3f} ms/record first run, {rerun:.3f} ms/record rerun")
    finally:
        server.terminate()


if __name__ == "__main__":
    main()
