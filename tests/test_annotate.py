"""The annotation app as annotators and an attacker use it: over HTTP on 127.0.0.1, then export."""
import base64
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from http.cookiejar import CookieJar
from pathlib import Path

import pytest
from typer.testing import CliRunner

from vital.annotate import AnnotationError, App, add_user, agreement, connect, export, krippendorff_alpha, \
    make_app_server
from vital.cli import app as cli
from vital.images import ImageStore
from vital.llm.offline import OfflineBackend
from vital.schema import PoolItem, Vote, read_jsonl, write_jsonl


@pytest.fixture
def pool(sample, tmp_path):
    """Six questions on three real figures, and a generated conversation per figure."""
    records, image_dir = sample
    items, convs = [], []
    for r in records[:3]:
        for k in range(2):
            items.append(PoolItem(question_id=f"{r.id}:q{k}", figure_id=r.id, image=r.image, domain=r.domain,
                                  caption=r.caption, inline_mentions=r.inline_mentions, cluster=0,
                                  question=f"Question {k} about {r.id}?", answer_a=f"answer A{k}",
                                  answer_b=f"answer B{k}", backend="offline", request_hash="h"))
        text = OfflineBackend().complete([{"role": "user", "content": f"Caption: {r.caption}"}], "generate")
        convs.append({"id": r.id, "conversations": [{"from": "human" if line.startswith("User") else "gpt",
                                                       "value": line.split(": ", 1)[1]} for line in text.splitlines()]})
    write_jsonl(tmp_path / "pool.jsonl", items)
    write_jsonl(tmp_path / "conversations.jsonl", convs)
    return tmp_path / "pool.jsonl", image_dir, items


class Server:
    def __init__(self, app):
        self.httpd = make_app_server(app, "127.0.0.1", 0)
        self.url = f"http://127.0.0.1:{self.httpd.server_port}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def serve(pool, tmp_path):
    servers = []

    def start(overlap=2, db=None):
        path, image_dir, _ = pool
        s = Server(App(path, db or tmp_path / "db.sqlite", image_dir, overlap, tmp_path / "conversations.jsonl"))
        servers.append(s)
        return s
    yield start
    for s in servers:
        s.close()


def hidden(html: str) -> dict:
    """The hidden fields of the vote form on a page: csrf, question_id, answers_hash."""
    return dict(re.findall(r'name="(csrf|question_id|answers_hash)" value="([^"]*)"', html))


class Annotator:
    """A browser-like client: cookies, forms, no network beyond 127.0.0.1."""

    def __init__(self, url):
        self.url, self.jar = url, CookieJar()
        self.opener = urllib.request.build_opener(urllib.request.ProxyHandler({}),
                                                  urllib.request.HTTPCookieProcessor(self.jar))

    def request(self, path, form=None, headers=None):
        data = urllib.parse.urlencode(form).encode() if form is not None else None
        req = urllib.request.Request(self.url + path, data=data, headers=headers or {})
        try:
            with self.opener.open(req, timeout=10) as r:
                return r.status, r.read()
        except urllib.error.HTTPError as e:
            return e.code, e.read()

    def login(self, token):
        return self.request("/login", {"token": token})

    def page(self):
        status, body = self.request("/annotate")
        return status, body.decode()

    def csrf(self):
        return re.search(r'name="csrf" value="([^"]+)"', self.page()[1]).group(1)

    def current(self):
        return re.search(r'name="question_id" value="([^"]+)"', self.page()[1]).group(1)

    def vote(self, **form):
        status, body = self.request("/vote", {**hidden(self.page()[1]), **form})
        return status, body.decode()


