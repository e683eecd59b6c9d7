"""dedup and decontaminate on real figures: re-saves, re-encodes, panels, captions, and the three eval layouts."""
import io
import itertools
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from vital.decontaminate import containment_pairs, figure_matches, qa_text, text_matches
from vital.dedup import MIN_CAPTION_WORDS, find_duplicates, hamming_pairs, image_hashes
from vital.encoders import encode_texts
from vital.evalsets import EvalSetError, read_eval_set
from vital.images import ImageStore


@pytest.fixture(scope="module")
def figures(sample):
    records, image_dir = sample
    store = ImageStore(image_dir)
    out = {}
    for r in records:
        with store.open(r.image) as im:
            out[r.id] = (im.convert("RGB"), r)
    return out


def jpeg(im: Image.Image, quality=70, scale=0.8) -> Image.Image:
    buf = io.BytesIO()
    im.resize((int(im.width * scale), int(im.height * scale))).save(buf, "JPEG", quality=quality)
    return Image.open(io.BytesIO(buf.getvalue())).convert("RGB")


def resave(im: Image.Image, fmt: str) -> Image.Image:
    buf = io.BytesIO()
    im.save(buf, fmt, **({"compress_level": 1} if fmt == "PNG" else {}))
    return Image.open(io.BytesIO(buf.getvalue()))


def dedup(items, phash_distance=8, caption_jaccard=0.9):
    """items: [(id, image, caption, pmid)] -> {id: Duplicate}"""
    hashes = [image_hashes(im) for _, im, _, _ in items]
    dups = find_duplicates([i for i, *_ in items], [h[0] for h in hashes], np.array([h[1] for h in hashes],
                           dtype=np.uint64), [im.width * im.height for _, im, _, _ in items],
                           [c for *_, c, _ in items], [p for *_, p in items], phash_distance, caption_jaccard)
    return {d.id: d for d in dups}


def test_the_same_pixels_saved_again_and_a_jpeg_copy_are_duplicates_and_the_largest_copy_is_kept(figures):
    cxr, rec = figures["sample-cxr-rg1"]
    ct, ct_rec = figures["sample-ct-head"]
    items = [("a-png", resave(cxr, "PNG"), rec.caption, "1"), ("a-tiff", resave(cxr, "TIFF"), "another text", "2"),
             ("a-jpeg", jpeg(cxr), "a third caption", "3"), ("b", ct, ct_rec.caption, "4")]
    dups = dedup(items)
    assert set(dups) == {"a-tiff", "a-jpeg"}  # b, a CT, is another figure
    assert dups["a-tiff"].reason == "exact_pixels" and dups["a-tiff"].distance == 0
    assert dups["a-jpeg"].reason == "near_image" and 0 <= dups["a-jpeg"].distance <= 4
    # a-png and a-tiff have the same size; the JPEG is smaller: the tie goes to the smaller id
    assert {d.duplicate_of for d in dups.values()} == {"a-png"}


