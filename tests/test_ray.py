"""engine.kind: ray on a local 2-CPU Ray: the transformers backend's requests as Ray Data map_batches give the rows
and cache keys of the local path, a run killed part-way loses nothing and pays nothing twice, and an address no
cluster answers on is a one-line error."""
import json
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import asdict, replace
from pathlib import Path

import pytest

ray = pytest.importorskip("ray")

from vital.llm.backends import Fatal  # noqa: E402
from vital.llm.client import Client, ClientConfig  # noqa: E402
from vital.llm.ray_engine import BLOCK_BATCHES, Engine, map_rows  # noqa: E402
from vital.generate import GenerateConfig, generate  # noqa: E402
from vital.schema import AppendLog, read_jsonl  # noqa: E402


@pytest.fixture(scope="module")
def local_ray():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from vital.tune import build_tiny_llava

    path = tmp_path_factory.mktemp("tiny") / "llava"
    model, processor = build_tiny_llava()
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return str(path)


def run(records, image_dir, cache, tiny, engine=None):
    client = Client(ClientConfig(backend="transformers", model=tiny, batch_size=1, concurrency=1), engine=engine)
    cfg = GenerateConfig(max_tokens=12, temperature=0.0)  # greedy: both paths write the same words
    convs, rejected, failures, stats = generate(records, image_dir, [], client, AppendLog(cache), cfg)
    return {c.id: c.conversations for c in convs}, {r["id"]: r["reason"] for r in rejected}, failures, stats


def many(records, n):
    """n records from the sample's, each with its own caption: n distinct requests (a few Ray blocks' worth)."""
    picks = [(i, records[i % len(records)]) for i in range(n)]
    return [replace(r, id=f"{r.id}_{i}", caption=f"{r.caption} (case {i})") for i, r in picks]


def replies(cache) -> dict:
    return {row["request_hash"]: row["reply"] for row in read_jsonl(cache)}


def test_ray_gives_the_local_rows_and_cache_keys_and_reruns_from_the_cache(local_ray, tiny, sample, tmp_path):
    records, image_dir = sample
    records = records[:6]
    local = run(records, image_dir, tmp_path / "local.jsonl", tiny)
    engine = Engine(kind="ray", workers=2, cpus_per_worker=1, batch_size=2)
    on_ray = run(records, image_dir, tmp_path / "ray.jsonl", tiny, engine)
    assert on_ray[:3] == local[:3]  # conversations, rejections (with reasons), failures
    assert replies(tmp_path / "ray.jsonl") == replies(tmp_path / "local.jsonl")  # same keys, same replies
    assert on_ray[3]["requests"] == local[3]["requests"] > len(records) and on_ray[3]["cached"] == 0
    assert {row["backend"] for row in read_jsonl(tmp_path / "ray.jsonl")} == {"transformers"}

    # the local path's cache serves a Ray run: nothing is computed again
    again = run(records, image_dir, tmp_path / "local.jsonl", tiny, engine)
    assert again[:3] == local[:3] and again[3]["requests"] == 0 and again[3]["cached"] == local[3]["requests"]


def test_a_rejected_reply_is_asked_again_by_its_worker_in_the_same_pass(local_ray, tiny, sample, tmp_path,
                                                                       monkeypatch):
    records, image_dir = sample
    passes, real = [], ray.data.from_arrow_refs
    monkeypatch.setattr(ray.data, "from_arrow_refs", lambda *a, **k: passes.append(1) or real(*a, **k))
    on_ray = run(records[:4], image_dir, tmp_path / "ray.jsonl", tiny, Engine(kind="ray", workers=1, batch_size=2))
    assert len(passes) == 1  # one Dataset (one model load per actor) for the first asks and the re-asks
    rows = list(read_jsonl(tmp_path / "ray.jsonl"))
    firsts = {row["request_hash"] for row in rows if "reask_of" not in row}
    reasks = [row for row in rows if "reask_of" in row]
    assert 0 < len(reasks) == on_ray[3]["reasked"] and {row["reask_of"] for row in reasks} <= firsts
    assert on_ray[3]["requests"] == len(rows) == 4 + len(reasks) and on_ray[3]["cached"] == 0


