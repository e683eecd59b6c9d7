"""Which model replies are rejected, and removing them from a request cache. One rule for every stage.

A reply is rejected when its stage cannot read anything from it (`unparseable`: no `User:`/`Assistant:`
rounds for generate, no 0-10 score on the first line for rate, no question with two answers for the
pool) or when the model refused (`refused`: a refusal phrase where the answer should be; for generate,
also a conversation whose every round refuses). The client asks a rejected reply again once, under a
new cache key (the request plus `reask: 1`, so that answer is cached too); what is still rejected then
is recorded by the stage (generate_rejected.jsonl, a null rating, the pool's unparsed figures).

    vital cache evict --rejected --stage generate    # then `dvc repro` asks those requests again
"""
from __future__ import annotations

import json
from pathlib import Path

from .schema import write_atomic

REASONS = ("unparseable", "refused")
CACHES = {"annotation_pool": "data/cache/annotation_pool.jsonl", "generate": "data/cache/generate.jsonl",
          "rate": "data/cache/rate.jsonl"}


def rejected_reply(task: str, text: str, refusal_phrases=None) -> str | None:
    """'unparseable', 'refused' or None (the stage can use the reply) for a reply to a `task` request
    ("generate", "rate", "pool"). `refusal_phrases`: generate.refusal_phrases (default: their defaults)."""
    from .generate import REFUSAL_PHRASES, first_phrase, parse_reply

    phrases = REFUSAL_PHRASES if refusal_phrases is None else refusal_phrases
    if task == "generate":
        turns = parse_reply(text)
        if turns:
            every_round_refuses = all(first_phrase(turns[i]["value"] + " " + turns[i + 1]["value"], phrases)
                                      for i in range(0, len(turns), 2))
            return "refused" if every_round_refuses else None
    elif task == "rate":
        from .rate import parse_score
        if parse_score(text) is not None:
            return None
    elif task == "pool":
        from .pool import parse_pool_reply
        if parse_pool_reply(text):
            return None
    else:
        return None  # a task whose replies this rule does not judge (the evaluation judge)
    return "refused" if first_phrase(text, phrases) else "unparseable"


def entry_rejected(entry: dict, refusal_phrases=None) -> str | None:
    """rejected_reply for a request cache entry (its `task` and `reply`)."""
    return rejected_reply(entry.get("task", ""), entry.get("reply") or "", refusal_phrases)


def rejected_note(stage: str, by_reason: dict, where: str) -> str | None:
    """The line a stage prints after its summary when replies stayed rejected: how many, why, where, what next."""
    counts = {r: by_reason.get(r, 0) for r in REASONS if by_reason.get(r, 0)}
    if not counts:
        return None
    why, n = ", ".join(f"{n} {r}" for r, n in counts.items()), sum(counts.values())
    return (f"[{stage}] {n} {'reply' if n == 1 else 'replies'} rejected, also when asked again ({why}): {where}. "
            f"`vital cache evict --rejected --stage {stage}` and `dvc repro {stage}` ask them again")


def evict_rejected(path: str | Path, refusal_phrases=None) -> dict:
    """Remove from a request cache (an AppendLog) the replies that were rejected in the end, so that the next
    run asks them again: a rejected reply, unless it was asked again and that answer is usable (the answer is
    kept, and the first reply with it, which leads to it). Written to a new file that replaces the old one
    (os.replace), so a reader sees the old cache or the new one. Run it while no stage writes that cache.
    Returns {"path", "entries", "removed", "by_reason"}."""
    path = Path(path)
    out = {"path": str(path), "entries": 0, "removed": 0, "by_reason": {r: 0 for r in REASONS}}
    if not path.is_file():
        return out
    lines, entries = [], []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.endswith("\n"):
                break  # torn write of a killed run: AppendLog ignores it too
            if not line.strip():
                continue
            try:
                entries.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{n}: corrupt record ({e.msg}). Delete that line: the requests it held "
                                 "are sent again on the next run") from None
            lines.append(line)
    problems = [entry_rejected(e, refusal_phrases) for e in entries]
    answered = {e["reask_of"] for e, p in zip(entries, problems) if e.get("reask_of") and p is None}
    keep = []
    for line, e, p in zip(lines, entries, problems):
        if p is None or e.get("request_hash") in answered:
            keep.append(line)
        else:
            out["by_reason"][p] += 1
    out.update(entries=len(entries), removed=len(entries) - len(keep))
    if out["removed"]:
        write_atomic(path, "".join(keep))
    return out
