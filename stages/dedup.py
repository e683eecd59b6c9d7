"""DVC stage `dedup`: the corpus without exact or near-duplicate figures, before anything is paid for.

    dvc repro dedup
    dvc exp run -S dedup.phash_distance=4 -S dedup.caption_jaccard=0.95

Reads data/corpus/ingested.jsonl (the `corpus` stage); writes data/corpus/unique.jsonl (what `decontaminate`
reads), every figure left out with why in data/corpus/duplicates.jsonl, and every figure's hashes in
data/corpus/hashes.parquet (`decontaminate` matches them against the eval sets).
"""
import time
from collections import Counter

from common import image_store, load, params, write_metrics
import pandas as pd  # after common: a bad params.yaml stops before the heavy imports

from vital.dedup import find_duplicates, image_hashes
from vital.schema import CorpusRecord, write_jsonl


def main():
    t0, p = time.time(), params("dedup")
    records, store = load("data/corpus/ingested.jsonl", CorpusRecord), image_store()
    pixels, phash, size = [], [], []
    for r in records:
        with store.open(r.image) as im:
            sha, ph = image_hashes(im)
            size.append(im.width * im.height)
        pixels.append(sha)
        phash.append(ph)
    hashes = pd.DataFrame({"id": [r.id for r in records], "pixels": pixels, "phash": pd.array(phash, "uint64"),
                           "pixel_count": size})
    hashes.to_parquet("data/corpus/hashes.parquet", index=False)
    dups = find_duplicates([r.id for r in records], pixels, hashes["phash"].to_numpy(), size,
                           [r.caption for r in records], [r.pmid for r in records],
                           p["phash_distance"], p["caption_jaccard"])
    dropped = {d.id for d in dups}
    write_jsonl("data/corpus/duplicates.jsonl", dups)
    write_jsonl("data/corpus/unique.jsonl", [r for r in records if r.id not in dropped])
    write_metrics("dedup", {"figures": len(records), "kept": len(records) - len(dropped), "duplicates": len(dups),
                            "by_reason": dict(sorted(Counter(d.reason for d in dups).items())),
                            "groups": len({d.duplicate_of for d in dups})}, t0)


if __name__ == "__main__":
    main()
