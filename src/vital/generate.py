"""Stage `generate`: demonstration-prompted multi-turn Q&A about each figure (the paper's GPT-4V step).

For each figure the prompt is: the system prompt, then one clinician-selected demonstration of the
figure's modality as a worked example (user: its caption and mentions; assistant: its conversation),
then the figure itself (caption, in-text mentions, image). The reply is parsed into LLaVA turns;
rounds that leak the source text or refuse are dropped, and conversations left with fewer than
`min_rounds` rounds are rejected with a reason.
"""
from __future__ import annotations

import random
import re
from pathlib import Path

from .backends import image_part, run_cached
from .schema import DOMAINS, IMAGE_TOKEN, AppendLog, Conversation, CorpusRecord, Demo

SYSTEM_PROMPT = (
    "You are an AI assistant specialized in biomedical topics. You are shown a biomedical figure together "
    "with its caption and the sentences that mention it in the paper. Write a multi-turn conversation "
    "between a person asking about the image and you answering, as if you were looking at the image. "
    "Ground every answer in the visual details and in the caption and mentions, but never say that "
    "information comes from a caption or text. Ask diverse questions (modality, anatomy, findings, "
    "significance). Start with a question, write at least {min_rounds} exchanges, and answer without "
    "overconfidence: say when the image alone cannot settle a question. Format each exchange as "
    "'User: ...' on one line and 'Assistant: ...' on the next."
)
LEAK_PHRASES = ("the caption", "the text says", "the context", "mentioned in the", "according to the text",
                "in-text mention", "the figure legend")
REFUSAL_PHRASES = ("i cannot", "i can't", "i'm sorry", "as an ai", "unable to view")


def figure_text(caption: str, mentions: list[str]) -> str:
    return f"Caption: {caption}\nIn-text mentions: {' '.join(mentions) if mentions else '(none)'}"


def pick_demos(demos: list[Demo], per_modality: int, seed: int) -> dict[str, list[Demo]]:
    """`per_modality` demonstrations per modality, sampled with `seed`."""
    rng = random.Random(seed)
    by_domain = {d: sorted((x for x in demos if x.domain == d), key=lambda x: x.id) for d in DOMAINS}
    return {d: rng.sample(xs, min(per_modality, len(xs))) for d, xs in by_domain.items()}


def build_messages(rec: CorpusRecord, image_path: Path, demos: list[Demo], min_rounds: int) -> list[dict]:
    msgs = [{"role": "system", "content": SYSTEM_PROMPT.format(min_rounds=min_rounds)}]
    for d in demos:
        msgs.append({"role": "user", "content": figure_text(d.caption, d.inline_mentions)})
        msgs.append({"role": "assistant", "content": "\n".join(
            f"{'User' if t['from'] == 'human' else 'Assistant'}: {t['value']}" for t in d.conversations)})
    msgs.append({"role": "user", "content": [{"type": "text", "text": figure_text(rec.caption, rec.inline_mentions)},
                                             image_part(image_path)]})
    return msgs


_TURN = re.compile(r"^\s*(?:\d+[.)]\s*)?[*_#\s]*(user|human|question|q|assistant|gpt|answer|a)[*_\s]*:[*_\s]*(.*)$", re.I)


def parse_reply(text: str) -> list[dict]:
    """`User:`/`Assistant:` (also `Q:`/`A:`, numbered, **bold**) lines -> alternating LLaVA turns."""
    turns: list[dict] = []
    for line in text.splitlines():
        m = _TURN.match(line)
        if m:
            who = "human" if m.group(1).lower() in ("user", "human", "question", "q") else "gpt"
            turns.append({"from": who, "value": m.group(2).strip()})
        elif turns and line.strip():
            turns[-1]["value"] += "\n" + line.strip()
    # keep only well-formed human->gpt rounds
    out = []
    for i in range(len(turns) - 1):
        if turns[i]["from"] == "human" and turns[i + 1]["from"] == "gpt" and (not out or out[-1]["from"] == "gpt"):
            out += [turns[i], turns[i + 1]]
    return out


def clean_rounds(turns: list[dict]) -> tuple[list[dict], dict[str, int]]:
    """Drop rounds that leak the source text, refuse, or contain `<image>`; count what was dropped."""
    kept, dropped = [], {"leak": 0, "refusal": 0, "image_token": 0}
    for i in range(0, len(turns), 2):
        text = (turns[i]["value"] + " " + turns[i + 1]["value"]).lower()
        if IMAGE_TOKEN in text:  # the release places the one image token itself
            dropped["image_token"] += 1
        elif any(p in text for p in LEAK_PHRASES):
            dropped["leak"] += 1
        elif any(p in text for p in REFUSAL_PHRASES):
            dropped["refusal"] += 1
        else:
            kept += turns[i:i + 2]
    return kept, dropped


def generate(records: list[CorpusRecord], image_root: Path, demos: list[Demo], backend, log: AppendLog,
             min_rounds: int, demos_per_modality: int, seed: int, sampling: dict):
    chosen = pick_demos(demos, demos_per_modality, seed)
    by_id = {r.id: r for r in records}
    requests = [(r.id, build_messages(r, image_root / r.image, chosen.get(r.domain, []), min_rounds))
                for r in records]

    def make_row(key, reply, h):
        r = by_id[key]
        return Conversation(id=key, image=r.image, domain=r.domain, conversations=parse_reply(reply),
                            backend=backend.name, model=backend.model, request_hash=h)

    rows, stats = run_cached(requests, backend, log, "generate", sampling, make_row, desc="generate")
    conversations, rejected = [], []
    dropped = {"leak": 0, "refusal": 0, "image_token": 0}
    for key, _ in requests:
        conv = rows[key]
        turns, d = clean_rounds(conv.conversations)
        for k in d:
            dropped[k] += d[k]
        if len(turns) // 2 < min_rounds:
            rejected.append({"id": key, "reason": f"only {len(turns) // 2} usable rounds (< min_rounds={min_rounds})"})
            continue
        conv.conversations = turns
        conversations.append(conv)
    stats.update(conversations=len(conversations), rejected=len(rejected), rounds_dropped=dropped,
                 rounds=sum(len(c.conversations) // 2 for c in conversations))
    return conversations, rejected, stats
