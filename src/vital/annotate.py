"""The clinician annotation app: judge pool answers in a browser; export votes and demonstrations.

    vital annotate add-user dr_lee --db data/annotation/annotations.sqlite      # prints a secret token once
    vital annotate serve --pool data/annotation/pool.jsonl --db data/annotation/annotations.sqlite \\
        --images data/corpus/images --conversations data/candidates/conversations.jsonl --port 8090
    vital annotate export --db data/annotation/annotations.sqlite --pool data/annotation/pool.jsonl \\
        --out data/annotation            # clinician.jsonl, demos.jsonl, annotation_summary.json

An annotator signs in with their token and sees one pooled figure at a time (image, caption, in-text
mention), a question and its two candidate answers. They mark each answer acceptable or not (as the
paper's clinicians did) or pick A / B / tie, may comment, and may flag the figure's generated
conversation as a demonstration for its modality. Keyboard: 1/2 answer A acceptable/not, 3/4 answer B,
a/b/t preference, d demonstration, Enter save. Progress is shown; signing in again resumes.

Each question goes to at most `overlap` annotators. Every vote records who, when, and a hash of the
answers judged: after the pool is regenerated, changed questions are asked again, a page showing old
answers cannot vote, and an old vote is never merged silently.

Security: tokens are stored hashed; a session cookie is HttpOnly and SameSite=Strict and expires
(`session_hours`, or when the annotator is removed); every form carries a per-session CSRF token and
cross-origin posts are refused (`public_origin` behind a proxy); there is no page that shows
another annotator's votes; images are served by question id from the pool only; votes are written in
transactions (SQLite, WAL), so annotators voting at once lose nothing.
"""
from __future__ import annotations

import hashlib
import hmac
import json
import secrets
import sqlite3
import threading
from datetime import datetime, timezone
from http import cookies
from pathlib import Path
from socketserver import ThreadingMixIn
from urllib.parse import parse_qs
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from jinja2 import Environment

from .images import ImageStore, StoreError
from .preferences import answers_hash, vote_label
from .schema import Demo, PoolItem, Vote, read_jsonl, write_json, write_jsonl


class AnnotationError(ValueError):
    pass


SCHEMA = """
CREATE TABLE IF NOT EXISTS annotators (name TEXT PRIMARY KEY, token_sha256 TEXT NOT NULL, created TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS sessions (sid TEXT PRIMARY KEY, annotator TEXT NOT NULL, csrf TEXT NOT NULL,
                                     created TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS votes (question_id TEXT NOT NULL, annotator TEXT NOT NULL, a_acceptable INTEGER,
                                  b_acceptable INTEGER, preference TEXT, comment TEXT NOT NULL,
                                  answers_hash TEXT NOT NULL, voted_at TEXT NOT NULL,
                                  PRIMARY KEY (question_id, annotator));
CREATE TABLE IF NOT EXISTS demos (figure_id TEXT NOT NULL, annotator TEXT NOT NULL, domain TEXT NOT NULL,
                                  caption TEXT NOT NULL, inline_mentions TEXT NOT NULL, conversations TEXT NOT NULL,
                                  flagged_at TEXT NOT NULL, PRIMARY KEY (figure_id, annotator));
"""


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def connect(db: Path) -> sqlite3.Connection:
    db.parent.mkdir(parents=True, exist_ok=True)
    conn = sqlite3.connect(db, timeout=30, isolation_level=None)  # transactions are explicit
    conn.row_factory = sqlite3.Row
    conn.execute("PRAGMA journal_mode=WAL")
    conn.executescript(SCHEMA)
    return conn


def add_user(db: Path, name: str) -> str:
    """Create an annotator and return their secret token (shown once; only its hash is stored)."""
    if not name or not name.replace("_", "").replace("-", "").replace(".", "").isalnum():
        raise AnnotationError(f"annotator name {name!r}: use letters, digits, '.', '_' or '-'")
    token = secrets.token_urlsafe(24)
    conn = connect(db)
    try:
        conn.execute("INSERT INTO annotators VALUES (?, ?, ?)", (name, _sha(token), now()))
    except sqlite3.IntegrityError:
        raise AnnotationError(f"annotator {name!r} exists already in {db}") from None
    finally:
        conn.close()
    return token


