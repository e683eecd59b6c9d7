"""Evaluation test sets as users have them, read with file:line errors.

Formats (`evaluate.eval_sets[].format`; `decontaminate` finds the format from the files):
- `huggingface`: VQA-RAD, PathVQA as published on the Hub: `data/test-*.parquet` with `image` {bytes, path},
  `question`, `answer` (the test split only). Closed = the answer is yes or no (CLOSED_RULES).
- `slake`: SLAKE (`BoKelvin/SLAKE`): `test.json` (qid, img_name, question, answer, answer_type, q_lang,
  modality) and the `imgs/` folder; English only unless `languages` says otherwise.
- `llava_med`: LLaVA-Med's open-chat file (`llava_med_eval_qa50_qa.jsonl`) with its images in `images/` beside it.
- `vital`: this repository's eval folder (LLaVA-Med's VQA format): `vqa.jsonl` and `vqa/<dataset>.jsonl`
  ({question_id, image, text, answer, answer_type}), `chat.jsonl` (open chat with captions), `images/`.

`load` gives what `evaluate` answers (VQA and chat items, the items left out with why, an image reader);
`read_eval_set` the same set with every image hashed (vital.dedup), for `decontaminate`.
"""
from __future__ import annotations

import io
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from PIL import Image

from .dedup import image_hashes
from .schema import read_jsonl

FORMATS = ("huggingface", "slake", "llava_med", "vital")
CLOSED_RULES = {
    "huggingface": "closed = the answer is yes or no (the usual split of VQA-RAD and PathVQA); every other is open",
    "slake": "closed = SLAKE's answer_type CLOSED",
    "vital": "closed = the item's answer_type CLOSED",
    "llava_med": "open chat only (no VQA items)",
    "sample": "closed = the yes/no questions the sample builds from the corpus",
}
SLAKE_DOMAINS = {"ct": "ct_scan", "mri": "mri", "x-ray": "chest_xray"}  # SLAKE's modality, as this repository names it


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


def load_eval_sets(folder: Path) -> tuple[list[dict], list[dict]]:  # the `vital` format
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
class EvalData:
    """One eval set as `evaluate` answers it."""
    name: str
    format: str
    vqa: list[dict]  # {question_id, dataset, image, text, answer, answer_type: CLOSED|OPEN, domain}
    chat: list[dict]  # see _chat_item
    read: Callable[[str], bytes]  # an item's `image` -> the image file's bytes
    left_out: list[dict] = field(default_factory=list)  # {id, reason}: items not evaluated (another language...)

    @property
    def closed_rule(self) -> str:
        return CLOSED_RULES[self.format]


@dataclass
class EvalSet:
    """One eval set as `decontaminate` matches it."""
    name: str
    layout: str  # a FORMATS name
    items: list[dict] = field(default_factory=list)  # {id, question, answer, caption, image}
    images: dict[str, tuple[str, int]] = field(default_factory=dict)  # image -> (pixel sha256, pHash)


def _text(value) -> str:
    return "" if value is None else str(value).strip()


def detect(path: str | Path) -> str:
    """The format of an eval set folder (or LLaVA-Med chat file) from its files."""
    path = Path(path)
    if path.is_file() and path.suffix == ".jsonl":
        return "llava_med"
    if not path.is_dir():
        raise EvalSetError(f"{path}: no such folder")
    if sorted((path / "data").glob("test-*.parquet")) or sorted(path.glob("test-*.parquet")):
        return "huggingface"
    if (path / "test.json").is_file():
        return "slake"
    if (path / "vqa").is_dir() or (path / "vqa.jsonl").is_file() or (path / "chat.jsonl").is_file():
        return "vital"
    raise EvalSetError(f"{path}: not an eval set; expected data/test-*.parquet (Hugging Face layout), test.json "
                       "with imgs/ (SLAKE), or vqa/*.jsonl / chat.jsonl with images/ (this repository's format)")


def load(name: str, fmt: str, path: str | Path, languages: list[str] | None = ("en",),
         domain: str | None = None) -> EvalData:
    """One eval set in `fmt` (FORMATS) at `path`. `languages`: SLAKE's q_lang kept (None: all); `domain`: the
    domain of every item whose format does not say (PathVQA: histology)."""
    path = Path(path)
    want = {"huggingface": "a folder with data/test-*.parquet", "slake": "a folder with test.json and imgs/",
            "llava_med": "a .jsonl file (llava_med_eval_qa50_qa.jsonl) with images/ beside it",
            "vital": "a folder with vqa/*.jsonl or chat.jsonl and images/"}
    if fmt not in want:
        raise EvalSetError(f"eval set {name!r}: format {fmt!r} is not one of {', '.join(FORMATS)}")
    if not path.exists():
        raise EvalSetError(f"{path}: no such file or folder (eval set {name!r}, format {fmt}: {want[fmt]})")
    try:
        found = detect(path)
    except EvalSetError:
        found = None
    if found != fmt:
        raise EvalSetError(f"{path}: not in the {fmt} format (eval set {name!r} expects {want[fmt]}"
                           + (f"; it looks like {found}" if found else "") + ")")
    return {"huggingface": _load_huggingface, "slake": _load_slake, "llava_med": _load_llava_med,
            "vital": _load_vital}[fmt](name, path, languages, domain)


