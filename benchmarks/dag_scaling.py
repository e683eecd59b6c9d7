"""Cost per figure of the offline DAG (corpus .. filter) as the corpus grows; a +10% rerun; Ray workers.

    .venv/bin/python benchmarks/dag_scaling.py                          # 1,000 and 3,000 figures (~15 min, 2 cores)
    .venv/bin/python benchmarks/dag_scaling.py --figures 1000 10000      # ~33 min on 2 cores
    .venv/bin/python benchmarks/dag_scaling.py --figures 10000 40000 --rerun-share 0 --no-ray-check  # ~72 min
    .venv/bin/python benchmarks/dag_scaling.py --figures 10000 100000 --rerun-share 0 --no-ray-check  # ~2.6 h
    .venv/bin/python benchmarks/dag_scaling.py --figures 100 300 --no-ray-check --keep # smoke run; keep the repos
    .venv/bin/python benchmarks/dag_scaling.py --ray-only --ray-figures 2048   # only the Ray check (~8 min)

Measured, side by side in one run, each size in a fresh copy of this working tree (tracked and untracked files,
not data/; `--head` clones HEAD instead) under a temp dir, with every backend offline (params.yaml as it is, but
`corpus.source: path` on a synthetic LLaVA-Med fig_captions corpus):
- `dvc repro -s <stage>` for each stage from `corpus` to `filter`, one at a time: the stage process's own seconds
  per 1K figures and its peak RSS (stages/python finds a `python` in $VIRTUAL_ENV, which here is a shim that runs
  the stage in a child and reads getrusage(RUSAGE_CHILDREN): one fresh shim per stage, so one peak per stage);
  the total also has DVC's own time (hashing, caching outputs) as `dvc repro -s` wall time;
- then, at the largest size, 10% new figures appended to the corpus and the same stages again: per stage the
  work computed and taken from cache (metrics/<stage>.json: `requests` / `cached` of the model stages,
  `features.computed` / `features.from_cache` of train_selector and filter; n/a where absent), and the rerun's
  computed work and seconds as a share of the full run's;
- the transformers backend of `generate` (tiny random LLaVA, vital.tune.build_tiny_llava) on a local Ray with
  1 and 2 workers (1 CPU, 1 thread each; vital.llm.ray_engine.Engine), every request computed (fresh cache):
  requests/s and the ratio (a stage starts its actors once, re-asks included: a few seconds here, amortized over
  more requests as --ray-figures grows); and, for reference, the same requests through TransformersBackend in 1 and 2 plain
  processes (model loaded before timing): what this machine allows without Ray's actor start and scheduling.
Targets (issue): total cost per figure at the largest size <= 1.3x the smallest; the +10% rerun computes <= 15% of
the full run's requests and features; peak RSS at 100K <= 1.5x 10K (printed: largest / second largest size); 2 Ray
workers >= 1.7x one.
The smallest size carries the stages' fixed cost (imports, MiniLM load: a few seconds each) over fewer figures,
so its cost per figure is high and the ratio flatters the larger size: compare 10K with 100K for the target.

SYNTHETIC: every figure is made here, seeded. Images: 96 px JPEGs (~3 KB), random 8x8 blocks upscaled plus
noise, grey for radiology, RGB for histology / gross: distinct pHashes (about 32 bits apart, dedup keeps them).
Captions (~40 words) and mentions from per-domain templates with ~12 random slots (modality, anatomy, side,
finding, count, size, age, stain, ...) and a specimen number: word-3-gram Jaccard far under dedup.caption_jaccard
0.9. 1-4 figures per paper (pmid). The clinician votes and demonstrations are the repository's examples (their
pool questions are not in this corpus: merge_preferences counts them stale), so the selector trains on
merge_preferences.model_pairs model pairs.
"""
import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import yaml
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
STAGES = ["corpus", "dedup", "decontaminate", "annotation_pool", "generate", "decontaminate_qa", "rate",
          "merge_preferences", "train_selector", "filter"]
