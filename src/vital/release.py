"""Stage `filter`: score every candidate conversation and keep the top `ratio` as the release.

A conversation's score comes from the selector (selector.score_conversations). The release is LLaVA format:
unique `id`, relative `image`, `domain`, `conversations` alternating human/gpt from human, with
`<image>\\n` exactly once, at the start of the first human turn. Every record also carries its provenance
(`PROVENANCE`): the source figure and its paper, licence, generator, demonstrations, rating, selector score
and the pipeline revision; `manifest.jsonl` lists every image with its sha256 (`check_manifest`).
"""
from __future__ import annotations

import hashlib
import io
import json
import math
import os
import re
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import yaml

from .images import IMAGE_TYPE, ImageStore, unpack, write_hub_shards
from .provenance import UNKNOWN
from .schema import (IMAGE_TOKEN, Conversation, CorpusRecord, Replay, mask_url, read_jsonl, round_id, rounds, write_atomic,
                     write_json, write_jsonl)


def select_top(scores: dict[str, float], ratio: float, top_k: int = 0, domains: dict[str, str] | None = None) -> list[str]:
    """Ids of the best `top_k` (or, when it is 0, the top `ratio` share; at least one), best first, ties
    broken by id. With `domains` ({id: domain}), each domain keeps its own share: the release keeps the
    corpus's mix of modalities instead of the one the selector scores highest (largest remainder)."""
    if not 0 < ratio <= 1:
        raise ValueError(f"filter.ratio must be in (0, 1], got {ratio}")
    if top_k < 0:
        raise ValueError(f"filter.top_k must be 0 (use ratio) or positive, got {top_k}")
    ranked = [i for i, _ in sorted(scores.items(), key=lambda kv: (-kv[1], kv[0]))]
    k = min(len(ranked), top_k) if top_k else max(1, math.ceil(ratio * len(ranked)))
    if not domains:
        return ranked[:k]
    groups: dict[str, list[str]] = {}
    for i in ranked:
        groups.setdefault(domains[i], []).append(i)
    n = len(ranked)  # quotas in integers: k * size / n, the remainders going to the largest fractions
    quota = {d: k * len(ids) // n for d, ids in groups.items()}
    order = sorted(groups, key=lambda d: (-(k * len(groups[d]) % n), len(groups[d]), d))  # ties: smaller domain
    for d in order[:k - sum(quota.values())]:
        quota[d] += 1
    kept = {i for d, ids in groups.items() for i in ids[:quota[d]]}
    return [i for i in ranked if i in kept]


# what a released record says about where it comes from, after id, image, domain, conversations
PROVENANCE = ("selector_score", "generator", "figure_id", "pmid", "pmcid", "license", "source", "source_url",
              "demo_ids", "rating", "round_ratings", "revision")


def round_ratings(c: Conversation, scores: dict[str, int | None] | None) -> list[int | None] | None:
    """The rater's score of each round of `c` (`scores`: {candidate id: score}, ratings.jsonl), null for a round
    whose reply did not parse or that was not rated; None when no round of `c` was rated at all."""
    if not scores:
        return None
    ids = [round_id(c.id, k) for k in range(len(rounds(c.conversations)))]
    if not any(i in scores for i in ids):
        return None
    return [scores.get(i) for i in ids]


def mean_rating(per_round: list[int | None] | None) -> float | None:
    """The mean of the parsed round scores; None when there is none."""
    parsed = [x for x in per_round or [] if x is not None]
    return round(sum(parsed) / len(parsed), 6) if parsed else None


def to_llava(c: Conversation, score: float | None = None, figure: CorpusRecord | None = None,
             scores: dict[str, int | None] | None = None, revision: dict | None = None) -> dict:
    """The LLaVA record of a candidate with its provenance (`figure`: its corpus record; `scores`: the ratings by
    candidate id; `revision`: provenance.revision); `validate` says whether it is well formed."""
    turns = [dict(t) if isinstance(t, dict) else t for t in c.conversations]
    if turns and isinstance(turns[0], dict) and isinstance(turns[0].get("value"), str):
        turns[0]["value"] = f"{IMAGE_TOKEN}\n{turns[0]['value']}"
    per_round = round_ratings(c, scores)
    return {"id": c.id, "image": c.image, "domain": c.domain, "conversations": turns,
            "selector_score": None if score is None else round(score, 6), "generator": f"{c.backend}:{c.model}",
            "figure_id": figure.id if figure else c.id, "pmid": figure.pmid if figure else None,
            "pmcid": figure.pmcid if figure else None, "license": figure.license if figure else UNKNOWN,
            "source": figure.source if figure else None, "source_url": figure.source_url if figure else None,
            "demo_ids": list(c.demo_ids), "rating": mean_rating(per_round), "round_ratings": per_round,
            "revision": dict(revision) if revision else None}


def screen(conversations: list[Conversation], images: ImageStore | Path) -> tuple[list[Conversation], list[dict]]:
    """Candidates that would make a valid release record, and the others with why (missing image, no
    rounds, turns that do not alternate, an empty turn, a stray <image>): skipped and counted, not scored."""
    ok, skipped, images = [], [], ImageStore.of(images)
    for c in conversations:
        problems = validate([to_llava(c)], images)["problems"]
        if problems:
            skipped.append({"id": c.id, "problems": [why for _, why in problems]})
        else:
            ok.append(c)
    return ok, skipped


# ---------------------------------------------------------------- checking a release

def validate(records, images: ImageStore | Path | None = None) -> dict:
    """Problems of a LLaVA-format instruction file, ours or the official BioMed-VITAL 60K/80K JSON.

    A record needs a unique `id`, a relative `image` (no `..`), and `conversations` that alternate
    human/gpt from a human turn, with no empty turn and `<image>` exactly once, in the first human
    turn. Ours puts it at the start (`<image>\\n...`); others put it at the end, which is counted, not
    a problem. With `images` (a store or folder), every image must be in it.
    """
    problems: list[tuple[str, str]] = []
    ids: set[str] = set()
    domains: Counter = Counter()
    placement: Counter = Counter()
    rounds = 0
    images = ImageStore.of(images) if images is not None else None
    if not isinstance(records, (list, Replay)):
        return {"records": 0, "problems": [("(file)", "not a JSON array of records")], "domains": {},
                "image_token_placement": {}, "rounds": 0}
    for n, r in enumerate(records, 1):
        rid = str(r.get("id")) if isinstance(r, dict) and r.get("id") is not None else f"(record {n})"

        def bad(why):
            problems.append((rid, why))

        if not isinstance(r, dict):
            bad("not a JSON object")
            continue
        if "id" not in r:
            bad("no id")
        elif rid in ids:
            bad("duplicate id")
        ids.add(rid)
        image = r.get("image")
        if not isinstance(image, str) or not image:
            bad("no image")
        elif Path(image).is_absolute() or ".." in Path(image).parts:
            bad(f"image path {image!r} must be relative, inside the image folder")
        elif images is not None and image not in images:
            bad(f"image {image!r} not found in {images.root}")
        domains[str(r.get("domain", "(none)"))] += 1
        turns = r.get("conversations")
        if not isinstance(turns, list) or len(turns) < 2:
            bad("no conversation (needs at least one human/gpt round)")
            continue
        if any(not isinstance(t, dict) or not isinstance(t.get("value"), str) for t in turns):
            bad("a turn is not {from, value}")
            continue
        if [t.get("from") for t in turns] != ["human", "gpt"] * (len(turns) // 2) or len(turns) % 2:
            bad("turns do not alternate human/gpt starting with human")
        if any(not t["value"].replace(IMAGE_TOKEN, "").strip() for t in turns):
            bad("an empty turn")
        count = sum(t["value"].count(IMAGE_TOKEN) for t in turns)
        first = turns[0]["value"]
        if count != 1 or IMAGE_TOKEN not in first:
            bad(f"{IMAGE_TOKEN} appears {count} times; it belongs once, in the first human turn")
        else:
            placement["start" if first.startswith(IMAGE_TOKEN) else "end" if first.rstrip().endswith(IMAGE_TOKEN)
                      else "middle"] += 1
        rounds += len(turns) // 2
    return {"records": len(records), "problems": problems, "domains": dict(sorted(domains.items())),
            "image_token_placement": dict(sorted(placement.items())), "rounds": rounds}


# ---------------------------------------------------------------- the release folder, as trainers read it
# A dataset folder in the Hugging Face Hub layout (DESIGN.md, "Data contracts"):
#   README.md          the data card; its YAML front matter names the views (`configs:`) for `datasets`
#   data/train-*.parquet  one row per conversation with its image embedded: `datasets`, TRL, LLaMA-Factory
#   dataset_info.json  LLaMA-Factory's entry for data/ (sharegpt: LLaVA turns + image)
#   instructions.json  LLaVA format, `image` relative to images/ (LLaVA's image_folder; `tune` reads it)
#   images/            the images as loose files, unpacked from data/ (stage `release_images`, not stored twice)

HUB_DATA, LOOSE_IMAGES, CARD = "data", "images", "README.md"
_TURNS = pa.list_(pa.struct([("from", pa.string()), ("value", pa.string())]))
RELEASE_SCHEMA = pa.schema([
    ("id", pa.string()), ("image", IMAGE_TYPE), ("domain", pa.string()),
    ("conversations", _TURNS),  # LLaVA: `<image>\n` once, at the start of the first human turn
    ("messages", pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))),  # chat: no placeholder
    ("selector_score", pa.float64()), ("generator", pa.string()),
    # provenance (PROVENANCE): null where a record does not say (an imported release)
    ("figure_id", pa.string()), ("pmid", pa.string()), ("pmcid", pa.string()), ("license", pa.string()),
    ("source", pa.string()), ("source_url", pa.string()), ("demo_ids", pa.list_(pa.string())),
    ("rating", pa.float64()), ("round_ratings", pa.list_(pa.int64())),
    ("revision", pa.struct([("git_commit", pa.string()), ("params_sha256", pa.string())]))])