def test_panels_of_one_compound_figure_are_not_duplicates_though_they_share_a_caption(figures):
    us, rec = figures["sample-us-pelvis"]  # a dual-panel ultrasound: two panels of one figure
    w, h = us.size
    left, right = us.crop((0, 0, w // 2, h)), us.crop((w // 2, 0, w, h))
    items = [("fig2a", left, rec.caption, "77"), ("fig2b", right, rec.caption, "77")]
    assert dedup(items) == {}
    # the same caption in another paper, with another image, is a reused figure
    items = [("p1", left, rec.caption, "77"), ("p2", figures["sample-fundus"][0], rec.caption, "78")]
    dups = dedup(items)
    assert list(dups) == ["p1"] and dups["p1"].reason == "near_caption"  # the fundus photo is larger: kept
    assert dups["p1"].duplicate_of == dups["p1"].matched == "p2"
    # a short caption names no one figure
    short = "Chest X-ray."
    assert len(short.split()) < MIN_CAPTION_WORDS
    assert dedup([("s1", left, short, None), ("s2", figures["sample-fundus"][0], short, None)]) == {}


def test_distinct_figures_of_one_modality_are_never_near_duplicates(figures):
    cts = [(i, im, r.caption, None) for i, (im, r) in figures.items()]
    assert dedup(cts) == {}
    hashes = [image_hashes(im)[1] for im, _ in figures.values()]
    nearest = min(bin(a ^ b).count("1") for a, b in itertools.combinations(hashes, 2))
    assert nearest > 8, nearest  # the default phash_distance leaves room


@pytest.mark.parametrize("distance", [0, 3, 8, 13])
def test_the_banded_index_finds_exactly_the_pairs_a_brute_force_finds(distance):
    rng = np.random.default_rng(distance)
    base = rng.integers(0, 2**63, 300, dtype=np.uint64)
    flips = rng.integers(0, 64, (300, 10))
    near = base.copy()
    for k in range(300):  # a noisy copy of each hash: some within the distance, some beyond
        for bit in flips[k, :rng.integers(0, 11)]:
            near[k] ^= np.uint64(1) << np.uint64(bit)
    a = np.concatenate([base, near])
    brute = {(i, j) for i in range(len(a)) for j in range(i + 1, len(a))
             if bin(int(a[i]) ^ int(a[j])).count("1") <= distance}
    assert {(i, j) for i, j, _ in hamming_pairs(a, None, distance)} == brute
    cross = {(i, j) for i in range(300) for j in range(300) if bin(int(base[i]) ^ int(near[j])).count("1") <= distance}
    assert {(i, j) for i, j, _ in hamming_pairs(base, near, distance)} == cross



@pytest.mark.parametrize("containment", [0.5, 0.8, 1.0])
def test_the_rare_bigram_index_finds_exactly_the_rounds_a_brute_force_finds(containment):
    rng = np.random.default_rng(int(containment * 10))
    vocab = [f"w{k}".encode() for k in range(60)]  # a small vocabulary: many partial overlaps
    items = [set(rng.choice(vocab, rng.integers(1, 15), replace=False)) for _ in range(80)]
    texts = [set(rng.choice(vocab, rng.integers(0, 40), replace=False)) for _ in range(300)]
    texts += [set(list(q)[:len(q) - rng.integers(0, 3)]) | set(rng.choice(vocab, 5)) for q in items]  # near copies
    brute = {(k, y) for k, t in enumerate(texts) for y, q in enumerate(items) if len(q & t) / len(q) >= containment}
    found = containment_pairs(texts, items, containment)
    assert {(k, y) for k, y, _ in found} == brute and len(brute) > 20
    assert all(c == len(items[y] & texts[k]) / len(items[y]) for k, y, c in found)

# ------------------------------------------------------------------ eval sets in the layouts users have

def _png(im: Image.Image) -> bytes:
    buf = io.BytesIO()
    im.save(buf, "PNG")
    return buf.getvalue()


@pytest.fixture
def eval_sets(tmp_path, figures):
    """A VQA-RAD-like Hugging Face parquet set, a SLAKE folder and a set in this repository's format, each
    holding one figure of the sample (the contamination a test plants) and a synthetic one."""
    cxr, ct, ihc = (figures[k][0] for k in ("sample-cxr-rg1", "sample-ct-head", "sample-ihc-colon"))
    noise = Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8))
    hf = tmp_path / "vqa_rad"
    (hf / "data").mkdir(parents=True)
    table = pa.table({"image": [{"bytes": _png(cxr), "path": "synpic1.jpg"}, {"bytes": _png(noise), "path": "n.jpg"}],
                      "question": ["What abnormality is seen in the lungs?", "Is this normal?"],
                      "answer": ["multiple rounded nodules", "yes"]})
    pq.write_table(table, hf / "data/test-00000-of-00001.parquet")
    slake = tmp_path / "slake"
    (slake / "imgs/xmlab1").mkdir(parents=True)
    ct.save(slake / "imgs/xmlab1/source.jpg", quality=95)
    (slake / "test.json").write_text(json.dumps([
        {"qid": 11, "img_name": "xmlab1/source.jpg", "question": "Which window is used to display this head CT?",
         "answer": "A bone window", "q_lang": "en", "answer_type": "OPEN", "modality": "CT"}]))
    ours = tmp_path / "ours"
    (ours / "images").mkdir(parents=True)
    ihc.save(ours / "images/e1.png")
    (ours / "chat.jsonl").write_text(json.dumps({
        "question_id": "c1", "image": "e1.png", "text": "What does the brown stain mark?",
        "gpt4_answer": "FHL2 protein in the glandular epithelium.", "domain": "histology",
        "fig_caption": figures["sample-ihc-colon"][1].caption, "fig_inline_mention": ""}) + "\n")
    return [hf, slake, ours]


