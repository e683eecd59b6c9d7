"""Stage `merge_preferences`: clinician pairs (weight w) + model-rating pairs -> one preference set.

Unit ids name what the selector scores: `<question_id>:A` / `:B` for a pool answer and
`<conversation_id>#<round>` for a generated round.
- clinician pair: for each question, the answer annotators marked acceptable over the one they did
  not, or picked (majority over annotators), weight `clinician_weight`; both acceptable, both not, or a
  tie is no pair. A vote on answers that have changed since (its `answers_hash`
  differs from the pool's) is skipped and counted as stale; a vote for a question not in the pool is
  counted; an annotator voting twice on one question is an error naming both lines.
- rater agreement: on the clinician pairs, how often the rater's scores of the two pool answers order
  them as clinicians did (the paper's comparison of a GPT-4 judge with clinicians).
- model pair: `model_pairs` pairs of rated units drawn with `seed`, weight 1; only units with different,
  parsed scores form pairs (ties and nulls never do). A unit is a round, or with the selector's
  `unit: conversation` a conversation scored by the `aggregate` of its rounds.
- splits, by figure: every figure is in one of train / validation / test, and so is every pair about it,
  clinician or model (a pair never spans two splits). The clinician-judged figures are split first, a share
  `clinician_validation` to validation (what picks the selector's epoch) and `clinician_test` to test (reported,
  never used for a choice); the other figures then by `model_validation` / `model_test`. Splitting by question
  instead would put a figure's other questions, with its image and caption, in training.
"""
from __future__ import annotations

import hashlib
import random

from .schema import (AGGREGATES, SPLITS, UNITS, Conversation, PoolItem, PreferencePair, Rating, Vote, figure_of,
                     request_hash, round_id, rounds)
from .stats import rate, ties_half


def split_figures(figures, validation: float, test: float, seed: int, fixed: dict[str, str] | None = None) -> dict:
    """{figure: split}: each figure not in `fixed` by a hash of (seed, figure id) read as a number in [0, 1):
    below `test` test, below `test + validation` validation, else train; figures in `fixed` keep their split.
    A figure's split never depends on which other figures there are, so adding votes, figures or ratings never
    moves a test figure into training (the shares hold on average, not exactly)."""
    out = dict(fixed or {})
    for f in set(figures) - set(out):
        u = int.from_bytes(hashlib.sha256(f"{seed}\x1f{f}".encode()).digest()[:8], "big") / 2 ** 64
        out[f] = "test" if u < test else "validation" if u < test + validation else "train"
    return out


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


def clinician_pairs(votes: list[Vote], pool: dict[str, PoolItem], weight: float, validation: float, test: float,
                    seed: int):
    """One pair per question: the answer more annotators preferred over the other. Votes with no preference and
    questions where annotators cancel out are not pairs: ties never are. Returns (pairs, counts, {figure: split})
    with the questions' figures split into train / validation / test."""
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
    splits = split_figures({pool[q].figure_id for q in decided}, validation, test, seed)
    pairs = [PreferencePair(a_id=f"{q}:A", b_id=f"{q}:B", label=int(net[q] > 0), weight=weight, source="clinician",
                            split=splits[pool[q].figure_id]) for q in decided]
    return pairs, counts, splits


def check_ratings(ratings: list[Rating], source: str) -> None:
    """A score is an integer 0..10 or null (the judge's reply did not parse); anything else names source:record."""
    for n, r in enumerate(ratings, 1):
        if r.score is not None and (isinstance(r.score, bool) or not isinstance(r.score, int) or not 0 <= r.score <= 10):
            raise ValueError(f"{source}: record {n} ({r.candidate_id}): score {r.score!r} is not an integer 0..10 or "
                             "null; rerun rate (dvc repro rate) or fix that record")


def unit_scores(ratings: list[Rating] | dict[str, int | None], conversations: list[Conversation], unit: str,
                aggregate: str) -> dict[str, float | None]:
    """{unit id: score}: a round's score, or with unit "conversation" the `aggregate` (first | mean | min) of its
    rounds' scores, null when a round's is null or missing (a failed rate request): never a score of some rounds.
    (The selector refuses unit conversation with aggregate first; the rater baseline uses mean.)"""
    if unit not in UNITS or aggregate not in AGGREGATES:
        raise ValueError(f"train_selector.unit {unit!r} / aggregate {aggregate!r}: use unit one of {', '.join(UNITS)} "
                         f"and aggregate one of {', '.join(AGGREGATES)}")
    score = ratings if isinstance(ratings, dict) else {r.candidate_id: r.score for r in ratings}  # by candidate id
    if unit == "round":
        return dict(score)
    out = {}
    for c in conversations:
        s = [score.get(round_id(c.id, k)) for k in range(len(rounds(c.conversations)))]
        out[c.id] = None if not s or None in s else AGGREGATES[aggregate](s)
    return out


def model_pairs(scores: dict[str, float | None], n_pairs: int, seed: int, validation: float = 0.0, test: float = 0.0,
                fixed: dict[str, str] | None = None):
    """`n_pairs` distinct pairs of units with different, parsed scores (ties and nulls never form pairs), drawn
    with `seed`, split by figure: the figures in `fixed` (the clinician-judged ones) keep their split, the others
    are split by the `validation` and `test` shares, and each split's pairs are drawn among its own units (its
    share of `n_pairs`), so validation and test pairs are about figures the selector never trained on."""
    scored = sorted((u, s) for u, s in scores.items() if s is not None)
    rng = random.Random(seed)
    splits = split_figures({figure_of(u) for u, _ in scored}, validation, test, seed, fixed)
    n = {"validation": round(validation * n_pairs), "test": round(test * n_pairs)}
    n["train"] = n_pairs - n["validation"] - n["test"]
    pairs = []
    for split in SPLITS:
        pairs += _draw([x for x in scored if splits[figure_of(x[0])] == split], n[split], rng, split)
    counts = {"units": len(scores), "null_units": sum(v is None for v in scores.values()),
              "figures": {k: sum(v == k for v in splits.values()) for k in SPLITS}}
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


def agreement(score: dict[str, float | None], pairs) -> dict:
    """How often `score` orders pairs (objects with a_id, b_id, label) as they are labelled: {pairs, ties,
    unscored, n, k, rate, low, high}; equal scores (ties) and a missing or null score (unscored) are counted apart,
    never as a miss."""
    ties = unscored = right = 0
    pairs = list(pairs)
    for p in pairs:
        a, b = score.get(p.a_id), score.get(p.b_id)
        if a is None or b is None:
            unscored += 1
        elif a == b:
            ties += 1
        else:
            right += int((a > b) == bool(p.label))
    n = len(pairs) - ties - unscored
    return {"pairs": len(pairs), "ties": ties, "unscored": unscored, **rate(right, n), "ties_half": ties_half(right, ties, n)}


def rater_agreement(pairs: list[PreferencePair], pool_ratings: list[Rating]) -> dict:
    """Share of clinician pairs the rater orders the same way (its scores of answer A and B), per split and over
    all, with n and a 95% interval; pairs the rater scores equal (ties) or could not score (null) are counted
    apart."""
    score = {r.candidate_id: r.score for r in pool_ratings}
    return {split: agreement(score, [p for p in pairs if p.source == "clinician" and split in ("all", p.split)])
            for split in ("validation", "test", "all")}
