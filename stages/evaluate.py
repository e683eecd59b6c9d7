"""DVC stage `evaluate`: the tuned model and its untuned base on the same items of every eval set.

    dvc repro evaluate
    dvc exp run -S 'evaluate.eval_sets=[{name: eval, format: vital, path: examples/eval}]'
    dvc exp run -S evaluate.eval_root=/data/bench \
        -S 'evaluate.eval_sets=[{name: vqa_rad, format: huggingface, path: /data/bench/vqa-rad}, {name: slake,
            format: slake, path: /data/bench/slake}, {name: pathvqa, format: huggingface, path: /data/bench/path-vqa,
            domain: histology}]'
    OPENAI_API_KEY=... dvc exp run -S evaluate.backend=openai -S evaluate.model=gpt-4o      # a real judge

Per eval set: closed accuracy, open recall, token F1, exact match and the judge's open accuracy, each with n and
a 95% interval, for the tuned and the base model, and tuned minus base with a paired interval; the paper's win
rate (tuned vs base on the open questions, the judge seeing the image); on chat items LLaVA-Med's relative
score and a chat win rate. Prints the table; writes metrics/evaluate.json and metrics/evaluate_table.csv.
"""
import json
import time
from collections import Counter
from pathlib import Path

from common import image_store, load, model_client, params, write_metrics
import pandas as pd  # after common: a bad params.yaml stops before the heavy imports

from vital import evaluate, evalsets, tune
from vital.schema import CSV_FLOAT, AppendLog, CorpusRecord, read_jsonl, write_jsonl

CACHE = "data/cache/evaluate.jsonl"  # judge replies: a rerun pays for nothing twice


def load_sets(p: dict) -> list[evalsets.EvalData]:
    sets = []
    for spec in p["eval_sets"]:
        if spec["format"] == "sample":
            vqa, chat = evaluate.sample_eval_sets(load("data/corpus/records.jsonl", CorpusRecord))
            store = image_store()
            sets.append(evalsets.EvalData(spec["name"], "sample", [{**v, "dataset": spec["name"]} for v in vqa],
                                          chat, store.read))
        else:
            try:
                sets.append(evalsets.load(spec["name"], spec["format"], spec["path"], p["languages"],
                                          spec.get("domain")))
            except evalsets.EvalSetError as e:
                raise SystemExit(f"evaluate: {e}") from None
        if sets[-1].format != "llava_med":  # "chat" in the sample and in this repository's format: one per set
            sets[-1].chat = [{**c, "dataset": f"{spec['name']}_chat"} for c in sets[-1].chat]
    datasets = Counter(d for s in sets for d in {it["dataset"] for it in s.vqa + s.chat})
    twice = sorted(d for d, n in datasets.items() if n > 1)
    if twice:
        raise SystemExit(f"evaluate: dataset {', '.join(twice)} is in two eval sets; give each set its own name")
    return sets


def set_counts(s: evalsets.EvalData, path: str | None, skipped: list[dict], checked: set[Path]) -> dict:
    """What a set holds and what of it was evaluated; `decontaminated`: the decontaminate stages checked the
    release against this very folder (the sample is the training corpus itself: never)."""
    return {"format": s.format, "closed_rule": s.closed_rule, "items": len(s.vqa) + len(s.chat),
            "closed": sum(v["answer_type"].upper() == "CLOSED" for v in s.vqa if "answer_type" in v),
            "open": sum(v["answer_type"].upper() == "OPEN" for v in s.vqa if "answer_type" in v),
            "chat": len(s.chat),
            "left_out": dict(Counter(x["reason"] for x in s.left_out)),
            "skipped_images": len(skipped),  # missing or unreadable: their ids in data/eval/skipped.jsonl
            "decontaminated": path is not None and Path(path).resolve() in checked}


