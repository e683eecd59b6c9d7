"""Every record that crosses a stage boundary, and the small IO helpers that read and write them.

Stages never invent ad-hoc dict keys: they build one of these dataclasses and call `asdict`.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from itertools import islice
from pathlib import Path
from typing import Any, Iterable, Iterator

# The paper's five modalities (LLaVA-Med's `domain` keys) plus everything else.
DOMAINS = ("chest_xray", "mri", "ct_scan", "histology", "gross", "other")
IMAGE_TOKEN = "<image>"


@dataclass
class CorpusRecord:
    id: str
    image: str  # relative to the corpus image directory
    caption: str
    fig_label: str
    inline_mentions: list[str]
    domain: str
    source: str  # "file:line" of the input record (or "sample:<kind>:<name>")
    pmid: str | None = None
    # provenance (src/vital/provenance.py); defaults, so that records written before them still load
    pmcid: str | None = None  # PMC1234567: the record's `pmcid`, or a pair_id that starts with one
    license: str = "unknown"  # canonical spelling (provenance.normalise_license); "unknown" when nobody said
    source_url: str | None = None  # the record's `source_url` / `url` / `image_url`, when it has one


@dataclass
class Rejected:
    """One input record the corpus stage refused, with where it came from and why."""
    file: str
    line: int  # 1-based line (JSONL/JSON) or row (parquet)
    reason: str
    id: str | None = None


@dataclass
class PoolItem:
    """One question about one pooled figure, with two candidate answers for clinicians to judge."""
    question_id: str
    figure_id: str
    image: str
    domain: str
    caption: str
    inline_mentions: list[str]
    cluster: int
    question: str
    answer_a: str
    answer_b: str
    backend: str
    request_hash: str


@dataclass
class Demo:
    """A clinician-selected demonstration conversation for one modality."""
    id: str
    domain: str
    caption: str
    inline_mentions: list[str]
    conversations: list[dict]
    note: str = ""


@dataclass
class Vote:
    """One clinician judgement of a pool question: is each candidate answer acceptable (the paper's
    question), or which one is better (`preference`: "A" | "B" | "tie")."""
    question_id: str
    annotator: str
    a_acceptable: bool | None
    b_acceptable: bool | None
    note: str = ""
    preference: str | None = None
    answers_hash: str | None = None  # what was judged (annotate.answers_hash); None: written by hand
    voted_at: str | None = None


@dataclass
class Conversation:
    """A LLaVA-format candidate conversation (no `<image>` token yet; the release adds it)."""
    id: str
    image: str
    domain: str
    conversations: list[dict]
    backend: str
    model: str
    request_hash: str
    demo_ids: list[str] = field(default_factory=list)  # the demonstrations in the prompt that made it


@dataclass
class Rating:
    candidate_id: str  # "<conversation id>#<round>"
    conversation_id: str
    round: int
    score: int | None  # 0..10, or None when the reply did not parse: never a default number
    judge: str
    backend: str
    raw: str
    request_hash: str


@dataclass
class Failure:
    """A model request that did not succeed after `max_attempts` (or can never succeed). A rerun retries it."""
    request_hash: str
    keys: list[str]  # the records that asked for it (conversation ids, candidate ids, question ids)
    task: str
    error: str
    attempts: int


@dataclass
class PreferencePair:
    a_id: str
    b_id: str
    label: int  # 1: a preferred, 0: b preferred. Ties are never pairs here; a selector masks any other label.
    weight: float
    source: str  # "clinician" | "model"
    split: str = "train"  # "train" | "validation" | "test", by figure (preferences.split_figures)


def mask_url(url: str) -> str:
    """A URL fit to show: `s3://KEY:SECRET@bucket/x?sig=...` -> `s3://***@bucket/x?***`."""
    url = re.sub(r"(?<=://)[^/@\s]+@", "***@", url)
    return re.sub(r"\?\S*", "?***", url) if "://" in url else url


def request_hash(payload: Any) -> str:
    """Content hash of a model request (model, messages, sampling params): the cache key."""
    blob = json.dumps(payload, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:32]


def round_id(conversation_id: str, k: int) -> str:
    """The id of round k of a conversation: what rate scores and the selector (unit: round) scores."""
    return f"{conversation_id}#{k}"


def figure_of(unit_id: str) -> str:
    """The figure a generated unit is about: `<figure>#<round>`, or `<figure>` for a conversation."""
    return unit_id.split("#")[0]


# How a conversation's rounds combine into one value (the selector's score, or a rating with unit: conversation).
# "first": the first round alone, as the authors' released selector scores a conversation.
AGGREGATES = {"first": lambda xs: xs[0], "mean": lambda xs: sum(xs) / len(xs), "min": min}
UNITS = ("round", "conversation")
SPLITS = ("train", "validation", "test")  # a figure and every preference pair about it are in one


def rounds(conversation: list[dict]) -> list[tuple[str, str]]:
    """(question, answer) pairs of a human/gpt alternating conversation."""
    return [(conversation[i]["value"], conversation[i + 1]["value"])
            for i in range(0, len(conversation) - 1, 2)]


# ---------------------------------------------------------------- IO helpers

def read_jsonl(path: str | Path) -> Iterator[dict]:
    """Rows of a JSONL file; a bad line is an error naming file:line."""
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                yield json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{n}: not valid JSON ({e.msg}); fix or delete that line") from None


def chunks(items: Iterable, size: int) -> Iterator[list]:
    """Lists of `size` items (the last one shorter) from any iterable, read as they are needed."""
    it = iter(items)
    while part := list(islice(it, size)):
        yield part


def dumps(row: Any) -> str:
    if hasattr(row, "__dataclass_fields__"):
        row = asdict(row)
    return json.dumps(row, ensure_ascii=False, sort_keys=False)


@contextmanager
def atomic_file(path: str | Path):
    """A text file opened for writing that readers see whole or not at all: it is written to a temp file beside
    `path` and moved over it (fsynced) only when the block ends without an error."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_atomic(path: str | Path, text: str) -> None:
    """Write text so that readers see the old file or the new one, never half of it."""
    with atomic_file(path) as f:
        f.write(text)


