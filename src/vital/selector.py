"""Stages `train_selector` and (scoring for) `filter`: the data selection model.

Unit: what the selector scores. `unit: round` (the paper): the figure's context (caption + in-text mentions), one
question + its answer, and the figure; id `<conversation>#<round>`. `unit: conversation`: the context and every round;
id `<conversation>`. A clinician-judged pool answer is a one-round unit either way; id `<question_id>:A|B`.
With `unit: round` a conversation's score is the `aggregate` of its rounds' scores: `first` (the first round alone,
as the authors' released selector scores a conversation), `mean` or `min`.

Backbone: `minilm` (the MiniLM text embedding + the image descriptor of encoders.py) or `biomedclip` (a Hugging
Face dual encoder, VisionTextDualEncoderModel or CLIPModel format, from `backbone_model`: a path or hub name).
Features: the Q&A embedding, the context embedding, their elementwise product (does the answer fit this figure?), the
image embedding and the share of the Q&A's words found in the context (`grounding`), side by side; an MLP head maps
them to a score. The context and the Q&A are embedded apart, and
a text longer than the encoder's window is the mean of its windows (encoders.embed_windows), so a long caption never
pushes the question and answer out of the input. (The authors embedded caption + mentions + Q + A as one text cut
at 256 tokens: with a long caption every round of a figure had the same features.)

Training minimises a weighted pairwise loss over preference pairs (label 1: a preferred, 0: b preferred; any other
label, such as 0.5 for a tie, is masked and counted, never read as "b wins"):
    hinge:    w * max(0, margin - (s_win - s_lose))
    logistic: w * log(1 + exp(-(s_win - s_lose)))          (Bradley-Terry)
with Adam. Frozen backbone (the default): every unique text and image is encoded once into the embedding cache
and the epochs train the head alone. `finetune_backbone: true` trains the backbone too (lr `backbone_lr`), end to
end as the paper did; its weights are saved next to the head and `filter` scores with them.

Pairs come split by figure into train / validation / test (merge_preferences). After each epoch the validation
pairs are scored: model-pair accuracy, clinician alignment (the share of clinician pairs ordered as clinicians
ordered them), and over the clinician answers (preferred ones as positives) ROC AUC, average precision (`map`) and
the mean rank of preferred answers (0: top, 1: bottom): the filter cuts one global ranking, so a global ranking
measure matters besides the per-pair one. The saved model is the best epoch by validation clinician alignment, then
validation model-pair accuracy, then the later epoch; the test pairs are scored once, with that model, and nothing
is chosen on them. Pair accuracies count ties apart (equal scores are neither right nor wrong) and come with n and a
95% Wilson interval.
"""
from __future__ import annotations

import copy
import dataclasses
import hashlib
import io
import json
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import pandas as pd
import torch
from PIL import Image
from sklearn.metrics import average_precision_score, roc_auc_score
from torch import nn

from scipy.stats import rankdata

from .encoders import (IMAGE_DIM, IMAGE_FEATURES, TEXT_DIM, TEXT_FEATURES, TEXT_MAX_TOKENS, EmbeddingCache, _minilm,
                       batched, count_windows, embed_windows, encode_images, in_order_of, minilm_embed,
                       tensors_own_pages)
from .images import ImageStore
from .llm.ray_engine import Engine, map_rows
from .schema import AGGREGATES, SPLITS, UNITS, Conversation, CorpusRecord, PoolItem, chunks, round_id, rounds
from .stats import auc_interval, rate, ties_half


