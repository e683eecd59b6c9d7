"""End-to-end: the DAG as a user runs it, in a copy of the repository."""
import json
import os
import re
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import pandas as pd
import pytest
import yaml

from vital.fakeapi import FakeOpenAI
from vital.schema import IMAGE_TOKEN

ROOT = Path(__file__).resolve().parents[1]
STAGES = ["corpus", "annotation_pool", "generate", "rate", "merge_preferences", "train_selector", "filter", "tune",
          "evaluate"]


def _env():
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", DVC_NO_ANALYTICS="1",
               GIT_AUTHOR_NAME="t", GIT_AUTHOR_EMAIL="t@t", GIT_COMMITTER_NAME="t", GIT_COMMITTER_EMAIL="t@t")
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"  # this venv's python and dvc
    return env


def run(cmd, cwd, check=True, timeout=900, **env):
    p = subprocess.run(cmd, cwd=cwd, env={**_env(), **env}, capture_output=True, text=True, shell=True, timeout=timeout)
    if check and p.returncode:
        raise AssertionError(f"{cmd} failed ({p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}")
    return p


def ran(output: str) -> list[str]:
    return re.findall(r"Running stage '(\w+)'", output)


@pytest.fixture
def repo(tmp_path):
    """A fresh copy of the working tree (tracked and untracked-not-ignored files), as a git repo."""
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, capture_output=True,
                           text=True, check=True).stdout.split("\n")
    dst = tmp_path / "repo"
    for f in filter(None, files):
        if (ROOT / f).is_file():
            (dst / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / f, dst / f)
    run("git init -q && git add -A && git commit -qm init", dst)
    return dst


