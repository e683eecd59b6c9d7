"""Stage `corpus`: figures with captions and in-text mentions, from the bundled sample or a user corpus.

A user corpus is LLaVA-Med `fig_captions` records (JSON array, JSONL or parquet) plus an image directory:
    {"pair_id": "...", "pmid": "...", "fig_label": "...", "fig_caption": "..." | {"tokens": "..."},
     "in_text_mention": "..." | {"tokens": "..."} | [...], "domain": {"chest_xray": true, ...}}
The image is `<image_dir>/<pair_id>.{jpg,jpeg,png}` unless the record names one in `image`.
Bad records go to `rejected` with file, line and reason; with `strict` the first one stops the run.
"""
from __future__ import annotations

import io
import json
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from .images import ShardWriter
from .schema import DOMAINS, CorpusRecord, Rejected

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")


class CorpusError(ValueError):
    pass


@dataclass
class CorpusResult:
    records: list[CorpusRecord] = field(default_factory=list)
    rejected: list[Rejected] = field(default_factory=list)

    def counts(self) -> dict:
        reasons: dict[str, int] = {}
        for r in self.rejected:
            key = r.reason.split(":")[0]
            reasons[key] = reasons.get(key, 0) + 1
        domains = {d: sum(r.domain == d for r in self.records) for d in DOMAINS}
        return {"records": len(self.records), "rejected": len(self.rejected),
                "rejected_by_reason": dict(sorted(reasons.items())), "by_domain": domains}


# ------------------------------------------------------------------ sample corpus