def _load_huggingface(name: str, folder: Path, languages, domain) -> EvalData:
    import pyarrow.parquet as pq

    shards = sorted((folder / "data").glob("test-*.parquet")) or sorted(folder.glob("test-*.parquet"))
    images: dict[str, bytes] = {}
    vqa, row = [], 0
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
                raise EvalSetError(f"{shard}: row {n}: image has no bytes; the layout keeps each image in its row")
            key = f"{shard.name}:{n}"
            images[key] = image["bytes"]
            qid = _text(r.get("qid", r.get("question_id", r.get("id")))) or str(row)
            answer = _text(r["answer"])
            vqa.append({"question_id": qid, "dataset": name, "image": key, "text": _text(r["question"]),
                        "answer": answer, "answer_type": "CLOSED" if answer.lower() in ("yes", "no") else "OPEN",
                        "domain": domain or "other"})
            row += 1
    return EvalData(name, "huggingface", vqa, [], images.__getitem__)


def _load_slake(name: str, folder: Path, languages, domain) -> EvalData:
    path = folder / "test.json"
    try:
        rows = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise EvalSetError(f"{path}: cannot read it as JSON ({e})") from None
    if not isinstance(rows, list):
        raise EvalSetError(f"{path}: expected a JSON array of SLAKE items")
    vqa, left_out, seen = [], [], set()
    for n, r in enumerate(rows, 1):
        if not isinstance(r, dict) or not r.get("img_name") or "question" not in r:
            raise EvalSetError(f"{path}: item {n}: a SLAKE item needs img_name and question")
        image = f"imgs/{r['img_name']}"
        if image not in seen and not (folder / image).is_file():
            raise EvalSetError(f"{path}: item {n}: image {folder / image} is missing; restore it or remove the item")
        seen.add(image)
        qid, lang = _text(r.get("qid", n)), _text(r.get("q_lang")) or "en"
        if languages is not None and lang not in languages:
            left_out.append({"id": f"{name}/{qid}", "reason": f"q_lang {lang} (evaluate.languages: "
                                                              f"{', '.join(languages)})"})
            continue
        kind = _text(r.get("answer_type")).upper()
        if kind not in ("CLOSED", "OPEN"):
            raise EvalSetError(f"{path}: item {n}: answer_type {r.get('answer_type')!r}; SLAKE items are CLOSED or "
                               "OPEN")
        vqa.append({"question_id": qid, "dataset": name, "image": image, "text": _text(r["question"]),
                    "answer": _text(r.get("answer")), "answer_type": kind, "lang": lang,
                    "modality": _text(r.get("modality")), "content_type": _text(r.get("content_type")),
                    "img_name": r["img_name"],
                    "domain": SLAKE_DOMAINS.get(_text(r.get("modality")).lower(), domain or "other")})
    return EvalData(name, "slake", vqa, [], lambda image: (folder / image).read_bytes(), left_out)


def _load_llava_med(name: str, path: Path, languages, domain) -> EvalData:
    from .corpus import CorpusError
    from .images import ImageStore

    chat, seen = [], set()
    for line, raw in enumerate(read_jsonl(path), 1):
        try:
            item = {**_chat_item(raw), "dataset": name}
            if item["question_id"] in seen:
                raise ValueError(f"question_id {item['question_id']!r} repeats")
        except (ValueError, CorpusError) as e:
            raise EvalSetError(f"{path}:{line}: {e}") from None
        seen.add(item["question_id"])
        chat.append(item)
    return EvalData(name, "llava_med", [], chat, _store_reader(path.parent / "images", ImageStore))


def _load_vital(name: str, folder: Path, languages, domain) -> EvalData:
    from .images import ImageStore

    try:
        vqa, chat = load_eval_sets(folder)
    except (FileNotFoundError, ValueError) as e:
        raise EvalSetError(str(e)) from None
    vqa = [{**it, "domain": it.get("domain", domain or "other")} for it in vqa]
    return EvalData(name, "vital", vqa, chat, _store_reader(folder / "images", ImageStore))


def _store_reader(root: Path, store_class) -> Callable[[str], bytes]:
    """Reads from the image store at `root`, opened on first use (a set without images/ stops at its first image)."""
    store = []

    def read(image: str) -> bytes:
        if not store:
            if not root.is_dir():
                raise EvalSetError(f"{root}: no such folder; the set's images go in images/ beside its files")
            store.append(store_class(root))
        return store[0].read(image)
    return read


# ------------------------------------------------------------------ for decontaminate: every image hashed

def _hash_bytes(data: bytes, where: str) -> tuple[str, int]:
    try:
        with Image.open(io.BytesIO(data)) as im:
            return image_hashes(im)
    except Exception as e:  # noqa: BLE001 - PIL raises many types for damaged files
        raise EvalSetError(f"{where}: cannot decode the image ({type(e).__name__}); the audit needs every eval "
                           "image: restore the file or remove the item") from None


def read_eval_set(folder: str | Path) -> EvalSet:
    """One eval set (its format found from its files), every item in every language, every image hashed."""
    folder = Path(folder)
    if not folder.exists():
        raise EvalSetError(f"{folder}: no such folder; decontaminate.eval_sets names folders of eval test sets")
    data = load(folder.name, detect(folder), folder, languages=None)
    out = EvalSet(data.name, data.format)
    where = {"huggingface": lambda image: f"{folder}: {image}", "slake": lambda image: str(folder / image)}.get(
        data.format, lambda image: str(folder / "images" / image))
    for it in data.vqa + data.chat:
        image = it["image"]
        if image not in out.images:
            try:
                raw = data.read(image)
            except OSError:
                raise EvalSetError(f"{folder}: item {uid(it)}: image {where(image)} is missing; the audit needs "
                                   "every eval image") from None
            out.images[image] = _hash_bytes(raw, where(image))
        out.items.append({"id": uid(it), "question": _text(it["text"]),
                          "answer": _text(it.get("answer", it.get("gpt4_answer"))),
                          "caption": _text(it.get("fig_caption")), "image": image})
    return out
