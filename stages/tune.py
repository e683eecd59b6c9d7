"""DVC stage `tune`: LoRA instruction tuning of a LLaVA-family model on the release.

    dvc repro tune                                   # embedded default: tiny random LLaVA on CPU
    dvc exp run -S tune.base_model=/models/llava-med-v1.5-mistral-7b-hf   # a real model (GPU: issue #7)
"""
import json
import time
from pathlib import Path

import pandas as pd
from common import CORPUS_IMAGES, params, write_metrics

from vital import tune
from vital.schema import write_json


def main():
    t0, p = time.time(), params("tune")
    cfg = tune.TuneConfig(**{k: (tuple(v) if isinstance(v, list) else v) for k, v in p.items()})
    release = json.loads(Path("data/release/instructions.json").read_text())
    out = Path("models/vlm")
    model, processor = tune.load_base(cfg.base_model, cfg.seed)
    if cfg.base_model == tune.TINY:
        tune.save_base(model, processor, out)
    model, history, stats = tune.train(model, processor, release, CORPUS_IMAGES, cfg)
    tune.save_adapter(model, processor, out)
    label = "tiny random LLaVA (pipeline check only, not a real model)" if cfg.base_model == tune.TINY else cfg.base_model
    write_json("models/vlm/model_info.json", {"base_model": cfg.base_model, "label": label, **stats})
    pd.DataFrame(history).to_csv("metrics/tune_loss.csv", index=False)
    write_metrics("tune", {"base_model": cfg.base_model, "model": label, **stats}, t0)


if __name__ == "__main__":
    main()
