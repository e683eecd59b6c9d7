"""DVC stage `decontaminate`: no figure of an evaluation test set reaches a paid request or the release.

    dvc repro decontaminate
    dvc exp run -S decontaminate.eval_root=data/eval_sets -S 'decontaminate.eval_sets=[vqa_rad,slake,pathvqa]'

Matches every figure of data/corpus/unique.jsonl (`dedup`) against the images and captions of the eval sets
(src/vital/decontaminate.py) and writes the clean corpus, data/corpus/records.jsonl, that every later stage
reads; each match is a row of data/corpus/contamination.csv (`decontaminate_qa` adds the generated rounds'
matches and writes the release's report).
"""
import time
from pathlib import Path

from common import load, params, write_metrics
import pandas as pd  # after common: a bad params.yaml stops before the heavy imports

from vital.decontaminate import REPORT_COLUMNS, EvalSetError, counts, figure_matches, read_eval_set
from vital.schema import CSV_FLOAT, CorpusRecord, write_jsonl


def main():
    t0, p = time.time(), params("decontaminate")
    records = load("data/corpus/unique.jsonl", CorpusRecord)
    hashes = pd.read_parquet("data/corpus/hashes.parquet").set_index("id").loc[[r.id for r in records]]
    try:
        sets = [read_eval_set(Path(p["eval_root"]) / name) for name in p["eval_sets"]]
    except EvalSetError as e:
        raise SystemExit(f"decontaminate: {e}") from None
    rows = figure_matches([r.id for r in records], list(hashes["pixels"]), hashes["phash"].to_numpy(),
                          [r.caption for r in records], sets, p["phash_distance"], p["caption_jaccard"])
    pd.DataFrame(rows, columns=REPORT_COLUMNS).to_csv("data/corpus/contamination.csv", index=False,
                                                      float_format=CSV_FLOAT)
    removed = {r["id"] for r in rows}
    clean = [r for r in records if r.id not in removed]
    if not clean:
        raise SystemExit(f"decontaminate: every one of the {len(records)} figures matches an eval set; see "
                         "data/corpus/contamination.csv and the decontaminate.* thresholds")
    write_jsonl("data/corpus/records.jsonl", clean)
    write_metrics("decontaminate", {"figures": len(records), "removed": len(removed), "kept": len(clean),
                                    "thresholds": {k: p[k] for k in ("phash_distance", "caption_jaccard")},
                                    "by_eval_set": counts(rows, sets)}, t0)


if __name__ == "__main__":
    main()
