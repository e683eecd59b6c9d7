"""Provenance and licence per record: licences into the corpus, provenance onto every released record, the
`filter.licenses` allow-list, and the image manifest that `vital validate release` checks."""
import hashlib
import importlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from datasets import load_dataset
from PIL import Image
from typer.testing import CliRunner

from vital import release
from vital.cli import app
from vital.corpus import CorpusError, ingest
from vital.images import ImageStore, unpack
from vital.provenance import normalise_license, params_sha256, pmcid_of, read_licenses, revision
from vital.schema import Conversation, CorpusRecord, Rating, write_jsonl

ROOT = Path(__file__).resolve().parents[1]
OA_HEADER = "File,Article Citation,Accession ID,Last Updated (YYYY-MM-DD HH:MM:SS),PMID,License\n"


def _figure_dir(tmp_path: Path, ids) -> Path:
    images = tmp_path / "images"
    images.mkdir(exist_ok=True)
    for i, rid in enumerate(ids):
        Image.new("RGB", (40 + i, 30), (20 * i, 90, 160)).save(images / f"{rid}.png")
    return images


def _corpus(tmp_path: Path, records: list[dict]) -> Path:
    path = tmp_path / "corpus.jsonl"
    path.write_text("".join(json.dumps({"fig_caption": f"Caption of {r['pair_id']}.", **r}) + "\n" for r in records))
    return path


def _git(cwd, *args):
    return subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=cwd, check=True,
                          capture_output=True, text=True).stdout.strip()


# ------------------------------------------------------------------ licences into the corpus

def test_licence_spellings_are_made_one_and_anything_else_is_kept_as_written():
    for spelling in ("CC BY", "CC-BY", "cc by 4.0", "CC_BY", "Creative Commons Attribution 4.0 International"):
        assert normalise_license(spelling) == "CC BY", spelling
    assert normalise_license("cc-by-nc-sa-4.0") == normalise_license("CC BY-SA-NC") == "CC BY-NC-SA"
    assert normalise_license("CC0 1.0") == normalise_license("cc-0") == "CC0"
    assert normalise_license("no_cc_code") == "NO-CC CODE"
    assert normalise_license(None) == normalise_license("") == normalise_license(float("nan")) == "unknown"
    assert normalise_license("  Elsevier user license ") == "Elsevier user license"  # not guessed
    assert pmcid_of({}, "PMC1234567_F1") == "PMC1234567" and pmcid_of({"pmcid": "765"}, "x") == "PMC765"
    assert pmcid_of({}, "PMC12abc_F1") is None and pmcid_of({}, "fig_PMC1") is None


def test_licence_from_a_column_and_unknown_stays_unknown(tmp_path):
    ids = ["PMC1234567_F1", "PMC2_F2", "plain_3"]
    images = _figure_dir(tmp_path, ids)
    path = _corpus(tmp_path, [
        {"pair_id": ids[0], "license": "cc-by-4.0", "pmid": "11", "url": "https://user:pw@example.org/f1.png?sig=x"},
        {"pair_id": ids[1], "licence": "CC BY-NC 4.0", "image_url": "https://example.org/f2.png"},
        {"pair_id": ids[2]}])
    got = {r.id: r for r in ingest(path, images, None, strict=True).records}
    a, b, c = got[ids[0]], got[ids[1]], got[ids[2]]
    assert (a.license, a.pmcid, a.pmid, a.fig_label) == ("CC BY", "PMC1234567", "11", "")
    assert a.source == "corpus.jsonl:1" and a.source_url == "https://***@example.org/f1.png?***"  # no credentials
    assert (b.license, b.pmcid, b.source_url) == ("CC BY-NC", "PMC2", "https://example.org/f2.png")
    assert (c.license, c.pmcid, c.source_url) == ("unknown", None, None)
    old = {"id": "x", "image": "x.png", "caption": "c", "fig_label": "", "inline_mentions": [], "domain": "other",
           "source": "a:1", "pmid": None}  # a record written before these fields still loads
    assert CorpusRecord(**old).license == "unknown" and CorpusRecord(**old).pmcid is None


