"""A local OpenAI-compatible server for tests, benchmarks and dry runs. It listens on 127.0.0.1 only.

    python -m vital.llm.fakeapi --port 8011 --latency 0.1 --fault-rate 0.2
    dvc exp run -S generate.backend=openai -S generate.base_url=http://127.0.0.1:8011/v1

It serves chat completions (text and image parts, optional JSON mode), files and batches. Replies come
from the offline backend, so they parse like a cooperative model's. With `fault_rate`, that share of
requests gets one fault drawn from `faults`: `429` (with Retry-After), `500`, `slow` (a reply after
`slow_s`, past a short client timeout), `garbage` (a non-JSON body), `truncated` (JSON cut in half),
`nonsense` (a well-formed reply whose text is not a conversation). In batches, a faulted line goes to
the error file. With `api_key` set, any other key gets the 401 a real server sends.
"""
from __future__ import annotations

import argparse
import email.parser
import email.policy
import hashlib
import json
import random
import socket
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

FAULTS = ("429", "500", "slow", "garbage", "truncated", "nonsense")


class FakeOpenAI:
    def __init__(self, latency: float = 0.0, fault_rate: float = 0.0, faults=FAULTS, seed: int = 0,
                 slow_s: float = 2.0, retry_after_ms: int = 50, batch_polls: int = 1, api_key: str | None = None,
                 port: int = 0):
        self.latency, self.fault_rate, self.faults, self.slow_s = latency, fault_rate, tuple(faults), slow_s
        self.retry_after_ms, self.batch_polls, self.api_key, self.port = retry_after_ms, batch_polls, api_key, port
        self.calls: Counter = Counter()  # "POST /v1/chat/completions" -> count
        self.log: list[dict] = []  # one row per chat request: time, request key, fault, task, image parts
        self.files: dict[str, bytes] = {}
        self.batches: dict[str, dict] = {}
        self._rng, self._lock, self._drawn = random.Random(seed), threading.Lock(), 0
        self._server = None

    # ------------------------------------------------------------ lifecycle

    def start(self) -> str:
        self.chat({"messages": [{"role": "user", "content": "Caption: warm-up"}]}, None)  # imports, before timing
        fake = self

        class Handler(_Handler):
            server_fake = fake

        self._server = _Server(("127.0.0.1", self.port), Handler)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self.base_url

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}/v1"

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def __enter__(self):
        self.start()
        return self

    def __exit__(self, *exc):
        self.stop()

    # ------------------------------------------------------------ behaviour

    def draw_fault(self) -> str | None:
        """Whether a request faults is random (seeded); which fault it gets goes round `faults` in turn."""
        with self._lock:
            if self._rng.random() < self.fault_rate:
                self._drawn += 1
                return self.faults[(self._drawn - 1) % len(self.faults)]
        return None

    def chat(self, body: dict, fault: str | None) -> dict:
        """A chat.completion object for a request body."""
        from .offline import OfflineBackend

        messages = body["messages"]
        task = task_of(messages)
        text = OfflineBackend().complete(messages, task)
        if fault == "nonsense":
            text = "Lorem ipsum dolor sit amet."
        elif task == "generate" and (body.get("response_format") or {}).get("type") == "json_object":
            from ..generate import parse_reply
            turns = parse_reply(text)
            text = json.dumps({"conversations": [{"question": turns[i]["value"], "answer": turns[i + 1]["value"]}
                                                 for i in range(0, len(turns), 2)]})
        prompt_tokens = len(json.dumps(messages)) // 4
        return {"id": "chatcmpl-" + _key(body)[:12], "object": "chat.completion", "created": int(time.time()),
                "model": body.get("model", "fake"),
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
                "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": len(text) // 4,
                          "total_tokens": prompt_tokens + len(text) // 4}}

    def run_batch(self, batch: dict) -> None:
        out, err = [], []
        for line in self.files[batch["input_file_id"]].decode().splitlines():
            req = json.loads(line)
            fault = self.draw_fault()
            if fault:
                err.append({"id": "req-" + req["custom_id"], "custom_id": req["custom_id"],
                            "response": {"status_code": 500, "body": {"error": {"message": "injected fault"}}},
                            "error": None})
            else:
                out.append({"id": "req-" + req["custom_id"], "custom_id": req["custom_id"], "error": None,
                            "response": {"status_code": 200, "request_id": "r", "body": self.chat(req["body"], None)}})
        for name, rows in (("output_file_id", out), ("error_file_id", err)):
            if rows:
                fid = f"file-{len(self.files)}"
                self.files[fid] = "".join(json.dumps(r) + "\n" for r in rows).encode()
                batch[name] = fid
        batch.update(status="completed", request_counts={"total": len(out) + len(err), "completed": len(out),
                                                          "failed": len(err)})


def task_of(messages: list[dict]) -> str:
    """Which of the project's requests this is, from its system prompt (the offline backend answers it)."""
    from .. import evaluate
    from ..pool import POOL_PROMPT
    from ..rate import RUBRIC

    system = messages[0]["content"] if messages and messages[0]["role"] == "system" else ""
    if system.startswith(POOL_PROMPT.split("{")[0]):
        return "pool"
    return {RUBRIC: "rate", evaluate.CHAT_JUDGE: "judge", evaluate.PAIRWISE: "pairwise",
            evaluate.VQA_PAIRWISE: "pairwise", evaluate.GRADER: "grade"}.get(system, "generate")


def _key(body: dict) -> str:
    return hashlib.sha256(json.dumps(body.get("messages"), sort_keys=True).encode()).hexdigest()


class _Server(ThreadingHTTPServer):
    request_queue_size = 256  # many clients connect at once

    def handle_error(self, request, client_address):
        import sys
        if not isinstance(sys.exc_info()[1], ConnectionError):  # a client that hung up is not news
            super().handle_error(request, client_address)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_fake: FakeOpenAI

    def setup(self):
        super().setup()
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # no Nagle delay on small replies

    def log_message(self, *args):  # quiet
        pass

    def _send(self, status: int, payload, headers: dict | None = None, raw: bytes | None = None) -> None:
        data = raw if raw is not None else json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json" if raw is None else "text/plain")
        self.send_header("Content-Length", str(len(data)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        try:
            self.wfile.write(data)
        except (BrokenPipeError, ConnectionResetError):  # the client gave up (timeout): as a real server sees it
            self.close_connection = True

    def _authorised(self) -> bool:
        key = self.server_fake.api_key
        given = self.headers.get("Authorization", "").removeprefix("Bearer ")
        if key is None or given == key:
            return True
        self._send(401, {"error": {"message": f"Incorrect API key provided: {given[:3]}***{given[-4:]}.",
                                   "type": "invalid_request_error", "code": "invalid_api_key"}})
        return False

    def _body(self) -> bytes:
        return self.rfile.read(int(self.headers.get("Content-Length", 0)))

    def do_POST(self):
        fake, path = self.server_fake, self.path.split("?")[0]
        body = self._body()
        fake.calls[f"POST {path}"] += 1
        if not self._authorised():
            return
        if path.endswith("/chat/completions"):
            req = json.loads(body)
            fault = fake.draw_fault()
            with fake._lock:
                fake.log.append({"t": time.monotonic(), "key": _key(req), "fault": fault,
                                 "task": task_of(req.get("messages") or []),
                                 "image_parts": sum(p.get("type") == "image_url" for m in req.get("messages") or []
                                                    if isinstance(m.get("content"), list) for p in m["content"])})
            time.sleep(fake.slow_s if fault == "slow" else fake.latency)
            if fault == "429":
                return self._send(429, {"error": {"message": "Rate limit reached", "type": "requests"}},
                                  {"retry-after-ms": str(fake.retry_after_ms),
                                   "retry-after": str(max(1, fake.retry_after_ms // 1000))})
            if fault == "500":
                return self._send(500, {"error": {"message": "The server had an error", "type": "server_error"}})
            if fault == "garbage":
                return self._send(200, None, raw=b"<html><body>502 Bad Gateway</body></html>")
            payload = fake.chat(req, fault)
            if fault == "truncated":
                data = json.dumps(payload).encode()
                return self._send(200, None, {"Content-Type": "application/json"}, raw=data[: len(data) // 2])
            return self._send(200, payload)
        if path.endswith("/files"):
            msg = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
                b"Content-Type: " + self.headers["Content-Type"].encode() + b"\r\n\r\n" + body)
            parts = {p.get_param("name", header="content-disposition"): p for p in msg.iter_parts()}
            fid = f"file-{len(fake.files)}"
            fake.files[fid] = parts["file"].get_payload(decode=True)
            return self._send(200, {"id": fid, "object": "file", "bytes": len(fake.files[fid]),
                                    "created_at": int(time.time()), "filename": parts["file"].get_filename(),
                                    "purpose": parts["purpose"].get_content().strip(), "status": "processed"})
        if path.endswith("/batches"):
            req = json.loads(body)
            bid = f"batch_{len(fake.batches)}"
            fake.batches[bid] = {"id": bid, "object": "batch", "endpoint": req["endpoint"],
                                 "input_file_id": req["input_file_id"], "completion_window": "24h",
                                 "status": "validating", "created_at": int(time.time()),
                                 "metadata": req.get("metadata"), "output_file_id": None, "error_file_id": None,
                                 "request_counts": {"total": 0, "completed": 0, "failed": 0}, "_polls": 0}
            return self._send(200, _public(fake.batches[bid]))
        self._send(404, {"error": {"message": f"no route {path}"}})

    def do_GET(self):
        fake, path = self.server_fake, self.path.split("?")[0]
        fake.calls[f"GET {path}"] += 1
        if not self._authorised():
            return
        parts = path.rstrip("/").split("/")
        if parts[-1] == "content" and parts[-2] in fake.files:
            return self._send(200, None, {"Content-Type": "application/octet-stream"}, raw=fake.files[parts[-2]])
        if parts[-1] == "batches":
            return self._send(200, {"object": "list", "data": [_public(b) for b in fake.batches.values()],
                                    "has_more": False})
        if parts[-1] in fake.batches:
            b = fake.batches[parts[-1]]
            b["_polls"] += 1
            if b["status"] not in ("completed", "failed") and b["_polls"] >= fake.batch_polls:
                fake.run_batch(b)
            elif b["status"] == "validating":
                b["status"] = "in_progress"
            return self._send(200, _public(b))
        self._send(404, {"error": {"message": f"no route {path}"}})


def _public(batch: dict) -> dict:
    return {k: v for k, v in batch.items() if not k.startswith("_")}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--port", type=int, default=8011)
    ap.add_argument("--latency", type=float, default=0.0)
    ap.add_argument("--fault-rate", type=float, default=0.0)
    ap.add_argument("--batch-polls", type=int, default=1)
    args = ap.parse_args()
    fake = FakeOpenAI(latency=args.latency, fault_rate=args.fault_rate, batch_polls=args.batch_polls,
                      port=args.port)
    print(fake.start(), flush=True)
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        fake.stop()


if __name__ == "__main__":
    main()
