"""Stage `generate`: demonstration-prompted multi-turn Q&A about each figure (the paper's GPT-4V step).

For each figure the prompt is: the system prompt, then one clinician-selected demonstration of the
figure's modality as a worked example (user: its caption and mentions; assistant: its conversation),
then the figure itself (caption, in-text mentions, image). The reply is parsed into LLaVA turns;
rounds that leak the source text or refuse are dropped, and conversations left with fewer than
`min_rounds` rounds are rejected with a reason. Every prompt setting is a param (`GenerateConfig`).
"""
from __future__ import annotations

import json
import random
import re
from collections import Counter
from dataclasses import dataclass, fields
from pathlib import Path

from .backends import image_part
from .images import ImageStore
from .client import Requests
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
JSON_INSTRUCTION = (' Reply with a JSON object only: {"conversations": [{"question": "...", "answer": "..."}, ...]}.')
LEAK_PHRASES = ("the caption", "the text says", "the context", "mentioned in the", "according to the text",
                "in-text mention", "the figure legend")
REFUSAL_PHRASES = ("i cannot", "i can't", "i'm sorry", "as an ai", "unable to view")


@dataclass
class GenerateConfig:
    system_prompt: str = SYSTEM_PROMPT  # `{min_rounds}` is filled in
    min_rounds: int = 3
    demos_per_modality: int = 1
    seed: int = 0  # which demonstrations are sampled
    max_image_side: int = 768  # the image is shrunk to fit before it is sent
    json_mode: bool = False  # ask for a JSON object (response_format json_object)
    temperature: float = 0.7
    max_tokens: int = 1024
    leak_phrases: tuple = LEAK_PHRASES
    refusal_phrases: tuple = REFUSAL_PHRASES

    @classmethod
    def from_params(cls, p: dict) -> "GenerateConfig":
        names = {f.name for f in fields(cls)}
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in p.items() if k in names})

    @property
    def sampling(self) -> dict:
        """Request params sent with every prompt (and part of its hash)."""
        extra = {"response_format": {"type": "json_object"}} if self.json_mode else {}
        return {"temperature": self.temperature, "max_tokens": self.max_tokens, **extra}


def figure_text(caption: str, mentions: list[str]) -> str:
    return f"Caption: {caption}\nIn-text mentions: {' '.join(mentions) if mentions else '(none)'}"


def pick_demos(demos: list[Demo], per_modality: int, seed: int) -> dict[str, list[Demo]]:
    """`per_modality` demonstrations per modality, sampled with `seed`."""
    rng = random.Random(seed)
    by_domain = {d: sorted((x for x in demos if x.domain == d), key=lambda x: x.id) for d in DOMAINS}
    return {d: rng.sample(xs, min(per_modality, len(xs))) for d, xs in by_domain.items()}


def build_messages(rec: CorpusRecord, image: bytes, demos: list[Demo], cfg: GenerateConfig) -> list[dict]:
    system = cfg.system_prompt.format(min_rounds=cfg.min_rounds) + (JSON_INSTRUCTION if cfg.json_mode else "")
    msgs = [{"role": "system", "content": system}]
    for d in demos:
        msgs.append({"role": "user", "content": figure_text(d.caption, d.inline_mentions)})
        msgs.append({"role": "assistant", "content": "\n".join(
            f"{'User' if t['from'] == 'human' else 'Assistant'}: {t['value']}" for t in d.conversations)})
    msgs.append({"role": "user", "content": [{"type": "text", "text": figure_text(rec.caption, rec.inline_mentions)},
                                             image_part(image, cfg.max_image_side)]})
    return msgs


_TURN = re.compile(r"^\s*(?:\d+[.)]\s*)?[*_#\s]*(user|human|question|q|assistant|gpt|answer|a)[*_\s]*:[*_\s]*(.*)$", re.I)


def parse_json_reply(text: str) -> list[dict] | None:
    """Turns of a JSON reply ({"conversations": [...]} or a bare list, of question/answer or from/value items,
    optionally in a ```json fence); None if the text is not JSON."""
    m = re.search(r"```(?:json)?\s*(.*?)```", text, re.S)
    try:
        data = json.loads(m.group(1) if m else text)
    except json.JSONDecodeError:
        return None
    items = data.get("conversations", data.get("conversation")) if isinstance(data, dict) else data
    if not isinstance(items, list):
        return None
    turns = []
    for it in items:
        if not isinstance(it, dict):
            continue
        if "question" in it and "answer" in it:
            turns += [{"from": "human", "value": str(it["question"])}, {"from": "gpt", "value": str(it["answer"])}]
        elif "from" in it and "value" in it:
            turns.append({"from": "human" if it["from"] in ("human", "user") else "gpt", "value": str(it["value"])})
    return turns