VIEWS = {"llava": ["id", "image", "domain", "conversations"], "trl": ["image", "messages"]}

LLAMAFACTORY_DATASET_INFO = {"biomed_vital": {
    "file_name": HUB_DATA, "formatting": "sharegpt", "columns": {"messages": "conversations", "images": "image"},
    "tags": {"role_tag": "from", "content_tag": "value", "user_tag": "human", "assistant_tag": "gpt",
             "observation_tag": "observation", "function_tag": "function_call", "system_tag": "system"}}}


def to_messages(r: dict) -> list[dict]:
    """The conversation as chat messages (user/assistant, text only): the image is a column of its own, and
    TRL's collator puts it before the first question."""
    return [{"role": "user" if t["from"] == "human" else "assistant",
             "content": t["value"].replace(f"{IMAGE_TOKEN}\n", "").replace(IMAGE_TOKEN, "").strip()}
            for t in r["conversations"]]


def front_matter(n: int) -> str:
    """The data card's YAML header: what the Hub shows, and the views `datasets.load_dataset` offers."""
    def files():  # a new list each time: YAML would write a shared one as an anchor, which readers may not follow
        return [{"split": "train", "path": f"{HUB_DATA}/train-*.parquet"}]

    configs = [{"config_name": "default", "default": True, "data_files": files()},
               *({"config_name": name, "data_files": files(), "columns": cols} for name, cols in VIEWS.items())]
    size = next(label for bound, label in [(1e3, "n<1K"), (1e4, "1K<n<10K"), (1e5, "10K<n<100K"),
                                             (1e6, "100K<n<1M"), (float("inf"), "n>1M")] if n < bound)
    meta = {"pretty_name": "BioMed-VITAL visual instructions", "language": ["en"],
            "task_categories": ["visual-question-answering", "image-text-to-text"],
            "tags": ["biomedical", "medical", "llava", "visual-instruction-tuning", "biomed-vital"],
            "size_categories": [size], "configs": configs}
    return "---\n" + yaml.safe_dump(meta, sort_keys=False) + "---\n\n"


