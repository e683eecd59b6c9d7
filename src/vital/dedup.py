"""Stage `dedup`: one figure per group of exact or near-duplicate figures, before any request is paid for.

Three tests, none of them over all pairs:
- exact: sha256 of the decoded pixels (RGB, with the size), so the same image saved again (PNG, TIFF, other
  metadata or compression) is the same figure. A lossy save (JPEG) changes pixels: the next test catches it.
- near image: the 64-bit perceptual hash (`imagehash.phash`: DCT of the 32x32 grey image), Hamming distance
  <= `dedup.phash_distance`. Only hashes that share a band are compared: the hash is cut into
  phash_distance + 1 bands, and two hashes within the distance agree on at least one whole band.
- near caption: MinHash of the caption's word 3-grams (`datasketch`) in an LSH index at Jaccard >=
  `dedup.caption_jaccard`, each candidate then checked on its estimated Jaccard. Captions under
  MIN_CAPTION_WORDS words are not compared ("Chest X-ray." names no one figure), nor are figures of one
  paper (same pmid): the panels of a compound figure share a caption but not their pixels.

Figures linked by any test form a group (union-find). The group keeps its figure with the most pixels (the
best copy to train on), ties to the smallest id; every other one is listed with the reason and distance of
the link that joined it, the figure on the other end, and the figure kept.

`decontaminate` uses the same hashes and indexes against the evaluation sets.
"""
from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from typing import Iterable, Iterator

import numpy as np
from PIL import Image

MIN_CAPTION_WORDS = 8  # shorter captions are too generic to name a figure
SCHEME = "affine32"  # datasketch's hashing scheme (its default since 2.0)
NUM_PERM = 128  # MinHash permutations: the Jaccard estimate's standard error is about 0.04 at J = 0.8
BLOCK = 1 << 22  # hash comparisons per numpy block (memory stays ~100 MB however skewed the bands are)


@dataclass
class Duplicate:
    """A figure left out of the corpus, and why."""
    id: str
    duplicate_of: str  # the figure its group keeps
    reason: str  # exact_pixels | near_image | near_caption
    matched: str  # the figure it was linked to (the kept one, or one linked to it)
    distance: float  # near_image: Hamming bits of 64; near_caption: 1 - Jaccard; exact: 0


# ------------------------------------------------------------------ hashes

def image_hashes(im: Image.Image) -> tuple[str, int]:
    """(sha256 of the decoded RGB pixels and size, 64-bit pHash as an int) of one image."""
    import imagehash

    rgb = im.convert("RGB")
    h = hashlib.sha256(f"{rgb.width}x{rgb.height}\n".encode())
    h.update(rgb.tobytes())
    return h.hexdigest(), int(str(imagehash.phash(rgb)), 16)


def words(text: str) -> list[str]:
    return re.findall(r"[a-z0-9]+", text.lower())


def shingles(text: str, n: int) -> set[bytes]:
    """The word n-grams of a text (the whole text when it is shorter than n words)."""
    w = words(text)
    return {" ".join(w[i:i + n]).encode() for i in range(max(1, len(w) - n + 1))} if w else set()


def minhashes(texts: Iterable[str], n: int) -> np.ndarray:
    """MinHash signatures (one row of NUM_PERM uint32 per text) of the texts' word n-grams."""
    from datasketch import MinHash

    rows = [m.hashvalues for m in MinHash.generator((list(shingles(t, n)) for t in texts),  # one permutation set
                                                     num_perm=NUM_PERM, seed=1, scheme=SCHEME)]
    return np.array(rows, dtype=np.uint32).reshape(len(rows), NUM_PERM)


def lean(signature: np.ndarray):
    """One row of `minhashes` as the MinHash object datasketch's indexes take."""
    from datasketch import LeanMinHash

    return LeanMinHash(seed=1, hashvalues=signature, scheme=SCHEME)


