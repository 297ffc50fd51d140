"""A real Prefect server on 127.0.0.1 and the processes around it (serve, workers, builds),
shared by the deployment, resume and scale-out tests.

The server starts once per test session (whichever test needs it first) in a private
PREFECT_HOME and stops at the end of the session. Every process a test starts is stopped by
its own PID, children (serve, workers, builds) before the server they talk to.

Import with `from tests.fixtures_prefect_server import ...`.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pyarrow.parquet as pq
import pytest

from pipeline.config import TINY_MODEL, BuildConfig

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
PREFECT = str(BIN / "prefect")

# One build for the resume and scale-out tests: 6 chunks of 2 items, so a kill can land
# between validate chunks and two shards get 3 chunks each.
SMALL_LIMIT, SMALL_CHUNK = 12, 2

BUILD_SCRIPT = """
import json, sys
from flows.build_okedit import build_okedit
from pipeline.config import BuildConfig
summary = build_okedit(config=BuildConfig.model_validate_json(sys.argv[1]))
print("OKEDIT-SUMMARY " + json.dumps(summary, default=str), flush=True)
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(check: Callable[[], bool], timeout: float, what: str, every: float = 0.25) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(every)
    raise TimeoutError(f"gave up after {timeout:.0f} s waiting for {what}")


def start(cmd: list[str], env: dict[str, str], log: Path, cwd: Path = REPO) -> subprocess.Popen:
    """Start a process in its own session (its children go with it) logging to `log`."""
    with log.open("ab") as sink:
        return subprocess.Popen(
            cmd, cwd=cwd, env=env, stdout=sink, stderr=subprocess.STDOUT, start_new_session=True
        )


def stop(proc: subprocess.Popen, grace_s: float = 10.0) -> None:
    """SIGTERM the process group we started (by its PID), SIGKILL it if it lingers."""
    if proc.poll() is not None:
        return
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(grace_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)


