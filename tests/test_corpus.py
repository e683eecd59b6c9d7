import json
import shutil
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from PIL import Image
from typer.testing import CliRunner

from vital.cli import app
from vital.corpus import MAX_PIXELS, CorpusError, ingest
from vital.images import ImageStore
from vital.sample import SAMPLE
from vital.schema import DOMAINS

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples" / "fig_captions"


def test_sample_is_real_images_with_written_captions(sample):
    records, image_dir = sample
    assert len(records) >= 12
    assert len({r.id for r in records}) == len(records)
    for r in records:
        assert r.domain in DOMAINS and r.caption and r.inline_mentions and r.fig_label
        with ImageStore(image_dir).open(r.image) as im:
            assert im.format == "PNG" and min(im.size) >= 64
            # a real image, not a constant placeholder
            assert max(im.convert("L").getextrema()) - min(im.convert("L").getextrema()) > 50
    sources = {s["src"][1] for s in SAMPLE}
    assert {"RG1_UNCR.dcm", "CT_small.dcm", "MR2_UNCR.dcm", "US1_UNCR.dcm", "JPEG2000_UNC.dcm",
            "immunohistochemistry", "retina", "cell"} <= sources


def test_example_corpus_in_llava_med_format(tmp_path):
    res = ingest(EXAMPLES / "fig_captions.jsonl", EXAMPLES / "images", tmp_path / "out", strict=True)
    assert [r.id for r in res.records] == ["example_001", "example_002", "example_003"]
    assert [r.domain for r in res.records] == ["chest_xray", "histology", "ct_scan"]
    assert all(r.caption and r.inline_mentions for r in res.records)  # {tokens: ...} objects were unwrapped
    packed = ImageStore(tmp_path / "out")  # packed, byte for byte
    assert packed.packed and all(packed.read(r.image) == (EXAMPLES / "images" / r.image).read_bytes()
                                 for r in res.records)


def _record(pid, **kw):
    rec = {"pair_id": pid, "pmid": "1", "fig_label": "Fig 1", "fig_caption": f"Caption of {pid}.",
           "in_text_mention": [{"tokens": "mention"}], "domain": {"chest_xray": False, "mri": True}}
    rec.update(kw)
    return rec