def main():
    t0, p = time.time(), params("evaluate")
    sets = load_sets(p)
    d = params("decontaminate")
    checked = {(Path(d["eval_root"]) / name).resolve() for name in d["eval_sets"]}
    vqa = [it for s in sets for it in s.vqa]
    chat = [it for s in sets for it in s.chat]
    write_jsonl("data/eval/vqa.jsonl", vqa)
    write_jsonl("data/eval/chat.jsonl", chat)
    try:
        device = tune.resolve_device(p["device"])
    except ValueError as e:
        raise SystemExit(f"params.yaml evaluate.device: {e}") from None
    model, processor = tune.load_tuned(Path("models/vlm"), device)

    def answer_all():
        preds, skipped, per_set = {}, [], {}
        for s in sets:
            a, x = evaluate.answer_questions(model, processor, s.vqa, s.read, p["max_new_tokens"])
            b, y = evaluate.answer_questions(model, processor, s.chat, s.read, p["chat_max_new_tokens"])
            preds.update(a | b)
            skipped += x + y
            per_set[s.name] = x + y
        return preds, skipped, per_set

    preds, unanswered, skipped_by_set = answer_all()
    base_preds = {}
    if p["base_model"]:
        with model.disable_adapter():  # the same weights without the LoRA adapter: the untuned base
            base_preds, _, _ = answer_all()
    answers = [{"id": k, "model": "tuned", "answer": v} for k, v in preds.items()]
    answers += [{"id": k, "model": "base", "answer": v} for k, v in base_preds.items()]
    write_jsonl("data/eval/answers.jsonl", answers)

    rows, vqa_skipped = evaluate.vqa_scores(vqa, preds)
    write_jsonl("data/eval/skipped.jsonl", unanswered + vqa_skipped)
    sampling = {"temperature": p["temperature"], "max_tokens": p["max_tokens"]}
    chat_baseline, against = {c["question_id"]: c["gpt4_answer"] for c in chat}, "the reference (gpt4_answer) answers"
    others = {"base": base_preds} if base_preds else {}  # what the tuned model is compared with, by item id
    if p["baseline_answers"]:  # {question_id, answer}: chat; {dataset, question_id, answer}: any item
        given = list(read_jsonl(p["baseline_answers"]))
        chat_baseline = {b["question_id"]: b["answer"] for b in given if "dataset" not in b}
        against = p["baseline_answers"]
        others["baseline"] = {evaluate.uid(b): b["answer"] for b in given if "dataset" in b}
    with model_client("evaluate", p, batch=False) as (judge, _):
        log = lambda: AppendLog(CACHE)  # noqa: E731 - each client.run closes the log it is given
        graded, ungraded, st = evaluate.judge_open(vqa, preds, judge, log(), "tuned", sampling)
        problems = [{"id": i, "model": "tuned", "problem": "no [[correct]]/[[incorrect]] verdict"} for i in ungraded]
        stats, compared = [st], {}
        for who, answers in others.items():
            if not answers:
                continue
            their_rows, _ = evaluate.vqa_scores(vqa, answers)
            their_graded, ungraded, st = evaluate.judge_open(vqa, answers, judge, log(), who, sampling)
            stats.append(st)
            problems += [{"id": i, "model": who, "problem": "no [[correct]]/[[incorrect]] verdict"} for i in ungraded]
            wins = {}
            for s in sets:
                if any(v["answer_type"].upper() == "OPEN" and evaluate.uid(v) in answers for v in s.vqa):
                    wins[s.name], st = evaluate.vqa_win_rate(s.vqa, preds, answers, s.read, judge, log(), sampling)
                    stats.append(st)
                    problems += [{"id": i, "model": who, "problem": "no [[A]]/[[B]]/[[C]] verdict in both orders "
                                  "(open VQA)"} for i in wins[s.name].pop("pairs_unparsed_ids")]
            compared[who] = {"table": evaluate.vqa_tables(their_rows, their_graded),
                             "diff": evaluate.differences(rows, their_rows, graded, their_graded), "wins": wins}
        chat_m, st = evaluate.judge_chat(chat, preds, judge, log(), sampling)
        win_m, win_st = evaluate.win_rate(chat, preds, chat_baseline, judge, log(), sampling)
        stats += [st, win_st]

    problems += [{"id": i, "problem": "judge reply without two scores on its first line"}
                 for i in chat_m.pop("judge_unparsed_ids")]
    problems += [{"id": i, "problem": "judge request failed"} for i in chat_m.pop("judge_failed_ids")]
    problems += [{"id": i, "problem": "no [[A]]/[[B]]/[[C]] verdict in both orders (chat)"}
                 for i in win_m.pop("pairs_unparsed_ids")]
    write_jsonl("data/eval/judge_problems.jsonl", problems)  # every id; the metrics hold the counts

    info = json.loads(Path("models/vlm/model_info.json").read_text())
    tuned_t = evaluate.vqa_tables(rows, graded)
    heuristic = judge.name == "offline"
    metrics = {"model": info["label"], "judge": f"{judge.name}:{judge.model}",
               "judge_kind": ("offline heuristic (word overlap and a rubric): checks the pipeline only, not a "
                              "measure of model quality" if heuristic else "LLM judge"),
               "sets": {s.name: set_counts(s, spec.get("path"), skipped_by_set[s.name], checked)
                        for s, spec in zip(sets, p["eval_sets"])},
               **{k: tuned_t.get("all", {}).get(k) for k in ("closed_accuracy", "open_recall")},
               "tuned": tuned_t,
               **{k: v for who, c in compared.items() for k, v in ((who, c["table"]), (f"tuned_minus_{who}", c["diff"]),
                                                                  (f"vqa_win_rate_vs_{who}", c["wins"]))},
               "skipped": len(unanswered) + len(vqa_skipped), "skipped_examples": (unanswered + vqa_skipped)[:5],
               "chat": {**chat_m, **win_m, "win_rate_against": against},
               "judge_requests": sum(s.get("requests", 0) for s in stats),
               "judge_cached": sum(s.get("cached", 0) for s in stats),
               "judge_failed": sum(s.get("failed", 0) for s in stats)}
    table = table_rows(tuned_t, compared)
    pd.DataFrame(table).to_csv("metrics/evaluate_table.csv", index=False, float_format=CSV_FLOAT)
    tables = {"tuned": tuned_t, **{who: c["table"] for who, c in compared.items()}}
    by_domain = [{"group": g, **{f"{who}_{k}": (t.get(g, {}).get(k) or {}).get(v) for who, t in tables.items()
                                 for k, v in (("closed_accuracy", "rate"), ("open_recall", "mean"))}}
                 for g in tuned_t if "/" in g]  # dataset/domain: the plot
    pd.DataFrame(by_domain).to_csv("metrics/evaluate_by_domain.csv", index=False, float_format=CSV_FLOAT)
    print_table(table, compared, metrics)
    write_metrics("evaluate", metrics, t0)


