"""`dvc push` / `dvc pull` with one clear message when a remote fails.

Plain DVC reports a broken remote as e.g. ``ERROR: unexpected error - Could not connect to the endpoint URL``, or
(a corrupted object, with ``verify = true``) ``Checkout failed for following targets: data  Is your cache up to
date?``. `run` runs the same DVC command and, when it fails, raises `RemoteError` whose text names the remote
(name and URL, credentials masked), says what went wrong and how to fix it. What DVC 3.67 does, as observed:

- unreachable endpoint: botocore retries for ~10 s, then ``Could not connect to the endpoint URL``;
- refused credentials: ``Forbidden ... (403) ... HeadObject`` (a HEAD carries no error code, so a wrong key and a
  wrong secret look alike), ``SignatureDoesNotMatch`` / ``InvalidAccessKeyId`` when listing, or
  ``Unable to locate credentials`` when there are none;
- missing bucket: ``NoSuchBucket``; a local remote directory that does not exist: pull reports the objects as
  missing (push creates the directory);
- corrupted object: without ``verify`` DVC pulls the wrong bytes into cache and workspace and `dvc status` calls
  them up to date; with ``verify = true`` it deletes the fetched object and checks out nothing of that output
  (``Checkout failed``; only ``-v`` says ``corrupted cache file``). `dvc push` does not replace it: it skips objects
  the remote already has, and skips every file of a directory whose ``.dir`` manifest the remote has;
- interrupted pull (kill -9): objects reach the cache through temp files and renames, so the cache holds no wrong
  bytes; a kill during checkout leaves a partial temp file ``.<22 chars>.tmp`` next to the file being written,
  and the next `dvc pull` then refuses to run ("Can't remove the following unsaved files"). `run` removes those
  temp files (before a pull, and right after a pull it ran was killed), so a rerun completes.

No DVC import here (library modules never import DVC): everything goes through the `dvc` command line.
"""
from __future__ import annotations

import fcntl
import json
import os
import re
import shutil
import signal
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence
from urllib.parse import urlsplit

from .schema import mask_url

COMMANDS = ("push", "pull")
# dvc_objects.fs.utils.tmp_fname: f"{prefix}.{token_urlsafe(16)}.tmp", a partial download or copy
PARTIAL = re.compile(r"\.[A-Za-z0-9_-]{22}\.tmp$")
SECRET_KEY = re.compile(r"secret|token|password|passphrase|access_key|account_key|connection_string|sas|"
                        r"credential|(^|_)key$", re.I)
SECRET_ENV = re.compile(r"SECRET|TOKEN|PASSWORD|PASSPHRASE|ACCESS_KEY|ACCOUNT_KEY|CONNECTION_STRING|SAS|"
                        r"CREDENTIAL|API_KEY", re.I)
NOISE = ("Having any troubles?", "<https://error.dvc.org/")

# how to give DVC credentials (names of settings only, never values); other schemes get the generic fix
CREDENTIAL_FIX = {
    "s3": "set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (plus AWS_SESSION_TOKEN for temporary keys) or "
          "AWS_PROFILE in the environment, or keep them out of git in .dvc/config.local:\n"
          "    dvc remote modify --local {name} access_key_id <KEY_ID>\n"
          "    dvc remote modify --local {name} secret_access_key <SECRET>\n"
          "  and check the key is allowed to list, read and write {url}",
}

# (kind, patterns in DVC's output), first match wins
KINDS = [
    ("credentials", ["Unable to locate credentials", "NoCredentialsError", "InvalidAccessKeyId",
                     "SignatureDoesNotMatch", "InvalidClientTokenId", "ExpiredToken", "AccessDenied",
                     "Access Denied", "Forbidden", "(403)", "(401)", "Unauthorized", "AuthenticationFailed",
                     "Authentication failed", "invalid_grant", "DefaultCredentialsError",
                     "Permission denied (publickey"]),
    ("missing_bucket", ["NoSuchBucket", "bucket does not exist", "ContainerNotFound", "The specified container "
                        "does not exist"]),
    ("unreachable", ["Could not connect to the endpoint URL", "EndpointConnectionError", "Connect timeout",
                     "ConnectTimeout", "Cannot connect to host", "Connection refused", "Name or service not known",
                     "Temporary failure in name resolution", "nodename nor servname", "Network is unreachable",
                     "No route to host", "timed out", "SSL validation failed", "ServerDisconnectedError"]),
    ("permission", ["[Errno 13]", "Permission denied", "[Errno 30]", "Read-only file system"]),
    ("unsaved_files", ["Can't remove the following unsaved files"]),
    ("missing_objects", ["Checkout failed for following targets", "do not exist neither locally nor on remote",
                         "missing-files"]),
    ("transfer_failed", ["failed to download", "failed to upload", "failed to transfer"]),
]


