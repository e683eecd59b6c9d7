"""Stage `evaluate`: the tuned model (and its untuned base, or another model's answers) on the eval sets.

- VQA (VQA-RAD, SLAKE, PathVQA; vital.evalsets reads their files): closed accuracy (yes/no extracted from the
  reply), open recall (the share of the reference answer's words in the reply), token F1, exact match, and
  the judge's open accuracy (question, ground truth, answer: [[correct]] / [[incorrect]]), per dataset and
  domain, each with its n and a 95% interval (vital.stats); tuned minus the other side as a paired bootstrap.
- The paper's win rate, on the open questions: the judge sees the image, the question, the ground truth and
  two answers and ends with [[A]], [[B]] or [[C]] (tie), parsed exactly; each pair is judged in both orders
  and counts as a win or a loss only when both orders agree (otherwise a tie), which cancels position bias.
- Open visual chat (LLaVA-Med's): a judge reads the caption and mentions, the question, the reference answer
  and the model's, and scores both 1-10 in one reply; the relative score is 100 * the mean over questions of
  model / reference, overall, per domain and per question type; and a chat win rate against baseline answers.
- `export`: the answers in the layouts lmms-eval and MedEvalKit score.

Judge requests go through the shared client and its request cache (data/cache/evaluate.jsonl): a rerun
pays for nothing twice. `sample_eval_sets` writes a small VQA and chat set from the corpus for the
embedded default (a pipeline check: it is the training corpus).
"""
from __future__ import annotations

import io
import re
from collections import Counter, defaultdict

import torch
from PIL import Image

from .llm.backends import image_part
from .llm.client import Requests
from .evalsets import uid
from .generate import figure_text
from .images import ImageStore
from .llm.offline import qa_from_text
from .schema import AppendLog, CorpusRecord
from .stats import mean_interval, paired_difference, rate
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


def answer_questions(model, processor, items: list[dict], images, max_new_tokens: int) -> tuple[dict[str, str], list[dict]]:
    """The model's answer per question id, and the items skipped with why (an image that is missing or that
    the processor rejects). `images`: an ImageStore, its folder, or a function of an item's `image` to bytes."""
    tok = processor.tokenizer
    read = images if callable(images) else ImageStore.of(images).read
    out, skipped = {}, []
    with torch.no_grad():
        for it in items:
            try:
                with Image.open(io.BytesIO(read(it["image"]))) as im:
                    enc = processor(images=[im.convert("RGB")], text=[prompt(processor, it["text"])],
                                    add_special_tokens=False, truncation=False, return_tensors="pt")
            except (OSError, KeyError, ValueError) as e:  # missing (OSError, KeyError) or unreadable image
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


def vqa_scores(items: list[dict], preds: dict[str, str]) -> tuple[list[dict], list[dict]]:
    """One row per answered VQA item: {id, dataset, domain, kind, correct (closed), recall, f1, exact (open)};
    and the items skipped (unknown answer_type) with why. Closed: yes/no read from the reply (another closed
    answer, "CT or MRI?": all its words in the reply). Open: recall = share of the reference's words in the reply
    (LLaVA-Med's open metric), token F1, exact match of the words."""
    rows, skipped = [], []
    for it in items:
        key, kind = uid(it), str(it.get("answer_type", "")).upper()
        if kind not in ("CLOSED", "OPEN"):
            skipped.append({"id": key, "reason": f"unknown answer_type {it.get('answer_type')!r}; use CLOSED or OPEN"})
            continue
        if key not in preds:  # its image was skipped when answering
            continue
        pred, ref = preds[key], str(it["answer"])
        ref_tokens, pred_tokens = _tokens(ref), _tokens(pred)
        row = {"id": key, "dataset": it["dataset"], "domain": it.get("domain") or "other", "kind": kind.lower()}
        if kind == "CLOSED":
            row["correct"] = (closed_answer(pred) == ref_tokens[0] if ref_tokens in (["yes"], ["no"])
                              else bool(ref_tokens) and set(ref_tokens) <= set(pred_tokens))
        else:
            row.update(recall=len(set(ref_tokens) & set(pred_tokens)) / len(set(ref_tokens)) if ref_tokens else 0.0,
                       f1=token_f1(pred, ref), exact=pred_tokens == ref_tokens)
        rows.append(row)
    return rows, skipped


