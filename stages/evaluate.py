"""DVC stage `evaluate`: VQA (per dataset), judge-scored open chat and a pairwise win rate for the tuned model.

    dvc repro evaluate
    dvc exp run -S evaluate.eval_sets=folder -S evaluate.eval_dir=/data/llava-med-eval     # your eval files
    OPENAI_API_KEY=... dvc exp run -S evaluate.backend=openai -S evaluate.model=gpt-4o      # a real judge
"""
import json
import time
from pathlib import Path

from common import image_store, load, model_client, params, write_metrics
import pandas as pd  # after common: a bad params.yaml stops before the heavy imports

from vital import evaluate, tune
from vital.schema import CSV_FLOAT, AppendLog, CorpusRecord, read_jsonl, write_jsonl

CACHE = "data/cache/evaluate.jsonl"  # judge replies: a rerun pays for nothing twice


def main():
    t0, p = time.time(), params("evaluate")
    folder = Path(p["eval_dir"])
    if p["eval_sets"] == "sample":
        vqa, chat = evaluate.sample_eval_sets(load("data/corpus/records.jsonl", CorpusRecord))
        images = image_store()
    else:  # folder
        try:
            vqa, chat = evaluate.load_eval_sets(folder)
        except (FileNotFoundError, ValueError) as e:
            raise SystemExit(f"evaluate: {e}") from None
        images = image_store(folder / "images")
    baseline_file = folder / "baseline_answers.jsonl"
    if p["eval_sets"] == "folder" and baseline_file.exists():
        baseline, against = {b["question_id"]: b["answer"] for b in read_jsonl(baseline_file)}, str(baseline_file)
    else:
        baseline, against = {c["question_id"]: c["gpt4_answer"] for c in chat}, "the reference (gpt4_answer) answers"
    write_jsonl("data/eval/vqa.jsonl", vqa)
    write_jsonl("data/eval/chat.jsonl", chat)
    try:
        device = tune.resolve_device(p["device"])
    except ValueError as e:
        raise SystemExit(f"params.yaml evaluate.device: {e}") from None
    model, processor = tune.load_tuned(Path("models/vlm"), device)
    preds, unanswered = evaluate.answer_questions(model, processor, vqa, images, p["max_new_tokens"])
    chat_preds, chat_unanswered = evaluate.answer_questions(model, processor, chat, images, p["chat_max_new_tokens"])
    preds, unanswered = {**preds, **chat_preds}, unanswered + chat_unanswered
    write_jsonl("data/eval/answers.jsonl", [{"id": k, "answer": v} for k, v in preds.items()])
    vqa_m, vqa_skipped = evaluate.vqa_metrics(vqa, preds)
    write_jsonl("data/eval/skipped.jsonl", unanswered + vqa_skipped)
    sampling = {"temperature": p["temperature"], "max_tokens": p["max_tokens"]}
    with model_client("evaluate", p, batch=False) as (judge, _):
        chat_m, chat_stats = evaluate.judge_chat(chat, preds, judge, AppendLog(CACHE), sampling)
        win_m, win_stats = evaluate.win_rate(chat, preds, baseline, judge, AppendLog(CACHE), sampling)
    problems = [{"id": i, "problem": "judge reply without two scores on its first line"}
                for i in chat_m.pop("judge_unparsed_ids")]
    problems += [{"id": i, "problem": "judge request failed"} for i in chat_m.pop("judge_failed_ids")]
    problems += [{"id": i, "problem": "no [[A]]/[[B]]/[[C]] verdict in both orders"}
                 for i in win_m.pop("pairs_unparsed_ids")]
    write_jsonl("data/eval/judge_problems.jsonl", problems)  # every id; the metrics hold the counts
    info = json.loads(Path("models/vlm/model_info.json").read_text())
    metrics = {"model": info["label"], "judge": f"{judge.name}:{judge.model}", **vqa_m,
               "skipped": len(unanswered) + len(vqa_skipped), "skipped_examples": (unanswered + vqa_skipped)[:5],
               **chat_m, **win_m, "win_rate_against": against,
               "judge_requests": chat_stats["requests"] + win_stats["requests"],
               "judge_cached": chat_stats["cached"] + win_stats["cached"],
               "judge_failed": chat_stats["failed"] + win_stats["failed"]}
    rows = []
    for d in sorted({v.get("domain", "other") for v in vqa} | set(metrics["relative_score_by_domain"])):
        m = evaluate.vqa_metrics([v for v in vqa if v.get("domain", "other") == d], preds)[0]
        m.pop("by_dataset")
        rows.append({"domain": d, **m, "relative_score": metrics["relative_score_by_domain"].get(d)})
    pd.DataFrame(rows).to_csv("metrics/evaluate_by_domain.csv", index=False, float_format=CSV_FLOAT)
    write_metrics("evaluate", metrics, t0)


if __name__ == "__main__":
    main()