class RemoteError(Exception):
    """A DVC data-transfer command failed; `str(e)` is the message for the user (no secrets in it)."""

    def __init__(self, message: str, kind: str = "unknown", remote: "Remote | None" = None, output: str = ""):
        super().__init__(message)
        self.kind, self.remote, self.output = kind, remote, output


@dataclass
class Remote:
    name: str
    url: str                       # masked: no user, password or query string
    default: bool = False
    options: dict = field(default_factory=dict, repr=False)   # every remote.<name>.* setting, secrets included

    @property
    def scheme(self) -> str:
        s = urlsplit(self.options.get("url", "")).scheme.lower()
        return "" if len(s) == 1 else s   # C:\... is a path

    @property
    def local(self) -> bool:
        return self.scheme in ("", "file")

    @property
    def path(self) -> Path | None:
        if not self.local:
            return None
        u = self.options.get("url", "")
        return Path(urlsplit(u).path if u.startswith("file:") else u)

    @property
    def verify(self) -> bool:
        return str(self.options.get("verify", "false")).lower() in ("true", "1", "yes")

    @property
    def endpoint(self) -> str | None:
        e = self.options.get("endpointurl")
        return mask_url(e) if e else None

    def describe(self) -> str:
        where = f"{self.url}" + (f", endpointurl {self.endpoint}" if self.endpoint else "")
        return f"remote '{self.name}' ({where})"

    def object_url(self, md5: str) -> str:
        """Where a cache object lives in this remote (DVC 3 layout: files/md5/ab/cdef...)."""
        return f"{self.url.rstrip('/')}/files/md5/{md5[:2]}/{md5[2:]}"

    def secrets(self) -> set[str]:
        return {str(v) for k, v in self.options.items() if SECRET_KEY.search(k) and len(str(v)) >= 4
                and str(v).lower() not in ("true", "false")}


def _dvc() -> str:
    here = Path(sys.executable).parent / "dvc"
    found = str(here) if here.exists() else shutil.which("dvc")
    if not found:
        raise RemoteError("the `dvc` command is not installed in this environment (pip install dvc dvc-s3)",
                          "no_dvc")
    return found


class _Scrub:
    """Removes secrets (env values, config values, URL credentials) from any text we show."""

    def __init__(self, env: dict, remote: Remote | None = None):
        vals = {v for k, v in env.items() if SECRET_ENV.search(k) and len(v) >= 6}
        vals |= remote.secrets() if remote else set()
        self.values = sorted(vals, key=len, reverse=True)

    def __call__(self, text: str) -> str:
        for v in self.values:
            text = text.replace(v, "***")
        return re.sub(r"(?<=://)[^/@\s\"']+@", "***@", text)


def _config(repo: Path, env: dict) -> dict[str, str]:
    p = subprocess.run([_dvc(), "config", "--list"], cwd=repo, env=env, capture_output=True, text=True,
                       errors="replace", timeout=120)
    if p.returncode:
        msg = _dvc_errors(p.stdout + p.stderr) or "`dvc config --list` failed"
        raise RemoteError(f"cannot read the DVC config in {repo}: {_Scrub(env)(msg)}", "no_repo")
    out = {}
    for line in p.stdout.splitlines():
        k, sep, v = line.partition("=")
        if sep:
            out[k.strip()] = v.strip()
    return out


