"""Images by name, from packed shards (what the stages write) or a plain folder (what users bring).

DVC pushes, pulls and hashes one file at a time, which is slow with hundreds of thousands of small images.
So the `corpus` and `filter` stages write their images into a few uncompressed tar shards plus an index:

    data/corpus/images/
        index.parquet        name, shard, offset, size (one row per image)
        images-00000.tar     plain tar: `tar -xf` works, and `vital images unpack` writes the folder back
        images-00001.tar     a new shard starts past `shard_mb`

Every reader goes through `ImageStore`, which reads one image with a single `pread` at its offset, and
reads a plain folder the same way. Shards are written deterministically (fixed tar headers, input order),
so the same images give the same bytes and DVC stores them once.

The release is stored the way image-text datasets ship on the Hugging Face Hub instead: parquet shards whose
rows carry their image (`image`: {bytes, path}, declared as the `datasets` Image feature), so `datasets`, TRL
and LLaMA-Factory read it with no image folder (`write_hub_shards`):

    data/release/data/
        train-00000-of-00002.parquet    one row per record, rows grouped 100 to a row group
        train-00001-of-00002.parquet

`ImageStore` reads such a folder too (by `image.path`, a row group at a time), so `vital images unpack` writes
its loose folder and `vital validate release --image-dir` checks against it.
"""
from __future__ import annotations

import io
import json
import os
import re
import shutil
import tarfile
import threading
import uuid
from pathlib import Path, PurePosixPath

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

INDEX = "index.parquet"
SHARD = re.compile(r"images-\d{5}\.tar")
HUB_SHARD = re.compile(r"train-(\d{5})-of-(\d{5})\.parquet")
IMAGE_TYPE = pa.struct([("bytes", pa.binary()), ("path", pa.string())])  # the `datasets` Image feature's storage
HUB_ROW_GROUP = 100  # rows per row group: what `datasets` writes for image data, so a reader streams


class ImageError(FileNotFoundError):
    """An image the store does not have; an OSError, so request builders skip that record only."""


class StoreError(ValueError):
    """A store that is missing or damaged (index unreadable, a shard missing or short): fatal, with the fix."""


def check_name(name: str) -> str:
    p = PurePosixPath(name)
    if not name or p.is_absolute() or ".." in p.parts or "\\" in name:
        raise ValueError(f"image name {name!r} must be a relative path inside the image folder")
    return name