def test_licence_from_the_pmc_oa_file_list_or_a_plain_side_file(tmp_path):
    ids = ["PMC13900_F1", "PMC13901_F2", "PMC99_F3", "other_4"]
    images = _figure_dir(tmp_path, ids)
    path = _corpus(tmp_path, [{"pair_id": ids[0]}, {"pair_id": ids[1], "license": "CC0"}, {"pair_id": ids[2]},
                              {"pair_id": ids[3], "pmcid": "PMC13901"}])
    oa = tmp_path / "oa_file_list.csv"  # as NCBI publishes it
    oa.write_text(OA_HEADER +
                  'oa_package/08/e0/PMC13900.tar.gz,"Breast Cancer Res. 2001; 3(1):55-60",PMC13900,'
                  "2019-11-05 11:54:14,11250746,CC BY\n"
                  "oa_package/b0/ac/PMC13901.tar.gz,Breast Cancer Res. 2001; 3(1):61,PMC13901,"
                  "2019-11-05 11:54:14,,cc by-nc-nd 4.0\n")
    got = {r.id: r for r in ingest(path, images, None, strict=True, licenses=oa).records}
    assert (got[ids[0]].license, got[ids[0]].pmid) == ("CC BY", "11250746")  # the list's PMID fills a missing one
    assert got[ids[1]].license == "CC0"  # the record's own column wins over the side file
    assert got[ids[2]].license == "unknown"  # not listed: never guessed
    assert (got[ids[3]].license, got[ids[3]].pmcid) == ("CC BY-NC-ND", "PMC13901")  # by its pmcid column
    plain = tmp_path / "licenses.csv"
    plain.write_text("pmcid,license\nPMC13900,CC-BY-NC\n99,CC0\n")
    jsonl = tmp_path / "licenses.jsonl"
    write_jsonl(jsonl, [{"pmcid": "PMC13900", "licence": "CC-BY-NC"}, {"pmcid": "PMC99", "license": "cc0"}])
    assert read_licenses(plain) == read_licenses(jsonl) == {"PMC13900": {"license": "CC BY-NC", "pmid": None},
                                                            "PMC99": {"license": "CC0", "pmid": None}}
    got = {r.id: r for r in ingest(path, images, None, strict=True, licenses=plain).records}
    assert (got[ids[0]].license, got[ids[2]].license) == ("CC BY-NC", "CC0")
    (tmp_path / "bad.csv").write_text("id,terms\nPMC1,CC BY\n")
    with pytest.raises(CorpusError, match="corpus.licenses: .*bad.csv: no PMC id and licence columns"):
        ingest(path, images, None, strict=True, licenses=tmp_path / "bad.csv")
    out = CliRunner().invoke(app, ["validate", "corpus", str(path), "--image-dir", str(images), "--licenses", str(oa)])
    assert out.exit_code == 0 and "licences: CC BY=1, CC BY-NC-ND=1, CC0=1, unknown=1" in out.output


def test_the_sample_states_the_licences_its_packages_give(sample):
    records, _ = sample
    by_id = {r.id: r.license for r in records}
    assert by_id["sample-cxr-rg1"] == "MIT" and by_id["sample-fundus"] == by_id["sample-cell-phase"] == "CC0"
    assert by_id["sample-ihc-colon"] == "No known copyright restrictions"


# ------------------------------------------------------------------ provenance on every released record

def test_the_revision_is_head_dirty_when_code_differs_and_unknown_outside_git(tmp_path):
    params = {"filter": {"ratio": 0.8}, "corpus": {"licenses": None}}
    assert revision(params, tmp_path) == {"git_commit": "unknown", "params_sha256": params_sha256(params)}
    assert params_sha256({"b": 1, "a": [1, 2]}) == params_sha256({"a": [1, 2], "b": 1})
    (tmp_path / "src").mkdir()
    (tmp_path / "src/x.py").write_text("x = 1\n")
    _git(tmp_path, "init", "-q")
    _git(tmp_path, "add", "-A")
    _git(tmp_path, "commit", "-qm", "init")
    head = _git(tmp_path, "rev-parse", "HEAD")
    assert revision(params, tmp_path)["git_commit"] == head
    (tmp_path / "notes.txt").write_text("not code")  # untracked, outside src/stages/dvc.yaml
    assert revision(params, tmp_path) == revision(params, tmp_path) and revision(params, tmp_path)["git_commit"] == head
    (tmp_path / "src/x.py").write_text("x = 2\n")
    assert revision(params, tmp_path)["git_commit"] == f"{head}-dirty"


