import json
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from vital.corpus import CorpusError, ingest
from vital.images import ImageStore
from vital.sample import SAMPLE
from vital.schema import DOMAINS

EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "fig_captions"


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
    from typer.testing import CliRunner

    from vital.cli import app

    path, images = bad_corpus
    res = CliRunner().invoke(app, ["validate", "corpus", str(path), "--image-dir", str(images)])
    assert res.exit_code == 1
    assert "1 usable records, 8 rejected" in res.output
    assert f"{path}:3: missing image" in res.output
    ok = CliRunner().invoke(app, ["validate", "corpus", str(EXAMPLES / "fig_captions.jsonl"),
                                  "--image-dir", str(EXAMPLES / "images")])
    assert ok.exit_code == 0 and "3 usable records, 0 rejected" in ok.output
