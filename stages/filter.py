"""DVC stage `filter`: score every candidate conversation and keep the top `filter.ratio` as the release.

Candidates that cannot make a valid record (missing image, no rounds, broken turns) are skipped and listed in
data/candidates/filter_skipped.jsonl. Scoring streams through the candidates with the selector's own backbone,
unit and aggregate (models/selector/config.json).

    dvc repro filter
    dvc exp run -S filter.ratio=0.5
    dvc exp run -S filter.top_k=60000 -S filter.balance_domains=true
    dvc exp run -S 'filter.licenses=[CC BY, CC0]'   # a release for commercial use: other licences dropped first

Every released record carries its provenance (release.PROVENANCE: figure, pmid, pmcid, licence, generator,
demonstrations, rating, selector score, and the pipeline revision: HEAD's sha, "-dirty" when src/, stages/ or
dvc.yaml differ from it, and the sha256 of all of params.yaml); data/release/manifest.jsonl lists every image.

It then compares the selector with baselines at the release's size (vital/baselines.py): a random subset, the
rater's score threshold, and the selector trained on model pairs only (w = 0), each checked against the clinician
test pairs and the release itself, in metrics/selection.json and metrics/selection.csv (`dvc plots show`).
"""
import json
import time
from collections import Counter
from pathlib import Path

from common import EMBEDDINGS, PARAMS, image_store, load, params, write_metrics
import pandas as pd  # after common: a bad params.yaml stops before the heavy imports

from vital import baselines, release, selector
from vital.decontaminate import card_section
from vital.encoders import EmbeddingCache, count_tokens
from vital.llm.ray_engine import Engine
from vital.preferences import unit_scores
from vital.provenance import UNKNOWN, allowed, normalise_license, revision
from vital.schema import (CSV_FLOAT, Conversation, CorpusRecord, PoolItem, PreferencePair, Rating, meaningful,
                          write_json, write_jsonl)


RELEASE = Path("data/release")  # the Hub layout, images inside its parquet shards: the release stands alone
SELECTOR = Path("models/selector")
ENGINE = Engine(**params("engine"))  # where the selector's features are encoded