def test_every_layout_is_read_and_a_broken_set_is_named(eval_sets, tmp_path):
    sets = [read_eval_set(p) for p in eval_sets]
    assert [(s.name, s.layout, len(s.items), len(s.images)) for s in sets] == [
        ("vqa_rad", "huggingface", 2, 2), ("slake", "slake", 1, 1), ("ours", "vital", 1, 1)]
    assert sets[1].items[0]["id"] == "slake/11" and sets[2].items[0]["id"] == "chat/c1"
    (eval_sets[1] / "imgs/xmlab1/source.jpg").unlink()
    with pytest.raises(EvalSetError, match=r"test.json: item 1: image .*source.jpg is missing"):
        read_eval_set(eval_sets[1])
    (tmp_path / "empty").mkdir()
    with pytest.raises(EvalSetError, match="not an eval set"):
        read_eval_set(tmp_path / "empty")


def test_a_reencoded_eval_image_and_a_paraphrased_eval_question_are_caught_and_nothing_else_is(eval_sets, figures):
    sets = [read_eval_set(p) for p in eval_sets]
    ids = list(figures)
    planted = {"planted-cxr": jpeg(figures["sample-cxr-rg1"][0])}  # JPEG q=70 at 0.8x of a VQA-RAD image
    images = [figures[i][0] for i in ids] + list(planted.values())
    hashes = [image_hashes(im) for im in images]
    captions = [figures[i][1].caption for i in ids] + ["A radiograph."]
    rows = figure_matches(ids + list(planted), [h[0] for h in hashes], np.array([h[1] for h in hashes], np.uint64),
                          captions, sets, 8, 0.8)
    matched = {(r["id"], r["eval_set"], r["kind"]) for r in rows}
    assert ("planted-cxr", "vqa_rad", "image_phash") in matched
    # the sample figures the fixture copied are caught as well, by image (and by caption for the chat set)
    assert {("sample-cxr-rg1", "vqa_rad", "image_exact"), ("sample-ct-head", "slake", "image_phash"),
            ("sample-ihc-colon", "ours", "image_exact"), ("sample-ihc-colon", "ours", "caption")} <= matched
    false_positives = {r["id"] for r in rows} - {"planted-cxr", "sample-cxr-rg1", "sample-ct-head", "sample-ihc-colon"}
    assert false_positives == set()  # 11 other figures, 4 of the same modalities as the eval images

    rounds = [("gen-1#0", qa_text("Which abnormality can be seen in the lungs?",
                                  "The lungs show multiple rounded nodules.")),  # a paraphrase
              ("gen-2#1", qa_text("What window is used to display this head CT?", "A bone window is used.")),
              ("gen-3#0", qa_text("What imaging modality is this?", "It is an axial CT of the head.")),
              ("gen-4#0", qa_text("Is this normal?", "Yes."))]  # the generic eval item is too short to match
    rows, short = text_matches(rounds, sets, 6, 0.8, 0.9, encode_texts)
    assert {(r["id"], r["eval_set"]) for r in rows} == {("gen-1#0", "vqa_rad"), ("gen-2#1", "slake")}
    assert {r["kind"] for r in rows if r["id"] == "gen-2#1"} >= {"text_bigrams"}
    assert short == {"vqa_rad": 1, "slake": 0, "ours": 0}
    rows, _ = text_matches(rounds, sets, 6, 0.8, None)  # MinHash alone: the near-verbatim copy only
    assert {r["id"] for r in rows} == {"gen-2#1"}


# ------------------------------------------------------------------ the stages, as `dvc repro` runs them

def stage_repo(tmp_path, sample, eval_sets, **decontaminate):
    """A working copy with what the three stages read: params.yaml, the ingested corpus and its images."""
    import shutil
    from pathlib import Path

    import yaml

    from vital.schema import write_jsonl

    root = Path(__file__).resolve().parents[1]
    records, image_dir = sample
    repo = tmp_path / "repo"
    shutil.copytree(root / "stages", repo / "stages", ignore=shutil.ignore_patterns("__pycache__"))
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["decontaminate"].update(eval_root=str(eval_sets[0].parent), eval_sets=[p.name for p in eval_sets],
                                   **decontaminate)
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    write_jsonl(repo / "data/corpus/ingested.jsonl", records)
    shutil.copytree(image_dir, repo / "data/corpus/images")
    (repo / "data/release").mkdir(parents=True)
    return repo


def run_stage(repo, name, ok=True):
    import os
    import subprocess
    import sys

    p = subprocess.run([sys.executable, f"stages/{name}.py"], cwd=repo, capture_output=True, text=True, timeout=300,
                       env=dict(os.environ))
    assert (p.returncode == 0) == ok, p.stdout + p.stderr
    return p


