"""Selection quality: does the clinician-aligned selector keep better data than baselines, where quality is known?

    .venv/bin/python benchmarks/selection_quality.py                      # 1000 figures, w = 10, with the w sweep
    .venv/bin/python benchmarks/selection_quality.py --no-sweep           # quicker: no clinician-weight sweep
    .venv/bin/python benchmarks/selection_quality.py --figures 60 --epochs 3 --no-sweep   # a smoke run (the test)

What it builds (seeded; the same command prints the same figures):
- a SYNTHETIC corpus of `--figures` figures with known attributes (modality -> domain, side, organ, finding, size
  in cm); caption and in-text mention written from varied templates of them; about `--long-share` of the figures
  get a caption over 400 MiniLM word pieces (acquisition / methods sentences appended). Each figure's image is
  the bundled sample image (vital.corpus.build_sample) of its modality.
- one 3-round candidate conversation per figure (its id is the figure's, as `generate` writes them): about half
  grounded (every answer states the figure's true attributes), half corrupted, evenly, with one of
  wrong_figure (the answers of a figure of another modality and organ), flipped_laterality (left <-> right in
  every answer), wrong_modality (another modality named in every answer), generic ("normal study, definitely
  no abnormality"). Every answer names the side and the modality, so every round of a corrupted conversation
  is wrong.
- a clinician pool over `--pool-share` of the figures, `--questions` questions each, one grounded and one
  corrupted answer (corruption types cycling, A/B order random), and ILLUSTRATIVE RULE CLINICIANS: one vote per
  question marking the grounded answer acceptable and the other not, with `--noise` of the votes flipped.
- the model rater: the OFFLINE HEURISTIC rubric (vital.llm.offline.heuristic_score, what the offline `rate` backend
  returns) on every candidate round and every pool answer.
Then it runs the project's own path, as the stages call it: preferences.clinician_pairs / unit_scores /
model_pairs (merge_preferences), selector.build_units / fit / save, the w = 0 fit (model_only=True)
(train_selector), selector.score_conversations / score_pool_answers, release.select_top and baselines.compare
(filter). One embedding cache (a temp folder) serves every fit, so each text is encoded once.

Printed side by side for selector (w = `--weight`) | selector w = 0 | rater threshold | random (20 seeds):
clinician TEST pair accuracy (the split nothing was chosen on), overall, per corruption type, on long-caption
figures and against the true labels; ties apart; the test AUC; precision@kept (the share of the kept
conversations that are grounded), overall and on long-caption figures; a "beats random" check per type; with
the sweep, test and validation alignment per clinician weight w in 1, 10, 100, 200, 300, 400. Every figure comes
with its n and a 95% interval (vital.stats: Wilson for shares, Hanley-McNeil for AUC); random gives the mean and
the 2.5-97.5% range over its 20 seeds.

These figures check the METHOD'S MECHANICS on a synthetic corpus with a heuristic rater and rule clinicians; they
say nothing about the quality of any real model or real clinician data.

Defaults: 1000 figures (300 clinician test pairs, 66-84 per corruption type). Wall time on 2 cores, the sweep
included: about 1.5 min when the cores are idle, 3-5 min when other jobs share them; most of it is encoding each
unique text once. The sweep (6 more fits on cached features: training only, about 20 s idle) is on by default;
--no-sweep skips it. Selector settings are TrainConfig's defaults (epochs 30, lr 1e-3, hinge, unit round,
aggregate first). Preference settings are params.yaml's (clinician_weight 10, clinician 0.2 / 0.3, model 0.1 / 0.1,
seed 0) except model_pairs: one per candidate conversation (params.yaml's 300 is sized for the 14-figure sample;
at 3000 rated rounds it would leave most rounds out of every pair).
"""
import argparse
import dataclasses
import random
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from sklearn.metrics import roc_auc_score

from vital import baselines, preferences, release, selector
from vital.corpus import build_sample
from vital.encoders import count_tokens
from vital.images import ImageStore
from vital.llm.offline import heuristic_score
from vital.schema import Conversation, CorpusRecord, PoolItem, PreferencePair, Rating, Vote, round_id
from vital.stats import auc_interval, rate

CORRUPTIONS = ("wrong_figure", "flipped_laterality", "wrong_modality", "generic")
SWEEP = (1, 10, 100, 200, 300, 400)
RANDOM_SEEDS = 20  # baselines.compare's default
LONG_TOKENS = 400

# ---------------------------------------------------------------- the synthetic corpus

