"""DVC stage `corpus`: materialise the bundled sample or ingest a LLaVA-Med fig_captions corpus.

    dvc repro corpus
    dvc exp run -S corpus.source=path -S corpus.path=my/fig_captions.jsonl -S corpus.image_dir=my/images
"""
import time
from pathlib import Path

from common import CORPUS_IMAGES, params, write_metrics

from vital.corpus import CorpusError, build_sample, ingest
from vital.schema import write_jsonl


def main():
    t0, p = time.time(), params("corpus")
    if p["source"] == "sample":
        result = build_sample(CORPUS_IMAGES, p["max_image_side"], p["shard_mb"])
    else:  # path (params.yaml is checked: src/vital/params.py)
        try:
            result = ingest(Path(p["path"]), Path(p["image_dir"]), CORPUS_IMAGES, p["strict"], p["shard_mb"],
                            p["max_pixels"], licenses=Path(p["licenses"]) if p["licenses"] else None)
        except CorpusError as e:  # strict mode's first bad record, or nothing to read: one line, no traceback
            raise SystemExit(str(e)) from None
        refusal = result.refusal(p["path"])  # the same words `vital validate corpus` prints
        if refusal:
            raise SystemExit(refusal)
    write_jsonl("data/corpus/ingested.jsonl", result.records)  # `dedup` reads it
    write_jsonl("data/corpus/rejected.jsonl", result.rejected)
    write_metrics("corpus", {"source": p["source"], **result.counts()}, t0)


if __name__ == "__main__":
    main()
