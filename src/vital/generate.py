"""Stage `generate`: demonstration-prompted multi-turn Q&A about each figure (the paper's GPT-4V step).

For each figure the prompt is: the system prompt, then clinician-selected demonstrations as worked
examples (user: its caption and mentions; assistant: its conversation) -- by default one of each of the
five modalities, drawn afresh for each figure as the authors' code does -- then the figure itself
(caption, in-text mentions, image). The reply is parsed into LLaVA turns; rounds that leak the source
text or refuse (a whole-word phrase match) are dropped, and conversations left with fewer than
`min_rounds` rounds are rejected with a reason. A reply with nothing usable at all (unparseable, or a
refusal: replies.rejected_reply) is asked again once before it is rejected. Every prompt setting is a
param (`GenerateConfig`).
"""
from __future__ import annotations

import hashlib
import json
import random
import re
from collections import Counter
from dataclasses import dataclass, fields
from pathlib import Path

from .llm.backends import image_part
from .images import ImageStore
from .llm.client import Requests
from .replies import entry_rejected
from .schema import DOMAINS, IMAGE_TOKEN, AppendLog, Conversation, CorpusRecord, Demo

SYSTEM_PROMPT = (  # the same text as params.yaml's generate.system_prompt
    "You are an AI assistant specialized in biomedical topics. You are shown a biomedical figure together "
    "with its caption and the sentences that mention it in the paper. Write a multi-turn conversation "
    "between a person asking about the image and you answering, as if you were looking at the image. "
    "Ground every answer in the visual details and in the caption and mentions, but never say that "
    "information comes from a caption or text. Ask diverse questions, closed (yes/no) and open: the "
    "imaging modality, the organ and anatomy, the location and side, possible diseases, the size and "
    "number of findings, and questions that need reasoning. Start with a question, write at least "
    "{min_rounds} exchanges, and answer without overconfidence: say when the image alone cannot settle a "
    "question. Format each exchange as 'User: ...' on one line and 'Assistant: ...' on the next."
)
JSON_INSTRUCTION = (' Reply with a JSON object only: {"conversations": [{"question": "...", "answer": "..."}, ...]}.')
# the same lists as params.yaml; matched as whole words, and none is in the hedges the prompt asks for
# ("I cannot be certain from the image alone", "in the context of")
LEAK_PHRASES = ("the caption", "figure caption", "the legend", "figure legend", "the text says", "the text states",
                "according to the text", "according to the context", "mentioned in the text",
                "mentioned in the caption", "described in the text", "described in the caption",
                "the provided context", "the given context", "the figure context", "in-text mention",
                "in-text mentions", "the provided text", "the accompanying text", "the captions",
                "figure legends", "mentioned in the paper", "mentioned in the article")
REFUSAL_PHRASES = ("i'm sorry", "i am sorry", "as an ai", "unable to view", "not able to view", "i cannot view",
                   "i can't view", "i cannot see the image", "i can't see the image", "i cannot analyze",
                   "i can't analyze", "i cannot interpret", "i can't interpret", "i cannot assist", "i can't assist",
                   "i cannot help", "i can't help", "i cannot access", "i can't access")
# why a conversation is rejected when its reply, asked twice, is of no use (replies.rejected_reply)
REJECTED_REASONS = {"unparseable": "unparseable reply (no User/Assistant rounds), also when asked again",
                    "refused": "refused (a refusal and no usable round), also when asked again"}
DEMO_SCHEMES = ("every_modality", "own_domain")
MODALITIES = tuple(d for d in DOMAINS if d != "other")  # every_modality: one demonstration each, in this order


@dataclass
class GenerateConfig:
    system_prompt: str = SYSTEM_PROMPT  # `{min_rounds}` is filled in
    min_rounds: int = 3
    demo_scheme: str = "every_modality"  # | "own_domain" (see demos_for)
    demos_per_modality: int = 1
    seed: int = 0  # which demonstrations are sampled
    max_image_side: int = 768  # the image is shrunk to fit before it is sent
    json_mode: bool = False  # ask for a JSON object (response_format json_object)
    temperature: float = 0.7
    max_tokens: int = 1024
    leak_phrases: tuple = LEAK_PHRASES
    refusal_phrases: tuple = REFUSAL_PHRASES

    def __post_init__(self):
        if self.demo_scheme not in DEMO_SCHEMES:
            raise ValueError(f"generate.demo_scheme is {self.demo_scheme!r}; use one of {', '.join(DEMO_SCHEMES)}")
        n = self.demos_per_modality
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise ValueError(f"generate.demos_per_modality is {n!r}; use an integer >= 0 (0: no demonstrations)")

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


def check_demos(demos: list[Demo], source: str) -> None:
    """A demonstration's domain is one of DOMAINS; anything else names source:record (it would be left out)."""
    for n, d in enumerate(demos, 1):
        if d.domain not in DOMAINS:
            raise ValueError(f"{source}: record {n} ({d.id}): domain {d.domain!r} is not one of {', '.join(DOMAINS)}; "
                             "fix it or leave the demonstration out")


def _by_domain(demos: list[Demo]) -> dict[str, list[Demo]]:
    return {d: sorted((x for x in demos if x.domain == d), key=lambda x: x.id) for d in DOMAINS}


def pick_demos(demos: list[Demo], per_modality: int, seed: int) -> dict[str, list[Demo]]:
    """`per_modality` demonstrations per modality, sampled once with `seed` (the own_domain scheme)."""
    rng = random.Random(seed)
    return {d: rng.sample(xs, min(per_modality, len(xs))) for d, xs in _by_domain(demos).items()}


