"""DVC stage `tune`: LoRA instruction tuning of a LLaVA-family model on the release.

    dvc repro tune                                   # embedded default: tiny random LLaVA on CPU
    dvc exp run -S tune.base_model=/models/llava-med-v1.5-mistral-7b-hf -S tune.max_length=2048   # a real model
    dvc exp run tune -S tune.data=data/external/biomed-vital-80k/instructions.json \
        -S tune.images=data/external/biomed-vital-80k/images     # the official release (vital release import)
    dvc exp run -S tune.accelerate_config=configs/accelerate/ddp.yaml -S tune.num_processes=8   # 8 GPUs
    dvc exp run -S tune.accelerate_config=configs/accelerate/zero3.yaml -S tune.num_processes=8   # DeepSpeed ZeRO-3

dvc.yaml runs it as `accelerate launch --config_file <tune.accelerate_config> --num_processes <tune.num_processes>
stages/tune.py`: every process trains its share; the main process writes the outputs.
"""
import hashlib
import json
import time
from pathlib import Path

from common import image_store, params, write_metrics
import pandas as pd  # after common: a bad params.yaml stops before the heavy imports

from vital import tune
from vital.schema import CSV_FLOAT, write_atomic, write_json


CHECKPOINT = Path("data/cache/tune_checkpoint")  # resumable state while training; removed when it finishes


def main():
    t0, p = time.time(), params("tune")
    data, images = Path(p.pop("data")), image_store(Path(p.pop("images")))
    p.pop("accelerate_config"), p.pop("num_processes")  # read by `accelerate launch` (dvc.yaml)
    try:
        cfg = tune.TuneConfig(**{k: (tuple(v) if isinstance(v, list) else v) for k, v in p.items()})
    except (TypeError, ValueError) as e:
        raise SystemExit(f"params.yaml tune: {e}") from None
    main_process = tune.accelerator(cfg).is_main_process
    release = json.loads(data.read_text())
    out = Path("models/vlm")
    model, processor = tune.load_base(cfg.base_model, cfg.seed)
    if cfg.base_model == tune.TINY and main_process:
        tune.save_base(model, processor, out)
    try:
        model, history, stats = tune.train(model, processor, release, images, cfg, CHECKPOINT, out)
    except tune.TemplateError as e:
        raise SystemExit(f"tune: {cfg.base_model}: {e}") from None
    except ValueError as e:
        raise SystemExit(f"tune: {data}: {e}") from None
    if not main_process:
        return
    label = "tiny random LLaVA (pipeline check only, not a real model)" if cfg.base_model == tune.TINY else cfg.base_model
    if cfg.merge:  # the base with the adapter folded in: loads without peft
        model.merge_and_unload().save_pretrained(out / "merged")
        processor.save_pretrained(out / "merged")
    card = tune.model_card(cfg, stats, data, len(release), hashlib.sha256(data.read_bytes()).hexdigest(), label)
    write_atomic(out / "adapter" / "README.md", card)  # replaces peft's empty template
    write_json("models/vlm/model_info.json", {"base_model": cfg.base_model, "label": label, "data": str(data), **stats})
    pd.DataFrame(history).to_csv("metrics/tune_loss.csv", index=False, float_format=CSV_FLOAT)
    write_metrics("tune", {"base_model": cfg.base_model, "model": label, **stats}, t0)


if __name__ == "__main__":
    main()
