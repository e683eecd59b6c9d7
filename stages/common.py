"""IO glue shared by the stage scripts: params, typed record files, metrics. No algorithm here.

Every stage imports this module before anything heavy: importing it checks all of params.yaml
(src/vital/params.py), so a wrong value stops the stage within a second, one line per problem."""
from __future__ import annotations

import sys

from vital.params import ParamsError, check

try:
    PARAMS = check()
except ParamsError as e:
    print(e, file=sys.stderr)
    sys.exit(2)

import json  # noqa: E402  (after the check, on purpose)
import os  # noqa: E402
import time  # noqa: E402
from collections.abc import Iterator, Mapping  # noqa: E402
from contextlib import contextmanager  # noqa: E402
from pathlib import Path  # noqa: E402

# The same float sums on any x86 machine, so a fresh clone's `dvc repro` rewrites the same models and metrics:
# a fixed thread count and the AVX2 kernels of torch and MKL (README: Reproducing a run). Set them to go faster.
for var, value in (("OMP_NUM_THREADS", "2"), ("MKL_NUM_THREADS", "2"), ("ATEN_CPU_CAPABILITY", "avx2"),
                   ("MKL_CBWR", "AVX2")):
    os.environ.setdefault(var, value)

from vital.images import ImageStore, StoreError  # noqa: E402
from vital.schema import AppendLog, chunks, meaningful, read_jsonl, write_json  # noqa: E402,F401 (chunks: the stages')

CORPUS_IMAGES = Path("data/corpus/images")
EMBEDDINGS = Path("data/cache/embeddings")  # a content-keyed cache shared by stages; not a DVC output


def image_store(path: Path = CORPUS_IMAGES) -> ImageStore:
    """The packed images a stage reads (or a plain folder); a missing store ends the stage with what to run."""
    try:
        return ImageStore(path)
    except StoreError as e:
        raise SystemExit(str(e)) from None


def params(section: str) -> dict:
    """One section of params.yaml, already checked."""
    return dict(PARAMS[section])


def stream(path, cls) -> Iterator:
    """Records of a JSONL file as dataclass instances, one at a time; a row with wrong keys names file:line."""
    for n, row in enumerate(read_jsonl(path), 1):
        try:
            yield cls(**row)
        except TypeError as e:
            raise SystemExit(f"{path}: record {n}: {e}; was it written by an older version? Rerun the stage that "
                             "writes it (dvc repro -f <stage>)") from None


class Indexed(Mapping):
    """The records of a JSONL file by id, each read back from the file when it is looked up: only the ids and
    their byte offsets are held (a stage that looks records up by id, of a corpus of any size). Read-only."""

    def __init__(self, path, cls):
        self.path, self.cls, self.offset = path, cls, {}
        with open(path, "rb") as f:
            at = 0
            for n, line in enumerate(f, 1):
                if line.strip():
                    try:
                        self.offset[json.loads(line)["id"]] = at
                    except (ValueError, KeyError, TypeError) as e:
                        raise SystemExit(f"{path}:{n}: not a record with an id ({type(e).__name__}: {e}); rerun the "
                                         "stage that writes it (dvc repro -f <stage>)") from None
                at += len(line)
        self._f = open(path, "rb")

    def __getitem__(self, key):
        self._f.seek(self.offset[key])
        row = json.loads(self._f.readline())
        try:
            return self.cls(**row)
        except TypeError as e:
            raise SystemExit(f"{self.path}: record {key!r}: {e}; was it written by an older version? Rerun the "
                             "stage that writes it (dvc repro -f <stage>)") from None

    def __contains__(self, key):
        return key in self.offset

    def __iter__(self):
        return iter(self.offset)

    def __len__(self):
        return len(self.offset)


def load(path, cls) -> list:
    """All records of a JSONL file (see `stream`)."""
    return list(stream(path, cls))


def write_metrics(stage: str, metrics: dict, started: float) -> None:
    """metrics/<stage>.json, plus one summary line with the wall time. The time is printed, not stored,
    so that rerunning the same inputs reproduces every tracked file byte for byte."""
    metrics = meaningful(metrics)
    write_json(f"metrics/{stage}.json", metrics)
    summary = ", ".join(f"{k}={v}" for k, v in metrics.items() if isinstance(v, (int, float, str)) and v is not None)
    print(f"[{stage}] {summary} ({time.time() - started:.1f}s)")


@contextmanager
def model_client(stage: str, section: dict, batch: bool = True):
    """(client, batch state log) from the shared `llm` params and the stage's own endpoint params; an error no
    request can get past (no key, refused key, unknown model, batches still running) ends the stage cleanly."""
    from vital.llm.backends import Fatal
    from vital.llm.client import Client, ClientConfig
    from vital.llm.ray_engine import Engine

    try:
        client = Client(ClientConfig.from_params(params("llm"), section), engine=Engine(**params("engine")))
        batch_state = AppendLog(f"data/cache/{stage}_batches.jsonl") if batch else None
        if batch_state:
            batch_state.path.touch()  # a DVC output even when mode is online
        yield client, batch_state
    except Fatal as e:
        raise SystemExit(f"{stage}: {e}") from None
