"""Stage `evaluate`: the paper's three evaluations, in the LLaVA-Med formats.

- VQA (VQA-RAD, SLAKE, PathVQA): items {question_id, image, text, answer, answer_type: CLOSED|OPEN}, one
  file per dataset. Closed accuracy (yes/no extracted from the reply), open recall (share of the reference
  answer's tokens found in the reply), exact match and token F1, per dataset. An item with another
  answer_type, or whose image cannot be read, is skipped and counted with its id.
- Open visual chat: items {question_id, image, category, text, gpt4_answer, fig_caption, fig_inline_mention,
  domain}. As LLaVA-Med does, a judge reads the caption and mentions, the question, the reference answer and
  the model's, and scores both 1-10 in one reply; the relative score is 100 * the mean over questions of
  model / reference, overall, per domain and per question type.
- Win rate against a baseline answers file ({question_id, answer}): the judge compares the two answers and
  ends with [[A]], [[B]] or [[C]] (tie), parsed exactly; each pair is judged in both orders and counts as a
  win or a loss only when both orders agree (otherwise a tie), which cancels position bias.

Judge requests go through the shared client and its request cache (data/cache/evaluate.jsonl): a rerun
pays for nothing twice. `sample_eval_sets` writes a small VQA and chat set from the corpus for the
embedded default.
"""
from __future__ import annotations

import re
from collections import Counter, defaultdict
from pathlib import Path

import torch

from .client import Requests
from .evalsets import load_eval_sets, uid  # noqa: F401 (load_eval_sets: the stage's reader)
from .generate import figure_text
from .images import ImageStore
from .offline import qa_from_text
from .schema import AppendLog, CorpusRecord
from .tune import prompt

DOMAIN_NAMES = {"chest_xray": "chest X-ray", "mri": "MRI", "ct_scan": "CT", "histology": "histology"}


def sample_eval_sets(records: list[CorpusRecord]) -> tuple[list[dict], list[dict]]:
    vqa, chat = [], []
    names = list(DOMAIN_NAMES.items())
    for i, r in enumerate(records):
        qa = qa_from_text(r.caption, " ".join(r.inline_mentions))
        wrong = next(n for d, n in names[i % len(names):] + names if d != r.domain)
        if r.domain in DOMAIN_NAMES:
            vqa.append(dict(question_id=f"{r.id}-closed-yes", image=r.image, domain=r.domain, answer_type="CLOSED",
                            text=f"Is this a {DOMAIN_NAMES[r.domain]} image?", answer="yes", dataset="sample"))
        vqa.append(dict(question_id=f"{r.id}-closed-no", image=r.image, domain=r.domain, answer_type="CLOSED",
                        text=f"Is this a {wrong} image?", answer="no", dataset="sample"))
        vqa.append(dict(question_id=f"{r.id}-open", image=r.image, domain=r.domain, answer_type="OPEN",
                        text=qa[0][0], answer=qa[0][1], dataset="sample"))
        chat.append(dict(question_id=f"{r.id}-chat", dataset="chat", image=r.image, domain=r.domain,
                         category="detailed_description",
                         text=qa[1][0], gpt4_answer=qa[1][1], fig_caption=r.caption,
                         fig_inline_mention=" ".join(r.inline_mentions)))
    return vqa, chat


def answer_questions(model, processor, items: list[dict], images: ImageStore | Path,
                     max_new_tokens: int) -> tuple[dict[str, str], list[dict]]:
    """The model's answer per question id, and the items skipped with why (an image that is missing or that
    the processor rejects)."""
    tok, images = processor.tokenizer, ImageStore.of(images)
    out, skipped = {}, []
    with torch.no_grad():
        for it in items:
            try:
                with images.open(it["image"]) as im:
                    enc = processor(images=[im.convert("RGB")], text=[prompt(processor, it["text"])],
                                    add_special_tokens=False, truncation=False, return_tensors="pt")
            except (OSError, ValueError) as e:  # PIL and processors raise these for unreadable images
                skipped.append({"id": uid(it), "image": it["image"], "reason": str(e)})
                continue
            enc.pop("token_type_ids", None)
            enc = {k: v.to(model.device, model.dtype if v.is_floating_point() else v.dtype) for k, v in enc.items()}
            gen = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                                 pad_token_id=tok.pad_token_id)
            out[uid(it)] = tok.decode(gen[0][enc["input_ids"].shape[1]:], skip_special_tokens=True).strip()
    return out, skipped


def _tokens(text: str) -> list[str]:
    return re.findall(r"[a-z0-9]+", text.lower())


def closed_answer(text: str) -> str | None:
    m = re.search(r"\b(yes|no)\b", text.lower())
    return m.group(1) if m else None


