"""DVC stage `generate`: demonstration-prompted multi-turn Q&A for every figure.

    dvc repro generate
    dvc exp run -S generate.backend=openai -S generate.model=gpt-4o   # issue #3
"""
import time

from common import CORPUS_IMAGES, load, params, write_metrics

from vital.backends import make_backend
from vital.generate import generate
from vital.schema import AppendLog, CorpusRecord, Demo, write_jsonl


def main():
    t0, p = time.time(), params("generate")
    records = load("data/corpus/records.jsonl", CorpusRecord)
    demos = load(p["demos"], Demo)
    backend = make_backend(p["backend"])
    conversations, rejected, stats = generate(
        records, CORPUS_IMAGES, demos, backend, AppendLog("data/cache/generate.jsonl"), p["min_rounds"],
        p["demos_per_modality"], p["seed"], {"temperature": p["temperature"], "max_tokens": p["max_tokens"]})
    write_jsonl("data/candidates/generate_rejected.jsonl", rejected)
    if not conversations:
        raise SystemExit(f"generate: every conversation was rejected ({stats['rounds_dropped']} rounds dropped); "
                         "see data/candidates/generate_rejected.jsonl and the generate.* params")
    write_jsonl("data/candidates/conversations.jsonl", conversations)
    write_metrics("generate", {"backend": backend.name, "model": backend.model, **stats}, t0)


if __name__ == "__main__":
    main()
