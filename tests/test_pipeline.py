"""End-to-end: the DAG as a user runs it, in a copy of the repository."""
import hashlib
import json
import math
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pandas as pd
import pytest
import yaml

from vital.llm.fakeapi import FakeOpenAI
from vital.images import ImageStore, pack, unpack
from vital.schema import IMAGE_TOKEN

ROOT = Path(__file__).resolve().parents[1]
STAGES = ["corpus", "dedup", "decontaminate", "annotation_pool", "generate", "decontaminate_qa", "rate", "merge_preferences", "train_selector", "filter",
          "release_images", "tune", "evaluate"]


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
    corpus_images = ImageStore(repo / "data/corpus/images")  # packed: a tar shard and its index
    assert corpus_images.packed and len(list((repo / "data/corpus/images").iterdir())) == 2
    assert len(records) >= 12 and all(r["image"] in corpus_images for r in records)
    pool = [json.loads(x) for x in (repo / "data/annotation/pool.jsonl").read_text().splitlines()]
    assert pool and all(p["answer_a"] and p["answer_b"] for p in pool)
    assert len({p["question"] for p in pool}) >= 8  # the generator's questions, not two canned ones
    convs = [json.loads(x) for x in (repo / "data/candidates/conversations.jsonl").read_text().splitlines()]
    assert len(convs) == len(records) and all(c["backend"] == "offline" for c in convs)
    assert all(len(c["demo_ids"]) == 5 for c in convs)  # one demonstration of each modality in every request
    ratings = [json.loads(x) for x in (repo / "data/candidates/ratings.jsonl").read_text().splitlines()]
    assert all(r["score"] is None or 0 <= r["score"] <= 10 for r in ratings)
    pairs = pd.read_parquet(repo / "data/preferences/pairs.parquet")
    assert set(pairs["source"]) == {"clinician", "model"}
    assert (pairs.loc[pairs.source == "clinician", "weight"] == 10).all()
    assert set(pairs["split"]) <= {"train", "validation", "test"}
    sides = pd.concat([pairs[[side, "split"]].rename(columns={side: "unit"}) for side in ("a_id", "b_id")])
    figure = sides["unit"].str.split("#").str[0].str.split(":").str[0]
    assert (sides.assign(f=figure).groupby("f")["split"].nunique() == 1).all()  # a figure is in one split
    assert (repo / "models/selector/selector.pt").exists() and (repo / "models/selector/model_only/selector.pt").exists()
    sel = json.loads((repo / "metrics/train_selector.json").read_text())
    assert sel["test"]["clinician_alignment"]["n"] > 0 and "validation" in sel["epoch_chosen_on"]
    comparison = json.loads((repo / "metrics/selection.json").read_text())
    assert set(comparison["methods"]) == {"selector", "selector_model_only", "rater_threshold", "random"}
    assert comparison["methods"]["selector"]["overlap"] == 1.0 and comparison["methods"]["random"]["seeds"] == 20
    assert comparison["methods"]["selector"]["clinician_test"] == sel["test"]["clinician_alignment"] | {"unscored": 0}
    plotted = pd.read_csv(repo / "metrics/selection.csv")
    assert list(plotted["method"]) == ["selector", "rater_threshold", "selector_model_only", "random"]
    rel = json.loads((repo / "data/release/instructions.json").read_text())
    assert len(rel) == 12  # ceil(0.8 * 14)
    for r in rel:
        turns = r["conversations"]
        assert turns[0]["value"].startswith(f"{IMAGE_TOKEN}\n")
        assert sum(t["value"].count(IMAGE_TOKEN) for t in turns) == 1
        assert [t["from"] for t in turns] == ["human", "gpt"] * (len(turns) // 2)
    out = run("vital validate release data/release/instructions.json --image-dir data/release/images", repo).stdout
    assert "12 records" in out and "0 problems" in out  # LLaVA's image_folder, unpacked by release_images
    assert sorted(ImageStore(repo / "data/release/data").names()) == sorted({r["image"] for r in rel})
    assert "12 instruction conversations kept of 14 candidates" in (repo / "data/release/README.md").read_text()
    assert _load_as_the_card_says(repo) == "12 (2, 3, 32, 32)"
    assert (repo / "models/vlm/adapter/adapter_model.safetensors").exists()
    card = (repo / "models/vlm/adapter/README.md").read_text()  # the model card beside the adapter
    sha = hashlib.sha256((repo / "data/release/instructions.json").read_bytes()).hexdigest()
    assert "Pipeline check only" in card and f"12 conversations (LLaVA format), sha256 `{sha}`" in card
    ev = json.loads((repo / "metrics/evaluate.json").read_text())
    assert "tiny random" in ev["model"] and ev["judge"].startswith("offline:")
    assert ev["closed_accuracy"]["n"] == 21 and ev["open_recall"]["n"] == 14 and "relative_score" in ev["chat"]
    assert ev["base"]["all"]["closed_accuracy"]["n"] == 21 and "sample" in ev["vqa_win_rate_vs_base"]
    assert "pipeline only" in ev["judge_kind"]

    assert "up to date" in run("dvc status", repo).stdout
    assert ran(run("dvc repro", repo).stdout) == []  # a second repro does nothing
    run("git add -A && git commit -q --allow-empty -m 'baseline run'", repo)  # often empty: runs reproduce byte for byte
    _publish_and_pull_into_a_fresh_clone(repo)

    exp = run("dvc exp run -S filter.ratio=0.5", repo).stdout
    assert ran(exp) == ["filter", "release_images", "tune", "evaluate"]
    assert len(json.loads((repo / "data/release/instructions.json").read_text())) == 7
    shown = run("dvc exp show --json", repo).stdout
    assert '"ratio": 0.5' in shown and '"kept": 7' in shown

    exp = run("dvc exp run -S 'evaluate.eval_sets=[{name: eval, format: vital, path: examples/eval}]' "
              "-S evaluate.baseline_answers=examples/eval/baseline_answers.jsonl", repo).stdout  # LLaVA-Med's format
    assert ran(exp) == ["evaluate"]
    assert "group            metric" in exp and "tuned - base [95% CI]" in exp  # the printed table
    ev = json.loads((repo / "metrics/evaluate.json").read_text())
    assert {"vqa_rad", "slake", "pathvqa"} <= set(ev["tuned"]) and ev["tuned"]["slake"]["closed_accuracy"]["n"] == 1
    assert ev["sets"]["eval"]["decontaminated"] is True  # decontaminate.eval_sets names it
    chat = ev["chat"]
    assert chat["pairs"] == 3 and chat["win_rate_against"] == "examples/eval/baseline_answers.jsonl"
    assert set(chat["relative_score_by_category"]) == {"conversation", "detailed_description"}
    assert ev["vqa_win_rate_vs_base"]["eval"]["pairs"] == 4  # the open questions of the three VQA files
    assert "tuned - baseline [95% CI]" in exp and ev["baseline"]["all"]["closed_accuracy"]["n"] == 4  # the file's
    assert ev["tuned_minus_baseline"]["all"]["open_recall"]["n"] == 4 and ev["vqa_win_rate_vs_baseline"]["eval"]["pairs"] == 4

    from conftest import write_bench  # VQA-RAD as on the Hub (parquet) and SLAKE, as users have them
    write_bench(repo / "examples/bench")
    exp = run("dvc exp run -S 'evaluate.eval_sets=[{name: vqa_rad, format: huggingface, path: examples/bench/vqa-rad, "
              "domain: chest_xray}, {name: slake, format: slake, path: examples/bench/slake}]' "
              "-S evaluate.baseline_answers=null", repo).stdout  # an exp's params stay in params.yaml: say each
    ev = json.loads((repo / "metrics/evaluate.json").read_text())
    rad, slake = ev["sets"]["vqa_rad"], ev["sets"]["slake"]
    assert (rad["closed"], rad["open"], slake["closed"], slake["open"]) == (2, 2, 1, 1)
    assert slake["left_out"] == {"q_lang zh (evaluate.languages: en)": 1} and not rad["decontaminated"]
    assert "NOT in decontaminate.eval_sets" in exp and "closed = the answer is yes or no" in exp
    assert ev["tuned"]["vqa_rad/chest_xray"]["closed_accuracy"]["n"] == 2 and ev["tuned"]["slake/ct_scan"]
    assert set(ev["vqa_win_rate_vs_base"]) == {"vqa_rad", "slake"}
    shutil.rmtree(repo / "examples/bench")

    exp = run("dvc exp run -S evaluate.base_model=false -S 'evaluate.eval_sets=[{name: sample, format: sample}]'",
              repo).stdout  # the tuned model alone
    ev = json.loads((repo / "metrics/evaluate.json").read_text())
    assert not ev.get("base") and not ev.get("vqa_win_rate_vs_base") and ev["closed_accuracy"]["n"] == 21


def _publish_and_pull_into_a_fresh_clone(repo):
    """`dvc push` to the default remote (a directory next to the clone, no credentials); a fresh `git clone` +
    `dvc pull` gets every output byte for byte and has nothing to recompute; `dvc artifacts get` finds the release."""
    assert "pushed" in run("dvc push", repo).stdout and (repo.parent / "biomed-vital-storage").is_dir()
    clone = repo.parent / "clone"
    run(f"git clone -q {repo} {clone}", repo.parent)
    run("dvc pull", clone)
    assert _load_as_the_card_says(clone) == "12 (2, 3, 32, 32)"  # datasets and TRL: no other command
    storage = repo.parent / "biomed-vital-storage" / "files" / "md5"
    for f in (repo / "data/release/images").iterdir():  # the loose folder is made from data/, never pushed
        digest = hashlib.md5(f.read_bytes()).hexdigest()
        assert not (storage / digest[:2] / digest[2:]).exists(), f
    assert "release_images" in run("dvc status", clone).stdout
    assert ran(run("dvc repro", clone).stdout) == ["release_images"]  # the one command LLaVA's folder needs
    lock = yaml.safe_load((repo / "dvc.lock").read_text())
    outs = [o["path"] for stage in lock["stages"].values() for o in stage.get("outs", [])]
    assert "data/release/instructions.json" in outs and "models/vlm" in outs
    for out in outs:
        mine, theirs = repo / out, clone / out
        files = sorted(f.relative_to(mine) for f in mine.rglob("*") if f.is_file()) if mine.is_dir() else [Path()]
        assert files, out
        for f in files:
            assert (theirs / f).read_bytes() == (mine / f).read_bytes(), f"{out}/{f}"
    assert "up to date" in run("dvc status", clone).stdout and ran(run("dvc repro", clone).stdout) == []
    got = repo.parent / "got.json"
    run("git tag -a biomed-vital-instructions@v0.1.0 -m 'a release'", repo)  # a registered version (GTO tag)
    run(f"dvc artifacts get {repo} biomed-vital-instructions -o {got}", repo.parent)
    assert got.read_bytes() == (repo / "data/release/instructions.json").read_bytes()
    run("git tag -a biomed-vital-release@v0.1.0 -m 'with its figures'", repo)
    run(f"dvc artifacts get {repo} biomed-vital-release -o {repo.parent / 'figures'}", repo.parent)
    figures, release = ImageStore(repo.parent / "figures"), ImageStore(repo / "data/release/images")
    assert figures.names() and all(figures.read(n) == release.read(n) for n in release.names())


def _load_as_the_card_says(folder) -> str:
    """Run the data card's Python lines (datasets, then TRL's collator with the tiny LLaVA's processor) in
    `folder`, as a user pastes them: rows loaded, and the batch's pixel_values shape."""
    script = ("import re\nfrom vital.tune import build_tiny_llava\nscope = {'processor': build_tiny_llava(0)[1]}\n"
              "for block in re.findall(r'```python\\n(.*?)```', open('data/release/README.md').read(), re.S):\n"
              "    exec(block, scope)\nprint(len(scope['ds']), tuple(scope['batch']['pixel_values'].shape))")
    (folder.parent / "load_as_the_card_says.py").write_text(script)
    out = run(f"python {folder.parent / 'load_as_the_card_says.py'}", folder, HF_DATASETS_CACHE=str(folder.parent / f"{folder.name}-hf"))
    return out.stdout.strip().splitlines()[-1]


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
        assert sorted(ran(out)) == ["annotation_pool", "corpus", "decontaminate", "decontaminate_qa", "dedup", "generate",
                                    "rate"] and ran(out)[-1] == "rate"
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


# The clinician-weight sweep as the README documents it (selector only: each experiment stops at train_selector
# and starts from the embedding cache, so that two experiments take seconds, not the whole DAG each).
SWEEP = "dvc exp run --queue train_selector -C data/cache/embeddings -S 'merge_preferences.clinician_weight=1,100'"
SWEEP_SHOW = ("dvc exp show --csv --drop '.*' --keep "
              "'Experiment|State|.*clinician_weight|test.clinician_alignment.(n|rate|low|high)'")


def _processes_in(path: Path) -> list[int]:
    """Ids of live processes whose working directory is inside `path`: a queue worker left behind (Linux only)."""
    pids = []
    for d in Path("/proc").glob("[0-9]*"):
        try:
            cwd = Path(os.readlink(d / "cwd"))
        except OSError:  # gone, a zombie, or not ours to read
            continue
        if cwd == path or path in cwd.parents:
            pids.append(int(d.name))
    return pids


@pytest.mark.slow
def test_clinician_weight_sweep_runs_one_queued_experiment_per_weight(repo):
    # PYTHONPATH=src: the stages import this copy's library (relative, so each experiment's own copy), not the
    # editable install's ROOT/src, which may be mid-edit while the test runs
    def sh(cmd, timeout=120, check=True):
        return run(cmd, repo, check=check, timeout=timeout, PYTHONPATH="src")

    sh("dvc repro train_selector", timeout=300)  # upstream stages cached; writes data/cache/embeddings
    params_before = (repo / "params.yaml").read_bytes()
    try:
        queued = sh(SWEEP).stdout
        assert queued.count("Queued experiment") == 2, queued
        sh("dvc queue start", timeout=300)  # starts the workers; slow on a loaded 2-core machine
        deadline = time.monotonic() + 300
        while re.search(r"\b(Queued|Running)\b", status := sh("dvc queue status").stdout):
            assert time.monotonic() < deadline, f"the sweep still runs after 300 s:\n{status}"
            time.sleep(4)  # each status call costs a CPU second, on the machine that runs the experiments
        failed = re.findall(r"^\w+\s+(\S+)\s.*\bFailed\s*$", status, re.M)
        assert not failed, status + "".join(sh(f"dvc queue logs {n}", check=False).stdout[-3000:] for n in failed)
        shown = json.loads(sh("dvc exp show --json").stdout)
        table = sh(SWEEP_SHOW).stdout
    finally:  # no queue worker outlives the test (an idle one would otherwise wait 60 s for more work)
        sh("dvc queue stop --kill", check=False, timeout=60)
        deadline = time.monotonic() + 30
        while (left := _processes_in(repo.resolve())) and time.monotonic() < deadline:
            time.sleep(0.5)
        for pid in set(left) - {os.getpid()}:
            os.kill(pid, 9)

    exps = [e for base in shown for e in base.get("experiments") or []]
    assert len(exps) == 2 and all(e["executor"]["state"] == "success" for e in exps), exps
    by_weight = {}
    for e in exps:
        data = e["revs"][0]["data"]
        w, metrics = data["params"]["params.yaml"]["data"]["merge_preferences"]["clinician_weight"], data["metrics"]
        by_weight[w] = {f: metrics[f"metrics/{f}.json"]["data"] for f in ("merge_preferences", "train_selector")}
    assert sorted(by_weight) == [1, 100]
    for w, m in by_weight.items():
        assert m["merge_preferences"]["clinician_weight"] == w  # each experiment merged with its own weight
        a = m["train_selector"]["test"]["clinician_alignment"]  # the split no epoch choice saw
        assert a["n"] > 0 and 0 <= a["low"] <= a["rate"] <= a["high"] <= 1, (w, a)
    assert by_weight[1]["train_selector"]["train_loss"] != by_weight[100]["train_selector"]["train_loss"]  # w mattered

    header, *rows = table.strip().splitlines()  # the README's table, as CSV
    cols = header.split(",")
    assert cols[:2] == ["Experiment", "State"] and "merge_preferences.clinician_weight" in cols
    shown_cols = {c.split(":")[-1] for c in cols}
    assert {f"test.clinician_alignment.{k}" for k in ("n", "rate", "low", "high")} <= shown_cols, header
    assert sum(",Success," in r for r in rows) == 2, table
    assert (repo / "params.yaml").read_bytes() == params_before  # the sweep never touched the workspace


@pytest.mark.slow
def test_selector_experiments_biomedclip_finetuned_per_conversation_logistic(repo, tmp_path, tiny_biomedclip):
    """A user with a (converted) BiomedCLIP switches backbone, unit, loss and fine-tuning by params alone."""
    run("dvc repro train_selector", repo)
    path = tiny_biomedclip(tmp_path / "biomedclip-hf")
    out = run(f"dvc exp run filter -S train_selector.backbone=biomedclip -S train_selector.backbone_model={path} "
              "-S train_selector.finetune_backbone=true -S train_selector.unit=conversation "
              "-S train_selector.aggregate=min -S train_selector.loss=logistic -S train_selector.epochs=3", repo).stdout
    assert ran(out) == ["merge_preferences", "train_selector", "filter"]  # pairs follow the selector's unit
    m = json.loads((repo / "metrics/train_selector.json").read_text())
    assert m["backbone"].startswith("biomedclip@") and m["finetune_backbone"] and m["unit"] == "conversation"
    pairs = pd.read_parquet(repo / "data/preferences/pairs.parquet")
    assert m["units"] == len(set(pairs["a_id"]) | set(pairs["b_id"]))  # what the pairs name, nothing more
    assert 1 <= m["best_epoch"] <= 3 and m["pairs_missing_units"] == 0
    assert not pairs.loc[pairs.source == "model", "a_id"].str.contains("#").any()  # conversation pairs
    epochs = pd.read_csv(repo / "metrics/train_selector_epochs.csv")
    assert list(epochs["epoch"]) == [1, 2, 3]
    assert {"validation_auc", "validation_map", "validation_mean_rank", "validation_model_accuracy"} <= set(epochs)
    assert (repo / "models/selector/backbone/model.safetensors").exists()
    card = (repo / "data/release/README.md").read_text()
    assert '"backbone": "biomedclip"' in card and '"unit": "conversation"' in card

    broken = run("dvc exp run filter -S train_selector.backbone=biomedclip -S train_selector.backbone_model=null",
                 repo, check=False)
    assert broken.returncode != 0 and "train_selector: backbone_model is null; allowed with backbone biomedclip" in broken.stderr


@pytest.mark.slow
def test_duplicates_and_eval_figures_in_a_user_corpus_cost_nothing_and_never_reach_the_release(repo, tmp_path):
    """20 figures: the 14 sample figures, two panels of one compound figure, two duplicates (the same pixels saved
    again, a JPEG copy at 0.8x) = 10%, and two eval images re-encoded (JPEG q=70, 0.8x) under other captions."""
    from PIL import Image

    from vital.corpus import build_sample

    corpus = tmp_path / "corpus"
    images = corpus / "images"
    records = build_sample(tmp_path / "store", 512).records
    store = ImageStore(tmp_path / "store")
    images.mkdir(parents=True)
    rows = []

    def add(rid, im_or_bytes, caption, pmid, domain="other", ext="png"):
        if isinstance(im_or_bytes, bytes):
            (images / f"{rid}.{ext}").write_bytes(im_or_bytes)
        else:
            im_or_bytes.save(images / f"{rid}.{ext}", **({"quality": 70} if ext == "jpg" else {}))
        rows.append({"pair_id": rid, "pmid": pmid, "fig_label": "Figure 1", "fig_caption": caption,
                     "in_text_mention": [caption], "domain": domain})

    for k, r in enumerate(records):
        add(r.id, store.read(r.image), r.caption, str(1000 + k), r.domain)
    cxr = records[0]
    with store.open(cxr.image) as im:
        im = im.convert("RGB")
        im.save(buf := __import__("io").BytesIO(), "PNG", compress_level=1)
        # same pixels, same size: the group keeps the smallest id ("sample-..." < "upload-...")
        add("upload-resaved", buf.getvalue(), "Posteroanterior chest film, reposted with a shorter legend.", "2001")
        add("upload-jpeg", im.resize((int(im.width * .8), int(im.height * .8))),
            "A chest film from a review article, shown again at a smaller size.", "2002", ext="jpg")
    with store.open(records[12].image) as im:  # the fundus photograph, as a compound figure's two panels
        w, h = im.size
        caption = "Fundus photographs: (a) the optic disc and (b) the macula of the same eye, colour images."
        add("panel-a", im.convert("RGB").crop((0, 0, w // 2, h)), caption, "3001")
        add("panel-b", im.convert("RGB").crop((w // 2, 0, w, h)), caption, "3001")
    eval_images = sorted((repo / "examples/eval/images").iterdir())[:2]
    captions = ["Teaching file case: a brain slice reproduced from an atlas, with the ventricles labelled.",
                "Reader quiz figure, reused without its original legend; identify the sequence and plane."]
    for k, path in enumerate(eval_images):
        with Image.open(path) as im:
            im = im.convert("RGB")
            add(f"evalcopy-{k}", im.resize((int(im.width * .8), int(im.height * .8))), captions[k], str(4000 + k),
                ext="jpg")
    (corpus / "fig_captions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["corpus"].update(source="path", path=str(corpus / "fig_captions.jsonl"), image_dir=str(images))
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    run("dvc repro filter", repo)

    assert json.loads((repo / "metrics/corpus.json").read_text())["records"] == 20
    dedup = json.loads((repo / "metrics/dedup.json").read_text())
    assert (dedup["figures"], dedup["duplicates"], dedup["by_reason"]) == (20, 2, {"exact_pixels": 1, "near_image": 1})
    dups = {d["id"]: d for d in map(json.loads, (repo / "data/corpus/duplicates.jsonl").read_text().splitlines())}
    assert set(dups) == {"upload-resaved", "upload-jpeg"} and {d["duplicate_of"] for d in dups.values()} == {cxr.id}
    decon = json.loads((repo / "metrics/decontaminate.json").read_text())
    assert (decon["figures"], decon["removed"], decon["kept"]) == (18, 2, 16)
    assert decon["by_eval_set"]["eval"]["matched_ids"] == 2
    report = pd.read_csv(repo / "data/release/contamination.csv", dtype=str)
    assert set(report["id"]) == {"evalcopy-0", "evalcopy-1"}
    assert set(report["eval_id"]) == {p.name for p in eval_images} and set(report["kind"]) == {"image_phash"}

    gone = {"upload-resaved", "upload-jpeg", "evalcopy-0", "evalcopy-1"}
    kept = {json.loads(x)["id"] for x in (repo / "data/corpus/records.jsonl").read_text().splitlines()}
    assert len(kept) == 16 and not kept & gone and {"panel-a", "panel-b"} <= kept
    generated = [json.loads(x) for x in (repo / "data/candidates/generated.jsonl").read_text().splitlines()]
    assert {c["image"].rsplit(".", 1)[0] for c in generated} == kept  # no request was made for a dropped figure
    release = json.loads((repo / "data/release/instructions.json").read_text())
    assert release and not {r["image"].rsplit(".", 1)[0] for r in release} & gone
    card = (repo / "data/release/README.md").read_text()
    assert "Decontamination" in card and "evalcopy" not in card


@pytest.mark.slow
def test_candidates_whose_image_went_missing_are_skipped_and_counted(repo):
    run("dvc repro filter", repo)
    convs = [json.loads(x) for x in (repo / "data/candidates/conversations.jsonl").read_text().splitlines()]
    store = ImageStore(repo / "data/corpus/images")
    pack(store, [n for n in store.names() if n != convs[0]["image"]], repo / "data/corpus/images")  # one image lost
    run("python stages/train_selector.py && python stages/filter.py", repo)
    m = json.loads((repo / "metrics/train_selector.json").read_text())
    pool = [json.loads(x) for x in (repo / "data/annotation/pool.jsonl").read_text().splitlines()]
    assert m["candidates_skipped"] == 1  # its rounds are never units
    assert m["units_missing_image"] == 2 * sum(q["image"] == convs[0]["image"] for q in pool)  # answers A and B
    f = json.loads((repo / "metrics/filter.json").read_text())
    assert f["skipped"] == 1 and f["skipped_examples"][0]["id"] == convs[0]["id"]
    assert "not found" in f["skipped_examples"][0]["problems"][0]
    skipped = [json.loads(x) for x in (repo / "data/candidates/filter_skipped.jsonl").read_text().splitlines()]
    assert [s["id"] for s in skipped] == [convs[0]["id"]]
    release = json.loads((repo / "data/release/instructions.json").read_text())
    assert convs[0]["id"] not in {r["id"] for r in release} and len(release) == math.ceil(0.8 * (len(convs) - 1))


@pytest.mark.slow
def test_an_s3_remote_round_trip_keeps_credentials_in_the_environment(repo, tmp_path):
    """Push to an S3 remote (a moto server on 127.0.0.1), clone, pull: the same bytes, nothing to recompute, and
    the credentials (from the environment) are in no file."""
    from moto.server import ThreadedMotoServer

    secret = f"secret-{uuid.uuid4().hex}"
    creds = dict(AWS_ACCESS_KEY_ID="vital-test", AWS_SECRET_ACCESS_KEY=secret, AWS_DEFAULT_REGION="us-east-1")
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        url = "http://{}:{}".format(*server.get_host_and_port())
        run("dvc repro corpus", repo)
        run("git add -A && git commit -q --allow-empty -m corpus", repo)  # often empty: it reproduces the lock
        run(f"python -c \"import boto3; boto3.client('s3', endpoint_url='{url}').create_bucket(Bucket='vital')\"",
            repo, **creds)
        local = f"dvc remote add -f --local s3 s3://vital/store && dvc remote modify --local s3 endpointurl {url}"
        run(local, repo)  # in .dvc/config.local: an endpoint of this machine, not for git
        assert "pushed" in run("dvc push -r s3", repo, **creds).stdout
        clone = tmp_path / "s3clone"
        run(f"git clone -q {repo} {clone}", tmp_path)
        run(f"{local} && dvc pull -r s3 corpus", clone, **creds)
        images = sorted(p.name for p in (repo / "data/corpus/images").iterdir())
        assert images and images == sorted(p.name for p in (clone / "data/corpus/images").iterdir())
        for f in ["data/corpus/ingested.jsonl", *(f"data/corpus/images/{i}" for i in images)]:
            assert (clone / f).read_bytes() == (repo / f).read_bytes(), f
        assert ran(run("dvc repro corpus", clone).stdout) == []
    finally:
        server.stop()
    for f in [*repo.rglob("*"), *clone.rglob("*")]:
        if f.is_file() and ".git" not in f.parts:
            assert secret.encode() not in f.read_bytes(), f


@pytest.mark.slow
def test_an_imported_release_feeds_the_tune_stage_by_params(repo, tmp_path, sample):
    """`vital release import` of a file in the official format, then `tune` on it by params alone: the stage
    reads the imported conversations and packed images, and the model card names them."""
    records, image_dir = sample
    figures = tmp_path / "figures"
    unpack(image_dir, figures)  # what a user downloaded: a plain folder
    official = [{"id": f"PMC{i}", "image": r.image, "domain": "CT", "conversations": [
        {"from": "human", "value": "What is shown?\n<image>"}, {"from": "gpt", "value": f"Figure {i}."}]}
        for i, r in enumerate(records[:4])]
    src = tmp_path / "BioMed-VITAL-instructions-60K.json"
    src.write_text(json.dumps(official))
    run(f"vital release import {src.as_uri()} --images {figures}", repo)
    out = "data/external/biomed-vital-instructions-60k"
    exp = run(f"dvc exp run -s tune -S tune.data={out}/instructions.json -S tune.images={out}/images", repo).stdout
    assert ran(exp) == ["tune"]
    assert json.loads((repo / "metrics/tune.json").read_text())["train_examples"] == 4
    card = (repo / "models/vlm/adapter/README.md").read_text()
    assert f"`{out}/instructions.json`: 4 conversations" in card and f"`{out}/README.md`" in card

    # the same stage on two processes (torchrun on CPU; on GPUs: -S tune.accelerate_config=configs/accelerate/
    # ddp.yaml -S tune.num_processes=N): the main process alone writes the adapter, card and metrics
    shutil.rmtree(repo / "models/vlm")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    run(f"{sys.executable} -m torch.distributed.run --nproc_per_node 2 --master_addr 127.0.0.1 --master_port {port} "
        "stages/tune.py", repo, OMP_NUM_THREADS="1")
    m = json.loads((repo / "metrics/tune.json").read_text())
    assert m["processes"] == 2 and m["train_examples"] == 4 and (repo / "models/vlm/adapter/adapter_model.safetensors").exists()