def vqa_summary(rows: list[dict], judged: dict[str, bool] | None = None) -> dict:
    """The field's numbers for a group of vqa_scores rows, each with its n and 95% interval: closed accuracy
    (Wilson), open recall and token F1 (bootstrap), open exact match and the judge's open accuracy (Wilson)."""
    closed = [r for r in rows if r["kind"] == "closed"]
    open_ = [r for r in rows if r["kind"] == "open"]
    verdicts = [judged[r["id"]] for r in open_ if judged and judged.get(r["id"]) is not None]
    return {"closed_accuracy": rate(sum(r["correct"] for r in closed), len(closed)),
            "open_recall": mean_interval([r["recall"] for r in open_]),
            "open_token_f1": mean_interval([r["f1"] for r in open_]),
            "open_exact_match": rate(sum(r["exact"] for r in open_), len(open_)),
            "open_judged_accuracy": rate(sum(verdicts), len(verdicts))}


def vqa_tables(rows: list[dict], judged: dict[str, bool] | None = None) -> dict:
    """vqa_summary overall ("all"), per dataset, and per dataset and domain ("dataset/domain")."""
    groups = defaultdict(list)
    for r in rows:
        for key in ("all", r["dataset"], f"{r['dataset']}/{r['domain']}"):
            groups[key].append(r)
    return {k: vqa_summary(g, judged) for k, g in sorted(groups.items(), key=lambda kv: (kv[0] != "all", kv[0]))}


ITEM_VALUE = {  # metric: (the questions it is over, an item's value: 0..1, None to leave it out)
    "closed_accuracy": ("closed", lambda r, judged: float(r["correct"])),
    "open_recall": ("open", lambda r, judged: r["recall"]),
    "open_token_f1": ("open", lambda r, judged: r["f1"]),
    "open_exact_match": ("open", lambda r, judged: float(r["exact"])),
    "open_judged_accuracy": ("open", lambda r, judged: None if judged.get(r["id"]) is None else float(judged[r["id"]])),
}


def differences(tuned: list[dict], base: list[dict], tuned_judged: dict | None = None,
                base_judged: dict | None = None) -> dict:
    """Tuned minus base, overall ("all") and per dataset, on the items both answered: every metric of
    vqa_summary as a paired bootstrap interval of the per-item difference."""
    by_id = {r["id"]: r for r in base}
    pairs = [(r, by_id[r["id"]]) for r in tuned if r["id"] in by_id]
    out = {}
    for group in ["all"] + sorted({a["dataset"] for a, _ in pairs}):
        out[group] = {}
        for metric, (kind, value) in ITEM_VALUE.items():
            values = [(value(a, tuned_judged or {}), value(b, base_judged or {})) for a, b in pairs
                      if a["kind"] == kind and group in ("all", a["dataset"])]
            values = [(x, y) for x, y in values if x is not None and y is not None]
            out[group][metric] = paired_difference([x for x, _ in values], [y for _, y in values])
    return out


GRADER = (
    "You are a clinician grading an AI assistant's answer to a question about a medical image. You are given the "
    "question, the ground-truth answer and the assistant's answer. The answer is correct when it states the same "
    "finding as the ground truth (other words, more detail or a synonym are fine); it is incorrect when it states "
    "another finding, contradicts the ground truth or does not answer. Explain in one sentence, then end with "
    "exactly one verdict: [[correct]] or [[incorrect]]."
)
_GRADE = re.compile(r"\[\[(correct|incorrect)\]\]", re.I)


def parse_grade(reply: str) -> bool | None:
    """True / False when the reply gives exactly one verdict ([[correct]] / [[incorrect]]); None otherwise."""
    verdict = only_tag(_GRADE, reply)
    return None if verdict is None else verdict.lower() == "correct"


def only_tag(pattern: re.Pattern, reply: str) -> str | None:
    """The one verdict tag the reply gives (repeating it is fine, two different ones are not); else None."""
    found = {m.lower() for m in pattern.findall(reply or "")}
    return next(m for m in pattern.findall(reply)) if len(found) == 1 else None


def grade_messages(question: str, truth: str, answer: str) -> list[dict]:
    text = f"Question: {question}\nGround truth: {truth}\nAnswer: {answer}"
    return [{"role": "system", "content": GRADER}, {"role": "user", "content": text}]


