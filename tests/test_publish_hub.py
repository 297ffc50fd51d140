"""Hub publishing against a fake `HfApi` at our boundary (the Hub is unreachable here)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest

from pipeline.publish import HubPublishError, publish_local, push_to_hub
from tests.records import make_record


@dataclass
class _PathInfo:
    path: str
    size: int


class FakeHub:
    """Keeps uploaded files in memory, the way the Hub would, and logs each call."""

    def __init__(self, drop: str | None = None) -> None:
        self.files: dict[str, bytes] = {}
        self.calls: list[str] = []
        self.drop = drop  # a file the fake "loses", to exercise verification

    def create_repo(self, repo_id, **kwargs):
        self.calls.append("create_repo")

    def create_branch(self, repo_id, **kwargs):
        self.calls.append(f"create_branch:{kwargs['branch']}")

    def upload_folder(self, *, folder_path, allow_patterns, delete_patterns, **kwargs):
        self.calls.append("upload_folder")
        for stale in [p for p in self.files if Path(p).match(delete_patterns[0])]:
            del self.files[stale]
        root = Path(folder_path)
        for pattern in allow_patterns:
            for path in root.glob(pattern):
                rel = path.relative_to(root).as_posix()
                if path.is_file() and rel != self.drop:
                    self.files[rel] = path.read_bytes()

    def upload_file(self, *, path_or_fileobj, path_in_repo, **kwargs):
        self.calls.append(f"upload_file:{path_in_repo}")
        self.files[path_in_repo] = Path(path_or_fileobj).read_bytes()
        return type("Commit", (), {"commit_url": "https://hub.test/commit/abc"})()

    def list_repo_files(self, repo_id, **kwargs):
        return list(self.files)

    def get_paths_info(self, repo_id, paths, **kwargs):
        return [_PathInfo(p, len(self.files[p])) for p in paths if p in self.files]


@pytest.fixture()
def folder(tmp_path: Path) -> Path:
    out = tmp_path / "build"
    manifest = {
        "fingerprint": "f",
        "config": {"source": {"name": "flagworld"}, "images": {"backend": "render"}, "seed": 0},
        "annotator": "flagworld-offline",
        "counts": {"in": 2, "published": 2, "rejected": 0},
    }
    publish_local([make_record("a"), make_record("b")], [], out, manifest)
    return out


def test_push_data_then_card_and_verify(folder, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_secret_token_value")
    hub = FakeHub()
    result = push_to_hub(folder, "me/okedit", revision="v1", api=hub)
    assert hub.calls == [
        "create_repo",
        "create_branch:v1",
        "upload_folder",
        "upload_file:README.md",
    ]
    assert result["rows"] == 2 and result["commit_url"].endswith("/abc")
    assert "data/train-00000-of-00001.parquet" in hub.files
    assert "easyedit/okedit.json" in hub.files
    assert not any(p.startswith(".okedit") for p in hub.files)
    assert hub.files["README.md"].startswith(b"---\n")
    assert all(b"hf_secret_token_value" not in blob for blob in hub.files.values())


def test_missing_file_after_push_is_an_error(folder):
    with pytest.raises(HubPublishError, match="missing"):
        push_to_hub(folder, "me/okedit", api=FakeHub(drop="manifest.json"))


def test_incomplete_folder_is_refused(tmp_path):
    with pytest.raises(HubPublishError, match="manifest"):
        push_to_hub(tmp_path, "me/okedit", api=FakeHub())
