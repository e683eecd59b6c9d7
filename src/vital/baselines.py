"""What `filter` compares the selector with, at the release's own size (metrics/selection.json).

- `random`: a random subset of the same size, over `seeds` seeds (mean, standard deviation, and low..high: the
  2.5-97.5% range);
- `rater_threshold`: the conversations with the highest mean round rating of the `rate` judge, i.e. a threshold
  on the rater's score set where it keeps the same number (AlpaGasus-style); equal means are kept in a seeded
  random order, and a conversation with a null or missing round rating ranks last;
- `selector_model_only`: the selector trained on model pairs alone (clinician weight w = 0);
- `selector`: the selector the release was cut with.
Each method's unit scores are checked against the clinician test pairs (the share of pool answer pairs it orders
as clinicians did, ties and unscored pairs apart, with n and a 95% interval), and its kept set against the
release's (`overlap`: the share of the release it also keeps).
"""
from __future__ import annotations

import random

import numpy as np

from .preferences import agreement
from .release import select_top


def _spread(values: list[float]) -> dict:
    v = np.asarray(values, dtype=float)
    return {"mean": round(float(v.mean()), 4), "sd": round(float(v.std(ddof=1)), 4) if len(v) > 1 else 0.0,
            "low": round(float(np.percentile(v, 2.5)), 4), "high": round(float(np.percentile(v, 97.5)), 4)}


def _ranks(scores: dict, seed: int = 0) -> dict[str, float]:
    """Scores as ranks (higher is better), equal scores in a seeded random order and null last: the rater's
    integer means tie often, and select_top would otherwise cut a tie by id."""
    rng = random.Random(seed)
    order = sorted(scores, key=lambda c: (scores[c] is not None, scores[c] or 0, rng.random()))
    return {c: float(i) for i, c in enumerate(order)}


def compare(kept: list[str], methods: dict[str, tuple[dict, dict]], test_pairs: list, select: dict,
            seeds: int = 20) -> dict:
    """`methods`: {name: ({conversation id: score or None}, {pool unit id: score or None})}; `select`: the
    release's select_top arguments (ratio, top_k, domains); `kept`: the release's ids. The random baseline is
    added here, over `seeds` seeds."""
    release = set(kept)
    out = {}
    for name, (conversation_scores, unit_scores) in methods.items():
        chosen = select_top(_ranks(conversation_scores), **select)
        out[name] = {"kept": len(chosen), "overlap": round(len(release & set(chosen)) / len(release), 4),
                     "unscored_conversations": sum(s is None for s in conversation_scores.values()),
                     "clinician_test": agreement(unit_scores, test_pairs)}
    ids = sorted(next(iter(methods.values()))[0]) if methods else sorted(release)
    units = sorted({u for p in test_pairs for u in (p.a_id, p.b_id)})
    overlaps, rates = [], []
    for seed in range(seeds):
        rng = random.Random(seed)
        chosen = select_top({c: rng.random() for c in ids}, **select)
        overlaps.append(len(release & set(chosen)) / len(release))
        rate = agreement({u: rng.random() for u in units}, test_pairs)["rate"]
        if rate is not None:
            rates.append(rate)
    out["random"] = {"kept": len(kept), "seeds": seeds, "overlap": _spread(overlaps),
                     "clinician_test": {"pairs": len(test_pairs), **(_spread(rates) if rates else {"mean": None})}}
    return out


def csv_rows(comparison: dict) -> list[dict]:
    """One row per method for `dvc plots`: clinician test agreement with a tie counted half (so that a rater whose
    integer scores tie often and a selector that never ties compare on the same pairs; random: its mean), the
    share over decided pairs with its interval, the ties, and the overlap with the release."""
    rows = []
    for name, m in comparison.items():
        test, overlap = m["clinician_test"], m["overlap"]
        if name == "random":
            rows.append({"method": name, "clinician_test_agreement": test["mean"], "decided_agreement": test["mean"],
                         "low": test.get("low"), "high": test.get("high"), "ties": 0, "pairs": test["pairs"],
                         "overlap_with_release": overlap["mean"]})
        else:
            rows.append({"method": name, "clinician_test_agreement": test["ties_half"],
                         "decided_agreement": test["rate"], "low": test["low"], "high": test["high"],
                         "ties": test["ties"], "pairs": test["pairs"], "overlap_with_release": overlap})
    return rows