MODEL_STAGES = ("annotation_pool", "generate", "rate")  # requests / cached
FEATURE_STAGES = ("train_selector", "filter")  # features.computed / from_cache
SHIM = """#!{python}
import json, os, resource, subprocess, sys, time
t = time.perf_counter()
rc = subprocess.call([{python!r}] + sys.argv[1:])
with open(os.environ["DAG_SCALING_LOG"], "a") as f:
    u = resource.getrusage(resource.RUSAGE_CHILDREN)
    f.write(json.dumps({{"argv": sys.argv[1:], "s": time.perf_counter() - t, "cpu_s": u.ru_utime + u.ru_stime,
                        "rss_mb": u.ru_maxrss / 1024}}) + "\\n")
sys.exit(rc)
"""

# ------------------------------------------------------------------ synthetic corpus (LLaVA-Med fig_captions)

DOMAIN_TEXT = {
    "chest_xray": (["Frontal chest radiograph", "Portable AP chest radiograph", "Lateral chest radiograph",
                    "PA chest X-ray"], ["lung", "upper zone", "lower zone", "hilum", "costophrenic angle", "apex"],
                   ["rounded opacity", "consolidation", "pleural effusion", "pneumothorax", "cavitating lesion",
                    "reticular shadowing", "nodule", "atelectasis"]),
    "ct_scan": (["Axial contrast-enhanced CT", "Coronal CT reconstruction", "Non-contrast axial CT", "CT angiogram"],
                ["liver", "kidney", "pancreas", "spleen", "adrenal gland", "lung base", "pelvis", "aorta"],
                ["hypodense lesion", "calcified mass", "enhancing nodule", "fluid collection", "aneurysm",
                 "lymph node", "cyst", "fracture"]),
    "mri": (["Axial T2-weighted MR image", "Sagittal T1-weighted MRI", "Coronal FLAIR MR image", "Diffusion MRI"],
            ["brain", "frontal lobe", "cerebellum", "knee", "shoulder", "lumbar spine", "liver", "prostate"],
            ["hyperintense lesion", "ring-enhancing mass", "oedema", "tear", "infarct", "demyelinating plaque",
             "haemorrhage", "disc herniation"]),
    "histology": (["Photomicrograph", "Immunohistochemistry section", "High-power micrograph", "Biopsy section"],
                  ["colonic gland", "lymph node", "skin", "liver lobule", "renal glomerulus", "breast duct",
                   "bronchial mucosa", "bone marrow"],
                  ["atypical cells", "granuloma", "necrosis", "mitotic figures", "lymphocytic infiltrate",
                   "fibrosis", "signet ring cells", "amyloid deposits"]),
    "gross": (["Gross specimen photograph", "Cut surface of the resected specimen", "Macroscopic photograph",
               "Autopsy specimen"], ["kidney", "uterus", "colon", "lung lobe", "thyroid", "spleen", "heart", "ovary"],
              ["tan mass", "haemorrhagic area", "cystic cavity", "white nodule", "ulcerated lesion", "infarcted area",
               "polyp", "firm tumour"]),
    "other": (["Fundus photograph", "Ultrasound image", "Dermoscopy image", "Endoscopic view"],
              ["optic disc", "macula", "thyroid lobe", "gallbladder", "skin of the forearm", "gastric antrum",
               "oesophagus", "bladder wall"], ["bright lesion", "hypoechoic nodule", "pigmented lesion", "erosion",
                                                 "haemorrhage", "stone", "polyp", "vascular pattern"]),
}
SIDES = ["left", "right", "bilateral", "central", "medial", "lateral"]
COUNTS = ["a single", "a solitary", "multiple", "several", "numerous", "two", "three", "scattered"]
SHAPES = ["well-defined", "ill-defined", "lobulated", "irregular", "smooth", "spiculated", "rounded", "oval"]
EXTRA = ["with surrounding oedema", "without calcification", "adjacent to the vessels", "abutting the capsule",
         "with a thin rim", "with internal septations", "with central necrosis", "with a fluid level",
         "extending to the margin", "sparing the periphery"]
