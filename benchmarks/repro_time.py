"""Wall time of the embedded DAG against the spine's targets, measured side by side in one run.

    .venv/bin/python benchmarks/repro_time.py            # clones HEAD into a temp dir, uses this venv

Targets (issue #2): whole embedded DAG <= 10 min including install (install is timed by `make repro`
on a fresh clone; see the closing note), no-op `dvc repro` <= 5 s. Prints each time and its ratio to
the target (< 1.0 is inside the target).
"""
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TARGETS = {"dvc repro (full DAG)": 600.0, "dvc repro (no-op)": 5.0, "dvc exp run -S filter.ratio=0.5": 600.0}


def timed(cmd: str, cwd: Path, env: dict) -> float:
    t = time.perf_counter()
    subprocess.run(cmd, cwd=cwd, env=env, shell=True, check=True, capture_output=True)
    return time.perf_counter() - t


def main():
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", DVC_NO_ANALYTICS="1",
               PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    with tempfile.TemporaryDirectory() as tmp:
        repo = Path(tmp) / "repo"
        subprocess.run(["git", "clone", "-q", str(ROOT), str(repo)], check=True)
        results = {
            "dvc repro (full DAG)": timed("dvc repro", repo, env),
            "dvc repro (no-op)": timed("dvc repro", repo, env),
            "dvc exp run -S filter.ratio=0.5": timed("dvc exp run -S filter.ratio=0.5", repo, env),
        }
    for name, secs in results.items():
        print(f"{name:<34} {secs:7.1f} s   target {TARGETS[name]:5.0f} s   ratio {secs / TARGETS[name]:.3f}")


if __name__ == "__main__":
    main()
