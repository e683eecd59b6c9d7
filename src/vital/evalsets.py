"""Evaluation test sets as users have them, read with file:line errors.

- this repository's eval format (LLaVA-Med's, `evaluate.eval_sets: folder`): `vqa.jsonl` and `vqa/<dataset>.jsonl`
  ({question_id, image, text, answer, answer_type}), `chat.jsonl` (open chat with captions), `images/`;
- Hugging Face parquet (VQA-RAD, PathVQA on the Hub): `data/test-*.parquet` with `image` {bytes, path},
  `question`, `answer` (the test split only);
- SLAKE: `test.json` (qid, img_name, question, answer) and the `imgs/` folder.

`load_eval_sets` is what `evaluate` reads; `read_eval_set` reads any of the three, every image hashed
(vital.dedup), for `decontaminate`.
"""
from __future__ import annotations

import io
import json
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from .dedup import image_hashes
from .schema import read_jsonl


def uid(item: dict) -> str:
    """An item's id across files: datasets number their questions independently."""
    return f"{item['dataset']}/{item['question_id']}"


def _chat_item(raw: dict) -> dict:
    """A chat question as LLaVA-Med writes it (qa50: `type`, `domain` as flags, `in_text_mention` as a list of
    {tokens}) or in the flat form (`category`, `domain` name, `fig_inline_mention`)."""
    from .corpus import parse_domain, text_value

    for key in ("question_id", "image", "text", "gpt4_answer"):
        if raw.get(key) in (None, ""):
            raise ValueError(f"no {key!r}")
    mention = raw.get("fig_inline_mention", raw.get("in_text_mention"))
    return {"question_id": raw["question_id"], "dataset": "chat", "image": raw["image"],
            "text": text_value(raw["text"], "text"), "gpt4_answer": text_value(raw["gpt4_answer"], "gpt4_answer"),
            "domain": parse_domain(raw.get("domain")), "category": raw.get("category", raw.get("type", "unknown")),
            "fig_caption": text_value(raw.get("fig_caption"), "fig_caption"),
            "fig_inline_mention": text_value(mention, "mention")}


def load_eval_sets(folder: Path) -> tuple[list[dict], list[dict]]:
    """VQA items from `vqa.jsonl` (dataset: the item's `dataset`, else "vqa") and `vqa/<dataset>.jsonl`, and
    chat items from `chat.jsonl`, in a folder that also holds `images/`. A malformed item or a repeated id
    within a dataset stops with file:line."""
    from .corpus import CorpusError

    folder = Path(folder)
    files = ([folder / "vqa.jsonl"] if (folder / "vqa.jsonl").exists() else []) + sorted(folder.glob("vqa/*.jsonl"))
    files += [folder / "chat.jsonl"] if (folder / "chat.jsonl").exists() else []
    if not files:
        raise FileNotFoundError(f"{folder}: no vqa.jsonl, vqa/*.jsonl or chat.jsonl (LLaVA-Med eval format)")
    vqa, chat, seen = [], [], set()
    for f in files:
        for line, raw in enumerate(read_jsonl(f), 1):
            try:
                if f.name == "chat.jsonl":
                    item = _chat_item(raw)
                else:
                    item = {**raw, "dataset": raw.get("dataset", "vqa" if f.name == "vqa.jsonl" else f.stem)}
                    if "question_id" not in item:
                        raise ValueError("no 'question_id'")
                if uid(item) in seen:
                    raise ValueError(f"question_id {item['question_id']!r} repeats in dataset {item['dataset']!r}")
            except (ValueError, CorpusError) as e:
                raise ValueError(f"{f}:{line}: {e}") from None
            seen.add(uid(item))
            (chat if f.name == "chat.jsonl" else vqa).append(item)
    return vqa, chat


class EvalSetError(ValueError):
    """An eval set that cannot be read: the message names the file (and row) and what to do."""


@dataclass
class EvalSet:
    name: str
    layout: str  # huggingface | slake | vital
    items: list[dict] = field(default_factory=list)  # {id, question, answer, caption, image}
    images: dict[str, tuple[str, int]] = field(default_factory=dict)  # image -> (pixel sha256, pHash)


def _hash_bytes(data: bytes, where: str) -> tuple[str, int]:
    try:
        with Image.open(io.BytesIO(data)) as im:
            return image_hashes(im)
    except Exception as e:  # noqa: BLE001 - PIL raises many types for damaged files
        raise EvalSetError(f"{where}: cannot decode the image ({type(e).__name__}); the audit needs every eval "
                           "image: restore the file or remove the item") from None