def _dicom_to_image(path: str) -> Image.Image:
    import pydicom
    from pydicom.pixels import apply_color_lut

    ds = pydicom.dcmread(path)
    a = ds.pixel_array
    if int(ds.get("NumberOfFrames", 1) or 1) > 1:
        a = a[len(a) // 2]
    photometric = ds.PhotometricInterpretation
    if photometric == "PALETTE COLOR":
        a = apply_color_lut(a, ds)
    if a.ndim == 2:  # grey: robust window to the 0.5-99.5 percentiles
        a = a.astype(np.float64)
        lo, hi = np.percentile(a, [0.5, 99.5])
        a = np.clip((a - lo) / max(hi - lo, 1e-9), 0, 1)
        if photometric == "MONOCHROME1":  # MONOCHROME1 stores white as 0
            a = 1 - a
        return Image.fromarray((a * 255).astype(np.uint8)).convert("RGB")
    if a.dtype != np.uint8:
        a = (a / a.max() * 255).astype(np.uint8)
    return Image.fromarray(a).convert("RGB")


def _skimage_to_image(name: str) -> Image.Image:
    import skimage.data

    a = getattr(skimage.data, name)()
    if a.dtype != np.uint8:
        a = (a / a.max() * 255).astype(np.uint8)
    return Image.fromarray(a).convert("RGB")


def load_sample_image(src: tuple[str, str]) -> Image.Image:
    kind, name = src
    if kind == "dicom":
        from pydicom.data import get_testdata_file

        path = get_testdata_file(name)  # ships in pydicom / pydicom-data; no download
        assert path, f"DICOM sample {name} not found: is pydicom-data installed? Run `make install`."
        return _dicom_to_image(path)
    return _skimage_to_image(name)


def build_sample(image_dir: Path, max_image_side: int, shard_mb: float = 256) -> CorpusResult:
    """The bundled sample, its images packed into `image_dir` (see images.py)."""
    from .sample import SAMPLE

    result = CorpusResult()
    with ShardWriter(image_dir, shard_mb) as out:
        for s in SAMPLE:
            im = load_sample_image(s["src"])
            im.thumbnail((max_image_side, max_image_side))
            name, buf = f"{s['id']}.png", io.BytesIO()
            im.save(buf, format="PNG", optimize=True)
            out.add(name, buf.getvalue())
            result.records.append(CorpusRecord(
                id=s["id"], image=name, caption=s["caption"], fig_label=s["fig_label"],
                inline_mentions=[s["mention"]], domain=s["domain"],
                source=f"sample:{s['src'][0]}:{s['src'][1]}"))
    return result


# ------------------------------------------------------------------ user corpus (LLaVA-Med fig_captions)

def text_value(value, what: str) -> str:
    """LLaVA-Med stores text as a string or as {"tokens": ...}."""
    if isinstance(value, dict):
        value = value.get("tokens", value.get("text"))
    if isinstance(value, list):
        value = " ".join(text_value(v, what) for v in value)
    if value is None:
        return ""
    if isinstance(value, (int, float)) and not isinstance(value, bool):  # numeric pmid / pair_id (parquet)
        return str(value)
    if not isinstance(value, str):
        raise CorpusError(f"{what} is a {type(value).__name__}, expected text or {{tokens: text}}")
    return value.strip()


def _mentions(value) -> list[str]:
    if value is None:
        return []
    items = value if isinstance(value, list) else [value]
    return [t for t in (text_value(v, "in_text_mention") for v in items) if t]


# how other releases name the domains (BioMed-VITAL: CXR, MRI, Histology, Gross, CT), case-insensitive
DOMAIN_ALIASES = {"cxr": "chest_xray", "chest x-ray": "chest_xray", "chest_x-ray": "chest_xray", "ct": "ct_scan",
                  "histopathology": "histology", **{d: d for d in DOMAINS}}


def parse_domain(value) -> str:
    """LLaVA-Med: a dict of booleans. A plain string is accepted too (a domain or an alias). No true flag ->
    'other'. Anything else raises CorpusError with the accepted values."""
    if isinstance(value, str):
        if value.strip().lower() not in DOMAIN_ALIASES:
            raise CorpusError(f"unknown domain: {value!r}; use one of {', '.join(DOMAINS)} (or CXR, CT)")
        return DOMAIN_ALIASES[value.strip().lower()]
    if value is None:
        return "other"
    if not isinstance(value, dict):
        raise CorpusError(f"unknown domain: {value!r}; expected a dict of booleans")
    unknown = [k for k in value if k not in DOMAINS]
    if unknown:
        raise CorpusError(f"unknown domain: {unknown}; use keys from {', '.join(DOMAINS)}")
    true = [d for d in DOMAINS if value.get(d)]  # several true: the first in DOMAINS order
    return true[0] if true else "other"


def _has_bad_utf8(obj) -> bool:
    """Undecodable bytes survive `surrogateescape` decoding as lone surrogates."""
    if isinstance(obj, str):
        return any("\udc80" <= ch <= "\udcff" for ch in obj)
    if isinstance(obj, dict):
        return any(_has_bad_utf8(k) or _has_bad_utf8(v) for k, v in obj.items())
    if isinstance(obj, list):
        return any(_has_bad_utf8(v) for v in obj)
    return False


def _iter_raw(path: Path):
    """(line, record | None, error | None) for each record of a JSON, JSONL or parquet file."""
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        for i, row in enumerate(pq.read_table(path).to_pylist(), 1):
            yield i, row, None
        return
    text = path.read_bytes().decode("utf-8", errors="surrogateescape")
    if suffix == ".jsonl":
        for n, line in enumerate(text.split("\n"), 1):  # not splitlines(): JSON strings may hold U+2028 etc.
            if not line.strip():
                continue
            try:
                yield n, json.loads(line), None
            except json.JSONDecodeError as e:
                yield n, None, f"malformed JSON: {e.msg}"
        return
    if suffix != ".json":
        raise CorpusError(f"{path}: unsupported corpus file type {suffix!r}; use .json, .jsonl or .parquet")
    # JSON array: decode element by element so each record keeps its line number
    dec = json.JSONDecoder()
    pos = text.index("[") + 1 if text.lstrip().startswith("[") else None
    if pos is None:
        raise CorpusError(f"{path}:1: expected a JSON array of records")
    while True:
        while pos < len(text) and text[pos] in " \t\r\n,":
            pos += 1
        if pos >= len(text) or text[pos] == "]":
            return
        line = text.count("\n", 0, pos) + 1
        try:
            obj, pos = dec.raw_decode(text, pos)
        except json.JSONDecodeError as e:
            # the rest of the array cannot be split reliably once one element is broken
            yield line, None, f"malformed JSON: {e.msg} (rest of file not read)"
            return
        yield line, obj, None


def _check_image(path: Path) -> str | None:
    if not path.exists():
        return f"missing image: {path}"
    if path.stat().st_size == 0:
        return f"empty image: {path} is 0 bytes"
    try:
        with Image.open(path) as im:
            im.load()
    except Exception as e:  # noqa: BLE001 - PIL raises many types for corrupt files
        return f"corrupt image: {path}: {type(e).__name__}"
    return None


def _find_image(image_dir: Path, raw: dict, rid: str) -> Path:
    if raw.get("image"):
        return image_dir / str(raw["image"])
    for suffix in IMAGE_SUFFIXES:
        p = image_dir / f"{rid}{suffix}"
        if p.exists():
            return p
    return image_dir / f"{rid}.jpg"


def parse_record(raw, image_dir: Path, source: str) -> tuple[CorpusRecord, Path]:
    """One LLaVA-Med fig_captions record -> CorpusRecord. Raises CorpusError with the reason."""
    if not isinstance(raw, dict):
        raise CorpusError(f"malformed record: expected an object, got {type(raw).__name__}")
    if _has_bad_utf8(raw):
        raise CorpusError("non-UTF-8 text: re-encode the file as UTF-8")
    rid = text_value(raw.get("pair_id", raw.get("id")), "pair_id")
    if not rid:
        raise CorpusError("missing id: the record has no pair_id")
    if "/" in rid or "\\" in rid or rid.startswith("."):
        raise CorpusError(f"bad id: {rid!r} cannot name an image file; use letters, digits, '-', '_'")
    caption = text_value(raw.get("fig_caption", raw.get("caption")), "fig_caption")
    if not caption:
        raise CorpusError("missing caption: fig_caption is empty")
    record = CorpusRecord(
        id=rid, image="", caption=caption, fig_label=text_value(raw.get("fig_label"), "fig_label"),
        inline_mentions=_mentions(raw.get("in_text_mention", raw.get("inline_mentions"))),
        domain=parse_domain(raw.get("domain")), source=source,
        pmid=text_value(raw.get("pmid"), "pmid") or None)
    image = _find_image(image_dir, raw, rid)
    problem = _check_image(image)
    if problem:
        raise CorpusError(problem)
    return record, image


def ingest(path: Path, image_dir: Path, out_image_dir: Path | None, strict: bool, shard_mb: float = 256) -> CorpusResult:
    """Read a user corpus; pack accepted images into `out_image_dir` (if given) so it is self-contained."""
    files = sorted(p for p in path.rglob("*") if p.suffix.lower() in (".json", ".jsonl", ".parquet")) \
        if path.is_dir() else [path]
    if not files:
        raise CorpusError(f"{path}: no .json, .jsonl or .parquet corpus files found")
    result, seen = CorpusResult(), set()
    with ShardWriter(out_image_dir, shard_mb) if out_image_dir else nullcontext() as out:
        for f in files:
            for line, raw, error in _iter_raw(f):
                rid = raw.get("pair_id") if isinstance(raw, dict) else None
                try:
                    if error:
                        raise CorpusError(error)
                    record, image = parse_record(raw, image_dir, source=f"{f.name}:{line}")
                    if record.id in seen:
                        raise CorpusError(f"duplicate id: {record.id} already seen earlier in the corpus")
                except CorpusError as e:
                    if strict:
                        raise CorpusError(f"{f}:{line}: {e} (set corpus.strict: false to skip bad records "
                                          "into data/corpus/rejected.jsonl)") from None
                    result.rejected.append(Rejected(file=str(f), line=line, reason=str(e),
                                                    id=rid if isinstance(rid, str) else None))
                    continue
                seen.add(record.id)
                record.image = f"{record.id}{image.suffix.lower()}"
                if out:
                    out.add(record.image, image.read_bytes())
                result.records.append(record)
    return result
