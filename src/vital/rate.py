"""Stage `rate`: the model scores every candidate Q&A round 0-10 (the paper's self-evaluation).

The prompt carries the paper's rubric and asks for the score alone on the first line. Parsing is
strict: a first line that is not an integer 0..10 gives `score: None` with the raw reply kept,
never a default number.
"""
from __future__ import annotations

import re
from pathlib import Path

from .backends import image_part
from .client import Requests
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


def rating_messages(caption: str, mentions: list[str], question: str, answer: str, image_path: Path,
                    max_image_side: int = 0) -> list[dict]:
    text = f"{figure_text(caption, mentions)}\nQuestion: {question}\nAnswer: {answer}"
    return [{"role": "system", "content": RUBRIC},
            {"role": "user", "content": [{"type": "text", "text": text}, image_part(image_path, max_image_side)]}]


def rate(conversations: list[Conversation], records: dict[str, CorpusRecord], image_root: Path, client,
         log: AppendLog, sampling: dict, max_image_side: int = 0, batch_state: AppendLog | None = None):
    """(ratings, failures, stats): one rating per Q&A round; a failed request has no rating, only a failure."""
    items = []
    for c in conversations:
        rec = records[c.id]
        items += [(f"{c.id}#{k}", (c, k, rec, q, a)) for k, (q, a) in enumerate(rounds(c.conversations))]
    meta = dict(items)
    requests = Requests(items, lambda x: rating_messages(x[2].caption, x[2].inline_mentions, x[3], x[4],
                                                         image_root / x[0].image, max_image_side))

    def make_row(key, entry):
        c, k = meta[key][:2]
        return Rating(candidate_id=key, conversation_id=c.id, round=k, score=parse_score(entry["reply"]),
                      judge=client.model, backend=client.name, raw=entry["reply"], request_hash=entry["request_hash"])

    rows, stats, failures = client.run(requests, log, "rate", sampling, make_row, "rate", batch_state)
    ratings = [rows[key] for key, _ in items if key in rows]
    scores = [r.score for r in ratings if r.score is not None]
    hist = {str(s): scores.count(s) for s in range(11)}
    stats.update(rounds=len(items), rated=len(ratings), unparsed=sum(r.score is None for r in ratings),
                 mean_score=round(sum(scores) / len(scores), 3) if scores else None, score_histogram=hist)
    return ratings, failures, stats
