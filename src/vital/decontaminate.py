"""Stages `decontaminate` and `decontaminate_qa`: nothing of the evaluation test sets goes into the release.

The eval sets are folders named in `decontaminate.eval_sets` (inside `eval_root`), in any layout
`vital.evalsets` reads: Hugging Face parquet (VQA-RAD, PathVQA), SLAKE, or this repository's eval format.

`decontaminate` (before any paid request) removes a corpus figure whose image matches an eval image (the same
decoded pixels, or a pHash within `phash_distance` bits: re-encoded, resized) or whose caption matches an eval
caption (MinHash Jaccard >= `caption_jaccard`; chat sets have captions). `decontaminate_qa` (after `generate`)
removes a generated round that holds an eval item's question and answer: at least `text_containment` of the
item's word bigrams are in the round (exact, through an inverted index of each item's rarest bigrams), or the MiniLM embeddings of
the two question+answer texts have cosine >= `text_cosine` (a paraphrase). Items of fewer than `min_words`
words ("Is it normal? no") are too generic to match by text; their images are still matched, and they are
counted. Every match is a row of the contamination report: our id, eval set, eval id, kind, distance.
"""
from __future__ import annotations

import math
from collections import Counter

import numpy as np

from .dedup import MIN_CAPTION_WORDS, hamming_pairs, minhash_pairs, minhashes, shingles, words
from .evalsets import EvalSet, EvalSetError, read_eval_set  # noqa: F401 (the stages' reader)

REPORT_COLUMNS = ["id", "eval_set", "eval_id", "kind", "distance"]


# ------------------------------------------------------------------ figures (before generate)

def figure_matches(ids: list[str], pixels: list[str], phash: np.ndarray, captions: list[str],
                   sets: list[EvalSet], phash_distance: int, caption_jaccard: float) -> list[dict]:
    """Report rows for every corpus figure that matches an eval image or caption."""
    rows = []
    for s in sets:
        names = list(s.images)
        exact: dict[str, list[str]] = {}
        for name in names:
            exact.setdefault(s.images[name][0], []).append(name)
        for i, p in enumerate(pixels):
            rows += [_row(ids[i], s.name, name, "image_exact", 0) for name in exact.get(p, [])]
        eval_ph = np.array([s.images[n][1] for n in names], dtype=np.uint64)
        rows += [_row(ids[i], s.name, names[j], "image_phash", d) for i, j, d in
                 hamming_pairs(phash, eval_ph, phash_distance) if pixels[i] != s.images[names[j]][0]]
        ours = [i for i, c in enumerate(captions) if len(words(c)) >= MIN_CAPTION_WORDS]
        theirs = [it for it in s.items if len(words(it["caption"])) >= MIN_CAPTION_WORDS]
        if ours and theirs:
            for x, y, jac in minhash_pairs(minhashes([captions[i] for i in ours], 3),
                                           minhashes([it["caption"] for it in theirs], 3), caption_jaccard):
                rows.append(_row(ids[ours[x]], s.name, theirs[y]["id"], "caption", round(1 - jac, 4)))
    return sorted(rows, key=lambda r: (r["id"], r["eval_set"], r["eval_id"], r["kind"]))


def _row(our_id: str, eval_set: str, eval_id: str, kind: str, distance: float) -> dict:
    return {"id": our_id, "eval_set": eval_set, "eval_id": eval_id, "kind": kind, "distance": distance}


# ------------------------------------------------------------------ generated rounds (before filter)

def qa_text(question: str, answer: str) -> str:
    return f"{question} {answer}".strip()


def containment_pairs(texts: list[set], items: list[set], containment: float) -> list[tuple[int, int, float]]:
    """(k, y, c) for every text k holding at least `containment` of item y's shingles (c = the share held),
    exactly. Prefix filter: a text missing at most (1 - containment) of an item's shingles holds one of its
    len - ceil(containment * len) + 1 rarest, so only those are indexed, and each text looks up its own."""
    freq = Counter(g for q in items for g in q)
    index: dict[bytes, list[int]] = {}
    for y, q in enumerate(items):
        need = math.ceil(containment * len(q) - 1e-9)
        for g in sorted(q, key=lambda g: (freq[g], g))[:len(q) - need + 1]:
            index.setdefault(g, []).append(y)
    out = []
    for k, t in enumerate(texts):
        for y in sorted({y for g in t if g in index for y in index[g]}):
            found = len(items[y] & t) / len(items[y])
            if found >= containment:
                out.append((k, y, found))
    return out