GENERAL_METHODS = [
    "Images were reviewed independently by two readers who were blinded to the clinical information, and "
    "disagreements were resolved by consensus at a joint session.",
    "Measurements were obtained on the picture archiving and communication system workstation with electronic "
    "calipers along the longest axis and the perpendicular short axis.",
    "The study was approved by the institutional review board, and the requirement for written informed consent "
    "was waived because of its retrospective design.",
    "All examinations were performed as part of routine clinical care during the study period at a single "
    "tertiary referral centre.",
    "Image quality was graded on a four-point scale from non-diagnostic to excellent, and only examinations "
    "graded adequate or better were included in the analysis.",
    "The final diagnosis was established by histopathology where available, or otherwise by clinical and "
    "imaging follow-up of at least twelve months.",
    "Patients with prior surgery of the region, incomplete examinations or uninterpretable images because of "
    "motion were excluded from the cohort.",
    "Interobserver agreement for the reported measurements was assessed with the intraclass correlation "
    "coefficient and was considered good above 0.75.",
    "Electronic medical records were reviewed for the presenting symptoms, laboratory values, treatment and "
    "the interval between the examination and the final diagnosis.",
    "Continuous variables are reported as median and interquartile range, and categorical variables as counts "
    "and percentages of the cohort.",
    "The reading radiologists had between five and twenty years of experience in cross-sectional and "
    "conventional imaging at the time of the review.",
    "Follow-up examinations, when performed, were compared with the index study for change in size, "
    "morphology and the appearance of new findings.",
]

MODALITIES = {
    "chest_radiograph": dict(
        domain="chest_xray", images=["sample-cxr-rg1"], region="chest",
        names=[("a chest radiograph", "chest radiograph"), ("a frontal chest X-ray", "frontal chest X-ray"),
               ("a posteroanterior chest radiograph", "posteroanterior chest radiograph")],
        organs=["upper lobe", "lower lobe", "lung base", "hilum", "mid zone"],
        findings=["nodule", "mass", "area of consolidation", "rounded opacity"],
        methods=["Posteroanterior radiographs were obtained in full inspiration with the patient erect at a "
                 "source-to-image distance of 180 cm.",
                 "Exposure factors were 120 kVp with automatic exposure control, and a moving grid was used to "
                 "reduce scattered radiation.",
                 "Digital radiographs were acquired on a flat-panel detector system and displayed with a standard "
                 "lung window for interpretation.",
                 "Where a lateral view was available it was reviewed together with the frontal view to localise "
                 "the abnormality."]),
    "ct": dict(
        domain="ct_scan", images=["sample-ct-thorax", "sample-ct-abdomen", "sample-ct-head"], region="abdomen",
        names=[("an axial CT image", "axial CT image"), ("a contrast-enhanced CT scan", "contrast-enhanced CT scan"),
               ("a computed tomography scan", "computed tomography scan")],
        organs=["kidney", "adrenal gland", "lobe of the liver", "lung", "ovary"],
        findings=["hypodense mass", "simple cyst", "enhancing lesion", "calcified nodule"],
        methods=["Examinations were performed on a 64-detector-row scanner with a collimation of 0.625 mm and a "
                 "reconstructed slice thickness of 1.25 mm.",
                 "Iodinated contrast material was injected intravenously at 3 mL per second, and the portal venous "
                 "phase was acquired at 70 seconds.",
                 "Tube voltage was 120 kVp with automatic tube current modulation, and images were reconstructed "
                 "with an iterative algorithm.",
                 "Attenuation values were measured in Hounsfield units with a circular region of interest placed "
                 "over the solid portion of the lesion."]),
    "mri": dict(
        domain="mri", images=["sample-mri-shoulder", "sample-mri-liver"], region="region of interest",
        names=[("an MRI", "MRI"), ("a T2-weighted magnetic resonance image", "T2-weighted magnetic resonance image"),
               ("a contrast-enhanced MR image", "contrast-enhanced MR image")],
        organs=["shoulder", "knee", "cerebral hemisphere", "parotid gland", "kidney"],
        findings=["T2-hyperintense lesion", "enhancing mass", "cystic lesion", "area of oedema"],
        methods=["Imaging was performed on a 3 T system with a dedicated phased-array surface coil positioned "
                 "over the region of interest.",
                 "The protocol comprised T1-weighted, fat-suppressed T2-weighted and diffusion-weighted sequences "
                 "with b values of 0 and 800 s/mm2.",
                 "Gadolinium-based contrast agent was administered at 0.1 mmol per kilogram, followed by dynamic "
                 "fat-suppressed T1-weighted imaging.",
                 "Apparent diffusion coefficient maps were generated automatically on the scanner console and "
                 "reviewed together with the source images."]),
    "ultrasound": dict(
        domain="other", images=["sample-us-lymph-node", "sample-us-pelvis", "sample-us-tee"], region="region",
        names=[("an ultrasound image", "ultrasound image"), ("a greyscale sonogram", "greyscale sonogram"),
               ("a Doppler ultrasound image", "Doppler ultrasound image")],
        organs=["kidney", "ovary", "thyroid lobe", "breast", "testis"],
        findings=["hypoechoic nodule", "simple cyst", "solid mass", "complex cystic lesion"],
        methods=["Sonography was performed with a high-frequency linear transducer of 5 to 12 MHz by an "
                 "experienced sonographer and reviewed by a radiologist.",
                 "Colour and spectral Doppler settings were optimised for slow flow, with a low wall filter and "
                 "a pulse repetition frequency adapted to the depth.",
                 "Each lesion was imaged in two orthogonal planes, and its echogenicity, margins and posterior "
                 "acoustic features were recorded.",
                 "Cine clips of the whole organ were stored for later review in addition to the representative "
                 "still images."]),
    "histology": dict(
        domain="histology", images=["sample-ihc-colon"], region="resection specimen",
        names=[("a histology slide", "histology slide"), ("a haematoxylin and eosin stained section",
                                                          "haematoxylin and eosin stained section"),
               ("a photomicrograph of a stained section", "photomicrograph of a stained section")],
        organs=["breast", "kidney", "lung", "ovary", "colon"],
        findings=["invasive carcinoma", "well-differentiated adenocarcinoma", "granulomatous focus",
                  "tumour nodule"],
        methods=["Tissue was fixed in 10% neutral buffered formalin for 24 hours, embedded in paraffin and cut "
                 "into sections of 4 micrometres.",
                 "Sections were stained with haematoxylin and eosin, and immunohistochemistry was performed on an "
                 "automated staining platform.",
                 "Slides were digitised on a whole-slide scanner at 40x magnification and reviewed by two "
                 "pathologists with a digital viewer.",
                 "The tumour size was measured on the gross specimen and confirmed on the largest corresponding "
                 "histological section."]),
}
SIDES = ("left", "right")