def test_sign_in_vote_resume_and_export_like_a_clinician(serve, pool, tmp_path):
    path, _, items = pool
    out = CliRunner().invoke(cli, ["annotate", "add-user", "dr_lee", "--db", str(tmp_path / "db.sqlite")])
    assert out.exit_code == 0, out.output
    token = out.output.strip().splitlines()[-1]
    assert token not in (tmp_path / "db.sqlite").read_bytes().decode("latin-1")  # stored hashed only
    s = serve()
    dr = Annotator(s.url)
    assert dr.login("wrong-token")[0] == 401
    assert dr.login(token)[0] == 200
    status, html = dr.page()
    assert status == 200 and items[0].question in html and items[0].caption in html and "0 / 6 done" in html
    assert dr.vote(a="acceptable", b="not", comment="B misses the opacity")[0] == 200
    assert dr.vote(preference="B", demo="1")[0] == 200
    status, html = dr.vote(comment="forgot to mark")  # neither marks nor a pick: asked again, nothing saved
    assert status == 400 and "Either mark both answers" in html and items[2].question in html
    status, html = dr.vote(a="acceptable", b="not", preference="B")  # contradicting itself: asked again
    assert status == 400 and "(not both)" in html

    again = Annotator(s.url)  # another day, another browser: resumes where they left off
    again.login(token)
    assert items[2].question in again.page()[1] and "2 / 6 done" in again.page()[1]

    result = CliRunner().invoke(cli, ["annotate", "export", "--db", str(tmp_path / "db.sqlite"), "--pool", str(path),
                                      "--out", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    votes = list(read_jsonl(tmp_path / "out/clinician.jsonl"))
    assert [(v["question_id"], v["a_acceptable"], v["b_acceptable"], v["preference"], v["note"]) for v in votes] == [
        (items[0].question_id, True, False, None, "B misses the opacity"),
        (items[1].question_id, None, None, "B", "")]
    assert all(v["annotator"] == "dr_lee" and v["answers_hash"] and v["voted_at"] for v in votes)
    demos = list(read_jsonl(tmp_path / "out/demos.jsonl"))
    assert [(d["id"], d["domain"]) for d in demos] == [(f"demo-{items[1].figure_id}", items[1].domain)]
    assert demos[0]["conversations"][0]["from"] == "human" and "flagged by dr_lee" in demos[0]["note"]
    first = (tmp_path / "out/clinician.jsonl").read_bytes()
    export(tmp_path / "db.sqlite", path, tmp_path / "out")
    assert (tmp_path / "out/clinician.jsonl").read_bytes() == first  # deterministic


def test_no_write_without_a_token_or_the_form_token_and_no_cross_site_posts(serve, pool, tmp_path):
    _, _, items = pool
    token = add_user(tmp_path / "db.sqlite", "dr_a")
    s = serve()
    stranger = Annotator(s.url)
    vote = {"question_id": items[0].question_id, "a": "acceptable", "b": "not"}
    assert stranger.request("/vote", {**vote, "csrf": "x"})[0] == 401
    dr = Annotator(s.url)
    dr.login(token)
    assert dr.request("/vote", vote)[0] == 403  # no CSRF token
    assert dr.request("/vote", {**vote, "csrf": "forged"})[0] == 403
    assert dr.request("/vote", {**vote, "csrf": dr.csrf()}, {"Origin": "http://evil.example"})[0] == 403
    assert connect(tmp_path / "db.sqlite").execute("SELECT COUNT(*) FROM votes").fetchone()[0] == 0
    status, body = dr.request("/vote", {**vote, "question_id": "not-in-pool", "csrf": dr.csrf()})
    assert status == 400 and b"not in this pool" in body
    form = hidden(dr.page()[1])
    assert dr.request("/vote", {**vote, **form}, {"Origin": s.url})[0] == 200  # same origin is fine


def test_no_annotator_can_read_another_annotators_votes(serve, tmp_path):
    tokens = {name: add_user(tmp_path / "db.sqlite", name) for name in ("dr_a", "dr_b")}
    s = serve(overlap=2)
    a, b = Annotator(s.url), Annotator(s.url)
    a.login(tokens["dr_a"])
    b.login(tokens["dr_b"])
    a.vote(a="not", b="acceptable", comment="PRIVATE-NOTE-OF-A")
    status, html = b.page()
    assert "PRIVATE-NOTE-OF-A" not in html and not re.search(r"<input[^>]*\bchecked", html)  # B judges blind
    for path in ("/votes", "/export", "/api/votes", "/annotate?annotator=dr_a"):
        assert b"PRIVATE-NOTE-OF-A" not in b.request(path)[1]


def test_images_come_from_the_pool_only(serve, pool, tmp_path):
    path, image_dir, items = pool
    (tmp_path / "secret.txt").write_text("do not serve")
    evil = PoolItem(**{**items[0].__dict__, "question_id": "evil:q0", "image": "../secret.txt"})
    write_jsonl(path, items + [evil])
    s = serve()
    dr = Annotator(s.url)
    assert dr.request(f"/image/{items[0].question_id}")[0] == 401  # not signed in
    dr.login(add_user(tmp_path / "db.sqlite", "dr_a"))
    status, body = dr.request(f"/image/{items[0].question_id}")
    assert status == 200 and body == ImageStore(image_dir).read(items[0].image)
    for probe in ("evil:q0", "..%2f..%2fsecret.txt", "../../etc/passwd", "nope"):
        status, body = dr.request(f"/image/{probe}")
        assert status == 404 and b"do not serve" not in body and b"root:" not in body


def test_two_annotators_voting_at_once_lose_nothing(serve, pool, tmp_path):
    _, _, items = pool
    tokens = [add_user(tmp_path / "db.sqlite", f"dr_{i}") for i in range(2)]
    s = serve(overlap=2)
    errors = []

    def annotate_all(token):
        dr = Annotator(s.url)
        dr.login(token)
        for _ in items:
            status, _ = dr.vote(a="acceptable", b="not")
            if status != 200:
                errors.append(status)

    threads = [threading.Thread(target=annotate_all, args=(t,)) for t in tokens]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    rows = connect(tmp_path / "db.sqlite").execute("SELECT annotator, COUNT(*) FROM votes GROUP BY annotator").fetchall()
    assert sorted(tuple(r) for r in rows) == [("dr_0", len(items)), ("dr_1", len(items))]


def test_overlap_decides_how_many_annotators_see_a_question(serve, pool, tmp_path):
    _, _, items = pool
    tokens = [add_user(tmp_path / "db.sqlite", f"dr_{i}") for i in range(3)]
    s = serve(overlap=2)
    drs = [Annotator(s.url) for _ in tokens]
    for dr, t in zip(drs, tokens):
        dr.login(t)
    drs[0].vote(a="acceptable", b="not")
    drs[1].vote(a="acceptable", b="not")
    assert drs[2].current() == items[1].question_id  # q0 has its two annotators already


def test_a_regenerated_pool_asks_changed_questions_again_and_old_pages_cannot_vote(serve, pool, tmp_path):
    path, image_dir, items = pool
    token = add_user(tmp_path / "db.sqlite", "dr_a")
    s = serve(overlap=1)
    dr = Annotator(s.url)
    dr.login(token)
    old_page = dr.page()[1]
    dr.vote(a="acceptable", b="not")
    dr.vote(a="acceptable", b="not")
    changed = [PoolItem(**{**i.__dict__, "answer_b": "regenerated"}) if i is items[0] else i for i in items]
    write_jsonl(path, changed)
    s2 = serve(overlap=1)  # the app restarted on the new pool
    dr2 = Annotator(s2.url)
    dr2.login(token)
    assert items[0].question in dr2.page()[1] and "1 / 6 done" in dr2.page()[1]  # q0's answers changed: again
    stale_form = hidden(old_page)
    status, html = dr2.request("/vote", {**stale_form, "csrf": dr2.csrf(), "a": "not", "b": "acceptable"})
    assert status == 409 and b"changed since the page was shown" in html


def test_overlap_is_enforced_on_writes_too(serve, pool, tmp_path):
    _, _, items = pool
    tokens = [add_user(tmp_path / "db.sqlite", f"dr_{i}") for i in range(2)]
    s = serve(overlap=1)
    a, b = Annotator(s.url), Annotator(s.url)
    a.login(tokens[0])
    b.login(tokens[1])
    page_b = b.page()[1]  # b is shown q0 too, before a saves
    a.vote(a="acceptable", b="not")
    form = hidden(page_b)
    status, html = b.request("/vote", {**form, "a": "not", "b": "acceptable"})
    assert status == 409 and items[1].question.encode() in html
    assert connect(tmp_path / "db.sqlite").execute("SELECT COUNT(*) FROM votes").fetchone()[0] == 1


def test_sessions_end_and_bad_requests_are_refused(pool, tmp_path):
    path, image_dir, _ = pool
    token = add_user(tmp_path / "db.sqlite", "dr_a")
    s = Server(App(path, tmp_path / "db.sqlite", image_dir, session_hours=0))  # every session has expired
    try:
        dr = Annotator(s.url)
        dr.login(token)
        assert dr.page()[0] == 401
        for length in ("-1", "abc", "10000000"):
            req = urllib.request.Request(s.url + "/login", data=b"token=x", headers={"Content-Length": length})
            try:
                code = urllib.request.build_opener(urllib.request.ProxyHandler({})).open(req, timeout=10).status
            except urllib.error.HTTPError as e:
                code = e.code
            assert code == 400, length
    finally:
        s.close()
    s = Server(App(path, tmp_path / "db.sqlite", image_dir))
    try:
        dr = Annotator(s.url)
        dr.login(token)
        assert dr.page()[0] == 200
        conn = connect(tmp_path / "db.sqlite")
        conn.execute("DELETE FROM annotators WHERE name = 'dr_a'")  # access withdrawn
        assert dr.page()[0] == 401
    finally:
        s.close()
    with pytest.raises(AnnotationError, match="at least one annotator"):
        App(path, tmp_path / "db.sqlite", image_dir, overlap=0)
    with pytest.raises(AnnotationError, match="dvc repro generate"):
        App(path, tmp_path / "db.sqlite", image_dir, conversations=tmp_path / "missing.jsonl")


def test_export_refuses_votes_from_another_pool_and_reports_stale_ones(serve, pool, tmp_path):
    path, _, items = pool
    token = add_user(tmp_path / "db.sqlite", "dr_a")
    s = serve()
    dr = Annotator(s.url)
    dr.login(token)
    dr.vote(a="acceptable", b="not")
    dr.vote(a="not", b="acceptable")
    changed = [PoolItem(**{**i.__dict__, "answer_b": "regenerated"}) if i is items[1] else i for i in items]
    write_jsonl(tmp_path / "new_pool.jsonl", changed)
    assert export(tmp_path / "db.sqlite", tmp_path / "new_pool.jsonl", tmp_path / "out")["stale_votes"] == 1
    write_jsonl(tmp_path / "other_pool.jsonl", items[1:])
    with pytest.raises(AnnotationError, match=r"1 question\(s\) not in .*other_pool.jsonl .*export with the pool"):
        export(tmp_path / "db.sqlite", tmp_path / "other_pool.jsonl", tmp_path / "out")


def test_agreement_is_cohen_kappa_for_two_and_krippendorff_alpha_for_more():
    def votes(labels):
        return [Vote(f"q{i}", who, None, None, preference=lab) for who, row in labels.items() for i, lab in enumerate(row)]

    two = agreement(votes({"x": "AABB", "y": "AABA"}))
    assert two == {"shared_questions": 4, "agreement_measure": "cohen_kappa", "agreement": 0.5}
    # hand-computed nominal alpha: units {A,A,B} and {B,B,B} -> 1 - (2/6) / (16/30) = 0.375
    assert krippendorff_alpha([{"x": "A", "y": "A", "z": "B"}, {"x": "B", "y": "B", "z": "B"}]) == pytest.approx(0.375)
    three = agreement(votes({"x": "AB", "y": "AB", "z": "AB"}))
    assert three["agreement_measure"] == "krippendorff_alpha_nominal" and three["agreement"] == 1.0
    assert agreement(votes({"x": "AB"}))["agreement"] is None  # nothing shared


def test_adding_a_user_twice_or_with_a_bad_name_is_refused(tmp_path):
    add_user(tmp_path / "db.sqlite", "dr_a")
    with pytest.raises(AnnotationError, match="exists already"):
        add_user(tmp_path / "db.sqlite", "dr_a")
    with pytest.raises(AnnotationError, match="use letters"):
        add_user(tmp_path / "db.sqlite", "dr a; DROP TABLE")


# ---------------------------------------------------------------- a real browser

CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")
ELEMENT = "element-6066-11e4-a52e-4f735466cecf"  # the W3C WebDriver element key


class WebDriver:
    """Just enough of the W3C WebDriver protocol (spoken by Debian's chromium-driver) to click and type."""

    def __init__(self, profile):
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        self.proc = subprocess.Popen([CHROMEDRIVER, f"--port={port}"], stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL)
        self.base = f"http://127.0.0.1:{port}"
        self.opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        for _ in range(100):
            try:
                self.call("GET", "/status")
                break
            except OSError:
                time.sleep(0.1)
        args = ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                "--disable-quic", f"--user-data-dir={profile}", "--window-size=1366,900"]
        caps = {"capabilities": {"alwaysMatch": {"browserName": "chrome",
                                                 "goog:chromeOptions": {"binary": CHROMIUM, "args": args}}}}
        self.session = self.call("POST", "/session", caps)["sessionId"]

    def call(self, method, path, body=None):
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(self.base + path, data=data, method=method,
                                     headers={"Content-Type": "application/json"})
        with self.opener.open(req, timeout=60) as r:
            return json.loads(r.read())["value"]

    def s(self, method, path, body=None):
        return self.call(method, f"/session/{self.session}{path}", body)

    def get(self, url):
        self.s("POST", "/url", {"url": url})

    def find(self, css):
        return self.s("POST", "/element", {"using": "css selector", "value": css})[ELEMENT]

    def click(self, css):
        self.s("POST", f"/element/{self.find(css)}/click", {})

    def type(self, css, text):
        self.s("POST", f"/element/{self.find(css)}/value", {"text": text})

    def keys(self, text):  # key presses on the page, as an annotator types them
        actions = [a for ch in text for a in ({"type": "keyDown", "value": ch}, {"type": "keyUp", "value": ch})]
        self.s("POST", "/actions", {"actions": [{"type": "key", "id": "keyboard", "actions": actions}]})

    def text(self, css):
        return self.s("GET", f"/element/{self.find(css)}/text")

    def wait_text(self, css, expected, timeout=20):
        """The element's text once it contains `expected` (a key press may still be loading the next page)."""
        deadline, seen = time.time() + timeout, None
        while time.time() < deadline:
            try:
                seen = self.text(css)
                if expected in seen:
                    return seen
            except urllib.error.HTTPError:  # between pages: no such element yet
                pass
            time.sleep(0.1)
        raise AssertionError(f"{css} never showed {expected!r} (last seen: {seen!r})")

    def screenshot(self, path):
        path.write_bytes(base64.b64decode(self.s("GET", "/screenshot")))

    def quit(self):
        try:
            self.s("DELETE", "")
        finally:
            self.proc.terminate()
            self.proc.wait(10)


@pytest.mark.skipif(not (CHROMIUM and CHROMEDRIVER) and not os.environ.get("VITAL_REQUIRE_BROWSER"),
                    reason="needs Debian chromium + chromium-driver (make test installs them)")
def test_a_clinician_annotates_three_items_in_headless_chromium(serve, pool, tmp_path):
    assert CHROMIUM and CHROMEDRIVER, "chromium and chromium-driver are missing: run `make test`, which installs them"
    path, _, items = pool
    token = add_user(tmp_path / "db.sqlite", "dr_lee")
    s = serve(overlap=1)
    browser = WebDriver(tmp_path / "profile")
    try:
        browser.get(s.url + "/")
        browser.type("#token", token)
        browser.click("#signin")
        browser.wait_text("#progress", "0 / 6 done")
        browser.click("#a-ok")  # 1: with clicks
        browser.click("#b-no")
        browser.type("#comment", "B is generic")
        browser.screenshot(tmp_path / "annotate.png")
        shot = os.environ.get("VITAL_SCREENSHOT")
        if shot:  # to look at it: VITAL_SCREENSHOT=/tmp/annotate.png pytest -k chromium
            shutil.copy(tmp_path / "annotate.png", shot)
        browser.click("#save")
        browser.wait_text("#question", items[1].question)
        browser.keys("23")  # 2: with keys: A not acceptable, B acceptable, Enter saves
        browser.keys("\ue007")
        browser.wait_text("#progress", "2 / 6 done")
        browser.wait_text("#question", items[2].question)
        browser.keys("td")  # 3: a tie, and the conversation flagged as a demonstration
        browser.keys("\ue007")
        browser.wait_text("#progress", "3 / 6 done")
    finally:
        browser.quit()
    assert (tmp_path / "annotate.png").read_bytes()[:4] == b"\x89PNG"

    export(tmp_path / "db.sqlite", path, tmp_path / "out")
    votes = [(v["question_id"], v["a_acceptable"], v["b_acceptable"], v["preference"], v["note"])
             for v in read_jsonl(tmp_path / "out/clinician.jsonl")]
    assert votes == [(items[0].question_id, True, False, None, "B is generic"),
                     (items[1].question_id, False, True, None, ""),
                     (items[2].question_id, None, None, "tie", "")]
    assert [d["id"] for d in read_jsonl(tmp_path / "out/demos.jsonl")] == [f"demo-{items[2].figure_id}"]


def test_vital_annotate_serve_starts_the_app_from_the_command_line(pool, tmp_path):
    path, image_dir, _ = pool
    vital = Path(sys.executable).parent / "vital"  # this venv's command
    proc = subprocess.Popen([str(vital), "annotate", "serve", "--pool", str(path), "--db", str(tmp_path / "db.sqlite"),
                             "--images", str(image_dir), "--conversations", "", "--port", "0"],
                            stdout=subprocess.PIPE, text=True)
    threading.Timer(60, proc.kill).start()  # never hang the suite
    try:
        url = re.search(r"http://\S+/", proc.stdout.readline()).group(0)
        status, body = Annotator(url.rstrip("/")).request("/")
        assert status == 200 and b"Sign in" in body
    finally:
        proc.terminate()
        proc.wait(10)


def test_a_bad_pool_file_is_refused_with_file_and_line(pool, tmp_path):
    path, image_dir, items = pool
    write_jsonl(tmp_path / "dup.jsonl", [items[0], items[1], items[0]])
    with pytest.raises(AnnotationError, match=r"dup.jsonl:3: question .* appears twice"):
        App(tmp_path / "dup.jsonl", tmp_path / "db.sqlite", image_dir)
    (tmp_path / "old.jsonl").write_text('{"question_id": "q0", "question": "an older pool format"}\n')
    with pytest.raises(AnnotationError, match=r"old.jsonl:1: not a pool item"):
        App(tmp_path / "old.jsonl", tmp_path / "db.sqlite", image_dir)


def test_behind_a_proxy_only_the_public_origin_may_post(pool, tmp_path):
    path, image_dir, _ = pool
    token = add_user(tmp_path / "db.sqlite", "dr_a")
    s = Server(App(path, tmp_path / "db.sqlite", image_dir, public_origin="https://annotate.example.org/"))
    try:
        dr = Annotator(s.url)
        assert dr.request("/login", {"token": token}, {"Origin": s.url})[0] == 403  # the proxy's Host is not it
        assert dr.request("/login", {"token": token}, {"Origin": "https://annotate.example.org"})[0] == 200
    finally:
        s.close()


# ---------------------------------------------------------------- export never loses clinicians' votes

def _votes(db, items, annotator="dr_a"):
    """Votes straight into the database, as the app writes them."""
    from vital.preferences import answers_hash
    conn = connect(db)
    with conn:
        for i in items:
            conn.execute("INSERT OR REPLACE INTO votes VALUES (?, ?, 1, 0, NULL, '', ?, '2024-01-01T00:00:00+00:00')",
                         (i.question_id, annotator, answers_hash(i)))
    conn.close()


def _export(path, db, out, *extra):
    return CliRunner().invoke(cli, ["annotate", "export", "--db", str(db), "--pool", str(path), "--out", str(out),
                                    *extra])


def test_export_with_a_mistyped_database_creates_nothing_and_keeps_the_votes(pool, tmp_path):
    path, _, items = pool
    _votes(tmp_path / "db.sqlite", items[:3])
    assert _export(path, tmp_path / "db.sqlite", tmp_path / "out").exit_code == 0
    before = (tmp_path / "out/clinician.jsonl").read_bytes()
    result = _export(path, tmp_path / "db.sqlte", tmp_path / "out")  # the typo
    assert result.exit_code == 2
    assert result.output.strip() == (f"error: {tmp_path / 'db.sqlte'}: no such annotation database (nothing was "
                                     "written); pass --db with the file that `vital annotate serve` and `add-user` use")
    assert not (tmp_path / "db.sqlte").exists() and (tmp_path / "out/clinician.jsonl").read_bytes() == before
    (tmp_path / "junk.sqlite").write_text("not a database")
    result = _export(path, tmp_path / "junk.sqlite", tmp_path / "out")
    assert result.exit_code == 2 and "not an annotation database" in result.output


def test_export_refuses_to_replace_more_votes_with_fewer_unless_forced(pool, tmp_path):
    path, _, items = pool
    _votes(tmp_path / "full.sqlite", items[:4])
    _votes(tmp_path / "partial.sqlite", items[:1])
    assert _export(path, tmp_path / "full.sqlite", tmp_path / "out").exit_code == 0
    before = (tmp_path / "out/clinician.jsonl").read_bytes()
    result = _export(path, tmp_path / "partial.sqlite", tmp_path / "out")
    assert result.exit_code == 2
    assert result.output.strip() == (f"error: {tmp_path / 'out/clinician.jsonl'} holds 4 votes; this export of "
                                     f"{tmp_path / 'partial.sqlite'} would write 1. Nothing was written: check --db "
                                     "and --pool, or pass --force to overwrite")
    assert (tmp_path / "out/clinician.jsonl").read_bytes() == before  # unchanged
    with pytest.raises(AnnotationError, match="holds 4 votes"):
        export(tmp_path / "partial.sqlite", path, tmp_path / "out")

    result = _export(path, tmp_path / "partial.sqlite", tmp_path / "out", "--force")
    assert result.exit_code == 0 and "1 votes by 1 annotators" in result.output
    assert len(list(read_jsonl(tmp_path / "out/clinician.jsonl"))) == 1


def test_export_with_as_many_or_more_votes_replaces_the_file(pool, tmp_path):
    path, _, items = pool
    db = tmp_path / "db.sqlite"
    _votes(db, items[:2])
    assert _export(path, db, tmp_path / "out").exit_code == 0
    assert _export(path, db, tmp_path / "out").exit_code == 0  # the same votes again
    _votes(db, items[:5], annotator="dr_b")
    result = _export(path, db, tmp_path / "out")
    assert result.exit_code == 0, result.output
    assert len(list(read_jsonl(tmp_path / "out/clinician.jsonl"))) == 7


def test_export_refuses_to_replace_demonstrations_with_fewer(pool, tmp_path):
    path, _, items = pool
    db = tmp_path / "db.sqlite"
    _votes(db, items[:2])
    write_jsonl(tmp_path / "out/demos.jsonl", [{"id": "demo-kept-by-hand"}])
    result = _export(path, db, tmp_path / "out")
    assert result.exit_code == 2 and "demos.jsonl holds 1 demonstrations" in result.output
    assert not (tmp_path / "out/clinician.jsonl").exists()  # nothing written, not even the votes
    assert _export(path, db, tmp_path / "out", "--force").exit_code == 0