def resolve_remote(name: str | None = None, repo: str | Path = ".", env: dict | None = None) -> Remote:
    """The remote DVC would use: `name`, else the default (`dvc remote default`); its URL as DVC resolves it
    (relative paths made absolute), credentials masked."""
    repo, env = Path(repo), dict(os.environ if env is None else env)
    cfg = _config(repo, env)
    remotes: dict[str, dict] = {}
    for k, v in cfg.items():
        if k.startswith("remote."):
            rname, _, opt = k[len("remote."):].rpartition(".")
            remotes.setdefault(rname, {})[opt] = v
    default = cfg.get("core.remote")
    chosen = name or default
    if not chosen:
        known = ", ".join(remotes) or "none"
        raise RemoteError("no DVC remote given and no default remote set (remotes: " + known + ").\n"
                          "  fix: pass -r NAME, or set a default:  dvc remote default NAME\n"
                          "       or add one:  dvc remote add -d storage /path/or/s3://bucket/prefix", "no_remote")
    if chosen not in remotes or "url" not in remotes[chosen]:
        known = ", ".join(remotes) or "none"
        raise RemoteError(f"no DVC remote named '{chosen}' (remotes: {known}).\n"
                          f"  fix: dvc remote add --local {chosen} <url>   (or use one of the names above)",
                          "no_remote")
    opts = remotes[chosen]
    return Remote(chosen, mask_url(opts["url"]), chosen == default, opts)


def _root(repo: str | Path) -> Path:
    """The DVC repo root at or above `repo` (DVC commands work from any subdirectory)."""
    here = Path(repo).resolve()
    return next((d for d in (here, *here.parents) if (d / ".dvc").is_dir()), here)


def _locked(repo: Path) -> bool:
    """True while a DVC process holds this repo's lock (.dvc/tmp/lock, a flock by zc.lockfile)."""
    lock = repo / ".dvc" / "tmp" / "lock"
    if not lock.exists():
        return False
    try:
        with open(lock, "a") as f:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)
        return False
    except OSError:
        return True


def _out_entries(repo: Path) -> list[tuple[Path, str]]:
    """(absolute path, md5) of every DVC-tracked output: the outs of dvc.lock files and .dvc files."""
    import yaml

    p = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "--", "*.dvc", "dvc.lock", "*/dvc.lock"],
                       cwd=repo, capture_output=True, text=True)
    if p.returncode == 0:
        files = [repo / f for f in p.stdout.splitlines() if f]
    else:   # not a git repo
        files = [f for pat in ("*.dvc", "dvc.lock") for f in repo.rglob(pat)
                 if f.relative_to(repo).parts[0] not in (".dvc", ".git")]
    res = []
    for f in files:
        try:
            doc = yaml.safe_load(f.read_text()) or {}
        except (OSError, yaml.YAMLError):
            continue
        entries = (doc.get("outs") or []) if f.suffix == ".dvc" else \
            [o for st in (doc.get("stages") or {}).values() if isinstance(st, dict) for o in (st.get("outs") or [])]
        res += [(f.parent / o["path"], str(o.get("md5", ""))) for o in entries if isinstance(o, dict) and o.get("path")]
    return res


def outputs(repo: str | Path = ".") -> list[Path]:
    """Every DVC-tracked output path of the repo (from dvc.lock files and .dvc files), absolute."""
    return [p for p, _ in _out_entries(_root(repo))]


def clean_partial_files(repo: str | Path = ".", force: bool = False) -> list[Path]:
    """Delete the partial temp files (`.<22 chars>.tmp`) an interrupted DVC checkout leaves next to the outputs
    it was writing. Skipped while a DVC process holds the repo lock (it may be writing them), unless `force`
    (we know our own DVC child is dead). Returns the files removed."""
    repo = _root(repo)
    if not force and _locked(repo):
        return []
    removed, seen = [], set()
    for out in outputs(repo):
        dirs = [out] if out.is_dir() else [out.parent]
        for d in dirs:
            if d in seen or not d.is_dir():
                continue
            seen.add(d)
            walker = os.walk(d) if d == out else [(str(d), [], os.listdir(d))]
            for root, _, names in walker:
                for n in names:
                    if PARTIAL.search(n):
                        f = Path(root) / n
                        try:
                            f.unlink()
                            removed.append(f)
                        except FileNotFoundError:
                            pass
    return removed