def how_to_load(root: str) -> list[str]:
    """The data card's lines that load this folder with each trainer's own code (tests run the first two;
    `make interop` the other two)."""
    return ["## Load it", "",
            "Hugging Face `datasets` (views: `default`, `llava`, `trl`; `image` decodes to a PIL image):", "",
            "```python", "from datasets import load_dataset",
            f'ds = load_dataset("{root}", split="train")', "```", "",
            "TRL, vision SFT (`messages` + `image`, rows as `load_dataset` returns them):", "",
            "```python", "from trl.trainer.sft_trainer import DataCollatorForVisionLanguageModeling",
            f'rows = load_dataset("{root}", "trl", split="train")',
            "batch = DataCollatorForVisionLanguageModeling(processor)([rows[0], rows[1]])", "```", "",
            f"LLaMA-Factory (`dataset_info.json` names `{HUB_DATA}/`, images embedded; no `media_dir`): "
            f"`llamafactory-cli train ... --dataset_dir {root} --dataset biomed_vital --template llava`", "",
            f"LLaVA (`llava/train/train.py`): `--data_path {root}/instructions.json --image_folder {root}/"
            f"{LOOSE_IMAGES}`. `{LOOSE_IMAGES}/` is unpacked from `{HUB_DATA}/` and not stored in the remote: "
            f"after a `dvc pull`, `dvc repro release_images` (or `vital images unpack {root}/{HUB_DATA} "
            f"{root}/{LOOSE_IMAGES}`) writes it.", ""]


