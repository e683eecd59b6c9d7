"""DVC stage `rate`: the model scores every candidate Q&A round 0-10 (null when the reply does not parse).

    dvc repro rate
"""
import time

from common import CORPUS_IMAGES, load, params, write_metrics

from vital.backends import make_backend
from vital.rate import rate
from vital.schema import AppendLog, Conversation, CorpusRecord, write_jsonl


def main():
    t0, p = time.time(), params("rate")
    records = {r.id: r for r in load("data/corpus/records.jsonl", CorpusRecord)}
    conversations = load("data/candidates/conversations.jsonl", Conversation)
    backend = make_backend(p["backend"])
    ratings, stats = rate(conversations, records, CORPUS_IMAGES, backend, AppendLog("data/cache/rate.jsonl"),
                          {"temperature": p["temperature"]})
    write_jsonl("data/candidates/ratings.jsonl", ratings)
    write_metrics("rate", {"backend": backend.name, "judge": backend.model, **stats}, t0)


if __name__ == "__main__":
    main()