@dataclass
class PrefectServer:
    home: Path
    port: int
    proc: subprocess.Popen | None = None
    logs: Path = field(init=False)

    def __post_init__(self) -> None:
        self.logs = self.home / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/api"

    def env(self, **extra: str) -> dict[str, str]:
        """Environment of a client process (CLI, serve, worker, build) of this server."""
        env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "OPENAI_"))}
        env.update(
            PREFECT_HOME=str(self.home),
            PREFECT_API_URL=self.api_url,
            PREFECT_SERVER_ANALYTICS_ENABLED="false",
            PREFECT_SERVER_UI_ENABLED="false",
            PREFECT_LOGGING_LEVEL="INFO",
            PREFECT_RUNNER_POLL_FREQUENCY="1",  # serve: pick up a new run within ~1 s
            PREFECT_WORKER_QUERY_SECONDS="1",  # workers: likewise
            HF_HUB_OFFLINE="1",
            OMP_NUM_THREADS="1",  # 2 shared cores: spin-waiting threads only slow things down
            PYTHONPATH=str(REPO),
        )
        env.update(extra)
        return env

    def start(self) -> None:
        env = self.env()
        del env["PREFECT_API_URL"]  # the server itself is not a client
        # proactive automations (crash detection) evaluated every second, not every 5
        env["PREFECT_SERVER_EVENTS_PROACTIVE_GRANULARITY"] = "PT1S"
        # `prefect deployment run --watch` shows the run's logs (why it failed) only when the
        # server streams them (docs/deploy.md §1)
        env["PREFECT_SERVER_LOGS_STREAM_OUT_ENABLED"] = "true"
        env["PREFECT_SERVER_LOGS_STREAM_PUBLISHING_ENABLED"] = "true"
        cmd = [PREFECT, "server", "start", "--host", "127.0.0.1", "--port", str(self.port)]
        self.proc = start([*cmd, "--no-ui"], env, self.logs / "server.log")
        wait_for(self.healthy, 90, "the Prefect server")

    def healthy(self) -> bool:
        if self.proc is not None and self.proc.poll() is not None:
            raise RuntimeError(f"Prefect server exited; see {self.logs / 'server.log'}")
        try:
            return httpx.get(f"{self.api_url}/health", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    def get(self, path: str) -> httpx.Response:
        return self._request("GET", path)

    def post(self, path: str, body: dict) -> httpx.Response:
        return self._request("POST", path, json=body)

    def _request(self, method: str, path: str, **kwargs: object) -> httpx.Response:
        """A request to the test server, asked again while it answers 503: its SQLite
        database is busy when several flow runs write at once on a loaded machine."""
        for attempt in range(5):
            response = httpx.request(method, f"{self.api_url}{path}", timeout=10, **kwargs)
            if response.status_code != 503:
                break
            time.sleep(0.5 * 2**attempt)
        return response

    def delete_automations(self, name: str) -> None:
        """Remove the automations called `name` (what `okedit serve` and `prefect deploy`
        set up), so that a test's short crash window never applies to later tests' runs."""
        body = {"automations": {"name": {"any_": [name]}}}
        for automation in self.post("/automations/filter", body).json():
            httpx.delete(f"{self.api_url}/automations/{automation['id']}", timeout=10)

    def cli(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        return subprocess.run(
            [PREFECT, *args],
            cwd=REPO,
            env=self.env(),
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    def stop(self) -> None:
        if self.proc is not None:
            stop(self.proc, grace_s=15)


_SERVER: PrefectServer | None = None


@pytest.fixture(scope="session")
def prefect_server(tmp_path_factory) -> Iterator[PrefectServer]:
    """One real server per session, even when several test modules import this fixture."""
    global _SERVER
    if _SERVER is None:
        server = PrefectServer(tmp_path_factory.mktemp("prefect-server"), free_port())
        server.start()
        _SERVER = server
    yield _SERVER
    # Each importing module gets its own session-scoped copy of this fixture; all of them
    # finish at session end, where stopping twice is harmless.
    _SERVER.stop()


# ---- the validation model and the small build ----------------------------------------


_MODEL: str | None = None


@pytest.fixture(scope="session")
def validation_model(tmp_path_factory) -> str:
    """The shipped tiny flagworld VLM, or (while it is not there) an untrained model of the
    same architecture and vocabulary: the orchestration tests need a real, fast model, not
    a good one."""
    global _MODEL
    if _MODEL is None:
        from pipeline.tiny_model import default_model_dir

        if (default_model_dir() / "model.safetensors").exists():
            _MODEL = TINY_MODEL
        else:
            from editors.tiny_vlm import build_tiny_llava, okedit_meta, save_tiny_vlm
            from pipeline.tiny_model import build_flagworld_tokenizer_and_processor

            processor = build_flagworld_tokenizer_and_processor()
            model = build_tiny_llava(processor.tokenizer, seed=0)
            # "tiny-flagworld" in the name selects the tiny model's edit preset
            path = tmp_path_factory.mktemp("model") / "tiny-flagworld-untrained"
            save_tiny_vlm(model, processor, path, okedit_meta(processor))
            _MODEL = str(path)
    return _MODEL


def small_config(out: Path, model: str, **updates) -> BuildConfig:
    cfg = BuildConfig(
        limit=SMALL_LIMIT, chunk_size=SMALL_CHUNK, out=out, validation={"model": model}
    )
    return cfg.model_copy(update=updates)


def build_command(cfg: BuildConfig) -> list[str]:
    return [sys.executable, "-c", BUILD_SCRIPT, cfg.model_dump_json()]


def run_build(server: PrefectServer, cfg: BuildConfig, log: Path, timeout: float = 240) -> dict:
    """A build in its own process against `server`; returns its summary."""
    proc = start(build_command(cfg), server.env(), log)
    try:
        rc = proc.wait(timeout)
    finally:
        stop(proc)
    text = log.read_text()
    assert rc == 0, f"build failed (rc {rc}):\n{text[-4000:]}"
    line = next(x for x in text.splitlines() if x.startswith("OKEDIT-SUMMARY "))
    return json.loads(line.removeprefix("OKEDIT-SUMMARY "))


def dataset_rows(out: Path) -> list[tuple[str, str]]:
    """(item id, validation verdict) of every published row, in order."""
    rows = []
    for shard in sorted((out / "data").glob("*.parquet")):
        table = pq.read_table(shard, columns=["item_id", "validation"]).to_pylist()
        rows += [(r["item_id"], r["validation"]["verdict"]) for r in table]
    return rows


_REFERENCE: tuple[BuildConfig, dict] | None = None


@pytest.fixture(scope="session")
def reference_build(prefect_server, validation_model, tmp_path_factory) -> tuple[BuildConfig, dict]:
    """The small build, uninterrupted and unsharded: what resumed and sharded builds must equal."""
    global _REFERENCE
    if _REFERENCE is None:
        out = tmp_path_factory.mktemp("reference") / "okedit"
        cfg = small_config(out, validation_model)
        summary = run_build(prefect_server, cfg, prefect_server.logs / "reference-build.log")
        _REFERENCE = (cfg, summary)
    return _REFERENCE
