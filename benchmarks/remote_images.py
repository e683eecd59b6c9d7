"""`dvc add` + `dvc push` + `dvc pull` of many small images: loose files, tar shards, and parquet shards with the
images inside (the release's Hub layout), side by side in one run.

    python benchmarks/remote_images.py                    # 10,000 images, a local directory remote
    python benchmarks/remote_images.py --n 60000          # the paper's release size
    python benchmarks/remote_images.py --s3 --n 2000      # an S3 remote (moto on 127.0.0.1)

Generates `--n` distinct random-noise PNGs (about 3 KB each, fixed seed) once, then builds three throwaway
repos (git + dvc, analytics off, each with its own remote): one `dvc add`s the loose folder, one a tar store
packed from it (`vital.images.pack`: the corpus's layout), one parquet shards with the images inside
(`vital.images.write_hub_shards`: the release's layout, what `datasets.load_dataset` reads), `--shard-mb` per
shard. For each it times, through the `dvc` CLI in subprocesses: `dvc add`, `dvc push`, and a fresh
`dvc pull` into a `git clone` (empty cache, empty workspace), then checks the pulled bytes against the
originals (every file hashed; every image read back through `ImageStore`). It also times reading all images
through `ImageStore` from each pulled copy (index load included), cold (file pages dropped with
posix_fadvise; the kernel keeps inodes and dentries, so this is not a cold disk) and warm (best of 3).
Prints seconds, the ratios parquet/tar (the release against the tar shards it replaced; <= 1.2 is the
target for pull) and loose/parquet, the packing times, and the file counts and sizes.
"""
import argparse
import hashlib
import io
import logging
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
from PIL import Image

from vital.images import ImageStore, pack, write_hub_shards

DATA = "data/images"  # the tracked folder in both repos


def generate(folder: Path, n: int, side: int, seed: int) -> dict[str, bytes]:
    """n distinct noise PNGs (noise does not compress, so each is about side*side*3 bytes)."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True)
    images = {}
    for i in range(n):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8)).save(buf, "PNG")
        name = f"img-{i:06d}.png"
        (folder / name).write_bytes(buf.getvalue())
        images[name] = buf.getvalue()
    assert len({hashlib.md5(b).digest() for b in images.values()}) == n  # distinct, or DVC would dedupe them
    return images


def sh(cmd: str, cwd: Path, env: dict) -> subprocess.CompletedProcess:
    r = subprocess.run(cmd, cwd=cwd, env=env, shell=True, capture_output=True, text=True)
    if r.returncode:
        sys.exit(f"`{cmd}` failed in {cwd} ({r.returncode}):\n{r.stdout}\n{r.stderr}")
    return r


def timed(cmd: str, cwd: Path, env: dict) -> float:
    t = time.perf_counter()
    sh(cmd, cwd, env)
    return time.perf_counter() - t


def files_of(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file())


def size_of(folder: Path) -> tuple[int, int]:
    files = files_of(folder)
    return len(files), sum(p.stat().st_size for p in files)


def digests(folder: Path) -> dict[str, str]:
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest() for p in files_of(folder)}


def drop_page_cache(folder: Path) -> None:
    """Ask the kernel to forget the cached pages of these files (no root needed; clean pages only)."""
    for p in files_of(folder):
        fd = os.open(p, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def read_all(folder: Path, names: list[str]) -> float:
    t = time.perf_counter()
    store = ImageStore(folder)
    total = sum(len(store.read(n)) for n in names)
    store.close()
    assert total > 0
    return time.perf_counter() - t


class Remote:
    """Where the two repos push: a local folder, or a bucket on a moto S3 server on 127.0.0.1."""

    def __init__(self, tmp: Path, s3: bool):
        self.tmp, self.s3, self.server, self.env = tmp, s3, None, {}
        if s3:
            from moto.server import ThreadedMotoServer
            import boto3

            logging.getLogger("werkzeug").setLevel(logging.ERROR)  # no line per request
            self.env = dict(AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench-secret",
                            AWS_DEFAULT_REGION="us-east-1")
            self.server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
            self.server.start()
            self.url = "http://{}:{}".format(*self.server.get_host_and_port())
            self.client = boto3.client("s3", endpoint_url=self.url, aws_access_key_id="bench",
                                       aws_secret_access_key="bench-secret", region_name="us-east-1")
            self.client.create_bucket(Bucket="bench")

    def add_cmd(self, kind: str) -> str:
        """Shell command that points a repo (or a fresh clone) at `kind`'s remote; in .dvc/config.local."""
        if self.s3:
            return (f"dvc remote add -f --local -d bench s3://bench/{kind} && "
                    f"dvc remote modify --local bench endpointurl {self.url}")
        return f"dvc remote add -f --local -d bench {self.tmp / ('remote-' + kind)}"

    def stats(self, kind: str) -> tuple[int, int]:
        if not self.s3:
            return size_of(self.tmp / f"remote-{kind}")
        n = size = 0
        for page in self.client.get_paginator("list_objects_v2").paginate(Bucket="bench", Prefix=f"{kind}/"):
            for o in page.get("Contents", []):
                n, size = n + 1, size + o["Size"]
        return n, size

    def stop(self):
        if self.server is not None:
            self.server.stop()


def round_trip(kind: str, repo: Path, remote: Remote, env: dict, jobs: str) -> dict:
    """`dvc add` and `dvc push` in `repo`, then `dvc pull` in a fresh clone, each timed; returns seconds, clone."""
    out = {"add": timed(f"dvc add -q {DATA}", repo, env)}
    sh(f"git add -A && git commit -q -m {kind}", repo, env)
    out["push"] = timed(f"dvc push -q{jobs}", repo, env)
    clone = repo.parent / f"{kind}-clone"
    sh(f"git clone -q {repo} {clone} && cd {clone} && {remote.add_cmd(kind)}", repo.parent, env)
    assert not (clone / DATA).exists() and not any(files_of(clone / ".dvc" / "cache"))
    out["pull"] = timed(f"dvc pull -q{jobs}", clone, env)
    out["clone"] = clone
    return out