def demos_for(records: list[CorpusRecord], demos: list[Demo], cfg: GenerateConfig) -> dict[str, list[Demo]]:
    """{figure id: its demonstrations, in prompt order}. every_modality: `demos_per_modality` of each modality
    (fewer where the file has fewer), drawn per figure from (seed, figure id) with a stable hash, so a figure
    gets the same demonstrations in every process and its cached reply is reused. own_domain: only the
    figure's own modality, drawn once per run (none for `other`)."""
    if cfg.demo_scheme == "own_domain":
        chosen = pick_demos(demos, cfg.demos_per_modality, cfg.seed)
        return {r.id: chosen.get(r.domain, []) for r in records}
    by_domain, out = _by_domain(demos), {}
    for r in records:
        digest = hashlib.sha256(f"{cfg.seed}\x1f{r.id}".encode()).digest()
        rng = random.Random(int.from_bytes(digest[:8], "big"))
        out[r.id] = [x for d in MODALITIES for x in rng.sample(by_domain[d], min(cfg.demos_per_modality,
                                                                                len(by_domain[d])))]
    return out


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


def _norm(text: str) -> str:
    return text.replace("\u2019", "'").lower()  # models often write I\u2019m for I'm


def first_phrase(text: str, phrases) -> str | None:
    """The longest of `phrases` found in `text` as whole words, case-insensitive ("as an ai" is not in "as an
    aid"; "as mentioned in the caption" is counted as itself, not as "the caption")."""
    text = _norm(text)
    for p in sorted(phrases, key=lambda p: (-len(p), p)):
        words = _norm(p).split()
        if words and re.search(r"(?<!\w)" + r"\s+".join(map(re.escape, words)) + r"(?!\w)", text):
            return p
    return None


def clean_rounds(turns: list[dict], cfg: GenerateConfig = GenerateConfig()
                 ) -> tuple[list[dict], dict[str, int], Counter]:
    """Drop rounds that leak the source text, refuse, or contain `<image>`; count what was dropped, in all
    and by the phrase that matched ("leak: the caption"), so a phrase that drops too much shows."""
    kept, dropped, by_phrase = [], {"leak": 0, "refusal": 0, "image_token": 0}, Counter()
    for i in range(0, len(turns), 2):
        text = turns[i]["value"] + " " + turns[i + 1]["value"]
        if IMAGE_TOKEN in text.lower():  # the release places the one image token itself
            dropped["image_token"] += 1
        elif leak := first_phrase(text, cfg.leak_phrases):
            dropped["leak"] += 1
            by_phrase[f"leak: {leak}"] += 1
        elif refusal := first_phrase(text, cfg.refusal_phrases):
            dropped["refusal"] += 1
            by_phrase[f"refusal: {refusal}"] += 1
        else:
            kept += turns[i:i + 2]
    return kept, dropped, by_phrase


def generate(records: list[CorpusRecord], images: ImageStore | Path, demos: list[Demo], client, log: AppendLog,
             cfg: GenerateConfig, batch_state: AppendLog | None = None):
    """(conversations, rejected, failures, stats) for every figure."""
    chosen, images = demos_for(records, demos, cfg), ImageStore.of(images)
    by_id = {r.id: r for r in records}
    requests = Requests([(r.id, r) for r in records],
                        lambda r: build_messages(r, images.read(r.image), chosen[r.id], cfg))
    problems = {}  # id -> why its (last) reply is rejected, if it is

    def rejected(entry):
        return entry_rejected(entry, cfg.refusal_phrases)

    def make_row(key, entry):
        r = by_id[key]
        problems[key] = rejected(entry)
        turns = parse_reply(entry["reply"])
        if entry.get("finish_reason") == "length" and turns:
            # cut off at max_tokens: only a cut inside an answer leaves an unfinished round (a cut inside a
            # question leaves a dangling question, which the parser already drops)
            said = [t for t in _line_turns(entry["reply"]) if t["value"].strip()]
            if said and said[-1]["from"] == "gpt":
                turns = turns[:-2]
        return Conversation(id=key, image=r.image, domain=r.domain, conversations=turns, backend=client.name,
                            model=client.model, request_hash=entry["request_hash"],
                            demo_ids=[d.id for d in chosen[key]])

    rows, stats, failures = client.run(requests, log, "generate", cfg.sampling, make_row, "generate", batch_state,
                                       rejected)
    conversations, rejects = [], []
    dropped, by_phrase, reasons = Counter(leak=0, refusal=0, image_token=0), Counter(), Counter()
    for r in records:
        if r.id not in rows:
            continue  # failed: listed in failures
        conv = rows[r.id]
        turns, d, p = clean_rounds(conv.conversations, cfg)
        dropped.update(d)
        by_phrase.update(p)
        problem = problems[r.id]  # unparseable or refused, when asked again too
        if problem or len(turns) // 2 < cfg.min_rounds:
            reason = REJECTED_REASONS[problem] if problem else \
                f"only {len(turns) // 2} usable rounds (< min_rounds={cfg.min_rounds})"
            reasons[problem or "too_few_rounds"] += 1
            rejects.append({"id": r.id, "reason": reason, "request_hash": conv.request_hash})
            continue
        conv.conversations = turns
        conversations.append(conv)
    stats.update(conversations=len(conversations), rejected=len(rejects), rejected_by_reason=dict(reasons),
                 rounds_dropped=dict(dropped), rounds_dropped_by_phrase=dict(sorted(by_phrase.items())),
                 rounds=sum(len(c.conversations) // 2 for c in conversations))
    return conversations, rejects, failures, stats
