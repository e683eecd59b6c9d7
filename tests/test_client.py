"""The model client against a local OpenAI-compatible server (vital.llm.fakeapi on 127.0.0.1): concurrency,
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

from vital.llm.backends import Fatal
from vital.llm.batch import BatchesInFlight
from vital.llm.client import Client, ClientConfig
from vital.llm.fakeapi import FAULTS, FakeOpenAI
from vital.generate import GenerateConfig, generate
from vital.images import ImageStore
from vital.llm.offline import OfflineBackend
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
        assert stats["retries"] >= 5  # transport faults are retried; a `nonsense` reply is a reply, asked again once
        nonsense = [r["key"] for r in fake.log if r["fault"] == "nonsense"]
        assert stats["reasked"] >= 1 and len(nonsense) >= stats["reasked"]
        ids = [c.id for c in convs] + [r["id"] for r in rejected] + [k for f in failures for k in f.keys]
        assert sorted(ids) == sorted(r.id for r in records)  # every figure is a conversation, a rejection or a failure
        for f in failures:
            assert f.attempts == 2 and f.error.startswith("gave up after 2 attempts")
        for r in rejected:  # `nonsense` twice parses to nothing: rejected with the reason, paid for, cached
            assert r["reason"] == "unparseable reply (no User/Assistant rounds), also when asked again"
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
from vital.llm.client import Client, ClientConfig
from vital.generate import GenerateConfig, generate
from vital.llm.offline import OfflineBackend
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
    records = copy.deepcopy(records)  # edited below; the fixture is shared
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
    # random weights write word salad: asked again once (a second pass, in batches too), then rejected with a
    # reason, both replies kept in the cache
    assert client.backend.batch_sizes == [3, 2, 3, 2] and stats["requests"] == 10 and not failures
    assert stats["reasked"] == 5 and len(rejected) == 5 and stats["rejected_by_reason"] == {"unparseable": 5}
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


# ---------------------------------------------------------------- a reply of no use is asked again, once

def garbage_first(fake, caption, times=1, text="nonsense"):
    """The fake server answers the request about the figure with `caption` with a well-formed reply of no use
    (`nonsense`: Lorem ipsum) the first `times` times it is asked, then as usual."""
    original, asked = fake.chat, []

    def chat(body, fault):
        prompt = json.dumps(body["messages"][-1]["content"])
        if caption in prompt:
            asked.append(prompt)
            if len(asked) <= times:
                fault = text
        return original(body, fault)
    fake.chat = chat
    return asked


def test_garbage_then_a_good_reply_ends_like_a_clean_run_and_is_never_paid_twice(sample, tmp_path, key):
    records, image_dir = sample
    records = records[:4]
    with FakeOpenAI() as fake:
        clean, *_ = run_generate(openai_client(fake), records, image_dir, tmp_path / "clean.jsonl")
        asked = garbage_first(fake, records[1].caption)
        calls = fake.calls["POST /v1/chat/completions"]
        convs, rejected, failures, stats = run_generate(openai_client(fake), records, image_dir, tmp_path / "c.jsonl")
        assert [(c.id, c.conversations) for c in convs] == [(c.id, c.conversations) for c in clean]
        assert not rejected and not failures and stats["reasked"] == 1 and len(asked) == 2
        assert fake.calls["POST /v1/chat/completions"] - calls == len(records) + 1 == stats["requests"]
        cache = list(read_jsonl(tmp_path / "c.jsonl"))
        reask = next(e for e in cache if e.get("reask_of"))  # the second answer, cached under its own key
        assert convs[1].request_hash == reask["request_hash"] != reask["reask_of"]
        assert [e["reply"] for e in cache if e["request_hash"] == reask["reask_of"]] == ["Lorem ipsum dolor sit amet."]

        again = run_generate(openai_client(fake), records, image_dir, tmp_path / "c.jsonl")
        assert fake.calls["POST /v1/chat/completions"] - calls == len(records) + 1  # the rerun sent nothing
        assert again[3]["reasked"] == 1 and again[3]["requests"] == 0 and len(again[0]) == len(records)
        # killed after the first reply and before its re-ask's answer was written: a rerun sends the re-ask only
        (tmp_path / "c.jsonl").write_text("".join(json.dumps(e) + "\n" for e in cache if not e.get("reask_of")))
        resumed = run_generate(openai_client(fake), records, image_dir, tmp_path / "c.jsonl")
        assert resumed[3]["requests"] == 1 and [c.conversations for c in resumed[0]] == [c.conversations for c in clean]


STAGE_PARAMS = {"backend": "openai", "model": "gpt-4o", "concurrency": 4}


def stage_repo(tmp_path, records, image_dir, base_url):
    """A working copy with what stages/generate.py reads: params.yaml (the openai backend at `base_url`),
    the stage scripts, a corpus and the demonstrations."""
    import shutil
    from pathlib import Path

    import yaml
    from vital.schema import write_jsonl

    root = Path(__file__).resolve().parents[1]
    repo = tmp_path / "repo"
    shutil.copytree(root / "stages", repo / "stages", ignore=shutil.ignore_patterns("__pycache__"))
    (repo / "examples/annotation").mkdir(parents=True)
    shutil.copy(root / "examples/annotation/demos.jsonl", repo / "examples/annotation/demos.jsonl")
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["generate"].update(STAGE_PARAMS, base_url=base_url, demos="examples/annotation/demos.jsonl")
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    write_jsonl(repo / "data/corpus/records.jsonl", records)
    shutil.copytree(image_dir, repo / "data/corpus/images")
    return repo


def run_stage(repo, name):
    p = subprocess.run([sys.executable, f"stages/{name}.py"], cwd=repo, capture_output=True, text=True, timeout=120,
                       env=dict(os.environ))
    assert p.returncode == 0, p.stdout + p.stderr
    return p.stdout


def test_garbage_twice_is_recorded_and_said_and_evict_then_rerun_asks_again(sample, tmp_path, key):
    from typer.testing import CliRunner

    from vital.cli import app as cli

    records, image_dir = sample
    records = records[:3]
    with FakeOpenAI() as fake:
        repo = stage_repo(tmp_path, records, image_dir, fake.base_url)
        garbage_first(fake, records[0].caption, times=2)
        out = run_stage(repo, "generate")
        summary = next(line for line in out.splitlines() if line.startswith("[generate] backend="))
        assert "reasked=1," in summary and "conversations=2," in summary and "rejected=1," in summary
        assert ("[generate] 1 reply rejected, also when asked again (1 unparseable): "
                "data/candidates/generate_rejected.jsonl. `vital cache evict --rejected --stage generate` and "
                "`dvc repro generate` ask them again") in out
        metrics = json.loads((repo / "metrics/generate.json").read_text())
        assert metrics["reasked"] == 1 and metrics["rejected_by_reason"] == {"unparseable": 1}
        rejected = list(read_jsonl(repo / "data/candidates/generate_rejected.jsonl"))
        assert [(r["id"], r["reason"]) for r in rejected] == [
            (records[0].id, "unparseable reply (no User/Assistant rounds), also when asked again")]

        calls = fake.calls["POST /v1/chat/completions"]
        assert "reasked=1," in run_stage(repo, "generate")  # a rerun as is: all cached, nothing sent
        assert fake.calls["POST /v1/chat/completions"] == calls

        result = CliRunner().invoke(cli, ["cache", "evict", "--rejected", "--stage", "generate", "--cache-dir",
                                          str(repo / "data/cache")])
        assert result.exit_code == 0, result.output
        assert result.output == (f"{repo / 'data/cache/generate.jsonl'}: removed 2 of 4 replies (2 unparseable); "
                                 "the next `dvc repro generate` asks them again\n")
        out = run_stage(repo, "generate")  # the server answers well now
        assert fake.calls["POST /v1/chat/completions"] == calls + 1  # only the evicted request, asked anew
        assert "reasked=0," in out and "conversations=3," in out and "rejected=0," in out
        assert len(list(read_jsonl(repo / "data/candidates/generated.jsonl"))) == 3
        result = CliRunner().invoke(cli, ["cache", "evict", "--rejected", "--cache-dir", str(repo / "data/cache")])
        assert result.exit_code == 0 and f"{repo / 'data/cache/generate.jsonl'}: removed 0 of 3 replies\n" in result.output
        assert f"{repo / 'data/cache/rate.jsonl'}: no cache (the stage has not run)" in result.output


def test_batch_mode_asks_again_in_a_second_batch_and_resumes_polling_it(sample, tmp_path, key):
    records, image_dir = sample
    records = records[:4]
    with FakeOpenAI(batch_polls=3) as fake:
        garbage_first(fake, records[0].caption)
        stops = 0
        while True:
            client = openai_client(fake, mode="batch", batch_poll_s=0.01, batch_wait_s=0)  # stop after one poll
            try:
                convs, rejected, failures, stats = run_generate(client, records, image_dir, tmp_path / "c.jsonl",
                                                                AppendLog(tmp_path / "batches.jsonl"))
                break
            except BatchesInFlight:  # the first batch, then the re-ask's, still running: a rerun polls them
                stops += 1
                assert stops < 10
    assert len(convs) == len(records) and not rejected and not failures and stats["reasked"] == 1
    assert fake.calls["POST /v1/batches"] == 2 and stops >= 2
    cache = list(read_jsonl(tmp_path / "c.jsonl"))
    assert len(cache) == len(records) + 1 and [e["via"] for e in cache] == ["batch"] * len(cache)
    assert sum(bool(e.get("reask_of")) for e in cache) == 1