STAINS = ["haematoxylin and eosin", "Masson trichrome", "PAS", "Ki-67", "CD20", "reticulin", "Congo red", "Giemsa"]
DIAGNOSES = ["metastatic disease", "infection", "a benign process", "lymphoma", "an inflammatory process",
             "a primary tumour", "ischaemia", "a congenital anomaly", "trauma", "granulomatous disease"]
REASONS = ["follow-up", "staging", "acute pain", "fever", "weight loss", "a palpable mass", "screening", "dyspnoea",
           "haematuria", "an incidental finding"]


def figure(i: int, rng: np.random.Generator) -> tuple[dict, Image.Image]:
    domain = list(DOMAIN_TEXT)[i % len(DOMAIN_TEXT)]
    modalities, anatomy, findings = DOMAIN_TEXT[domain]
    c = lambda xs: xs[int(rng.integers(len(xs)))]  # noqa: E731
    age, size, n = int(rng.integers(2, 95)), rng.integers(3, 120) / 10, int(rng.integers(1000, 99999))
    finding, where, modality, side = c(findings), c(anatomy), c(modalities), c(SIDES)
    stain = f" stained with {c(STAINS)}" if domain == "histology" else ""
    caption = (f"{modality}{stain} of a {age}-year-old {c(['man', 'woman', 'boy', 'girl'])} referred for "
               f"{c(REASONS)}, showing {c(COUNTS)} {c(SHAPES)} {finding} in the {side} {where}, measuring "
               f"{size:.1f} cm, {c(EXTRA)}. The {c(anatomy)} appears {c(['normal', 'enlarged', 'small', 'displaced'])} "
               f"and the {c(findings)} is {c(['absent', 'subtle', 'prominent', 'unchanged'])} (specimen {n}).")
    mention = (f"The {modality.lower()} (Figure {1 + i % 4}) demonstrated the {finding} in the {side} {where}, "
               f"{c(['consistent with', 'suggestive of', 'raising concern for', 'compatible with'])} "
               f"{c(DIAGNOSES)}; a {c(['biopsy', 'follow-up scan', 'repeat study', 'resection'])} was "
               f"{c(['planned', 'performed', 'declined', 'advised'])} after {int(rng.integers(1, 30))} days.")
    grey = domain in ("chest_xray", "ct_scan", "mri")
    ch = 1 if grey else 3
    blocks = Image.fromarray(rng.integers(0, 256, (8, 8, ch), dtype=np.uint8).squeeze(), "L" if grey else "RGB")
    arr = np.asarray(blocks.resize((96, 96), Image.BICUBIC), np.float32).reshape(96, 96, ch)
    arr = np.clip(arr + rng.normal(0, 12, arr.shape), 0, 255).astype(np.uint8)
    image = Image.fromarray(arr.squeeze(), "L" if grey else "RGB")
    record = {"pair_id": f"synth_{i:07d}", "pmid": f"9{i // 3:07d}", "fig_label": f"Figure {1 + i % 4}",
              "fig_caption": caption, "in_text_mention": [mention],
              "domain": {d: d == domain for d in DOMAIN_TEXT if d != "other"}}
    return record, image


def add_figures(folder: Path, start: int, n: int) -> None:
    """Append figures start .. start+n-1 to folder/fig_captions.jsonl and folder/images/ (seeded per block)."""
    (folder / "images").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng([start, n])
    with open(folder / "fig_captions.jsonl", "a") as f:
        for i in range(start, start + n):
            record, image = figure(i, rng)
            image.save(folder / "images" / f"{record['pair_id']}.jpg", quality=85)
            f.write(json.dumps(record) + "\n")


# ------------------------------------------------------------------ a repository copy, its stages

def make_repo(dst: Path, head: bool) -> None:
    if head:
        subprocess.run(["git", "clone", "-q", str(ROOT), str(dst)], check=True)
        return
    files = subprocess.run(["git", "-C", str(ROOT), "ls-files", "-co", "--exclude-standard", "-z"], check=True,
                           capture_output=True).stdout.decode().split("\0")
    for rel in filter(None, files):
        if (ROOT / rel).is_file():
            (dst / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / rel, dst / rel)
    subprocess.run(["git", "init", "-q"], cwd=dst, check=True)  # DVC wants a git repository; nothing committed