def main():
    t0, p = time.time(), params("filter")
    records = {r.id: r for r in load("data/corpus/records.jsonl", CorpusRecord)}
    conversations, corpus_images = load("data/candidates/conversations.jsonl", Conversation), image_store()
    candidates, skipped = release.screen(conversations, corpus_images)
    write_jsonl("data/candidates/filter_skipped.jsonl", skipped)
    if not candidates:
        raise SystemExit(f"filter: none of the {len(conversations)} candidates is usable; see "
                         "data/candidates/filter_skipped.jsonl")
    allow = [normalise_license(x) for x in p["licenses"]] if p["licenses"] is not None else None
    license_of = {c.id: records[c.id].license if c.id in records else UNKNOWN for c in candidates}
    dropped_by_license = dict(sorted(Counter(license_of[c.id] for c in candidates
                                             if not allowed(license_of[c.id], allow)).items()))
    candidates = [c for c in candidates if allowed(license_of[c.id], allow)]  # before selection: never scored
    if not candidates:
        raise SystemExit(f"filter: filter.licenses {allow} drops every candidate (their licences: "
                         f"{dict(sorted(Counter(license_of.values()).items()))}); widen it or set it to null")
    try:
        conv_scores, selector_info = selector.score_conversations(candidates, records, corpus_images, EMBEDDINGS,
                                                                  SELECTOR, engine=ENGINE)
    except ValueError as e:
        raise SystemExit(f"filter: {e}") from None
    domains = {c.id: c.domain for c in candidates} if p["balance_domains"] else None
    keep = release.select_top(conv_scores, p["ratio"], p["top_k"], domains)
    try:
        selection = compare_with_baselines(candidates, conv_scores, keep, records, corpus_images,
                                           dict(ratio=p["ratio"], top_k=p["top_k"], domains=domains))
    except ValueError as e:
        raise SystemExit(f"filter (comparison with baselines): {e}") from None
    by_id = {c.id: c for c in conversations}
    scores = {r.candidate_id: r.score for r in load("data/candidates/ratings.jsonl", Rating)}
    made_by = revision(PARAMS)  # the same within one checkout: HEAD and params.yaml, no clock
    out = [release.to_llava(by_id[i], conv_scores[i], records.get(i), scores, made_by) for i in keep]
    report = release.validate(out, corpus_images)
    if report["problems"]:  # never release what a trainer would choke on
        raise SystemExit("filter: the release has problems: " + "; ".join(f"{i}: {w}" for i, w in report["problems"][:5]))
    tokens = count_tokens([" ".join(t["value"] for t in r["conversations"]) for r in out])
    origin = (f"{len(out)} instruction conversations kept of {len(conversations)} candidates "
              f"(`filter` params: {json.dumps(p, sort_keys=True)}).")
    card = release.data_card(out, origin, selector_info, "MiniLM WordPiece", tokens, selection=selection,
                             root=str(RELEASE), licenses={"allow": allow, "dropped": dropped_by_license},
                             audit=card_section(*(json.loads(Path(f"metrics/{s}.json").read_text())
                                                  for s in ("decontaminate", "decontaminate_qa"))))
    shards = release.write_release(RELEASE, out, corpus_images, card, p["shard_mb"])
    write_metrics("filter", {"candidates": len(conversations), "skipped": len(skipped),
                             "skipped_examples": skipped[:5], "kept": len(out), "ratio": p["ratio"],
                             "top_k": p["top_k"], "balance_domains": p["balance_domains"],
                             "rounds_kept": sum(len(r["conversations"]) // 2 for r in out),
                             "kept_by_domain": dict(sorted(Counter(r["domain"] for r in out).items())),
                             "licenses": allow, "dropped_by_license": dropped_by_license,
                             "kept_by_license": dict(sorted(Counter(r["license"] for r in out).items())),
                             "generators": sorted({r["generator"] for r in out}),
                             "min_kept_score": round(min(conv_scores[i] for i in keep), 5),
                             "shards": shards, "features": dict(EmbeddingCache.counts)}, t0)


def compare_with_baselines(candidates, conv_scores, keep, records, corpus_images, select):
    """metrics/selection.json + .csv: the selector against random, the rater threshold and w = 0, at this size."""
    pairs = pd.read_parquet("data/preferences/pairs.parquet")
    test = [PreferencePair(**r) for r in pairs[(pairs["source"] == "clinician") & (pairs["split"] == "test")]
            .to_dict("records")]
    asked = {u.rsplit(":", 1)[0] for p in test for u in (p.a_id, p.b_id)}
    pool = [x for x in load("data/annotation/pool.jsonl", PoolItem) if x.question_id in asked
            and x.image in corpus_images]  # a lost image: its pairs count as unscored, as train_selector skips them
    rater_units = {r.candidate_id: r.score for r in load("data/candidates/pool_ratings.jsonl", Rating)}
    ratings = load("data/candidates/ratings.jsonl", Rating)
    rater = unit_scores(ratings, candidates, "conversation", "mean")
    methods = {"selector": (conv_scores, selector.score_pool_answers(pool, corpus_images, EMBEDDINGS, SELECTOR,
                                                                          engine=ENGINE)),
               "rater_threshold": (rater, rater_units)}
    if (SELECTOR / "model_only").exists():
        model_only = selector.score_conversations(candidates, records, corpus_images, EMBEDDINGS,
                                                  SELECTOR / "model_only", engine=ENGINE)[0]
        methods["selector_model_only"] = (model_only, selector.score_pool_answers(pool, corpus_images, EMBEDDINGS,
                                                                                  SELECTOR / "model_only", engine=ENGINE))
    comparison = baselines.compare(keep, methods, test, select)
    made_by = sorted({f"{c.backend}:{c.model}" for c in candidates} | {f"{r.backend}:{r.judge}" for r in ratings})
    offline = any(m.startswith("offline:") for m in made_by)
    selection = {"candidates": len(candidates), "kept": len(keep), "clinician_test_pairs": len(test),
                 "made_by": made_by, "note": "Offline backends: these figures check the pipeline, not data quality."
                 if offline else "", "methods": comparison}
    selection = meaningful(selection)
    write_json("metrics/selection.json", selection)
    pd.DataFrame(baselines.csv_rows(comparison)).to_csv("metrics/selection.csv", index=False, float_format=CSV_FLOAT)
    return selection


if __name__ == "__main__":
    main()