def write_release(out_dir: Path, records: list[dict], images: ImageStore | Path, card: str,
                  shard_mb: float = 256) -> int:
    """The release folder from LLaVA records and the store holding their images: parquet shards with the
    images in them, instructions.json, dataset_info.json, the image manifest and the data card under its front
    matter (not the loose images/: `vital images unpack`). Returns the number of shards."""
    out_dir = Path(out_dir)
    rows = ({**{k: r.get(k) for k in RELEASE_SCHEMA.names}, "messages": to_messages(r)} for r in records)
    shards = write_hub_shards(rows, images, out_dir / HUB_DATA, RELEASE_SCHEMA, shard_mb)
    write_json(out_dir / "instructions.json", records)
    write_json(out_dir / "dataset_info.json", LLAMAFACTORY_DATASET_INFO)
    write_jsonl(out_dir / MANIFEST, manifest(records, out_dir / HUB_DATA))
    write_atomic(out_dir / CARD, front_matter(len(records)) + card)
    return shards


# ---------------------------------------------------------------- the image manifest

MANIFEST = "manifest.jsonl"  # one line per image of the release: what `vital validate release` checks


def manifest(records: list[dict], images: ImageStore | Path) -> list[dict]:
    """One row per image the records name (first record wins for the figure's fields), read back from the
    release's own store: name, sha256 and size of the bytes as stored, width, height, figure id, source, licence."""
    from PIL import Image

    store, rows, seen = ImageStore.of(images), [], set()
    for r in records:
        name = r["image"]
        if name in seen:
            continue
        seen.add(name)
        data = store.read(name)
        with Image.open(io.BytesIO(data)) as im:  # the header only: nothing is decoded
            width, height = im.size
        rows.append({"image": name, "sha256": hashlib.sha256(data).hexdigest(), "size": len(data), "width": width,
                     "height": height, "figure_id": r.get("figure_id") or r.get("id"), "source": r.get("source"),
                     "license": r.get("license") or UNKNOWN})
    return rows


def read_manifest(path: Path) -> list[dict]:
    """The manifest's rows; ValueError naming file:line for a broken one."""
    rows = []
    for n, row in enumerate(read_jsonl(path), 1):
        if not isinstance(row, dict) or not isinstance(row.get("image"), str) or not isinstance(row.get("sha256"), str):
            raise ValueError(f"{path}: row {n} has no image name and sha256")
        rows.append(row)
    return rows


