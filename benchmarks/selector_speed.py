"""Selector speed: training with cached features vs re-encoding every pair each epoch; scoring 1M candidates.

    python benchmarks/selector_speed.py                       # 300 pairs, 1,000,000 candidates
    python benchmarks/selector_speed.py --candidates 100000   # quicker

Prints, measured side by side in one run:
- seconds per training epoch with the frozen features encoded once (the embedding cache), and with both
  sides of every pair re-encoded through the MiniLM text encoder and the image descriptor every epoch
  (the paper's released code re-encodes through its encoder each epoch), same model, same pairs; the ratio;
- seconds to score `--candidates` cached feature rows and take the top 10% (np.argpartition);
- the filter's scoring path on `--conversations` 3-round conversations whose features are in the cache:
  loading the cache, units, lookups, the lexical grounding share, scoring in chunks, the first round's score
  per conversation (aggregate first), and the top 10%
  (selector.score_conversations + release.select_top; not screening or writing the release files).
Goals (issue #5): >= 100x per epoch; <= 10 s for 1M on two cores.
"""
import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from vital import release, selector
from vital.corpus import build_sample
from vital.encoders import EmbeddingCache
from vital.schema import Conversation
from vital.encoders import encode_texts
from vital.images import ImageStore
from vital.llm.offline import qa_from_text


def units_and_pairs(n_pairs: int, image_dir: Path):
    records = build_sample(image_dir, 256).records
    convs = [Conversation(r.id, r.image, r.domain, [t for q, a in qa_from_text(r.caption, " ".join(r.inline_mentions))
                                                    for t in ({"from": "human", "value": q}, {"from": "gpt", "value": a})],
                          "offline", "m", "h") for r in records]
    units = selector.build_units({r.id: r for r in records}, convs, [])
    rng = np.random.default_rng(0)
    ids = list(units.index)
    pairs = pd.DataFrame([{"a_id": ids[a], "b_id": ids[b], "label": int(rng.random() < 0.5), "weight": 1.0,
                           "source": "model", "split": "train"}
                          for a, b in (rng.choice(len(ids), 2, replace=False) for _ in range(n_pairs))])
    return units, pairs


def epoch_reencoding(units, pairs, image_dir, cfg):
    """One epoch the way the released code trains: encode both sides of each batch, then step."""
    torch.manual_seed(0)
    backbone = selector.MiniLMBackbone()
    model = selector.Selector(backbone.dim + 1, cfg.hidden, cfg.dropout)  # + the lexical grounding column
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)

    store = ImageStore(image_dir)

    def feats(ids):
        with torch.no_grad():  # a frozen encoder, run again for every batch
            return selector.encode(backbone, units.loc[ids], store)
    t = time.perf_counter()
    for i in range(0, len(pairs), cfg.batch_size):
        b = pairs.iloc[i:i + cfg.batch_size]
        win = np.where(b["label"] == 1, b["a_id"], b["b_id"])
        lose = np.where(b["label"] == 1, b["b_id"], b["a_id"])
        loss = torch.clamp(cfg.margin - (model(feats(list(win))) - model(feats(list(lose)))), min=0).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return time.perf_counter() - t


