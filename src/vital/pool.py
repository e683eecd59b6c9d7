"""Stage `annotation_pool`: a diverse set of figures for clinicians, each with questions and two answers.

Figures are embedded (MiniLM caption+mention text, plus image features), clustered with k-means, and
the `per_cluster` figures nearest each centre are pooled, so clinicians see every kind of figure
rather than a thousand chest X-rays. For each pooled figure the backend writes a multi-round
conversation with two distinct answers to every question (as the authors' two-answer generation did),
and the pool takes its first `questions_per_figure` questions with their answers (A and B) for
clinicians to mark acceptable or not. A reply with no such round (unparseable, or a refusal:
replies.rejected_reply) is asked again once; a figure whose second reply has none is left out and
counted (`unparsed_replies`, `unparsed_by_reason`, `unparsed_figures`).
"""
from __future__ import annotations

import re
from collections.abc import Sized
from pathlib import Path

import numpy as np
from sklearn.cluster import KMeans

from .llm.backends import image_part
from .images import ImageStore
from .llm.client import Requests
from .encoders import IMAGE_DIM, IMAGE_FEATURES, TEXT_DIM, EmbeddingCache, cached_text_encoder, encode_images, encode_texts
from .generate import figure_text
from .replies import REASONS, entry_rejected
from .schema import AppendLog, PoolItem, chunks

POOL_PROMPT = (
    "You are an AI assistant with expertise in biomedical images, helping to build questions for clinicians to "
    "judge. You are shown a figure from a biomedical paper with its caption and the sentences that mention it. "
    "Write a conversation about the image: diverse questions a person looking at it would ask (the modality, the "
    "organ and anatomy, the location and side, possible diseases, the size and number of findings), at least "
    "{rounds} of them, and for every question two different answers, each a distinct explanation or perspective "
    "grounded in the image, so that clinicians can judge which is acceptable. Never say that information comes "
    "from a caption or text. Format each round as three lines: 'User: <question>', 'Answer 1: <answer>' and "
    "'Answer 2: <answer>'.")
_LINE = re.compile(r"^\s*(?:\d+[.)]\s*)?[*_#\s]*(user|human|question|q|answer\s*[12ab]|assistant\s*[12ab]|a|b)[*_\s]*:"
                   r"[*_\s]*(.*)$", re.I)


def figure_embeddings(records: Sized, images: ImageStore | Path, image_weight: float,
                      cache_dir: Path | None = None, chunk: int = 4096) -> np.ndarray:
    """(n, TEXT_DIM + IMAGE_DIM) float32: caption + mentions (MiniLM) and image descriptors, encoded `chunk`
    figures at a time into one preallocated matrix (a corpus's records and images are never all in memory:
    `records` may be a Replay of the file, the features are never copied whole); with `cache_dir`, through the
    embedding cache (a grown corpus encodes only its new figures)."""
    images = ImageStore.of(images)
    text_encoder = cached_text_encoder(cache_dir) if cache_dir is not None else encode_texts
    image_cache = EmbeddingCache(cache_dir, "image", IMAGE_FEATURES) if cache_dir is not None else None
    # float32, as the encoders give them (2 KB a figure; float64 took 4): k-means picks the same figures
    emb = np.zeros((len(records), TEXT_DIM + IMAGE_DIM), np.float32)
    img = np.zeros((len(records), IMAGE_DIM), np.float32)
    for i, part in zip(range(0, len(records), chunk), chunks(records, chunk)):
        data = [images.read(r.image) for r in part]
        emb[i:i + len(part), :TEXT_DIM] = text_encoder([r.caption + " " + " ".join(r.inline_mentions) for r in part])
        img[i:i + len(part)] = (encode_images(data) if image_cache is None else
                                image_cache.get_or_encode(data, lambda idx: encode_images([data[i] for i in idx])))
    if len(records):  # unit-scale, like the text part
        mean, std = img.mean(0), img.std(0)
        img -= mean
        img /= std + 1e-6
        emb[:, TEXT_DIM:] = img / np.sqrt(IMAGE_DIM)
        emb[:, TEXT_DIM:] *= image_weight
    return emb


def select_diverse(emb: np.ndarray, clusters: int, per_cluster: int, seed: int) -> list[tuple[int, int]]:
    """(row index, cluster) of the `per_cluster` rows nearest each k-means centre."""
    k = min(clusters, len(emb))
    # copy_x=False: k-means centres `emb` in place and adds the mean back after (no copy of the corpus's features;
    # the same clusters, and the pool checked the same on 10,000 and 30,000 figures)
    km = KMeans(n_clusters=k, n_init=10, random_state=seed, copy_x=False).fit(emb)
    chosen = []
    for c in range(k):
        members = np.where(km.labels_ == c)[0]
        dist = np.linalg.norm(emb[members] - km.cluster_centers_[c], axis=1)  # one cluster's rows at a time
        chosen += [(int(i), c) for i in members[np.argsort(dist, kind="stable")][:per_cluster]]
    return sorted(chosen)