def setup(dst: Path, n: int, snapshot: Path) -> None:
    shutil.copytree(snapshot, dst, symlinks=True)
    add_figures(dst / "synthetic", 0, n)
    p = yaml.safe_load((dst / "params.yaml").read_text())
    p["corpus"].update(source="path", path="synthetic/fig_captions.jsonl", image_dir="synthetic/images")
    (dst / "params.yaml").write_text(yaml.safe_dump(p, sort_keys=False, width=120))


def run_stages(repo: Path, env: dict) -> dict:
    """Each stage by `dvc repro -s`; {stage: {s, cpu_s, rss_mb, wall_s, metrics}}."""
    out = {}
    for stage in STAGES:
        log = repo.parent / f"{stage}.rusage.jsonl"
        log.unlink(missing_ok=True)
        t = time.perf_counter()
        r = subprocess.run(["dvc", "repro", "-s", stage], cwd=repo,  # the copy's own src/, not the installed one
                           env=dict(env, DAG_SCALING_LOG=str(log),
                                    PYTHONPATH=os.pathsep.join(filter(None, [str(repo / "src"), env.get("PYTHONPATH")]))),
                           capture_output=True, text=True)
        wall = time.perf_counter() - t
        if r.returncode:
            sys.exit(f"dvc repro -s {stage} failed in {repo}:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}")
        runs = [json.loads(x) for x in log.read_text().splitlines()] if log.exists() else []
        metrics_file = repo / "metrics" / f"{stage}.json"
        out[stage] = {"s": sum(x["s"] for x in runs), "cpu_s": sum(x["cpu_s"] for x in runs),
                      "rss_mb": max((x["rss_mb"] for x in runs), default=0.0), "wall_s": wall,
                      "metrics": json.loads(metrics_file.read_text()) if metrics_file.exists() else {}}
        print(f"  {stage}: {out[stage]['s']:.1f} s, peak RSS {out[stage]['rss_mb']:.0f} MB", flush=True)
    return out


def work(stage: str, m: dict) -> tuple[int | None, int | None]:
    """(computed, from cache) of one stage's metrics; None where the stage does not report it."""
    if stage in MODEL_STAGES:
        return m.get("requests"), m.get("cached")
    f = m.get("features") if stage in FEATURE_STAGES else None
    return (f.get("computed"), f.get("from_cache")) if isinstance(f, dict) else (None, None)


# ------------------------------------------------------------------ Ray: 1 vs 2 workers

class Capture:
    """A backend that keeps the messages it is sent and answers nothing usable (so each is asked again once, as
    with the random tiny model): the requests a transformers generate run computes, for the reference row."""
    name = model = identity = "transformers"

    def __init__(self):
        self.sent = []

    async def acomplete(self, messages, task, sampling):
        from vital.llm.backends import Reply
        self.sent.append(messages)
        return Reply("nothing to parse")

    async def aclose(self):
        pass


def bare_process(args) -> float:
    """Seconds one plain process (1 torch thread, no Ray) takes for these requests, 4 at a time."""
    model, requests, sampling = args
    import torch
    from vital.llm.backends import TransformersBackend

    torch.set_num_threads(1)
    backend = TransformersBackend(model, 4, "cpu")
    t = time.perf_counter()
    for i in range(0, len(requests), 4):
        backend._generate(requests[i:i + 4], sampling)
    return time.perf_counter() - t