def check_manifest(rows: list[dict], images: ImageStore | Path) -> list[tuple[str, str]]:
    """(figure id, why) for each image of the manifest that the store lacks or holds with other bytes."""
    from .images import ImageError

    store, problems = ImageStore.of(images), []
    for row in rows:
        who, name = str(row.get("figure_id") or row["image"]), row["image"]
        try:
            data = store.read(name)
        except (ImageError, ValueError):
            problems.append((who, f"image {name!r} is missing from {store.root}"))
            continue
        digest = hashlib.sha256(data).hexdigest()
        if digest != row["sha256"]:
            problems.append((who, f"image {name!r} in {store.root} has changed: sha256 {digest[:12]}..., the "
                                  f"manifest says {row['sha256'][:12]}..."))
    return problems


FORMATS = (f"a dataset folder in the Hugging Face Hub layout: parquet shards with the images embedded "
           f"(`{HUB_DATA}/`), views named in this card's `configs:`, LLaMA-Factory's `dataset_info.json`, and "
           f"LLaVA's `instructions.json` with the image folder `{LOOSE_IMAGES}/`.")


# Where this pipeline departs from the BioMed-VITAL paper and the authors' released code, and why (README: "The
# selector"). The data card of every release made here lists them.
DEVIATIONS = (
    "Selector input: the figure's context (caption + mentions) and the Q&A are embedded apart, with their "
    "elementwise product and the image; a text longer than the encoder's window is the mean of its windows. The "
    "authors embedded caption + mentions + Q + A as one text cut at 256 tokens, so with a long caption every round "
    "of a figure had the same features.",
    "Splits: clinician and model pairs are split by figure into train / validation / test; the selector's epoch is "
    "chosen on validation only and test is reported once, with n and a 95% interval. The authors reported the "
    "alignment of the clinician pairs they also monitored, and split model pairs by position, not by figure.",
    "Ties: equal ratings or an annotators' tie are never a pair (the authors' hinge loss read a score tie as 'b "
    "wins'); "
    "an unparseable rating is null, never 0 or 5.",
    "Model pairs come from every rated round; a conversation's score is its first round's (aggregate: first, the "
    "authors' choice; mean and min are options).",
    "Default selector backbone: MiniLM text + a fixed image descriptor, frozen (runs offline). The paper's is "
    "BiomedCLIP fine-tuned end to end: train_selector.backbone=biomedclip, finetune_backbone=true.",
    "Rounds are dropped for quoting the source or refusing by whole phrases, so calibrated hedges ('I cannot be "
    "certain from the image alone') are kept.",
    "The selector has one feature the paper's has not: the share of the Q&A's words found in the caption and "
    "mentions (train_selector.lexical_grounding), so that a frozen embedding sees a contradicted side or "
    "modality; it may also favour answers that repeat the caption.",
    "Duplicate figures (same pixels, near pHash, near-identical caption) and figures matching an evaluation test "
    "set are removed before any request, and generated rounds holding an eval item's question and answer before "
    "rating; the paper's pipeline has no such step (see Decontamination).",
)