def parse_reply(text: str) -> list[dict]:
    """JSON, or `User:`/`Assistant:` (also `Q:`/`A:`, numbered, **bold**) lines -> alternating LLaVA turns."""
    turns = parse_json_reply(text) if text.lstrip()[:1] in "{[`" else None
    return _alternating(turns) if turns is not None else _alternating(_line_turns(text))


def _line_turns(text: str) -> list[dict]:
    turns: list[dict] = []
    for line in text.splitlines():
        m = _TURN.match(line)
        if m:
            who = "human" if m.group(1).lower() in ("user", "human", "question", "q") else "gpt"
            turns.append({"from": who, "value": m.group(2).strip()})
        elif turns and line.strip():
            turns[-1]["value"] += "\n" + line.strip()
    return turns


def _alternating(turns: list[dict]) -> list[dict]:
    """Only well-formed human->gpt rounds, with empty turns left out."""
    turns = [t for t in turns if t["value"].strip()]
    out = []
    for i in range(len(turns) - 1):
        if turns[i]["from"] == "human" and turns[i + 1]["from"] == "gpt" and (not out or out[-1]["from"] == "gpt"):
            out += [turns[i], turns[i + 1]]
    return out


def clean_rounds(turns: list[dict], cfg: GenerateConfig = GenerateConfig()) -> tuple[list[dict], dict[str, int]]:
    """Drop rounds that leak the source text, refuse, or contain `<image>`; count what was dropped."""
    kept, dropped = [], {"leak": 0, "refusal": 0, "image_token": 0}
    for i in range(0, len(turns), 2):
        text = (turns[i]["value"] + " " + turns[i + 1]["value"]).lower()
        if IMAGE_TOKEN in text:  # the release places the one image token itself
            dropped["image_token"] += 1
        elif any(p.lower() in text for p in cfg.leak_phrases):
            dropped["leak"] += 1
        elif any(p.lower() in text for p in cfg.refusal_phrases):
            dropped["refusal"] += 1
        else:
            kept += turns[i:i + 2]
    return kept, dropped


def generate(records: list[CorpusRecord], images: ImageStore | Path, demos: list[Demo], client, log: AppendLog,
             cfg: GenerateConfig, batch_state: AppendLog | None = None):
    """(conversations, rejected, failures, stats) for every figure."""
    chosen, images = pick_demos(demos, cfg.demos_per_modality, cfg.seed), ImageStore.of(images)
    by_id = {r.id: r for r in records}
    requests = Requests([(r.id, r) for r in records],
                        lambda r: build_messages(r, images.read(r.image), chosen.get(r.domain, []), cfg))

    def make_row(key, entry):
        r = by_id[key]
        turns = parse_reply(entry["reply"])
        if entry.get("finish_reason") == "length" and turns:
            turns = turns[:-2]  # cut off at max_tokens: the last answer is unfinished
        return Conversation(id=key, image=r.image, domain=r.domain, conversations=turns,
                            backend=client.name, model=client.model, request_hash=entry["request_hash"])

    rows, stats, failures = client.run(requests, log, "generate", cfg.sampling, make_row, "generate", batch_state)
    conversations, rejected = [], []
    dropped, reasons = Counter(leak=0, refusal=0, image_token=0), Counter()
    for r in records:
        if r.id not in rows:
            continue  # failed: listed in failures
        conv = rows[r.id]
        parsed = len(conv.conversations) // 2
        turns, d = clean_rounds(conv.conversations, cfg)
        dropped.update(d)
        if len(turns) // 2 < cfg.min_rounds:
            reason = ("unparseable reply (no User/Assistant rounds)" if parsed == 0 else
                      f"only {len(turns) // 2} usable rounds (< min_rounds={cfg.min_rounds})")
            reasons["unparseable" if parsed == 0 else "too_few_rounds"] += 1
            rejected.append({"id": r.id, "reason": reason, "request_hash": conv.request_hash})
            continue
        conv.conversations = turns
        conversations.append(conv)
    stats.update(conversations=len(conversations), rejected=len(rejected), rejected_by_reason=dict(reasons),
                 rounds_dropped=dict(dropped), rounds=sum(len(c.conversations) // 2 for c in conversations))
    return conversations, rejected, failures, stats
