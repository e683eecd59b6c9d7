"""Stage `merge_preferences`: clinician pairs (weight w) + model-rating pairs -> one preference set.

Unit ids name what the selector scores: `<question_id>:A` / `:B` for a pool answer and
`<conversation_id>#<round>` for a generated round.
- clinician pair: for each question, the answer annotators marked acceptable over the one they did
  not, or picked (majority over annotators), weight `clinician_weight`; both acceptable, both not, or a
  tie is no pair. A share `clinician_holdout` of the questions is held out (split "holdout") to
  measure alignment, never trained on. A vote on answers that have changed since (its `answers_hash`
  differs from the pool's) is skipped and counted as stale; a vote for a question not in the pool is
  counted; an annotator voting twice on one question is an error naming both lines.
- rater agreement: on the clinician pairs, how often the rater's scores of the two pool answers order
  them as clinicians did (the paper's comparison of a GPT-4 judge with clinicians).
- model pair: `model_pairs` pairs of rated units drawn with `seed`, weight 1; only units with different,
  parsed scores form pairs (ties and nulls never do). A unit is a round, or with the selector's
  `unit: conversation` a conversation scored by the `aggregate` of its rounds. The units of a share
  `model_holdout` of the figures form the held-out pairs (split "holdout"), never a training pair.
"""
from __future__ import annotations

import random

from .schema import AGGREGATES, UNITS, Conversation, PoolItem, PreferencePair, Rating, Vote, request_hash, round_id, rounds


def answers_hash(item: PoolItem) -> str:
    """What a vote judged: the question and both answers. A regenerated pool with other answers differs."""
    return request_hash([item.question, item.answer_a, item.answer_b])[:16]


def vote_label(v: Vote) -> str:
    """A / B / tie: what a vote says about the pair (the explicit pick, or the acceptability marks)."""
    if v.preference:
        return v.preference
    if v.a_acceptable != v.b_acceptable:
        return "A" if v.a_acceptable else "B"
    return "tie"


def check_votes(votes: list[Vote], source: str) -> None:
    """Each vote says something, and each annotator votes once per question; errors name source:line."""
    seen: dict[tuple[str, str], int] = {}
    for n, v in enumerate(votes, 1):
        if v.preference not in (None, "A", "B", "tie"):
            raise ValueError(f"{source}:{n}: preference {v.preference!r}: use A, B, tie or leave it out")
        for field in ("a_acceptable", "b_acceptable"):
            if getattr(v, field) not in (None, True, False):
                raise ValueError(f"{source}:{n}: {field} is {getattr(v, field)!r}: use true, false or leave it out")
        marks = (v.a_acceptable, v.b_acceptable)
        if (v.preference is None) == (None in marks) or (v.preference is not None and marks != (None, None)):
            raise ValueError(f"{source}:{n}: a vote marks both answers (a_acceptable, b_acceptable) or gives a "
                             "preference, not neither and not both")
        key = (v.question_id, v.annotator)
        if key in seen:
            raise ValueError(f"{source}:{n}: annotator {v.annotator!r} voted on {v.question_id!r} already at line "
                             f"{seen[key]}; keep one of the two votes")
        seen[key] = n


def clinician_pairs(votes: list[Vote], pool: dict[str, PoolItem], weight: float, holdout: float, seed: int):
    """One pair per question: the answer more annotators preferred over the other. Votes with no
    preference and questions where annotators cancel out are not pairs: ties never are."""
    counts = {"votes": len(votes), "not_in_pool": 0, "stale": 0, "unverified": 0, "no_preference": 0,
              "annotators_disagree": 0}
    net: dict[str, int] = {}  # +1 per "A over B" vote, -1 per "B over A"
    for v in votes:
        item = pool.get(v.question_id)
        if item is None:
            counts["not_in_pool"] += 1  # the figure was not pooled this time; the vote is kept, just unused
            continue
        if v.answers_hash is None:
            counts["unverified"] += 1  # written by hand, not by the app: used, and counted
        elif v.answers_hash != answers_hash(item):
            counts["stale"] += 1  # judged other answers (an older pool): never merged
            continue
        label = vote_label(v)
        if label == "tie":
            counts["no_preference"] += 1
        else:
            net[v.question_id] = net.get(v.question_id, 0) + (1 if label == "A" else -1)
    counts["annotators_disagree"] = sum(n == 0 for n in net.values())
    decided = sorted(q for q, n in net.items() if n)
    held = set(random.Random(seed).sample(decided, int(round(holdout * len(decided)))))
    pairs = [PreferencePair(a_id=f"{q}:A", b_id=f"{q}:B", label=int(net[q] > 0), weight=weight, source="clinician",
                            split="holdout" if q in held else "train") for q in decided]
    return pairs, counts