@dataclass
class TrainConfig:
    backbone: str = "minilm"          # minilm | biomedclip
    backbone_model: str | None = None  # biomedclip: path or hub name of a Hugging Face dual-encoder checkpoint
    finetune_backbone: bool = False
    backbone_lr: float = 1e-5
    unit: str = "round"               # round | conversation
    aggregate: str = "first"          # first | mean | min: rounds -> conversation (first: the authors' code)
    loss: str = "hinge"               # hinge | logistic
    margin: float = 1.0
    epochs: int = 30
    lr: float = 1e-3
    batch_size: int = 64
    hidden: int = 256
    dropout: float = 0.1
    seed: int = 0
    baseline_model_only: bool = True  # also train the w = 0 selector (model pairs only), the baseline filter compares
    lexical_grounding: bool = True    # the share of the Q&A's words found in the context, beside the embeddings

    def __post_init__(self):
        for key, allowed in (("backbone", ("minilm", "biomedclip")), ("unit", UNITS),
                             ("aggregate", tuple(AGGREGATES)), ("loss", ("hinge", "logistic"))):
            if getattr(self, key) not in allowed:
                raise ValueError(f"train_selector.{key} is {getattr(self, key)!r}; use one of {', '.join(allowed)}")
        for key, low in (("epochs", 1), ("batch_size", 1), ("hidden", 2), ("seed", 0)):
            v = getattr(self, key)
            if isinstance(v, bool) or not isinstance(v, int) or v < low:
                raise ValueError(f"train_selector.{key} is {v!r}; it must be an integer >= {low}")
        for key, ok, rule in (("lr", lambda v: v > 0, "> 0"), ("backbone_lr", lambda v: v > 0, "> 0"),
                              ("margin", lambda v: v >= 0, ">= 0"), ("dropout", lambda v: 0 <= v < 1, "in [0, 1)")):
            v = getattr(self, key)
            try:
                f = float(v)  # YAML reads 1e-3 (no dot) as a string
            except (TypeError, ValueError):
                f = float("nan")  # fails every rule
            if isinstance(v, bool) or not ok(f):
                raise ValueError(f"train_selector.{key} is {v!r}; it must be a number {rule}")
            setattr(self, key, f)
        if self.unit == "conversation" and self.aggregate == "first":
            raise ValueError("train_selector.aggregate is 'first' with unit 'conversation': 'first' scores a "
                             "conversation by its first round, but a conversation unit reads every round; use mean "
                             "or min, or unit round")
        for key in ("finetune_backbone", "baseline_model_only", "lexical_grounding"):
            if not isinstance(getattr(self, key), bool):
                raise ValueError(f"train_selector.{key} is {getattr(self, key)!r}; use true or false")
        if self.backbone == "biomedclip" and not self.backbone_model:
            raise ValueError("train_selector.backbone is biomedclip but backbone_model is empty: give the path or hub "
                             "name of BiomedCLIP in Hugging Face dual-encoder format (see README)")


# ---------------------------------------------------------------- units

def context_text(caption: str, mentions: list[str]) -> str:
    return f"{caption} {' '.join(mentions)}".strip()


def qa_text(qa: list[tuple[str, str]]) -> str:
    return " ".join(f"Question: {q} Answer: {a}" for q, a in qa)


def build_units(records: dict[str, CorpusRecord], conversations: Iterable[Conversation], pool: list[PoolItem],
                unit: str = "round", keep: set[str] | None = None) -> pd.DataFrame:
    """Every scorable unit: generated rounds (or conversations) and pool answers -> (id, image, context, qa).
    `keep`: only the generated units of these ids (what pairs name); `conversations` may then be a stream of
    the whole candidate file, and `records` needs only the figures of those units."""
    rows = []
    for c in conversations:
        qa = rounds(c.conversations)
        ids = [c.id] if unit == "conversation" else [round_id(c.id, k) for k in range(len(qa))]
        if keep is not None and keep.isdisjoint(ids):
            continue
        r = records[c.id]
        context = context_text(r.caption, r.inline_mentions)
        if unit == "conversation":
            rows.append((c.id, c.image, context, qa_text(qa)))
        else:
            rows += [(i, c.image, context, qa_text([x])) for i, x in zip(ids, qa) if keep is None or i in keep]
    for p in pool:
        for side, ans in (("A", p.answer_a), ("B", p.answer_b)):
            rows.append((f"{p.question_id}:{side}", p.image, context_text(p.caption, p.inline_mentions),
                         qa_text([(p.question, ans)])))
    return pd.DataFrame(rows, columns=["id", "image", "context", "qa"]).drop_duplicates("id").set_index("id")


def long_texts(backbone: nn.Module, units: pd.DataFrame) -> dict:
    """How many units have a context, or a Q&A, longer than one window of the backbone's text encoder (embedded
    as the mean of their windows: nothing is cut)."""
    out = {}
    for col in ("context", "qa"):
        texts = list(dict.fromkeys(units[col]))
        windows = dict(zip(texts, count_windows(backbone.tokenizer, texts, backbone.max_length)))
        out[f"units_long_{col}"] = int(sum(windows[t] > 1 for t in units[col]))
    return out


_WORD = re.compile(r"[a-z0-9]{2,}")
_LABELS = {"question", "answer"}  # qa_text's own labels