class RoundMatcher:
    """`text_matches` for a stream of rounds: the eval items' side (usable items, word bigrams and, on the first
    call, embeddings) is prepared once, and each call matches one chunk of rounds. `short`: per eval set, the
    items too short to match by text."""

    def __init__(self, sets: list[EvalSet], min_words: int, containment: float, cosine: float | None, embed=None):
        self.containment, self.cosine, self.embed, self.vectors = containment, cosine, embed, None
        self.items = {s.name: [it for it in s.items if len(words(qa_text(it["question"], it["answer"]))) >= min_words]
                      for s in sets}
        self.short = {s.name: len(s.items) - len(self.items[s.name]) for s in sets}
        self.texts = {name: [qa_text(it["question"], it["answer"]) for it in items] for name, items in self.items.items()}
        self.shingles = {name: [shingles(t, 2) for t in texts] for name, texts in self.texts.items()}

    def __call__(self, rounds: list[tuple[str, str]]) -> list[dict]:
        """Report rows for the rounds [(round id, question + answer text)] that hold an eval item."""
        rows = []
        if not rounds or not any(self.items.values()):
            return rows
        texts = [t for _, t in rounds]
        round_shingles = [shingles(t, 2) for t in texts]
        if self.cosine is not None and self.vectors is None:  # embedded once, when there is something to match
            self.vectors = {name: self.embed(t) for name, t in self.texts.items() if t}
        round_vectors = self.embed(texts) if self.cosine is not None else None
        for name, items in self.items.items():
            if not items:
                continue
            for k, y, found in containment_pairs(round_shingles, self.shingles[name], self.containment):
                rows.append(_row(rounds[k][0], name, items[y]["id"], "text_bigrams", round(1 - found, 4)))
            if self.cosine is not None:
                sims = round_vectors @ self.vectors[name].T
                for k, y in zip(*np.nonzero(sims >= self.cosine)):
                    rows.append(_row(rounds[k][0], name, items[y]["id"], "text_embedding",
                                     round(1 - float(sims[k, y]), 4)))
        return sorted(rows, key=lambda r: (r["id"], r["eval_set"], r["eval_id"], r["kind"]))


def text_matches(rounds: list[tuple[str, str]], sets: list[EvalSet], min_words: int, containment: float,
                 cosine: float | None, embed=None) -> tuple[list[dict], dict[str, int]]:
    """Report rows (id: the round's id) for every generated round that holds an eval item's question and
    answer, and per eval set how many items were too short to match by text. `rounds` is [(round id,
    question + answer text)]; `embed` (texts -> L2-normalised rows) is needed when `cosine` is set."""
    match = RoundMatcher(sets, min_words, containment, cosine, embed)
    return match(rounds), match.short


def counts(rows: list[dict], sets: list[EvalSet]) -> dict:
    """Per eval set: matches by kind and distinct ids matched."""
    out = {}
    for s in sets:
        mine = [r for r in rows if r["eval_set"] == s.name]
        kinds = sorted({r["kind"] for r in mine})
        out[s.name] = {"layout": s.layout, "items": len(s.items), "images": len(s.images),
                       "matches": len(mine), "matched_ids": len({r["id"] for r in mine}),
                       "by_kind": {k: sum(r["kind"] == k for r in mine) for k in kinds}}
    return out


def card_section(figures: dict, rounds: dict) -> str:
    """The data card's account of the audit, from the metrics of `decontaminate` (figures) and
    `decontaminate_qa` (rounds)."""
    sets = sorted(set(figures["by_eval_set"]) | set(rounds["by_eval_set"]))
    if not sets:
        return ("## Decontamination\n\nNo evaluation set was checked (`decontaminate.eval_sets` is empty): nothing "
                "is known about overlap with any benchmark.\n")
    t, q = figures["thresholds"], rounds["thresholds"]
    lines = ["## Decontamination", "",
             f"Checked against {len(sets)} evaluation test set(s) before generation and before rating. Figures: "
             f"the same decoded pixels or a pHash within {t['phash_distance']} bits of an eval image, or a caption "
             f"at MinHash Jaccard >= {t['caption_jaccard']} to an eval caption. Generated rounds: >= "
             f"{q['text_containment']} of an eval item's question+answer word bigrams, "
             + (f"or MiniLM cosine >= {q['text_cosine']}" if q["text_cosine"] is not None else "no embedding test")
             + f"; items under {q['min_words']} words are matched by image only. Every match is a row of "
             "`contamination.csv`.", "",
             "| eval set | layout | items | images | figures removed | rounds removed | items too short for text |",
             "|---|---|---|---|---|---|---|"]
    for name in sets:
        f, r = figures["by_eval_set"].get(name, {}), rounds["by_eval_set"].get(name, {})
        lines.append(f"| {name} | {f.get('layout', r.get('layout'))} | {f.get('items', r.get('items'))} | "
                     f"{f.get('images', r.get('images'))} | {f.get('matched_ids', 0)} | {r.get('matched_ids', 0)} | "
                     f"{r.get('items_too_short_to_match', 0)} |")
    lines += ["", f"In all: {figures['removed']} of {figures['figures']} figures and {rounds['rounds_removed']} of "
              f"{rounds['rounds']} generated rounds removed ({rounds['conversations_removed']} conversations left "
              "with none)."]
    return "\n".join(lines) + "\n"
