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
from vital.images import INDEX, ImageError, ImageStore, ShardWriter, pack, unpack


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


def test_a_truncated_shard_is_named_with_the_fix(tmp_path):
    with ShardWriter(tmp_path / "s") as w:
        w.add("a.png", b"a" * 3000)
        w.add("b.png", b"b" * 3000)
    shard = tmp_path / "s" / "images-00000.tar"
    shard.write_bytes(shard.read_bytes()[:4000])  # e.g. a copy that stopped half way
    store = ImageStore(tmp_path / "s")
    assert store.read("a.png") == b"a" * 3000
    with pytest.raises(ImageError, match=r"images-00000.tar is truncated.*dvc pull"):
        store.read("b.png")
    with pytest.raises(FileNotFoundError, match="dvc pull"):
        ImageStore(tmp_path / "missing")


def test_a_plain_folder_reads_the_same_and_pack_unpack_round_trip(tmp_path):
    blobs = _blobs(12)
    for name, data in blobs.items():
        (tmp_path / "folder" / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "folder" / name).write_bytes(data)
    (tmp_path / "secret.txt").write_text("outside")
    (tmp_path / "folder" / "link.png").symlink_to(tmp_path / "secret.txt")
    folder = ImageStore(tmp_path / "folder")
    assert not folder.packed and folder.read("sub/img000.png") == blobs["sub/img000.png"]
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


# ---------------------------------------------------------------- vital release import

def _official(n_good=6):
    """A small file in the published BioMed-VITAL format: LLaVA conversations with `<image>` where LLaVA-Med
    puts it, domains as CXR / CT / Histology / ..., and some records no trainer can use."""
    domains = ["CXR", "MRI", "CT", "Histology", "Gross", {"chest_xray": False, "mri": True}]
    good = [{"id": f"PMC{i}_fig1", "image": f"PMC{i}_fig1.jpg", "domain": domains[i % len(domains)],
             "conversations": [
                 {"from": "human", "value": f"What does this image show?\n<image>" if i % 2 else "<image>\nModality?"},
                 {"from": "gpt", "value": f"Finding number {i}."},
                 {"from": "human", "value": "Anything else?"}, {"from": "gpt", "value": "Clinical correlation."}]}
            for i in range(n_good)]
    bad = [{"id": "no_image_token", "image": "x.jpg", "domain": "CT",
            "conversations": [{"from": "human", "value": "Q?"}, {"from": "gpt", "value": "A."}]},
           {"id": "two_humans", "image": "PMC0_fig1.jpg", "domain": "MRI",
            "conversations": [{"from": "human", "value": "<image>\nQ?"}, {"from": "human", "value": "Q2?"}]},
           {"id": "odd_domain", "image": "PMC1_fig1.jpg", "domain": "Dermatology",
            "conversations": [{"from": "human", "value": "<image>\nQ?"}, {"from": "gpt", "value": "A."}]},
           {"id": "PMC0_fig1", "image": "PMC0_fig1.jpg", "domain": "CT",  # a repeated id
            "conversations": [{"from": "human", "value": "<image>\nQ?"}, {"from": "gpt", "value": "A."}]}]
    return good + bad


@pytest.fixture
def http_server(tmp_path):
    """Serve tmp_path/www on 127.0.0.1."""
    root = tmp_path / "www"
    root.mkdir()
    handler = partial(http.server.SimpleHTTPRequestHandler, directory=str(root))
    handler.log_message = lambda *a: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
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
    for i in range(1, 6):
        (figures / f"PMC{i}_fig1.jpg").write_bytes(corpus.read(records[i].image))
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1] / "src")}
    r = subprocess.run([sys.executable, "-m", "vital.cli", "release", "import",
                        f"{base}/BioMed-VITAL-instructions-80K.json", "--images", str(figures)],
                       cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    out = tmp_path / "data/external/biomed-vital-instructions-80k"
    assert "10 records -> 5 imported" in r.stdout and f"dvc add data/external/biomed-vital-instructions-80k" in r.stdout
    assert "-S tune.data=data/external/biomed-vital-instructions-80k/instructions.json" in r.stdout
    summary = json.loads((out / "import.json").read_text())
    assert summary["url"] == f"{base}/BioMed-VITAL-instructions-80K.json" and len(summary["sha256"]) == 64
    assert summary["domains"] == {"ct_scan": 1, "gross": 1, "histology": 1, "mri": 2}
    rejected = {}
    for x in map(json.loads, (out / "rejected.jsonl").read_text().splitlines()):
        rejected.setdefault(x["id"], []).extend(x["problems"])
    assert set(rejected) == {"no_image_token", "two_humans", "odd_domain", "PMC0_fig1"}
    assert "unknown domain: 'Dermatology'" in rejected["odd_domain"][0]
    assert rejected["PMC0_fig1"] == ["duplicate id", "image 'PMC0_fig1.jpg' not found in " + str(figures)]
    imported = json.loads((out / "instructions.json").read_text())
    assert [x["id"] for x in imported] == [f"PMC{i}_fig1" for i in range(1, 6)]
    assert all(x["conversations"][0]["value"].startswith("<image>\n") and x["generator"].startswith("imported:")
               for x in imported)
    assert imported[0]["conversations"][0]["value"] == "<image>\nWhat does this image show?"
    report = release.validate(imported, out / "images")  # what `vital validate release` checks
    assert not report["problems"] and report["image_token_placement"] == {"start": 5}
    r = subprocess.run([sys.executable, "-m", "vital.cli", "validate", "release", str(out / "instructions.json"),
                        "--image-dir", str(out / "images")], env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout

    from vital import tune  # feeds tune directly: the tiny LLaVA trains on it from the packed images
    model, processor = tune.load_base(tune.TINY, 0)
    _, history, stats = tune.train(model, processor, imported, out / "images", tune.TuneConfig(max_steps=2))
    assert len(history) == 2 and stats["examples"] == 5

    r = subprocess.run([sys.executable, "-m", "vital.cli", "release", "import", f"{base}/missing.json"],
                       cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "HTTP 404" in r.stderr and "missing.json" in r.stderr
    assert not list((tmp_path / "data/external").glob("missing*/*"))  # nothing half-written


def test_a_file_that_is_not_json_is_refused_with_the_way_out(tmp_path):
    (tmp_path / "page.json").write_text("<html>sign in</html>")
    with pytest.raises(ValueError, match=r"not a JSON file.*Delete .*page.json"):
        release.import_release((tmp_path / "page.json").as_uri(), tmp_path / "out")