def ray_check(tmp: Path, n_records: int, max_tokens: int) -> list[str]:
    try:
        import ray  # noqa: F401
        from vital.llm.ray_engine import Engine
    except ImportError as e:
        return [f"ray engine not available ({e})"]
    import multiprocessing

    from vital.corpus import build_sample
    from vital.generate import GenerateConfig, generate
    from vital.llm.client import Client, ClientConfig
    from vital.schema import AppendLog
    from vital.tune import build_tiny_llava

    os.environ.pop("RAY_ADDRESS", None)
    sample = build_sample(tmp / "sample", 256).records
    records = []
    for i in range(n_records):  # distinct captions: distinct requests, nothing shared in the cache
        r = sample[i % len(sample)]
        records.append(type(r)(**{**r.__dict__, "id": f"{r.id}_{i}", "caption": f"{r.caption} (case {i})"}))
    model, processor = build_tiny_llava()
    model.save_pretrained(tmp / "tiny")
    processor.save_pretrained(tmp / "tiny")
    cfg = GenerateConfig(max_tokens=max_tokens)
    rows = []
    try:
        for label, workers, part in (("warm-up (not timed)", 1, records[:32]), ("1 worker", 1, records),
                                     ("2 workers", 2, records)):
            engine = Engine(kind="ray", address="", workers=workers, cpus_per_worker=1, gpus_per_worker=0,
                            batch_size=4)
            client = Client(ClientConfig(backend="transformers", model=str(tmp / "tiny"), batch_size=4), engine=engine)
            t = time.perf_counter()
            _, _, failures, stats = generate(part, tmp / "sample", [], client,
                                             AppendLog(tmp / f"cache-{len(rows)}.jsonl"), cfg)
            rows.append((label, stats["requests"], len(failures), stats["requests"] / (time.perf_counter() - t)))
    except Exception as e:  # noqa: BLE001 - report, do not lose the DAG table printed above
        return [f"ray engine failed: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"]
    finally:
        if "ray" in sys.modules and sys.modules["ray"].is_initialized():
            sys.modules["ray"].shutdown()
    capture = Capture()  # the reference: the same requests in 1 and 2 plain processes, model loaded before timing
    generate(records, tmp / "sample", [], Client(ClientConfig(), capture), AppendLog(tmp / "capture.jsonl"), cfg)
    bare = {}
    with multiprocessing.get_context("spawn").Pool(2) as pool:
        for n in (1, 2):
            parts = pool.map(bare_process, [(str(tmp / "tiny"), capture.sent[k::n], cfg.sampling) for k in range(n)])
            bare[n] = len(capture.sent) / max(parts)
    lines = ["| generate, tiny random LLaVA, transformers backend | requests computed | failed | requests/s |",
             "|---|---|---|---|"]
    lines += [f"| Ray, {label} (1 CPU, 1 thread each) | {n} | {f} | {rate:.2f} |" for label, n, f, rate in rows[1:]]
    lines += [f"| reference: the same requests in {n} plain process{'es' if n > 1 else ''} (no Ray, no actor start) "
              f"| {len(capture.sent)} | | {bare[n]:.2f} |" for n in (1, 2)]
    ratio = rows[2][3] / rows[1][3]
    lines.append(f"\ntarget: Ray 2 workers / 1 worker {ratio:.2f}x (target >= 1.7x: "
                 f"{'holds' if ratio >= 1.7 else 'MISSED'}); plain processes 2 / 1: {bare[2] / bare[1]:.2f}x (what "
                 f"this machine allows). {n_records} figures, max_tokens {max_tokens}, every reply asked again once "
                 "(random weights write nothing parseable; on Ray by its worker at once, in the same pass), both "
                 "counted as requests")
    return lines


# ------------------------------------------------------------------ main