@pytest.fixture
def bad_corpus(tmp_path):
    """One good record and one of each kind of bad input, as JSONL."""
    images = tmp_path / "images"
    images.mkdir()
    src = next(EXAMPLES.glob("images/*.jpg"))
    for pid in ["good", "dup", "nocap", "dom", "utf"]:
        shutil.copy(src, images / f"{pid}.jpg")
    (images / "empty.jpg").write_bytes(b"")
    (images / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    lines = [json.dumps(_record("good")).encode(),
             b'{"pair_id": "broken", ',                                   # malformed JSON
             json.dumps(_record("noimage")).encode(),                     # missing image
             json.dumps(_record("empty")).encode(),                       # zero-byte image
             json.dumps(_record("corrupt")).encode(),                     # corrupt image
             json.dumps(_record("nocap", fig_caption={"tokens": ""})).encode(),  # missing caption
             json.dumps(_record("dom", domain={"dermatology": True})).encode(),  # unknown domain
             json.dumps(_record("good")).encode(),                        # duplicate id
             json.dumps(_record("utf")).encode().replace(b"Caption", b"Capt\xe9on")]  # latin-1 byte
    path = tmp_path / "corpus.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    return path, images


def test_bad_records_are_quarantined_with_file_line_reason(bad_corpus, tmp_path):
    path, images = bad_corpus
    res = ingest(path, images, tmp_path / "out", strict=False)
    assert [r.id for r in res.records] == ["good"]
    got = {r.line: r.reason.split(":")[0] for r in res.rejected}
    assert got == {2: "malformed JSON", 3: "missing image", 4: "empty image", 5: "corrupt image",
                   6: "missing caption", 7: "unknown domain", 8: "duplicate id", 9: "non-UTF-8 text"}
    assert all(r.file == str(path) for r in res.rejected)
    counts = res.counts()
    assert counts["records"] == 1 and counts["rejected"] == 8
    assert counts["rejected_by_reason"]["duplicate id"] == 1


@pytest.mark.parametrize("line,reason", [(2, "malformed JSON"), (3, "missing image"), (4, "empty image"),
                                         (5, "corrupt image"), (6, "missing caption"), (7, "unknown domain"),
                                         (8, "duplicate id"), (9, "non-UTF-8 text")])
def test_strict_stops_at_each_kind_of_bad_record_naming_file_line(bad_corpus, tmp_path, line, reason):
    path, images = bad_corpus
    lines = path.read_bytes().split(b"\n")
    keep = lines[:1] + [lines[line - 1]]  # the good record, then one bad one (line 8 repeats the good id)
    single = tmp_path / "one.jsonl"
    single.write_bytes(b"\n".join(keep) + b"\n")
    bad_line = len(keep)
    with pytest.raises(CorpusError, match=rf"{single}:{bad_line}: {reason}.*corpus.strict: false"):
        ingest(single, images, tmp_path / "out", strict=True)


def test_unicode_line_separators_inside_strings_and_numeric_ids(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    shutil.copy(next(EXAMPLES.glob("images/*.jpg")), images / "42.jpg")
    rec = _record("x", fig_caption="Two parts\u2028joined\x85here.")
    rec.update(pair_id=42, pmid=123456)
    path = tmp_path / "c.jsonl"
    path.write_text(json.dumps(rec, ensure_ascii=False) + "\n", encoding="utf-8")
    res = ingest(path, images, tmp_path / "out", strict=True)
    assert res.records[0].id == "42" and res.records[0].pmid == "123456"
    assert "\u2028" in res.records[0].caption


def test_non_utf8_inside_a_json_array_is_one_rejected_record(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    for pid in ["a", "b"]:
        shutil.copy(next(EXAMPLES.glob("images/*.jpg")), images / f"{pid}.jpg")
    body = ("[\n" + json.dumps(_record("a")) + ",\n" + json.dumps(_record("b")) + "\n]\n").encode()
    path = tmp_path / "c.json"
    path.write_bytes(body.replace(b"Caption of b", b"Caption of \xff b"))
    res = ingest(path, images, tmp_path / "out", strict=False)
    assert [r.id for r in res.records] == ["a"]
    assert (res.rejected[0].line, res.rejected[0].reason.split(":")[0], res.rejected[0].id) == (3, "non-UTF-8 text", "b")


def test_json_array_and_parquet_inputs(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    for pid in ["a", "b"]:
        shutil.copy(next(EXAMPLES.glob("images/*.jpg")), images / f"{pid}.jpg")
    arr = tmp_path / "corpus.json"
    arr.write_text("[\n" + json.dumps(_record("a")) + ",\n" + json.dumps(_record("zzz", fig_caption="")) + "\n]\n")
    res = ingest(arr, images, tmp_path / "o1", strict=False)
    assert [r.id for r in res.records] == ["a"]
    assert (res.rejected[0].line, res.rejected[0].reason.split(":")[0]) == (3, "missing caption")
    rows = [_record("b", in_text_mention="plain string mention", domain="histology")]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "corpus.parquet")
    res = ingest(tmp_path / "corpus.parquet", images, tmp_path / "o2", strict=True)
    assert res.records[0].inline_mentions == ["plain string mention"] and res.records[0].domain == "histology"


def test_unsupported_file_type_is_a_clear_error(tmp_path):
    (tmp_path / "corpus.csv").write_text("x")
    with pytest.raises(CorpusError, match="unsupported corpus file type"):
        ingest(tmp_path / "corpus.csv", tmp_path, tmp_path / "o", strict=False)


def test_vital_validate_corpus_reports_problems_with_file_line(bad_corpus):
    path, images = bad_corpus
    res = CliRunner().invoke(app, ["validate", "corpus", str(path), "--image-dir", str(images)])
    assert res.exit_code == 1
    assert "1 usable records, 8 rejected" in res.output
    assert f"{path}:3: missing image" in res.output
    ok = CliRunner().invoke(app, ["validate", "corpus", str(EXAMPLES / "fig_captions.jsonl"),
                                  "--image-dir", str(EXAMPLES / "images")])
    assert ok.exit_code == 0 and "3 usable records, 0 rejected" in ok.output


# ------------------------------------------------------------------ the stage and `vital validate corpus` agree

def run_stage(workdir: Path, **corpus) -> subprocess.CompletedProcess:
    """`python stages/corpus.py` in `workdir`, with the repository's params.yaml and these corpus.* values."""
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["corpus"].update(source="path", **corpus)
    (workdir / "params.yaml").write_text(yaml.safe_dump(params))
    return subprocess.run([sys.executable, str(ROOT / "stages/corpus.py")], cwd=workdir, capture_output=True,
                          text=True, timeout=60)


def validate(path, image_dir, *args):
    return CliRunner().invoke(app, ["validate", "corpus", str(path), "--image-dir", str(image_dir), *args])


def write_corpus(path: Path, records: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def png_header(width: int, height: int) -> bytes:
    """A PNG that claims width x height and holds no pixels: a big image's header, for free."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b""))


def test_image_paths_outside_image_dir_are_quarantined_and_never_packed(tmp_path, monkeypatch):
    images, elsewhere = tmp_path / "images", tmp_path / "elsewhere"
    images.mkdir(), elsewhere.mkdir()
    src = next(EXAMPLES.glob("images/*.jpg"))
    shutil.copy(src, images / "good.jpg")
    secret = elsewhere / "secret.png"
    Image.new("RGB", (8, 8), (1, 2, 3)).save(secret)
    (images / "alias.jpg").symlink_to(images / "good.jpg")  # a link that stays inside is fine
    (images / "linked.jpg").symlink_to(secret)               # found as <pair_id>.jpg, but it lives elsewhere
    (images / "named.png").symlink_to(secret)
    path = write_corpus(tmp_path / "corpus.jsonl", [
        _record("good"), _record("alias", image="alias.jpg"),
        _record("absolute", image=str(secret)), _record("climbs", image="../elsewhere/secret.png"),
        _record("linked"), _record("named", image="named.png")])
    p = run_stage(tmp_path, path="corpus.jsonl", image_dir="images")
    assert p.returncode == 0, p.stderr
    rejected = [json.loads(x) for x in (tmp_path / "data/corpus/rejected.jsonl").read_text().splitlines()]
    assert [(r["line"], r["id"], r["reason"].split(":")[0]) for r in rejected] == [
        (n, rid, "path escapes image_dir") for n, rid in [(3, "absolute"), (4, "climbs"), (5, "linked"), (6, "named")]]
    assert json.loads((tmp_path / "metrics/corpus.json").read_text())["rejected_by_reason"] == {
        "path escapes image_dir": 4}
    packed = ImageStore(tmp_path / "data/corpus/images")
    assert sorted(packed.names()) == ["alias.jpg", "good.jpg"]
    assert all(secret.read_bytes() not in f.read_bytes() for f in (tmp_path / "data/corpus/images").iterdir())
    # the validator says the same, record for record
    monkeypatch.chdir(tmp_path)
    res = validate("corpus.jsonl", "images")
    assert res.exit_code == 1 and "2 usable records, 4 rejected" in res.output
    assert [line.strip() for line in res.output.splitlines() if line.startswith("  corpus.jsonl:")] == [
        f"corpus.jsonl:{r['line']}: {r['reason']}" for r in rejected]


def test_caption_and_mentions_must_be_text(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    ok = [_record("str", in_text_mention="one mention"), _record("tokens", in_text_mention={"tokens": "one"}),
          _record("list", in_text_mention=["a", {"tokens": "b"}, None]), _record("none", in_text_mention=None),
          _record("tok_caption", fig_caption={"tokens": "A caption."})]
    bad = [_record("int_caption", fig_caption=42), _record("list_caption", fig_caption=["a", "b"]),
           _record("num_mention", in_text_mention=[{"tokens": "fine"}, 7]),
           _record("nested", in_text_mention=[["a"]])]
    for r in ok + bad:
        shutil.copy(next(EXAMPLES.glob("images/*.jpg")), images / f"{r['pair_id']}.jpg")
    path = write_corpus(tmp_path / "c.jsonl", ok + bad)
    res = ingest(path, images, None, strict=False)
    assert [r.id for r in res.records] == [r["pair_id"] for r in ok]
    assert [r.inline_mentions for r in res.records] == [["one mention"], ["one"], ["a", "b"], [], ["mention"]]
    assert [r.reason.split(":")[0] for r in res.rejected] == [
        "caption is not text (int)", "caption is not text (list)", "in_text_mention is not text (int)",
        "in_text_mention is not text (list)"]
    out = validate(path, images).output
    assert f'{path}:6: caption is not text (int): use a string or {{"tokens": string}}' in out


@pytest.mark.filterwarnings("error")  # Pillow's DecompressionBombWarning would fail the test
def test_images_over_max_pixels_are_quarantined_from_their_header(tmp_path):
    assert yaml.safe_load((ROOT / "params.yaml").read_text())["corpus"]["max_pixels"] == MAX_PIXELS == 40_000_000
    images = tmp_path / "images"
    images.mkdir()
    shutil.copy(next(EXAMPLES.glob("images/*.jpg")), images / "fits.jpg")
    Image.new("1", (10000, 10000)).save(images / "big.png")   # 100 MP, a real PNG of a few kB
    (images / "huge.png").write_bytes(png_header(20000, 20000))  # 400 MP: past Pillow's own limit, which raises
    path = write_corpus(tmp_path / "c.jsonl", [_record("fits"), _record("big"), _record("huge")])
    res = validate(path, images)
    assert res.exit_code == 1 and "1 usable records, 2 rejected" in res.output
    assert (f"{path}:2: image too large: 10000x10000 = 100.0 MP > corpus.max_pixels 40.0 MP: {images / 'big.png'}"
            in res.output)
    assert f"{path}:3: image too large: 20000x20000 = 400.0 MP > corpus.max_pixels 40.0 MP" in res.output
    res = validate(path, images, "--max-pixels", "200000000")  # above Pillow's own limit: it neither warns nor raises
    assert "2 usable records, 1 rejected" in res.output
    assert "20000x20000 = 400.0 MP > corpus.max_pixels 200.0 MP" in res.output
    assert Image.MAX_IMAGE_PIXELS > 0  # Pillow's limit is back for everyone else


def test_strict_stage_stops_with_one_line_naming_file_line_reason(tmp_path):
    shutil.copytree(EXAMPLES / "images", tmp_path / "images")
    first = (EXAMPLES / "fig_captions.jsonl").read_text().splitlines()[0]
    (tmp_path / "bad.jsonl").write_text(first + '\n{"pair_id": "broken", \n')
    p = run_stage(tmp_path, path="bad.jsonl", image_dir="images", strict=True)
    assert p.returncode == 1
    assert p.stderr.splitlines() == [
        "bad.jsonl:2: malformed JSON: Expecting property name enclosed in double quotes (set corpus.strict: false "
        "to skip bad records into data/corpus/rejected.jsonl)"]


def test_a_missing_corpus_is_one_line_from_the_validator_and_the_stage(tmp_path):
    res = validate(tmp_path / "nope.jsonl", EXAMPLES / "images")
    assert res.exit_code == 2 and res.stdout == ""
    assert res.stderr.splitlines() == [f"error: {tmp_path / 'nope.jsonl'}: no such file or folder; corpus.path (or "
                                       "`vital validate corpus PATH`) names a .json, .jsonl or .parquet file or a "
                                       "folder of them"]
    res = validate(EXAMPLES / "fig_captions.jsonl", tmp_path / "no-images")
    assert res.exit_code == 2 and res.stderr.startswith(f"error: {tmp_path / 'no-images'}: no such folder")
    p = run_stage(tmp_path, path="nope.jsonl", image_dir=str(EXAMPLES / "images"))
    assert p.returncode == 1 and p.stderr.splitlines() == ["nope.jsonl: no such file or folder; corpus.path (or "
                                                           "`vital validate corpus PATH`) names a .json, .jsonl or "
                                                           ".parquet file or a folder of them"]


@pytest.mark.parametrize("case", ["no records", "all rejected"])
def test_an_empty_corpus_is_refused_by_the_stage_and_the_validator_in_the_same_words(tmp_path, monkeypatch, case):
    shutil.copytree(EXAMPLES / "images", tmp_path / "images")
    corpus = tmp_path / "c.jsonl"
    if case == "no records":
        corpus.write_text("\n")
    else:  # every example image is larger than 1000 pixels: this also shows the stage reads corpus.max_pixels
        shutil.copy(EXAMPLES / "fig_captions.jsonl", corpus)
    p = run_stage(tmp_path, path="c.jsonl", image_dir="images", max_pixels=1000)
    assert p.returncode == 1 and len(p.stderr.splitlines()) == 1
    assert p.stderr.startswith("corpus: no usable records in c.jsonl (")
    monkeypatch.chdir(tmp_path)  # the same relative paths as in params.yaml, so the words match to the letter
    res = validate("c.jsonl", "images", "--max-pixels", "1000")
    assert res.exit_code == 1
    assert res.stderr.splitlines() == [f"error: {p.stderr.strip()}"]
