"""Ctrl-C stops a build (issue 16, part 1).

`okedit build` runs as a subprocess on its own embedded Prefect API, annotating with the
LLM annotator against the loopback OpenAI-compatible server (200 ms per answer). After 20
requests it gets SIGINT to its whole process group (Ctrl-C in a terminal: the embedded API
server gets it too) or SIGTERM to the okedit process alone. Then: it exits within 10 s with
one line saying how to resume, sends no request decided after the signal (at most the
`--llm-concurrency` requests already on their way), leaves no process of its group behind,
and the same command run again finishes the build without paying for any answer twice.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.fixtures_servers import llm_server

OKEDIT = str(Path(sys.executable).parent / "okedit")
CONCURRENCY = 2
ITEMS = 12  # about 10 requests each: 120 requests, 12 s at 2 x 200 ms
SIGNAL_AFTER = 20


@pytest.fixture(scope="module")
def prefect_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One embedded-API database for the module's builds (migrated once)."""
    return tmp_path_factory.mktemp("prefect-home")


def env_for(prefect_home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OPENAI_", "PREFECT_API"))}
    env.update(
        PREFECT_HOME=str(prefect_home),
        PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS="90",
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        HF_HUB_OFFLINE="1",
    )
    return env


def group_members(pgid: int) -> list[str]:
    """`pid cmdline` of every live process in process group `pgid` (a /proc scan)."""
    members = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            cmd = (stat.parent / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except (OSError, IndexError):
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            members.append(f"{stat.parent.name} {cmd}")
    return members


@pytest.mark.parametrize(
    "sig, to_group",
    [(signal.SIGINT, True), (signal.SIGTERM, False)],
    ids=["sigint-to-group", "sigterm-to-process"],
)
def test_signal_stops_the_build_and_a_rerun_repays_nothing(
    sig: signal.Signals, to_group: bool, prefect_home: Path, tmp_path: Path
) -> None:
    out = tmp_path / "okedit"
    command = [
        OKEDIT,
        *("build", "--annotator", "llm", "--limit", str(ITEMS), "--chunk-size", "4"),
        *("--llm-concurrency", str(CONCURRENCY), "--no-validate", "--out", str(out)),
    ]
    env = env_for(prefect_home)
    with llm_server(latency_s=0.2) as llm:
        command += ["--llm-base-url", llm.url]
        stderr_log = tmp_path / "stderr.log"
        proc = subprocess.Popen(
            command,
            cwd=tmp_path,  # the request cache (.okedit-cache) stays here, for the re-run
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=stderr_log.open("w"),  # a file: a process left behind cannot hold it up
            start_new_session=True,  # its own process group, as a terminal gives it
        )
        try:
            deadline = time.monotonic() + 240
            while llm.log.requests < SIGNAL_AFTER and proc.poll() is None:
                assert time.monotonic() < deadline, "the build sent no requests"
                time.sleep(0.005)
            assert proc.poll() is None, stderr_log.read_text()
            signalled_at = time.time()
            (os.killpg if to_group else os.kill)(proc.pid, sig)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pytest.fail("the build did not exit within 10 s of the signal")
            exit_s = time.time() - signalled_at
            left = group_members(proc.pid)
        finally:
            with contextlib.suppress(ProcessLookupError):  # whatever is left of the group
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        stderr = stderr_log.read_text()
        late = [t for t in llm.log.arrivals if t > signalled_at]
        first_run = llm.log.requests
        paid_before = dict(llm.log.answered)
        print(
            f"{sig.name}: exit {exit_s:.2f} s after the signal, {len(late)} requests "
            f"after it, {first_run} in all"
        )
        assert proc.returncode == 128 + sig
        assert exit_s < 10
        # no request sent once the build was told to stop; those already decided (at most
        # one per concurrency slot) may still arrive
        assert len(late) <= CONCURRENCY, f"{len(late)} requests after the signal"
        assert first_run < ITEMS * 8, "the build ran to its end before the signal"
        assert left == []  # the embedded Prefect API server included
        resume = [line for line in stderr.splitlines() if "resume" in line]
        assert len(resume) == 1, stderr
        assert resume[0].endswith(" ".join(["okedit", *command[1:]])), resume[0]
        assert "Traceback" not in stderr
        assert not (out / "manifest.json").exists()

        # the same command again: resumes, pays for no answer twice, finishes
        again = subprocess.run(
            command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=400
        )
        assert again.returncode == 0, again.stderr[-3000:]
        # (two items may ask the very same question at the same moment: that is no repay)
        repaid = [h for h, n in paid_before.items() if llm.log.answered[h] > n]
        print(f"re-run: {llm.log.requests - first_run} requests, {len(repaid)} repaid")
    assert repaid == []
    manifest = json.loads((out / "manifest.json").read_text())
    counts = manifest["counts"]
    assert counts["in"] == ITEMS == counts["published"] + counts["rejected"]
