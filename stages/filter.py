"""DVC stage `filter`: score every candidate conversation and keep the top `filter.ratio` as the release.

Candidates that cannot make a valid record (missing image, no rounds, broken turns) are skipped and listed in
data/candidates/filter_skipped.jsonl. Scoring streams through the candidates with the selector's own backbone,
unit and aggregate (models/selector/config.json).

    dvc repro filter
    dvc exp run -S filter.ratio=0.5
    dvc exp run -S filter.top_k=60000 -S filter.balance_domains=true
"""
import json
import time
from collections import Counter
from pathlib import Path

import pandas as pd
from common import EMBEDDINGS, image_store, load, params, write_metrics

from vital import images, release, selector
from vital.encoders import count_tokens
from vital.schema import Conversation, CorpusRecord, write_atomic, write_json, write_jsonl


RELEASE_IMAGES = Path("data/release/images")  # the kept conversations' images, packed: the release stands alone


def main():
    t0, p = time.time(), params("filter")
    records = {r.id: r for r in load("data/corpus/records.jsonl", CorpusRecord)}
    conversations, corpus_images = load("data/candidates/conversations.jsonl", Conversation), image_store()
    candidates, skipped = release.screen(conversations, corpus_images)
    write_jsonl("data/candidates/filter_skipped.jsonl", skipped)
    if not candidates:
        raise SystemExit(f"filter: none of the {len(conversations)} candidates is usable; see "
                         "data/candidates/filter_skipped.jsonl")
    try:
        conv_scores, selector_info = selector.score_conversations(candidates, records, corpus_images, EMBEDDINGS,
                                                                  Path("models/selector"))
    except ValueError as e:
        raise SystemExit(f"filter: {e}") from None
    domains = {c.id: c.domain for c in candidates} if p["balance_domains"] else None
    keep = release.select_top(conv_scores, p["ratio"], p["top_k"], domains)
    by_id = {c.id: c for c in conversations}
    out = [release.to_llava(by_id[i], conv_scores[i]) for i in keep]
    report = release.validate(out, corpus_images)
    if report["problems"]:  # never release what a trainer would choke on
        raise SystemExit("filter: the release has problems: " + "; ".join(f"{i}: {w}" for i, w in report["problems"][:5]))
    images.pack(corpus_images, sorted({r["image"] for r in out}), RELEASE_IMAGES, p["shard_mb"])
    write_json("data/release/instructions.json", out)
    pd.DataFrame(out).to_parquet("data/release/instructions.parquet", index=False)
    write_json("data/release/llamafactory.json", [release.to_llamafactory(r) for r in out])
    write_json("data/release/dataset_info.json", release.LLAMAFACTORY_DATASET_INFO)
    write_jsonl("data/release/trl.jsonl", [release.to_trl(r) for r in out])
    tokens = count_tokens([" ".join(t["value"] for t in r["conversations"]) for r in out])
    origin = (f"{len(out)} instruction conversations kept of {len(conversations)} candidates "
              f"(`filter` params: {json.dumps(p, sort_keys=True)}).")
    card = release.data_card(out, origin, selector_info, "MiniLM WordPiece", tokens)
    write_atomic("data/release/DATA_CARD.md", card)
    write_metrics("filter", {"candidates": len(conversations), "skipped": len(skipped),
                             "skipped_examples": skipped[:5], "kept": len(out), "ratio": p["ratio"],
                             "top_k": p["top_k"], "balance_domains": p["balance_domains"],
                             "rounds_kept": sum(len(r["conversations"]) // 2 for r in out),
                             "kept_by_domain": dict(sorted(Counter(r["domain"] for r in out).items())),
                             "generators": sorted({r["generator"] for r in out}),
                             "min_kept_score": round(min(conv_scores[i] for i in keep), 5),
                             "images": str(RELEASE_IMAGES)}, t0)


if __name__ == "__main__":
    main()
