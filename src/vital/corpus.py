"""Stage `corpus`: figures with captions and in-text mentions, from the bundled sample or a user corpus.

A user corpus is LLaVA-Med `fig_captions` records (JSON array, JSONL or parquet) plus an image directory:
    {"pair_id": "...", "pmid": "...", "fig_label": "...", "fig_caption": "..." | {"tokens": "..."},
     "in_text_mention": "..." | {"tokens": "..."} | [...], "domain": {"chest_xray": true, ...}}
The image is `<image_dir>/<pair_id>.{jpg,jpeg,png}` unless the record names one in `image` (a relative path that
stays inside `image_dir`, symlinks resolved). Bad records go to `rejected` with file, line and reason; with
`strict` the first one stops the run. `vital validate corpus` runs the same `ingest`, so both agree.

Provenance (src/vital/provenance.py): `pmcid` (the record's, or a pair_id like PMC1234567_F1), `license` (the
record's `license` / `licence`, else the `corpus.licenses` side file by pmcid, else "unknown") and `source_url`
(`source_url` / `url` / `image_url`) are kept on each record; `source` is the input's file:line.
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
from .provenance import LicenseFileError, license_of, pmcid_of, read_licenses, source_url_of
from .schema import DOMAINS, CorpusRecord, Rejected

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
MAX_PIXELS = 40_000_000  # width x height; params.yaml corpus.max_pixels and `vital validate corpus --max-pixels`


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
        licenses: dict[str, int] = {}
        for r in self.records:
            licenses[r.license] = licenses.get(r.license, 0) + 1
        return {"records": len(self.records), "rejected": len(self.rejected),
                "rejected_by_reason": dict(sorted(reasons.items())), "by_domain": domains,
                "by_license": dict(sorted(licenses.items()))}

    def refusal(self, source) -> str | None:
        """Why this corpus cannot be used (no usable record), in the words the stage stops with and
        `vital validate corpus` prints; None when it can."""
        if self.records:
            return None
        if not self.rejected:
            return f"corpus: no usable records in {source} (0 rejected: it holds no record)"
        reasons = ", ".join(f"{k}={n}" for k, n in self.counts()["rejected_by_reason"].items())
        first = self.rejected[0]
        return (f"corpus: no usable records in {source} ({len(self.rejected)} rejected: {reasons}); "
                f"first: {first.file}:{first.line}: {first.reason}")


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
                source=f"sample:{s['src'][0]}:{s['src'][1]}", license=s["license"]))
    return result


# ------------------------------------------------------------------ user corpus (LLaVA-Med fig_captions)

def _text(value, what: str) -> str:
    """LLaVA-Med text: a string or {"tokens": string}; None is empty. Anything else raises CorpusError."""
    if isinstance(value, dict):
        value = value.get("tokens", value.get("text"))
    if value is None:
        return ""
    if not isinstance(value, str):
        raise CorpusError(f'{what} is not text ({type(value).__name__}): use a string or {{"tokens": string}}')
    return value.strip()


def text_value(value, what: str) -> str:
    """Lenient `_text`: a list is joined and a number written out (numeric pmid / pair_id from parquet)."""
    if isinstance(value, dict):
        value = value.get("tokens", value.get("text"))
    if isinstance(value, list):
        return " ".join(text_value(v, what) for v in value)
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    return _text(value, what)


def _mentions(value) -> list[str]:
    """in_text_mention: text, or a list of text items (LLaVA-Med: a list of {"tokens": ...})."""
    if value is None:
        return []
    items = value if isinstance(value, list) else [value]
    return [t for t in (_text(v, "in_text_mention") for v in items) if t]


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
        import pyarrow as pa
        import pyarrow.parquet as pq

        try:
            rows = pq.read_table(path).to_pylist()
        except (OSError, pa.ArrowException) as e:
            raise CorpusError(f"{path}: cannot read it as parquet ({e})") from None
        for i, row in enumerate(rows, 1):
            yield i, row, None
        return
    try:
        text = path.read_bytes().decode("utf-8", errors="surrogateescape")
    except OSError as e:
        raise CorpusError(f"{path}: cannot read it ({e.strerror})") from None
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


def _check_image(path: Path, max_pixels: int) -> str | None:
    if not path.exists():
        return f"missing image: {path}"
    if path.stat().st_size == 0:
        return f"empty image: {path} is 0 bytes"
    # max_pixels stands in for Pillow's decompression-bomb check, which would warn or raise before we see the size
    bomb_limit, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None
    try:
        with Image.open(path) as im:
            w, h = im.size  # from the header: nothing is decoded yet
            if w * h > max_pixels:
                return (f"image too large: {w}x{h} = {w * h / 1e6:.1f} MP > corpus.max_pixels "
                        f"{max_pixels / 1e6:.1f} MP: {path}")
            im.load()
    except Exception as e:  # noqa: BLE001 - PIL raises many types for corrupt files
        return f"corrupt image: {path}: {type(e).__name__}"
    finally:
        Image.MAX_IMAGE_PIXELS = bomb_limit
    return None


def _find_image(image_dir: Path, raw: dict, rid: str) -> Path:
    """The record's image file, which must resolve (`..`, symlinks) inside image_dir: a corpus never packs
    a file from elsewhere on disk into a dataset."""
    name = raw.get("image")
    if name and not isinstance(name, str):
        raise CorpusError(f"image is not text ({type(name).__name__}): name a file inside corpus.image_dir")
    if name:
        path = image_dir / name  # an absolute `name` replaces image_dir, and is caught below
    else:
        path = next((p for p in (image_dir / f"{rid}{s}" for s in IMAGE_SUFFIXES) if p.exists()),
                    image_dir / f"{rid}.jpg")
    if "\0" in str(path):
        raise CorpusError("bad image path: it holds a NUL character")
    real = path.resolve()
    if not real.is_relative_to(image_dir.resolve()):
        raise CorpusError(f"path escapes image_dir: {name or path.name} resolves to {real}, outside {image_dir}")
    return path


def parse_record(raw, image_dir: Path, source: str, max_pixels: int = MAX_PIXELS,
                 licenses: dict[str, dict] | None = None) -> tuple[CorpusRecord, Path]:
    """One LLaVA-Med fig_captions record -> CorpusRecord; `licenses` is the side file (provenance.read_licenses).
    Raises CorpusError with the reason."""
    if not isinstance(raw, dict):
        raise CorpusError(f"malformed record: expected an object, got {type(raw).__name__}")
    if _has_bad_utf8(raw):
        raise CorpusError("non-UTF-8 text: re-encode the file as UTF-8")
    rid = text_value(raw.get("pair_id", raw.get("id")), "pair_id")
    if not rid:
        raise CorpusError("missing id: the record has no pair_id")
    if "/" in rid or "\\" in rid or rid.startswith("."):
        raise CorpusError(f"bad id: {rid!r} cannot name an image file; use letters, digits, '-', '_'")
    caption = _text(raw.get("fig_caption", raw.get("caption")), "caption")
    if not caption:
        raise CorpusError("missing caption: fig_caption is empty")
    pmcid = pmcid_of(raw, rid)
    listed = (licenses or {}).get(pmcid) or {}
    record = CorpusRecord(
        id=rid, image="", caption=caption, fig_label=text_value(raw.get("fig_label"), "fig_label"),
        inline_mentions=_mentions(raw.get("in_text_mention", raw.get("inline_mentions"))),
        domain=parse_domain(raw.get("domain")), source=source,
        pmid=text_value(raw.get("pmid"), "pmid") or listed.get("pmid"), pmcid=pmcid,
        license=license_of(raw, pmcid, licenses), source_url=source_url_of(raw))
    image = _find_image(image_dir, raw, rid)
    problem = _check_image(image, max_pixels)
    if problem:
        raise CorpusError(problem)
    return record, image


def ingest(path: Path, image_dir: Path, out_image_dir: Path | None, strict: bool, shard_mb: float = 256,
           max_pixels: int = MAX_PIXELS, licenses: Path | None = None) -> CorpusResult:
    """Read a user corpus; pack accepted images into `out_image_dir` (if given) so it is self-contained.
    `licenses` (corpus.licenses) is the side file of licences by pmcid. The `corpus` stage and `vital validate
    corpus` both call this, so they agree on every record."""
    if not path.exists():
        raise CorpusError(f"{path}: no such file or folder; corpus.path (or `vital validate corpus PATH`) names a "
                          ".json, .jsonl or .parquet file or a folder of them")
    if not image_dir.is_dir():
        raise CorpusError(f"{image_dir}: no such folder; corpus.image_dir (or --image-dir) names the folder of images")
    files = sorted(p for p in path.rglob("*") if p.suffix.lower() in (".json", ".jsonl", ".parquet")) \
        if path.is_dir() else [path]
    if not files:
        raise CorpusError(f"{path}: no .json, .jsonl or .parquet corpus files found")
    try:
        table = read_licenses(licenses) if licenses else None
    except LicenseFileError as e:
        raise CorpusError(f"corpus.licenses: {e}") from None
    result, seen = CorpusResult(), set()
    with ShardWriter(out_image_dir, shard_mb) if out_image_dir else nullcontext() as out:
        for f in files:
            for line, raw, error in _iter_raw(f):
                rid = raw.get("pair_id") if isinstance(raw, dict) else None
                try:
                    if error:
                        raise CorpusError(error)
                    record, image = parse_record(raw, image_dir, f"{f.name}:{line}", max_pixels, table)
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
