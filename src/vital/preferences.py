"""Stage `merge_preferences`: clinician pairs (weight w) + model-rating pairs -> one preference set.

Unit ids name what the selector scores: `<question_id>:A` / `:B` for a pool answer and
`<conversation_id>#<round>` for a generated round.
- clinician pair: for each question, the answer annotators marked acceptable over the one they did
  not (majority over annotators), weight `clinician_weight`; both acceptable or both not is no pair.
  A share `clinician_holdout` of the questions is held out (split "holdout") to measure alignment,
  never trained on.
- model pair: `model_pairs` pairs of rated rounds drawn with `seed`, weight 1; only rounds with
  different, parsed scores form pairs (ties and nulls never do).
"""
from __future__ import annotations

import random

from .schema import PoolItem, PreferencePair, Rating, Vote


def clinician_pairs(votes: list[Vote], pool: dict[str, PoolItem], weight: float, holdout: float, seed: int):
    """One pair per question: the answer more annotators found acceptable over the other.
    Votes with no preference (both or neither acceptable) and questions where annotators cancel out
    are not pairs: ties never are."""
    counts = {"votes": len(votes), "not_in_pool": 0, "no_preference": 0, "annotators_disagree": 0}
    net: dict[str, int] = {}  # +1 per "A over B" vote, -1 per "B over A"
    for v in votes:
        if v.question_id not in pool:
            counts["not_in_pool"] += 1  # the figure was not pooled this time; the vote is kept, just unused
        elif v.a_acceptable == v.b_acceptable:
            counts["no_preference"] += 1
        else:
            net[v.question_id] = net.get(v.question_id, 0) + (1 if v.a_acceptable else -1)
    counts["annotators_disagree"] = sum(n == 0 for n in net.values())
    decided = sorted(q for q, n in net.items() if n)
    held = set(random.Random(seed).sample(decided, int(round(holdout * len(decided)))))
    pairs = [PreferencePair(a_id=f"{q}:A", b_id=f"{q}:B", label=int(net[q] > 0), weight=weight, source="clinician",
                            split="holdout" if q in held else "train") for q in decided]
    return pairs, counts


def model_pairs(ratings: list[Rating], n_pairs: int, seed: int):
    scored = [r for r in ratings if r.score is not None]
    rng = random.Random(seed)
    pairs, seen = [], set()
    distinct = len({r.score for r in scored})
    attempts = 0
    while len(pairs) < n_pairs and distinct > 1 and attempts < 50 * n_pairs:
        attempts += 1
        a, b = rng.sample(scored, 2)
        key = tuple(sorted((a.candidate_id, b.candidate_id)))
        if a.score == b.score or key in seen:
            continue
        seen.add(key)
        pairs.append(PreferencePair(a_id=a.candidate_id, b_id=b.candidate_id, label=int(a.score > b.score),
                                    weight=1.0, source="model"))
    return pairs, {"rated_rounds": len(ratings), "null_scores": len(ratings) - len(scored)}
