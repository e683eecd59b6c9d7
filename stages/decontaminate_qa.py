"""DVC stage `decontaminate_qa`: no generated round that holds an eval item's question and answer is rated,
selected or released.

    dvc repro decontaminate_qa
    dvc exp run -S decontaminate.text_cosine=null          # MinHash containment only (no MiniLM)

Reads data/candidates/generated.jsonl (`generate`) and the same eval sets as `decontaminate`; writes
data/candidates/conversations.jsonl without the matched rounds (a conversation left with none is dropped), and
the release's audit, data/release/contamination.csv: the figure matches of `decontaminate` and the round
matches, one row per pair (id, eval_set, eval_id, kind, distance).
"""
import time
from pathlib import Path
from collections import Counter
from dataclasses import replace

from common import EMBEDDINGS, chunks, params, stream, write_metrics
import pandas as pd  # after common: a bad params.yaml stops before the heavy imports

from vital.decontaminate import REPORT_COLUMNS, EvalSetError, RoundMatcher, counts, qa_text, read_eval_set
from vital.encoders import EmbeddingCache, cached_text_encoder
from vital.schema import CSV_FLOAT, Conversation, write_jsonl


CHUNK = 4096  # conversations matched at a time: the stage never holds the whole file


def main():
    t0, p = time.time(), params("decontaminate")
    try:
        sets = [read_eval_set(Path(p["eval_root"]) / name) for name in p["eval_sets"]]
    except EvalSetError as e:
        raise SystemExit(f"decontaminate_qa: {e}") from None
    embed, rows, n = cached_text_encoder(EMBEDDINGS), [], Counter()
    match = RoundMatcher(sets, p["min_words"], p["text_containment"], p["text_cosine"], embed)  # items once

    def clean():
        for part in chunks(stream("data/candidates/generated.jsonl", Conversation), CHUNK):
            rounds = [(f"{c.id}#{k // 2}", qa_text(c.conversations[k]["value"], c.conversations[k + 1]["value"]))
                      for c in part for k in range(0, len(c.conversations) - 1, 2)]
            found = match(rounds)
            rows.extend(found)
            matched = {r["id"] for r in found}
            n.update(conversations=len(part), rounds=len(rounds), rounds_removed=len(matched))
            for c in part:
                turns = [t for k in range(0, len(c.conversations) - 1, 2) if f"{c.id}#{k // 2}" not in matched
                         for t in c.conversations[k:k + 2]]
                if turns:
                    yield replace(c, conversations=turns)

    kept = write_jsonl("data/candidates/conversations.jsonl", clean())
    rows.sort(key=lambda r: (r["id"], r["eval_set"], r["eval_id"], r["kind"]))  # as one call would order them
    figures = pd.read_csv("data/corpus/contamination.csv", dtype={"id": str, "eval_id": str})
    report = pd.concat([figures, pd.DataFrame(rows, columns=REPORT_COLUMNS)], ignore_index=True)
    report.to_csv("data/release/contamination.csv", index=False, float_format=CSV_FLOAT)
    by_set = counts(rows, sets)
    for name, k in match.short.items():
        by_set[name]["items_too_short_to_match"] = k
    write_metrics("decontaminate_qa", {"conversations": n["conversations"], "rounds": n["rounds"],
                                       "rounds_removed": n["rounds_removed"],
                                       "conversations_removed": n["conversations"] - kept,
                                       "kept": kept,
                                       "thresholds": {k: p[k] for k in ("min_words", "text_containment", "text_cosine")},
                                       "by_eval_set": by_set, "features": dict(EmbeddingCache.counts)}, t0)


if __name__ == "__main__":
    main()
