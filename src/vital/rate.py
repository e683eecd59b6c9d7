"""Stage `rate`: the model scores every candidate Q&A round 0-10 (the paper's self-evaluation).

The prompt carries the paper's rubric and asks for the score alone on the first line. Parsing is
strict: a first line that is not an integer 0..10 gives `score: None` with the raw reply kept,
never a default number.
"""
from __future__ import annotations

import re
from pathlib import Path

from .backends import image_part, run_cached
from .generate import figure_text
from .schema import AppendLog, Conversation, CorpusRecord, Rating, rounds

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


def rating_messages(caption: str, mentions: list[str], question: str, answer: str, image_path: Path) -> list[dict]:
    text = f"{figure_text(caption, mentions)}\nQuestion: {question}\nAnswer: {answer}"
    return [{"role": "system", "content": RUBRIC},
            {"role": "user", "content": [{"type": "text", "text": text}, image_part(image_path)]}]


def rate(conversations: list[Conversation], records: dict[str, CorpusRecord], image_root: Path, backend,
         log: AppendLog, sampling: dict):
    requests, meta = [], {}
    for c in conversations:
        rec = records[c.id]
        for k, (q, a) in enumerate(rounds(c.conversations)):
            cid = f"{c.id}#{k}"
            meta[cid] = (c.id, k)
            requests.append((cid, rating_messages(rec.caption, rec.inline_mentions, q, a, image_root / c.image)))

    def make_row(key, reply, h):
        conv_id, k = meta[key]
        return Rating(candidate_id=key, conversation_id=conv_id, round=k, score=parse_score(reply),
                      judge=backend.model, backend=backend.name, raw=reply, request_hash=h)

    rows, stats = run_cached(requests, backend, log, "rate", sampling, make_row, desc="rate")
    ratings = [rows[key] for key, _ in requests]
    scores = [r.score for r in ratings if r.score is not None]
    hist = {str(s): scores.count(s) for s in range(11)}
    stats.update(rounds=len(ratings), unparsed=sum(r.score is None for r in ratings),
                 mean_score=round(sum(scores) / len(scores), 3) if scores else None, score_histogram=hist)
    return ratings, stats
