"""DVC stage `filter`: score every candidate conversation and keep the top `filter.ratio` as the release.

    dvc repro filter
    dvc exp run -S filter.ratio=0.5
"""
import time
from collections import Counter
from pathlib import Path

from common import CORPUS_IMAGES, load, params, write_metrics

from vital import release, selector
from vital.schema import Conversation, CorpusRecord, write_json


def main():
    t0, p = time.time(), params("filter")
    records = {r.id: r for r in load("data/corpus/records.jsonl", CorpusRecord)}
    conversations = load("data/candidates/conversations.jsonl", Conversation)
    units = selector.build_units(records, conversations, [])
    scores = selector.score(selector.load(Path("models/selector")), selector.featurize(units, CORPUS_IMAGES))
    conv_scores = release.conversation_scores(conversations, dict(zip(units.index, scores.tolist())))
    keep = release.select_top(conv_scores, p["ratio"])
    by_id = {c.id: c for c in conversations}
    out = [release.to_llava(by_id[i], conv_scores[i]) for i in keep]
    write_json("data/release/instructions.json", out)
    write_metrics("filter", {"candidates": len(conversations), "kept": len(out), "ratio": p["ratio"],
                             "rounds_kept": sum(len(r["conversations"]) // 2 for r in out),
                             "kept_by_domain": dict(sorted(Counter(r["domain"] for r in out).items())),
                             "generators": sorted({r["generator"] for r in out}),
                             "min_kept_score": round(min(conv_scores[i] for i in keep), 5),
                             "image_root": str(CORPUS_IMAGES)}, t0)


if __name__ == "__main__":
    main()
