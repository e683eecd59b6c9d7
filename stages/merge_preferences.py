"""DVC stage `merge_preferences`: clinician pairs (weight w) + model-rating pairs -> pairs.parquet.

    dvc repro merge_preferences
    dvc exp run -S merge_preferences.clinician_weight=100

Model pairs are built at the unit the selector scores: it reads `train_selector.unit` and `.aggregate` too.
"""
import time
from dataclasses import asdict
from pathlib import Path

from common import load, params, write_metrics
import pandas as pd  # after common: a bad params.yaml stops before the heavy imports

from vital.preferences import (SPLITS, check_ratings, check_votes, clinician_pairs, model_pairs,
                               rater_agreement, unit_scores)
from vital.schema import Conversation, PoolItem, PreferencePair, Rating, Vote


def main():
    t0, p, sel = time.time(), params("merge_preferences"), params("train_selector")
    pool = {x.question_id: x for x in load("data/annotation/pool.jsonl", PoolItem)}
    votes = load(p["clinician"], Vote)
    try:
        check_votes(votes, p["clinician"])
    except ValueError as e:
        raise SystemExit(f"merge_preferences: {e}") from None
    ratings = load("data/candidates/ratings.jsonl", Rating)
    try:
        check_ratings(ratings, "data/candidates/ratings.jsonl")
        scores = unit_scores(ratings, load("data/candidates/conversations.jsonl", Conversation), sel["unit"],
                             sel["aggregate"])
    except ValueError as e:
        raise SystemExit(f"merge_preferences: {e}") from None
    cpairs, ccounts, figure_splits = clinician_pairs(votes, pool, p["clinician_weight"], p["clinician_validation"],
                                                     p["clinician_test"], p["seed"])
    mpairs, mcounts = model_pairs(scores, p["model_pairs"], p["seed"], p["model_validation"], p["model_test"],
                                  figure_splits)
    mcounts = {"rated_rounds": len(ratings), "null_scores": sum(r.score is None for r in ratings), **mcounts}
    pairs = cpairs + mpairs
    Path("data/preferences").mkdir(parents=True, exist_ok=True)
    df = pd.DataFrame([asdict(x) for x in pairs], columns=list(PreferencePair.__dataclass_fields__))
    df.to_parquet("data/preferences/pairs.parquet", index=False)
    by = df.groupby(["source", "split"]).size()
    write_metrics("merge_preferences", {
        "pairs": len(df), "clinician_pairs": len(cpairs), "model_pairs": len(mpairs), "unit": sel["unit"],
        **{f"{src}_{split}": int(by.get((src, split), 0)) for src in ("clinician", "model") for split in SPLITS},
        "clinician_figures": {k: sum(v == k for v in figure_splits.values()) for k in SPLITS},
        "clinician_weight": p["clinician_weight"], "clinician_votes": ccounts, "ratings": mcounts,
        "rater_clinician_agreement": rater_agreement(cpairs, load("data/candidates/pool_ratings.jsonl", Rating))}, t0)


if __name__ == "__main__":
    main()