def _dvc_errors(text: str) -> str:
    """DVC's ERROR lines (and what follows them), without its boilerplate."""
    lines, keep = [], False
    for line in text.splitlines():
        if line.startswith("ERROR:"):
            keep = True
            line = re.sub(r"^ERROR: (unexpected error - )?", "", line)
        elif line.startswith(("WARNING:", "INFO:")) or not line.strip():
            keep = False
        if keep and not line.startswith(NOISE):
            lines.append(line.rstrip())
    return "\n".join(lines).strip()


def _missing(text: str) -> list[tuple[str, str]]:
    """(name or '', md5) of the `name: data/x, md5: ...` / `md5: ...` lines of DVC's 'Missing cache files'."""
    return re.findall(r"^(?:name: (.*?), )?md5: ([0-9a-f]{32}(?:\.dir)?)$", text, flags=re.M)


def _list(remote: Remote, repo: Path, env: dict, scrub: _Scrub, timeout: float = 300) -> str:
    """`dvc ls-url remote://NAME/`: its output, prefixed 'OK' when it worked."""
    try:
        p = subprocess.run([_dvc(), "ls-url", f"remote://{remote.name}/"], cwd=repo, env=env, capture_output=True,
                           text=True, errors="replace", timeout=timeout)
    except subprocess.TimeoutExpired:
        return "ERROR: timed out listing the remote"
    return scrub(("OK\n" if p.returncode == 0 else "") + p.stdout + p.stderr)


def _failed_targets(text: str) -> list[str]:
    m = re.search(r"Checkout failed for following targets:\n(.*?)\n(?:Is your cache up to date\?|$)", text, re.S)
    return [t.strip() for t in m.group(1).splitlines() if t.strip()] if m else []


def _stream(args: list[str], repo: Path, env: dict, scrub: _Scrub, echo, on_start=None) -> tuple[int, str, str]:
    """Run DVC, echo each (scrubbed) line as it comes; return (returncode, output, why we stopped it or '')."""
    proc = subprocess.Popen(args, cwd=repo, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            errors="replace", bufsize=1)
    stopped = []
    if on_start:
        on_start(proc)
    lines = []
    try:
        for line in proc.stdout:
            line = scrub(line.rstrip("\n"))
            lines.append(line)
            if echo and line.strip() and not line.startswith(NOISE):
                echo(line)
        proc.wait()
    except KeyboardInterrupt:  # Ctrl-C reached DVC too (same process group): give it a moment, then stop it
        stopped.append("Ctrl-C")
        try:
            proc.send_signal(signal.SIGINT)
            proc.wait(10)
        except (subprocess.TimeoutExpired, OSError):
            proc.kill()
            proc.wait()
    return proc.returncode, "\n".join(lines), (stopped[0] if stopped else "")


def _corrupted(remote_arg: list[str], targets: list[str], repo: Path, env: dict, scrub: _Scrub) -> tuple[list[str], str]:
    """Refetch the failed targets verbosely: DVC logs `corrupted cache file '<cache path>'` at DEBUG level for
    each object whose bytes do not match their hash (it has just deleted it again). Returns (md5s, cache root)."""
    rc, out, _ = _stream([_dvc(), "fetch", "-v", *remote_arg, *targets], repo, env, scrub, None)
    paths = re.findall(r"corrupted cache file '([^']+)'", out)
    md5s = list(dict.fromkeys(Path(p).parent.name + Path(p).name for p in paths))
    root = str(Path(paths[0]).parent.parent) if paths else ""
    return md5s, root


def _locate(md5: str, cache_root: str, repo: Path) -> tuple[str | None, str | None]:
    """(workspace path, .dir md5) of a corrupted object: the output, or the entry of the directory manifest
    (read from the local cache) that names it."""
    repo = _root(repo)
    for out, out_md5 in _out_entries(repo):
        if out_md5 == md5:
            return _rel(out, repo), None
        if not out_md5.endswith(".dir") or not cache_root:
            continue
        try:
            entries = json.loads((Path(cache_root) / out_md5[:2] / out_md5[2:]).read_text())
        except (OSError, ValueError):
            continue
        for e in entries:
            if isinstance(e, dict) and e.get("md5") == md5:
                return _rel(out / e["relpath"], repo), out_md5
    return None, None


