"""Where a figure comes from and under which licence, and which pipeline revision made a release.

Licences. A corpus record's licence is its own `license` (or `licence`) column when it has one; otherwise the
side file `corpus.licenses` (params.yaml) is looked up by the record's PMC id. That file is either the PMC Open
Access file list as NCBI publishes it (`oa_file_list.csv`: File, Article Citation, Accession ID, Last Updated
(YYYY-MM-DD HH:MM:SS), PMID, License) or a plain CSV / JSONL with `pmcid` and `license` (or `licence`)
columns. A licence nobody stated is the string "unknown", never a guess.

Spellings are made one (`normalise_license`), the PMC OA list's own forms being the canonical ones:

| canonical      | also written as (case, `-`/`_`/space, a version such as 4.0, "International", "license" ignored) |
|----------------|---------------------------------------------------------------------------------------------------|
| `CC BY`        | CC-BY, cc by 4.0, CC_BY, Creative Commons Attribution                                            |
| `CC BY-SA`     | CC BY SA, cc-by-sa-4.0, Creative Commons Attribution-ShareAlike                                  |
| `CC BY-ND`     | CC BY ND, cc-by-nd                                                                               |
| `CC BY-NC`     | CC BY NC, cc-by-nc-4.0, Creative Commons Attribution-NonCommercial                               |
| `CC BY-NC-SA`  | CC BY-SA-NC (any order of NC / SA / ND after BY)                                                 |
| `CC BY-NC-ND`  | CC BY-ND-NC                                                                                      |
| `CC0`          | CC0 1.0, CC-0, CC zero, Creative Commons Zero v1.0 Universal                                     |
| `NO-CC CODE`   | no cc code, NO_CC_CODE (PMC's code for an open-access licence that is not Creative Commons)     |
| `unknown`      | empty, null, unknown, n/a, none                                                                  |

Anything else (MIT, a publisher's own licence) is kept as written, stripped of surrounding spaces.

PMC id. The record's `pmcid` (PMC1234567, or its digits), else the `pair_id` when it starts with `PMC` and
digits followed by `_`, `-`, `.` or nothing (PMC1234567_F1); otherwise none.
"""
from __future__ import annotations

import csv
import hashlib
import json
import re
import subprocess
from pathlib import Path

UNKNOWN = "unknown"
CANONICAL = ("CC BY", "CC BY-SA", "CC BY-ND", "CC BY-NC", "CC BY-NC-SA", "CC BY-NC-ND", "CC0", "NO-CC CODE")
_UNKNOWN_SPELLINGS = {"", "unknown", "n/a", "na", "none", "null", "not specified"}
_WORDS = {"attribution": "by", "noncommercial": "nc", "non commercial": "nc", "sharealike": "sa",
          "share alike": "sa", "noderivatives": "nd", "noderivs": "nd", "no derivatives": "nd",
          "creative commons": "cc", "zero": "0"}
_NOISE = re.compile(r"\b(v?\d+(\.\d+)*|international|universal|generic|unported|licen[cs]e|public domain dedication)\b")
_PMCID = re.compile(r"PMC(\d+)")
_PAIR_PMCID = re.compile(r"^(PMC\d+)(?:[_\-.]|$)")


def normalise_license(value) -> str:
    """One spelling per licence (the table above); "unknown" for none; any other text as written."""
    if value is None or (isinstance(value, float) and value != value):  # null, or NaN from a dataframe
        return UNKNOWN
    text = str(value).strip()
    if text.lower() in _UNKNOWN_SPELLINGS:
        return UNKNOWN
    s = re.sub(r"[\s_\-/]+", " ", text.lower())
    for word, code in _WORDS.items():
        s = s.replace(word, code)
    s = re.sub(r"\bcc ?0\b", "cc0", s)  # before the version numbers go
    s = re.sub(r"\s+", " ", _NOISE.sub(" ", s)).strip()
    if s == "cc0":
        return "CC0"
    if s == "no cc code":
        return "NO-CC CODE"
    parts = s.split()
    if parts[:2] == ["cc", "by"] and len(parts) == len(set(parts)) and set(parts[2:]) <= {"nc", "sa", "nd"} \
            and not {"sa", "nd"} <= set(parts[2:]):
        rest = sorted(parts[2:], key=["nc", "sa", "nd"].index)
        return "CC BY" + "".join(f"-{p.upper()}" for p in rest)
    return text


def normalise_pmcid(value) -> str | None:
    """PMC1234567 from 'PMC1234567', 'pmc1234567' or '1234567'; None for anything else."""
    if value is None or isinstance(value, bool):
        return None
    text = str(value).strip().upper()
    if text.isdigit():
        return f"PMC{int(text)}"
    m = _PMCID.fullmatch(text)
    return f"PMC{int(m.group(1))}" if m else None