DRIVER = """
import sys
from vital.generate import GenerateConfig, generate
from vital.llm.client import Client, ClientConfig
from vital.llm.ray_engine import Engine
from vital.schema import AppendLog, CorpusRecord, read_jsonl
records, image_dir, tiny, cache = sys.argv[1:]
records = [CorpusRecord(**row) for row in read_jsonl(records)]
client = Client(ClientConfig(backend="transformers", model=tiny, batch_size=1),
                engine=Engine(kind="ray", workers=1, batch_size=1))
generate(records, image_dir, [], client, AppendLog(cache), GenerateConfig(max_tokens=12, temperature=0.0))
"""


def test_a_run_killed_part_way_resumes_from_the_cache(local_ray, tiny, sample, tmp_path):
    records, image_dir = sample
    records = many(records, 3 * BLOCK_BATCHES)  # several blocks (four, of 12)
    cache = tmp_path / "cache.jsonl"
    # its own local Ray (started by ray.init in the child), killed with the whole process group
    env = {**os.environ, "RAY_ADDRESS": ""}
    (tmp_path / "records.jsonl").write_text("".join(json.dumps(asdict(r)) + "\n" for r in records))
    proc = subprocess.Popen([sys.executable, "-c", DRIVER, str(tmp_path / "records.jsonl"), str(image_dir), tiny,
                             str(cache)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 180
    while time.time() < deadline and (not cache.exists() or cache.read_text().count("\n") < 3):
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    before = cache.read_text()
    finished = {json.loads(x)["request_hash"] for x in before.splitlines() if x.endswith("}")}
    assert 3 <= len(finished) < len(records), "the run should be killed part-way"

    resumed = run(records, image_dir, cache, tiny, Engine(kind="ray", workers=2, batch_size=2))
    full = run(records, image_dir, tmp_path / "full.jsonl", tiny)
    assert resumed[:3] == full[:3]  # nothing lost
    hashes = [row["request_hash"] for row in read_jsonl(cache)]
    assert len(hashes) == len(set(hashes)) == full[3]["requests"]  # nothing computed twice
    assert resumed[3]["requests"] == full[3]["requests"] - len(finished)
    assert cache.read_text().startswith(before.rsplit("\n", 1)[0])  # what was there is still there


def ray_workers() -> list[int]:
    """Pids of the Ray Data actors running now (their process title names them)."""
    pids = []
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and b"MapWorker" in (proc / "cmdline").read_bytes():
                pids.append(int(proc.name))
        except OSError:
            continue
    return pids


def test_a_worker_killed_mid_run_loses_nothing(local_ray, tiny, sample, tmp_path):
    records, image_dir = sample
    records = many(records, 4 * BLOCK_BATCHES)
    cache, killed = tmp_path / "cache.jsonl", []

    def kill_one_worker():
        deadline = time.time() + 120
        while time.time() < deadline and not (cache.exists() and cache.read_text().count("\n") >= 3):
            time.sleep(0.05)
        if pids := ray_workers():
            os.kill(pids[0], signal.SIGKILL)
            killed.append(pids[0])

    thread = threading.Thread(target=kill_one_worker, daemon=True)
    thread.start()
    on_ray = run(records, image_dir, cache, tiny, Engine(kind="ray", workers=2, batch_size=1))
    thread.join()
    assert killed, "a worker should have been killed part-way"
    full = run(records, image_dir, tmp_path / "full.jsonl", tiny)
    assert on_ray[:3] == full[:3]  # Ray restarted the actor and retried its batch
    hashes = [row["request_hash"] for row in read_jsonl(cache)]
    assert len(hashes) == len(set(hashes)) == full[3]["requests"] == on_ray[3]["requests"]


class Pid:
    """A Ray Data actor that says which process served each row."""

    def __init__(self, threads):
        self.pid = os.getpid()

    def __call__(self, batch):
        return {"i": batch["i"], "pid": [self.pid] * len(batch["i"])}


def test_one_pool_of_actors_serves_a_long_stream_of_rows_each_row_once(local_ray):
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers cannot import this test module
    rows = ({"i": i} for i in range(4500))  # a generator, as the client hands its pending requests: never a list
    out = list(map_rows(Engine(kind="ray", workers=2, batch_size=4), rows, Pid, 4))
    served = sorted(int(i) for batch in out for i in batch["i"])
    assert served == list(range(4500))
    # two actors (each would load its model once) for all 1,125 blocks, not a new pool every few thousand rows
    assert len({int(p) for batch in out for p in batch["pid"]}) == 2


def test_selector_features_on_ray_are_the_local_ones_and_are_counted(local_ray, sample, tmp_path):
    import numpy as np

    from vital import selector
    from vital.encoders import EmbeddingCache
    from vital.llm.offline import OfflineBackend

    records, image_dir = sample
    convs = generate(records[:4], image_dir, [], Client(ClientConfig(), OfflineBackend()),
                     AppendLog(tmp_path / "g.jsonl"), GenerateConfig())[0]
    units = selector.build_units({r.id: r for r in records}, convs, [], "round")
    cfg = asdict(selector.TrainConfig())
    backbone = selector.build_backbone(cfg)
    local = selector.Featurizer(backbone, image_dir, tmp_path / "local")(units)

    def featurize():
        before = dict(EmbeddingCache.counts)
        engine = Engine(kind="ray", workers=2, batch_size=8)
        x = selector.Featurizer(backbone, image_dir, tmp_path / "ray", engine=engine, spec=(cfg, None))(units)
        return x, {k: EmbeddingCache.counts[k] - before[k] for k in before}

    on_ray, counts = featurize()
    np.testing.assert_allclose(on_ray, local, atol=1e-5)  # the same backbone, encoded by two actors
    unique = len(set(units["context"]) | set(units["qa"])) + len(set(units["image"]))
    assert counts == {"computed": unique, "from_cache": 0} and unique > len(units) // 2
    again, counts = featurize()  # the rerun reads every vector from the cache: no actor is started
    np.testing.assert_array_equal(again, on_ray)
    assert counts == {"computed": 0, "from_cache": unique}


def test_an_address_no_cluster_answers_on_is_one_line(sample, tmp_path, tiny):
    records, image_dir = sample
    if ray.is_initialized():
        ray.shutdown()
    engine = Engine(kind="ray", address="127.0.0.1:1", workers=1)
    started = time.time()
    with pytest.raises(Fatal) as e:
        run(records[:1], image_dir, tmp_path / "c.jsonl", tiny, engine)
    assert time.time() - started < 30
    assert "\n" not in str(e.value) and str(e.value).startswith("engine.address '127.0.0.1:1': no Ray cluster "
                                                                "answers there")
    with pytest.raises(Fatal, match="engine.kind 'cluster': choose local or ray"):
        Engine(kind="cluster")
    # the feature stages (train_selector, filter) turn a ValueError into their one-line exit
    from vital import selector

    units = selector.build_units({r.id: r for r in records}, [], [], "round")
    assert units.empty  # nothing to encode: no Ray needed, no error
    backbone = selector.build_backbone(asdict(selector.TrainConfig()))
    featurizer = selector.Featurizer(backbone, image_dir, tmp_path / "f", engine=engine,
                                     spec=(asdict(selector.TrainConfig()), None))
    with pytest.raises(ValueError, match="^engine.address '127.0.0.1:1': no Ray cluster answers there"):
        featurizer.encode("text", ["a caption"])
