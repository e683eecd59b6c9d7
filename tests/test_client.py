"""The model client against a local OpenAI-compatible server (vital.fakeapi on 127.0.0.1): concurrency,
faults, retries, rate limits, kill -9, batch mode, secrets; and the transformers backend on a tiny LLaVA."""
import copy
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections import defaultdict
from dataclasses import asdict

import pytest

from vital.backends import Fatal
from vital.batch import BatchesInFlight
from vital.client import Client, ClientConfig
from vital.fakeapi import FAULTS, FakeOpenAI
from vital.generate import GenerateConfig, generate
from vital.images import ImageStore
from vital.offline import OfflineBackend
from vital.rate import rate
from vital.schema import AppendLog, CorpusRecord, read_jsonl

KEY = f"sk-test-{uuid.uuid4().hex}"  # made at run time: no tracked file holds anything like a key
PRICES = {"gpt-4o": [2.5, 10.0]}


@pytest.fixture
def key(monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    return KEY


def openai_client(fake, **kw):
    return Client(ClientConfig(backend="openai", model="gpt-4o", base_url=fake.base_url, prices=PRICES,
                               backoff_s=0.01, **kw))


def run_generate(client, records, image_dir, cache, batch_state=None, **cfg):
    return generate(records, image_dir, [], client, AppendLog(cache), GenerateConfig(**cfg), batch_state)


def test_happy_path_sends_images_prices_tokens_and_never_pays_twice(sample, tmp_path, key):
    records, image_dir = sample
    records = copy.deepcopy(records)
    with FakeOpenAI(latency=0.02, api_key=key) as fake:
        convs, rejected, failures, stats = run_generate(openai_client(fake, concurrency=8), records, image_dir,
                                                        tmp_path / "c.jsonl", max_image_side=128)
        assert len(convs) == len(records) and not rejected and not failures
        assert all(c.backend == "openai" and c.model == "gpt-4o" for c in convs)
        assert fake.calls["POST /v1/chat/completions"] == len(records)
        cached = [json.loads(x) for x in (tmp_path / "c.jsonl").read_text().splitlines()]
        tokens = sum(c["usage"]["prompt_tokens"] for c in cached), sum(c["usage"]["completion_tokens"] for c in cached)
        assert (stats["prompt_tokens"], stats["completion_tokens"]) == tokens and tokens[0] > 0
        assert stats["cost_usd"] == round((tokens[0] * 2.5 + tokens[1] * 10.0) / 1e6, 4) == stats["cache_cost_usd"]

        again = run_generate(openai_client(fake), records, image_dir, tmp_path / "c.jsonl", max_image_side=128)
        assert fake.calls["POST /v1/chat/completions"] == len(records)  # the rerun sent nothing
        assert again[3]["requests"] == 0 and again[3]["cached"] == len(records) and again[3]["cost_usd"] == 0
        records[3].caption += " A second, smaller lesion is also seen."
        run_generate(openai_client(fake), records, image_dir, tmp_path / "c.jsonl", max_image_side=128)
        assert fake.calls["POST /v1/chat/completions"] == len(records) + 1  # only the changed figure
        run_generate(openai_client(fake), records, image_dir, tmp_path / "c.jsonl", max_image_side=96)
        assert fake.calls["POST /v1/chat/completions"] == 2 * len(records) + 1  # a changed param: all again


def test_image_parts_reach_the_server_as_data_urls(sample, tmp_path, key):
    records, image_dir = sample
    seen = []
    with FakeOpenAI() as fake:
        original = fake.chat
        fake.chat = lambda body, fault: seen.append(body) or original(body, fault)
        run_generate(openai_client(fake), records[:2], image_dir, tmp_path / "c.jsonl", json_mode=True)
    parts = seen[0]["messages"][-1]["content"]
    assert [p["type"] for p in parts] == ["text", "image_url"]
    assert parts[1]["image_url"]["url"].startswith("data:image/png;base64,")
    assert seen[0]["response_format"] == {"type": "json_object"} and seen[0]["max_tokens"] == 1024


def test_faults_are_retried_or_recorded_and_a_rerun_finishes_the_rest(sample, tmp_path, key):
    records, image_dir = sample
    with FakeOpenAI(fault_rate=0.4, slow_s=1.0, retry_after_ms=20, seed=4) as fake:
        client = openai_client(fake, concurrency=8, timeout_s=0.5, max_attempts=2)
        convs, rejected, failures, stats = run_generate(client, records, image_dir, tmp_path / "c.jsonl")
        assert {r["fault"] for r in fake.log} == {None, *FAULTS}  # 429, 500, slow, garbage, truncated, nonsense
        assert stats["retries"] >= 5 and rejected  # the nonsense reply is rejected, not retried
        ids = [c.id for c in convs] + [r["id"] for r in rejected] + [k for f in failures for k in f.keys]
        assert sorted(ids) == sorted(r.id for r in records)  # every figure is a conversation, a rejection or a failure
        for f in failures:
            assert f.attempts == 2 and f.error.startswith("gave up after 2 attempts")
        for r in rejected:  # `nonsense` replies parse to nothing: rejected with the reason, paid for, cached
            assert r["reason"] == "unparseable reply (no User/Assistant rounds)"
        assert stats["rejected_by_reason"].get("unparseable", 0) == len(rejected)

        fake.fault_rate = 0
        before = fake.calls["POST /v1/chat/completions"]
        convs2, rejected2, failures2, stats2 = run_generate(openai_client(fake), records, image_dir, tmp_path / "c.jsonl")
        assert not failures2 and stats2["requests"] == len(failures)  # only the failures are sent again
        assert fake.calls["POST /v1/chat/completions"] - before == len(failures)
        assert len(convs2) + len(rejected2) == len(records)


def test_retry_after_is_honoured_and_client_side_limits_pace_requests(sample, tmp_path, key):
    records, image_dir = sample
    with FakeOpenAI(fault_rate=0.5, faults=("429",), retry_after_ms=300) as fake:
        run_generate(openai_client(fake, concurrency=4, max_attempts=10), records[:6], image_dir, tmp_path / "a.jsonl")
        by_key = defaultdict(list)
        for r in fake.log:
            by_key[r["key"]].append(r)
        gaps = [b["t"] - a["t"] for rows in by_key.values() for a, b in zip(rows, rows[1:]) if a["fault"] == "429"]
        assert gaps and min(gaps) >= 0.29  # backoff alone would be ~0.01 s

    class Stamping(OfflineBackend):  # when each request leaves the client
        sent = []

        async def acomplete(self, messages, task, sampling):
            self.sent.append(time.monotonic())
            return await super().acomplete(messages, task, sampling)

    for limits, spacing in [({"requests_per_minute": 600}, 0.1), ({"tokens_per_minute": 6_000_000}, None)]:
        backend = Stamping()
        backend.sent = []
        client = Client(ClientConfig(concurrency=8, **limits), backend)
        run_generate(client, records[:6], image_dir, tmp_path / f"{spacing}.jsonl", max_tokens=2000)
        since_first = [t - backend.sent[0] for t in backend.sent]
        if spacing is None:  # each request is estimated at >= 2,000 tokens (max_tokens) + its image: >= 27 ms apart
            spacing = (2000 + 765) * 60 / 6_000_000
        # the k-th request never leaves before k slots have passed (one late request lets the next catch up)
        assert all(t >= k * spacing * 0.98 for k, t in enumerate(since_first)), (limits, since_first)


def test_a_refused_key_stops_the_run_clearly_and_is_never_written(sample, tmp_path, monkeypatch):
    records, image_dir = sample
    wrong = f"sk-wrong-{uuid.uuid4().hex}-SECRET-zqzq"
    monkeypatch.setenv("OPENAI_API_KEY", wrong)
    with FakeOpenAI(api_key=KEY) as fake:
        with pytest.raises(Fatal) as e:
            run_generate(openai_client(fake), records[:3], image_dir, tmp_path / "c.jsonl")
    message = str(e.value)
    assert fake.base_url in message and "refused the API key (HTTP 401)" in message and "OPENAI_API_KEY" in message
    assert "SECRET" not in message and "zqzq" not in message  # the server echoed the key's last characters
    assert not (tmp_path / "c.jsonl").exists() or "SECRET" not in (tmp_path / "c.jsonl").read_text()


DRIVER = """
import sys
from pathlib import Path
from vital.client import Client, ClientConfig
from vital.generate import GenerateConfig, generate
from vital.offline import OfflineBackend
from vital.schema import AppendLog, CorpusRecord, read_jsonl
records = [CorpusRecord(**r) for r in read_jsonl(sys.argv[1])]
client = Client(ClientConfig(backend="openai", model="gpt-4o", base_url=sys.argv[3], concurrency=4))
generate(records, Path(sys.argv[2]), [], client, AppendLog(sys.argv[4]), GenerateConfig())
"""


def test_kill_9_mid_run_loses_no_finished_reply_and_duplicates_nothing(sample, tmp_path, key):
    records, image_dir = sample
    many = []
    for k in range(6):  # 84 distinct figures
        for r in records:
            many.append(CorpusRecord(**{**asdict(r), "id": f"{r.id}-{k}", "caption": f"{r.caption} (Panel {k}.)"}))
    (tmp_path / "records.jsonl").write_text("".join(json.dumps(asdict(r)) + "\n" for r in many))
    cache = tmp_path / "cache.jsonl"
    with FakeOpenAI(latency=0.05) as fake:
        proc = subprocess.Popen([sys.executable, "-c", DRIVER, str(tmp_path / "records.jsonl"), str(image_dir),
                                 fake.base_url, str(cache)], env=dict(os.environ), stderr=subprocess.DEVNULL)
        deadline = time.time() + 120
        while time.time() < deadline and (not cache.exists() or cache.read_text().count("\n") < 20):
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        before = cache.read_text()
        finished = {json.loads(x)["request_hash"] for x in before.splitlines() if x.endswith("}")}
        assert 20 <= len(finished) < len(many), "the run should be killed part-way"

        sent = fake.calls["POST /v1/chat/completions"]
        convs, rejected, failures, stats = run_generate(openai_client(fake, concurrency=8), many, image_dir, cache)
        assert len(convs) == len(many) and not failures
        assert stats["cached"] == len(finished) and stats["requests"] == len(many) - len(finished)
        assert fake.calls["POST /v1/chat/completions"] - sent == len(many) - len(finished)
        rows = [json.loads(x) for x in cache.read_text().splitlines() if x.strip().endswith("}")]
        hashes = [r["request_hash"] for r in rows]
        assert len(hashes) == len(set(hashes)) == len(many)  # no duplicates, nothing lost
        assert cache.read_text().startswith(before.rsplit("\n", 1)[0])  # what was there is still there


def test_batch_mode_shards_resumes_polling_and_merges_into_the_same_cache(sample, tmp_path, key):
    records, image_dir = sample
    cache, state = tmp_path / "c.jsonl", tmp_path / "batches.jsonl"
    with FakeOpenAI(batch_polls=3, fault_rate=0.25, faults=("500",), seed=3) as fake:
        def batch_client(wait):
            return openai_client(fake, mode="batch", batch_max_requests=5, batch_poll_s=0.01, batch_wait_s=wait)

        with pytest.raises(BatchesInFlight, match="rerun the stage"):
            run_generate(batch_client(0), records, image_dir, cache, AppendLog(state))
        assert fake.calls["POST /v1/batches"] == 3  # 14 requests, at most 5 a shard
        assert [len(b["hashes"]) for b in read_jsonl(state) if b["event"] == "shard"] == [5, 5, 4]

        convs, rejected, failures, stats = run_generate(batch_client(30), records, image_dir, cache, AppendLog(state))
        assert fake.calls["POST /v1/batches"] == 3  # resumed polling the same batches, created none
        assert fake.calls["POST /v1/chat/completions"] == 0
        assert failures and all("HTTP 500" in f.error for f in failures)  # lines of the error file
        assert len(convs) + len(failures) == len(records) and stats["mode"] == "batch"
        assert stats["cost_usd"] == round((stats["prompt_tokens"] * 2.5 + stats["completion_tokens"] * 10) / 2e6, 4)

        fake.fault_rate = 0
        missing = len(failures)
        convs, _, failures, stats = run_generate(batch_client(30), records, image_dir, cache, AppendLog(state))
        assert not failures and len(convs) == len(records)
        assert fake.calls["POST /v1/batches"] == 4 and stats["requests"] == missing  # one new shard: the failures
        rerun = run_generate(batch_client(30), records, image_dir, cache, AppendLog(state))[3]
        assert rerun["requests"] == 0 and fake.calls["POST /v1/batches"] == 4  # nothing left to submit

        # a crash after the shard was recorded but before its batch id was: found again by listing batches
        records[0].caption += " Also a small effusion."
        with pytest.raises(BatchesInFlight):
            run_generate(batch_client(0), records[:1], image_dir, cache, AppendLog(state))
        lines = state.read_text().splitlines()
        assert json.loads(lines[-1])["event"] == "batch"
        state.write_text("\n".join(lines[:-1]) + "\n")  # lose the batch record
        convs, _, _, stats = run_generate(batch_client(30), records[:1], image_dir, cache, AppendLog(state))
        assert fake.calls["POST /v1/batches"] == 5 and len(convs) == 1 and stats["requests"] == 1


def test_transformers_backend_generates_in_batches_with_a_tiny_llava(sample, tmp_path):
    from vital.tune import build_tiny_llava

    records, image_dir = sample
    model, processor = build_tiny_llava()
    model.save_pretrained(tmp_path / "tiny")
    processor.save_pretrained(tmp_path / "tiny")
    client = Client(ClientConfig(backend="transformers", model=str(tmp_path / "tiny"), batch_size=3, concurrency=1))
    convs, rejected, failures, stats = run_generate(client, records[:5], image_dir, tmp_path / "c.jsonl", max_tokens=12)
    assert client.backend.batch_sizes == [3, 2] and stats["requests"] == 5 and not failures
    # random weights write word salad: rejected with a reason, the reply kept in the cache
    assert len(rejected) == 5 and stats["rejected_by_reason"] == {"unparseable": 5}
    assert all(row["backend"] == "transformers" and row["reply"] for row in read_jsonl(tmp_path / "c.jsonl"))
    assert stats["completion_tokens"] > 0 and stats["cost_usd"] == 0.0

    good, *_ = generate(records[:2], image_dir, [], Client(ClientConfig(), OfflineBackend()), AppendLog(tmp_path / "g.jsonl"),
                        GenerateConfig())
    ratings, _, failures, stats = rate(good, {r.id: r for r in records}, image_dir, client, AppendLog(tmp_path / "r.jsonl"),
                                    {"max_tokens": 4})
    assert ratings and all(r.score is None or 0 <= r.score <= 10 for r in ratings)
    assert stats["unparsed"] == sum(r.score is None for r in ratings)


def test_an_unreadable_image_fails_its_record_only(sample, tmp_path, key):
    records, image_dir = sample
    broken = tmp_path / "images"
    broken.mkdir()
    for r in records[:3]:
        (broken / r.image).write_bytes(ImageStore(image_dir).read(r.image))  # a plain folder
    (broken / records[1].image).unlink()
    with FakeOpenAI() as fake:
        convs, _, failures, _ = run_generate(openai_client(fake), records[:3], broken, tmp_path / "c.jsonl")
    assert [c.id for c in convs] == [records[0].id, records[2].id]
    assert failures[0].keys == [records[1].id] and "could not build the request" in failures[0].error


def test_an_unreachable_server_stops_the_stage_with_the_reason(sample, tmp_path, key):
    records, image_dir = sample
    client = Client(ClientConfig(backend="openai", base_url="http://127.0.0.1:9/v1", max_attempts=2, backoff_s=0.01))
    with pytest.raises(Fatal, match="all 5 requests failed; first error: gave up after 2 attempts: cannot reach "
                                    "http://127.0.0.1:9/v1"):
        run_generate(client, records[:5], image_dir, tmp_path / "c.jsonl")
    client = Client(ClientConfig(backend="openai", base_url="http://user:pa55word@127.0.0.1:9/v1"))
    with pytest.raises(Fatal, match="check base_url") as e:  # credentials in the URL: refused, and not shown
        run_generate(client, records[:1], image_dir, tmp_path / "c.jsonl")
    assert "http://***@127.0.0.1:9/v1" in str(e.value) and "pa55word" not in str(e.value)


def test_params_with_credentials_or_typos_are_refused():
    with pytest.raises(Fatal, match="'api_key' looks like a credential"):
        ClientConfig.from_params({}, {"backend": "openai", "api_key": "sk-abc"})
    with pytest.raises(Fatal, match="llm: unknown key\\(s\\) max_attemps"):
        ClientConfig.from_params({"max_attemps": 3}, {})
    with pytest.raises(Fatal, match="at least 1"):
        ClientConfig.from_params({"max_attempts": 0}, {})
    cfg = ClientConfig.from_params({"max_attempts": 3, "prices": {"m": [1, 2]}},
                                   {"backend": "offline", "model": "m", "demos": "x", "min_rounds": 3})
    assert (cfg.max_attempts, cfg.model, cfg.prices) == (3, "m", {"m": [1, 2]})