def pmcid_of(raw: dict, rid: str) -> str | None:
    """The record's PMC id: its `pmcid`, else a `pair_id` that clearly starts with one (PMC1234567_F1)."""
    own = normalise_pmcid(raw.get("pmcid"))
    if own:
        return own
    m = _PAIR_PMCID.match(rid or "")
    return normalise_pmcid(m.group(1)) if m else None


class LicenseFileError(ValueError):
    pass


def read_licenses(path: str | Path) -> dict[str, dict]:
    """{pmcid: {"license": canonical, "pmid": str | None}} from the PMC OA file list CSV or a plain CSV / JSONL with
    pmcid and license (or licence) columns. A row without a PMC id is skipped; the first row of an id wins."""
    path = Path(path)
    if not path.is_file():
        raise LicenseFileError(f"{path}: no such file; corpus.licenses names the PMC OA file list "
                               "(oa_file_list.csv) or a CSV / JSONL of pmcid,license (or null)")
    try:
        if path.suffix.lower() == ".jsonl":
            rows = []
            for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
                if line.strip():
                    row = json.loads(line)
                    if not isinstance(row, dict):
                        raise LicenseFileError(f"{path}:{n}: expected an object with pmcid and license")
                    rows.append(row)
        else:
            with open(path, encoding="utf-8-sig", newline="") as f:
                rows = list(csv.DictReader(f))
    except (UnicodeDecodeError, json.JSONDecodeError, csv.Error) as e:
        raise LicenseFileError(f"{path}: cannot read it ({e})") from None
    table: dict[str, dict] = {}
    rows = [{str(k).strip().lower(): v for k, v in row.items()} for row in rows]
    for row in rows:
        pmcid = normalise_pmcid(row.get("accession id", row.get("pmcid")))
        lic = row.get("license", row.get("licence"))
        if pmcid and pmcid not in table:
            pmid = str(row.get("pmid") or "").strip()
            table[pmcid] = {"license": normalise_license(lic), "pmid": pmid or None}
    if rows and (not table or not any("license" in r or "licence" in r for r in rows)):
        found = ", ".join(sorted({str(k).strip().lower() for r in rows for k in r})) or "none"
        raise LicenseFileError(f"{path}: no PMC id and licence columns (found: {found}); expected the PMC OA file "
                               "list (Accession ID, License) or pmcid,license")
    return table


def license_of(raw: dict, pmcid: str | None, table: dict[str, dict] | None) -> str:
    """The record's own licence column, else the side file's entry for its PMC id, else "unknown"."""
    own = raw.get("license", raw.get("licence"))
    if own is not None and normalise_license(own) != UNKNOWN:
        return normalise_license(own)
    if table and pmcid in table:
        return table[pmcid]["license"]
    return UNKNOWN


def source_url_of(raw: dict) -> str | None:
    """Where the figure was fetched from, when the record says (`source_url`, `url` or `image_url`), without
    credentials or query string (schema.mask_url)."""
    from .schema import mask_url

    for key in ("source_url", "url", "image_url"):
        value = raw.get(key)
        if isinstance(value, str) and value.strip():
            return mask_url(value.strip())
    return None


def allowed(license: str, allow: list[str] | None) -> bool:
    """Whether `filter.licenses` (null: every licence) keeps a figure of this licence."""
    return allow is None or normalise_license(license) in {normalise_license(a) for a in allow}


# ---------------------------------------------------------------- pipeline revision

CODE = ("src", "stages", "dvc.yaml")  # what "dirty" means: tracked code differs from HEAD


def git_commit(root: str | Path = ".") -> str:
    """HEAD's sha, with "-dirty" when tracked code (src, stages, dvc.yaml) differs from it; "unknown" outside a git
    repository (or without git)."""
    def git(*args):
        return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, timeout=30)

    try:
        head = git("rev-parse", "--verify", "HEAD")
        if head.returncode:
            return UNKNOWN
        dirty = git("diff", "--quiet", "HEAD", "--", *CODE).returncode != 0
    except (OSError, subprocess.SubprocessError):
        return UNKNOWN
    return head.stdout.strip() + ("-dirty" if dirty else "")


def params_sha256(params: dict) -> str:
    """sha256 of the params as canonical JSON (sorted keys, no spaces): the same values give the same hash."""
    blob = json.dumps(params, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


def revision(params: dict, root: str | Path = ".") -> dict:
    """The pipeline revision a release records: {"git_commit", "params_sha256"}."""
    return {"git_commit": git_commit(root), "params_sha256": params_sha256(params)}