def data_card(release: list[dict], origin: str, selector_info: dict | None, tokenizer_name: str, tokens: list[int],
              formats: str = FORMATS, selection: dict | None = None, root: str | None = None,
              licenses: dict | None = None, audit: str | None = None) -> str:
    """A markdown data card: what is in the release and what made it (`origin`: one sentence); with `root`
    (the folder, as users name it), how each trainer loads it; with `selection` (filter's comparison with
    baselines, metrics/selection.json), that table and the method's deviations; with `licenses` ({"allow": the
    filter.licenses allow-list or None, "dropped": {licence: candidates dropped}}), what the allow-list did; `audit`
    (a markdown section: decontaminate.card_section), the decontamination audit."""
    by_domain = Counter(r["domain"] for r in release)
    rounds = [len(r["conversations"]) // 2 for r in release]
    scores = [r["selector_score"] for r in release if r.get("selector_score") is not None]
    hist, edges = np.histogram(scores, bins=min(10, max(1, len(set(scores))))) if scores else ([], [])

    def stats(xs):
        return f"min {min(xs)}, median {float(np.median(xs)):g}, mean {float(np.mean(xs)):.1f}, max {max(xs)}" if xs else "-"

    lines = ["# BioMed-VITAL release: data card", "", origin, "",
             "## Domains", "", "| domain | conversations |", "|---|---|",
             *[f"| {d} | {n} |" for d, n in sorted(by_domain.items())], "",
             "## Size", "", f"- rounds per conversation: {stats(rounds)}",
             f"- tokens per conversation ({tokenizer_name}): {stats(tokens)}", ""]
    if scores:
        lines += ["## Selector scores of the kept conversations", "", "| from | to | conversations |", "|---|---|---|",
                  *[f"| {edges[i]:.4f} | {edges[i + 1]:.4f} | {int(h)} |" for i, h in enumerate(hist)], ""]
    by_license = Counter(r.get("license") or UNKNOWN for r in release)
    lines += ["## Licences", "",
              "Each figure's licence as its corpus record states it (a `license` column, or the `corpus.licenses` "
              "side file by PMC id, e.g. NCBI's PMC Open Access file list); `unknown` where nobody stated one. "
              "The text and conversations were written by the generator; the figures keep their own licence.", "",
              "| licence | conversations |", "|---|---|",
              *[f"| {k} | {n} |" for k, n in sorted(by_license.items())], ""]
    if licenses is not None:
        allow, dropped = licenses.get("allow"), licenses.get("dropped") or {}
        if allow is None:
            lines += ["Allow-list (`filter.licenses`): none, every licence kept.", ""]
        else:
            lines += [f"Allow-list (`filter.licenses`): {', '.join(allow)}. Candidates dropped before selection "
                      f"for their licence: {sum(dropped.values())}"
                      + (" (" + ", ".join(f"{k}: {n}" for k, n in sorted(dropped.items())) + ")." if dropped else "."),
                      ""]
    if audit:
        lines += [audit]
    revisions = sorted({json.dumps(r["revision"], sort_keys=True) for r in release if r.get("revision")})
    lines += ["## Provenance", "",
              f"- generator(s): {', '.join(sorted({r['generator'] for r in release}))}",
              f"- selector: {json.dumps(selector_info, sort_keys=True) if selector_info else 'none recorded'}",
              *[f"- pipeline revision: git `{v['git_commit']}`, params sha256 `{v['params_sha256']}`"
                for v in map(json.loads, revisions)],
              "- per record: `figure_id`, `pmid`, `pmcid`, `license`, `source` (file:line of the corpus record), "
              "`source_url`, `generator`, `demo_ids`, `rating` (mean of the parsed round ratings), "
              "`round_ratings`, `selector_score`, `revision` (null where the record does not say)"
              + ("; `manifest.jsonl`: every image with its sha256 (`vital validate release` checks it)"
                 if root else ""),
              f"- format: {formats}", ""]
    if root:
        lines += how_to_load(root)
    if selection:
        lines += ["## The selector against baselines at this size", "",
                  f"Agreement with the clinician test pairs ({selection['clinician_test_pairs']} pairs on figures no "
                  "choice saw; ties and unscored pairs apart) and the share of this release each method also keeps. "
                  + (selection.get("note") or ""), "",
                  "| method | agreement (decided pairs) | 95% interval | n | ties | a tie as half | overlap with the release |",
                  "|---|---|---|---|---|---|---|"]
        for name, m in selection["methods"].items():
            test = m["clinician_test"]
            if name == "random":
                lines.append(f"| random ({m['seeds']} seeds) | {test.get('mean')} | {test.get('low')}–{test.get('high')} "
                             f"(of seeds) | {test['pairs']} | 0 | {test.get('mean')} | {m['overlap']['mean']} |")
            else:
                lines.append(f"| {name} | {test['rate']} | {test['low']}–{test['high']} | {test['n']} | {test['ties']} | "
                             f"{test['ties_half']} | {m['overlap']} |")
        lines += ["", "## Where the method departs from the paper", "", *[f"- {d}" for d in DEVIATIONS], ""]
    return "\n".join(lines)





# ---------------------------------------------------------------- importing a published release

def convert_official(records: list, source: str) -> tuple[list[dict], list[dict], int]:
    """The official BioMed-VITAL JSON (`id, image, domain, conversations`, LLaVA format) as this project's
    release records, the records that cannot be converted with why, and how many had no domain (they become
    `other`). `<image>` moves to the start of the first human turn; `domain` may be CXR / MRI / CT /
    Histology / Gross, ours, or a LLaVA-Med dict of flags."""
    from .corpus import CorpusError, parse_domain

    if not isinstance(records, list):
        raise ValueError("not a JSON array of records")
    out, rejected, seen, no_domain = [], [], set(), 0
    for n, r in enumerate(records, 1):
        rid = str(r["id"]) if isinstance(r, dict) and r.get("id") is not None else f"(record {n})"
        problems = [why for _, why in validate([r])["problems"]] + (["duplicate id"] if rid in seen else [])
        seen.add(rid)
        domain = None
        if isinstance(r, dict):
            try:
                domain = parse_domain(r.get("domain"))
            except CorpusError as e:
                problems.append(str(e))
        if problems:
            rejected.append({"record": n, "id": rid, "problems": problems})
            continue
        no_domain += r.get("domain") is None
        turns = [{"from": t["from"], "value": t["value"]} for t in r["conversations"]]
        turns[0]["value"] = f"{IMAGE_TOKEN}\n" + turns[0]["value"].replace(IMAGE_TOKEN, "").strip()
        out.append({"id": rid, "image": r["image"], "domain": domain, "conversations": turns,
                    "selector_score": None, "generator": f"imported:{source}"})
    return out, rejected, no_domain


def reason(problem: str) -> str:
    """A problem's kind, for counting: its text up to the first colon, names and numbers blanked."""
    return re.sub(r"'[^']*'|\d+", "_", problem).split(":")[0].strip()


def _auth_headers(url: str) -> dict:
    """The Hugging Face token from the environment (HF_TOKEN), sent to huggingface.co only."""
    from urllib.parse import urlsplit

    host, token = urlsplit(url).hostname or "", os.environ.get("HF_TOKEN")
    return {"Authorization": f"Bearer {token}"} if token and (host == "huggingface.co" or
                                                               host.endswith(".huggingface.co")) else {}


def download(url: str, dest: Path, timeout: float = 60) -> None:
    """Fetch `url` (http, https or file) to `dest` through `dest.part`, renamed only when complete (every byte
    the server announced): an interrupted download leaves no file under the real name, and a rerun starts it
    again. Errors name the URL without credentials or query string."""
    import http.client
    import shutil
    import urllib.error
    import urllib.request

    shown, part = mask_url(url), dest.with_name(dest.name + ".part")
    dest.parent.mkdir(parents=True, exist_ok=True)
    try:
        request = urllib.request.Request(url, headers=_auth_headers(url))
        with urllib.request.urlopen(request, timeout=timeout) as r, open(part, "wb") as f:
            shutil.copyfileobj(r, f, 1 << 20)
            f.flush()
            os.fsync(f.fileno())
            expected = r.headers.get("Content-Length") if hasattr(r, "headers") else None
            if expected is not None and f.tell() != int(expected):
                raise OSError(f"the transfer stopped at {f.tell()} of {expected} bytes")
    except urllib.error.HTTPError as e:
        part.unlink(missing_ok=True)
        hint = " (a gated or private file: set HF_TOKEN)" if e.code in (401, 403) else "; check the URL"
        raise OSError(f"{shown}: the server answered HTTP {e.code} {e.reason}{hint}") from None
    except (urllib.error.URLError, http.client.HTTPException, OSError, ValueError) as e:
        part.unlink(missing_ok=True)
        why = getattr(e, "reason", None) or e
        raise OSError(f"{shown}: cannot download it ({why}); check the URL and your network, then rerun") from None
    os.replace(part, dest)


def url_file_name(url: str) -> str:
    """The file a URL names (no query string): what an import is saved as, and its folder's name."""
    from urllib.parse import urlsplit

    return Path(urlsplit(url).path).name or "release.json"


def import_folder(url: str) -> Path:
    """Where `vital release import` puts a release by default: data/external/<file name, lower case>."""
    return Path("data/external") / Path(url_file_name(url)).stem.lower()


def import_release(url: str, out_dir: Path, image_dir: Path | None = None, shard_mb: float = 256) -> dict:
    """Download a published instructions JSON (BioMed-VITAL 60K/80K, LLaVA-Med 60K, ...) into `out_dir/source/`
    (kept as fetched; a rerun reuses it), convert it to this project's records and list what could not be
    converted in `rejected.jsonl`. With `image_dir` (the downloaded figures: a folder or a packed store),
    records whose image is not there are rejected too, and `out_dir` becomes a release folder like the
    `filter` stage's (`write_release`, with `images/` unpacked for LLaVA); without it, `instructions.json`
    and the data card only. Returns the `import.json` summary."""
    from .encoders import count_tokens

    out_dir, shown = Path(out_dir), mask_url(url)
    raw = out_dir / "source" / url_file_name(url)
    if not raw.exists():
        download(url, raw)
    try:
        records = json.loads(raw.read_text(encoding="utf-8"))
        converted, rejected, no_domain = convert_official(records, raw.name)
    except (UnicodeDecodeError, json.JSONDecodeError, ValueError) as e:
        raise ValueError(f"{raw} (from {shown}) is not an instructions JSON array ({e}); is the URL the "
                         f"instructions file? Delete {raw} to download it again") from None
    store = ImageStore(image_dir) if image_dir is not None else None
    if store is not None:
        rejected += [{"id": r["id"], "problems": [f"image not found in the image folder: {r['image']!r}"]}
                     for r in converted if r["image"] not in store]
        converted = [r for r in converted if r["image"] in store]
    report = validate(converted, store)
    if report["problems"]:  # convert_official let through something validate refuses: a bug, not bad input
        raise RuntimeError(f"converted records fail validation: {report['problems'][:3]}")
    write_jsonl(out_dir / "rejected.jsonl", rejected)
    digest = hashlib.sha256()
    with open(raw, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    summary = {"url": shown, "file": str(raw.relative_to(out_dir)), "sha256": digest.hexdigest(),
               "records": len(records), "imported": len(converted), "rejected": len(rejected),
               "rejected_by_reason": dict(sorted(Counter(reason(x["problems"][0]) for x in rejected).items())),
               "domain_missing": no_domain, "domains": report["domains"], "rounds": report["rounds"],
               "images": str(out_dir / LOOSE_IMAGES) if store is not None else None}
    origin = (f"{len(converted)} conversations imported from {shown} (`{raw.name}`, sha256 {summary['sha256']}): "
              f"{len(records)} records, {len(rejected)} rejected (`rejected.jsonl`), {no_domain} without a domain "
              "(counted as `other`).")
    tokens = count_tokens([" ".join(t["value"] for t in r["conversations"]) for r in converted])
    if store is None:
        write_json(out_dir / "instructions.json", converted)
        card = data_card(converted, origin, None, "MiniLM WordPiece", tokens,
                         "LLaVA (`instructions.json`); images not imported (rerun with --images DIR)")
        write_atomic(out_dir / CARD, card)
    else:
        card = data_card(converted, origin, None, "MiniLM WordPiece", tokens, root=str(out_dir))
        write_release(out_dir, converted, store, card, shard_mb)
        if (out_dir / LOOSE_IMAGES).exists():  # ours, from an earlier import: written afresh
            shutil.rmtree(out_dir / LOOSE_IMAGES)
        unpack(out_dir / HUB_DATA, out_dir / LOOSE_IMAGES)
    write_json(out_dir / "import.json", summary)
    return summary
