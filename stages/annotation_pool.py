"""DVC stage `annotation_pool`: diverse figures, each with questions and two candidate answers.

    dvc repro annotation_pool
    vital annotate serve --pool data/annotation/pool.jsonl   # clinicians judge it (issue #4)
"""
import time

from common import CORPUS_IMAGES, load, params, write_metrics

from vital.backends import make_backend
from vital.pool import build_pool
from vital.schema import AppendLog, CorpusRecord, write_jsonl


def main():
    t0, p = time.time(), params("annotation_pool")
    records = load("data/corpus/records.jsonl", CorpusRecord)
    backend = make_backend(p["backend"])
    items, stats = build_pool(records, CORPUS_IMAGES, backend, AppendLog("data/cache/annotation_pool.jsonl"),
                              p["clusters"], p["per_cluster"], p["questions_per_figure"], p["image_weight"],
                              p["seed"])
    write_jsonl("data/annotation/pool.jsonl", items)
    write_metrics("annotation_pool", {"backend": backend.name, **stats}, t0)


if __name__ == "__main__":
    main()
