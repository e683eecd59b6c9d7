"""The release folder as its consumers read it, with their own code: Hugging Face `datasets` (every view in the
data card's `configs:`) and TRL's vision SFT collator on rows exactly as `load_dataset` returns them. The same
for an imported release (the official BioMed-VITAL file and LLaVA-Med's 60K layout). LLaMA-Factory and LLaVA
pin packages this environment cannot hold: `make interop` runs their loaders."""
import io
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from datasets import Image as ImageFeature
from datasets import load_dataset
from PIL import Image

from vital import release
from vital.images import ImageStore, unpack
from vital.schema import IMAGE_TOKEN, Conversation

ROOT = Path(__file__).resolve().parents[1]


def _records(sample, n=5):
    records, _ = sample
    turns = [{"from": "human", "value": "What imaging modality is this?"}, {"from": "gpt", "value": "A CT scan."},
             {"from": "human", "value": "Which side is abnormal?"}, {"from": "gpt", "value": "The left."}]
    return [release.to_llava(Conversation(f"c{i}", r.image, r.domain, turns[:2 + 2 * (i % 2)], "offline", "m", "h"),
                             0.9 - i / 10) for i, r in enumerate(records[:n])]


def _write(root: Path, sample, n=5, shard_mb=0.05):
    recs = _records(sample, n)
    card = release.data_card(recs, f"{n} kept.", None, "words", [5] * n, root=str(root))
    return recs, release.write_release(root, recs, sample[1], card, shard_mb)


def _pixels(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def test_datasets_loads_every_view_and_the_images_decode_to_the_figures(tmp_path, sample):
    root = tmp_path / "release"
    recs, shards = _write(root, sample)
    assert shards > 1  # small shards: the views must span files
    corpus = ImageStore(sample[1])
    ds = load_dataset(str(root), split="train")  # the default view, from the card's configs
    assert ds.column_names == release.RELEASE_SCHEMA.names and isinstance(ds.features["image"], ImageFeature)
    assert ds["id"] == [r["id"] for r in recs] and ds["conversations"] == [r["conversations"] for r in recs]
    for row, r in zip(ds, recs):
        assert isinstance(row["image"], Image.Image)
        assert np.array_equal(np.asarray(row["image"].convert("RGB")), _pixels(corpus.read(r["image"])))
        assert row["messages"] == release.to_messages(r) and IMAGE_TOKEN not in json.dumps(row["messages"])
        assert [m["role"] for m in row["messages"]] == ["user", "assistant"] * (len(r["conversations"]) // 2)
    for name, columns in release.VIEWS.items():
        view = load_dataset(str(root), name, split="train")
        assert view.column_names == columns and len(view) == len(recs), name
        assert isinstance(view[0]["image"], Image.Image)
    llava = json.loads((root / "instructions.json").read_text())
    assert llava == recs and all(r["conversations"][0]["value"].startswith(f"{IMAGE_TOKEN}\n") for r in llava)
    info = json.loads((root / "dataset_info.json").read_text())["biomed_vital"]
    assert (root / info["file_name"]).is_dir() and info["tags"]["system_tag"] == "system"
    assert set(info["columns"].values()) <= set(release.RELEASE_SCHEMA.names)


def test_trls_collator_builds_a_batch_from_rows_as_loaded_and_the_cards_lines_run(tmp_path, sample):
    from trl.trainer.sft_trainer import DataCollatorForVisionLanguageModeling

    from vital import tune

    root = tmp_path / "release"
    recs, _ = _write(root, sample)
    model, processor = tune.build_tiny_llava(0)
    rows = load_dataset(str(root), "trl", split="train")
    batch = DataCollatorForVisionLanguageModeling(processor)([rows[0], rows[1]])
    assert batch["pixel_values"].shape == (2, 3, 32, 32)
    image_id = processor.tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    per_image = (32 // 8) ** 2  # the processor expands one <image> into one token per patch
    assert ((batch["input_ids"] == image_id).sum(1) == per_image).all()
    text = processor.tokenizer.decode(batch["input_ids"][1])
    assert "which side is abnormal?" in text and "the left." in text  # every round, not only the first
    assert model(**batch).loss.isfinite()

    card = (root / "README.md").read_text()
    code = re.findall(r"```python\n(.*?)```", card, re.S)
    assert len(code) == 2 and f'load_dataset("{root}"' in code[0]
    scope = {"processor": processor}
    for block in code:  # the card's lines, as a user pastes them
        exec(block, scope)
    assert len(scope["ds"]) == len(recs) and scope["batch"]["pixel_values"].shape[0] == 2
    front = card.split("---\n")[1]
    assert "config_name: trl" in front and "&" not in front  # plain YAML, no anchors for other readers


def test_the_loose_image_folder_is_the_parquet_images_unpacked(tmp_path, sample):
    """LLaVA's image_folder: `vital images unpack` of data/ (what the release_images stage runs)."""
    root = tmp_path / "release"
    recs, _ = _write(root, sample)
    r = subprocess.run([sys.executable, "-m", "vital.cli", "images", "unpack", str(root / "data"), str(root / "images")],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    corpus = ImageStore(sample[1])
    for x in json.loads((root / "instructions.json").read_text()):  # LLaVA opens image_folder / image
        assert (root / "images" / x["image"]).read_bytes() == corpus.read(x["image"])
    assert release.validate(recs, root / "images")["problems"] == []


@pytest.mark.parametrize("layout", ["biomed_vital", "llava_med_60k"])
def test_an_imported_release_loads_the_same_way(tmp_path, sample, layout):
    """`vital release import` of the official BioMed-VITAL file or LLaVA-Med's `llava_med_instruct_60k*.json`
    (a domain of flags, `<image>` at the end of the question) writes the same folder as `filter`."""
    records, image_dir = sample
    figures = tmp_path / "figures"
    unpack(image_dir, figures)  # what a user downloaded: a plain folder
    flags = dict.fromkeys(["chest_xray", "mri", "ct_scan", "histology", "gross"], False)
    src = []
    for i, r in enumerate(records[:4]):
        domain = {**flags, "ct_scan": True} if layout == "llava_med_60k" else "CT"
        src.append({"id": f"PMC{i}", "image": r.image, "domain": domain, "conversations": [
            {"from": "human", "value": "What is shown?\n<image>"}, {"from": "gpt", "value": f"Figure {i}."}]})
    name = "llava_med_instruct_60k_inline_mention.json" if layout == "llava_med_60k" else "BioMed-VITAL-60K.json"
    (tmp_path / name).write_text(json.dumps(src))
    out = tmp_path / "imported"
    summary = release.import_release((tmp_path / name).as_uri(), out, figures, shard_mb=1)
    assert summary["imported"] == 4 and summary["domains"] == {"ct_scan": 4}
    ds = load_dataset(str(out), split="train")
    assert ds["id"] == [f"PMC{i}" for i in range(4)] and isinstance(ds[0]["image"], Image.Image)
    assert ds[0]["conversations"][0]["value"] == "<image>\nWhat is shown?"
    assert load_dataset(str(out), "trl", split="train")[0]["messages"][0] == {"role": "user", "content": "What is shown?"}
    for x in json.loads((out / "instructions.json").read_text()):
        assert (out / "images" / x["image"]).is_file()  # LLaVA's image_folder, written by the import
    assert f'load_dataset("{out}"' in (out / "README.md").read_text()
