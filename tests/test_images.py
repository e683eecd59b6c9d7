"""Packed image stores (src/vital/images.py) and importing a published release (release.import_release)."""
import hashlib
import http.server
import json
import os
import subprocess
import sys
import tarfile
import threading
from functools import partial
from pathlib import Path

import pytest

from vital import release
from vital.images import INDEX, ImageError, ImageStore, ShardWriter, StoreError, pack, unpack, write_hub_shards


def _blobs(n, size=900):
    return {f"sub/img{i:03d}.png" if i % 3 == 0 else f"img{i:03d}.jpg": hashlib.sha256(str(i).encode()).digest()
            * (size // 32 + i % 5) for i in range(n)}


def test_a_packed_store_reads_every_image_back_and_is_a_plain_deterministic_tar(tmp_path):
    blobs = _blobs(40)
    blobs["x/" + "a-very-long-name" * 12 + ".png"] = b"long names take a PAX header"
    blobs["empty.png"] = b""
    for out in ("a", "b"):
        with ShardWriter(tmp_path / out, shard_mb=0.01) as w:  # ~10 KB shards: several of them
            for name, data in blobs.items():
                w.add(name, data)
    shards = sorted(p.name for p in (tmp_path / "a").glob("*.tar"))
    assert len(shards) > 3 and (tmp_path / "a" / INDEX).is_file()
    store = ImageStore(tmp_path / "a")
    assert store.packed and sorted(store.names()) == sorted(blobs)
    assert all(store.read(n) == d for n, d in blobs.items())
    extracted = {}
    for shard in shards:  # `tar -xf` gives the same files
        with tarfile.open(tmp_path / "a" / shard) as t:
            extracted.update({m.name: t.extractfile(m).read() for m in t.getmembers()})
    assert extracted == blobs
    for f in ["index.parquet", *shards]:  # same images, same bytes: DVC stores them once
        assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes(), f
    with pytest.raises(ImageError, match="'nope.png' is not in"):
        store.read("nope.png")


def test_a_store_is_replaced_whole_or_not_at_all(tmp_path):
    with ShardWriter(tmp_path / "s") as w:
        w.add("a.png", b"old")
    with pytest.raises(RuntimeError), ShardWriter(tmp_path / "s") as w:
        w.add("b.png", b"new")
        raise RuntimeError("interrupted")
    assert ImageStore(tmp_path / "s").names() == ["a.png"]  # the old store is untouched
    (tmp_path / ".s.tmp-killed").mkdir()  # what a kill -9 mid-write leaves; the next write clears it
    with ShardWriter(tmp_path / "s") as w:
        w.add("a.png", b"old")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s"]  # no temporary folder left
    with pytest.raises(ValueError, match="added twice"), ShardWriter(tmp_path / "t") as w:
        w.add("a.png", b"1")
        w.add("a.png", b"2")
    with pytest.raises(ValueError, match="relative path"), ShardWriter(tmp_path / "t") as w:
        w.add("../escape.png", b"1")
    assert not (tmp_path / "t").exists()


def test_a_damaged_store_stops_at_open_naming_the_file_and_the_fix(tmp_path):
    def fresh():
        with ShardWriter(tmp_path / "s", shard_mb=0.004) as w:  # two shards
            w.add("a.png", b"a" * 3000)
            w.add("b.png", b"b" * 3000)
        return tmp_path / "s"
    shard = fresh() / "images-00001.tar"
    shard.write_bytes(shard.read_bytes()[:2000])  # e.g. a copy that stopped half way
    with pytest.raises(StoreError, match=r"images-00001.tar is truncated \(2000 of at least \d+ bytes\).*dvc pull"):
        ImageStore(tmp_path / "s")
    (fresh() / "images-00000.tar").unlink()
    with pytest.raises(StoreError, match=r"images-00000.tar is missing.*dvc pull .*s`"):
        ImageStore(tmp_path / "s")
    (fresh() / INDEX).write_bytes(b"PAR1 not really")
    with pytest.raises(StoreError, match=r"index.parquet cannot be read"):
        ImageStore(tmp_path / "s")
    with pytest.raises(StoreError, match="does not exist.*dvc pull"):
        ImageStore(tmp_path / "missing")
    with pytest.raises(ImageError, match="'c.png' is not in"):  # one image missing: that record only
        ImageStore(fresh()).read("c.png")


def test_a_folder_that_is_not_a_store_is_never_replaced(tmp_path):
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.txt").write_text("mine")
    with pytest.raises(StoreError, match="not an image store: refusing"):
        ShardWriter(tmp_path / "notes")
    assert (tmp_path / "notes" / "todo.txt").read_text() == "mine"


def test_a_plain_folder_reads_the_same_and_pack_unpack_round_trip(tmp_path):
    blobs = _blobs(12)
    for name, data in blobs.items():
        (tmp_path / "folder" / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "folder" / name).write_bytes(data)
    (tmp_path / "secret.txt").write_text("outside")
    (tmp_path / "folder" / "link.png").symlink_to(tmp_path / "secret.txt")
    (tmp_path / "folder" / ".DS_Store").write_bytes(b"finder")
    folder = ImageStore(tmp_path / "folder")
    assert not folder.packed and folder.read("sub/img000.png") == blobs["sub/img000.png"]
    assert sorted(folder.names()) == sorted([*blobs, "link.png"])  # no dotfiles; the link is refused on read
    assert "../secret.txt" not in folder and "link.png" not in folder  # nothing outside the folder
    assert pack(folder, sorted(blobs), tmp_path / "packed") == len(blobs)
    assert unpack(tmp_path / "packed", tmp_path / "back") == len(blobs)
    assert {n: (tmp_path / "back" / n).read_bytes() for n in blobs} == blobs
    run = partial(subprocess.run, capture_output=True, text=True, cwd=tmp_path)
    cli = [sys.executable, "-m", "vital.cli", "images"]
    r = run([*cli, "pack", "back", "again", "--shard-mb", "0.005"])
    assert r.returncode == 0 and f"{len(blobs)} images" in r.stdout
    assert len(list((tmp_path / "again").glob("*.tar"))) > 1
    r = run([*cli, "unpack", "nowhere", "out"])
    assert r.returncode == 2 and "nowhere does not exist" in r.stderr



def _hub(tmp_path, blobs, shard_mb=0.004):
    import pyarrow as pa
    rows = [{"id": f"r{i}", "image": name} for i, name in enumerate(blobs)]
    folder = tmp_path / "folder"
    for name, data in blobs.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(data)
    return write_hub_shards(rows, folder, tmp_path / "hub", pa.schema([("id", pa.string())]), shard_mb)


def test_parquet_shards_with_images_inside_read_back_as_a_store(tmp_path):
    """The release's Hub layout: every row carries its image; ImageStore reads them by name, unpack writes the
    folder LLaVA reads, and a set of shards with one missing or damaged stops at open, naming the file."""
    import pyarrow.parquet as pq

    blobs = _blobs(12)
    n = _hub(tmp_path, blobs)
    shards = sorted(p.name for p in (tmp_path / "hub").iterdir())
    assert n > 1 and shards == [f"train-{i:05d}-of-{n:05d}.parquet" for i in range(n)]
    table = pq.read_table(tmp_path / "hub")
    assert table.column_names == ["id", "image"] and table.column("id").to_pylist() == [f"r{i}" for i in range(12)]
    assert b'"_type": "Image"' in table.schema.metadata[b"huggingface"]  # what `datasets` decodes as an image
    store = ImageStore(tmp_path / "hub")
    assert store.packed and sorted(store.names()) == sorted(blobs)
    assert all(store.read(name) == data for name, data in reversed(blobs.items()))  # any order, not only forwards
    assert unpack(tmp_path / "hub", tmp_path / "back") == 12
    assert {name: (tmp_path / "back" / name).read_bytes() for name in blobs} == blobs
    with pytest.raises(ImageError, match="'nope.png' is not in"):
        store.read("nope.png")
    store.close()

    (tmp_path / "hub" / shards[-1]).unlink()
    with pytest.raises(StoreError, match=r"hub holds \d+ parquet shards that do not make one set.*dvc pull"):
        ImageStore(tmp_path / "hub")
    _hub(tmp_path, blobs)  # written again, whole
    (tmp_path / "hub" / shards[0]).write_bytes(b"PAR1 cut short")
    with pytest.raises(StoreError, match=rf"{shards[0]} cannot be read"):
        ImageStore(tmp_path / "hub")
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.txt").write_text("mine")
    import pyarrow as pa
    with pytest.raises(StoreError, match="not an image store: refusing"):
        write_hub_shards([], tmp_path / "folder", tmp_path / "notes", pa.schema([]))
    assert (tmp_path / "notes" / "todo.txt").read_text() == "mine"


def test_release_shards_are_written_one_row_group_at_a_time(tmp_path, monkeypatch):
    """A release shard is up to filter.shard_mb of images: the rows are written to it as they come, one row group
    at a time (what a reader streams), never gathered in memory first; an empty release is one empty shard."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from vital import images
    monkeypatch.setattr(images, "HUB_ROW_GROUP", 3)
    blobs = _blobs(10)
    folder = tmp_path / "folder"
    for name, data in blobs.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(data)
    on_disk = []  # bytes of the shard being written when each row is asked for

    def rows():
        for i, name in enumerate(blobs):
            part = list(tmp_path.glob(".hub.tmp-*/part-00000.parquet"))
            on_disk.append(part[0].stat().st_size if part else 0)
            yield {"id": f"r{i}", "image": name}

    assert write_hub_shards(rows(), folder, tmp_path / "hub", pa.schema([("id", pa.string())]), 256) == 1
    f = pq.ParquetFile(tmp_path / "hub" / "train-00000-of-00001.parquet")
    assert [f.metadata.row_group(g).num_rows for g in range(f.num_row_groups)] == [3, 3, 3, 1]
    assert f.read().column("id").to_pylist() == [f"r{i}" for i in range(10)]
    assert on_disk[1] == on_disk[2] < on_disk[3] == on_disk[5] < on_disk[6] < on_disk[9]  # a group per 3 rows
    assert write_hub_shards(iter(()), folder, tmp_path / "none", pa.schema([("id", pa.string())])) == 1
    assert pq.read_table(tmp_path / "none").num_rows == 0


# ---------------------------------------------------------------- vital release import

def _official(n_good=6):
    """A small file in the published BioMed-VITAL format: LLaVA conversations with `<image>` where LLaVA-Med
    puts it, domains as CXR / CT / Histology / ..., and some records no trainer can use."""
    domains = ["CXR", "MRI", "CT", "Histology", "Gross", {"chest_xray": False, "mri": True}]
    good = [{"id": f"PMC{i}_fig1", "image": f"PMC{i}_fig1.jpg", "domain": domains[i % len(domains)],
             "conversations": [
                 {"from": "human", "value": "What does this image show?\n<image>" if i % 2 else "<image>\nModality?"},
                 {"from": "gpt", "value": f"Finding number {i}."},
                 {"from": "human", "value": "Anything else?"}, {"from": "gpt", "value": "Clinical correlation."}]}
            for i in range(n_good)]
    good.append({"id": "PMC6_fig1", "image": "PMC6_fig1.jpg",  # no domain at all: counted, becomes `other`
                 "conversations": [{"from": "human", "value": "<image>\nWhat is it?"}, {"from": "gpt", "value": "A."}]})
    bad = [{"id": "no_image_token", "image": "x.jpg", "domain": "CT",
            "conversations": [{"from": "human", "value": "Q?"}, {"from": "gpt", "value": "A."}]},
           {"id": "two_humans", "image": "PMC0_fig1.jpg", "domain": "MRI",
            "conversations": [{"from": "human", "value": "<image>\nQ?"}, {"from": "human", "value": "Q2?"}]},
           {"id": "odd_domain", "image": "PMC1_fig1.jpg", "domain": "Dermatology",
            "conversations": [{"from": "human", "value": "<image>\nQ?"}, {"from": "gpt", "value": "A."}]},
           {"id": "PMC0_fig1", "image": "PMC0_fig1.jpg", "domain": "CT",  # a repeated id
            "conversations": [{"from": "human", "value": "<image>\nQ?"}, {"from": "gpt", "value": "A."}]},
           {"id": "PMC2_fig1", "image": "PMC2_fig1.jpg", "domain": "CT",  # repeated, image there: first one kept
            "conversations": [{"from": "human", "value": "<image>\nQ?"}, {"from": "gpt", "value": "A."}]}]
    return good + bad


@pytest.fixture
def http_server(tmp_path):
    """Serve tmp_path/www on 127.0.0.1."""
    root = tmp_path / "www"
    root.mkdir()

    class Handler(http.server.SimpleHTTPRequestHandler):
        def do_GET(self):
            if self.path.startswith("/short.json"):  # announces 1000 bytes, sends 10, hangs up
                self.send_response(200)
                self.send_header("Content-Length", "1000")
                self.end_headers()
                self.wfile.write(b'[{"id": 1,')
                self.close_connection = True
                return
            super().do_GET()

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), partial(Handler, directory=str(root)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield root, f"http://127.0.0.1:{server.server_port}"
    server.shutdown()
    server.server_close()


def test_release_import_converts_the_official_format_and_feeds_tune(http_server, tmp_path, sample):
    root, base = http_server
    records, image_dir = sample
    (root / "BioMed-VITAL-instructions-80K.json").write_text(json.dumps(_official()))
    figures = tmp_path / "figures"  # what a user downloaded from PMC_image_urls.jsonl; one figure missing
    figures.mkdir()
    corpus = ImageStore(image_dir)
    for i in range(1, 7):
        (figures / f"PMC{i}_fig1.jpg").write_bytes(corpus.read(records[i].image))
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1] / "src")}
    r = subprocess.run([sys.executable, "-m", "vital.cli", "release", "import",
                        f"{base}/BioMed-VITAL-instructions-80K.json", "--images", str(figures)],
                       cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    out = tmp_path / "data/external/biomed-vital-instructions-80k"
    out_name = "data/external/biomed-vital-instructions-80k"
    assert "12 records -> 6 imported" in r.stdout and "1 without a domain" in r.stdout
    assert f"dvc add {out_name}/data {out_name}/instructions.json  (not {out_name}/images" in r.stdout
    assert f"-S tune.data={out_name}/instructions.json -S tune.images={out_name}/data" in r.stdout
    summary = json.loads((out / "import.json").read_text())
    assert summary["url"] == f"{base}/BioMed-VITAL-instructions-80K.json" and len(summary["sha256"]) == 64
    assert summary["file"] == "source/BioMed-VITAL-instructions-80K.json"  # kept as fetched, apart from outputs
    assert summary["domains"] == {"ct_scan": 1, "gross": 1, "histology": 1, "mri": 2, "other": 1}
    assert summary["domain_missing"] == 1 and summary["rejected_by_reason"] == {
        "<image> appears _ times; it belongs once, in the first human turn": 1, "duplicate id": 2,
        "image not found in the image folder": 1, "turns do not alternate human/gpt starting with human": 1,
        "unknown domain": 1}
    card = (out / "README.md").read_text()
    assert "6 conversations imported from" in card and "| mri | 2 |" in card and "1 without a domain" in card
    rejected = {}
    for x in map(json.loads, (out / "rejected.jsonl").read_text().splitlines()):
        rejected.setdefault(x["id"], []).extend(x["problems"])
    assert set(rejected) == {"no_image_token", "two_humans", "odd_domain", "PMC0_fig1", "PMC2_fig1"}
    assert "unknown domain: 'Dermatology'" in rejected["odd_domain"][0]
    assert rejected["PMC0_fig1"] == ["duplicate id", "image not found in the image folder: 'PMC0_fig1.jpg'"]
    assert rejected["PMC2_fig1"] == ["duplicate id"]
    imported = json.loads((out / "instructions.json").read_text())
    assert [x["id"] for x in imported] == [f"PMC{i}_fig1" for i in range(1, 7)]  # the first PMC2_fig1 kept
    assert all(x["conversations"][0]["value"].startswith("<image>\n") and x["generator"].startswith("imported:")
               for x in imported)
    assert imported[0]["conversations"][0]["value"] == "<image>\nWhat does this image show?"
    for store in ("images", "data"):  # LLaVA's loose folder, and the parquet shards the stages read
        report = release.validate(imported, out / store)  # what `vital validate release` checks
        assert not report["problems"] and report["image_token_placement"] == {"start": 6}
    r = subprocess.run([sys.executable, "-m", "vital.cli", "validate", "release", str(out / "instructions.json"),
                        "--image-dir", str(out / "images")], env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout

    from vital import tune  # feeds tune directly: the tiny LLaVA trains on it from the packed images
    model, processor = tune.load_base(tune.TINY, 0)
    _, history, stats = tune.train(model, processor, imported, out / "data", tune.TuneConfig(max_steps=2))
    assert len(history) == 2 and stats["train_examples"] == 6


def test_a_failed_or_cut_download_leaves_nothing_and_shows_no_token(http_server, tmp_path):
    _, base = http_server
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1] / "src")}
    r = subprocess.run([sys.executable, "-m", "vital.cli", "release", "import", f"{base}/missing.json?token=SECRET123"],
                       cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "HTTP 404" in r.stderr and "missing.json" in r.stderr
    assert "SECRET123" not in r.stderr + r.stdout
    with pytest.raises(OSError, match=r"short.json\?\*\*\*: cannot download it .*rerun") as e:
        release.import_release(f"{base}/short.json?sig=SECRET123", tmp_path / "short")
    assert "SECRET123" not in str(e.value)
    left = [p for p in (tmp_path / "data").rglob("*") if p.is_file()] if (tmp_path / "data").exists() else []
    assert left == [] and [p for p in (tmp_path / "short").rglob("*") if p.is_file()] == []  # no file, no .part


def test_a_file_that_is_not_json_is_refused_with_the_way_out(tmp_path):
    (tmp_path / "page.json").write_text("<html>sign in</html>")
    with pytest.raises(ValueError, match=r"not an instructions JSON array.*Delete .*page.json"):
        release.import_release((tmp_path / "page.json").as_uri(), tmp_path / "out")
