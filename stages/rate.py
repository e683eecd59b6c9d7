"""DVC stage `rate`: the model scores every candidate Q&A round 0-10 (null when the reply does not parse),
and every pool answer, so that merge_preferences can compare the rater with clinicians.

    dvc repro rate
    OPENAI_API_KEY=... dvc exp run -S rate.backend=openai -S rate.model=gpt-4o
"""
import time

from common import Indexed, image_store, load, model_client, params, stream, write_metrics

from vital.rate import rate
from vital.schema import AppendLog, Conversation, CorpusRecord, PoolItem, write_jsonl
from vital.replies import rejected_note


def main():
    t0, p = time.time(), params("rate")
    records = Indexed("data/corpus/records.jsonl", CorpusRecord)  # ids and offsets held, records read
    conversations = stream("data/candidates/conversations.jsonl", Conversation)  # read once, not held
    pool = load("data/annotation/pool.jsonl", PoolItem)  # the pool answers too: rater vs clinicians
    with model_client("rate", p) as (client, batch_state):
        ratings, pool_ratings, failures, stats = rate(
            conversations, records, image_store(), client, AppendLog("data/cache/rate.jsonl"),
            {"temperature": p["temperature"], "max_tokens": p["max_tokens"]}, p["max_image_side"], batch_state, pool)
    write_jsonl("data/candidates/ratings.jsonl", ratings)
    write_jsonl("data/candidates/pool_ratings.jsonl", pool_ratings)
    write_jsonl("data/candidates/rate_failures.jsonl", failures)
    write_metrics("rate", {"backend": client.name, "judge": client.model, **stats}, t0)
    if note := rejected_note("rate", stats["unparsed_by_reason"], "score null, raw reply kept, in "
                             "data/candidates/ratings.jsonl"):
        print(note)


if __name__ == "__main__":
    main()