def _rel(p: Path, repo: Path) -> str:
    try:
        return str(p.resolve().relative_to(repo.resolve()))
    except ValueError:
        return str(p)


def _remove_cmd(remote: Remote, urls: list[str]) -> str:
    if remote.local:
        return "rm -f " + " ".join(urls)
    if remote.scheme == "s3":
        ep = f" --endpoint-url {remote.endpoint}" if remote.endpoint else ""
        return "\n    ".join(f"aws s3 rm{ep} {u}" for u in urls)
    return "delete these objects with your storage's own tool:\n    " + "\n    ".join(urls)


def classify(output: str) -> str:
    """The kind of failure DVC's output shows (see KINDS), or 'unknown'."""
    return next((k for k, pats in KINDS if any(p in output for p in pats)), "unknown")


def explain(command: str, remote: Remote, output: str, repo: Path, env: dict, scrub: _Scrub,
            remote_arg: Sequence[str] = (), head: str | None = None, rerun: str | None = None
            ) -> RemoteError:
    """Turn DVC's failed output into one RemoteError: the remote, the cause, DVC's own words, the fix."""
    said = _dvc_errors(output) or "\n".join(ln for ln in output.strip().splitlines()[-15:]
                                            if ln.strip() and not ln.startswith(NOISE)) or "(no output)"
    kind = classify(output)
    head = head or f"dvc {command} with {remote.describe()} failed"
    rerun = rerun or (f"vital {command}" if command in ("push", "pull") else f"dvc {command}")
    name, url = remote.name, remote.url
    if kind == "credentials":
        what = "has no credentials to use" if "Unable to locate credentials" in output else \
            "refused the credentials (unknown key, wrong secret, or no permission)"
        head = f"{head}: the storage {what}"
        how = CREDENTIAL_FIX.get(remote.scheme, "set this remote's credentials: dvc remote modify --local {name} "
                                                "<auth option> <value>  (see `dvc remote modify -h`)")
        fix = (f"credentials in use: {_credential_source(remote, env)}\n  fix: " + how.format(name=name, url=url)
               + f"\n  then rerun: {rerun}")
    elif kind == "missing_bucket":
        bucket = urlsplit(remote.options.get("url", "")).netloc.rpartition("@")[2]
        ep = f" --endpoint-url {remote.endpoint}" if remote.endpoint else ""
        head = f"{head}: the bucket '{bucket}' does not exist"
        fix = (f"fix: create it (e.g. aws s3 mb{ep} s3://{bucket}), or point the remote at an existing one:\n"
               f"    dvc remote modify --local {name} url s3://<bucket>/<prefix>\n  then rerun: {rerun}")
    elif kind == "unreachable":
        head = f"{head}: cannot reach the storage"
        if remote.endpoint:
            fix = (f"fix: check the network and that the endpoint {remote.endpoint} is up and right; to change it "
                   f"for this machine only:\n    dvc remote modify --local {name} endpointurl https://<host>:<port>")
        else:
            fix = ("fix: check the network (proxy, VPN, DNS) and the URL; to change it for this machine only:\n"
                   f"    dvc remote modify --local {name} url <url>")
        fix += f"\n  then rerun: {rerun}"
    elif kind == "permission":
        head = f"{head}: permission denied"
        if remote.local and remote.path is not None and str(remote.path) not in output:
            fix = ("fix: the path in DVC's message is on this machine (the cache or the workspace), not in the "
                   "remote: fix its permissions there")
        else:
            fix = (f"fix: make {remote.path or url} a writable directory, or point the remote elsewhere for this "
                   f"machine:\n    dvc remote modify --local {name} url /path/to/writable/dir")
        fix += f"\n  then rerun: {rerun}"
    elif kind == "unsaved_files":
        head = f"{head}: the workspace has changes DVC would overwrite"
        fix = ("fix: keep them (`dvc add` / `dvc commit` them, or move them away), or discard them with "
               f"`dvc pull --force`; then rerun: {rerun}")
    elif kind == "transfer_failed":
        head = f"{head}: the transfer stopped part way"
        fix = (f"fix: rerun: {rerun}  (what was transferred is kept; only the rest is sent). If it fails again, "
               f"check the remote: vital remote check {name}")
    elif kind == "missing_objects":
        targets = _failed_targets(output)
        corrupt, root = _corrupted(list(remote_arg), targets, repo, env, scrub) \
            if command == "pull" else ([], "")
        if corrupt:
            kind = "corrupted"
            rows, urls = [], []
            for md5 in corrupt:
                ws, dir_md5 = _locate(md5, root, repo)
                rows.append(f"    {ws or '(unknown file)'}  md5 {md5}  ->  {remote.object_url(md5)}")
                urls += [remote.object_url(md5)] + ([remote.object_url(dir_md5)] if dir_md5 else [])
            urls = list(dict.fromkeys(urls))
            head = (f"{head}: the remote holds corrupted data (bytes that do not match their hash). DVC rejected "
                    f"it and wrote none of {', '.join(targets) or 'the outputs that need it'} - no wrong bytes in "
                    f"the workspace. Corrupted:\n" + "\n".join(rows))
            fix = ("fix: `dvc push` alone will not replace it: DVC skips objects the remote already has, and every "
                   "file of a directory whose .dir manifest it has. On a machine with a good copy (`dvc status` "
                   "clean for these outputs), delete the bad objects and their manifests from the remote, then "
                   f"push again:\n    {_remove_cmd(remote, urls)}\n    dvc push -r {name}\n  then rerun here: {rerun}")
        elif remote.local and remote.path is not None and not remote.path.exists():
            kind = "missing_location"
            head = f"{head}: the remote directory {remote.path} does not exist"
            fix = (f"fix: point the remote at the right directory for this machine:\n"
                   f"    dvc remote modify --local {name} url /path/to/storage\n"
                   f"  or, on the machine that has the data, run `dvc push -r {name}` (it creates the directory); "
                   f"then rerun: {rerun}")
        else:
            listing = _list(remote, repo, env, scrub) if not remote.local else ""
            if classify(listing) in ("missing_bucket", "credentials", "unreachable"):
                return explain(command, remote, listing, repo, env, scrub, remote_arg, head, rerun)
            names = {m: str(_rel(o, repo)) for o, m in _out_entries(_root(repo))}
            missing = [f"{names[m]}  md5 {m}" if m in names else f"md5 {m}" if name_ in ("", "None") else
                       f"{name_}  md5 {m}" for name_, m in _missing(output)]
            shown = "\n".join(f"    {m}" for m in missing[:10]) + \
                (f"\n    ... and {len(missing) - 10} more" if len(missing) > 10 else "")
            empty = "does not exist" in listing
            head = (f"{head}: " + ("the remote is empty (nothing was ever pushed there); " if empty else "")
                    + f"the remote does not have {len(missing) or 'some'} of the objects needed"
                    + (f":\n{shown}" if missing else ""))
            fix = (f"fix: they were never pushed. On the machine that produced them run `vital push -r {name}` "
                   f"(or `dvc push -r {name}`); if no machine has them, rebuild them with `dvc repro`. "
                   f"Then rerun: {rerun}")
    else:
        fix = f"fix: no known cause; DVC's own message is above. Check the remote with: vital remote check {name}"
    text = f"{head}\n  DVC said: " + said.replace("\n", "\n    ") + f"\n  {fix}"
    return RemoteError(scrub(text), kind, remote, output)