def check_ratings(ratings: list[Rating], source: str) -> None:
    """A score is an integer 0..10 or null (the judge's reply did not parse); anything else names source:record."""
    for n, r in enumerate(ratings, 1):
        if r.score is not None and (isinstance(r.score, bool) or not isinstance(r.score, int) or not 0 <= r.score <= 10):
            raise ValueError(f"{source}: record {n} ({r.candidate_id}): score {r.score!r} is not an integer 0..10 or "
                             "null; rerun rate (dvc repro rate) or fix that record")


def unit_scores(ratings: list[Rating], conversations: list[Conversation], unit: str,
                aggregate: str) -> dict[str, float | None]:
    """{unit id: score}: a round's score, or with unit "conversation" the `aggregate` (mean | min) of its rounds'
    scores, null when a round's is null or missing (a failed rate request): never a score of some rounds."""
    if unit not in UNITS or aggregate not in AGGREGATES:
        raise ValueError(f"train_selector.unit {unit!r} / aggregate {aggregate!r}: use unit one of {', '.join(UNITS)} "
                         f"and aggregate one of {', '.join(AGGREGATES)}")
    score = {r.candidate_id: r.score for r in ratings}
    if unit == "round":
        return score
    out = {}
    for c in conversations:
        s = [score.get(round_id(c.id, k)) for k in range(len(rounds(c.conversations)))]
        out[c.id] = None if not s or None in s else AGGREGATES[aggregate](s)
    return out


def model_pairs(scores: dict[str, float | None], n_pairs: int, seed: int, holdout: float = 0.0):
    """`n_pairs` distinct pairs of units with different, parsed scores (ties and nulls never form pairs), drawn
    with `seed`. A share `holdout` of the figures is held out: their units form the held-out pairs and never a
    training pair, so held-out accuracy is measured on units the selector has not seen."""
    scored = sorted((u, s) for u, s in scores.items() if s is not None)
    rng = random.Random(seed)
    figures = sorted({u.split("#")[0] for u, _ in scored})
    held = set(rng.sample(figures, int(round(holdout * len(figures)))))
    n_held = int(round(holdout * n_pairs))
    pairs = []
    for split, n in (("train", n_pairs - n_held), ("holdout", n_held)):
        pool = [x for x in scored if (x[0].split("#")[0] in held) == (split == "holdout")]
        pairs += _draw(pool, n, rng, split)
    counts = {"units": len(scores), "null_units": sum(v is None for v in scores.values()),
              "holdout_figures": len(held)}
    return pairs, counts


def _draw(scored: list[tuple[str, float]], n: int, rng: random.Random, split: str) -> list[PreferencePair]:
    pairs, seen, attempts = [], set(), 0
    distinct = len({s for _, s in scored})
    while len(pairs) < n and distinct > 1 and attempts < 50 * n:
        attempts += 1
        (a, sa), (b, sb) = rng.sample(scored, 2)
        key = tuple(sorted((a, b)))
        if sa == sb or key in seen:
            continue
        seen.add(key)
        pairs.append(PreferencePair(a_id=a, b_id=b, label=int(sa > sb), weight=1.0, source="model", split=split))
    return pairs


def rater_agreement(pairs: list[PreferencePair], pool_ratings: list[Rating]) -> dict:
    """Share of clinician pairs the rater orders the same way (its scores of answer A and B), on the held-out
    pairs and on all; pairs the rater scores equal (ties) or could not score (null) are counted apart."""
    score = {r.candidate_id: r.score for r in pool_ratings}
    out = {}
    for split in ("holdout", "all"):
        chosen = [p for p in pairs if p.source == "clinician" and (split == "all" or p.split == split)]
        agree = ties = unscored = 0
        for p in chosen:
            a, b = score.get(p.a_id), score.get(p.b_id)
            if a is None or b is None:
                unscored += 1
            elif a == b:
                ties += 1
            else:
                agree += int((a > b) == bool(p.label))
        decided = len(chosen) - ties - unscored
        out[split] = {"pairs": len(chosen), "agree": agree, "rater_ties": ties, "unscored": unscored,
                      "agreement": round(agree / decided, 4) if decided else None}
    return out
