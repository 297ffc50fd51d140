"""Real HTTP servers on 127.0.0.1 for the tests and the benchmark (stdlib only).

- `FakeOpenAIServer`: an OpenAI-compatible `/v1/chat/completions` endpoint with canned
  structured answers (`okedit_responder`), per-request latency and injectable faults
  (429 with retry-after, 500, timeouts, malformed JSON, refusals, truncation, content
  filter, no JSON-schema support). It counts every request and every distinct request body,
  so tests can prove that a warm cache sends nothing and a re-run repeats nothing; it logs
  the usage it returned (the truth the client's accounting must equal), request arrival
  times and the most requests it had in flight at once.
  It also speaks the Files + Batches API (upload, create, poll, download) for batch mode.
- `FakeImageServer`: serves fixed routes (good JPEGs, corrupt bytes, wrong content-type,
  oversized bodies, 404, slow answers) and counts hits per path.

Import with `from tests.fixtures_servers import ...`.
"""

from __future__ import annotations

import email.policy
import hashlib
import io
import json
import random
import re
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from email.parser import BytesParser
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from PIL import Image

Responder = Callable[[dict[str, Any]], str]
FaultPlan = Callable[[int, dict[str, Any]], "str | None"]

FAULTS = (
    "429",
    "500",
    "timeout",
    "malformed",
    "not_json",
    "refusal",
    "length",
    "content_filter",
    "400",
    "401",
)


# --------------------------------------------------------------------------- helpers


class QuietHTTPServer(ThreadingHTTPServer):
    """No tracebacks when a client hangs up early (timeouts are part of the tests)."""

    daemon_threads = True

    def handle_error(self, request: Any, client_address: Any) -> None:
        if isinstance(sys.exc_info()[1], ConnectionError):
            return
        super().handle_error(request, client_address)


