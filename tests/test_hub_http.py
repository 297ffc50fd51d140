"""The Hub push against a real (local) HTTP server: huggingface_hub's own client meets a
dropped connection, a 503, a 401/403/404 and offline mode; the flow's `publish-hub` task
retries what `is_transient_hub_error` calls transient and nothing else.

Only the first call of the push, `create_repo` (POST /api/repos/create), goes over HTTP;
the uploads and the verification go to the fake Hub of tests/test_publish_hub.py."""

from __future__ import annotations

import json
import socket
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx2
import huggingface_hub.constants
import pytest
from huggingface_hub import HfApi
from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled
from prefect import flow

import pipeline.publish
from flows import tasks
from pipeline.config import BuildConfig, resolve
from pipeline.publish import is_transient_hub_error
from tests.test_publish_hub import FakeHub, make_build

TOKEN = "hf_localtestTOKENnever_shown"
REPO = "me/okedit"


class HubServer:
    """A tiny Hub: answers each request with the next action of `script` (the last one
    repeats): "drop" closes the connection without a response, a number is that status."""

    def __init__(self, script: list[str | int]) -> None:
        self.script = list(script)
        self.requests: list[tuple[str, str, str]] = []  # method, path, Authorization
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def _answer(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                self.rfile.read(length)
                hub.requests.append((self.command, self.path, self.headers["Authorization"]))
                action = hub.script.pop(0) if len(hub.script) > 1 else hub.script[0]
                if action == "drop":
                    self.close_connection = True
                    return
                ok = action == 200
                body = {"url": f"{hub.url}/datasets/{REPO}"} if ok else {"error": "nope"}
                data = json.dumps(body).encode()
                self.send_response(int(action))
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = _answer

            def log_message(self, *args) -> None:  # quiet
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def creates(self) -> int:
        return sum(1 for method, path, _ in self.requests if path == "/api/repos/create")

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture()
def online(monkeypatch):
    """HF_HUB_OFFLINE off for this test only (huggingface_hub read it at import)."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)


@pytest.fixture()
def serve() -> Iterator:
    servers: list[HubServer] = []

    def start(script: list[str | int]) -> HubServer:
        servers.append(HubServer(script))
        return servers[-1]

    yield start
    for server in servers:
        server.close()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_the_client_raises_what_the_classifier_expects(online, serve):
    """Real errors from huggingface_hub's client, one per server answer."""
    server = serve(["drop", 503, 200])
    api = HfApi(endpoint=server.url, token=TOKEN)
    seen = []
    for _ in range(2):
        with pytest.raises(Exception) as failed:
            api.create_repo(REPO, repo_type="dataset", exist_ok=True)
        seen.append(failed.value)
    url = api.create_repo(REPO, repo_type="dataset", exist_ok=True)
    assert url.repo_id == REPO
    dropped, unavailable = seen
    assert isinstance(dropped, httpx2.TransportError)  # no OSError, no ConnectionError
    assert not isinstance(dropped, OSError)
    assert isinstance(unavailable, HfHubHTTPError) and unavailable.response.status_code == 503
    assert all(is_transient_hub_error(e) for e in seen)
    assert all(TOKEN not in f"{e} {e!r}" for e in seen)
    assert [auth for *_, auth in server.requests] == [f"Bearer {TOKEN}"] * 3

    refused = HfApi(endpoint=f"http://127.0.0.1:{_free_port()}", token=TOKEN)
    with pytest.raises(httpx2.ConnectError) as failed:
        refused.create_repo(REPO, repo_type="dataset", exist_ok=True)
    assert is_transient_hub_error(failed.value)


@pytest.mark.parametrize("status", [401, 403, 404])
def test_the_client_raises_permanent_errors_for_auth_and_missing(online, serve, status):
    server = serve([status])
    with pytest.raises(HfHubHTTPError) as failed:
        HfApi(endpoint=server.url, token=TOKEN).create_repo(REPO, repo_type="dataset")
    assert failed.value.response.status_code == status
    assert not is_transient_hub_error(failed.value)
    assert TOKEN not in str(failed.value)


def test_offline_mode_raises_before_any_request(serve):
    server = serve([200])
    assert huggingface_hub.constants.HF_HUB_OFFLINE  # tests run offline (conftest)
    with pytest.raises(OfflineModeIsEnabled) as failed:
        HfApi(endpoint=server.url, token=TOKEN).create_repo(REPO, repo_type="dataset")
    assert not is_transient_hub_error(failed.value) and server.requests == []


# ---- the flow's publish-hub task -----------------------------------------------------


@pytest.fixture(scope="module", autouse=True)
def _no_heartbeats(prefect_api):
    from prefect.settings import PREFECT_FLOWS_HEARTBEAT_FREQUENCY, temporary_settings

    with temporary_settings(updates={PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None}):
        yield


class ServerHub(FakeHub):
    """`create_repo` through the real client (`default_hub_api`: HF_ENDPOINT, HF_TOKEN);
    everything after it in memory."""

    def __init__(self, api: HfApi) -> None:
        super().__init__()
        self.api = api
        self.attempts = 0

    def create_repo(self, repo_id, **kwargs):
        self.attempts += 1
        super().create_repo(repo_id, **kwargs)
        return self.api.create_repo(repo_id, **kwargs)


@pytest.fixture()
def push(tmp_path, monkeypatch):
    """Runs the `publish-hub` task (no retry delay) in a flow against `url`; returns the
    task's final state, its result or exception, and the hub."""
    folder = make_build(tmp_path / "build")
    build = resolve(
        BuildConfig(out=folder, validation={"enabled": False}, publish={"repo_id": REPO})
    )
    task = tasks.publish_hub.with_options(retry_delay_seconds=0)

    def run(url: str) -> tuple[bool, object, ServerHub]:
        monkeypatch.setenv("HF_ENDPOINT", url)
        monkeypatch.setenv("HF_TOKEN", TOKEN)
        real_api = pipeline.publish.default_hub_api
        hub = ServerHub(real_api())
        monkeypatch.setattr(pipeline.publish, "default_hub_api", lambda: hub)
        outcome = {}

        @flow
        def push_flow() -> bool:
            state = task(build, return_state=True)
            outcome["value"] = state.result(raise_on_failure=False)
            return state.is_completed()

        completed = push_flow(return_state=True).result(raise_on_failure=False)
        return completed is True, outcome["value"], hub

    return run


def test_publish_task_retries_a_dropped_connection_and_a_503(online, serve, push):
    server = serve(["drop", 503, 200])
    completed, result, hub = push(server.url)
    assert completed, result
    assert server.creates() == 3 and hub.attempts == 3
    assert result["repo_id"] == REPO and result["verified"] == result["files"] > 0
    assert "README.md" in hub.files


@pytest.mark.parametrize("status", [401, 403, 404])
def test_publish_task_does_not_retry_auth_or_missing(online, serve, push, status):
    server = serve([status])
    completed, error, hub = push(server.url)
    assert not completed
    assert isinstance(error, HfHubHTTPError) and error.response.status_code == status
    assert server.creates() == 1 and hub.attempts == 1
    assert hub.calls == ["create_repo"]
    assert TOKEN not in str(error)


def test_publish_task_does_not_retry_offline_mode(serve, push):
    server = serve([200])
    completed, error, hub = push(server.url)
    assert not completed and isinstance(error, OfflineModeIsEnabled)
    assert hub.attempts == 1 and server.requests == []


def test_the_push_reads_hf_endpoint_when_it_runs(monkeypatch):
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    assert pipeline.publish.default_hub_api().endpoint == "http://127.0.0.1:9"