def minhash_pairs(a: np.ndarray, b: np.ndarray | None, threshold: float) -> Iterator[tuple[int, int, float]]:
    """(i, j, estimated Jaccard >= threshold) for signatures a[i], b[j] (b None: within a, i < j), the
    candidates from datasketch's LSH index over b (or a). Its bands are set for recall: the longest rows
    (fewest false candidates) with which a pair at the threshold is a candidate with p >= 0.995 (a false
    candidate costs one check, a missed one a duplicate left in)."""
    from datasketch import MinHashLSH

    r = max((r for r in range(1, NUM_PERM + 1) if 1 - (1 - threshold ** r) ** (NUM_PERM // r) >= 0.995), default=1)
    lsh = MinHashLSH(num_perm=NUM_PERM, params=(NUM_PERM // r, r))
    index = a if b is None else b
    for j, row in enumerate(index):
        lsh.insert(j, lean(row), check_duplication=False)
    for i, row in enumerate(a):
        for j in lsh.query(lean(row)):
            if b is None and j <= i:
                continue
            jac = float(np.mean(row == index[j]))
            if jac >= threshold:
                yield i, j, jac


def _bands(h: np.ndarray, max_distance: int) -> list[np.ndarray]:
    n = max_distance + 1
    widths = [64 // n + (k < 64 % n) for k in range(n)]
    out, shift = [], 0
    for w in widths:
        out.append((h >> np.uint64(shift)) & np.uint64((1 << w) - 1))
        shift += w
    return out


def hamming_pairs(a: np.ndarray, b: np.ndarray | None, max_distance: int) -> Iterator[tuple[int, int, int]]:
    """(i, j, Hamming distance <= max_distance) for 64-bit hashes a[i], b[j] (b None: within a, i < j), each
    pair once. Only hashes agreeing on one of max_distance + 1 bands are compared (pigeonhole: none is missed)."""
    a = np.asarray(a, dtype=np.uint64)
    other = a if b is None else np.asarray(b, dtype=np.uint64)
    if not len(a) or not len(other):
        return
    seen: set[tuple[int, int]] = set()
    for ka, kb in zip(_bands(a, max_distance), _bands(other, max_distance)):
        keys = np.concatenate([ka, kb]) if b is not None else ka
        order = np.argsort(keys, kind="stable")
        cuts = np.flatnonzero(np.diff(keys[order])) + 1
        for group in np.split(order, cuts):
            if b is None:
                left = right = group
            else:
                left, right = group[group < len(a)], group[group >= len(a)] - len(a)
            if not len(left) or not len(right) or (b is None and len(group) < 2):
                continue
            step = max(1, BLOCK // len(right))
            for s in range(0, len(left), step):
                rows = left[s:s + step]
                d = np.bitwise_count(a[rows][:, None] ^ other[right][None, :])
                for r, c in zip(*np.nonzero(d <= max_distance)):
                    i, j = int(rows[r]), int(right[c])
                    if b is None and i >= j:
                        continue
                    if (i, j) not in seen:
                        seen.add((i, j))
                        yield i, j, int(d[r, c])


# ------------------------------------------------------------------ groups

def find_duplicates(ids: list[str], pixels: list[str], phash: np.ndarray, size: list[int], captions: list[str],
                    pmids: list[str | None], phash_distance: int, caption_jaccard: float) -> list[Duplicate]:
    """The figures to leave out (see the module docstring for the tests and the rule of which one is kept)."""
    n = len(ids)
    links: list[tuple[int, int, str, float]] = []
    first: dict[str, int] = {}
    for i, p in enumerate(pixels):
        if p in first:
            links.append((first[p], i, "exact_pixels", 0.0))
        else:
            first[p] = i
    links += [(i, j, "near_image", float(d)) for i, j, d in hamming_pairs(phash, None, phash_distance)
              if pixels[i] != pixels[j]]
    long = [i for i in range(n) if len(words(captions[i])) >= MIN_CAPTION_WORDS]
    if long:
        sig = minhashes([captions[i] for i in long], 3)
        for x, y, jac in minhash_pairs(sig, None, caption_jaccard):
            i, j = long[x], long[y]
            if not (pmids[i] and pmids[i] == pmids[j]):
                links.append((i, j, "near_caption", round(1 - jac, 4)))

    parent = list(range(n))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for i, j, _, _ in links:
        parent[root(i)] = root(j)
    best: dict[int, int] = {}
    for i in range(n):
        r = root(i)
        if r not in best or (-size[i], ids[i]) < (-size[best[r]], ids[best[r]]):
            best[r] = i
    out: dict[int, Duplicate] = {}
    # each dropped figure is reported by the first link that reaches it (exact, then image, then caption)
    for i, j, reason, dist in links:
        for x, y in ((i, j), (j, i)):
            keep = best[root(x)]
            if x != keep and x not in out:
                out[x] = Duplicate(id=ids[x], duplicate_of=ids[keep], reason=reason, matched=ids[y], distance=dist)
    return sorted(out.values(), key=lambda d: d.id)