def machine() -> str:
    info = Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []
    model = next((line.split(":", 1)[1].strip() for line in info if line.startswith("model name")),
                 platform.processor() or "unknown CPU")
    return (f"{os.cpu_count()} cores, {model}, {platform.system()} {platform.release()}, "
            f"Python {platform.python_version()}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--figures", type=int, nargs="+", default=[1000, 3000])
    ap.add_argument("--rerun-share", type=float, default=0.1,
                    help="new figures added for the rerun (largest size); 0: no rerun")
    ap.add_argument("--ray-check", action=argparse.BooleanOptionalAction, default=True)
    ap.add_argument("--ray-only", action="store_true", help="only the Ray check (no DAG runs)")
    ap.add_argument("--ray-figures", type=int, default=256)
    ap.add_argument("--ray-max-tokens", type=int, default=16)
    ap.add_argument("--head", action="store_true", help="clone HEAD instead of copying the working tree")
    ap.add_argument("--keep", action="store_true", help="keep the temp dir (printed)")
    args = ap.parse_args()
    if args.ray_only:
        tmp = Path(tempfile.mkdtemp(prefix="dag_scaling_"))
        print(f"# Ray check, {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC\n\nmachine: {machine()}\n")
        try:
            print("\n".join(ray_check(tmp, args.ray_figures, args.ray_max_tokens)))
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return
    sizes = sorted(set(args.figures))
    started = time.time()
    tmp = Path(tempfile.mkdtemp(prefix="dag_scaling_"))
    shim = tmp / "shim" / "bin" / "python"
    shim.parent.mkdir(parents=True)
    shim.write_text(SHIM.format(python=sys.executable))
    shim.chmod(0o755)
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", DVC_NO_ANALYTICS="1", TQDM_DISABLE="1",
               TOKENIZERS_PARALLELISM="false", VIRTUAL_ENV=str(shim.parent.parent),
               PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    print(f"# DAG scaling, {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC\n\nmachine: {machine()}\n"
          f"source: {'HEAD' if args.head else 'working tree'} of {ROOT}; offline backends; temp dir {tmp}; "
          f"load average at start {os.getloadavg()[0]:.2f} (another job on the machine moves every time)\n")
    full, rerun, build_s = {}, None, {}
    snapshot = tmp / "snapshot"  # one copy of the code for every size, even if the working tree changes meanwhile
    try:
        make_repo(snapshot, args.head)
        for n in sizes:
            repo = tmp / f"n{n}" / "repo"
            repo.parent.mkdir()
            t = time.perf_counter()
            setup(repo, n, snapshot)
            build_s[n] = time.perf_counter() - t
            print(f"{n:,} figures: corpus written in {build_s[n]:.0f} s; running corpus .. filter", flush=True)
            full[n] = run_stages(repo, env)
            if n == sizes[-1] and args.rerun_share > 0:
                extra = max(1, round(n * args.rerun_share))
                add_figures(repo / "synthetic", n, extra)
                print(f"+{extra:,} figures; rerunning", flush=True)
                rerun = (extra, run_stages(repo, env))
            if not args.keep:
                shutil.rmtree(repo.parent, ignore_errors=True)
        lines = (ray_check(tmp / "ray", args.ray_figures, args.ray_max_tokens) if args.ray_check
                 else ["ray check: skipped (--no-ray-check)"])
    finally:
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)

    lo, hi = sizes[0], sizes[-1]
    second = sizes[-2] if len(sizes) > 1 else hi
    per = lambda n, row, key: row[key] / n * 1e3  # noqa: E731  (seconds per 1K figures)
    print("\n| stage | " + " | ".join(f"{n:,}: s/1K | CPU s/1K | RSS MB" for n in sizes)
          + f" | s/1K {hi:,} / {lo:,} | CPU s/1K {hi:,} / {lo:,} | RSS {hi:,} / {second:,} |")
    print("|---" * (4 + 3 * len(sizes)) + "|")
    rows = {n: dict(full[n]) for n in sizes}
    for n in sizes:
        rows[n]["**stages**"] = {"s": sum(v["s"] for v in full[n].values()),
                                 "cpu_s": sum(v["cpu_s"] for v in full[n].values()),
                                 "rss_mb": max(v["rss_mb"] for v in full[n].values())}
    for stage in [*STAGES, "**stages**"]:
        r = {n: rows[n][stage] for n in sizes}
        cells = [f"{per(n, r[n], 's'):.2f} | {per(n, r[n], 'cpu_s'):.2f} | {r[n]['rss_mb']:.0f}" for n in sizes]
        ratios = [per(hi, r[hi], k) / max(1e-9, per(lo, r[lo], k)) for k in ("s", "cpu_s")]
        ratios.append(r[hi]["rss_mb"] / max(1e-9, r[second]["rss_mb"]))
        print(f"| {stage} | " + " | ".join(cells) + " | " + " | ".join(f"{x:.2f}" for x in ratios) + " |")
    tot = {n: rows[n]["**stages**"]["s"] for n in sizes}
    peak = {n: rows[n]["**stages**"]["rss_mb"] for n in sizes}
    wall = {n: sum(v["wall_s"] for v in full[n].values()) for n in sizes}
    print("\n(s: the stage process's wall seconds, CPU: its user + system seconds, RSS: its peak; a shared or busy "
          "machine moves s most. In all: " + "; ".join(f"{n:,} figures {tot[n]:.0f} s in stages, {wall[n]:.0f} s of "
                                                      f"`dvc repro -s` (DVC included), {build_s[n]:.0f} s to write "
                                                      "the synthetic corpus" for n in sizes) + ")")

    if rerun:
        num = den = 0
        extra, again = rerun
        print(f"\n| +{extra:,} figures on {hi:,}: stage | full: computed | rerun: computed | rerun: from cache "
              "| rerun computed / full | rerun s / full s | rerun CPU s / full |\n|---|---|---|---|---|---|---|")
        for stage in STAGES:
            fc, _ = work(stage, full[hi][stage]["metrics"])
            rc, rcache = work(stage, again[stage]["metrics"])
            share = f"{rc / fc:.1%}" if fc and rc is not None else "n/a"
            if fc and rc is not None:
                num, den = num + rc, den + fc
            na = lambda v: "n/a" if v is None else f"{v:,}"  # noqa: E731
            s_share, c_share = (again[stage][k] / max(1e-9, full[hi][stage][k]) for k in ("s", "cpu_s"))
            print(f"| {stage} | {na(fc)} | {na(rc)} | {na(rcache)} | {share} | {s_share:.1%} | {c_share:.1%} |")
        rs, fs = sum(v["s"] for v in again.values()), tot[hi]
        rc_s, fc_s = sum(v["cpu_s"] for v in again.values()), rows[hi]["**stages**"]["cpu_s"]
        print(f"| **all** | {den:,} | {num:,} | | {num / max(1, den):.1%} | {rs / fs:.1%} | {rc_s / fc_s:.1%} |")

    print(f"\ntargets ({lo:,} -> {hi:,} figures" + (f"; rerun at {hi:,} + {rerun[0]:,}):" if rerun else "):"))
    r1 = (tot[hi] / hi) / (tot[lo] / lo)
    c1 = (rows[hi]["**stages**"]["cpu_s"] / hi) / (rows[lo]["**stages**"]["cpu_s"] / lo)
    print(f"- stage seconds per figure {hi:,} / {lo:,}: {r1:.2f}x, CPU seconds {c1:.2f}x (target <= 1.3x: "
          f"{'holds' if r1 <= 1.3 else 'MISSED'})")
    if rerun:
        print(f"- rerun after +{args.rerun_share:.0%}: {num / max(1, den):.1%} of the full run's computed requests + "
              f"features (target <= 15%: {'holds' if num / max(1, den) <= 0.15 else 'MISSED'}); {rs / fs:.1%} of "
              "its stage seconds (no target: stages without a record cache redo their work)")
    else:
        print("- rerun: skipped (--rerun-share 0)")
    r3 = peak[hi] / peak[second]
    print(f"- peak RSS {hi:,} / {second:,}: {r3:.2f}x (target at 100K / 10K <= 1.5x: "
          f"{'holds' if r3 <= 1.5 else 'MISSED'}"
          f"{'' if (second, hi) == (10000, 100000) else '; not the target sizes'})")
    print("\n" + "\n".join(lines))
    print(f"\n{time.time() - started:.0f} s in all; load average now {os.getloadavg()[0]:.2f}"
          + (f"; kept {tmp}" if args.keep else ""))


if __name__ == "__main__":
    main()