def _sha(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def load_pool(path: Path) -> dict[str, PoolItem]:
    items: dict[str, PoolItem] = {}
    for n, row in enumerate(read_jsonl(path), 1):
        try:
            item = PoolItem(**row)
        except TypeError as e:
            raise AnnotationError(f"{path}:{n}: not a pool item ({e}); rerun `dvc repro annotation_pool`") from None
        if item.question_id in items:
            raise AnnotationError(f"{path}:{n}: question {item.question_id!r} appears twice")
        items[item.question_id] = item
    return items


# ---------------------------------------------------------------- the web app

PAGE = Environment(autoescape=True).from_string("""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>BioMed-VITAL annotation</title>
<style nonce="{{ nonce }}">
body{font-family:system-ui,sans-serif;margin:0;background:#f6f7f9;color:#1d2433}
header{display:flex;justify-content:space-between;align-items:center;padding:.5rem 1rem;background:#1d2433;color:#fff}
header a,header button{color:#fff;background:none;border:0;font:inherit;cursor:pointer}
main{display:grid;grid-template-columns:minmax(0,1fr) minmax(0,1fr);gap:1rem;padding:1rem;max-width:1280px;margin:auto}
.figure img{max-width:100%;max-height:60vh;display:block;margin:auto;background:#000}
.card{background:#fff;border-radius:8px;padding:1rem;box-shadow:0 1px 3px rgba(0,0,0,.1);margin-bottom:.75rem}
.answer{border:2px solid #dde1e7}.answer.ok{border-color:#2e8b57}.answer.no{border-color:#c0392b}
label{margin-right:1rem;white-space:nowrap} kbd{background:#eee;border-radius:3px;padding:0 .3rem;font-size:.85em}
.error{background:#fdecea;color:#8a1c1c} textarea{width:100%;min-height:3rem}
button.primary{background:#1d6fd8;color:#fff;border:0;border-radius:6px;padding:.6rem 1.4rem;font-size:1rem}
@media (max-width:900px){main{grid-template-columns:1fr}}
</style></head><body>
<header><strong>BioMed-VITAL annotation</strong>
{% if annotator %}<span id="progress">{{ annotator }} · {{ done }} / {{ total }} done</span>
<form method="post" action="/logout"><input type="hidden" name="csrf" value="{{ csrf }}"><button>Sign out</button></form>
{% endif %}</header>
{% if error %}<div class="card error" id="error">{{ error }}</div>{% endif %}
{% if page == "login" %}
<main><form class="card" method="post" action="/login" id="login">
<h2>Sign in</h2><p>Paste the token you were given (<code>vital annotate add-user</code>).</p>
<input type="password" name="token" id="token" autocomplete="off" autofocus size="40">
<button class="primary" id="signin">Sign in</button></form></main>
{% elif page == "done" %}
<main><div class="card" id="finished"><h2>All done, thank you.</h2><p>{{ done }} questions judged.</p></div></main>
{% else %}
<main>
<section class="figure"><div class="card"><img src="/image/{{ item.question_id|urlencode }}" alt="figure {{ item.figure_id }}"></div>
<div class="card"><strong>Caption.</strong> {{ item.caption }}</div>
{% if item.inline_mentions %}<div class="card"><strong>In-text mention.</strong> {{ item.inline_mentions|join(" ") }}</div>{% endif %}
</section>
<form class="vote" method="post" action="/vote" id="vote">
<input type="hidden" name="csrf" value="{{ csrf }}"><input type="hidden" name="question_id" value="{{ item.question_id }}">
<input type="hidden" name="answers_hash" value="{{ answers_hash }}">
<div class="card"><strong>Question.</strong> <span id="question">{{ item.question }}</span>
<small>({{ item.domain }}, {{ item.question_id }})</small></div>
{% for side, text in [("a", item.answer_a), ("b", item.answer_b)] %}
<div class="card answer" id="answer-{{ side }}"><strong>Answer {{ side|upper }}.</strong> {{ text }}<br>
<label><input type="radio" name="{{ side }}" value="acceptable" id="{{ side }}-ok"> acceptable
<kbd>{{ "1" if side == "a" else "3" }}</kbd></label>
<label><input type="radio" name="{{ side }}" value="not" id="{{ side }}-no"> not acceptable
<kbd>{{ "2" if side == "a" else "4" }}</kbd></label></div>
{% endfor %}
<div class="card">Or prefer:
<label><input type="radio" name="preference" value="A" id="pref-a"> A <kbd>a</kbd></label>
<label><input type="radio" name="preference" value="B" id="pref-b"> B <kbd>b</kbd></label>
<label><input type="radio" name="preference" value="tie" id="pref-tie"> tie <kbd>t</kbd></label></div>
{% if conversation %}<div class="card"><details><summary>The generated conversation for this figure</summary>
{% for turn in conversation %}<p><strong>{{ "Q" if turn["from"] == "human" else "A" }}:</strong> {{ turn["value"] }}</p>{% endfor %}
</details><label><input type="checkbox" name="demo" value="1" id="demo" {{ "checked" if flagged }}>
use this conversation as a demonstration for {{ item.domain }} <kbd>d</kbd></label></div>{% endif %}
<div class="card"><textarea name="comment" id="comment" placeholder="comment (optional)"></textarea></div>
<button class="primary" id="save">Save and next <kbd>Enter</kbd></button>
</form></main>
<script nonce="{{ nonce }}">
const keys = {"1": "a-ok", "2": "a-no", "3": "b-ok", "4": "b-no", "a": "pref-a", "b": "pref-b", "t": "pref-tie"};
function paint() {
  for (const s of ["a", "b"]) {
    const box = document.getElementById("answer-" + s);
    box.classList.toggle("ok", document.getElementById(s + "-ok").checked);
    box.classList.toggle("no", document.getElementById(s + "-no").checked);
  }
}
document.getElementById("vote").addEventListener("change", paint);
document.addEventListener("keydown", (e) => {
  if (e.target.tagName === "TEXTAREA" || e.ctrlKey || e.metaKey || e.altKey) return;
  if (keys[e.key]) { document.getElementById(keys[e.key]).checked = true; paint(); e.preventDefault(); }
  else if (e.key === "d" && document.getElementById("demo")) { const d = document.getElementById("demo"); d.checked = !d.checked; }
  else if (e.key === "Enter") { e.preventDefault(); document.getElementById("vote").requestSubmit(); }
});
</script>
{% endif %}
</body></html>""")


class App:
    """A WSGI app over the pool and the annotation database."""

    def __init__(self, pool: Path, db: Path, images: Path | ImageStore, overlap: int = 1, conversations: Path | None = None,
                 public_origin: str | None = None, session_hours: float = 12):
        if overlap < 1:
            raise AnnotationError(f"overlap {overlap}: each question needs at least one annotator")
        try:
            images = ImageStore.of(images)
        except StoreError as e:
            raise AnnotationError(f"{e}, or pass --images") from None
        if conversations and not Path(conversations).exists():
            raise AnnotationError(f"{conversations} does not exist: run `dvc repro generate` to offer generated "
                                  "conversations as demonstrations, or pass --conversations ''")
        self.pool = load_pool(pool)
        self.order = list(self.pool)
        self.hashes = {q: answers_hash(item) for q, item in self.pool.items()}
        self.db, self.images, self.overlap = db, images, overlap
        self.public_origin, self.session_s = public_origin, session_hours * 3600
        self.conversations = {r["id"]: r["conversations"] for r in read_jsonl(conversations)} if conversations else {}
        connect(db).close()  # create the schema before the first request
        self._local = threading.local()

    # -- helpers
    def conn(self) -> sqlite3.Connection:
        if getattr(self._local, "conn", None) is None:
            self._local.conn = connect(self.db)
        return self._local.conn

    def session(self, environ) -> sqlite3.Row | None:
        """The signed-in session: a known cookie, not expired, of an annotator who still exists."""
        jar = cookies.SimpleCookie(environ.get("HTTP_COOKIE", ""))
        sid = jar["vital_session"].value if "vital_session" in jar else None
        if not sid:
            return None
        row = self.conn().execute("SELECT s.* FROM sessions s JOIN annotators a ON a.name = s.annotator "
                                  "WHERE s.sid = ?", (sid,)).fetchone()
        age = datetime.now(timezone.utc) - datetime.fromisoformat(row["created"]) if row else None
        return row if row and age.total_seconds() < self.session_s else None

    def open_questions(self, annotator: str) -> tuple[list[str], set[str]]:
        """(questions this annotator may judge, in pool order; those they have judged). A vote counts only
        if it judged the answers the pool holds now: after a pool changes, its questions are asked again."""
        mine, others = set(), {}
        for r in self.conn().execute("SELECT question_id, annotator, answers_hash FROM votes"):
            if self.hashes.get(r["question_id"]) != r["answers_hash"]:
                continue  # stale, or not in this pool
            if r["annotator"] == annotator:
                mine.add(r["question_id"])
            else:
                others[r["question_id"]] = others.get(r["question_id"], 0) + 1
        return [q for q in self.order if q not in mine and others.get(q, 0) < self.overlap], mine

    def next_item(self, annotator: str) -> tuple[PoolItem | None, int, int]:
        """The first open question, and progress: judged / (judged + open)."""
        open_, mine = self.open_questions(annotator)
        return (self.pool[open_[0]] if open_ else None), len(mine), len(mine) + len(open_)

    # -- WSGI
    def __call__(self, environ, start_response):
        method, path = environ["REQUEST_METHOD"], environ.get("PATH_INFO", "/")
        try:
            if method == "POST" and not self.same_origin(environ):
                return self.respond(start_response, "403 Forbidden", "cross-origin form refused", "text/plain")
            if path == "/login" and method == "POST":
                return self.login(environ, start_response)
            sess = self.session(environ)
            if path.startswith("/image/") and method == "GET":
                return self.image(start_response, sess, path[len("/image/"):])
            if sess is None:
                return self.page(start_response, "login", status="401 Unauthorized" if path != "/" else "200 OK")
            if method == "POST":
                form = self.form(environ)
                if not hmac.compare_digest(form.get("csrf", ""), sess["csrf"]):
                    return self.respond(start_response, "403 Forbidden", "missing or wrong CSRF token", "text/plain")
                if path == "/vote":
                    return self.vote(start_response, sess, form)
                if path == "/logout":
                    with self.conn():
                        self.conn().execute("DELETE FROM sessions WHERE sid = ?", (sess["sid"],))
                    return self.redirect(start_response, "/", "vital_session=; Max-Age=0; Path=/")
            if method == "GET" and path in ("/", "/annotate"):
                return self.annotate(start_response, sess)
            return self.respond(start_response, "404 Not Found", "not found", "text/plain")
        except AnnotationError as e:
            return self.respond(start_response, "400 Bad Request", str(e), "text/plain")

    def same_origin(self, environ) -> bool:
        """A browser's cross-site post names another origin (or "null"); refuse it before reading the form.
        Behind a proxy that rewrites Host, `public_origin` (e.g. https://annotate.example.org) is the one."""
        origin = environ.get("HTTP_ORIGIN")
        if origin is None:
            return True
        if self.public_origin:
            return origin == self.public_origin.rstrip("/")
        return origin.split("://", 1)[-1] == environ.get("HTTP_HOST")

    @staticmethod
    def form(environ) -> dict[str, str]:
        try:
            size = int(environ.get("CONTENT_LENGTH") or 0)
        except ValueError:
            raise AnnotationError("bad Content-Length") from None
        if not 0 <= size <= 100_000:
            raise AnnotationError("form too large (or a bad Content-Length)")
        body = environ["wsgi.input"].read(size).decode("utf-8", "replace")
        return {k: v[0] for k, v in parse_qs(body, keep_blank_values=True).items()}

    def login(self, environ, start_response):
        token = self.form(environ).get("token", "").strip()
        rows = self.conn().execute("SELECT name, token_sha256 FROM annotators").fetchall()
        who = next((r["name"] for r in rows if hmac.compare_digest(r["token_sha256"], _sha(token))), None)
        if who is None:
            return self.page(start_response, "login", status="401 Unauthorized", error="Unknown token.")
        sid, csrf = secrets.token_urlsafe(32), secrets.token_urlsafe(32)
        with self.conn():
            self.conn().execute("INSERT INTO sessions VALUES (?, ?, ?, ?)", (sid, who, csrf, now()))
        return self.redirect(start_response, "/annotate",
                             f"vital_session={sid}; HttpOnly; SameSite=Strict; Path=/")

    def annotate(self, start_response, sess, error: str | None = None, status: str = "200 OK"):
        item, done, total = self.next_item(sess["annotator"])
        if item is None:
            return self.page(start_response, "done", sess=sess, done=done, total=total)
        flagged = self.conn().execute("SELECT 1 FROM demos WHERE figure_id = ? AND annotator = ?",
                                      (item.figure_id, sess["annotator"])).fetchone() is not None
        return self.page(start_response, "vote", sess=sess, item=item, done=done, total=total, error=error,
                         conversation=self.conversations.get(item.figure_id), flagged=flagged, status=status,
                         answers_hash=self.hashes[item.question_id])

    def vote(self, start_response, sess, form):
        qid = form.get("question_id", "")
        item = self.pool.get(qid)
        if item is None:
            raise AnnotationError(f"question {qid!r} is not in this pool")
        open_, mine = self.open_questions(sess["annotator"])
        if qid not in open_ and qid not in mine:  # judged by `overlap` others already
            return self.annotate(start_response, sess, status="409 Conflict",
                                 error="Enough annotators have judged that question meanwhile; here is the next one.")
        if form.get("answers_hash") != self.hashes[qid]:  # the page showed other answers (the pool changed)
            return self.annotate(start_response, sess, status="409 Conflict",
                                 error="The answers of that question changed since the page was shown; judge them again.")
        a, b, pref = form.get("a"), form.get("b"), form.get("preference") or None
        if pref not in (None, "A", "B", "tie") or a not in (None, "acceptable", "not") or b not in (None, "acceptable", "not"):
            raise AnnotationError("unexpected form values")
        if (pref is None) == (a is None or b is None) or (pref is not None and (a or b)):
            return self.annotate(start_response, sess, status="400 Bad Request",
                                 error="Either mark both answers acceptable or not, or pick A, B or tie (not both).")
        acc = {None: None, "acceptable": 1, "not": 0}
        with self.conn():  # one transaction: the vote and the demonstration flag land together or not at all
            c = self.conn()
            c.execute("BEGIN IMMEDIATE")
            c.execute("""INSERT INTO votes VALUES (?, ?, ?, ?, ?, ?, ?, ?)
                         ON CONFLICT (question_id, annotator) DO UPDATE SET a_acceptable = excluded.a_acceptable,
                         b_acceptable = excluded.b_acceptable, preference = excluded.preference,
                         comment = excluded.comment, answers_hash = excluded.answers_hash, voted_at = excluded.voted_at""",
                      (qid, sess["annotator"], acc[a], acc[b], pref, form.get("comment", "").strip(),
                       self.hashes[qid], now()))
            conv = self.conversations.get(item.figure_id)
            if form.get("demo") and conv:
                c.execute("INSERT OR REPLACE INTO demos VALUES (?, ?, ?, ?, ?, ?, ?)",
                          (item.figure_id, sess["annotator"], item.domain, item.caption,
                           json.dumps(item.inline_mentions), json.dumps(conv), now()))
            elif conv:
                c.execute("DELETE FROM demos WHERE figure_id = ? AND annotator = ?", (item.figure_id, sess["annotator"]))
        return self.redirect(start_response, "/annotate")

    def image(self, start_response, sess, qid: str):
        if sess is None:
            return self.respond(start_response, "401 Unauthorized", "sign in first", "text/plain")
        item = self.pool.get(qid)
        if item is None or item.image not in self.images:
            return self.respond(start_response, "404 Not Found", "no such pool image", "text/plain")
        mime = "image/png" if item.image.lower().endswith(".png") else "image/jpeg"
        return self.respond(start_response, "200 OK", self.images.read(item.image), mime)

    # -- responses
    def page(self, start_response, page, sess=None, status="200 OK", **kw):
        nonce = secrets.token_urlsafe(12)
        html = PAGE.render(page=page, nonce=nonce, annotator=sess["annotator"] if sess else None,
                           csrf=sess["csrf"] if sess else "", **kw)
        csp = f"default-src 'none'; img-src 'self'; style-src 'nonce-{nonce}'; script-src 'nonce-{nonce}'; " \
              "form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
        return self.respond(start_response, status, html, "text/html; charset=utf-8", [("Content-Security-Policy", csp)])

    @staticmethod
    def redirect(start_response, where, cookie=None):
        headers = [("Location", where)] + ([("Set-Cookie", cookie)] if cookie else [])
        return App.respond(start_response, "303 See Other", "", "text/plain", headers)

    @staticmethod
    def respond(start_response, status, body, mime, headers=()):
        data = body if isinstance(body, bytes) else body.encode()
        start_response(status, [("Content-Type", mime), ("Content-Length", str(len(data))),
                                ("X-Content-Type-Options", "nosniff"), ("X-Frame-Options", "DENY"),
                                ("Cache-Control", "no-store"), *headers])
        return [data]


class _ThreadingServer(ThreadingMixIn, WSGIServer):
    daemon_threads = True


class _QuietHandler(WSGIRequestHandler):
    timeout = 30  # a client that stops sending does not hold a thread for ever

    def log_message(self, *args):
        pass


def make_app_server(app: App, host: str = "127.0.0.1", port: int = 8090):
    return make_server(host, port, app, server_class=_ThreadingServer, handler_class=_QuietHandler)


# ---------------------------------------------------------------- export

def connect_readonly(db: Path) -> sqlite3.Connection:
    """The annotation database opened read-only: a mistyped path is an error, never a new empty database."""
    if not db.is_file():
        raise AnnotationError(f"{db}: no such annotation database (nothing was written); pass --db with the "
                              "file that `vital annotate serve` and `add-user` use")
    conn = sqlite3.connect(db.resolve().as_uri() + "?mode=ro", uri=True, timeout=30)
    conn.row_factory = sqlite3.Row
    return conn


def held(path: Path) -> int:
    """How many records a JSONL file holds (0 if it does not exist)."""
    if not path.is_file():
        return 0
    with open(path, encoding="utf-8", errors="replace") as f:
        return sum(1 for line in f if line.strip())


def export(db: Path, pool_path: Path, out_dir: Path, force: bool = False) -> dict:
    """clinician.jsonl + demos.jsonl + annotation_summary.json, sorted, so the same votes give the same files.
    The database is only read. An export that would replace a file with fewer votes (or demonstrations) than
    it holds is refused unless `force`: clinicians' votes are never lost to a wrong --db or --pool."""
    if not pool_path.is_file():
        raise AnnotationError(f"{pool_path}: no such pool file; pass --pool with the pool the votes were made on "
                              "(dvc repro annotation_pool writes data/annotation/pool.jsonl)")
    pool = load_pool(pool_path)
    conn = connect_readonly(db)
    try:
        votes = conn.execute("SELECT * FROM votes ORDER BY question_id, annotator").fetchall()
        demos = conn.execute("SELECT * FROM demos ORDER BY figure_id, annotator").fetchall()
    except sqlite3.DatabaseError as e:  # not SQLite, or no votes/demos tables
        raise AnnotationError(f"{db}: not an annotation database ({e}); pass --db with the file that "
                              "`vital annotate serve` uses") from None
    finally:
        conn.close()
    unknown = sorted({v["question_id"] for v in votes} - set(pool))
    if unknown:
        raise AnnotationError(f"{db} holds votes for {len(unknown)} question(s) not in {pool_path} (e.g. "
                              f"{unknown[0]!r}): export with the pool the votes were made on")
    rows = [Vote(question_id=v["question_id"], annotator=v["annotator"],
                 a_acceptable=None if v["a_acceptable"] is None else bool(v["a_acceptable"]),
                 b_acceptable=None if v["b_acceptable"] is None else bool(v["b_acceptable"]),
                 preference=v["preference"], note=v["comment"], answers_hash=v["answers_hash"], voted_at=v["voted_at"])
            for v in votes]
    current = [v for v in rows if v.answers_hash == answers_hash(pool[v.question_id])]
    stale = len(rows) - len(current)
    by_figure: dict[str, list] = {}
    for d in demos:
        by_figure.setdefault(d["figure_id"], []).append(d)
    demo_rows = [Demo(id=f"demo-{fid}", domain=ds[0]["domain"], caption=ds[0]["caption"],
                      inline_mentions=json.loads(ds[0]["inline_mentions"]), conversations=json.loads(ds[0]["conversations"]),
                      note="flagged by " + ", ".join(d["annotator"] for d in ds)) for fid, ds in sorted(by_figure.items())]
    for name, n, what in (("clinician.jsonl", len(rows), "votes"), ("demos.jsonl", len(demo_rows), "demonstrations")):
        before = held(out_dir / name)
        if n < before and not force:
            raise AnnotationError(f"{out_dir / name} holds {before} {what}; this export of {db} would write {n}. "
                                  "Nothing was written: check --db and --pool, or pass --force to overwrite")
    out_dir.mkdir(parents=True, exist_ok=True)
    write_jsonl(out_dir / "clinician.jsonl", rows)
    write_jsonl(out_dir / "demos.jsonl", demo_rows)
    summary = {"votes": len(rows), "annotators": len({v.annotator for v in rows}), "questions": len({v.question_id for v in rows}),
               "pool_questions": len(pool), "stale_votes": stale, "demonstrations": len(demo_rows),
               "demonstrations_by_domain": {d: sum(x.domain == d for x in demo_rows) for d in sorted({x.domain for x in demo_rows})},
               **agreement(current)}  # agreement on what the pool holds now
    write_json(out_dir / "annotation_summary.json", summary)
    return summary


def agreement(votes: list[Vote]) -> dict:
    """Inter-annotator agreement on the A/B/tie label of shared questions: Cohen's kappa for two annotators,
    Krippendorff's alpha (nominal) for more. None when it is undefined (no shared items, one category)."""
    by_q: dict[str, dict[str, str]] = {}
    for v in votes:
        by_q.setdefault(v.question_id, {})[v.annotator] = vote_label(v)
    shared = {q: labels for q, labels in by_q.items() if len(labels) >= 2}
    annotators = sorted({a for labels in by_q.values() for a in labels})
    out = {"shared_questions": len(shared), "agreement_measure": None, "agreement": None}
    if not shared:
        return out
    if len(annotators) == 2:
        from sklearn.metrics import cohen_kappa_score
        x, y = zip(*[(labels[annotators[0]], labels[annotators[1]]) for labels in shared.values()])
        value = None if len(set(x) | set(y)) < 2 else float(cohen_kappa_score(x, y))
        out.update(agreement_measure="cohen_kappa", agreement=value)
    else:
        out.update(agreement_measure="krippendorff_alpha_nominal", agreement=krippendorff_alpha(list(shared.values())))
    if out["agreement"] is not None:
        out["agreement"] = round(out["agreement"], 4)
    return out


def krippendorff_alpha(units: list[dict[str, str]]) -> float | None:
    """Nominal alpha = 1 - D_o / D_e over units with two or more values (coincidence-matrix form)."""
    from collections import Counter
    pairs: Counter = Counter()
    for labels in units:
        values = list(labels.values())
        m = len(values)
        for i, a in enumerate(values):
            for j, b in enumerate(values):
                if i != j:
                    pairs[(a, b)] += 1 / (m - 1)
    totals: Counter = Counter()
    for (a, _), w in pairs.items():
        totals[a] += w
    n = sum(totals.values())
    if n <= 1 or len(totals) < 2:
        return None
    observed = sum(w for (a, b), w in pairs.items() if a != b) / n
    expected = sum(totals[a] * totals[b] for a in totals for b in totals if a != b) / (n * (n - 1))
    return 1 - observed / expected
