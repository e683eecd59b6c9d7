"""Stage `filter`: score every candidate conversation and keep the top `ratio` as the release.

A conversation's score is the mean of its rounds' selector scores. The release is LLaVA format:
unique `id`, relative `image`, `domain`, `conversations` alternating human/gpt from human, with
`<image>\\n` exactly once, at the start of the first human turn.
"""
from __future__ import annotations

import math

import numpy as np

from .schema import IMAGE_TOKEN, Conversation


def conversation_scores(conversations: list[Conversation], unit_scores: dict[str, float]) -> dict[str, float]:
    out = {}
    for c in conversations:
        s = [unit_scores[f"{c.id}#{k}"] for k in range(len(c.conversations) // 2)]
        out[c.id] = float(np.mean(s))
    return out


def select_top(scores: dict[str, float], ratio: float) -> list[str]:
    """Ids of the top `ratio` share (at least one), best first; ties broken by id for determinism."""
    assert 0 < ratio <= 1, f"filter.ratio must be in (0, 1], got {ratio}"
    k = max(1, math.ceil(ratio * len(scores)))
    return [i for i, _ in sorted(scores.items(), key=lambda kv: (-kv[1], kv[0]))[:k]]


def to_llava(c: Conversation, score: float) -> dict:
    turns = [dict(t) for t in c.conversations]
    assert turns and turns[0]["from"] == "human", f"conversation {c.id}: must start with a human turn"
    for i, t in enumerate(turns):
        assert t["from"] == ("human" if i % 2 == 0 else "gpt"), f"conversation {c.id}: turns do not alternate"
        assert IMAGE_TOKEN not in t["value"], f"conversation {c.id}: turn {i} already contains {IMAGE_TOKEN}"
    turns[0]["value"] = f"{IMAGE_TOKEN}\n{turns[0]['value']}"
    return {"id": c.id, "image": c.image, "domain": c.domain, "conversations": turns,
            "selector_score": round(score, 6), "generator": f"{c.backend}:{c.model}"}
