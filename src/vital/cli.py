"""`vital`: the human-facing commands that are not DVC stages."""
from __future__ import annotations

import json
from pathlib import Path

import typer

app = typer.Typer(help="BioMed-VITAL: clinician-preference-aligned biomedical visual instruction data. "
                  "The pipeline itself runs with `dvc repro`.", no_args_is_help=True)

STAGES = ["corpus", "annotation_pool", "generate", "rate", "merge_preferences", "train_selector", "filter",
          "tune", "evaluate"]
# the few numbers per stage a researcher looks at first
HEADLINE = {
    "corpus": ["source", "records", "rejected"],
    "annotation_pool": ["backend", "figures", "questions"],
    "generate": ["backend", "conversations", "rounds", "rejected", "failed", "requests", "cached", "cost_usd"],
    "rate": ["backend", "rounds", "unparsed", "failed", "mean_score", "cost_usd"],
    "merge_preferences": ["clinician_pairs", "model_pairs", "clinician_weight"],
    "train_selector": ["backbone", "train_pairs", "train_pair_accuracy", "clinician_alignment"],
    "filter": ["candidates", "kept", "ratio"],
    "tune": ["model", "steps", "final_loss"],
    "evaluate": ["closed_accuracy", "open_recall", "relative_score", "judge"],
}


def _fmt(v) -> str:
    return f"{v:.3f}" if isinstance(v, float) else str(v)


@app.command()
def summary(metrics_dir: Path = typer.Option(Path("metrics"), help="folder of <stage>.json metrics")):
    """One screen: records per stage, release size and the key metrics of the last run."""
    for stage in STAGES:
        path = metrics_dir / f"{stage}.json"
        if not path.exists():
            typer.echo(f"{stage:<18} (not run)")
            continue
        m = json.loads(path.read_text())
        typer.echo(f"{stage:<18} " + "  ".join(f"{k}={_fmt(m[k])}" for k in HEADLINE[stage] if k in m))
    release = Path("data/release/instructions.json")
    if release.exists():
        typer.echo(f"release: {release} ({len(json.loads(release.read_text()))} conversations)")
    typer.echo("details: dvc metrics show, dvc plots show, dvc exp show")


validate = typer.Typer(help="Check input files before a long run.", no_args_is_help=True)
app.add_typer(validate, name="validate")


@validate.command("corpus")
def validate_corpus(path: Path = typer.Argument(..., help="fig_captions .json/.jsonl/.parquet file or folder"),
                    image_dir: Path = typer.Option(..., "--image-dir", help="folder with <pair_id>.jpg images"),
                    show: int = typer.Option(20, help="how many problems to list")):
    """Check a LLaVA-Med fig_captions corpus the way the `corpus` stage reads it; exit 1 if any record is bad."""
    from .corpus import CorpusError, ingest

    try:
        result = ingest(path, image_dir, None, strict=False)
    except CorpusError as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2)
    c = result.counts()
    typer.echo(f"{path}: {c['records']} usable records, {c['rejected']} rejected")
    typer.echo("domains: " + ", ".join(f"{d}={n}" for d, n in c["by_domain"].items() if n))
    for reason, n in c["rejected_by_reason"].items():
        typer.echo(f"  {reason}: {n}")
    for r in result.rejected[:show]:
        typer.echo(f"  {r.file}:{r.line}: {r.reason}")
    if len(result.rejected) > show:
        typer.echo(f"  ... and {len(result.rejected) - show} more (--show N)")
    raise typer.Exit(1 if result.rejected else 0)


if __name__ == "__main__":
    app()
