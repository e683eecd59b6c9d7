"""`vital`: the human-facing commands that are not DVC stages."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import typer

app = typer.Typer(help="BioMed-VITAL: clinician-preference-aligned biomedical visual instruction data. "
                  "The pipeline itself runs with `dvc repro`.", no_args_is_help=True, pretty_exceptions_enable=False)


@app.callback()
def _options(debug: bool = typer.Option(False, "--debug", help="on an error, show the traceback (anywhere on the "
                                        "command line)")):
    """An error is one line on stderr and exit status 2."""


def main():
    """The `vital` entry point: any error ends as one line and exit 2; `--debug` anywhere shows the traceback."""
    debug = "--debug" in sys.argv[1:]
    if debug:
        sys.argv.remove("--debug")
    try:
        status = app(standalone_mode=False)
    except typer.exceptions.TyperException as e:  # click's: a mistyped command, option or value
        ctx = getattr(e, "ctx", None)
        typer.echo(f"error: {e.format_message()}" + (f" (see {ctx.command_path} --help)" if ctx else ""), err=True)
        sys.exit(2)
    except (KeyboardInterrupt, typer.Abort):
        typer.echo("interrupted", err=True)
        sys.exit(130)
    except Exception as e:
        if debug:
            raise
        what = "; ".join(str(e).splitlines()) or "(no message)"
        typer.echo(f"error: {type(e).__name__}: {what} (rerun with --debug for the traceback)", err=True)
        sys.exit(2)
    sys.exit(status or 0)

STAGES = ["corpus", "dedup", "decontaminate", "annotation_pool", "generate", "decontaminate_qa", "rate",
          "merge_preferences", "train_selector", "filter", "tune", "evaluate"]
# the few numbers per stage a researcher looks at first
HEADLINE = {
    "corpus": ["source", "records", "rejected"],
    "dedup": ["figures", "duplicates", "kept"],
    "decontaminate": ["figures", "removed", "kept"],
    "decontaminate_qa": ["rounds", "rounds_removed", "kept"],
    "annotation_pool": ["backend", "figures", "questions"],
    "generate": ["backend", "conversations", "rounds", "rejected", "failed", "requests", "cached", "cost_usd"],
    "rate": ["backend", "rounds", "unparsed", "failed", "mean_score", "cost_usd"],
    "merge_preferences": ["clinician_pairs", "model_pairs", "clinician_weight"],
    "train_selector": ["backbone", "train_pairs", "best_epoch", "validation.clinician_alignment.rate",
                       "test.clinician_alignment.rate", "test.clinician_alignment.n", "test.auc"],
    "filter": ["candidates", "skipped", "kept", "ratio"],
    "tune": ["model", "steps", "final_loss"],
    "evaluate": ["closed_accuracy.rate", "closed_accuracy.n", "open_recall.mean", "open_recall.n",
                 "chat.relative_score", "chat.win_rate", "judge"],
}


def _fmt(v) -> str:
    return f"{v:.3f}" if isinstance(v, float) else str(v)


def _get(m: dict, key: str):
    """m["a"]["b"] for "a.b"; None when a part is missing."""
    for part in key.split("."):
        m = m.get(part) if isinstance(m, dict) else None
    return m


@app.command()
def summary(metrics_dir: Path = typer.Option(Path("metrics"), help="folder of <stage>.json metrics")):
    """One screen: records per stage, release size and the key metrics of the last run."""
    for stage in STAGES:
        path = metrics_dir / f"{stage}.json"
        if not path.exists():
            typer.echo(f"{stage:<18} (not run)")
            continue
        m = json.loads(path.read_text())
        typer.echo(f"{stage:<18} " + "  ".join(f"{k}={_fmt(_get(m, k))}" for k in HEADLINE[stage]
                                               if _get(m, k) is not None))
        if stage == "filter" and (metrics_dir / "selection.json").exists():  # the selector against its baselines
            selection = json.loads((metrics_dir / "selection.json").read_text())
            typer.echo(f"{'selection':<18} clinician test agreement, a tie as half: " + "  ".join(
                f"{name}={_fmt(_get(x, 'clinician_test.' + ('mean' if name == 'random' else 'ties_half')))}"
                for name, x in selection["methods"].items()) + f"  n={selection['clinician_test_pairs']}"
                + (f"  ({selection['note']})" if selection.get("note") else ""))
    release = Path("data/release/instructions.json")
    if release.exists():
        typer.echo(f"release: {release.parent}/ ({len(json.loads(release.read_text()))} conversations; how "
                   f"datasets, TRL, LLaMA-Factory and LLaVA load it: {release.parent / 'README.md'})")
    typer.echo("details: dvc metrics show, dvc plots show, dvc exp show")


validate = typer.Typer(help="Check input files before a long run.", no_args_is_help=True)
app.add_typer(validate, name="validate")


@validate.command("corpus")
def validate_corpus(path: Path = typer.Argument(..., help="fig_captions .json/.jsonl/.parquet file or folder"),
                    image_dir: Path = typer.Option(..., "--image-dir", help="folder with <pair_id>.jpg images"),
                    show: int = typer.Option(20, help="how many problems to list"),
                    max_pixels: int = typer.Option(None, "--max-pixels", min=1, help="largest image, width x "
                                                   "height; default: the corpus stage's (vital.corpus.MAX_PIXELS)"),
                    licenses: Path = typer.Option(None, "--licenses", help="licences by pmcid, as corpus.licenses: "
                                                  "the PMC OA file list CSV or a CSV / JSONL of pmcid,license")):
    """Check a LLaVA-Med fig_captions corpus the way the `corpus` stage reads it; exit 1 if any record is bad or
    none is usable, 2 if the corpus cannot be read at all."""
    from .corpus import MAX_PIXELS, CorpusError, ingest

    try:
        result = ingest(path, image_dir, None, strict=False, max_pixels=max_pixels or MAX_PIXELS, licenses=licenses)
    except CorpusError as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2)
    c, refusal = result.counts(), result.refusal(path)  # refusal: the words the stage stops with
    typer.echo(f"{path}: {c['records']} usable records, {c['rejected']} rejected")
    typer.echo("domains: " + (", ".join(f"{d}={n}" for d, n in c["by_domain"].items() if n) or "none"))
    typer.echo("licences: " + (", ".join(f"{k}={n}" for k, n in c["by_license"].items()) or "none"))
    for reason, n in c["rejected_by_reason"].items():
        typer.echo(f"  {reason}: {n}")
    for r in result.rejected[:show]:
        typer.echo(f"  {r.file}:{r.line}: {r.reason}")
    if len(result.rejected) > show:
        typer.echo(f"  ... and {len(result.rejected) - show} more (--show N)")
    if refusal:
        typer.echo(f"error: {refusal}", err=True)
    raise typer.Exit(1 if result.rejected or refusal else 0)


@validate.command("params")
def validate_params(path: Path = typer.Argument(Path("params.yaml"), help="the params file to check")):
    """Check every key of params.yaml (type, range, known key) as each stage does before it starts."""
    from .params import ParamsError, check

    try:
        data = check(path)
    except ParamsError as e:
        typer.echo(str(e), err=True)
        raise typer.Exit(2)
    typer.echo(f"{path}: ok ({len(data)} sections, {sum(len(s) for s in data.values())} keys)")


@validate.command("release")
def validate_release(path: Path = typer.Argument(..., help="a LLaVA-format instructions JSON (ours, or the "
                                                          "official BioMed-VITAL 60K/80K file), or a release folder"),
                     image_dir: Path = typer.Option(None, "--image-dir", help="also check every image is in this store or folder"),
                     show: int = typer.Option(20, help="how many problems to list")):
    """Check an instruction-tuning file the way `tune` reads it, and, when `manifest.jsonl` is beside it, every image
    it lists (in --image-dir, else the release's data/ and images/) against its sha256; exit 1 if anything has a
    problem."""
    from .release import CARD, HUB_DATA, LOOSE_IMAGES, MANIFEST, check_manifest, read_manifest, validate

    if path.is_dir():  # a release folder
        path = path / "instructions.json"
    try:
        records = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        typer.echo(f"error: {path}: cannot read it as JSON ({e})", err=True)
        raise typer.Exit(2)
    from .images import StoreError

    try:
        report = validate(records, image_dir)
    except StoreError as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2)
    typer.echo(f"{path}: {report['records']} records, {report['rounds']} rounds, "
               f"{len(report['problems'])} problems")
    typer.echo("domains: " + ", ".join(f"{d}={n}" for d, n in report["domains"].items()))
    typer.echo("<image> placement: " + ", ".join(f"{k}={n}" for k, n in report["image_token_placement"].items()))
    for rid, why in report["problems"][:show]:
        typer.echo(f"  {rid}: {why}")
    if len(report["problems"]) > show:
        typer.echo(f"  ... and {len(report['problems']) - show} more (--show N)")
    bad = bool(report["problems"])
    manifest = path.parent / MANIFEST
    if manifest.is_file():
        stores = [image_dir] if image_dir else [d for d in (path.parent / HUB_DATA, path.parent / LOOSE_IMAGES)
                                                if d.is_dir()]
        try:
            rows = read_manifest(manifest)
            problems = [p for store in stores for p in check_manifest(rows, store)]
        except (ValueError, StoreError) as e:
            typer.echo(f"error: {e}", err=True)
            raise typer.Exit(2)
        where = ", ".join(str(s) for s in stores) or f"nowhere (no {HUB_DATA}/ or {LOOSE_IMAGES}/ beside it)"
        typer.echo(f"{manifest}: {len(rows)} images checked in {where}, {len(problems)} missing or changed")
        for who, why in problems[:show]:
            typer.echo(f"  {who}: {why}")
        if len(problems) > show:
            typer.echo(f"  ... and {len(problems) - show} more (--show N)")
        bad = bad or bool(problems) or not stores
    elif (path.parent / CARD).is_file() and (path.parent / HUB_DATA).is_dir():
        typer.echo(f"(no {MANIFEST} beside {path.name}: a release written before manifests; images not checksummed)")
    raise typer.Exit(1 if bad else 0)


release_app = typer.Typer(help="Published releases: bring one in to tune on.", no_args_is_help=True)
app.add_typer(release_app, name="release")


@release_app.command("import")
def release_import(url: str = typer.Argument(..., help="the instructions JSON, e.g. the BioMed-VITAL 80K file's "
                                                       "download URL (http, https or file://)"),
                   out: Path = typer.Option(None, help="folder to write (default: data/external/<file name>)"),
                   images: Path = typer.Option(None, help="folder (or packed store) of the figures the records "
                                                          "name; they go into <out>/data with the records"),
                   shard_mb: float = typer.Option(256, help="parquet shard size")):
    """Download a published release, check it like `vital validate release`, convert it to this project's
    format (<out>/instructions.json) and list what could not be converted (<out>/rejected.jsonl)."""
    from .release import import_folder, import_release

    out = out or import_folder(url)
    try:
        s = import_release(url, out, images, shard_mb)
    except (OSError, ValueError) as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2)
    typer.echo(f"{s['file']}: {s['records']} records -> {s['imported']} imported to {out / 'instructions.json'}, "
               f"{s['rejected']} rejected ({out / 'rejected.jsonl'}), {s['domain_missing']} without a domain "
               "(counted as other)")
    for reason, n in s["rejected_by_reason"].items():
        typer.echo(f"  {reason}: {n}")
    typer.echo("domains: " + ", ".join(f"{d}={n}" for d, n in s["domains"].items()))
    if s["images"]:
        typer.echo(f"load it:     see {out / 'README.md'} (datasets, TRL, LLaMA-Factory, LLaVA)")
        typer.echo(f"version it:  dvc add {out / 'data'} {out / 'instructions.json'}  (not {out / 'images'}: it is "
                   f"unpacked from data/; after a pull: vital images unpack {out / 'data'} {out / 'images'})")
        typer.echo(f"tune on it:  dvc exp run tune -S tune.data={out}/instructions.json -S tune.images={out}/data")
    else:
        typer.echo(f"version it:  dvc add {out}")
        typer.echo("the records need their images: download them, then rerun with --images DIR")


images_app = typer.Typer(help="Packed image stores: tar shards + index.parquet, or the release's parquet "
                         "shards with the images inside (see src/vital/images.py).",
                         no_args_is_help=True)
app.add_typer(images_app, name="images")


@images_app.command("unpack")
def images_unpack(store: Path = typer.Argument(..., help="a packed store, e.g. data/release/data"),
                  out: Path = typer.Argument(..., help="folder to write the images into")):
    """Write every image of a store as a plain file (for trainers that read a folder)."""
    from .images import unpack

    try:
        n = unpack(store, out)
    except (OSError, ValueError) as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2)
    typer.echo(f"{n} images -> {out}")


@images_app.command("pack")
def images_pack(folder: Path = typer.Argument(..., help="a folder of images"),
                out: Path = typer.Argument(..., help="the packed store to write"),
                shard_mb: float = typer.Option(256, help="shard size")):
    """Pack a folder of images into a store that the stages and `dvc push` handle as a few files."""
    from .images import ImageStore, pack

    try:
        store = ImageStore(folder)
        n = pack(store, store.names(), out, shard_mb)
    except (OSError, ValueError) as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2)
    typer.echo(f"{n} images -> {out}")


annotate = typer.Typer(help="The clinician annotation app (see src/vital/annotate.py).", no_args_is_help=True)
app.add_typer(annotate, name="annotate")
DB = typer.Option(Path("data/annotation/annotations.sqlite"), "--db", help="the annotation database (SQLite)")
POOL = typer.Option(Path("data/annotation/pool.jsonl"), "--pool", help="the pool the annotation_pool stage wrote")


@annotate.command("add-user")
def annotate_add_user(name: str = typer.Argument(..., help="annotator name, e.g. dr_lee"), db: Path = DB):
    """Create an annotator and print their secret token (shown once: hand it over privately)."""
    from .annotate import AnnotationError, add_user

    try:
        token = add_user(db, name)
    except AnnotationError as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2)
    typer.echo(f"annotator {name} added to {db}. Token (shown once):\n{token}")


@annotate.command("serve")
def annotate_serve(pool: Path = POOL, db: Path = DB,
                   images: Path = typer.Option(Path("data/corpus/images"), help="the corpus images (packed store or folder)"),
                   conversations: str = typer.Option("data/candidates/conversations.jsonl",
                                                     help="generated conversations to flag as demonstrations; '' for none"),
                   overlap: int = typer.Option(2, help="how many annotators judge each question"),
                   host: str = typer.Option("127.0.0.1", help="0.0.0.0 to serve your network (use HTTPS in front)"),
                   port: int = typer.Option(8090),
                   public_origin: str = typer.Option(None, help="behind a proxy: the URL annotators open, e.g. "
                                                                 "https://annotate.example.org"),
                   session_hours: float = typer.Option(12, help="a sign-in lasts this long")):
    """Serve the annotation app until Ctrl-C."""
    from .annotate import App, AnnotationError, make_app_server

    try:
        app_ = App(pool, db, images, overlap, Path(conversations) if conversations else None, public_origin,
                   session_hours)
        server = make_app_server(app_, host, port)
    except AnnotationError as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2)
    typer.echo(f"annotation app on http://{host}:{server.server_port}/ (pool {pool}, database {db}); Ctrl-C stops")
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        server.server_close()


@annotate.command("export")
def annotate_export(db: Path = DB, pool: Path = POOL,
                    out: Path = typer.Option(Path("data/annotation"), help="folder for clinician.jsonl, demos.jsonl"),
                    force: bool = typer.Option(False, "--force", help="replace files that hold more votes or "
                                                                      "demonstrations than this export")):
    """Write clinician.jsonl, demos.jsonl and annotation_summary.json (agreement included), sorted. The database
    is only read (a missing one is an error, exit 2); a file holding more votes or demonstrations than the
    export would write is kept (exit 2) unless --force."""
    from .annotate import AnnotationError, export

    try:
        summary = export(db, pool, out, force)
    except AnnotationError as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2)
    typer.echo(f"{summary['votes']} votes by {summary['annotators']} annotators on {summary['questions']} of "
               f"{summary['pool_questions']} questions -> {out / 'clinician.jsonl'}")
    typer.echo(f"{summary['demonstrations']} demonstrations -> {out / 'demos.jsonl'}")
    typer.echo(f"agreement ({summary['agreement_measure']}, {summary['shared_questions']} shared questions): "
               f"{summary['agreement']}")
    if summary["stale_votes"]:
        typer.echo(f"warning: {summary['stale_votes']} votes judged answers that have changed since; "
                   "merge_preferences skips them (counted as stale)")


eval_cli = typer.Typer(help="The evaluation's answers, for the harnesses researchers score with.", no_args_is_help=True)
app.add_typer(eval_cli, name="eval")


@eval_cli.command("export")
def eval_export(fmt: str = typer.Option(..., "--format", help="lmms-eval (its SLAKE task) | medevalkit"),
                out: Path = typer.Option(Path("data/eval/export"), help="folder for the files"),
                model: str = typer.Option("tuned", help="whose answers: tuned | base"),
                eval_dir: Path = typer.Option(Path("data/eval"), help="the evaluate stage's output folder")):
    """Write the last `evaluate` run's predictions and references in a layout the harness scores with its own
    code (see vital.evaluate.export), one file per dataset."""
    from .evaluate import export
    from .schema import read_jsonl, write_atomic

    try:
        items = list(read_jsonl(eval_dir / "vqa.jsonl"))
        answers = {a["id"]: a["answer"] for a in read_jsonl(eval_dir / "answers.jsonl") if a["model"] == model}
        files = export(items, answers, fmt)
    except (OSError, KeyError, ValueError) as e:
        typer.echo(f"error: {e} (run `dvc repro evaluate` first)" if isinstance(e, OSError) else f"error: {e}",
                   err=True)
        raise typer.Exit(2)
    if not files:
        typer.echo(f"error: nothing to export as {fmt} from {eval_dir} (lmms-eval: SLAKE-format sets only)", err=True)
        raise typer.Exit(2)
    out.mkdir(parents=True, exist_ok=True)
    for name, rows in sorted(files.items()):
        text = ("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows) if name.endswith(".jsonl")
                else json.dumps(rows, ensure_ascii=False, indent=1) + "\n")
        write_atomic(out / name, text)
        typer.echo(f"{len(rows)} {model} answers -> {out / name}")


cache_cli = typer.Typer(help="The request caches of the model-facing stages (data/cache/<stage>.jsonl).",
                        no_args_is_help=True)
app.add_typer(cache_cli, name="cache")


@cache_cli.command("evict")
def cache_evict(rejected: bool = typer.Option(False, "--rejected", help="the replies rejected as unparseable or "
                                                                        "refused, also when asked again"),
                stage: str = typer.Option("all", "--stage", help="generate | rate | annotation_pool | all"),
                cache_dir: Path = typer.Option(Path("data/cache"), "--cache-dir", help="where the caches are")):
    """Remove rejected replies from the request caches so that the next `dvc repro` asks those requests again
    (each cache is rewritten whole, then swapped in). Run it while no stage is running."""
    from .replies import CACHES, evict_rejected

    if not rejected:
        typer.echo("error: say what to evict: --rejected (the replies rejected as unparseable or refused)", err=True)
        raise typer.Exit(2)
    if stage not in (*CACHES, "all"):
        typer.echo(f"error: --stage {stage!r}: use one of {', '.join(CACHES)} or all", err=True)
        raise typer.Exit(2)
    phrases = None  # generate's refusal phrases are params; rate and annotation_pool use the defaults
    try:
        import yaml
        phrases = (yaml.safe_load(Path("params.yaml").read_text(encoding="utf-8")) or {})["generate"]["refusal_phrases"]
    except (OSError, KeyError, TypeError, yaml.YAMLError):
        pass
    for name in CACHES if stage == "all" else [stage]:
        path = cache_dir / Path(CACHES[name]).name
        try:
            r = evict_rejected(path, phrases if name == "generate" else None)
        except (OSError, ValueError) as e:
            typer.echo(f"error: {e}", err=True)
            raise typer.Exit(2)
        if not path.exists():
            typer.echo(f"{path}: no cache (the stage has not run)")
            continue
        why = ", ".join(f"{n} {reason}" for reason, n in r["by_reason"].items() if n)
        typer.echo(f"{path}: removed {r['removed']} of {r['entries']} replies" + (
            f" ({why}); the next `dvc repro {name}` asks them again" if r["removed"] else ""))


remote_cli = typer.Typer(help="The DVC remote that `dvc push` / `dvc pull` use (see src/vital/remote.py).",
                         no_args_is_help=True)
app.add_typer(remote_cli, name="remote")
REMOTE = typer.Option(None, "-r", "--remote", help="remote name (default: the repo's default remote)")
TARGETS = typer.Argument(None, help="outputs, .dvc files or stage names (default: everything)")


@remote_cli.command("check")
def remote_check(name: str = typer.Argument(None, help="remote name (default: the repo's default remote)")):
    """Is the remote reachable, are the credentials accepted, does it verify downloads? Exit 2 with the cause
    and the fix if not."""
    from .remote import RemoteError, check

    try:
        lines = check(name)
    except RemoteError as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2)
    for line in lines:
        typer.echo(line)


def _dvc_transfer(command: str, targets: list[str] | None, remote: str | None, jobs: int | None):
    from .remote import RemoteError, run

    try:
        run(command, [*(["-j", str(jobs)] if jobs else []), *(targets or [])], remote=remote, echo=typer.echo)
    except RemoteError as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2)


@app.command("push")
def push_data(targets: list[str] = TARGETS, remote: str = REMOTE,
              jobs: int = typer.Option(None, "-j", "--jobs", help="parallel transfers")):
    """`dvc push`; on failure one clear message (the remote, the cause, the fix) and exit 2."""
    _dvc_transfer("push", targets, remote, jobs)


@app.command("pull")
def pull_data(targets: list[str] = TARGETS, remote: str = REMOTE,
              jobs: int = typer.Option(None, "-j", "--jobs", help="parallel transfers")):
    """`dvc pull`; on failure one clear message (the remote, the cause, the fix) and exit 2. Removes the partial
    files an interrupted pull leaves, so a rerun completes."""
    _dvc_transfer("pull", targets, remote, jobs)


if __name__ == "__main__":
    main()