def _release_records(sample, n=4):
    records, _ = sample
    turns = [{"from": "human", "value": "What is shown?"}, {"from": "gpt", "value": "A figure."},
             {"from": "human", "value": "Which side?"}, {"from": "gpt", "value": "The left."}]
    scores = {"f0#0": 6, "f0#1": None, "f1#0": 8, "f1#1": 9, "f2#0": None, "f2#1": None}  # f3: not rated
    rev = {"git_commit": "abc123", "params_sha256": "f" * 64}
    out = []
    for i, r in enumerate(records[:n]):
        figure = CorpusRecord(**{**r.__dict__, "id": f"f{i}", "pmid": f"{100 + i}", "pmcid": f"PMC{i + 1}",
                                 "license": ["CC BY", "CC BY-NC", "CC0", "unknown"][i]})
        c = Conversation(f"f{i}", r.image, r.domain, turns, "offline", "gen-model", "h", demo_ids=[f"demo-{i}"])
        out.append(release.to_llava(c, 0.9 - i / 10, figure, scores, rev))
    return out


def test_released_records_carry_every_provenance_field_in_each_format(tmp_path, sample):
    recs = _release_records(sample)
    assert all(set(release.PROVENANCE) <= set(r) for r in recs)
    f0, f1, f2, f3 = recs
    assert (f0["figure_id"], f0["pmid"], f0["pmcid"], f0["license"]) == ("f0", "100", "PMC1", "CC BY")
    assert f0["generator"] == "offline:gen-model" and f0["demo_ids"] == ["demo-0"] and f0["selector_score"] == 0.9
    assert f0["source"].startswith("sample:") and f0["revision"] == {"git_commit": "abc123", "params_sha256": "f" * 64}
    assert (f0["rating"], f0["round_ratings"]) == (6, [6, None])  # the mean of the parsed rounds
    assert (f1["rating"], f1["round_ratings"]) == (8.5, [8, 9])
    assert (f2["rating"], f2["round_ratings"]) == (None, [None, None])  # rated, none parsed
    assert (f3["rating"], f3["round_ratings"]) == (None, None)  # never rated
    root = tmp_path / "provenance-release"  # a name of its own: the session's `datasets` cache keys a local
    # folder by its name and its files' mtimes, not its path, and served another test's `release/` here
    card = release.data_card(recs, "4 kept.", None, "words", [5] * 4, root=str(root),
                             licenses={"allow": None, "dropped": {}})
    release.write_release(root, recs, sample[1], card, 0.05)
    assert json.loads((root / "instructions.json").read_text()) == recs
    ds = load_dataset(str(root), split="train")
    assert ds.column_names == release.RELEASE_SCHEMA.names
    for row, r in zip(ds, recs):
        assert {k: row[k] for k in release.PROVENANCE} == {k: r[k] for k in release.PROVENANCE}
    text = (root / "README.md").read_text()
    assert "## Licences" in text and "| CC BY-NC | 1 |" in text and "| unknown | 1 |" in text
    assert "git `abc123`" in text and "every licence kept" in text
    rows = [json.loads(x) for x in (root / "manifest.jsonl").read_text().splitlines()]
    corpus = ImageStore(sample[1])
    assert [m["figure_id"] for m in rows] == ["f0", "f1", "f2", "f3"]
    for m, r in zip(rows, recs):
        data = corpus.read(r["image"])
        with corpus.open(r["image"]) as im:
            assert (m["width"], m["height"]) == im.size
        assert (m["image"], m["sha256"], m["size"]) == (r["image"], hashlib.sha256(data).hexdigest(), len(data))
        assert (m["source"], m["license"]) == (r["source"], r["license"])


# ------------------------------------------------------------------ filter.licenses, in the filter stage