def _credential_source(remote: Remote, env: dict) -> str:
    """Where the credentials come from: names only, never values."""
    o = remote.options
    if remote.scheme == "s3":
        srcs = []
        if o.get("access_key_id") or o.get("secret_access_key"):
            srcs.append(f"access_key_id/secret_access_key in the DVC config of remote '{remote.name}'")
        if o.get("profile"):
            srcs.append(f"profile '{o['profile']}' from the DVC config")
        if env.get("AWS_ACCESS_KEY_ID"):
            srcs.append("AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY from the environment")
        if env.get("AWS_PROFILE"):
            srcs.append(f"AWS_PROFILE={env['AWS_PROFILE']}")
        return "; ".join(srcs) or "none found (no keys in the environment or the DVC config; maybe ~/.aws)"
    keys = [k for k in o if SECRET_KEY.search(k) or k in ("user", "keyfile", "credentialpath", "profile")]
    return ("settings " + ", ".join(keys) + " in the DVC config") if keys else "none in the DVC config"


def run(command: str, args: Sequence[str] = (), repo: str | Path = ".", remote: str | None = None,
        echo: Callable[[str], None] | None = None, env: dict | None = None,
        on_start: Callable[[subprocess.Popen], None] | None = None) -> str:
    """Run `dvc push|pull [-r remote] [args]` in `repo`, echoing its output lines.

    Returns DVC's output. On failure raises RemoteError naming the remote and the fix. A pull first removes
    partial files a killed pull left behind; if DVC is killed mid-pull (or Ctrl-C), the partial files it was
    writing are removed at once and the error says to rerun."""
    if command not in COMMANDS:
        raise ValueError(f"command must be one of {COMMANDS}")
    repo, env = Path(repo), dict(os.environ if env is None else env)
    r = resolve_remote(remote, repo, env)
    scrub = _Scrub(env, r)
    say = (lambda s: echo(scrub(s))) if echo else (lambda s: None)
    remote_arg = ["-r", remote] if remote else []
    if command == "pull":
        for f in clean_partial_files(repo):
            say(f"removed a partial file left by an interrupted pull: {_rel(f, repo)}")
    if command == "pull" and not r.verify:
        say(f"note: {r.describe()} has verify off, so a corrupted object would be pulled silently; "
            f"turn it on with: dvc remote modify --local {r.name} verify true")
    rerun = " ".join([f"vital {command}", *args, *remote_arg])
    rc, out, stopped = _stream([_dvc(), command, *remote_arg, *args], repo, env, scrub, echo, on_start)
    if rc == 0:
        return out
    if rc < 0 or stopped:
        how = stopped or f"killed by signal {-rc}"
        removed = clean_partial_files(repo, force=True) if command == "pull" else []
        detail = f"; removed {len(removed)} partial file(s) it was writing" if removed else ""
        state = (" Files already in the workspace are complete (DVC writes each through a temp file); some "
                 "outputs may be missing or incomplete." if command == "pull" else "")
        raise RemoteError(scrub(f"dvc {command} with {r.describe()} was interrupted ({how}){detail}.{state}\n"
                                f"  fix: rerun: {rerun}  (what was already transferred is kept)"),
                          "interrupted", r, out)
    raise explain(command, r, out, repo, env, scrub, remote_arg, rerun=rerun)


