"""DVC stage `evaluate`: VQA closed accuracy / open recall and judge-scored open chat for the tuned model.

    dvc repro evaluate
"""
import json
import time
from pathlib import Path

import pandas as pd
from common import image_store, load, params, write_metrics

from vital import evaluate, tune
from vital.client import Client, ClientConfig
from vital.schema import CorpusRecord, read_jsonl, write_jsonl


def main():
    t0, p = time.time(), params("evaluate")
    if p["eval_sets"] == "sample":
        vqa, chat = evaluate.sample_eval_sets(load("data/corpus/records.jsonl", CorpusRecord))
        images = image_store()
    else:
        vqa = list(read_jsonl(Path(p["eval_sets"]) / "vqa.jsonl"))
        chat = list(read_jsonl(Path(p["eval_sets"]) / "chat.jsonl"))
        images = image_store(Path(p["eval_sets"]) / "images")
    write_jsonl("data/eval/vqa.jsonl", vqa)
    write_jsonl("data/eval/chat.jsonl", chat)
    model, processor = tune.load_tuned(Path("models/vlm"))
    preds = evaluate.answer_questions(model, processor, vqa + chat, images, p["max_new_tokens"])
    write_jsonl("data/eval/answers.jsonl", [{"question_id": k, "answer": v} for k, v in preds.items()])
    judge = Client(ClientConfig(backend=p["judge_backend"]))
    info = json.loads(Path("models/vlm/model_info.json").read_text())
    metrics = {"model": info["label"], "judge": judge.name,
               **evaluate.vqa_metrics(vqa, preds), **evaluate.judge_chat(chat, preds, judge, images)}
    rows = [{"domain": d, **evaluate.vqa_metrics([v for v in vqa if v["domain"] == d], preds),
             "relative_score": metrics["relative_score_by_domain"].get(d)} for d in sorted({v["domain"] for v in vqa})]
    pd.DataFrame(rows).to_csv("metrics/evaluate_by_domain.csv", index=False)
    write_metrics("evaluate", metrics, t0)


if __name__ == "__main__":
    main()