@pytest.fixture
def filter_stage(tmp_path, sample, monkeypatch):
    """stages/filter.py run in-process in a working copy holding what it reads, the selector replaced by a fixed
    score (what the stage does with licences is under test, not the selector)."""
    records, image_dir = sample
    work = tmp_path / "work"
    shutil.copytree(image_dir, work / "data/corpus/images")
    licenses = ["CC BY", "CC BY-NC", "CC0", "cc-by-nc-4.0", "unknown", "CC BY"]
    figures = [CorpusRecord(**{**r.__dict__, "license": normalise_license(lic)}) for r, lic in zip(records, licenses)]
    write_jsonl(work / "data/corpus/records.jsonl", figures)
    turns = [{"from": "human", "value": "What is shown?"}, {"from": "gpt", "value": "A figure."}]
    write_jsonl(work / "data/candidates/conversations.jsonl",
                [Conversation(r.id, r.image, r.domain, turns, "offline", "m", "h", ["d1"]) for r in figures])
    write_jsonl(work / "data/candidates/ratings.jsonl",
                [Rating(f"{r.id}#0", r.id, 0, 7, "j", "offline", "7", "h") for r in figures])
    (work / "metrics").mkdir()
    for stage in ("decontaminate", "decontaminate_qa"):  # the audit the card states: no eval set here
        (work / f"metrics/{stage}.json").write_text(json.dumps({"by_eval_set": {}}))
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "ATEN_CPU_CAPABILITY", "MKL_CBWR"):
        monkeypatch.setenv(var, "1" if "THREADS" in var else "avx2")  # what common sets, undone after the test
    monkeypatch.chdir(work)
    monkeypatch.syspath_prepend(str(ROOT / "stages"))
    from vital import selector

    def run(rank=lambda i: i, **filter_params):  # rank: the i-th candidate scored's place (0: best)
        params["filter"].update(filter_params)
        (work / "params.yaml").write_text(yaml.safe_dump(params))
        for name in ("common", "filter"):
            sys.modules.pop(name, None)
        stage = importlib.import_module("filter")
        scored = []

        def score(candidates, *_, **__):
            scored.extend(c.id for c in candidates)
            return {c.id: 1.0 - rank(i) / 100 for i, c in enumerate(candidates)}, {"backbone": "fixed"}

        monkeypatch.setattr(selector, "score_conversations", score)
        monkeypatch.setattr(stage, "compare_with_baselines", lambda *a, **k: None)
        stage.main()
        return scored, json.loads((work / "metrics/filter.json").read_text())

    yield work, figures, run
    for name in ("common", "filter"):
        sys.modules.pop(name, None)


def test_filter_licenses_drops_non_commercial_figures_before_selection_and_says_so(filter_stage):
    work, figures, run = filter_stage
    scored, m = run(ratio=1.0, licenses=["CC-BY", "CC0"])  # spelled otherwise: the same licences
    non_commercial = {r.id for r in figures if r.license in ("CC BY-NC", "unknown")}
    assert len(non_commercial) == 3 and not non_commercial & set(scored)  # never scored, never selected
    assert m["licenses"] == ["CC BY", "CC0"] and m["dropped_by_license"] == {"CC BY-NC": 2, "unknown": 1}
    assert m["kept"] == 3 and m["kept_by_license"] == {"CC BY": 2, "CC0": 1}
    out = json.loads((work / "data/release/instructions.json").read_text())
    assert {r["license"] for r in out} == {"CC BY", "CC0"} and all(r["rating"] == 7 for r in out)
    assert all(r["revision"]["git_commit"] == "unknown" for r in out)  # not a git repository
    card = (work / "data/release/README.md").read_text()
    assert "Allow-list (`filter.licenses`): CC BY, CC0" in card and "CC BY-NC: 2, unknown: 1" in card


def test_without_an_allow_list_every_licence_is_kept_and_a_rerun_is_byte_identical(filter_stage):
    work, figures, run = filter_stage
    _git(work, "init", "-q")
    _git(work, "add", "-A")
    _git(work, "commit", "-qm", "inputs")
    _, m = run(ratio=1.0, licenses=None)
    assert m["dropped_by_license"] == {} and m["kept"] == len(figures) and m["licenses"] is None
    first = {p: (work / "data/release" / p).read_bytes() for p in ("instructions.json", "README.md", "manifest.jsonl")}
    out = json.loads(first["instructions.json"])
    assert {r["revision"]["git_commit"] for r in out} == {_git(work, "rev-parse", "HEAD")}
    run(ratio=1.0, licenses=None)  # the same checkout: the same bytes
    assert {p: (work / "data/release" / p).read_bytes() for p in first} == first
    assert json.loads((work / "metrics/filter.json").read_text()) == m


