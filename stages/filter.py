"""DVC stage `filter`: score every candidate conversation and keep the top `filter.ratio` as the release.

Candidates that cannot make a valid record (missing image, no rounds, broken turns) are skipped and listed in
data/candidates/filter_skipped.jsonl. The candidates are never all in memory: they stream from the file through
the selector (its own backbone, unit and aggregate: models/selector/config.json), 4,096 at a time, and the kept
ones are read back by their byte offsets to write the release.

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

from common import EMBEDDINGS, PARAMS, Indexed, image_store, load, params, stream, write_metrics
import pandas as pd  # after common: a bad params.yaml stops before the heavy imports

from vital import baselines, release, selector
from vital.decontaminate import card_section
from vital.encoders import EmbeddingCache, count_tokens
from vital.llm.ray_engine import Engine
from vital.preferences import unit_scores
from vital.provenance import UNKNOWN, allowed, normalise_license, revision
from vital.schema import (CSV_FLOAT, Conversation, CorpusRecord, PoolItem, PreferencePair, Rating, Replay,
                          meaningful, write_json, write_jsonl)


RELEASE = Path("data/release")  # the Hub layout, images inside its parquet shards: the release stands alone
SELECTOR = Path("models/selector")
CANDIDATES = Path("data/candidates/conversations.jsonl")
ENGINE = Engine(**params("engine"))  # where the selector's features are encoded


class Candidates:
    """The usable candidates of CANDIDATES, streamed from the file (never all in memory): each pass screens the
    rows again (release.screen) and drops the licences `allow` does not take; the first pass also records what
    it skipped and dropped, each candidate's line offset (to read a kept one back), domain and rater score."""

    def __init__(self, images, allow, records, ratings):
        self.images, self.allow, self.records, self.ratings = images, allow, records, ratings
        self.read, self.skipped, self.dropped, self.offset, self.domain, self.rater = 0, [], Counter(), {}, {}, {}
        self.made_by, self.passes = set(), 0

    def __iter__(self):
        first, self.passes = self.passes == 0, self.passes + 1
        with open(CANDIDATES, "rb") as f:
            for offset, c in lines(f):
                ok, skipped = release.screen([c], self.images)
                license = self.records[c.id].license if c.id in self.records else UNKNOWN
                if first:
                    self.read += 1
                    self.skipped += skipped
                    if ok and not allowed(license, self.allow):
                        self.dropped[license] += 1
                if not ok or not allowed(license, self.allow):
                    continue
                if first:
                    self.offset[c.id], self.domain[c.id] = offset, c.domain
                    self.rater.update(unit_scores(self.ratings, [c], "conversation", "mean"))
                    self.made_by.add(f"{c.backend}:{c.model}")
                yield c

    def get(self, ids):
        """The candidates of `ids`, in that order, read back by their offsets."""
        with open(CANDIDATES, "rb") as f:
            for i in ids:
                f.seek(self.offset[i])
                yield Conversation(**json.loads(f.readline()))


def lines(f):
    """(byte offset, Conversation) of each record of a JSONL file open in binary; a bad row names file:line."""
    offset = 0
    for n, line in enumerate(f, 1):
        if line.strip():
            try:
                c = Conversation(**json.loads(line))
            except (ValueError, TypeError) as e:
                raise SystemExit(f"{CANDIDATES}:{n}: {e}; rerun the stage that writes it (dvc repro -f "
                                 "decontaminate_qa)") from None
            yield offset, c
        offset += len(line)