def grounding(units: pd.DataFrame) -> np.ndarray:
    """(n, 1) float32: the share of each unit's Q&A words (two letters or more) that occur in its context. Lexical
    grounding: a frozen sentence embedding hardly moves when one word flips (an answer and its left/right-swapped
    copy have cosine 0.995 in MiniLM), while this share drops."""
    out, seen = np.zeros((len(units), 1), np.float32), {}
    for i, (context, qa) in enumerate(zip(units["context"], units["qa"])):
        words = set(_WORD.findall(qa.lower())) - _LABELS
        if context not in seen:  # a figure's rounds share its context
            seen[context] = set(_WORD.findall(context.lower()))
        if words:
            out[i, 0] = len(words & seen[context]) / len(words)
    return out


def combine(context, qa, image, lexical, cat: Callable):
    """The head's input: Q&A, context, their elementwise product, image and (unless `lexical` is None) lexical
    grounding (numpy arrays or torch tensors)."""
    return cat([qa, context, qa * context, image] + ([] if lexical is None else [lexical]))


def conversation_score(c: Conversation, unit_scores: dict[str, float], unit: str, aggregate: str) -> float:
    if unit == "conversation":
        return float(unit_scores[c.id])
    n = len(rounds(c.conversations))
    if not n:
        raise ValueError(f"conversation {c.id} has no rounds to score; screen candidates first (release.screen)")
    n = 1 if aggregate == "first" else n  # the other rounds need no score
    return float(AGGREGATES[aggregate]([unit_scores[round_id(c.id, k)] for k in range(n)]))


# ---------------------------------------------------------------- backbones

def _pooled(out) -> torch.Tensor:
    """transformers 5 returns model outputs from get_*_features; older versions a tensor."""
    return out if isinstance(out, torch.Tensor) else out.pooler_output


def _weights_hash(module: nn.Module) -> str:
    """A content hash of the weights: the backbone's identity in the embedding cache and the selector's config."""
    h = hashlib.sha256()
    for name, t in sorted(module.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


class MiniLMBackbone(nn.Module):
    """The MiniLM text encoder (trainable when fine-tuning) + the fixed image descriptor."""
    kind = "minilm"
    dim = 3 * TEXT_DIM + IMAGE_DIM  # combine's embedding part; the lexical grounding column comes on top
    max_length = TEXT_MAX_TOKENS

    def __init__(self, path: str | None = None, trainable: bool = False):
        super().__init__()
        if path is None:  # the packaged MiniLM, shared with other stages: never train that copy
            self.tok, model = _minilm()
            self.text = copy.deepcopy(model) if trainable else model
        else:  # a fine-tuned copy saved with a selector: read afresh, it may have been retrained
            from transformers import AutoModel, AutoTokenizer

            self.tok, self.text = AutoTokenizer.from_pretrained(path), AutoModel.from_pretrained(path).eval()

    @property
    def identity(self) -> str:  # of the current weights: fine-tuning changes it
        return f"minilm@{_weights_hash(self.text)}+{TEXT_FEATURES}+{IMAGE_FEATURES}"

    @property
    def tokenizer(self):
        return self.tok

    def text_features(self, texts: list[str]) -> torch.Tensor:
        return minilm_embed(self.tok, self.text, texts)

    def image_features(self, images: list[bytes]) -> torch.Tensor:
        return torch.from_numpy(encode_images(images))

    def save(self, out: Path) -> None:
        self.text.save_pretrained(out)
        self.tok.save_pretrained(out)


class DualEncoderBackbone(nn.Module):
    """BiomedCLIP (or any CLIP-style model) in Hugging Face format: normalised text and image projections."""
    kind = "biomedclip"

    def __init__(self, name: str):
        super().__init__()
        from transformers import AutoModel, AutoProcessor

        try:
            self.model = AutoModel.from_pretrained(name, dtype=torch.float32)  # the head trains in float32
            self.processor = AutoProcessor.from_pretrained(name)
        except (OSError, ValueError) as e:
            raise ValueError(f"train_selector.backbone_model {name!r}: cannot load it ({str(e).splitlines()[0]}). "
                             "Give a local folder or hub name of a Hugging Face dual encoder "
                             "(VisionTextDualEncoderModel or CLIPModel format)") from None
        if not (hasattr(self.model, "get_text_features") and hasattr(self.model, "get_image_features")):
            raise ValueError(f"train_selector.backbone_model {name!r} is a {type(self.model).__name__}, not a dual "
                             "encoder with text and image projections (VisionTextDualEncoderModel or CLIPModel)")
        self.dim = 4 * self.model.config.projection_dim
        self.max_length = min(TEXT_MAX_TOKENS, getattr(self.model.config.text_config, "max_position_embeddings", 256))

    @property
    def identity(self) -> str:  # of the current weights, wherever they were loaded from
        return f"biomedclip@{_weights_hash(self.model)}+{TEXT_FEATURES}"

    @property
    def tokenizer(self):
        return self.processor.tokenizer

    def text_features(self, texts: list[str]) -> torch.Tensor:
        def embed(enc):
            return _pooled(self.model.get_text_features(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]))

        return embed_windows(self.tokenizer, embed, texts, self.max_length)

    def image_features(self, images: list[bytes]) -> torch.Tensor:
        decoded = []
        for data in images:
            with Image.open(io.BytesIO(data)) as im:
                decoded.append(im.convert("RGB"))
        pixels = self.processor.image_processor(images=decoded, return_tensors="pt")["pixel_values"]
        return nn.functional.normalize(_pooled(self.model.get_image_features(pixel_values=pixels)), dim=-1)

    def save(self, out: Path) -> None:
        self.model.save_pretrained(out)
        self.processor.save_pretrained(out)