def new_repo(path: Path, kind: str, remote: Remote, env: dict) -> None:
    path.mkdir()
    sh(f"git init -q && dvc init -q && dvc config core.analytics false && {remote.add_cmd(kind)} && "
       "git add -A && git commit -q -m init", path, env)


KINDS = ("loose", "tar", "parquet")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=10_000, help="how many images")
    ap.add_argument("--side", type=int, default=32, help="image side in pixels (noise PNG of about 3*side^2 bytes)")
    ap.add_argument("--shard-mb", type=float, default=256, help="shard size, tar and parquet")
    ap.add_argument("--s3", action="store_true", help="push to a moto S3 server on 127.0.0.1, not a local folder")
    ap.add_argument("--jobs", type=int, default=None, help="dvc push/pull --jobs (default: dvc's own)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    jobs = f" -j {args.jobs}" if args.jobs else ""

    with tempfile.TemporaryDirectory(prefix="vital-remote-bench-") as tmp_name:
        tmp = Path(tmp_name)
        remote = Remote(tmp, args.s3)
        try:
            env = dict(os.environ, DVC_NO_ANALYTICS="1", DVC_SITE_CACHE_DIR=str(tmp / "dvc-site-cache"),
                       GIT_AUTHOR_NAME="bench", GIT_AUTHOR_EMAIL="bench@localhost",
                       GIT_COMMITTER_NAME="bench", GIT_COMMITTER_EMAIL="bench@localhost",
                       PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}", **remote.env)
            t = time.perf_counter()
            originals = generate(tmp / "originals", args.n, args.side, args.seed)
            gen_s = time.perf_counter() - t
            names = sorted(originals)
            want = {n: hashlib.sha256(b).hexdigest() for n, b in originals.items()}

            for kind in KINDS:
                new_repo(tmp / kind, kind, remote, env)
                (tmp / kind / DATA).parent.mkdir(parents=True)
            sh(f"cp -r {tmp / 'originals'} {tmp / 'loose' / DATA}", tmp, env)
            packing = {}
            t = time.perf_counter()
            pack(tmp / "originals", names, tmp / "tar" / DATA, args.shard_mb)
            packing["tar"] = time.perf_counter() - t
            t = time.perf_counter()
            write_hub_shards([{"image": n} for n in names], tmp / "originals", tmp / "parquet" / DATA, pa.schema([]),
                             args.shard_mb)
            packing["parquet"] = time.perf_counter() - t
            written = {kind: digests(tmp / kind / DATA) for kind in KINDS}

            res = {kind: round_trip(kind, tmp / kind, remote, env, jobs) for kind in KINDS}

            reads, sizes, pushed = {}, {}, {}
            for kind in KINDS:  # the pulled bytes are what was added, and every image reads back as the original
                folder = res[kind]["clone"] / DATA
                assert digests(folder) == written[kind], f"{kind}: the pull differs from what was pushed"
                store = ImageStore(folder)
                assert sorted(store.names()) == names, kind
                assert all(hashlib.sha256(store.read(n)).hexdigest() == want[n] for n in names), f"{kind}: an image differs"
                store.close()
                drop_page_cache(folder)
                reads[kind] = (read_all(folder, names), min(read_all(folder, names) for _ in range(3)))
                sizes[kind], pushed[kind] = size_of(folder), remote.stats(kind)
        finally:
            remote.stop()

    where = f"S3 (moto on {remote.url})" if args.s3 else "local directory"
    print(f"{args.n} images ({args.side}x{args.side} noise PNG), remote: {where}, dvc push/pull jobs: "
          f"{args.jobs or 'default'}, shard_mb {args.shard_mb:g}, {os.cpu_count()} CPUs")
    mb = 2**20
    print(f"generating the images: {gen_s:.1f} s; packing them: tar (vital.images.pack) {packing['tar']:.2f} s, "
          f"parquet (vital.images.write_hub_shards) {packing['parquet']:.2f} s")
    for kind in KINDS:
        (n, b), (pn, pb) = sizes[kind], pushed[kind]
        print(f"{kind:<8} workspace: {n:6d} files, {b / mb:7.1f} MiB; remote: {pn:6d} objects, {pb / mb:7.1f} MiB")
    print()
    print(f"{'seconds':<24}{'loose':>9}{'tar':>9}{'parquet':>9}{'parquet/tar':>13}{'loose/parquet':>15}")

    def row(label, values, digits=2):
        lo, ta, pq_ = (values[k] for k in KINDS)
        print(f"{label:<24}{lo:9.{digits}f}{ta:9.{digits}f}{pq_:9.{digits}f}{pq_ / ta:13.2f}{lo / pq_:15.1f}")

    for label, keys in (("dvc add", ("add",)), ("dvc push", ("push",)), ("dvc pull (fresh clone)", ("pull",)),
                        ("push + pull", ("push", "pull")), ("add + push + pull", ("add", "push", "pull"))):
        row(label, {k: sum(res[k][x] for x in keys) for k in KINDS})
    row("total incl. packing", {k: packing.get(k, 0) + sum(res[k][x] for x in ("add", "push", "pull")) for k in KINDS})
    for i, label in enumerate(("ImageStore read, cold", "ImageStore read, warm")):
        row(label, {k: reads[k][i] for k in KINDS}, 3)
    print("pulled bytes verified: every file hashed, every image read back through ImageStore")


if __name__ == "__main__":
    main()