def token_f1(pred: str, ref: str) -> float:
    p, r = _tokens(pred), _tokens(ref)
    common = sum((Counter(p) & Counter(r)).values())
    if not p or not r or not common:
        return float(p == r)
    precision, recall = common / len(p), common / len(r)
    return 2 * precision * recall / (precision + recall)


def _mean(xs: list) -> float | None:
    return round(100 * sum(xs) / len(xs), 2) if xs else None


def vqa_metrics(items: list[dict], preds: dict[str, str]) -> tuple[dict, list[dict]]:
    """Metrics overall and per dataset, and the items skipped (unknown answer_type, no answer) with why."""
    per: dict[str, dict[str, list]] = defaultdict(lambda: defaultdict(list))
    skipped = []
    for it in items:
        key, kind = uid(it), str(it.get("answer_type", "")).upper()
        if kind not in ("CLOSED", "OPEN"):
            skipped.append({"id": key, "reason": f"unknown answer_type {it.get('answer_type')!r}; use CLOSED or OPEN"})
            continue
        if key not in preds:  # its image was skipped when answering
            continue
        pred, ref = preds[key], str(it["answer"])
        ref_tokens, pred_tokens = _tokens(ref), _tokens(pred)
        for group in (per[it["dataset"]], per["all"]):
            if kind == "CLOSED":  # yes/no read from the reply; other closed answers ("CT or MRI?"): all in the reply
                group["closed_accuracy"].append(closed_answer(pred) == ref_tokens[0] if ref_tokens in (["yes"], ["no"])
                                                else bool(ref_tokens) and set(ref_tokens) <= set(pred_tokens))
            else:
                group["open_recall"].append(len(set(ref_tokens) & set(pred_tokens)) / len(set(ref_tokens))
                                            if ref_tokens else 0.0)
            group["exact_match"].append(pred_tokens == ref_tokens)
            group["token_f1"].append(token_f1(pred, ref))
            group["closed_n" if kind == "CLOSED" else "open_n"].append(1)

    def summary(g):
        return {"closed_accuracy": _mean(g["closed_accuracy"]), "open_recall": _mean(g["open_recall"]),
                "exact_match": _mean(g["exact_match"]), "token_f1": _mean(g["token_f1"]),
                "closed_n": len(g["closed_n"]), "open_n": len(g["open_n"])}

    overall = summary(per.pop("all", defaultdict(list)))
    return {**overall, "by_dataset": {d: summary(g) for d, g in sorted(per.items())}}, skipped


CHAT_JUDGE = (
    "You are a helpful and precise assistant who checks the quality of answers. Two AI assistants answered a "
    "user's question about a biomedical figure, which is described to you by its caption and in-text mentions. "
    "Rate the helpfulness, relevance, accuracy and level of detail of each response with an overall score from "
    "1 to 10, higher meaning better. On the first line write only the two scores, for Assistant 1 and "
    "Assistant 2, separated by a space. Then explain your evaluation, without bias, and do not let the order of "
    "the responses affect your judgment."
)
_TWO_SCORES = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(?:,|\s)\s*(\d+(?:\.\d+)?)\s*$")


def parse_scores(reply: str) -> tuple[float, float] | None:
    """(Assistant 1's score, Assistant 2's) from the reply's first line, both on the 1-10 scale; else None."""
    m = _TWO_SCORES.match((reply or "").strip().split("\n")[0].replace("*", ""))
    scores = (float(m.group(1)), float(m.group(2))) if m else None
    return scores if scores and all(1 <= x <= 10 for x in scores) else None


def judge_messages(caption: str, mentions: str, question: str, reference: str, answer: str) -> list[dict]:
    """The answers between [Assistant N] / [End of Assistant N] lines, as LLaVA-Med writes them: an answer
    of several lines stays one answer."""
    text = (f"{figure_text(caption, [mentions] if mentions else [])}\nQuestion: {question}\n"
            f"[Assistant 1]\n{reference}\n[End of Assistant 1]\n[Assistant 2]\n{answer}\n[End of Assistant 2]")
    return [{"role": "system", "content": CHAT_JUDGE}, {"role": "user", "content": text}]