def test_the_stages_remove_what_the_eval_sets_hold_and_report_it_pair_by_pair(tmp_path, sample, eval_sets):
    import pandas as pd

    from vital.schema import Conversation, read_jsonl, write_jsonl

    repo = stage_repo(tmp_path, sample, eval_sets)
    run_stage(repo, "dedup")
    assert json.loads((repo / "metrics/dedup.json").read_text())["duplicates"] == 0
    run_stage(repo, "decontaminate")
    m = json.loads((repo / "metrics/decontaminate.json").read_text())
    assert (m["figures"], m["removed"]) == (14, 3)
    assert {k: v["matched_ids"] for k, v in m["by_eval_set"].items()} == {"vqa_rad": 1, "slake": 1, "ours": 1}
    kept = [r["id"] for r in read_jsonl(repo / "data/corpus/records.jsonl")]
    assert len(kept) == 11 and "sample-cxr-rg1" not in kept

    turns = lambda *qa: [{"from": f, "value": v} for q, a in qa for f, v in (("human", q), ("gpt", a))]  # noqa: E731
    generated = [Conversation(id="f1", image="f1.png", domain="other", backend="openai", model="m", request_hash="h",
                              conversations=turns(("What is shown?", "A fundus photograph of the retina."),
                                                  ("Which abnormality can be seen in the lungs?",
                                                   "The lungs show multiple rounded nodules."))),
                 Conversation(id="f2", image="f2.png", domain="ct_scan", backend="openai", model="m", request_hash="h",
                              conversations=turns(("What window is used to display this head CT?",
                                                   "A bone window is used.")))]
    write_jsonl(repo / "data/candidates/generated.jsonl", generated[::-1])  # not in id order: the report is sorted
    run_stage(repo, "decontaminate_qa")
    convs = list(read_jsonl(repo / "data/candidates/conversations.jsonl"))
    assert [(c["id"], len(c["conversations"])) for c in convs] == [("f1", 2)]  # f2 had one round: dropped
    qa = json.loads((repo / "metrics/decontaminate_qa.json").read_text())
    assert (qa["rounds"], qa["rounds_removed"], qa["conversations_removed"]) == (3, 2, 1)
    report = pd.read_csv(repo / "data/release/contamination.csv", dtype=str)
    assert list(report.columns) == ["id", "eval_set", "eval_id", "kind", "distance"]
    assert {"sample-cxr-rg1", "f1#1", "f2#0"} <= set(report["id"])  # the figures and the rounds, in one report

    # the stage streams the file CHUNK conversations at a time: one at a time gives the same files, byte for byte
    outputs = ("data/candidates/conversations.jsonl", "data/release/contamination.csv")
    first = {f: (repo / f).read_bytes() for f in outputs}
    script = repo / "stages/decontaminate_qa.py"
    assert "CHUNK = 4096" in script.read_text()
    script.write_text(script.read_text().replace("CHUNK = 4096", "CHUNK = 1"))
    run_stage(repo, "decontaminate_qa")
    assert {f: (repo / f).read_bytes() for f in outputs} == first
    again = json.loads((repo / "metrics/decontaminate_qa.json").read_text())
    assert again.pop("features")["computed"] == 0  # every text embedded by the first run
    assert again == {k: v for k, v in qa.items() if k != "features"}


def test_an_eval_set_the_stage_cannot_read_stops_it_in_one_line_naming_the_file(tmp_path, sample, eval_sets):
    repo = stage_repo(tmp_path, sample, eval_sets)
    run_stage(repo, "dedup")
    (eval_sets[1] / "imgs/xmlab1/source.jpg").write_bytes(b"not an image")
    p = run_stage(repo, "decontaminate", ok=False)
    assert p.stderr.strip().splitlines() == [f"decontaminate: {eval_sets[1] / 'imgs/xmlab1/source.jpg'}: cannot decode "
                                             "the image (UnidentifiedImageError); the audit needs every eval image: "
                                             "restore the file or remove the item"]
    repo2 = stage_repo(tmp_path / "two", sample, [eval_sets[0].parent / "nowhere"])
    run_stage(repo2, "dedup")
    p = run_stage(repo2, "decontaminate", ok=False)
    assert "nowhere: no such folder; decontaminate.eval_sets names folders" in p.stderr
    assert "Traceback" not in p.stderr