def write_jsonl(path: str | Path, rows: Iterable[Any]) -> int:
    """One JSON line per row, written as the rows come (a generator is never held whole), atomically."""
    n = 0
    with atomic_file(path) as f:
        for n, row in enumerate(rows, 1):
            f.write(dumps(row) + "\n")
    return n


DIGITS = 4  # significant digits of a metric: float noise across CPUs stays below them (README: Reproducing a run)
CSV_FLOAT = f"%.{DIGITS}g"  # pandas to_csv(float_format=...) for metrics tables


def meaningful(obj: Any, digits: int = DIGITS) -> Any:
    """`obj` with every float rounded to `digits` significant digits, in dicts and lists too."""
    if isinstance(obj, float):
        return float(f"{obj:.{digits}g}") if obj == obj and abs(obj) != float("inf") else obj
    if isinstance(obj, dict):
        return {k: meaningful(v, digits) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [meaningful(v, digits) for v in obj]
    return obj


class Replay:
    """An iterable that can be gone through more than once, each time afresh from `make()` (e.g. records read
    back from a file), of `length` items: what a stage passes where a list of everything would not fit in memory."""

    def __init__(self, make, length: int):
        self.make, self.length = make, length

    def __iter__(self):
        return iter(self.make())

    def __len__(self):
        return self.length


def write_json(path: str | Path, obj: Any) -> None:
    """`obj` as indented JSON, atomically. A list (or a Replay) is written one element at a time (the same bytes
    as one json.dumps of the list), so a release of any size never becomes one string in memory."""
    if not isinstance(obj, (list, Replay)):
        write_atomic(path, json.dumps(obj, ensure_ascii=False, indent=2) + "\n")
        return
    with atomic_file(path) as f:
        k = -1
        for k, item in enumerate(obj):
            text = json.dumps(item, ensure_ascii=False, indent=2).replace("\n", "\n  ")
            f.write(("[\n  " if k == 0 else ",\n  ") + text)
        f.write("[]\n" if k < 0 else "\n]\n")


class AppendLog:
    """Append-only JSONL: one flushed and fsynced line per finished record, so `kill -9` loses nothing
    that was finished. A torn last line (the process died mid-write) is ignored on reload and cut off
    before the next append; a bad line anywhere else is corruption, reported with file:line."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._f = None

    def rows(self) -> list[dict]:
        if not self.path.exists():
            return []
        rows = []
        with open(self.path, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if not line.endswith("\n"):
                    break  # torn write from an interrupted run: that record is simply redone
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise ValueError(f"{self.path}:{n}: corrupt record ({e.msg}). Delete that line: the requests "
                                     "it held are sent again on the next run") from None
        return rows

    def load(self, key: str) -> dict[str, dict]:
        return {row[key]: row for row in self.rows()}

    def append(self, row: Any, sync: bool = True) -> None:
        """Write one record; with sync=False the caller calls `sync()` after a group of them."""
        if self._f is None:
            self._cut_torn_tail()
            self._f = open(self.path, "a", encoding="utf-8")
        self._f.write(dumps(row) + "\n")
        if sync:
            self.sync()

    def sync(self) -> None:
        if self._f:
            self._f.flush()
            os.fsync(self._f.fileno())

    def _cut_torn_tail(self) -> None:
        if not self.path.exists():
            return
        with open(self.path, "rb+") as f:
            data_end = f.seek(0, os.SEEK_END)
            pos = data_end
            while pos > 0:  # back to the last newline
                step = min(4096, pos)
                f.seek(pos - step)
                chunk = f.read(step)
                i = chunk.rfind(b"\n")
                if i >= 0:
                    pos = pos - step + i + 1
                    break
                pos -= step
            if pos != data_end:
                f.truncate(pos)

    def close(self) -> None:
        if self._f:
            self._f.close()
            self._f = None