CAPTIONS = [
    "{Bare} showing a {size} cm {finding} in the {side} {organ}.",
    "{Bare} of the {region}: a {finding} measuring {size} cm is seen in the {side} {organ}.",
    "A {size} cm {finding} in the {side} {organ} on {a_mod}.",
    "{Bare} demonstrating a {finding} ({size} cm) of the {side} {organ}; the contralateral side is unremarkable.",
]
CAPTION_TAILS = ["", " No other abnormality is identified.", " The surrounding structures appear preserved.",
                 " Arrows mark the margins of the finding."]
MENTIONS = [
    "The {bare} (Figure {n}) showed a {finding} of {size} cm in the {side} {organ}, which prompted further "
    "work-up.",
    "As shown in Figure {n}, the {finding} in the {side} {organ} measured {size} cm.",
    "Figure {n} illustrates the {side}-sided {finding} ({size} cm) within the {organ}.",
]

# Every answer names the side and the modality, so a flipped side or a wrong modality corrupts every round.
QUESTIONS = {
    "modality": (["What kind of image is this?", "Which imaging modality was used?",
                  "What type of study is shown here?"],
                 ["This is {a_mod} of the {side} {organ}.",
                  "The image is {a_mod}, focused on the {side} {organ}.",
                  "It appears to be {a_mod} showing the {side} {organ}, where the finding lies."]),
    "location": (["Where is the abnormality located?", "Which side is affected?", "On which side is the finding?"],
                 ["On this {mod}, the {finding} lies in the {side} {organ}.",
                  "It is on the {side} side, within the {organ}, as this {mod} shows.",
                  "The abnormality seen on the {mod} is located in the {side} {organ}."]),
    "finding": (["What is the main finding?", "Is there an abnormality in this image?", "What does this image show?"],
                ["There is a {finding} in the {side} {organ} on this {mod}, which may need further evaluation.",
                 "Yes, this {mod} shows a {finding} in the {side} {organ}.",
                 "The {mod} shows a {finding} involving the {side} {organ}, likely the lesion of interest."]),
    "size": (["How large is the lesion?", "What is the size of the finding?", "How big is the abnormality?"],
             ["The {finding} in the {side} {organ} measures approximately {size} cm on this {mod}.",
              "It is about {size} cm across, in the {side} {organ}, as measured on the {mod}.",
              "On the {mod}, the {side} {organ} {finding} appears to be roughly {size} cm in size."]),
}
GENERIC = ["This is a normal study and there is definitely no abnormality to report.",
           "The image is entirely normal; there is certainly nothing abnormal to report here.",
           "No abnormality is present: this is definitely a normal examination with nothing to report."]


def make_figures(n: int, long_share: float, rng: random.Random) -> list[dict]:
    """Figures with known attributes; the caption and the mention are written from them."""
    keys = list(MODALITIES)
    figs = []
    n_long = round(long_share * n)
    long_ids = set(rng.sample(range(n), n_long))
    for i in range(n):
        key = keys[i % len(keys)]
        m = MODALITIES[key]
        name = rng.randrange(len(m["names"]))
        f = dict(id=f"fig{i:04d}", modality=key, domain=m["domain"], image=f"{rng.choice(m['images'])}.png",
                 side=rng.choice(SIDES), organ=rng.choice(m["organs"]), finding=rng.choice(m["findings"]),
                 size=f"{rng.uniform(0.5, 8.0):.1f}", a_mod=m["names"][name][0], mod=m["names"][name][1],
                 region=m["region"], long=i in long_ids)
        bare = m["names"][rng.randrange(len(m["names"]))][1]
        values = dict(f, Bare=bare[0].upper() + bare[1:], bare=bare, n=rng.randint(1, 6))
        caption = rng.choice(CAPTIONS).format(**values) + rng.choice(CAPTION_TAILS)
        f["caption"], f["mention"] = caption, rng.choice(MENTIONS).format(**values)
        figs.append(f)
    # long captions: realistic acquisition / methods sentences appended until the caption is over 400 word pieces
    for f in figs:
        if f["long"]:
            extra = MODALITIES[f["modality"]]["methods"] + GENERAL_METHODS
            rng.shuffle(extra)
            parts = [f["caption"]]
            for s in extra:
                parts.append(s)
                if count_tokens([" ".join(parts)])[0] > LONG_TOKENS:
                    break
            f["caption"] = " ".join(parts)
    tokens = count_tokens([f["caption"] for f in figs])
    for f, t in zip(figs, tokens):
        f["caption_tokens"] = t
        assert (t > LONG_TOKENS) == f["long"], (f["id"], t)
    return figs


