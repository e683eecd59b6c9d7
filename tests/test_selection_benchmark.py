"""benchmarks/selection_quality.py runs end to end at a tiny size and prints its side-by-side table."""
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_selection_quality_benchmark_runs_and_prints_every_method_and_row():
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    p = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "selection_quality.py"), "--figures", "60",
                        "--epochs", "3", "--no-sweep"], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    out = p.stdout
    assert "SYNTHETIC corpus" in out and "offline heuristic rater" in out and "rule clinicians" in out
    header = next(line for line in out.splitlines() if "selector w=10" in line)
    for method in ("selector w=10", "selector w=0", "rater threshold", "random (20 seeds)"):
        assert method in header, method
    rows = ["(a) clinician TEST pair acc.", "all test pairs", "vs wrong_figure", "vs flipped_laterality",
            "vs wrong_modality", "vs generic", "long-caption figures", "all, TRUE labels", "(b) test AUC",
            "(c) precision@kept", "all candidates", "overlap with the release"]
    for row in rows:
        assert row in out, row
    lines = {line.strip().split("  ")[0]: line for line in out.splitlines()}
    for row in ("all test pairs", "vs flipped_laterality", "all candidates"):  # one cell per method
        assert lines[row].count("n=") == 4, lines[row]
    checks = [line.strip() for line in out.splitlines() if "selector beats random:" in line]
    for kind in ("wrong_figure", "flipped_laterality", "wrong_modality", "generic", "all types"):
        assert any(line.startswith(kind) for line in checks), kind
    assert "without: vs flipped_laterality" in out  # the lexical grounding ablation
    assert "clinician-weight sweep" not in out  # --no-sweep
    assert "wall time:" in out