def judge_open(items: list[dict], preds: dict[str, str], client, log: AppendLog, tag: str,
               sampling: dict | None = None) -> tuple[dict[str, bool | None], list[str], dict]:
    """The judge's verdict on each answered open VQA question (question, ground truth and answer: no image, as
    the field's LLM-judged accuracy): {id: True/False/None (no verdict)}, the ids without a verdict, stats.
    `tag` keeps the cache keys of two models' answers apart."""
    asked = [it for it in items if uid(it) in preds and str(it.get("answer_type", "")).upper() == "OPEN"]
    requests = Requests([(f"{uid(it)}:{tag}", it) for it in asked],
                        lambda it: grade_messages(it["text"], str(it["answer"]), preds[uid(it)]))
    replies, stats, _ = client.run(requests, log, "grade", sampling or {}, lambda k, e: e["reply"], "evaluate:grade")
    verdicts = {uid(it): parse_grade(replies.get(f"{uid(it)}:{tag}", "")) for it in asked}
    return verdicts, [k for k, v in verdicts.items() if v is None], dict(stats)


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

    keys = ("relative_score", "relative_score_low", "relative_score_high", "reference_score", "model_score")
    overall = dict.fromkeys(keys)
    if groups:
        ratios = mean_interval([m / r for r, m in groups["all"]])  # the interval: a bootstrap over questions
        overall = {**summary("all"), "relative_score_low": round(100 * ratios["low"], 2),
                   "relative_score_high": round(100 * ratios["high"], 2)}
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
    return only_tag(_VERDICT, reply)


def pairwise_messages(caption: str, mentions: str, question: str, a: str, b: str) -> list[dict]:
    text = f"{figure_text(caption, [mentions])}\nQuestion: {question}\nAnswer A: {a}\nAnswer B: {b}"
    return [{"role": "system", "content": PAIRWISE}, {"role": "user", "content": text}]


def win_rate(items: list[dict], preds: dict[str, str], baseline: dict[str, str], client, log: AppendLog,
             sampling: dict | None = None) -> tuple[dict, dict]:
    """The open-chat comparison: the model against baseline answers, the judge reading the caption and mentions
    (not the image). See `both_orders`. Returns (metrics, stats)."""
    asked = [it for it in items if uid(it) in preds and it["question_id"] in baseline]

    def build(it, a, b):
        return pairwise_messages(it["fig_caption"], it["fig_inline_mention"], it["text"], a, b)

    return both_orders(asked, preds, {uid(it): baseline[it["question_id"]] for it in asked}, build, client, log,
                       "pairwise", "evaluate:pairwise", sampling)


VQA_PAIRWISE = (
    "Please act as an impartial judge of two AI assistants' answers to a question about the medical image shown. "
    "You are given the image, the question, the ground-truth answer and the two answers. Compare both answers "
    "with the ground truth and the image; judge correctness first, then helpfulness. The order of the answers, "
    "their length and the assistants' names must not influence you. Explain briefly, then end with your verdict "
    "in exactly this form: [[A]] if answer A is better, [[B]] if answer B is better, [[C]] for a tie."
)


def vqa_pairwise_messages(image: bytes, question: str, truth: str, a: str, b: str, max_side: int = 768) -> list[dict]:
    """The paper's win-rate request: the image as an image part, then the question, ground truth and answers."""
    text = f"Question: {question}\nGround truth: {truth}\nAnswer A: {a}\nAnswer B: {b}"
    return [{"role": "system", "content": VQA_PAIRWISE},
            {"role": "user", "content": [image_part(image, max_side), {"type": "text", "text": text}]}]


def vqa_win_rate(items: list[dict], preds: dict[str, str], other: dict[str, str], read, client, log: AppendLog,
                 sampling: dict | None = None) -> tuple[dict, dict]:
    """The paper's win rate, on the open questions of a VQA set: the judge sees the image, the question, the
    ground truth and both answers (model vs `other`, by id), each pair in both orders (`both_orders`)."""
    asked = [it for it in items if str(it.get("answer_type", "")).upper() == "OPEN"
             and uid(it) in preds and uid(it) in other]

    def build(it, a, b):
        return vqa_pairwise_messages(read(it["image"]), it["text"], str(it["answer"]), a, b)

    return both_orders(asked, preds, other, build, client, log, "pairwise", "evaluate:vqa_pairwise", sampling)


