"""Stage `annotation_pool`: a diverse set of figures for clinicians, each with questions and two answers.

Figures are embedded (MiniLM caption+mention text, plus image features), clustered with k-means, and
the `per_cluster` figures nearest each centre are pooled, so clinicians see every kind of figure
rather than a thousand chest X-rays. For each pooled figure the first `questions_per_figure` questions
of the generator are asked, and the backend writes two candidate answers (A and B) for clinicians
to mark acceptable or not.
"""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np
from sklearn.cluster import KMeans

from .backends import image_part
from .images import ImageStore
from .client import Requests
from .offline import qa_from_text
from .encoders import encode_images, encode_texts
from .generate import figure_text
from .schema import AppendLog, CorpusRecord, PoolItem

POOL_PROMPT = ("You are helping build a set of questions for clinicians to judge. Given a biomedical figure, "
               "its caption and mentions, and a question about it, write two different candidate answers, "
               "one per line, as 'A: ...' and 'B: ...'.")


def figure_embeddings(records: list[CorpusRecord], images: ImageStore | Path, image_weight: float) -> np.ndarray:
    text = encode_texts([r.caption + " " + " ".join(r.inline_mentions) for r in records])
    images = ImageStore.of(images)
    img = encode_images([images.read(r.image) for r in records])
    img = (img - img.mean(0)) / (img.std(0) + 1e-6) / np.sqrt(img.shape[1])  # unit-scale, like the text part
    return np.hstack([text, image_weight * img])


def select_diverse(emb: np.ndarray, clusters: int, per_cluster: int, seed: int) -> list[tuple[int, int]]:
    """(row index, cluster) of the `per_cluster` rows nearest each k-means centre."""
    k = min(clusters, len(emb))
    km = KMeans(n_clusters=k, n_init=10, random_state=seed).fit(emb)
    dist = np.linalg.norm(emb - km.cluster_centers_[km.labels_], axis=1)
    chosen = []
    for c in range(k):
        members = np.where(km.labels_ == c)[0]
        chosen += [(int(i), c) for i in members[np.argsort(dist[members], kind="stable")][:per_cluster]]
    return sorted(chosen)


def parse_ab(reply: str) -> tuple[str, str] | None:
    a = re.search(r"^\s*A:\s*(.+)$", reply, re.M)
    b = re.search(r"^\s*B:\s*(.+)$", reply, re.M)
    return (a.group(1).strip(), b.group(1).strip()) if a and b else None


def build_pool(records: list[CorpusRecord], images: ImageStore | Path, client, log: AppendLog, clusters: int,
               per_cluster: int, questions_per_figure: int, image_weight: float, seed: int, max_image_side: int = 0):
    """(pool items, failures, stats)."""
    images = ImageStore.of(images)
    emb = figure_embeddings(records, images, image_weight)
    picked = select_diverse(emb, clusters, per_cluster, seed)
    items = []
    for i, cluster in picked:
        r = records[i]
        questions = dict.fromkeys(q for q, _ in qa_from_text(r.caption, " ".join(r.inline_mentions)))
        items += [(f"{r.id}:q{k}", (r, cluster, q)) for k, q in enumerate(list(questions)[:questions_per_figure])]
    meta = dict(items)

    def build(x):
        r, _, q = x
        return [{"role": "system", "content": POOL_PROMPT},
                {"role": "user", "content": [
                    {"type": "text", "text": figure_text(r.caption, r.inline_mentions) + f"\nQuestion: {q}"},
                    image_part(images.read(r.image), max_image_side)]}]

    rows, stats, failures = client.run(Requests(items, build), log, "pool_answers", {}, lambda k, e: e,
                                       "annotation_pool")
    pool, unparsed = [], []
    for qid, _ in items:
        if qid not in rows:
            continue  # failed: listed in failures
        entry = rows[qid]
        ab = parse_ab(entry["reply"])
        if ab is None:
            unparsed.append(qid)
            continue
        r, cluster, q = meta[qid]
        pool.append(PoolItem(question_id=qid, figure_id=r.id, image=r.image, domain=r.domain, caption=r.caption,
                             inline_mentions=r.inline_mentions, cluster=cluster, question=q,
                             answer_a=ab[0], answer_b=ab[1], backend=client.name, request_hash=entry["request_hash"]))
    stats.update(figures=len(picked), clusters=min(clusters, len(records)), questions=len(pool),
                 unparsed_replies=len(unparsed))
    return pool, failures, stats
