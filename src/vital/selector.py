"""Stages `train_selector` and (scoring for) `filter`: the data selection model.

A unit is one Q&A round in context: caption + in-text mentions + question + answer, and its image.
Features are the MiniLM text embedding concatenated with the image descriptor (`encoders.py`);
an MLP maps them to a score. Training minimises the weighted pairwise hinge loss
    w * max(0, margin - (s_preferred - s_other))
over clinician and model pairs. Backbone features are frozen and computed once per unique unit.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import nn

from .encoders import IMAGE_DIM, TEXT_DIM, EmbeddingCache, encode_images, encode_texts
from .schema import Conversation, CorpusRecord, PoolItem, rounds

BACKBONE = "minilm+imagefeat"


def unit_text(caption: str, mentions: list[str], question: str, answer: str) -> str:
    return f"{caption} {' '.join(mentions)} Question: {question} Answer: {answer}"


def build_units(records: dict[str, CorpusRecord], conversations: list[Conversation],
                pool: list[PoolItem]) -> pd.DataFrame:
    """Every scorable unit: generated rounds and pool answers -> (id, image, text)."""
    rows = []
    for c in conversations:
        r = records[c.id]
        for k, (q, a) in enumerate(rounds(c.conversations)):
            rows.append((f"{c.id}#{k}", c.image, unit_text(r.caption, r.inline_mentions, q, a)))
    for p in pool:
        for side, ans in (("A", p.answer_a), ("B", p.answer_b)):
            rows.append((f"{p.question_id}:{side}", p.image, unit_text(p.caption, p.inline_mentions, p.question, ans)))
    return pd.DataFrame(rows, columns=["id", "image", "text"]).drop_duplicates("id").set_index("id")


def featurize(units: pd.DataFrame, image_root: Path, cache_dir: Path | None = None) -> np.ndarray:
    """(n, TEXT_DIM + IMAGE_DIM) frozen backbone features. With `cache_dir`, every unique text and image
    is encoded once across epochs, stages and experiments (EmbeddingCache, keyed by content hash)."""
    texts = units["text"].tolist()
    paths = [image_root / u for u in units["image"]]
    if cache_dir is None:
        uniq = sorted(set(units["image"]))
        img = dict(zip(uniq, encode_images([image_root / u for u in uniq])))
        return np.hstack([encode_texts(texts), np.stack([img[u] for u in units["image"]])]).astype(np.float32)
    text_cache = EmbeddingCache(cache_dir, "text", f"{BACKBONE}:text")
    image_cache = EmbeddingCache(cache_dir, "image", f"{BACKBONE}:image")
    text = text_cache.get_or_encode([t.encode() for t in texts], lambda idx: encode_texts([texts[i] for i in idx]))
    images = image_cache.get_or_encode([p.read_bytes() for p in paths], lambda idx: encode_images([paths[i] for i in idx]))
    return np.hstack([text, images]).astype(np.float32)


class Selector(nn.Module):
    def __init__(self, in_dim: int = TEXT_DIM + IMAGE_DIM, hidden: int = 256, dropout: float = 0.1):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(in_dim, hidden), nn.ReLU(), nn.Dropout(dropout),
                                 nn.Linear(hidden, hidden // 2), nn.ReLU(), nn.Linear(hidden // 2, 1))

    def forward(self, x):
        return self.net(x).squeeze(-1)


def pair_tensors(pairs: pd.DataFrame, index: dict[str, int]):
    """(preferred rows, other rows, weights) for pairs whose units are both known."""
    keep = pairs["a_id"].isin(index) & pairs["b_id"].isin(index)
    p = pairs[keep]
    a = np.array([index[x] for x in p["a_id"]], dtype=np.int64)
    b = np.array([index[x] for x in p["b_id"]], dtype=np.int64)
    lab = p["label"].to_numpy().astype(bool)
    win, lose = np.where(lab, a, b), np.where(lab, b, a)
    return torch.from_numpy(win), torch.from_numpy(lose), torch.tensor(p["weight"].to_numpy(), dtype=torch.float32), int((~keep).sum())


@dataclass
class TrainConfig:
    epochs: int = 30
    lr: float = 1e-3
    batch_size: int = 64
    margin: float = 1.0
    hidden: int = 256
    dropout: float = 0.1
    seed: int = 0


def pair_accuracy(scores: torch.Tensor, win: torch.Tensor, lose: torch.Tensor) -> float | None:
    if len(win) == 0:
        return None
    return float((scores[win] > scores[lose]).float().mean())


def train(features: np.ndarray, pairs: pd.DataFrame, index: dict[str, int], cfg: TrainConfig):
    """Train on split=="train" pairs; report per-epoch loss, train accuracy and held-out alignment."""
    torch.manual_seed(cfg.seed)
    x = torch.from_numpy(features)
    tr_w, tr_l, tr_wt, missing = pair_tensors(pairs[pairs["split"] == "train"], index)
    ho_w, ho_l, _, _ = pair_tensors(pairs[pairs["split"] == "holdout"], index)
    assert len(tr_w), "no training pairs: check merge_preferences output (data/preferences/pairs.parquet)"
    model = Selector(features.shape[1], cfg.hidden, cfg.dropout)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    gen = torch.Generator().manual_seed(cfg.seed)
    history = []
    for epoch in range(cfg.epochs):
        model.train()
        perm = torch.randperm(len(tr_w), generator=gen)
        total = 0.0
        for i in range(0, len(perm), cfg.batch_size):
            j = perm[i:i + cfg.batch_size]
            s_w, s_l = model(x[tr_w[j]]), model(x[tr_l[j]])
            loss = (tr_wt[j] * torch.clamp(cfg.margin - (s_w - s_l), min=0)).sum() / tr_wt[j].sum()
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += loss.item() * len(j)
        model.eval()
        with torch.no_grad():
            s = model(x)
        history.append({"epoch": epoch + 1, "train_loss": total / len(perm),
                        "train_pair_accuracy": pair_accuracy(s, tr_w, tr_l),
                        "clinician_alignment": pair_accuracy(s, ho_w, ho_l)})
    return model, history, {"train_pairs": len(tr_w), "holdout_pairs": len(ho_w), "pairs_missing_units": missing}


def save(model: Selector, out_dir: Path, cfg: TrainConfig) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), out_dir / "selector.pt")
    meta = {"backbone": BACKBONE, "in_dim": model.net[0].in_features, **cfg.__dict__}
    (out_dir / "config.json").write_text(json.dumps(meta, indent=2) + "\n")


def load(model_dir: Path) -> Selector:
    meta = json.loads((model_dir / "config.json").read_text())
    if meta["backbone"] != BACKBONE:
        raise ValueError(f"{model_dir}/config.json: selector was trained with backbone {meta['backbone']!r} "
                         f"but this scorer uses {BACKBONE!r}; rerun train_selector with the same backbone")
    model = Selector(meta["in_dim"], meta["hidden"], meta["dropout"])
    model.load_state_dict(torch.load(model_dir / "selector.pt", weights_only=True))
    return model.eval()


def score(model: Selector, features: np.ndarray, batch_size: int = 1024) -> np.ndarray:
    out = []
    with torch.no_grad():
        for i in range(0, len(features), batch_size):
            out.append(model(torch.from_numpy(features[i:i + batch_size])).numpy())
    return np.concatenate(out) if out else np.zeros(0, np.float32)