def filter_path(n: int, image_dir: Path, records, cache_dir: Path) -> float:
    """Seconds for selector.score_conversations + select_top over n conversations with cached features."""
    rng = np.random.default_rng(0)
    recs, convs = {}, []
    for i in range(n):
        r = records[i % len(records)]
        turns = [t for k in range(3) for t in ({"from": "human", "value": f"Question {k} on figure {i}?"},
                                                {"from": "gpt", "value": f"Answer {k}, number {i}."})]
        convs.append(Conversation(f"c{i}", r.image, r.domain, turns, "offline", "m", "h"))
        recs[f"c{i}"] = r
    backbone = selector.MiniLMBackbone()
    units = selector.build_units(recs, convs, [])
    cache = EmbeddingCache(cache_dir, "text", f"{backbone.identity}:text")  # warm it as earlier runs would have
    texts = list(dict.fromkeys([*units["context"], *units["qa"]]))
    vectors = rng.standard_normal((len(texts), selector.TEXT_DIM), dtype=np.float32)
    cache.get_or_encode([t.encode() for t in texts], lambda idx: vectors[idx])
    selector.Featurizer(backbone, image_dir, cache_dir)(units.drop_duplicates("image"))  # the few images
    model_dir = cache_dir.parent / "selector"
    selector.save(selector.Selector().eval(), backbone, model_dir, selector.TrainConfig(), 1)
    encoded = []
    real, selector.minilm_embed = selector.minilm_embed, lambda *a: encoded.append(1) or real(*a)
    t = time.perf_counter()
    scores, _ = selector.score_conversations(convs, recs, image_dir, cache_dir, model_dir)
    release.select_top(scores, 0.1)
    elapsed = time.perf_counter() - t
    selector.minilm_embed = real
    assert not encoded, "the timed path encoded texts: the cache was not warm"
    return elapsed


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--pairs", type=int, default=300)
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--candidates", type=int, default=1_000_000)
    ap.add_argument("--conversations", type=int, default=100_000)
    args = ap.parse_args()
    torch.set_num_threads(2)
    with tempfile.TemporaryDirectory() as d:
        image_dir = Path(d) / "images"
        units, pairs = units_and_pairs(args.pairs, image_dir)
        cfg = selector.TrainConfig(epochs=args.epochs)
        encode_texts(units["qa"].tolist()[:2])  # load the encoder before timing

        t = time.perf_counter()
        featurize = selector.Featurizer(selector.MiniLMBackbone(), image_dir, Path(d) / "emb")
        features = torch.from_numpy(featurize(units))  # once, into the cache
        encode_once = time.perf_counter() - t
        index = {u: i for i, u in enumerate(units.index)}
        warm = selector.TrainConfig(epochs=1)  # one-time imports (torch.optim pulls in torch._dynamo) not timed
        selector.train(lambda rows: features[rows], len(units), features.shape[1], pairs, index, warm)
        t = time.perf_counter()
        selector.train(lambda rows: features[rows], len(units), features.shape[1], pairs, index, cfg)
        cached_epoch = (time.perf_counter() - t) / args.epochs
        reencode_epoch = epoch_reencoding(units, pairs, image_dir, cfg)
        print(f"{len(units)} units, {len(pairs)} pairs, batch {cfg.batch_size}")
        print(f"encoding every unique unit once (into the cache): {encode_once:.2f} s")
        print(f"per epoch, cached features: {cached_epoch * 1000:.1f} ms; re-encoding every pair: "
              f"{reencode_epoch * 1000:.0f} ms; ratio {reencode_epoch / cached_epoch:.0f}x")

        records = build_sample(image_dir, 256).records
        (Path(d) / "emb2").mkdir()
        elapsed = filter_path(args.conversations, image_dir, records, Path(d) / "emb2")
        print(f"filter scoring path (cache, units, lookups, grounding, chunked scoring, per conversation, top 10%) for "
              f"{args.conversations:,} cached conversations ({3 * args.conversations:,} rounds): {elapsed:.2f} s "
              f"({3 * args.conversations / elapsed:,.0f} rounds/s)")

    model = selector.Selector(selector.MiniLMBackbone.dim).eval()
    feats = np.random.default_rng(0).standard_normal((args.candidates, selector.MiniLMBackbone.dim), dtype=np.float32)
    t = time.perf_counter()
    scores = selector.score(model, feats, batch_size=8192)
    k = args.candidates // 10
    top = np.argpartition(-scores, k - 1)[:k]
    top = top[np.argsort(-scores[top], kind="stable")]
    elapsed = time.perf_counter() - t
    print(f"scoring {args.candidates:,} cached candidates and taking the top 10%: {elapsed:.2f} s "
          f"({args.candidates / elapsed:,.0f} candidates/s)")


if __name__ == "__main__":
    main()