def canonical_hash(body: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def schema_name(body: dict[str, Any]) -> str:
    """Which structured answer is asked for: the JSON-schema name, or the schema's title
    quoted in the system message (json_object mode)."""
    fmt = body.get("response_format") or {}
    if fmt.get("type") == "json_schema":
        return str(fmt["json_schema"]["name"])
    for message in body.get("messages", []):
        content = message.get("content") or ""
        marker = "JSON schema: "
        if marker in content:
            schema = json.loads(content.split(marker, 1)[1])
            return str(schema.get("title", ""))
    return ""


def _field(text: str, label: str) -> str:
    match = re.search(rf"^{re.escape(label)}:\s*(.*)$", text, flags=re.MULTILINE)
    return match.group(1).strip() if match else ""


def _user_text(body: dict[str, Any]) -> str:
    return "\n".join(m.get("content") or "" for m in body["messages"] if m["role"] == "user")


POOL = ["apple", "zebra", "tokyo", "violin", "granite", "saturn", "copper", "maple", "walrus"]


def _pick(question: str, avoid: set[str], count: int) -> list[str]:
    start = int(hashlib.md5(question.encode()).hexdigest(), 16) % len(POOL)
    ordered = POOL[start:] + POOL[:start]
    return [w for w in ordered if w not in avoid][:count]


# image-free general-knowledge pairs (EasyEdit's `loc`) the fake LLM answers with
GENERAL_FACTS = [
    ("What is the chemical symbol for gold?", "au"),
    ("Who wrote the play Romeo and Juliet?", "william shakespeare"),
    ("What is the capital city of Australia?", "canberra"),
    ("How many continents are there on Earth?", "seven"),
    ("Which planet is known as the red planet?", "mars"),
    ("In which year did the Berlin Wall fall?", "1989"),
]


def okedit_responder(body: dict[str, Any]) -> str:
    """Deterministic, valid answers to okedit's prompts (see pipeline/prompts)."""
    text = _user_text(body)
    question = _field(text, "Question")
    answers = {a.strip() for a in _field(text, "Answers").split(";") if a.strip()}
    answer = _field(text, "Answer") or next(iter(sorted(answers)), "")
    name = schema_name(body)
    seed = int(body.get("seed") or 0)
    if name == "ImageObjectOut":
        return json.dumps({"image_object": f"a photo of {answer}"})
    if name == "TargetOut":
        return json.dumps({"target": _pick(question, answers, 1)[0]})
    if name == "CounterfactTypeOut":
        vote = "text" if (seed // 1000) % 3 == 2 else "image-text"
        return json.dumps({"counterfact_type": vote, "reason": f"vote {seed // 1000}"})
    if name == "RephrasesOut":
        n_eval = int(_field(text, "Count") or 10)
        n_train = int(_field(text, "Training count") or 3)
        base = question.rstrip("?")
        return json.dumps(
            {
                "rephrases": [f"{base}, variant {i}?" for i in range(n_eval)],
                "rephrases_train": [f"{base}, training variant {i}?" for i in range(n_train)],
            }
        )
    if name == "LocalityOut":
        target = _field(text, "Counterfactual")
        c, d = _pick(question, answers | {target}, 2)
        return json.dumps({"locality_answer": c, "locality_answer_train": d})
    if name == "ImageFreeLocalityOut":
        taken = answers | {_field(text, "Counterfactual")}
        start = int(hashlib.md5(question.encode()).hexdigest(), 16) % len(GENERAL_FACTS)
        for q, a in GENERAL_FACTS[start:] + GENERAL_FACTS[:start]:
            if a not in taken:
                return json.dumps({"question": q, "answer": a})
    if name == "TextNegativesOut":
        k = int(_field(text, "Count") or 3)
        base = question.rstrip("?")
        negs = [{"question": f"{base} other fact {i}?", "answer": f"fact {i}"} for i in range(k)]
        return json.dumps({"text_negatives": negs})
    return json.dumps({"error": f"unknown schema {name!r}"})


def request_schema(body: dict[str, Any]) -> dict[str, Any]:
    """The JSON schema a request asks to follow (JSON-schema mode, or the schema quoted in
    the system message in json_object mode)."""
    fmt = body.get("response_format") or {}
    if fmt.get("type") == "json_schema":
        return dict(fmt["json_schema"]["schema"])
    for message in body.get("messages", []):
        content = message.get("content") or ""
        if "JSON schema: " in content:
            return dict(json.loads(content.split("JSON schema: ", 1)[1]))
    return {}


def schema_only_responder(default_count: int = 3) -> Responder:
    """A server that follows the JSON schema alone, as guided decoding does (vLLM, Ollama,
    strict structured outputs): every list gets the fewest items the schema allows
    (`minItems`, else `default_count`), whatever count the prompt asks for."""

    def respond(body: dict[str, Any]) -> str:
        data = json.loads(okedit_responder(body))
        base = _field(_user_text(body), "Question").rstrip("?")
        make = {
            "rephrases": lambda i: f"{base}, variant {i}?",
            "rephrases_train": lambda i: f"{base}, training variant {i}?",
            "text_negatives": lambda i: {"question": f"{base} other fact {i}?", "answer": f"f{i}"},
        }
        for name, prop in request_schema(body).get("properties", {}).items():
            if prop.get("type") == "array" and name in make:
                data[name] = [make[name](i) for i in range(prop.get("minItems", default_count))]
        return json.dumps(data)

    return respond


# --------------------------------------------------------------------------- fault plans


def faults_at(schedule: dict[int, str]) -> FaultPlan:
    """Fault by request number (0-based, counted at the server)."""
    return lambda index, _body: schedule.get(index)


def fault_for_schema(name: str, fault: str, times: int | None = None) -> FaultPlan:
    """The fault for requests asking for one schema (the first `times` of them, or all)."""
    seen = Counter[str]()
    lock = threading.Lock()

    def plan(_index: int, body: dict[str, Any]) -> str | None:
        if schema_name(body) != name:
            return None
        with lock:
            seen[name] += 1
            n = seen[name]
        return fault if times is None or n <= times else None

    return plan


def storm(p_429: float, p_500: float, p_malformed: float, seed: int = 0) -> FaultPlan:
    """Random faults with a seeded generator: 429, 500 or a malformed answer."""
    rng = random.Random(seed)
    lock = threading.Lock()

    def plan(_index: int, _body: dict[str, Any]) -> str | None:
        with lock:
            x = rng.random()
        if x < p_429:
            return "429"
        if x < p_429 + p_500:
            return "500"
        if x < p_429 + p_500 + p_malformed:
            return "malformed"
        return None

    return plan


# --------------------------------------------------------------------------- LLM server


@dataclass
class ServerLog:
    requests: int = 0
    completions: int = 0  # HTTP 200 answers
    prompt_tokens: int = 0  # the usage this server reported in its answers
    completion_tokens: int = 0
    faults: Counter[str] = field(default_factory=Counter)  # faults injected, by name
    in_flight: int = 0
    max_in_flight: int = 0  # the most chat requests it was answering at the same time
    arrivals: list[float] = field(default_factory=list)  # time.time() of each chat request
    statuses: Counter[int] = field(default_factory=Counter)
    bodies: Counter[str] = field(default_factory=Counter)  # canonical body hash -> count
    answered: Counter[str] = field(default_factory=Counter)  # ... of HTTP 200 answers (paid)
    schemas: Counter[str] = field(default_factory=Counter)
    auth_headers: set[str] = field(default_factory=set)
    queries: set[str] = field(default_factory=set)  # query strings of chat requests
    raw: list[dict[str, Any]] = field(default_factory=list)


class FakeOpenAIServer:
    def __init__(
        self,
        responder: Responder = okedit_responder,
        *,
        latency_s: float = 0.0,
        faults: FaultPlan | None = None,
        json_schema_supported: bool = True,
        retry_after_ms: int = 10,
        timeout_sleep_s: float = 1.5,
        keep_raw: bool = False,
        batch_polls_until_done: int = 2,
    ):
        self.responder = responder
        self.latency_s = latency_s
        self.faults = faults
        self.json_schema_supported = json_schema_supported
        self.retry_after_ms = retry_after_ms
        self.timeout_sleep_s = timeout_sleep_s
        self.keep_raw = keep_raw
        self.log = ServerLog()
        self.batch_store = BatchStore(self, batch_polls_until_done)
        self._lock = threading.Lock()
        self._httpd = QuietHTTPServer(("127.0.0.1", 0), _make_llm_handler(self))
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(target=self._httpd.serve_forever, args=(0.05,), daemon=True)

    @property
    def url(self) -> str:
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}/v1"

    def start(self) -> FakeOpenAIServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()

    def __enter__(self) -> FakeOpenAIServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def reset_log(self) -> None:
        with self._lock:
            self.log = ServerLog()

    def record(self, body: dict[str, Any], auth: str) -> int:
        with self._lock:
            index = self.log.requests
            self.log.requests += 1
            self.log.arrivals.append(time.time())
            self.log.bodies[canonical_hash(body)] += 1
            self.log.schemas[schema_name(body)] += 1
            self.log.auth_headers.add(auth)
            if self.keep_raw:
                self.log.raw.append(body)
            return index

    def count_status(self, status: int, body: dict[str, Any] | None = None) -> None:
        with self._lock:
            self.log.statuses[status] += 1
            if status == 200:
                self.log.completions += 1
                if body is not None:
                    self.log.answered[canonical_hash(body)] += 1

    def count_usage(self, usage: dict[str, int]) -> None:
        with self._lock:
            self.log.prompt_tokens += usage["prompt_tokens"]
            self.log.completion_tokens += usage["completion_tokens"]

    def count_fault(self, fault: str | None) -> None:
        if fault is not None:
            with self._lock:
                self.log.faults[fault] += 1

    @contextmanager
    def busy(self) -> Iterator[None]:
        """One chat request being answered (for `max_in_flight`)."""
        with self._lock:
            self.log.in_flight += 1
            self.log.max_in_flight = max(self.log.max_in_flight, self.log.in_flight)
        try:
            yield
        finally:
            with self._lock:
                self.log.in_flight -= 1


def completion_json(
    content: str | None,
    *,
    model: str,
    finish_reason: str = "stop",
    refusal: str | None = None,
    prompt_tokens: int = 0,
) -> dict[str, Any]:
    completion_tokens = len(content or "") // 4 + 1
    return {
        "id": f"chatcmpl-{random.randrange(1 << 30)}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [
            {
                "index": 0,
                "finish_reason": finish_reason,
                "message": {"role": "assistant", "content": content, "refusal": refusal},
            }
        ],
        "usage": {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
        },
    }


