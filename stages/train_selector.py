"""DVC stage `train_selector`: an MLP over text + image features of a backbone, trained on preference pairs.

The epoch is chosen on the validation pairs; metrics/train_selector.json reports validation and test apart (test:
scored once, by the chosen epoch), each rate with n and a 95% interval. With `baseline_model_only` the w = 0
selector (model pairs only) is trained too, into models/selector/model_only/, for filter's comparison.

    dvc repro train_selector
    dvc exp run -S train_selector.loss=logistic -S train_selector.epochs=50
    dvc exp run -S train_selector.unit=conversation -S train_selector.aggregate=min
    dvc exp run -S train_selector.backbone=biomedclip -S train_selector.backbone_model=/models/biomedclip-hf
"""
import time
from pathlib import Path

from common import CORPUS_IMAGES, EMBEDDINGS, chunks, image_store, load, params, stream, write_metrics
import pandas as pd  # after common: a bad params.yaml stops before the heavy imports

from vital import release, selector
from vital.encoders import EmbeddingCache
from vital.llm.ray_engine import Engine
from vital.schema import CSV_FLOAT, Conversation, CorpusRecord, PoolItem, figure_of


def main():
    t0, p = time.time(), params("train_selector")
    try:
        cfg = selector.TrainConfig(**p)
    except (TypeError, ValueError) as e:
        raise SystemExit(f"train_selector: {e}") from None
    pairs = pd.read_parquet("data/preferences/pairs.parquet")
    named = set(pairs["a_id"]) | set(pairs["b_id"])  # the units fit trains on; the candidates are only streamed
    figures, images, skipped = {figure_of(u) for u in named}, image_store(), []
    records = {r.id: r for r in stream("data/corpus/records.jsonl", CorpusRecord) if r.id in figures}

    def screened():  # every candidate is screened (and counted) as before; fit's units come from those kept
        for part in chunks(stream("data/candidates/conversations.jsonl", Conversation), 4096):
            ok, why = release.screen(part, images)
            skipped.extend(why)
            yield from ok

    units = selector.build_units(records, screened(), load("data/annotation/pool.jsonl", PoolItem), cfg.unit,
                                 keep=named)
    missing = selector.missing_images(units, images)
    units = units.drop(index=missing)  # pairs naming them are counted in pairs_missing_units
    if units.empty:
        raise SystemExit(f"train_selector: no unit has its image in {CORPUS_IMAGES} ({len(missing)} missing); "
                         "rerun the corpus stage (dvc repro -f corpus)")
    engine = Engine(**params("engine"))
    try:
        head, backbone, history, stats = selector.fit(units, pairs, cfg, images, EMBEDDINGS, engine=engine)
        meta = selector.save(head, backbone, Path("models/selector"), cfg, stats["best_epoch"])
        baseline = {}
        if cfg.baseline_model_only:  # the w = 0 selector, for filter's comparison
            try:
                head0, backbone0, _, stats0 = selector.fit(units, pairs, cfg, images, EMBEDDINGS, model_only=True,
                                                            engine=engine)
            except ValueError as e:
                raise ValueError(f"the w = 0 baseline (train_selector.baseline_model_only): {e}") from None
            selector.save(head0, backbone0, Path("models/selector/model_only"), cfg, stats0["best_epoch"],
                          trained_on="model pairs only (w = 0): the baseline filter compares")
            baseline = {"model_only": {k: stats0[k] for k in ("train_pairs", "best_epoch", "epoch_chosen_on",
                                                               "validation", "test")}}
    except ValueError as e:
        raise SystemExit(f"train_selector: {e}") from None
    pd.DataFrame(history).to_csv("metrics/train_selector_epochs.csv", index=False, float_format=CSV_FLOAT)
    for w in stats["warnings"]:  # small or skewed data: say so, the metrics carry them too
        print(f"train_selector: warning: {w} (merge_preferences' split shares, or more clinician votes)")
    write_metrics("train_selector", {
        "backbone": meta["backbone_identity"], "finetune_backbone": cfg.finetune_backbone, "unit": cfg.unit,
        "aggregate": cfg.aggregate, "loss": cfg.loss, "candidates_skipped": len(skipped),
        "units_missing_image": len(missing), **stats, **baseline,
        "features": dict(EmbeddingCache.counts)}, t0)


if __name__ == "__main__":
    main()
