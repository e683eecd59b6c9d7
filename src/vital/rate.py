"""Stage `rate`: the model scores every candidate Q&A round 0-10 (the paper's self-evaluation).

The prompt carries the paper's rubric and asks for the score alone on the first line. Parsing is
strict: a first line that is not an integer 0..10 gives `score: None` with the raw reply kept,
never a default number. Such a reply (unparseable, or a refusal: replies.rejected_reply) is asked again
once first; `unparsed_by_reason` counts what stays null.
"""
from __future__ import annotations

import re
from collections.abc import Iterable
from pathlib import Path

from .llm.backends import image_part
from .images import ImageStore
from .llm.client import Requests
from .generate import figure_text
from .replies import REASONS, entry_rejected
from .schema import AppendLog, Conversation, CorpusRecord, PoolItem, Rating, round_id, rounds

RUBRIC = (
    "You are a clinician evaluating a question-answer pair about a biomedical figure, to decide whether "
    "it is worth using to fine-tune a medical vision-language assistant. Judge: scope and relevance of "
    "the question to the image; value of the pair for fine-tuning; whether the answer addresses the "
    "question; accuracy against the image and its description; clinical utility; use of the image "
    "content; clarity; depth; medical precision. Reply with a single integer score from 0 (useless or "
    "wrong) to 10 (excellent) on the first line, then one short line of justification."
)
_SCORE = re.compile(r"^\s*\**\s*(?:score\s*[:=]\s*)?(\d{1,2})(?:\s*/\s*10)?\s*\**\s*[.]?\s*$", re.I)


def parse_score(reply: str) -> int | None:
    lines = reply.strip().splitlines()
    m = _SCORE.match(lines[0]) if lines else None
    if not m or not 0 <= int(m.group(1)) <= 10:
        return None
    return int(m.group(1))


def rating_messages(caption: str, mentions: list[str], question: str, answer: str, image: bytes,
                    max_image_side: int = 0) -> list[dict]:
    text = f"{figure_text(caption, mentions)}\nQuestion: {question}\nAnswer: {answer}"
    return [{"role": "system", "content": RUBRIC},
            {"role": "user", "content": [{"type": "text", "text": text}, image_part(image, max_image_side)]}]


def rate(conversations: Iterable[Conversation], records: dict[str, CorpusRecord], images: ImageStore | Path, client,
         log: AppendLog, sampling: dict, max_image_side: int = 0, batch_state: AppendLog | None = None,
         pool: list[PoolItem] = ()):
    """(ratings, pool_ratings, failures, stats): one rating per generated Q&A round, and one per pool answer
    (`<question_id>:A` / `:B`, to compare the rater with clinicians). A failed request has no rating, only a
    failure. Every unit: (candidate id, conversation id, round, caption, mentions, question, answer, image).
    `conversations` is read once (a stream of the file will do: only the units' strings are kept)."""
    units, images = [], ImageStore.of(images)
    for c in conversations:
        rec = records[c.id]
        units += [(round_id(c.id, k), c.id, k, rec.caption, rec.inline_mentions, q, a, c.image)
                  for k, (q, a) in enumerate(rounds(c.conversations))]
    n_rounds = len(units)
    for p in pool:
        units += [(f"{p.question_id}:{side}", p.question_id, 0, p.caption, p.inline_mentions, p.question, answer,
                   p.image) for side, answer in (("A", p.answer_a), ("B", p.answer_b))]
    requests = Requests([(u[0], u) for u in units], lambda u: rating_messages(u[3], u[4], u[5], u[6],
                                                                              images.read(u[7]), max_image_side))
    meta = {u[0]: u for u in units}
    problems = {}  # candidate id -> why its (last) reply gives no score, if it gives none

    def make_row(key, entry):
        _, conversation_id, k = meta[key][:3]
        problems[key] = entry_rejected(entry)
        return Rating(candidate_id=key, conversation_id=conversation_id, round=k, score=parse_score(entry["reply"]),
                      judge=client.model, backend=client.name, raw=entry["reply"], request_hash=entry["request_hash"])

    rows, stats, failures = client.run(requests, log, "rate", sampling, make_row, "rate", batch_state, entry_rejected)
    ratings = [rows[u[0]] for u in units[:n_rounds] if u[0] in rows]
    pool_ratings = [rows[u[0]] for u in units[n_rounds:] if u[0] in rows]
    scores = [r.score for r in ratings if r.score is not None]
    hist = {str(s): scores.count(s) for s in range(11)}
    stats.update(rounds=n_rounds, rated=len(ratings), unparsed=sum(r.score is None for r in ratings),
                 unparsed_by_reason={why: sum(problems[r.candidate_id] == why for r in ratings) for why in REASONS},
                 mean_score=round(sum(scores) / len(scores), 3) if scores else None, score_histogram=hist,
                 pool_answers=len(units) - n_rounds, pool_answers_rated=len(pool_ratings),
                 pool_unparsed=sum(r.score is None for r in pool_ratings))
    return ratings, pool_ratings, failures, stats