def main():
    t0, p = time.time(), params("filter")
    records = Indexed("data/corpus/records.jsonl", CorpusRecord)  # ids and offsets held, records read
    corpus_images = image_store()
    allow = [normalise_license(x) for x in p["licenses"]] if p["licenses"] is not None else None
    ratings = {r.candidate_id: r.score for r in stream("data/candidates/ratings.jsonl", Rating)}
    candidates = Candidates(corpus_images, allow, records, ratings)
    try:
        conv_scores, selector_info = selector.score_conversations(candidates, records, corpus_images, EMBEDDINGS,
                                                                  SELECTOR, engine=ENGINE)
    except ValueError as e:
        raise SystemExit(f"filter: {e}") from None
    write_jsonl("data/candidates/filter_skipped.jsonl", candidates.skipped)
    dropped_by_license = dict(sorted(candidates.dropped.items()))
    if not conv_scores and not dropped_by_license:
        raise SystemExit(f"filter: none of the {candidates.read} candidates is usable; see "
                         "data/candidates/filter_skipped.jsonl")
    if not conv_scores:
        raise SystemExit(f"filter: filter.licenses {allow} drops every candidate (their licences: "
                         f"{dropped_by_license}); widen it or set it to null")
    domains = candidates.domain if p["balance_domains"] else None
    keep = release.select_top(conv_scores, p["ratio"], p["top_k"], domains)
    try:
        selection = compare_with_baselines(candidates, conv_scores, keep, records, corpus_images,
                                           dict(ratio=p["ratio"], top_k=p["top_k"], domains=domains))
    except ValueError as e:
        raise SystemExit(f"filter (comparison with baselines): {e}") from None
    made_by = revision(PARAMS)  # the same within one checkout: HEAD and params.yaml, no clock
    out = Replay(lambda: (release.to_llava(c, conv_scores[c.id], records.get(c.id), ratings, made_by)
                          for c in candidates.get(keep)), len(keep))  # read back from the file on each pass
    report = release.validate(out, corpus_images)
    if report["problems"]:  # never release what a trainer would choke on
        raise SystemExit("filter: the release has problems: " + "; ".join(f"{i}: {w}" for i, w in report["problems"][:5]))
    tokens = count_tokens(" ".join(t["value"] for t in r["conversations"]) for r in out)
    origin = (f"{len(keep)} instruction conversations kept of {candidates.read} candidates "
              f"(`filter` params: {json.dumps(p, sort_keys=True)}).")
    card = release.data_card(out, origin, selector_info, "MiniLM WordPiece", tokens, selection=selection,
                             root=str(RELEASE), licenses={"allow": allow, "dropped": dropped_by_license},
                             audit=card_section(*(json.loads(Path(f"metrics/{s}.json").read_text())
                                                  for s in ("decontaminate", "decontaminate_qa"))))
    shards = release.write_release(RELEASE, out, corpus_images, card, p["shard_mb"])
    kept, generators = Counter(), set()
    for r in out:
        kept.update({"rounds": len(r["conversations"]) // 2, f"domain:{r['domain']}": 1, f"license:{r['license']}": 1})
        generators.add(r["generator"])
    write_metrics("filter", {"candidates": candidates.read, "skipped": len(candidates.skipped),
                             "skipped_examples": candidates.skipped[:5], "kept": len(keep), "ratio": p["ratio"],
                             "top_k": p["top_k"], "balance_domains": p["balance_domains"],
                             "rounds_kept": kept["rounds"],
                             "kept_by_domain": by_prefix(kept, "domain:"),
                             "licenses": allow, "dropped_by_license": dropped_by_license,
                             "kept_by_license": by_prefix(kept, "license:"),
                             "generators": sorted(generators),
                             "min_kept_score": round(min(conv_scores[i] for i in keep), 5),
                             "shards": shards, "features": dict(EmbeddingCache.counts)}, t0)


def by_prefix(counts: Counter, prefix: str) -> dict:
    return {k[len(prefix):]: n for k, n in sorted(counts.items()) if k.startswith(prefix)}


def compare_with_baselines(candidates, conv_scores, keep, records, corpus_images, select):
    """metrics/selection.json + .csv: the selector against random, the rater threshold and w = 0, at this size."""
    pairs = pd.read_parquet("data/preferences/pairs.parquet")
    test = [PreferencePair(**r) for r in pairs[(pairs["source"] == "clinician") & (pairs["split"] == "test")]
            .to_dict("records")]
    asked = {u.rsplit(":", 1)[0] for p in test for u in (p.a_id, p.b_id)}
    pool = [x for x in load("data/annotation/pool.jsonl", PoolItem) if x.question_id in asked
            and x.image in corpus_images]  # a lost image: its pairs count as unscored, as train_selector skips them
    rater_units = {r.candidate_id: r.score for r in load("data/candidates/pool_ratings.jsonl", Rating)}
    methods = {"selector": (conv_scores, selector.score_pool_answers(pool, corpus_images, EMBEDDINGS, SELECTOR,
                                                                          engine=ENGINE)),
               "rater_threshold": (candidates.rater, rater_units)}
    if (SELECTOR / "model_only").exists():
        model_only = selector.score_conversations(candidates, records, corpus_images, EMBEDDINGS,
                                                  SELECTOR / "model_only", engine=ENGINE)[0]
        methods["selector_model_only"] = (model_only, selector.score_pool_answers(pool, corpus_images, EMBEDDINGS,
                                                                                  SELECTOR / "model_only", engine=ENGINE))
    comparison = baselines.compare(keep, methods, test, select)
    made_by = sorted(candidates.made_by | {f"{r.backend}:{r.judge}" for r in stream("data/candidates/ratings.jsonl",
                                                                                       Rating)})
    offline = any(m.startswith("offline:") for m in made_by)
    selection = {"candidates": len(conv_scores), "kept": len(keep), "clinician_test_pairs": len(test),
                 "made_by": made_by, "note": "Offline backends: these figures check the pipeline, not data quality."
                 if offline else "", "methods": comparison}
    selection = meaningful(selection)
    write_json("metrics/selection.json", selection)
    pd.DataFrame(baselines.csv_rows(comparison)).to_csv("metrics/selection.csv", index=False, float_format=CSV_FLOAT)
    return selection


if __name__ == "__main__":
    main()
