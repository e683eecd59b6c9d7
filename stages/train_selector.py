"""DVC stage `train_selector`: MLP over frozen MiniLM text + image features, pairwise hinge loss.

    dvc repro train_selector
    dvc exp run -S train_selector.margin=0.5 -S train_selector.epochs=50
"""
import time
from pathlib import Path

import pandas as pd
from common import CORPUS_IMAGES, EMBEDDINGS, load, params, write_metrics

from vital import selector
from vital.schema import Conversation, CorpusRecord, PoolItem


def main():
    t0, p = time.time(), params("train_selector")
    records = {r.id: r for r in load("data/corpus/records.jsonl", CorpusRecord)}
    units = selector.build_units(records, load("data/candidates/conversations.jsonl", Conversation),
                                 load("data/annotation/pool.jsonl", PoolItem))
    features = selector.featurize(units, CORPUS_IMAGES, EMBEDDINGS)
    pairs = pd.read_parquet("data/preferences/pairs.parquet")
    cfg = selector.TrainConfig(**{k: p[k] for k in selector.TrainConfig.__dataclass_fields__})
    model, history, stats = selector.train(features, pairs, {u: i for i, u in enumerate(units.index)}, cfg)
    selector.save(model, Path("models/selector"), cfg)
    pd.DataFrame(history).to_csv("metrics/train_selector_epochs.csv", index=False)
    last = history[-1]
    write_metrics("train_selector", {"backbone": selector.BACKBONE, "units": len(units), **stats,
                                     "train_loss": round(last["train_loss"], 5),
                                     "train_pair_accuracy": last["train_pair_accuracy"],
                                     "clinician_alignment": last["clinician_alignment"]}, t0)


if __name__ == "__main__":
    main()