Reply = tuple[int, bytes, dict[str, str]]


def _error(status: int, message: str, headers: dict[str, str] | None = None) -> Reply:
    err = {"error": {"message": message, "type": "fake", "code": str(status)}}
    return status, json.dumps(err).encode(), headers or {}


def answer(server: FakeOpenAIServer, body: dict[str, Any], fault: str | None) -> Reply:
    """The server's reply to one chat-completion request (live or inside a batch)."""
    retry = {"retry-after-ms": str(server.retry_after_ms)}
    if fault == "429":
        return _error(429, "rate limited", retry)
    if fault == "500":
        return _error(500, "internal error", retry)
    if fault == "400":
        return _error(400, "bad request")
    if fault == "401":
        return _error(401, "invalid api key")
    if fault == "timeout":
        time.sleep(server.timeout_sleep_s)
    fmt = (body.get("response_format") or {}).get("type")
    if fmt == "json_schema" and not server.json_schema_supported:
        return _error(400, "response_format json_schema is not supported")
    if fault == "not_json":
        return 200, b"<html>502 proxy error</html>", {}
    model = str(body.get("model", ""))
    prompt_tokens = sum(len(m.get("content") or "") for m in body["messages"]) // 4
    content = server.responder(body)
    kwargs: dict[str, Any] = {"model": model, "prompt_tokens": prompt_tokens}
    if fault == "malformed":
        reply = completion_json('{"this is": not json', **kwargs)
    elif fault == "refusal":
        reply = completion_json(None, refusal="I can't help with that.", **kwargs)
    elif fault == "length":
        reply = completion_json(content[: len(content) // 2], finish_reason="length", **kwargs)
    elif fault == "content_filter":
        reply = completion_json(None, finish_reason="content_filter", **kwargs)
    else:
        reply = completion_json(content, **kwargs)
    server.count_usage(reply["usage"])
    return 200, json.dumps(reply).encode(), {}


def _multipart_file(content_type: str, payload: bytes) -> bytes:
    message = BytesParser(policy=email.policy.default).parsebytes(
        f"Content-Type: {content_type}\r\n\r\n".encode() + payload
    )
    for part in message.iter_parts():
        if part.get_param("name", header="content-disposition") == "file":
            return bytes(part.get_payload(decode=True) or b"")
    raise ValueError("no file part in the upload")


class BatchStore:
    """Files and batches of the fake Batch API; a batch completes on its n-th poll."""

    def __init__(self, server: FakeOpenAIServer, polls_until_done: int = 1):
        self.server = server
        self.polls_until_done = polls_until_done
        self.files: dict[str, bytes] = {}
        self.batches: dict[str, dict[str, Any]] = {}
        self.polls: Counter[str] = Counter()
        self._lock = threading.Lock()

    def add_file(self, data: bytes) -> dict[str, Any]:
        with self._lock:
            file_id = f"file-{len(self.files) + 1}"
            self.files[file_id] = data
        return {
            "id": file_id,
            "object": "file",
            "bytes": len(data),
            "created_at": int(time.time()),
            "filename": "upload.jsonl",
            "purpose": "batch",
            "status": "processed",
        }

    def create(self, body: dict[str, Any]) -> dict[str, Any]:
        with self._lock:
            batch_id = f"batch_{len(self.batches) + 1}"
            batch = {
                "id": batch_id,
                "object": "batch",
                "endpoint": body["endpoint"],
                "input_file_id": body["input_file_id"],
                "completion_window": body["completion_window"],
                "created_at": int(time.time()),
                "status": "validating",
            }
            self.batches[batch_id] = batch
        return dict(batch)

    def retrieve(self, batch_id: str) -> dict[str, Any] | None:
        with self._lock:
            batch = self.batches.get(batch_id)
            if batch is None:
                return None
            self.polls[batch_id] += 1
            done = self.polls[batch_id] >= self.polls_until_done
        if batch["status"] != "completed":
            if done:
                self._run(batch)
            else:
                batch["status"] = "in_progress"
        return dict(batch)

    def _run(self, batch: dict[str, Any]) -> None:
        out = []
        for line in self.files[batch["input_file_id"]].decode().splitlines():
            if not line.strip():
                continue
            request = json.loads(line)
            index = self.server.record(request["body"], "batch")
            fault = self.server.faults(index, request["body"]) if self.server.faults else None
            status, payload, _ = answer(self.server, request["body"], fault)
            self.server.count_status(status)
            try:
                parsed: Any = json.loads(payload)
            except ValueError:
                parsed = payload.decode()
            response = {"status_code": status, "request_id": f"req-{index}", "body": parsed}
            out.append(
                {"id": f"line-{index}", "custom_id": request["custom_id"], "response": response}
            )
        output = self.add_file("\n".join(json.dumps(o) for o in out).encode())
        count = len(out)
        batch.update(
            status="completed",
            output_file_id=output["id"],
            completed_at=int(time.time()),
            request_counts={"total": count, "completed": count, "failed": 0},
        )


def _make_llm_handler(server: FakeOpenAIServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        disable_nagle_algorithm = True  # headers and body are two writes: no 40 ms ACK wait

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
            return

        def _send(self, reply: Reply, content_type: str = "application/json") -> None:
            status, payload, headers = reply
            try:
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(payload)))
                for key, value in headers.items():
                    self.send_header(key, value)
                self.end_headers()
                self.wfile.write(payload)
            except (BrokenPipeError, ConnectionResetError):
                return  # the client gave up (timeout test)

        def _json(self, data: dict[str, Any] | None) -> None:
            if data is None:
                self._send(_error(404, f"no such object {self.path}"))
            else:
                self._send((200, json.dumps(data).encode(), {}))

        def do_POST(self) -> None:  # noqa: N802
            length = int(self.headers.get("Content-Length") or 0)
            raw = self.rfile.read(length)
            if len(raw) < length or not raw:
                return  # the client died mid-request (kill tests): nothing arrived to answer
            path, _, query = self.path.partition("?")
            if path.endswith("/chat/completions"):
                body = json.loads(raw or b"{}")
                index = server.record(body, self.headers.get("Authorization", ""))
                if query:
                    with server._lock:
                        server.log.queries.add(query)
                with server.busy():
                    if server.latency_s:
                        time.sleep(server.latency_s)
                    fault = server.faults(index, body) if server.faults else None
                    server.count_fault(fault)
                    reply = answer(server, body, fault)
                    server.count_status(reply[0], body)
                    return self._send(reply)
            if self.path.endswith("/files"):
                data = _multipart_file(self.headers["Content-Type"], raw)
                return self._json(server.batch_store.add_file(data))
            if self.path.endswith("/batches"):
                return self._json(server.batch_store.create(json.loads(raw)))
            return self._send(_error(404, f"no route {self.path}"))

        def do_GET(self) -> None:  # noqa: N802
            parts = self.path.strip("/").split("/")
            if len(parts) == 3 and parts[1] == "batches":
                return self._json(server.batch_store.retrieve(parts[2]))
            if len(parts) == 4 and parts[1] == "files" and parts[3] == "content":
                data = server.batch_store.files.get(parts[2])
                if data is None:
                    return self._json(None)
                return self._send((200, data, {}), "application/octet-stream")
            return self._send(_error(404, f"no route {self.path}"))

    return Handler


@contextmanager
def llm_server(**kwargs: Any) -> Iterator[FakeOpenAIServer]:
    server = FakeOpenAIServer(**kwargs).start()
    try:
        yield server
    finally:
        server.stop()


# --------------------------------------------------------------------------- image server


def make_jpeg(seed: int = 0, size: tuple[int, int] = (64, 48)) -> bytes:
    rng = random.Random(seed)
    img = Image.new("RGB", size, (rng.randrange(256), rng.randrange(256), rng.randrange(256)))
    for _ in range(5):
        x0, y0 = rng.randrange(size[0]), rng.randrange(size[1])
        color = (rng.randrange(256), rng.randrange(256), rng.randrange(256))
        img.paste(color, (x0, y0, min(size[0], x0 + 10), min(size[1], y0 + 10)))
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def make_png(size: tuple[int, int]) -> bytes:
    buf = io.BytesIO()
    Image.new("L", size, 0).save(buf, format="PNG", optimize=True)
    return buf.getvalue()


@dataclass(frozen=True)
class Route:
    body: bytes
    status: int = 200
    content_type: str = "image/jpeg"
    delay_s: float = 0.0
    fail_first: int = 0  # answer 503 to the first n requests


class FakeImageServer:
    def __init__(self, routes: dict[str, Route] | None = None):
        self.routes: dict[str, Route] = dict(routes or {})
        self.hits: Counter[str] = Counter()
        self._lock = threading.Lock()
        self._httpd = QuietHTTPServer(("127.0.0.1", 0), _make_image_handler(self))
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(target=self._httpd.serve_forever, args=(0.05,), daemon=True)

    @property
    def url(self) -> str:
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> FakeImageServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()

    def __enter__(self) -> FakeImageServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def hit(self, path: str) -> int:
        with self._lock:
            self.hits[path] += 1
            return self.hits[path]


def _make_image_handler(server: FakeImageServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        disable_nagle_algorithm = True  # headers and body are two writes: no 40 ms ACK wait

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
            return

        def do_GET(self) -> None:  # noqa: N802
            n = server.hit(self.path)
            route = server.routes.get(self.path)
            if route is None:
                return self._reply(404, b"not found", "text/plain")
            if route.delay_s:
                time.sleep(route.delay_s)
            if n <= route.fail_first:
                return self._reply(503, b"busy", "text/plain")
            return self._reply(route.status, route.body, route.content_type)

        def _reply(self, status: int, body: bytes, content_type: str) -> None:
            try:
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)
            except (BrokenPipeError, ConnectionResetError):
                return

    return Handler