class ImageStore:
    """Read-only images by name from `root`: a packed store (it has `index.parquet`) or a plain folder."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.packed = (self.root / INDEX).is_file()
        if not self.packed and not self.root.is_dir():
            raise StoreError(f"image store {self.root} does not exist (run the stage that writes it, e.g. "
                             f"`dvc repro corpus`, or fetch it: `dvc pull {self.root}`)")
        self.hub = sorted(p.name for p in self.root.iterdir() if HUB_SHARD.fullmatch(p.name)) if not self.packed else []
        self._index: dict[str, tuple] = {}
        self._fds: dict[str, int] = {}
        self._files: dict[str, pq.ParquetFile] = {}  # hub shards, open
        self._group: tuple = (None, [])  # the hub row group read last: (shard, group), its images by row
        self._lock = threading.Lock()  # readers share one descriptor per shard (pread needs no seek)
        if self.packed:
            self._load_index()
        elif self.hub:
            self.packed = True
            self._load_hub_index()

    def _load_index(self) -> None:
        """Read the index and check every shard it names is there and long enough, so a damaged store stops
        the run here, with the fix, instead of failing image by image."""
        fix = f"fetch it again (`dvc pull {self.root}`) or rerun the stage that wrote it"
        try:
            t = pq.read_table(self.root / INDEX, columns=["name", "shard", "offset", "size"]).to_pydict()
        except Exception as e:  # noqa: BLE001 - pyarrow raises several types for a damaged file
            raise StoreError(f"{self.root / INDEX} cannot be read ({type(e).__name__}): {fix}") from None
        self._index = {n: (s, o, z) for n, s, o, z in zip(t["name"], t["shard"], t["offset"], t["size"])}
        ends: dict[str, int] = {}
        for shard, offset, size in self._index.values():
            ends[shard] = max(ends.get(shard, 0), offset + size)
        for shard, end in ends.items():
            if not SHARD.fullmatch(shard):
                raise StoreError(f"{self.root / INDEX} names a shard {shard!r}, not images-NNNNN.tar: {fix}")
            have = (self.root / shard).stat().st_size if (self.root / shard).is_file() else -1
            if have < end:
                state = "is missing" if have < 0 else f"is truncated ({have} of at least {end} bytes)"
                raise StoreError(f"{self.root / shard} {state}: {fix}")

    def _load_hub_index(self) -> None:
        """Index the images of parquet shards by `image.path` (the first row that has a name wins) and check
        the shards are all there (train-i-of-n for every i < n) and readable."""
        fix = f"fetch it again (`dvc pull {self.root}`) or rerun the stage that wrote it"
        counts = {int(HUB_SHARD.fullmatch(n).group(2)) for n in self.hub}
        if len(counts) != 1 or len(self.hub) != counts.pop():
            raise StoreError(f"{self.root} holds {len(self.hub)} parquet shards that do not make one set "
                             f"(train-i-of-n for every i < n): {fix}")
        for shard in self.hub:
            try:
                f = self._files[shard] = pq.ParquetFile(self.root / shard)
                if "image" not in f.schema_arrow.names or f.schema_arrow.field("image").type != IMAGE_TYPE:
                    raise StoreError(f"{self.root / shard} has no `image` column of {{bytes, path}}: not a release "
                                     "shard written by `write_hub_shards`")
                for g in range(f.num_row_groups):
                    paths = f.read_row_group(g, columns=["image.path"]).column(0).to_pylist()  # [{path}]
                    for row, name in enumerate(p and p["path"] for p in paths):
                        if name and name not in self._index:
                            self._index[name] = (shard, g, row)
            except StoreError:
                raise
            except Exception as e:  # noqa: BLE001 - pyarrow raises several types for a damaged file
                raise StoreError(f"{self.root / shard} cannot be read ({type(e).__name__}): {fix}") from None

    def _read_hub(self, name: str) -> bytes:
        shard, group, row = self._index[name]
        with self._lock:  # a row group is read whole; consecutive names of one group cost one read
            if self._group[0] != (shard, group):
                if shard not in self._files:
                    self._files[shard] = pq.ParquetFile(self.root / shard)
                images = self._files[shard].read_row_group(group, columns=["image"]).column(0)
                self._group = ((shard, group), images.to_pylist())
            data = self._group[1][row]["bytes"]
        if data is None:
            raise ImageError(f"image {name!r} in {self.root / shard} has no bytes (a path-only row)")
        return data

    @classmethod
    def of(cls, images: "ImageStore | str | Path") -> "ImageStore":
        return images if isinstance(images, ImageStore) else cls(images)

    def __contains__(self, name: str) -> bool:
        if self.packed:
            return name in self._index
        try:
            path = (self.root / check_name(name)).resolve()
        except ValueError:
            return False
        return path.is_relative_to(self.root.resolve()) and path.is_file()  # no symlink out of the folder

    def names(self) -> list[str]:
        if self.packed:
            return list(self._index)
        return sorted(p.relative_to(self.root).as_posix() for p in self.root.rglob("*")
                      if p.is_file() and not any(part.startswith(".") for part in p.relative_to(self.root).parts))

    def read(self, name: str) -> bytes:
        """The image file's bytes; a clear ImageError when the store has no such image."""
        if name not in self:
            raise ImageError(f"image {name!r} is not in {self.root}")
        if not self.packed:
            return (self.root / name).read_bytes()
        if self.hub:
            return self._read_hub(name)
        shard, offset, size = self._index[name]
        with self._lock:
            if shard not in self._fds:
                self._fds[shard] = os.open(self.root / shard, os.O_RDONLY)
        data = os.pread(self._fds[shard], size, offset)
        if len(data) != size:  # it was checked when the store was opened: it changed under us
            raise StoreError(f"{self.root / shard} was truncated while in use; rerun when it is complete")
        return data

    def open(self, name: str) -> Image.Image:
        """The image, decoded (PIL reads lazily; call .convert / .load as needed)."""
        return Image.open(io.BytesIO(self.read(name)))

    def close(self) -> None:
        fds = getattr(self, "_fds", {})  # absent when __init__ raised
        for fd in fds.values():
            os.close(fd)
        fds.clear()
        for f in getattr(self, "_files", {}).values():
            f.close()
        getattr(self, "_files", {}).clear()

    def __del__(self):
        self.close()