def both_orders(asked: list[dict], preds: dict[str, str], other: dict[str, str], build, client, log: AppendLog,
                task: str, desc: str, sampling: dict | None = None) -> tuple[dict, dict]:
    """Each pair judged twice (model as A, then as B). A pair is a win or a loss only when both orders agree;
    otherwise a tie (which cancels position bias). A pair with an unparsed verdict is left out and listed.
    win_rate = (wins + ties / 2) / pairs, with a bootstrap interval over pairs; wins and losses as shares with
    Wilson intervals. Returns (metrics, stats)."""
    requests = []
    for it in asked:
        q, mine, theirs = uid(it), preds[uid(it)], other[uid(it)]
        requests += [(f"{q}:model-first", (it, mine, theirs)), (f"{q}:baseline-first", (it, theirs, mine))]
    replies, stats, _ = client.run(Requests(requests, lambda x: build(*x)), log, task, sampling or {},
                                   lambda k, e: e["reply"], desc)
    outcome = {"A": "win", "B": "loss", "C": "tie"}  # of the model, when it is answer A
    flipped = {"A": "loss", "B": "win", "C": "tie"}
    counts, unparsed, position, points = Counter(), [], Counter(), []
    for it in asked:
        q = uid(it)
        first = parse_verdict(replies.get(f"{q}:model-first", ""))
        second = parse_verdict(replies.get(f"{q}:baseline-first", ""))
        if first is None or second is None:
            unparsed.append(q)
            continue
        position.update([first, second])  # how often the judge picks A / B / tie, whatever the order
        a, b = outcome[first], flipped[second]
        result = a if a == b else "tie"
        counts[result] += 1
        points.append({"win": 1.0, "tie": 0.5, "loss": 0.0}[result])
    n = len(points)
    interval = mean_interval(points)
    return {"win_rate": round(100 * interval["mean"], 2) if n else None,
            "win_rate_low": round(100 * interval["low"], 2) if n else None,
            "win_rate_high": round(100 * interval["high"], 2) if n else None,
            "wins": counts["win"], "losses": counts["loss"], "ties": counts["tie"], "pairs": n,
            "win_share": rate(counts["win"], n), "loss_share": rate(counts["loss"], n),
            "pairs_unparsed": len(unparsed), "pairs_unparsed_ids": unparsed,
            "judge_picked_first": position["A"], "judge_picked_second": position["B"]}, dict(stats)


# ------------------------------------------------------------------ exports for the evaluation harnesses

EXPORTS = ("lmms-eval", "medevalkit")


def export(items: list[dict], answers: dict[str, str], fmt: str) -> dict[str, list[dict]]:
    """Predictions and references in a layout a harness scores with its own code, {file name: rows}:
    - lmms-eval: its SLAKE task's samples (`{doc_id, doc, target, resps, filtered_resps}` per line, `doc` the
      SLAKE row: qid, question, answer, answer_type, q_lang, modality, content_type, img_name), which
      `lmms_eval/tasks/slake/utils.py` scores (slake_process_results, slake_aggregate_*); lmms-eval has a SLAKE
      task only, so only SLAKE-format sets are written;
    - medevalkit: per dataset the rows its datasets' `cal_metrics` reads (`question`, `answer`, `response`,
      and `answer_type`, `lang` for SLAKE; closed = a yes/no answer for VQA-RAD and PathVQA).
    Items without an answer (a skipped image) are left out."""
    if fmt not in EXPORTS:
        raise ValueError(f"export format {fmt!r}; choose one of {', '.join(EXPORTS)}")
    out: dict[str, list[dict]] = defaultdict(list)
    for it in items:
        if uid(it) not in answers:
            continue
        pred = answers[uid(it)]
        if fmt == "lmms-eval":
            if "content_type" not in it:  # not read from a SLAKE test.json
                continue
            doc = {"qid": it["question_id"], "img_name": it["img_name"], "question": it["text"],
                   "answer": it["answer"], "answer_type": it["answer_type"], "q_lang": it["lang"],
                   "modality": it["modality"], "content_type": it["content_type"]}
            rows = out[f"{it['dataset']}_samples_slake_en.jsonl"]
            rows.append({"doc_id": len(rows), "doc": doc, "target": it["answer"], "resps": [[pred]],
                         "filtered_resps": [pred]})
        else:
            row = {"id": it["question_id"], "question": it["text"], "answer": it["answer"], "response": pred,
                   "answer_type": it["answer_type"]}
            if "lang" in it:
                row["lang"] = it["lang"]
            out[f"{it['dataset']}_results.json"].append(row)
    return dict(out)