def judge_chat(items: list[dict], preds: dict[str, str], client, log: AppendLog,
               sampling: dict | None = None) -> tuple[dict, dict]:
    """LLaVA-Med's open-chat evaluation: the judge sees the figure's caption and mentions (not the image),
    the question, the reference answer as Assistant 1 and the model's as Assistant 2, and scores both 1-10.
    relative score = 100 * mean over questions of model score / reference score, overall, per domain and per
    question type, with both mean scores beside it. A question whose reply has no two scores is left out and
    listed. Returns (metrics, stats)."""
    asked = [it for it in items if uid(it) in preds]

    def build(it):
        return judge_messages(it["fig_caption"], it["fig_inline_mention"], it["text"], it["gpt4_answer"],
                              preds[uid(it)])

    replies, stats, _ = client.run(Requests([(uid(it), it) for it in asked], build), log, "judge", sampling or {},
                                   lambda k, e: e["reply"], "evaluate:judge")
    groups = defaultdict(list)
    unparsed, failed = [], []
    for it in asked:
        if uid(it) not in replies:  # the request failed (retried up to llm.max_attempts)
            failed.append(uid(it))
            continue
        scores = parse_scores(replies[uid(it)])
        if scores is None:
            unparsed.append(uid(it))
            continue
        for key in ("all", f"domain:{it.get('domain', 'other')}", f"category:{it.get('category', 'unknown')}"):
            groups[key].append(scores)

    def summary(key):
        pairs = groups.get(key, [])
        return {"relative_score": round(100 * sum(m / r for r, m in pairs) / len(pairs), 2),
                "reference_score": round(sum(r for r, _ in pairs) / len(pairs), 2),
                "model_score": round(sum(m for _, m in pairs) / len(pairs), 2)}

    overall = summary("all") if groups else dict.fromkeys(("relative_score", "reference_score", "model_score"))
    return {**overall,
            "relative_score_by_domain": {k[7:]: summary(k)["relative_score"] for k in sorted(groups)
                                         if k.startswith("domain:")},
            "relative_score_by_category": {k[9:]: summary(k)["relative_score"] for k in sorted(groups)
                                           if k.startswith("category:")},
            "judged": len(asked) - len(unparsed) - len(failed), "judge_unparsed": len(unparsed),
            "judge_unparsed_ids": unparsed, "judge_failed_ids": failed}, dict(stats)


PAIRWISE = (
    "You are a clinician comparing two AI assistants' answers to a question about a biomedical figure. You "
    "see the figure's caption and in-text mentions, the question, and the two answers. Judge helpfulness, "
    "relevance, accuracy against the figure description, and level of detail; the order of the answers must "
    "not matter. Explain briefly, then end with your verdict in exactly this form: [[A]] if answer A is "
    "better, [[B]] if answer B is better, [[C]] for a tie."
)
_VERDICT = re.compile(r"\[\[([ABC])\]\]")


def parse_verdict(reply: str) -> str | None:
    """'A', 'B' or 'C' when the reply gives exactly one verdict ([[A]] / [[B]] / [[C]]); None otherwise."""
    found = set(_VERDICT.findall(reply or ""))
    return found.pop() if len(found) == 1 else None


def pairwise_messages(caption: str, mentions: str, question: str, a: str, b: str) -> list[dict]:
    text = f"{figure_text(caption, [mentions])}\nQuestion: {question}\nAnswer A: {a}\nAnswer B: {b}"
    return [{"role": "system", "content": PAIRWISE}, {"role": "user", "content": text}]


def win_rate(items: list[dict], preds: dict[str, str], baseline: dict[str, str], client, log: AppendLog,
             sampling: dict | None = None) -> tuple[dict, dict]:
    """The model against baseline answers, each pair judged twice (model as A, then as B). A pair is a win or a
    loss only when both orders agree; otherwise a tie. A pair with an unparsed verdict is left out and listed.
    win_rate = (wins + ties / 2) / pairs. Returns (metrics, stats)."""
    asked = [it for it in items if uid(it) in preds and it["question_id"] in baseline]
    requests = []
    for it in asked:
        q, mine, theirs = uid(it), preds[uid(it)], baseline[it["question_id"]]
        requests += [(f"{q}:model-first", (it, mine, theirs)), (f"{q}:baseline-first", (it, theirs, mine))]

    def build(x):
        it, a, b = x
        return pairwise_messages(it["fig_caption"], it["fig_inline_mention"], it["text"], a, b)

    replies, stats, _ = client.run(Requests(requests, build), log, "pairwise", sampling or {}, lambda k, e: e["reply"],
                                   "evaluate:pairwise")
    outcome = {"A": "win", "B": "loss", "C": "tie"}  # of the model, when it is answer A
    flipped = {"A": "loss", "B": "win", "C": "tie"}
    counts, unparsed, position = Counter(), [], Counter()
    for it in asked:
        q = uid(it)
        first = parse_verdict(replies.get(f"{q}:model-first", ""))
        second = parse_verdict(replies.get(f"{q}:baseline-first", ""))
        if first is None or second is None:
            unparsed.append(q)
            continue
        position.update([first, second])  # how often the judge picks A / B / tie, whatever the order
        a, b = outcome[first], flipped[second]
        counts[a if a == b else "tie"] += 1
    n = sum(counts.values())
    return {"win_rate": round(100 * (counts["win"] + counts["tie"] / 2) / n, 2) if n else None,
            "wins": counts["win"], "losses": counts["loss"], "ties": counts["tie"], "pairs": n,
            "pairs_unparsed": len(unparsed), "pairs_unparsed_ids": unparsed,
            "judge_picked_first": position["A"], "judge_picked_second": position["B"]}, dict(stats)