METRICS = [("closed_accuracy", "rate"), ("open_recall", "mean"), ("open_token_f1", "mean"),
           ("open_exact_match", "rate"), ("open_judged_accuracy", "rate")]


def table_rows(tuned: dict, compared: dict) -> list[dict]:
    """One row per group (all, dataset, dataset/domain), metric and comparison (base, baseline): n, tuned and the
    other with 95% intervals, and tuned - other with its paired interval (all and datasets); shares in [0, 1]."""
    out = []
    for who, c in compared.items() or [("none", {"table": {}, "diff": {}})]:
        for group in tuned:
            for metric, key in METRICS:
                t = tuned[group][metric]
                if not t["n"]:
                    continue
                o, d = c["table"].get(group, {}).get(metric, {}), c["diff"].get(group, {}).get(metric, {})
                out.append({"group": group, "metric": metric, "n": t["n"],
                            "tuned": t[key], "tuned_low": t["low"], "tuned_high": t["high"], "other": who,
                            "other_n": o.get("n"), "other_value": o.get(key), "other_low": o.get("low"),
                            "other_high": o.get("high"), "diff_n": d.get("n"), "diff": d.get("diff"),
                            "diff_low": d.get("low"), "diff_high": d.get("high")})
    return out


def print_table(table: list[dict], compared: dict, metrics: dict) -> None:
    """The sets, then per comparison (tuned vs base, vs the baseline answers) overall and per dataset (the
    per-domain rows are in metrics/evaluate_table.csv)."""
    def cell(x, low, high, sign=""):
        return "-" if x is None else f"{100 * x:{sign}.1f} [{100 * low:{sign}.1f}, {100 * high:{sign}.1f}]"

    print(f"[evaluate] model: {metrics['model']}\n[evaluate] judge: {metrics['judge']}, {metrics['judge_kind']}")
    for name, c in metrics["sets"].items():
        print(f"[evaluate] set {name} ({c['format']}): {c['items']} items: {c['closed']} closed, {c['open']} open, "
              f"{c['chat']} chat; left out {c['left_out'] or 0}; images skipped {c['skipped_images']}\n"
              f"[evaluate]   {c['closed_rule']}"
              + ("" if c["decontaminated"] else "; the training corpus itself: a pipeline check" if
                 c["format"] == "sample" else "; NOT in decontaminate.eval_sets: the release was not checked against it"))
    single = len({r["group"] for r in table if "/" not in r["group"]}) == 2  # "all" is then that one dataset
    for who in dict.fromkeys(r["other"] for r in table):
        alone = who == "none"  # evaluate.base_model false and no baseline answers
        print(f"{'group':<16} {'metric':<21} {'n':>5}  {'tuned % [95% CI]':<22}"
              + ("" if alone else f" {who + ' % [95% CI]':<22} tuned - {who} [95% CI] (n)"))
        for r in table:
            if r["other"] == who and "/" not in r["group"] and not (single and r["group"] == "all"):
                print(f"{r['group']:<16} {r['metric']:<21} {r['n']:>5}  "
                      f"{cell(r['tuned'], r['tuned_low'], r['tuned_high']):<22}"
                      + ("" if alone else f" {cell(r['other_value'], r['other_low'], r['other_high']):<22} "
                         f"{cell(r['diff'], r['diff_low'], r['diff_high'], '+')} ({r['diff_n'] or 0})"))
        for name, w in compared.get(who, {}).get("wins", {}).items():
            print(f"win rate {name} (open questions, tuned vs {who}, the judge sees the image): {w['win_rate']} "
                  f"[{w['win_rate_low']}, {w['win_rate_high']}] over {w['pairs']} pairs "
                  f"({w['wins']} won, {w['ties']} tied, {w['losses']} lost)")
    chat = metrics["chat"]
    if chat.get("pairs"):
        print(f"chat: relative score {chat['relative_score']} [{chat['relative_score_low']}, "
              f"{chat['relative_score_high']}] (n {chat['judged']}); win rate {chat['win_rate']} "
              f"[{chat['win_rate_low']}, {chat['win_rate_high']}] against {chat['win_rate_against']} over "
              f"{chat['pairs']} pairs")


if __name__ == "__main__":
    main()
