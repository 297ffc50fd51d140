"""Build versions (issue 14 part 1): `out_root/<version>/` + `out_root/LATEST`, a no-op for a
build already complete and pushed, a new version beside the old one for other parameters."""

from __future__ import annotations

import json

import pytest

from flows.build_okedit import DEFAULT_ROOT, resolve_out_root
from pipeline import work
from pipeline.config import BuildConfig
from tests.test_publish_hub import FakeHub


@pytest.fixture(scope="module")
def runs(prefect_api, tmp_path_factory):
    """Same parameters twice, then another seed, then the first parameters again; every
    run pushes to a fake Hub (`me/ok`). Returns (root, [(summary, LATEST, hub calls, the
    files on the Hub's main after the run)])."""
    import pipeline.publish
    from flows.build_okedit import build_okedit

    hub = FakeHub()
    patch = pytest.MonkeyPatch()
    patch.setattr(pipeline.publish, "default_hub_api", lambda: hub)
    base = tmp_path_factory.mktemp("versions")
    root = base / "builds"
    config = BuildConfig(
        limit=2, chunk_size=2, cache_dir=base / "cache", validation={"enabled": False}
    ).model_dump(mode="json")
    config.pop("out")  # as a deployment run sends it: no `out`, so versions apply
    results = []
    try:
        for seed in (0, 0, 3, 0):
            before = len(hub.calls)
            summary = build_okedit(
                config=BuildConfig.model_validate(config),
                seed=seed,
                repo_id="me/ok",
                out_root=str(root),
            )
            main = dict(hub.branches["main"])
            results.append((summary, work.read_latest(root), hub.calls[before:], main))
    finally:
        patch.undo()
    return root, results


def test_same_parameters_twice_is_a_noop(runs):
    root, [(first, latest1, calls1, _), (second, latest2, calls2, _), *_] = runs
    assert first["noop"] is False and second["noop"] is True
    assert "pushed to me/ok@v-" in second["noop_reason"]
    assert first["version"] == second["version"] == latest1 == latest2
    version = first["version"]
    assert (root / version / "manifest.json").exists()
    manifest = json.loads((root / version / "manifest.json").read_text())
    assert manifest["fingerprint"] == version  # flagworld: no input files
    assert second["counts"] == first["counts"]
    assert f"create_branch:v-{version}" in calls1 and "upload_folder" in calls1
    assert calls2 == []  # nothing pushed again
    record = work.read_version_record(root / version)
    assert [p["revision"] for p in record["hub"]] == [f"v-{version}"]


def test_other_parameters_build_a_new_version_and_move_latest(runs):
    root, [(first, *_), _, (third, latest3, calls3, _), _] = runs
    assert third["noop"] is False and third["version"] != first["version"]
    assert latest3 == third["version"]
    assert f"create_branch:v-{third['version']}" in calls3
    assert (root / first["version"] / "manifest.json").exists()  # the old one stays
    assert (root / third["version"] / "manifest.json").exists()
    assert sorted(p.name for p in root.iterdir() if p.is_dir()) == sorted(
        [first["version"], third["version"]]
    )


def test_first_parameters_again_are_a_noop_and_move_latest_back(runs):
    root, [(first, *_), _, _, (fourth, latest4, calls4, _)] = runs
    assert fourth["noop"] is True and fourth["version"] == first["version"]
    assert latest4 == first["version"] == (root / "LATEST").read_text().strip()
    assert calls4 == []


def test_main_follows_each_verified_version(runs):
    root, [(first, _, calls1, main1), (_, _, _, main2), (third, _, calls3, main3), *_] = runs
    for summary, calls, main in ((first, calls1, main1), (third, calls3, main3)):
        version = summary["version"]
        # pushed to v-<version>, verified, then main = the same files
        assert calls.index(f"create_branch:v-{version}") < calls.index("upload_folder:main")
        assert summary["hub"]["main"].startswith("https://hub.test/commit/")
        assert json.loads(main["manifest.json"])["fingerprint"] == version
        assert (
            main["data/train-00000-of-00001.parquet"]
            == (root / version / "data" / "train-00000-of-00001.parquet").read_bytes()
        )
        record = work.read_version_record(root / version)
        assert record["hub"][-1]["main"] == summary["hub"]["main"]
    assert main2 == main1  # the no-op moved nothing


def test_main_stays_when_the_version_does_not_verify(prefect_api, tmp_path, monkeypatch):
    import pipeline.publish
    from flows.build_okedit import build_okedit

    hub = FakeHub(corrupt="manifest.json")
    hub.branches["main"] = {"README.md": b"the last verified build"}
    monkeypatch.setattr(pipeline.publish, "default_hub_api", lambda: hub)
    config = BuildConfig(
        limit=2, chunk_size=2, cache_dir=tmp_path / "cache", validation={"enabled": False}
    ).model_dump(mode="json")
    config.pop("out")
    state = build_okedit(
        config=BuildConfig.model_validate(config),
        repo_id="me/ok",
        out_root=str(tmp_path / "builds"),
        return_state=True,
    )
    assert state.is_failed() and "manifest.json" in state.message
    assert hub.branches["main"] == {"README.md": b"the last verified build"}
    assert "upload_folder:main" not in hub.calls
    assert work.read_latest(tmp_path / "builds") is None


def test_out_root_resolution(monkeypatch, tmp_path):
    monkeypatch.setenv("OKEDIT_HOME", str(tmp_path))
    assert resolve_out_root("/r", False, None) == __import__("pathlib").Path("/r")
    assert resolve_out_root(None, False, None) is None  # okedit build / a Python call
    assert resolve_out_root(None, True, "dep-id") is None  # -p out=...: one folder
    assert resolve_out_root(None, False, "dep-id") == tmp_path / DEFAULT_ROOT  # read now
    monkeypatch.delenv("OKEDIT_HOME")
    assert str(resolve_out_root(None, False, "dep-id")) == DEFAULT_ROOT
    with pytest.raises(ValueError, match="not both"):
        resolve_out_root("/r", True, None)


def test_version_is_done_needs_fingerprint_inputs_final_and_push(tmp_path):
    out = tmp_path / "v"
    summary = {"counts": {"in": 2, "published": 2, "rejected": 0}}
    assert work.version_is_done(work.read_version_record(out), "fp", {}, None) is None
    work.write_version_record(out, "fp", "fp", {}, summary)
    record = work.read_version_record(out)
    assert work.version_is_done(record, "fp", {}, None)
    assert work.version_is_done(record, "other", {}, None) is None
    assert work.version_is_done(record, "fp", {"questions": "x"}, None) is None
    assert work.version_is_done(record, "fp", {}, ("me/ok", "v-fp")) is None  # not pushed
    pushed = {"repo_id": "me/ok", "revision": "v-fp", "commit_url": "u"}
    record = work.write_version_record(out, "fp", "fp", {}, summary, pushed)
    assert work.version_is_done(record, "fp", {}, ("me/ok", "v-fp"))
    assert work.version_is_done(record, "fp", {}, ("me/other", "v-fp")) is None
    deferred = {"counts": {**summary["counts"], "deferred": 1}}
    record = work.write_version_record(out, "fp", "fp", {}, deferred)
    assert work.version_is_done(record, "fp", {}, None) is None  # a re-run retries them
    assert work.version_id("fp") == "fp" and work.version_id("fp", {"q": "h"}) != "fp"