def build_backbone(cfg: dict, model_dir: Path | None = None) -> nn.Module:
    """The backbone a selector config names: the original to train from, or with `model_dir` the one saved
    with that selector (its fine-tuned copy, when it was fine-tuned)."""
    tuned = str(model_dir / "backbone") if model_dir is not None and cfg["finetune_backbone"] else None
    if cfg["backbone"] == "biomedclip":
        return DualEncoderBackbone(tuned or cfg["backbone_model"])
    return MiniLMBackbone(tuned, trainable=model_dir is None and cfg["finetune_backbone"])


def encode(backbone: nn.Module, units: pd.DataFrame, images: ImageStore | Path, lexical: bool = True) -> torch.Tensor:
    """Features of `units` with gradients (fine-tuning): see `combine`."""
    images = ImageStore.of(images)
    return combine(backbone.text_features(units["context"].tolist()), backbone.text_features(units["qa"].tolist()),
                   backbone.image_features([images.read(u) for u in units["image"]]),
                   torch.from_numpy(grounding(units)) if lexical else None, lambda xs: torch.cat(xs, dim=1))


class Featurizer:
    """Frozen features of units through one backbone: each unique text and image is encoded once across epochs,
    stages and experiments (EmbeddingCache, keyed by the backbone's identity and the content). With a Ray
    `engine`, what the cache lacks is encoded by `engine.workers` actors, each building the backbone that
    `spec` = (selector config, model folder or None) names (`build_backbone`)."""

    def __init__(self, backbone: nn.Module, images: ImageStore | Path, cache_dir: Path, lexical: bool = True,
                 engine: Engine | None = None, spec: tuple[dict, Path | None] | None = None):
        self.backbone, self.store, identity = backbone, ImageStore.of(images), backbone.identity
        self.lexical, self.dim = lexical, backbone.dim + int(lexical)
        self.texts = EmbeddingCache(cache_dir, "text", f"{identity}:text")
        self.images = EmbeddingCache(cache_dir, "image", f"{identity}:image")
        self.remote = (engine, spec) if engine is not None and engine.ray else None

    def encode(self, kind: str, items: list) -> np.ndarray:
        if self.remote is None:
            return (batched(self.backbone.text_features, items, size=len) if kind == "text"
                    else batched(self.backbone.image_features, items))
        (engine, (cfg, model_dir)), out = self.remote, np.zeros((len(items), 0), np.float32)
        order = in_order_of(items, len if kind == "text" else None)  # texts by length, as `batched` takes them
        rows = [{"i": i, "kind": kind, "item": items[i]} for i in order]
        for batch in map_rows(engine, rows, RayEncoder, 1024, cfg=cfg, model_dir=model_dir,
                              identity=self.backbone.identity):
            if out.shape[1] == 0:
                out = np.zeros((len(items), batch["vector"].shape[1]), np.float32)
            out[batch["i"]] = batch["vector"]  # batches come back in any order
        return out

    def __call__(self, units: pd.DataFrame) -> np.ndarray:
        if units.empty:
            return np.zeros((0, self.dim), np.float32)
        texts = list(dict.fromkeys([*units["context"], *units["qa"]]))  # a figure's context is encoded once
        names = list(dict.fromkeys(units["image"]))  # each image read and hashed once
        data = [self.store.read(n) for n in names]
        text = self.texts.get_or_encode([t.encode() for t in texts],
                                        lambda idx: self.encode("text", [texts[i] for i in idx]))
        image = self.images.get_or_encode(data, lambda idx: self.encode("image", [data[i] for i in idx]))
        row, image_row = {t: i for i, t in enumerate(texts)}, {n: i for i, n in enumerate(names)}
        return combine(text[[row[t] for t in units["context"]]], text[[row[t] for t in units["qa"]]],
                       image[[image_row[u] for u in units["image"]]], grounding(units) if self.lexical else None,
                       np.hstack).astype(np.float32)