def check(remote: str | None = None, repo: str | Path = ".", env: dict | None = None,
          timeout: float = 300) -> list[str]:
    """Is the remote usable? Lists its top level (`dvc ls-url remote://NAME/`: reachable, credentials accepted,
    bucket there) and says whether downloads are verified. Returns report lines; raises RemoteError with the
    same messages as `run`. (`dvc status -c` is no such check: with nothing in the local cache it says "in
    sync" without contacting the remote.)"""
    repo, env = Path(repo), dict(os.environ if env is None else env)
    r = resolve_remote(remote, repo, env)
    scrub = _Scrub(env, r)
    lines = [r.describe() + (" [default]" if r.default else "")]
    out = _list(r, repo, env, scrub, timeout)
    if out.startswith("OK\n"):
        top = out.split()[1:]
        lines.append(f"  reachable: yes (listed: {', '.join(top[:5]) or 'nothing'})")
    elif "does not exist" in out and classify(out) not in ("credentials", "missing_bucket", "unreachable"):
        lines.append("  reachable: yes, but nothing is there yet (never pushed to"
                     + ("; `dvc push` creates the directory)" if r.local else ")"))
    else:
        raise explain("pull", r, out, repo, env, scrub, head=f"listing {r.describe()} failed",
                      rerun=f"vital remote check {r.name}")
    lines.append("  verify: " + ("on (corrupted downloads are rejected)" if r.verify else
                                 "OFF: a corrupted object would be pulled silently; turn it on with:\n"
                                 f"    dvc remote modify --local {r.name} verify true"))
    return [scrub(x) for x in lines]