def _text(value) -> str:
    return "" if value is None else str(value).strip()


def read_eval_set(folder: str | Path) -> EvalSet:
    """One eval set (its layout found from its files), every image hashed."""
    folder = Path(folder)
    if not folder.is_dir():
        raise EvalSetError(f"{folder}: no such folder; decontaminate.eval_sets names folders of eval test sets")
    shards = sorted((folder / "data").glob("test-*.parquet")) or sorted(folder.glob("test-*.parquet"))
    if shards:
        return _read_huggingface(folder, shards)
    if (folder / "test.json").is_file():
        return _read_slake(folder)
    if (folder / "vqa").is_dir() or (folder / "vqa.jsonl").is_file() or (folder / "chat.jsonl").is_file():
        return _read_vital(folder)
    raise EvalSetError(f"{folder}: not an eval set; expected data/test-*.parquet (Hugging Face layout), test.json "
                       "with imgs/ (SLAKE), or vqa/*.jsonl / chat.jsonl with images/ (this repository's format)")


def _read_huggingface(folder: Path, shards: list[Path]) -> EvalSet:
    import pyarrow.parquet as pq

    out, row = EvalSet(folder.name, "huggingface"), 0
    for shard in shards:
        try:
            table = pq.read_table(shard)
        except Exception as e:  # noqa: BLE001 - pyarrow raises several types for a damaged file
            raise EvalSetError(f"{shard}: cannot read it as parquet ({e})") from None
        missing = {"image", "question", "answer"} - set(table.column_names)
        if missing:
            raise EvalSetError(f"{shard}: no column {', '.join(sorted(missing))}; the Hugging Face VQA layout has "
                               "image {bytes, path}, question, answer")
        for n, r in enumerate(table.to_pylist(), 1):
            image = r["image"] if isinstance(r["image"], dict) else {}
            if not image.get("bytes"):
                raise EvalSetError(f"{shard}: row {n}: image has no bytes; the audit needs every eval image")
            name = f"{shard.name}:{n}"
            out.images[name] = _hash_bytes(image["bytes"], f"{shard}: row {n}")
            qid = r.get("qid", r.get("question_id", r.get("id")))
            out.items.append({"id": _text(qid) or f"test:{row}", "question": _text(r["question"]),
                              "answer": _text(r["answer"]), "caption": "", "image": name})
            row += 1
    return out


def _read_slake(folder: Path) -> EvalSet:
    path = folder / "test.json"
    try:
        rows = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise EvalSetError(f"{path}: cannot read it as JSON ({e})") from None
    if not isinstance(rows, list):
        raise EvalSetError(f"{path}: expected a JSON array of SLAKE items")
    out = EvalSet(folder.name, "slake")
    for n, r in enumerate(rows, 1):
        if not isinstance(r, dict) or not r.get("img_name") or "question" not in r:
            raise EvalSetError(f"{path}: item {n}: a SLAKE item needs img_name and question")
        name = f"imgs/{r['img_name']}"
        if name not in out.images:
            try:
                data = (folder / name).read_bytes()
            except OSError:
                raise EvalSetError(f"{path}: item {n}: image {folder / name} is missing; the audit needs every eval "
                                   "image") from None
            out.images[name] = _hash_bytes(data, str(folder / name))
        out.items.append({"id": _text(r.get("qid", n)), "question": _text(r["question"]),
                          "answer": _text(r.get("answer")), "caption": "", "image": name})
    return out


def _read_vital(folder: Path) -> EvalSet:
    try:
        vqa, chat = load_eval_sets(folder)
    except (FileNotFoundError, ValueError) as e:
        raise EvalSetError(str(e)) from None
    out = EvalSet(folder.name, "vital")
    for it in vqa + chat:
        name = it["image"]
        if name not in out.images:
            try:
                data = (folder / "images" / name).read_bytes()
            except OSError:
                raise EvalSetError(f"{folder}: item {uid(it)}: image {folder / 'images' / name} is missing; the "
                                   "audit needs every eval image") from None
            out.images[name] = _hash_bytes(data, str(folder / "images" / name))
        out.items.append({"id": uid(it), "question": _text(it["text"]),
                          "answer": _text(it.get("answer", it.get("gpt4_answer"))),
                          "caption": _text(it.get("fig_caption")), "image": name})
    return out