def test_filter_reads_candidates_from_the_file_in_rank_order_and_a_broken_line_stops_it_naming_it(filter_stage):
    """The stage never holds the candidates: it streams the file to score them and reads the kept ones back by
    their byte offsets (non-ASCII text before them moves those), in the selector's order."""
    work, figures, run = filter_stage
    path = work / "data/candidates/conversations.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    for k, r in enumerate(rows):
        r["conversations"][1]["value"] = "Ein Präparat, 5 µm, ×40 — " * (k + 1)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    corpus = work / "data/corpus/records.jsonl"  # the records too are looked up by offset (common.Indexed)
    recs = [json.loads(line) for line in corpus.read_text().splitlines()]
    for k, r in enumerate(recs):
        r["caption"] = "Schnitt — 5 µm, ×40; " * (len(recs) - k) + r["caption"]
    corpus.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in reversed(recs)), encoding="utf-8")
    order = [3, 0, 5, 1, 4, 2]  # the file's rows, best first
    _, m = run(rank=order.index, ratio=1.0, licenses=None)
    out = json.loads((work / "data/release/instructions.json").read_text())
    assert [r["id"] for r in out] == [rows[k]["id"] for k in order] and m["kept"] == len(rows)
    assert [r["license"] for r in out] == [figures[k].license for k in order]  # each its own record's
    assert [r["conversations"][1]["value"] for r in out] == [rows[k]["conversations"][1]["value"] for k in order]
    lines = path.read_text().splitlines(keepends=True)
    path.write_text("".join(lines[:2] + ['{"id": "broken", "image"\n'] + lines[2:]))
    with pytest.raises(SystemExit) as e:
        run(ratio=1.0, licenses=None)
    assert str(e.value).startswith("data/candidates/conversations.jsonl:3: ") and "dvc repro -f decontaminate_qa" in str(e.value)
    path.write_text("".join(lines))
    corpus.write_text(corpus.read_text(encoding="utf-8") + '{"image": "no id"}\n', encoding="utf-8")
    with pytest.raises(SystemExit, match=r"^data/corpus/records.jsonl:7: not a record with an id \(KeyError"):
        run(ratio=1.0, licenses=None)


# ------------------------------------------------------------------ the manifest, checked by `vital validate release`

def test_validate_release_names_a_missing_and_a_changed_image_by_id(tmp_path, sample):
    recs = _release_records(sample)
    root = tmp_path / "release"
    release.write_release(root, recs, sample[1], release.data_card(recs, "o", None, "w", [5] * 4, root=str(root)), 1)
    unpack(root / "data", root / "images")
    ok = CliRunner().invoke(app, ["validate", "release", str(root / "instructions.json")])
    assert ok.exit_code == 0 and "4 images checked" in ok.output and "0 missing or changed" in ok.output, ok.output
    (root / "images" / recs[1]["image"]).unlink()  # LLaVA's folder: one image lost, one edited
    Image.new("RGB", (8, 8)).save(root / "images" / recs[2]["image"])
    p = subprocess.run([sys.executable, "-m", "vital.cli", "validate", "release", str(root)], capture_output=True,
                       text=True, timeout=120)  # a release folder, as a user names it
    assert p.returncode == 1 and "Traceback" not in p.stdout + p.stderr, p.stderr
    lines = [x.strip() for x in p.stdout.splitlines()]
    assert "2 missing or changed" in p.stdout
    assert any(x.startswith(f"f1: image '{recs[1]['image']}' is missing from {root / 'images'}") for x in lines)
    assert any(x.startswith(f"f2: image '{recs[2]['image']}' in {root / 'images'} has changed") for x in lines)
    assert not any(x.startswith(("f0:", "f3:")) for x in lines)
    shutil.rmtree(root / "images")  # the parquet shards themselves: a row's bytes replaced
    shard = next((root / "data").glob("train-*.parquet"))
    table = pq.read_table(shard)
    images = table.column("image").to_pylist()
    images[0] = {**images[0], "bytes": images[0]["bytes"] + b"\0"}
    table = table.set_column(table.schema.get_field_index("image"), table.schema.field("image"),
                             pa.array(images, type=table.schema.field("image").type))
    pq.write_table(table, shard)
    bad = CliRunner().invoke(app, ["validate", "release", str(root / "instructions.json")])
    assert bad.exit_code == 1 and f"f0: image '{recs[0]['image']}' in {root / 'data'} has changed" in bad.output
    (root / "manifest.jsonl").write_text("{not json\n")
    broken = CliRunner().invoke(app, ["validate", "release", str(root / "instructions.json")])
    assert broken.exit_code == 2 and "manifest.jsonl:1: not valid JSON" in broken.output