class RayEncoder:
    """A Ray actor (engine.kind: ray): the backbone a selector config names, encoding batches of texts or images;
    it refuses to start if its weights are not the stage's (`identity`)."""

    def __init__(self, cfg: dict, model_dir: Path | None, identity: str, threads: int):
        torch.set_num_threads(threads)
        tensors_own_pages()
        self.backbone = build_backbone(cfg, model_dir).eval()
        if self.backbone.identity != identity:
            raise ValueError(f"a Ray worker's backbone is {self.backbone.identity}, the stage's {identity}: install "
                             "the same backbone weights on every node")

    def __call__(self, batch: dict) -> dict:
        items = list(batch["item"])
        fn = self.backbone.text_features if batch["kind"][0] == "text" else self.backbone.image_features
        with torch.inference_mode():
            return {"i": batch["i"], "vector": fn(items).float().numpy()}


def missing_images(units: pd.DataFrame, images: ImageStore | Path) -> list[str]:
    images = ImageStore.of(images)
    return [u for u, image in units["image"].items() if image not in images]


# ---------------------------------------------------------------- head and training

class Selector(nn.Module):
    def __init__(self, in_dim: int = 3 * TEXT_DIM + IMAGE_DIM + 1, hidden: int = 256, dropout: float = 0.1):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(in_dim, hidden), nn.ReLU(), nn.Dropout(dropout),
                                 nn.Linear(hidden, hidden // 2), nn.ReLU(), nn.Linear(hidden // 2, 1))

    def forward(self, x):
        return self.net(x).squeeze(-1)


def pair_tensors(pairs: pd.DataFrame, index: dict[str, int]):
    """(preferred rows, other rows, weights, counts) for decided pairs whose units are both known."""
    weight = pd.to_numeric(pairs["weight"], errors="coerce").to_numpy(dtype=float)
    bad = ~np.isfinite(weight) | (weight < 0)
    if bad.any():
        n = int(np.flatnonzero(bad)[0])
        raise ValueError(f"preference pair {n + 1} ({pairs['a_id'].iloc[n]} vs {pairs['b_id'].iloc[n]}): weight "
                         f"{pairs['weight'].iloc[n]} is not a finite number >= 0; fix merge_preferences' inputs")
    label = pd.to_numeric(pairs["label"], errors="coerce").to_numpy(dtype=float)
    decided = np.isin(label, (0, 1))
    known = (pairs["a_id"].isin(index) & pairs["b_id"].isin(index)).to_numpy()
    keep = decided & known
    a = np.array([index[x] for x in pairs["a_id"][keep]], dtype=np.int64)
    b = np.array([index[x] for x in pairs["b_id"][keep]], dtype=np.int64)
    win, lose = np.where(label[keep] == 1, a, b), np.where(label[keep] == 1, b, a)
    counts = {"ties_masked": int((~decided).sum()), "missing_units": int((decided & ~known).sum())}
    return torch.from_numpy(win), torch.from_numpy(lose), torch.tensor(weight[keep], dtype=torch.float32), counts


def pair_loss(s_win: torch.Tensor, s_lose: torch.Tensor, weight: torch.Tensor, cfg: TrainConfig,
              mean_weight: float) -> torch.Tensor:
    """The batch's share of sum(w * loss) / sum(w) over all training pairs: a batch with a clinician pair weighs
    more than one without, as in the full objective (dividing by the batch's own weights would even them out)."""
    diff = s_win - s_lose
    per_pair = torch.clamp(cfg.margin - diff, min=0) if cfg.loss == "hinge" else nn.functional.softplus(-diff)
    return (weight * per_pair).sum() / (len(weight) * mean_weight)


def pair_report(scores: torch.Tensor, win: torch.Tensor, lose: torch.Tensor) -> dict:
    """{pairs, ties, n, k, rate, low, high}: of `pairs`, `ties` score both units equal (neither right nor wrong); `rate`
    is the share of the other `n` ordered as preferred (`k` of them), with its 95% Wilson interval (low..high)."""
    diff = scores[win] - scores[lose]
    ties, right = int((diff == 0).sum()), int((diff > 0).sum())
    return {"pairs": len(win), "ties": ties, **rate(right, len(win) - ties),
            "ties_half": ties_half(right, ties, len(win) - ties)}


def ranking_metrics(scores: torch.Tensor, win: torch.Tensor, lose: torch.Tensor) -> dict:
    """AUC (with its 95% interval), average precision and mean rank (0 top .. 1 bottom) of preferred answers
    among the answers of some pairs."""
    if len(win) == 0:
        return {"auc": None, "auc_low": None, "auc_high": None, "map": None, "mean_rank": None}
    s = torch.cat([scores[win], scores[lose]]).numpy()
    y = np.r_[np.ones(len(win)), np.zeros(len(lose))]
    rank = (rankdata(-s, method="average") - 1) / max(len(s) - 1, 1)  # equal scores share their mean rank
    auc = float(roc_auc_score(y, s))
    low, high = auc_interval(auc, len(win), len(lose)) or (None, None)
    return {"auc": round(auc, 5), "auc_low": low, "auc_high": high,
            "map": round(float(average_precision_score(y, s)), 5), "mean_rank": round(float(rank[: len(win)].mean()), 5)}


def split_report(scores: torch.Tensor, held: dict) -> dict:
    """What one split's pairs say of `scores`: model-pair accuracy and clinician alignment (with ranking metrics)."""
    return {"model_accuracy": pair_report(scores, *held["model"]),
            "clinician_alignment": pair_report(scores, *held["clinician"]), **ranking_metrics(scores, *held["clinician"])}


def train(features: Callable[[torch.Tensor], torch.Tensor], n_units: int, in_dim: int, pairs: pd.DataFrame,
          index: dict[str, int], cfg: TrainConfig, backbone: nn.Module | None = None, choose_on_clinicians: bool = True):
    """Train on split=="train" pairs; `features(unit rows)` gives the head's input (cached rows, or the
    backbone's output with gradients when `backbone` is passed to be fine-tuned). The epoch is chosen on the
    validation pairs (clinician alignment first, unless `choose_on_clinicians` is off, then model-pair accuracy);
    the test pairs are scored once, by the chosen epoch. Returns the head, the per-epoch history (train and
    validation figures only) and stats with the validation and test reports."""
    unknown = sorted(set(pairs["split"]) - set(SPLITS))
    if unknown:
        raise ValueError(f"preference pairs have split {unknown[0]!r}; the splits are {', '.join(SPLITS)}: rerun "
                         "merge_preferences (dvc repro merge_preferences)")
    torch.manual_seed(cfg.seed)
    torch.use_deterministic_algorithms(True, warn_only=True)
    counts = pair_tensors(pairs, index)[3]  # over every split
    tr_w, tr_l, tr_wt, _ = pair_tensors(pairs[pairs["split"] == "train"], index)
    held = {split: {src: pair_tensors(pairs[(pairs["split"] == split) & (pairs["source"] == src)], index)[:2]
                    for src in ("model", "clinician")} for split in ("validation", "test")}
    if not len(tr_w):
        raise ValueError("no training pairs: check merge_preferences' output (data/preferences/pairs.parquet)")
    mean_weight = float(tr_wt.mean())
    head = Selector(in_dim, cfg.hidden, cfg.dropout)
    groups = [{"params": head.parameters(), "lr": cfg.lr}]
    if backbone is not None:
        groups.append({"params": [p for p in backbone.parameters() if p.requires_grad], "lr": cfg.backbone_lr})
    opt = torch.optim.Adam(groups)
    gen = torch.Generator().manual_seed(cfg.seed)
    history, best, best_key = [], None, None

    def score_all() -> torch.Tensor:
        with torch.no_grad():
            return torch.cat([head(features(torch.arange(i, min(i + 1024, n_units)))) for i in range(0, n_units, 1024)])

    for epoch in range(1, cfg.epochs + 1):
        head.train()
        if backbone is not None:
            backbone.train()
        perm, total = torch.randperm(len(tr_w), generator=gen), 0.0
        for i in range(0, len(perm), cfg.batch_size):
            j = perm[i:i + cfg.batch_size]
            rows, inverse = torch.unique(torch.cat([tr_w[j], tr_l[j]]), return_inverse=True)
            s = head(features(rows))
            loss = pair_loss(s[inverse[:len(j)]], s[inverse[len(j):]], tr_wt[j], cfg, mean_weight)
            if not torch.isfinite(loss):
                raise ValueError(f"train_selector: the loss became {loss.item()} in epoch {epoch}; lower "
                                 f"train_selector.lr (now {cfg.lr})")
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += loss.item() * len(j)
        head.eval()
        if backbone is not None:
            backbone.eval()
        s = score_all()
        val = split_report(s, held["validation"])
        row = {"epoch": epoch, "train_loss": round(total / len(perm), 6),
               "train_pair_accuracy": pair_report(s, tr_w, tr_l)["rate"],
               "validation_model_accuracy": val["model_accuracy"]["rate"],
               "validation_clinician_alignment": val["clinician_alignment"]["rate"],
               **{f"validation_{k}": val[k] for k in ("auc", "map", "mean_rank")}}
        history.append(row)
        key = (_or(row["validation_clinician_alignment"]) if choose_on_clinicians else 0.0,
               _or(row["validation_model_accuracy"]), epoch)
        if best_key is None or key > best_key:
            best_key = key
            best = (copy.deepcopy(head.state_dict()), copy.deepcopy(backbone.state_dict()) if backbone else None)
    head.load_state_dict(best[0])
    if backbone is not None:
        backbone.load_state_dict(best[1])
    s = score_all()
    n = {(split, src): len(held[split][src][0]) for split in held for src in ("model", "clinician")}
    chosen_on = ([] if not (choose_on_clinicians and n["validation", "clinician"]) else ["clinician alignment"]) + \
        (["model-pair accuracy"] if n["validation", "model"] else [])
    warnings = [f"no {src} {split} pairs" + (": the last epoch is kept" if split == "validation" and not chosen_on
                                             else "") for (split, src), k in n.items() if not k]
    stats = {"train_pairs": len(tr_w), "pairs_masked_ties": counts["ties_masked"],
             "pairs_missing_units": counts["missing_units"], "best_epoch": best_key[2],
             "train_loss": history[best_key[2] - 1]["train_loss"],
             "epoch_chosen_on": "validation " + ", then ".join(chosen_on) if chosen_on else "(no validation pairs)",
             "warnings": warnings, "validation": split_report(s, held["validation"]),
             "test": split_report(s, held["test"])}
    return head.eval(), history, stats


def _or(x: float | None) -> float:
    return -1.0 if x is None else x


def fit(units: pd.DataFrame, pairs: pd.DataFrame, cfg: TrainConfig, images: ImageStore | Path, cache_dir: Path,
        model_only: bool = False, engine: Engine | None = None):
    """Train a selector on the units that some pair names: frozen (features from the embedding cache) or with
    the backbone fine-tuned end to end. `model_only`: the w = 0 baseline, trained on model pairs alone and its
    epoch chosen on validation model pairs (no clinician judgement is used; its clinician figures are still
    reported). Returns (head, backbone, history, stats)."""
    if model_only:
        pairs = pairs[~((pairs["source"] == "clinician") & (pairs["split"] == "train"))]
    named = set(pairs["a_id"]) | set(pairs["b_id"])
    units, images = units[units.index.isin(named)], ImageStore.of(images)
    backbone = build_backbone(asdict(cfg))
    if cfg.finetune_backbone:  # the backbone encodes each batch, with gradients
        def features(rows):
            return encode(backbone, units.iloc[rows.tolist()], images, cfg.lexical_grounding)
    else:  # every unique text and image encoded once
        x = torch.from_numpy(Featurizer(backbone, images, cache_dir, cfg.lexical_grounding, engine,
                                        (asdict(cfg), None))(units))

        def features(rows):
            return x[rows]
    head, history, stats = train(features, len(units), backbone.dim + int(cfg.lexical_grounding), pairs,
                                 {u: i for i, u in enumerate(units.index)},
                                 cfg, backbone if cfg.finetune_backbone else None, choose_on_clinicians=not model_only)
    return head, backbone, history, {"units": len(units), **long_texts(backbone, units), **stats}


# ---------------------------------------------------------------- saving, loading, scoring

def save(head: Selector, backbone: nn.Module, out_dir: Path, cfg: TrainConfig, best_epoch: int,
         trained_on: str = "clinician and model pairs") -> dict:
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.save(head.state_dict(), out_dir / "selector.pt")
    if cfg.finetune_backbone:
        backbone.save(out_dir / "backbone")
    meta = {**asdict(cfg), "trained_on": trained_on, "backbone_identity": backbone.identity,
            "in_dim": head.net[0].in_features, "best_epoch": best_epoch}
    (out_dir / "config.json").write_text(json.dumps(meta, indent=2) + "\n")
    return meta


def load(model_dir: Path) -> tuple[Selector, nn.Module, dict]:
    """The head, the backbone it was trained on, and its config; refuses a backbone that is not the same."""
    meta = json.loads((model_dir / "config.json").read_text())
    backbone = build_backbone(meta, model_dir)
    dim = backbone.dim + int(meta.get("lexical_grounding", False))
    if backbone.identity != meta["backbone_identity"] or dim != meta["in_dim"]:
        raise ValueError(f"{model_dir}/config.json: the selector was trained on backbone {meta['backbone_identity']!r} "
                         f"({meta['in_dim']} features) but it now loads as {backbone.identity!r} ({dim}): "
                         "the backbone's weights changed. Retrain it: dvc repro -f train_selector")
    head = Selector(meta["in_dim"], meta["hidden"], meta["dropout"])
    head.load_state_dict(torch.load(model_dir / "selector.pt", weights_only=True))
    return head.eval(), backbone.eval(), meta


def score(head: Selector, features: np.ndarray, batch_size: int = 8192) -> np.ndarray:
    out = []
    with torch.no_grad():
        for i in range(0, len(features), batch_size):
            out.append(head(torch.from_numpy(features[i:i + batch_size])).numpy())
    return np.concatenate(out) if out else np.zeros(0, np.float32)


def _unit_scores(head: Selector, featurize: Featurizer, units: pd.DataFrame, model_dir: Path) -> dict[str, float]:
    s = score(head, featurize(units))
    if not np.isfinite(s).all():
        bad = units.index[~np.isfinite(s)]
        raise ValueError(f"the selector in {model_dir} scored {len(bad)} unit(s) as NaN or infinite (first: "
                         f"{bad[0]}); retrain it (dvc repro train_selector), e.g. with a lower train_selector.lr")
    return dict(zip(units.index, s.tolist()))


def score_conversations(conversations: Iterable[Conversation], records: dict[str, CorpusRecord],
                        images: ImageStore | Path, cache_dir: Path, model_dir: Path, chunk: int = 4096,
                        engine: Engine | None = None) -> tuple[dict[str, float], dict]:
    """{conversation id: score} with the trained selector, taking `chunk` conversations at a time from any
    iterable (a generator reading a file is never held whole, and features are never all in memory). A
    non-finite score is an error naming the unit."""
    head, backbone, meta = load(model_dir)
    featurize = Featurizer(backbone, images, cache_dir, meta["lexical_grounding"], engine, (meta, model_dir))
    first = meta["unit"] == "round" and meta["aggregate"] == "first"  # the other rounds would not count
    out = {}
    for part in chunks(conversations, chunk):
        scored = [dataclasses.replace(c, conversations=c.conversations[:2]) for c in part] if first else part
        scores = _unit_scores(head, featurize, build_units(records, scored, [], meta["unit"]), model_dir)
        out.update({c.id: conversation_score(c, scores, meta["unit"], meta["aggregate"]) for c in part})
    return out, meta


def score_pool_answers(pool: list[PoolItem], images: ImageStore | Path, cache_dir: Path,
                       model_dir: Path, engine: Engine | None = None) -> dict[str, float]:
    """{`<question_id>:A|B`: score} of clinician-judged pool answers with the trained selector."""
    head, backbone, meta = load(model_dir)
    return _unit_scores(head, Featurizer(backbone, images, cache_dir, meta["lexical_grounding"], engine,
                                         (meta, model_dir)),
                        build_units({}, [], pool, meta["unit"]), model_dir)