def answer(kind: int | str, template: int, attrs: dict) -> str:
    return QUESTIONS[kind][1][template].format(**attrs)


def corrupt(f: dict, ctype: str, figs: list[dict], rng: random.Random) -> dict | None:
    """The attributes a corrupted answer states (None: a generic answer)."""
    if ctype == "flipped_laterality":
        return dict(f, side="right" if f["side"] == "left" else "left")
    if ctype == "wrong_modality":
        other = MODALITIES[rng.choice([k for k in MODALITIES if k != f["modality"]])]
        a_mod, mod = rng.choice(other["names"])
        return dict(f, a_mod=a_mod, mod=mod)
    if ctype == "wrong_figure":
        return rng.choice([g for g in figs if g["modality"] != f["modality"] and g["organ"] != f["organ"]])
    return None


def answer_as(kind: str, template: int, f: dict, ctype: str | None, figs: list[dict], rng: random.Random,
              wrong: dict | None = None) -> str:
    if ctype is None:
        return answer(kind, template, f)
    if ctype == "generic":
        return rng.choice(GENERIC)
    return answer(kind, template, wrong)


def make_conversations(figs: list[dict], rng: random.Random):
    """One 3-round conversation per figure (id = the figure's); labels: 'good' or the corruption type."""
    n = len(figs)
    labels = ["good"] * (n - n // 2) + [CORRUPTIONS[i % 4] for i in range(n // 2)]
    rng.shuffle(labels)
    conversations, truth = [], {}
    for f, label in zip(figs, labels):
        kinds = ["modality"] + rng.sample(["location", "finding", "size"], 2)
        rng.shuffle(kinds)
        ctype = None if label == "good" else label
        wrong = corrupt(f, ctype, figs, rng) if ctype else None
        turns = []
        for kind in kinds:
            q = rng.choice(QUESTIONS[kind][0])
            a = answer_as(kind, rng.randrange(3), f, ctype, figs, rng, wrong)
            turns += [{"from": "human", "value": q}, {"from": "gpt", "value": a}]
        conversations.append(Conversation(f["id"], f["image"], f["domain"], turns, "synthetic", "templates", ""))
        truth[f["id"]] = label
    return conversations, truth


def make_pool(figs: list[dict], share: float, questions: int, noise: float, rng: random.Random):
    """Pool questions (one grounded, one corrupted answer) and one rule-clinician vote each."""
    chosen = sorted(rng.sample(range(len(figs)), round(share * len(figs))))
    pool, votes, truth, flipped, i = [], [], {}, 0, 0
    for fi in chosen:
        f = figs[fi]
        for k, kind in enumerate(rng.sample(list(QUESTIONS), questions)):
            ctype = CORRUPTIONS[i % 4]
            i += 1
            template = rng.randrange(3)
            good = answer(kind, template, f)
            bad = answer_as(kind, template, f, ctype, figs, rng, corrupt(f, ctype, figs, rng))
            assert good != bad, (f["id"], kind, ctype)
            good_is_a = rng.random() < 0.5
            a, b = (good, bad) if good_is_a else (bad, good)
            item = PoolItem(question_id=f"{f['id']}:q{k}", figure_id=f["id"], image=f["image"], domain=f["domain"],
                            caption=f["caption"], inline_mentions=[f["mention"]], cluster=0,
                            question=rng.choice(QUESTIONS[kind][0]), answer_a=a, answer_b=b, backend="synthetic",
                            request_hash="")
            marks = (good_is_a, not good_is_a)
            if rng.random() < noise:  # the clinician got this one wrong
                marks = (not marks[0], not marks[1])
                flipped += 1
            votes.append(Vote(question_id=item.question_id, annotator="rule-clinician", a_acceptable=marks[0],
                              b_acceptable=marks[1], answers_hash=preferences.answers_hash(item)))
            pool.append(item)
            truth[item.question_id] = ("A" if good_is_a else "B", ctype)
    return pool, votes, truth, flipped


def rate_all(conversations, records, pool) -> tuple[list[Rating], list[Rating]]:
    """The offline `rate` backend's rubric on every candidate round and every pool answer."""
    def row(cid, conv, k, context, q, a):
        return Rating(candidate_id=cid, conversation_id=conv, round=k,
                      score=heuristic_score(context, q, a)[0], judge="offline-heuristic", backend="offline", raw="",
                      request_hash="")
    ratings = []
    for c in conversations:
        r = records[c.id]
        context = r.caption + " " + " ".join(r.inline_mentions)
        turns = c.conversations
        ratings += [row(round_id(c.id, k), c.id, k, context, turns[2 * k]["value"], turns[2 * k + 1]["value"])
                    for k in range(len(turns) // 2)]
    pool_ratings = []
    for p in pool:
        context = p.caption + " " + " ".join(p.inline_mentions)
        pool_ratings += [row(f"{p.question_id}:{side}", p.question_id, 0, context, p.question, a)
                         for side, a in (("A", p.answer_a), ("B", p.answer_b))]
    return ratings, pool_ratings


# ---------------------------------------------------------------- measures

def spread(values) -> dict:
    v = np.asarray(values, dtype=float)
    return {"mean": float(v.mean()), "lo": float(np.percentile(v, 2.5)), "hi": float(np.percentile(v, 97.5))}


def auc_of(scores: dict, pairs: list) -> dict:
    """ROC AUC of the clinician-preferred answers (positives) against the others, over `pairs`."""
    win = [p.a_id if p.label == 1 else p.b_id for p in pairs]
    lose = [p.b_id if p.label == 1 else p.a_id for p in pairs]
    ok = [(w, lo) for w, lo in zip(win, lose) if scores.get(w) is not None and scores.get(lo) is not None]
    if not ok:
        return {"auc": None, "ci95": None, "pos": 0, "neg": 0}
    s = [scores[w] for w, _ in ok] + [scores[lo] for _, lo in ok]
    y = [1] * len(ok) + [0] * len(ok)
    auc = float(roc_auc_score(y, s))
    return {"auc": auc, "ci95": auc_interval(auc, len(ok), len(ok)), "pos": len(ok), "neg": len(ok)}


def precision(kept: list[str], truth: dict, subset: set | None = None) -> dict:
    ids = [c for c in kept if subset is None or c in subset]
    return rate(sum(truth[c] == "good" for c in ids), len(ids))


def kept_by(conversation_scores: dict, select: dict) -> list[str]:
    """What baselines.compare keeps for a method (a null score ranks last)."""
    return release.select_top({c: float("-inf") if s is None else s for c, s in conversation_scores.items()},
                              **select)


def interval(r: dict, key: str = "") -> tuple:
    """(low, high) of a library figure: `low`/`high` (or `<key>low`/`<key>high`)."""
    return r[f"{key}low"], r[f"{key}high"]


def cell(r: dict | None) -> str:
    if r is None or r.get("rate") is None:
        return f"n/a n={0 if r is None else r['n']}" + (f" t={r['ties']}" if r and r.get("ties") else "")
    lo, hi = interval(r)
    out = f"{r['rate']:.3f} [{lo:.2f},{hi:.2f}] n={r['n']}"
    return out + (f" t={r['ties']}" if r.get("ties") else "")


def rcell(s: dict, n: int | str) -> str:
    return f"{s['mean']:.3f} {{{s['lo']:.2f},{s['hi']:.2f}}} n={n}"


def auc_cell(a: dict) -> str:
    if a["auc"] is None:
        return "n/a"
    lo, hi = a["ci95"]
    return f"{a['auc']:.3f} [{lo:.2f},{hi:.2f}] {a['pos']}+/{a['neg']}-"


# ---------------------------------------------------------------- main

def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--figures", type=int, default=1000)
    ap.add_argument("--long-share", type=float, default=0.15, help="figures with a caption over 400 word pieces")
    ap.add_argument("--pool-share", type=float, default=0.5, help="figures in the clinician pool")
    ap.add_argument("--questions", type=int, default=2, help="pool questions per pooled figure")
    ap.add_argument("--noise", type=float, default=0.05, help="share of clinician votes flipped")
    ap.add_argument("--weight", type=float, default=10.0, help="clinician weight w (params.yaml's)")
    ap.add_argument("--model-pairs", type=int, default=None,
                    help="model-rating pairs (default: one per candidate conversation, i.e. --figures)")
    ap.add_argument("--clinician-validation", type=float, default=0.2)
    ap.add_argument("--clinician-test", type=float, default=0.3)
    ap.add_argument("--model-validation", type=float, default=0.1)
    ap.add_argument("--model-test", type=float, default=0.1)
    ap.add_argument("--epochs", type=int, default=selector.TrainConfig.epochs)
    ap.add_argument("--lr", type=float, default=selector.TrainConfig.lr)
    ap.add_argument("--keep", type=float, default=0.5, help="share of candidates kept (filter.ratio)")
    ap.add_argument("--seed", type=int, default=0, help="the synthetic data's seed (merge / train use 0)")
    ap.add_argument("--sweep", action=argparse.BooleanOptionalAction, default=True,
                    help="refit the selector for w in 1, 10, 100, 200, 300, 400")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    if args.model_pairs is None:
        args.model_pairs = args.figures
    torch.set_num_threads(args.threads)
    t_start = time.perf_counter()
    timings = {}
    rng = random.Random(args.seed)

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        t = time.perf_counter()
        sample = {r.id for r in build_sample(tmp / "images", 256).records}
        for m in MODALITIES.values():
            assert all(i in sample for i in m["images"]), m["images"]
        images = ImageStore.of(tmp / "images")
        cache = tmp / "embeddings"
        figs = make_figures(args.figures, args.long_share, rng)
        records = {f["id"]: CorpusRecord(id=f["id"], image=f["image"], caption=f["caption"], fig_label="Figure 1",
                                         inline_mentions=[f["mention"]], domain=f["domain"], source="synthetic")
                   for f in figs}
        long_figs = {f["id"] for f in figs if f["long"]}
        conversations, truth = make_conversations(figs, rng)
        pool, votes, pool_truth, flipped = make_pool(figs, args.pool_share, args.questions, args.noise, rng)
        pool_by_qid = {p.question_id: p for p in pool}
        ratings, pool_ratings = rate_all(conversations, records, pool)
        timings["synthetic data + rating"] = time.perf_counter() - t

        # ---- merge_preferences (the library's calls, as the stage makes them)
        t = time.perf_counter()
        cfg = selector.TrainConfig(epochs=args.epochs, lr=args.lr)
        preferences.check_votes(votes, "synthetic votes")
        preferences.check_ratings(ratings, "synthetic ratings")
        scores = preferences.unit_scores(ratings, conversations, cfg.unit, cfg.aggregate)

        def merged(weight):
            cpairs, ccounts, figure_splits = preferences.clinician_pairs(
                votes, pool_by_qid, weight, args.clinician_validation, args.clinician_test, 0)
            mpairs, mcounts = preferences.model_pairs(scores, args.model_pairs, 0, args.model_validation,
                                                      args.model_test, figure_splits)
            df = pd.DataFrame([asdict(x) for x in cpairs + mpairs], columns=list(PreferencePair.__dataclass_fields__))
            return cpairs, ccounts, figure_splits, mcounts, df

        cpairs, ccounts, figure_splits, mcounts, pairs = merged(args.weight)
        rater_vs_clinicians = preferences.rater_agreement(cpairs, pool_ratings)

        # ---- train_selector
        candidates, skipped = release.screen(conversations, images)
        assert not skipped, skipped[:3]
        units = selector.build_units(records, candidates, pool, cfg.unit)
        assert not selector.missing_images(units, images)
        head, backbone, _, stats = selector.fit(units, pairs, cfg, images, cache)
        model_dir = tmp / "selector"
        selector.save(head, backbone, model_dir, cfg, stats["best_epoch"])
        timings["merge + fit selector (encodes the pair units)"] = time.perf_counter() - t
        t = time.perf_counter()
        head0, backbone0, _, stats0 = selector.fit(units, pairs, cfg, images, cache, model_only=True)
        selector.save(head0, backbone0, model_dir / "model_only", cfg, stats0["best_epoch"])
        timings["fit selector w=0"] = time.perf_counter() - t

        # ---- filter: score, keep, compare (as stages/filter.py)
        t = time.perf_counter()
        select = dict(ratio=args.keep, top_k=0, domains=None)
        conv_scores, _ = selector.score_conversations(candidates, records, images, cache, model_dir)
        keep = release.select_top(conv_scores, args.keep, 0, None)
        test = [PreferencePair(**r) for r in pairs[(pairs["source"] == "clinician") & (pairs["split"] == "test")]
                .to_dict("records")]
        asked = {u.rsplit(":", 1)[0] for p in test for u in (p.a_id, p.b_id)}
        pool_asked = [x for x in pool if x.question_id in asked]
        rater_units = {r.candidate_id: r.score for r in pool_ratings}
        rater = preferences.unit_scores(ratings, candidates, "conversation", "mean")
        methods = {
            "selector": (conv_scores, selector.score_pool_answers(pool_asked, images, cache, model_dir)),
            "rater_threshold": (rater, rater_units),
            "selector_model_only": (
                selector.score_conversations(candidates, records, images, cache, model_dir / "model_only")[0],
                selector.score_pool_answers(pool_asked, images, cache, model_dir / "model_only")),
        }
        comparison = baselines.compare(keep, methods, test, select, seeds=RANDOM_SEEDS)
        timings["score candidates + pool, compare"] = time.perf_counter() - t

        # ---- ablation: the selector without the lexical grounding feature (features cached: training only)
        t = time.perf_counter()
        cfg_plain = dataclasses.replace(cfg, lexical_grounding=False)
        head_p, backbone_p, _, stats_p = selector.fit(units, pairs, cfg_plain, images, cache)
        selector.save(head_p, backbone_p, tmp / "plain", cfg_plain, stats_p["best_epoch"])
        plain_units = selector.score_pool_answers(pool_asked, images, cache, tmp / "plain")
        timings["fit selector without lexical grounding"] = time.perf_counter() - t

        # ---- the sweep over clinician weight w (features cached: training only)
        sweep = []
        if args.sweep:
            t = time.perf_counter()
            for w in SWEEP:
                _, _, splits_w, _, pairs_w = merged(w)
                assert splits_w == figure_splits  # the same figures in each split for every w
                _, _, _, st = selector.fit(units, pairs_w, cfg, images, cache)
                sweep.append((w, st))
            timings[f"sweep ({len(SWEEP)} fits)"] = time.perf_counter() - t
        elapsed = time.perf_counter() - t_start

    # ---------------------------------------------------------------- report
    order = ["selector", "selector_model_only", "rater_threshold"]
    heads = [f"selector w={args.weight:g}", "selector w=0", "rater threshold", f"random ({RANDOM_SEEDS} seeds)"]
    width, label_w = 31, 30

    def line(label, cells):
        print(f"{label:<{label_w}}" + "".join(f"{c:<{width}}" for c in cells))

    qtype = {p.question_id: pool_truth[p.question_id][1] for p in pool}

    def of_pair(p):
        return p.a_id.rsplit(":", 1)[0]

    subsets = {"all test pairs": test}
    for ct in CORRUPTIONS:
        subsets[f"  vs {ct}"] = [p for p in test if qtype[of_pair(p)] == ct]
    subsets["  long-caption figures"] = [p for p in test if pool_by_qid[of_pair(p)].figure_id in long_figs]
    subsets["  short-caption figures"] = [p for p in test if pool_by_qid[of_pair(p)].figure_id not in long_figs]
    true_test = [PreferencePair(p.a_id, p.b_id, int(pool_truth[of_pair(p)][0] == "A"), p.weight, p.source, p.split)
                 for p in test]
    subsets["all, TRUE labels (no noise)"] = true_test

    test_units = sorted({u for p in test for u in (p.a_id, p.b_id)})
    rand = {name: [] for name in subsets}
    rand_auc, rand_prec, rand_prec_long = [], [], []
    ids = sorted(conv_scores)
    for seed in range(RANDOM_SEEDS):
        r = random.Random(seed)
        s = {u: r.random() for u in test_units}
        for name, sub in subsets.items():
            rand[name].append(preferences.agreement(s, sub)["rate"])
        rand_auc.append(auc_of(s, test)["auc"])
        chosen = release.select_top({c: r.random() for c in ids}, **select)
        rand_prec.append(precision(chosen, truth)["rate"])
        pl = precision(chosen, truth, long_figs)["rate"]
        if pl is not None:
            rand_prec_long.append(pl)

    n_good = sum(v == "good" for v in truth.values())
    by_source = pairs.groupby(["source", "split"]).size()
    print("SELECTION QUALITY on a SYNTHETIC corpus: offline heuristic rater (vital.llm.offline.heuristic_score), "
          "illustrative rule clinicians.")
    print("These figures check the method's mechanics (merge -> train -> filter), not the quality of any model.")
    print("command: python benchmarks/selection_quality.py " + " ".join(sys.argv[1:]))
    print()
    tok = np.array([f["caption_tokens"] for f in figs])
    by_modality = ", ".join(f"{k} {sum(f['modality'] == k for f in figs)}" for k in MODALITIES)
    print(f"figures {len(figs)} ({by_modality}); "
          f"long captions (>{LONG_TOKENS} word pieces) {len(long_figs)}, caption word pieces median "
          f"{int(np.median(tok))}, max {tok.max()}")
    print(f"candidates {len(conversations)} x 3 rounds: good {n_good}, "
          + ", ".join(f"{c} {sum(v == c for v in truth.values())}" for c in CORRUPTIONS)
          + f"; kept {len(keep)} (--keep {args.keep:g})")
    print(f"clinician pool {len(pool)} questions on {len({p.figure_id for p in pool})} figures, {len(votes)} votes "
          f"({flipped} flipped by --noise {args.noise:g}); vote counts {ccounts}")
    print("pairs: " + ", ".join(f"{src} {split} {int(by_source.get((src, split), 0))}"
                                for src in ("clinician", "model") for split in preferences.SPLITS)
          + f"; clinician weight w={args.weight:g}; model pairs drawn from {mcounts['units']} rated rounds")
    print(f"rater vs clinicians (preferences.rater_agreement) on all clinician pairs: "
          f"{cell(rater_vs_clinicians['all'])}")
    shown = ", ".join(f"{k}={v}" for k, v in asdict(cfg).items()
                      if k in ("epochs", "lr", "loss", "unit", "aggregate", "hidden", "batch_size"))
    print(f"selector: TrainConfig({shown}); "
          f"best epoch w={args.weight:g}: {stats['best_epoch']} (chosen on {stats['epoch_chosen_on']}), "
          f"w=0: {stats0['best_epoch']} (chosen on {stats0['epoch_chosen_on']}); train pairs {stats['train_pairs']} "
          f"/ {stats0['train_pairs']}; units with a long context {stats['units_long_context']}")
    print()
    print("cell: rate [95% Wilson CI] n=decided pairs t=ties (equal scores: neither right nor wrong, not in n);")
    print(f"random: mean {{2.5-97.5% range over {RANDOM_SEEDS} seeds}} n=pairs")
    print()
    line("", heads)
    line("(a) clinician TEST pair acc.", [""] * 4)
    for name, sub in subsets.items():
        cells = [cell(preferences.agreement(methods[m][1], sub)) for m in order]
        vals = [v for v in rand[name] if v is not None]
        cells.append(rcell(spread(vals), len(sub)) if vals else "n/a")
        line(name, cells)
    # a tie counted as half right: the rater's integer scores tie often, so its rate above is over fewer pairs
    half = []
    for m in order:
        a = preferences.agreement(methods[m][1], test)
        n = a["n"] + a["ties"]
        half.append(cell({**rate(a["k"] + a["ties"] / 2, n), "ties": 0}) if n else "n/a")
    line("all, a tie counted as 1/2", half + [""])
    # baselines.compare's own figures, as metrics/selection.json would hold them
    rt = comparison["random"]["clinician_test"]
    lo, hi = rt["low"], rt["high"]
    line("  (baselines.compare, all)", [cell(comparison[m]["clinician_test"]) for m in order]
         + [rcell({"mean": rt["mean"], "lo": lo, "hi": hi}, len(test))])
    line("(b) test AUC [Hanley-McNeil]", [auc_cell(auc_of(methods[m][1], test)) for m in order]
         + [rcell(spread(rand_auc), 2 * len(test))])
    line("(c) precision@kept", [""] * 4)
    prec = {m: precision(kept_by(methods[m][0], select), truth) for m in order}
    for m in order:
        assert prec[m]["n"] == comparison[m]["kept"]
    base = rate(n_good, len(truth))
    line("  all candidates", [cell(prec[m]) for m in order] + [rcell(spread(rand_prec), len(keep))])
    line("  long-caption figures", [cell(precision(kept_by(methods[m][0], select), truth, long_figs)) for m in order]
         + [rcell(spread(rand_prec_long), f"~{round(len(keep) * len(long_figs) / len(truth))}") if rand_prec_long
            else "n/a"])
    line("  share good among candidates", [cell(base)] * 3 + [""])
    line("  overlap with the release", [f"{comparison[m]['overlap']:.3f}" for m in order]
         + [f"{comparison['random']['overlap']['mean']:.3f}"])
    print()
    print("(d) rule: a method beats random on a type when its test accuracy there is above random's 97.5th percentile "
          "AND its 95% CI's lower end is above 0.5")
    verdicts = {}
    for ct in [*CORRUPTIONS, None]:
        name = f"  vs {ct}" if ct else "all test pairs"
        vals = [v for v in rand[name] if v is not None]
        hi = spread(vals)["hi"] if vals else 1.0
        res = {}
        for m in order:
            a = preferences.agreement(methods[m][1], subsets[name])
            res[m] = a["rate"] is not None and a["rate"] > hi and interval(a)[0] > 0.5
        verdicts[ct or "all"] = res
        a = preferences.agreement(methods["selector"][1], subsets[name])
        print(f"  {ct or 'all types':<20} selector beats random: {'yes' if res['selector'] else 'NO '}   "
              f"(selector {cell(a)}; random 97.5% {hi:.3f}; w=0 {'yes' if res['selector_model_only'] else 'no'}, "
              f"rater {'yes' if res['rater_threshold'] else 'no'})")

    print()
    print("(e) ablation: the selector (w={:g}) without its lexical grounding feature "
          "(train_selector.lexical_grounding=false), clinician TEST pair accuracy".format(args.weight))
    for name in ["all test pairs", *[f"  vs {ct}" for ct in CORRUPTIONS], "  long-caption figures"]:
        line("  without: " + name.strip(), [cell(preferences.agreement(plain_units, subsets[name])), "(with it: "
                    + cell(preferences.agreement(methods["selector"][1], subsets[name])) + ")"])

    if sweep:
        print()
        print("clinician-weight sweep (refit per w; same figures in each split; test is reported, validation is "
              "what a choice of w would use)")
        print(f"{'w':>5}  {'best epoch':>10}  {'validation alignment':<31}{'TEST alignment':<31}{'test AUC':<31}")
        rows = [(0, stats0)] + sweep
        best_w = max(sweep, key=lambda x: (x[1]["validation"]["clinician_alignment"]["rate"] or -1, -x[0]))[0]
        for w, st in rows:
            v, te = st["validation"], st["test"]
            auc = {"auc": te["auc"], "ci95": interval(te, "auc_"), "pos": te["clinician_alignment"]["pairs"],
                   "neg": te["clinician_alignment"]["pairs"]}
            mark = "  <- validation's choice" if w == best_w else ("  (model pairs only)" if w == 0 else "")
            print(f"{w:>5}  {st['best_epoch']:>10}  {cell(v['clinician_alignment']):<31}"
                  f"{cell(te['clinician_alignment']):<31}{auc_cell(auc):<31}{mark}")
        print("(validation's choice: the highest validation alignment, ties to the smaller w)")

    print()
    for k, v in timings.items():
        print(f"time: {k}: {v:.1f} s")
    print(f"wall time: {elapsed:.1f} s ({args.threads} torch threads)")


if __name__ == "__main__":
    main()
