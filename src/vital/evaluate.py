"""Stage `evaluate`: VQA accuracy/recall and judge-scored open visual chat, as LLaVA-Med reports them.

VQA items use the LLaVA-Med eval format {question_id, image, text, answer, answer_type: CLOSED|OPEN}:
closed accuracy (yes/no extracted from the reply) and open recall (share of the reference answer's
tokens found in the reply). Chat items {question_id, image, category, text, gpt4_answer, fig_caption,
fig_inline_mention, domain}: a judge scores the reference answer and the model answer 1-10 with the
same rubric; the relative score is 100 * sum(model) / sum(reference), per domain.
`sample_eval_sets` writes a small VQA and chat set from the corpus for the embedded default.
"""
from __future__ import annotations

import re
from collections import defaultdict
from pathlib import Path

import torch

from .images import ImageStore
from .offline import qa_from_text
from .rate import parse_score, rating_messages
from .schema import IMAGE_TOKEN, CorpusRecord
from .tune import user_turn

DOMAIN_NAMES = {"chest_xray": "chest X-ray", "mri": "MRI", "ct_scan": "CT", "histology": "histology"}


def sample_eval_sets(records: list[CorpusRecord]) -> tuple[list[dict], list[dict]]:
    vqa, chat = [], []
    names = list(DOMAIN_NAMES.items())
    for i, r in enumerate(records):
        qa = qa_from_text(r.caption, " ".join(r.inline_mentions))
        wrong = next(n for d, n in names[i % len(names):] + names if d != r.domain)
        if r.domain in DOMAIN_NAMES:
            vqa.append(dict(question_id=f"{r.id}-closed-yes", image=r.image, domain=r.domain, answer_type="CLOSED",
                            text=f"Is this a {DOMAIN_NAMES[r.domain]} image?", answer="yes"))
        vqa.append(dict(question_id=f"{r.id}-closed-no", image=r.image, domain=r.domain, answer_type="CLOSED",
                        text=f"Is this a {wrong} image?", answer="no"))
        vqa.append(dict(question_id=f"{r.id}-open", image=r.image, domain=r.domain, answer_type="OPEN",
                        text=qa[0][0], answer=qa[0][1]))
        chat.append(dict(question_id=f"{r.id}-chat", image=r.image, domain=r.domain, category="detailed_description",
                         text=qa[1][0], gpt4_answer=qa[1][1], fig_caption=r.caption,
                         fig_inline_mention=" ".join(r.inline_mentions)))
    return vqa, chat


def answer_questions(model, processor, items: list[dict], images: ImageStore | Path, max_new_tokens: int) -> dict[str, str]:
    tok, images = processor.tokenizer, ImageStore.of(images)
    out = {}
    with torch.no_grad():
        for it in items:
            with images.open(it["image"]) as im:
                enc = processor(images=[im.convert("RGB")], text=[user_turn(f"{IMAGE_TOKEN}\n{it['text']}")],
                                add_special_tokens=False, return_tensors="pt")
            enc.pop("token_type_ids", None)
            gen = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                                 pad_token_id=tok.pad_token_id)
            out[it["question_id"]] = tok.decode(gen[0][enc["input_ids"].shape[1]:], skip_special_tokens=True).strip()
    return out


def _tokens(text: str) -> list[str]:
    return re.findall(r"[a-z0-9]+", text.lower())


def closed_answer(text: str) -> str | None:
    m = re.search(r"\b(yes|no)\b", text.lower())
    return m.group(1) if m else None


def vqa_metrics(items: list[dict], preds: dict[str, str]) -> dict:
    closed, recall = [], []
    for it in items:
        pred = preds[it["question_id"]]
        if it["answer_type"] == "CLOSED":
            closed.append(closed_answer(pred) == it["answer"].lower())
        elif it["answer_type"] == "OPEN":
            ref = set(_tokens(it["answer"]))
            recall.append(len(ref & set(_tokens(pred))) / len(ref) if ref else 0.0)
        else:
            raise ValueError(f"VQA item {it['question_id']}: unknown answer_type {it['answer_type']!r}; "
                             "use CLOSED or OPEN")
    mean = lambda xs: round(100 * sum(xs) / len(xs), 2) if xs else None  # noqa: E731
    return {"closed_accuracy": mean(closed), "open_recall": mean(recall),
            "closed_n": len(closed), "open_n": len(recall)}


def judge_chat(items: list[dict], preds: dict[str, str], judge, images: ImageStore | Path) -> dict:
    """Relative score per domain: 100 * sum(model score) / sum(reference score); unparsed replies counted."""
    sums = defaultdict(lambda: [0, 0])
    unparsed, images = 0, ImageStore.of(images)
    for it in items:
        scores = []
        for answer in (it["gpt4_answer"], preds[it["question_id"]]):
            msgs = rating_messages(it["fig_caption"], [it["fig_inline_mention"]], it["text"], answer,
                                   images.read(it["image"]))
            reply = judge.complete(msgs, "judge")  # None: the request failed
            scores.append(parse_score(reply) if reply is not None else None)
        if None in scores:
            unparsed += 1
            continue
        for key in (it["domain"], "all"):
            sums[key][0] += scores[0]
            sums[key][1] += scores[1]
    rel = {d: round(100 * m / r, 2) if r else None for d, (r, m) in sums.items()}
    return {"relative_score": rel.pop("all", None), "relative_score_by_domain": dict(sorted(rel.items())),
            "judged": len(items) - unparsed, "judge_unparsed": unparsed}