class ShardWriter:
    """Pack images into `out_dir` (replacing it) as tar shards of about `shard_mb` plus the index. Everything
    is written in a temporary sibling folder that replaces `out_dir` on `close()`, so an interrupted run never
    leaves a half-written store behind. Use as a context manager."""

    def __init__(self, out_dir: str | Path, shard_mb: float = 256):
        if shard_mb <= 0:
            raise ValueError(f"shard_mb must be positive, got {shard_mb}")
        self.out = Path(out_dir)
        self.tmp = _fresh_tmp(self.out, INDEX)
        self.limit = int(shard_mb * 2**20)
        self.rows: dict[str, list] = {"name": [], "shard": [], "offset": [], "size": []}
        self._names: set[str] = set()
        self._tar: tarfile.TarFile | None = None
        self._shard, self._n = "", 0

    def add(self, name: str, data: bytes) -> None:
        check_name(name)
        if name in self._names:
            raise ValueError(f"image {name!r} added twice")
        self._names.add(name)
        if self._tar is None or (self._tar.offset > 0 and self._tar.offset + len(data) > self.limit):
            self._next_shard()
        info = tarfile.TarInfo(name)
        info.size, info.mtime, info.mode = len(data), 0, 0o644
        self._tar.addfile(info, io.BytesIO(data))  # header(s), then the data padded to 512-byte blocks
        self.rows["name"].append(name)
        self.rows["shard"].append(self._shard)
        self.rows["offset"].append(self._tar.offset - -(-len(data) // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE)
        self.rows["size"].append(len(data))

    def _next_shard(self) -> None:
        if self._tar is not None:
            self._tar.close()
        self._shard = f"images-{self._n:05d}.tar"
        self._n += 1
        self._tar = tarfile.open(self.tmp / self._shard, "w", format=tarfile.PAX_FORMAT)

    def close(self) -> None:
        if self._tar is not None:
            self._tar.close()
        pq.write_table(pa.table(self.rows, schema=pa.schema([("name", pa.string()), ("shard", pa.string()),
                                                             ("offset", pa.int64()), ("size", pa.int64())])),
                       self.tmp / INDEX)
        _publish(self.tmp, self.out)

    def abort(self) -> None:
        if self._tar is not None:
            self._tar.close()
        shutil.rmtree(self.tmp, ignore_errors=True)

    def __enter__(self) -> "ShardWriter":
        return self

    def __exit__(self, exc_type, *_):
        self.abort() if exc_type else self.close()


def _fresh_tmp(out: Path, marker: str) -> Path:
    """A new temporary sibling of `out` to write a store in (stale ones of a killed run removed). `out` may be
    missing, empty, or a store (it has `marker`): anything else is refused, never replaced."""
    if out.exists() and any(out.iterdir()) and not any(out.glob(marker)):
        raise StoreError(f"{out} exists and is not an image store: refusing to replace it; "
                         "choose another folder or remove it")
    for stale in out.parent.glob(f".{out.name}.*-*"):  # .tmp / .old left by a killed run
        shutil.rmtree(stale, ignore_errors=True)
    tmp = out.parent / f".{out.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir(parents=True)
    return tmp


def _publish(tmp: Path, out: Path) -> None:
    """Make the store written in `tmp` the one at `out`, durably: a reader sees the old store or the new one."""
    for f in tmp.iterdir():
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
    old = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:8]}"
    if out.exists():
        os.replace(out, old)  # two renames: a reader sees the old store or the new one, never a mix
    os.replace(tmp, out)
    shutil.rmtree(old, ignore_errors=True)
    fd = os.open(out.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


_VALUES = {pa.string(): "string", pa.float64(): "float64", pa.float32(): "float32", pa.int64(): "int64",
           pa.int32(): "int32", pa.bool_(): "bool"}


def hf_feature(t: pa.DataType):
    """The `datasets` feature of an arrow type, written as every `datasets` version reads it (a list as
    `[feature]`: datasets 2.16, which LLaMA-Factory allows, takes the metadata as the whole schema)."""
    if t == IMAGE_TYPE:
        return {"_type": "Image"}
    if pa.types.is_list(t):
        return [hf_feature(t.value_type)]
    if pa.types.is_struct(t):
        return {f.name: hf_feature(f.type) for f in t}
    if t not in _VALUES:
        raise ValueError(f"no datasets feature for the arrow type {t}")
    return {"dtype": _VALUES[t], "_type": "Value"}


def write_hub_shards(rows, images: "ImageStore | str | Path", out_dir: str | Path, schema: pa.Schema,
                     shard_mb: float = 256) -> int:
    """Write `rows` (dicts; `image` names an image of `images`) as parquet shards of about `shard_mb` in
    `out_dir` (replaced whole, as `ShardWriter` does), each row carrying its image's bytes and name in `image`,
    which the schema's metadata declares as the `datasets` Image feature. `schema` names the other columns;
    rows keep their order. Returns the number of shards."""
    if shard_mb <= 0:
        raise ValueError(f"shard_mb must be positive, got {shard_mb}")
    src, out = ImageStore.of(images), Path(out_dir)
    schema = schema.append(pa.field("image", IMAGE_TYPE)) if "image" not in schema.names else schema
    features = {f.name: hf_feature(f.type) for f in schema}
    schema = schema.with_metadata({"huggingface": json.dumps({"info": {"features": features}})})
    tmp, limit = _fresh_tmp(out, "train-*.parquet"), int(shard_mb * 2**20)
    shards, group, writer, n, size = [], [], None, 0, 0  # one row group in memory at a time, not a whole shard

    def write_group():
        writer.write_table(pa.Table.from_pylist(group, schema=schema))
        group.clear()

    def open_shard():
        shards.append(f"part-{len(shards):05d}.parquet")
        return pq.ParquetWriter(tmp / shards[-1], schema)

    try:
        for r in rows:
            data = src.read(check_name(r["image"]))
            if writer is None or (n and size + len(data) > limit):  # n, size: rows and image bytes in the shard
                if group:
                    write_group()
                if writer is not None:
                    writer.close()
                writer, n, size = open_shard(), 0, 0
            group.append({**r, "image": {"bytes": data, "path": r["image"]}})
            n, size = n + 1, size + len(data)
            if len(group) == HUB_ROW_GROUP:
                write_group()
        if writer is None:  # no rows: one empty shard (one empty row group), so the folder still loads
            writer = open_shard()
        if group or not n:
            write_group()
        writer.close()
        for i, name in enumerate(shards):
            os.replace(tmp / name, tmp / f"train-{i:05d}-of-{len(shards):05d}.parquet")
    except BaseException:
        if writer is not None:
            writer.close()
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _publish(tmp, out)
    return len(shards)


def pack(images: "ImageStore | str | Path", names, out_dir: str | Path, shard_mb: float = 256) -> int:
    """Copy `names` from a store or folder into a packed store at `out_dir`; returns how many."""
    src = ImageStore.of(images)
    with ShardWriter(out_dir, shard_mb) as w:
        for name in names:
            w.add(name, src.read(name))
    return len(w.rows["name"])


def unpack(images: "ImageStore | str | Path", out_dir: str | Path) -> int:
    """Write every image of a store as a plain file under `out_dir` (for trainers that want a folder)."""
    src, out = ImageStore.of(images), Path(out_dir)
    names = src.names()
    for name in names:
        dest = out / check_name(name)
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(f".{dest.name}.tmp")
        tmp.write_bytes(src.read(name))
        os.replace(tmp, dest)
    return len(names)