def parse_pool_reply(reply: str) -> list[tuple[str, str, str]]:
    """(question, answer 1, answer 2) of each round of a reply in `User:` / `Answer 1:` / `Answer 2:` lines (also
    `Question:`, `Answer A:`, `A:`, numbered or bold); rounds without two different answers are left out."""
    rounds, current = [], None
    for line in reply.splitlines():
        m = _LINE.match(line)
        if not m:
            if current and line.strip():  # a continuation line of the last field
                current[-1][1].append(line.strip())
            continue
        who = m.group(1).lower().replace(" ", "")
        if who in ("user", "human", "question", "q"):
            current = [("q", [m.group(2).strip()])]
            rounds.append(current)
        elif current is not None:
            current.append(("a", [m.group(2).strip()]))
    out = []
    for r in rounds:
        q, answers = " ".join(r[0][1]), [" ".join(v) for k, v in r[1:] if k == "a"]
        if q and len(answers) >= 2 and answers[0] and answers[1] and answers[0] != answers[1]:
            out.append((q, answers[0], answers[1]))
    return out


def build_pool(records: Sized, images: ImageStore | Path, client, log: AppendLog, clusters: int,
               per_cluster: int, questions_per_figure: int, image_weight: float, seed: int, max_image_side: int = 0,
               cache_dir: Path | None = None):
    """(pool items, failures, stats): one request per pooled figure, its first `questions_per_figure` questions.
    `records`: CorpusRecords, a list or a Replay (gone through twice: embeddings, then the pooled figures)."""
    images = ImageStore.of(images)
    emb = figure_embeddings(records, images, image_weight, cache_dir)
    picked = select_diverse(emb, clusters, per_cluster, seed)
    system = POOL_PROMPT.format(rounds=questions_per_figure)

    def build(x):
        r, _ = x
        return [{"role": "system", "content": system},
                {"role": "user", "content": [{"type": "text", "text": figure_text(r.caption, r.inline_mentions)},
                                             image_part(images.read(r.image), max_image_side)]}]

    cluster_of = dict(picked)
    items = [(r.id, (r, cluster_of[i])) for i, r in enumerate(records) if i in cluster_of]  # in row order
    rows, stats, failures = client.run(Requests(items, build), log, "pool", {}, lambda k, e: e, "annotation_pool",
                                       rejected=entry_rejected)
    pool, unparsed, short, why = [], [], [], dict.fromkeys(REASONS, 0)
    for fid, (r, cluster) in items:
        if fid not in rows:
            continue  # failed: listed in failures
        reply = rows[fid]["reply"]
        rounds = {}
        for q, a, b in parse_pool_reply(reply):
            rounds.setdefault(q, (q, a, b))  # a question asked twice: its first answers
        rounds = list(rounds.values())
        said = [m.group(1).lower() for m in map(_LINE.match, reply.splitlines()) if m]
        if rows[fid].get("finish_reason") == "length" and rounds and said and said[-1] not in ("user", "human",
                                                                                              "question", "q"):
            rounds = rounds[:-1]  # cut at max_tokens inside an answer: never show clinicians half an answer
        if not rounds:
            unparsed.append(fid)
            why[entry_rejected(rows[fid]) or "unparseable"] += 1  # (or a reply cut inside its only answer)
        elif len(rounds) < questions_per_figure:
            short.append(fid)
        for k, (q, a, b) in enumerate(rounds[:questions_per_figure]):
            pool.append(PoolItem(question_id=f"{fid}:q{k}", figure_id=fid, image=r.image, domain=r.domain,
                                 caption=r.caption, inline_mentions=r.inline_mentions, cluster=cluster, question=q,
                                 answer_a=a, answer_b=b, backend=client.name, request_hash=rows[fid]["request_hash"]))
    stats.update(figures=len(picked), clusters=min(clusters, len(records)), questions=len(pool),
                 distinct_questions=len({p.question for p in pool}), unparsed_replies=len(unparsed),
                 unparsed_by_reason=why,
                 unparsed_figures=unparsed[:20], figures_with_fewer_questions=len(short),
                 fewer_questions_figures=short[:20])
    return pool, failures, stats