@pytest.mark.slow
def test_dag_runs_offline_end_to_end_then_experiment_reruns_only_downstream(repo):
    out = run("dvc repro", repo).stdout
    assert ran(out) == STAGES

    records = [json.loads(x) for x in (repo / "data/corpus/records.jsonl").read_text().splitlines()]
    assert len(records) >= 12 and all((repo / "data/corpus/images" / r["image"]).exists() for r in records)
    pool = [json.loads(x) for x in (repo / "data/annotation/pool.jsonl").read_text().splitlines()]
    assert pool and all(p["answer_a"] and p["answer_b"] for p in pool)
    convs = [json.loads(x) for x in (repo / "data/candidates/conversations.jsonl").read_text().splitlines()]
    assert len(convs) == len(records) and all(c["backend"] == "offline" for c in convs)
    ratings = [json.loads(x) for x in (repo / "data/candidates/ratings.jsonl").read_text().splitlines()]
    assert all(r["score"] is None or 0 <= r["score"] <= 10 for r in ratings)
    pairs = pd.read_parquet(repo / "data/preferences/pairs.parquet")
    assert set(pairs["source"]) == {"clinician", "model"}
    assert (pairs.loc[pairs.source == "clinician", "weight"] == 10).all()
    assert (repo / "models/selector/selector.pt").exists()
    rel = json.loads((repo / "data/release/instructions.json").read_text())
    assert len(rel) == 12  # ceil(0.8 * 14)
    for r in rel:
        turns = r["conversations"]
        assert turns[0]["value"].startswith(f"{IMAGE_TOKEN}\n")
        assert sum(t["value"].count(IMAGE_TOKEN) for t in turns) == 1
        assert [t["from"] for t in turns] == ["human", "gpt"] * (len(turns) // 2)
    out = run("vital validate release data/release/instructions.json --image-dir data/corpus/images", repo).stdout
    assert "12 records" in out and "0 problems" in out
    assert len((repo / "data/release/trl.jsonl").read_text().splitlines()) == 12
    assert len(json.loads((repo / "data/release/llamafactory.json").read_text())) == 12
    assert "12 instruction conversations kept of 14 candidates" in (repo / "data/release/DATA_CARD.md").read_text()
    assert (repo / "models/vlm/adapter/adapter_model.safetensors").exists()
    ev = json.loads((repo / "metrics/evaluate.json").read_text())
    assert "tiny random" in ev["model"] and ev["judge"] == "offline"
    assert {"closed_accuracy", "open_recall", "relative_score"} <= set(ev)

    assert "up to date" in run("dvc status", repo).stdout
    assert ran(run("dvc repro", repo).stdout) == []  # a second repro does nothing
    run("git add -A && git commit -q --allow-empty -m 'baseline run'", repo)  # often empty: runs reproduce byte for byte

    exp = run("dvc exp run -S filter.ratio=0.5", repo).stdout
    assert ran(exp) == ["filter", "tune", "evaluate"]
    assert len(json.loads((repo / "data/release/instructions.json").read_text())) == 7
    shown = run("dvc exp show --json", repo).stdout
    assert '"ratio": 0.5' in shown and '"kept": 7' in shown


def test_corpus_stage_ingests_a_user_corpus_and_strict_mode_names_file_line(repo):
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["corpus"].update(source="path")
    (repo / "params.yaml").write_text(yaml.safe_dump(params))
    run("python stages/corpus.py", repo)
    m = json.loads((repo / "metrics/corpus.json").read_text())
    assert (m["source"], m["records"], m["rejected"]) == ("path", 3, 0)

    bad = repo / "examples/fig_captions/fig_captions.jsonl"
    bad.write_text(bad.read_text() + '{"pair_id": "x", "fig_caption": "no image here"}\n')
    run("python stages/corpus.py", repo)
    rejected = [json.loads(x) for x in (repo / "data/corpus/rejected.jsonl").read_text().splitlines()]
    assert rejected == [{"file": "examples/fig_captions/fig_captions.jsonl", "line": 4,
                         "reason": "missing image: examples/fig_captions/images/x.jpg", "id": "x"}]
    assert json.loads((repo / "metrics/corpus.json").read_text())["rejected_by_reason"] == {"missing image": 1}

    params["corpus"].update(strict=True)
    (repo / "params.yaml").write_text(yaml.safe_dump(params))
    p = run("python stages/corpus.py", repo, check=False)
    assert p.returncode != 0
    assert "examples/fig_captions/fig_captions.jsonl:4: missing image" in p.stderr


def test_vital_summary_prints_one_screen(repo):
    out = run("vital summary", repo).stdout  # the committed metrics of the last run
    lines = out.strip().splitlines()
    assert len(lines) <= 24
    assert lines[0].startswith("corpus") and any(line.startswith("evaluate") for line in lines)


@pytest.mark.slow
def test_an_openai_compatible_server_drives_generate_and_rate_and_no_key_is_left_behind(repo):
    key = f"sk-e2e-{uuid.uuid4().hex}"  # made here, so that no file holds it unless the run wrote it
    with FakeOpenAI(api_key=key, latency=0.01) as fake:
        url = fake.base_url
        out = run(f"dvc exp run rate -S generate.backend=openai -S generate.base_url={url} "
                  f"-S rate.backend=openai -S rate.base_url={url}", repo, OPENAI_API_KEY=key).stdout
        assert sorted(ran(out)) == ["annotation_pool", "corpus", "generate", "rate"] and ran(out)[-1] == "rate"
        assert fake.calls["POST /v1/chat/completions"] > 14
        gen = json.loads((repo / "metrics/generate.json").read_text())
        assert (gen["backend"], gen["model"], gen["requests"], gen["failed"]) == ("openai", "gpt-4o", 14, 0)
        assert gen["cost_usd"] > 0 and gen["prompt_tokens"] > 0
        rate = json.loads((repo / "metrics/rate.json").read_text())
        assert rate["backend"] == "openai" and rate["unparsed"] == 0
        # every round and every pool answer (rater vs clinicians); identical requests are sent once
        assert rate["requests"] + rate["cached"] == rate["rounds"] + rate["pool_answers"] and rate["failed"] == 0

        sent = fake.calls["POST /v1/chat/completions"]
        run("dvc repro -f generate", repo, OPENAI_API_KEY=key)  # forced rerun: every reply comes from the cache
        assert fake.calls["POST /v1/chat/completions"] == sent
        assert json.loads((repo / "metrics/generate.json").read_text())["cached"] == 14

        wrong_key = f"sk-wrong-{uuid.uuid4().hex}"
        wrong = run("dvc exp run generate -S generate.temperature=0.2", repo, check=False,
                    OPENAI_API_KEY=wrong_key)  # a new param: requests, and a refused key
        assert wrong.returncode != 0 and "generate: " + url in wrong.stderr and "refused the API key" in wrong.stderr
    for f in repo.rglob("*"):  # params, dvc.lock, metrics, caches, DVC's own files and logs
        if f.is_file() and ".git" not in f.parts:
            data = f.read_bytes()
            assert key.encode() not in data and wrong_key.encode() not in data, f
