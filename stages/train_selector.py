"""DVC stage `train_selector`: an MLP over text + image features of a backbone, trained on preference pairs.

    dvc repro train_selector
    dvc exp run -S train_selector.loss=logistic -S train_selector.epochs=50
    dvc exp run -S train_selector.unit=conversation -S train_selector.aggregate=min
    dvc exp run -S train_selector.backbone=biomedclip -S train_selector.backbone_model=/models/biomedclip-hf
"""
import time
from pathlib import Path

import pandas as pd
import torch
from common import CORPUS_IMAGES, EMBEDDINGS, load, params, write_metrics

from vital import selector
from vital.schema import Conversation, CorpusRecord, PoolItem


def main():
    t0, p = time.time(), params("train_selector")
    try:
        cfg = selector.TrainConfig(**p)
    except (TypeError, ValueError) as e:
        raise SystemExit(f"train_selector: {e}") from None
    records = {r.id: r for r in load("data/corpus/records.jsonl", CorpusRecord)}
    units = selector.build_units(records, load("data/candidates/conversations.jsonl", Conversation),
                                 load("data/annotation/pool.jsonl", PoolItem), cfg.unit)
    missing = selector.missing_images(units, CORPUS_IMAGES)
    units = units.drop(index=missing)  # their pairs are counted in pairs_missing_units
    pairs = pd.read_parquet("data/preferences/pairs.parquet")
    try:
        backbone = selector.build_backbone(cfg)
        if cfg.finetune_backbone:  # end to end: the backbone encodes each batch, with gradients
            def features(rows):
                return selector.encode(backbone, units.iloc[rows.tolist()], CORPUS_IMAGES)
        else:  # frozen: every unique text and image encoded once (the embedding cache)
            x = torch.from_numpy(selector.Featurizer(backbone, CORPUS_IMAGES, EMBEDDINGS)(units))

            def features(rows):
                return x[rows]
        head, history, stats = selector.train(features, len(units), backbone.dim, pairs,
                                              {u: i for i, u in enumerate(units.index)}, cfg,
                                              backbone if cfg.finetune_backbone else None)
    except ValueError as e:
        raise SystemExit(f"train_selector: {e}") from None
    meta = selector.save(head, backbone, Path("models/selector"), cfg, stats["best_epoch"])
    pd.DataFrame(history).to_csv("metrics/train_selector_epochs.csv", index=False)
    best = history[stats["best_epoch"] - 1]
    write_metrics("train_selector", {
        "backbone": meta["backbone_identity"], "finetune_backbone": cfg.finetune_backbone, "unit": cfg.unit,
        "loss": cfg.loss, "units": len(units), "units_missing_image": len(missing), **stats,
        **{k: v for k, v in best.items() if k != "epoch"}}, t0)


if __name__ == "__main__":
    main()
