"""Hub publishing against a fake `HfApi` at our boundary (the Hub is unreachable here), and
which of huggingface_hub's and its HTTP client's real exceptions a retry can cure."""

from __future__ import annotations

import hashlib
import subprocess
from pathlib import Path

import httpx
import httpx2
import pytest
from huggingface_hub import errors as hf_errors
from huggingface_hub.hf_api import RepoFile
from huggingface_hub.utils import validate_repo_id
from huggingface_hub.utils.sha import git_hash

import pipeline.publish
from pipeline.publish import (
    HubPublishError,
    file_hashes,
    is_transient_hub_error,
    move_main,
    publish_local,
    push_to_hub,
)
from tests.records import make_record

# what the Hub stores through LFS by default (.gitattributes of a new dataset repo)
LFS_SUFFIXES = {".parquet", ".png", ".jpg", ".jpeg", ".webp"}


def _lfs_pointer(data: bytes) -> bytes:
    sha = hashlib.sha256(data).hexdigest()
    spec = "version https://git-lfs.github.com/spec/v1"
    return f"{spec}\noid sha256:{sha}\nsize {len(data)}\n".encode()


class FakeHub:
    """Keeps uploaded files in memory per branch, the way the Hub would, and logs each call.
    Paths info comes back as huggingface_hub's own `RepoFile`s with the hashes of the bytes
    stored: `lfs.sha256` for LFS files (whose `blob_id` is the pointer's), `blob_id` (git
    sha1) for the others. A new branch starts as a copy of `main`, as on the Hub."""

    def __init__(self, drop: str | None = None, corrupt: str | None = None) -> None:
        self.branches: dict[str, dict[str, bytes]] = {"main": {}}
        self.last = "main"  # the branch written last: what `files` shows
        self.calls: list[str] = []
        self.paths_info_batches: list[list[str]] = []
        self.drop = drop  # a file the fake "loses", to exercise verification
        self.corrupt = corrupt  # a file whose bytes change on the way

    @property
    def files(self) -> dict[str, bytes]:
        return self.branches[self.last]

    def _branch(self, revision: str | None) -> dict[str, bytes]:
        name = revision or "main"
        if name not in self.branches:
            request = httpx2.Request("POST", f"https://hub.test/api/commit/{name}")
            response = httpx2.Response(404, request=request)
            raise hf_errors.RevisionNotFoundError(f"{name} does not exist", response=response)
        self.last = name
        return self.branches[name]

    def _store(self, files: dict[str, bytes], path: str, data: bytes) -> None:
        if path == self.drop:
            return
        if path == self.corrupt:
            data = data[:-1] + bytes([data[-1] ^ 0x01])
        files[path] = data

    def create_repo(self, repo_id, **kwargs):
        self.calls.append("create_repo")

    def create_branch(self, repo_id, **kwargs):
        self.calls.append(f"create_branch:{kwargs['branch']}")
        self.branches.setdefault(kwargs["branch"], dict(self.branches["main"]))

    def upload_folder(self, *, folder_path, allow_patterns, delete_patterns, **kwargs):
        revision = kwargs.get("revision")
        self.calls.append("upload_folder" + (":main" if revision == "main" else ""))
        files = self._branch(revision)
        root = Path(folder_path)
        uploads = {
            path.relative_to(root).as_posix(): path
            for pattern in allow_patterns
            for path in root.glob(pattern)
            if path.is_file()
        }
        for stale in [p for p in files if p not in uploads]:  # as upload_folder deletes
            if any(Path(stale).match(pattern) for pattern in delete_patterns):
                del files[stale]
        for name, path in uploads.items():
            self._store(files, name, path.read_bytes())
        return _commit(revision)

    def upload_file(self, *, path_or_fileobj, path_in_repo, **kwargs):
        self.calls.append(f"upload_file:{path_in_repo}")
        files = self._branch(kwargs.get("revision"))
        self._store(files, path_in_repo, Path(path_or_fileobj).read_bytes())
        return _commit(kwargs.get("revision"), "abc")

    def get_paths_info(self, repo_id, paths, **kwargs):
        self.paths_info_batches.append(list(paths))
        files = self.branches[kwargs.get("revision") or "main"]
        return [self.repo_file(p, files) for p in paths if p in files]

    def repo_file(self, path: str, files: dict[str, bytes] | None = None) -> RepoFile:
        data = (self.files if files is None else files)[path]
        if Path(path).suffix in LFS_SUFFIXES:
            pointer = _lfs_pointer(data)
            lfs = {"size": len(data), "oid": hashlib.sha256(data).hexdigest()}
            return RepoFile(
                path=path,
                size=len(data),
                oid=git_hash(pointer),
                lfs={**lfs, "pointerSize": len(pointer)},
            )
        return RepoFile(path=path, size=len(data), oid=git_hash(data))


def _commit(revision: str | None, sha: str | None = None) -> object:
    url = f"https://hub.test/commit/{sha or (revision or 'main') + '-head'}"
    return type("Commit", (), {"commit_url": url})()


def make_build(out: Path) -> Path:
    """A small published folder (two records: parquet, images, EasyEdit JSON, card)."""
    manifest = {
        "fingerprint": "f",
        "config": {"source": {"name": "flagworld"}, "images": {"backend": "render"}, "seed": 0},
        "annotator": "flagworld-offline",
        "counts": {"in": 2, "published": 2, "rejected": 0},
    }
    publish_local([make_record("a"), make_record("b")], [], out, manifest)
    return out


@pytest.fixture()
def folder(tmp_path: Path) -> Path:
    return make_build(tmp_path / "build")


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
    # every pushed file was checked, LFS (sha256) and regular (git blob sha1) alike
    assert result["verified"] == result["files"] == len(hub.files)
    infos = [hub.repo_file(p) for p in hub.files]
    assert any(i.lfs for i in infos) and any(i.lfs is None for i in infos)


def test_a_version_branch_holds_this_build_only(folder):
    """A new branch starts as a copy of main; what an earlier build left there goes."""
    hub = FakeHub()
    old = {"data/train-00000-of-00003.parquet": b"x", "easyedit/images/zz.png": b"y"}
    hub.branches["main"] = {**old, ".gitattributes": b"*.parquet filter=lfs"}
    push_to_hub(folder, "me/okedit", revision="v-2", api=hub)
    assert not set(old) & set(hub.branches["v-2"]) and ".gitattributes" in hub.branches["v-2"]


def test_verification_asks_for_every_file_in_batches(folder, monkeypatch):
    monkeypatch.setattr(pipeline.publish, "PATHS_INFO_BATCH", 2)
    hub = FakeHub()
    result = push_to_hub(folder, "me/okedit", api=hub)
    asked = [p for batch in hub.paths_info_batches for p in batch]
    assert sorted(asked) == sorted(hub.files) and result["verified"] == len(hub.files)
    assert max(len(batch) for batch in hub.paths_info_batches) == 2


def test_missing_file_after_push_is_an_error(folder):
    with pytest.raises(HubPublishError, match=r"missing.*manifest\.json"):
        push_to_hub(folder, "me/okedit", api=FakeHub(drop="manifest.json"))


@pytest.mark.parametrize(
    "path",
    [
        "data/train-00000-of-00001.parquet",  # LFS: sha256
        "checks.parquet",
        "manifest.json",  # regular: git blob sha1
        "README.md",  # the card, pushed on its own
    ],
)
def test_a_corrupted_upload_fails_the_push_and_names_the_file(folder, path):
    hub = FakeHub(corrupt=path)
    with pytest.raises(HubPublishError, match="differ") as failed:
        push_to_hub(folder, "me/okedit", api=hub)
    assert path in str(failed.value)
    assert len(hub.files[path]) == (folder / path).stat().st_size  # same size, other bytes
    assert str(failed.value).count(": sha256") + str(failed.value).count(": git blob") == 1


def test_main_moves_to_the_verified_revision_and_drops_what_it_lacks(folder):
    hub = FakeHub()
    hub.branches["main"] = {"data/train-00000-of-00003.parquet": b"old", "README.md": b"old"}
    push_to_hub(folder, "me/okedit", revision="v-1", api=hub)
    assert hub.branches["main"]["README.md"] == b"old"  # the push alone leaves main alone
    asked_before = len(hub.paths_info_batches)
    result = move_main(folder, "me/okedit", "v-1", api=hub)
    assert hub.calls[-1] == "upload_folder:main"
    assert hub.branches["main"] == hub.branches["v-1"]  # the old shard and card are gone
    assert result["revision"] == "main" and result["from_revision"] == "v-1"
    assert result["verified"] == result["files"] == len(hub.branches["main"])
    # v-1 verified again before main moved, main verified after
    asked = hub.paths_info_batches[asked_before:]
    assert len(asked) == 2 and sorted(asked[0]) == sorted(asked[1]) == sorted(hub.files)


def test_main_is_not_moved_to_a_revision_that_does_not_verify(folder):
    hub = FakeHub()
    hub.branches["main"] = {"README.md": b"old"}
    push_to_hub(folder, "me/okedit", revision="v-1", api=hub)
    hub.branches["v-1"]["manifest.json"] += b" "  # changed after the push
    with pytest.raises(HubPublishError, match="manifest.json"):
        move_main(folder, "me/okedit", "v-1", api=hub)
    assert "upload_folder:main" not in hub.calls and hub.branches["main"] == {"README.md": b"old"}


def test_a_main_that_lands_wrong_fails(folder):
    hub = FakeHub()
    push_to_hub(folder, "me/okedit", revision="v-1", api=hub)
    hub.corrupt = "checks.parquet"  # only the upload to main is damaged
    with pytest.raises(HubPublishError, match="checks.parquet"):
        move_main(folder, "me/okedit", "v-1", api=hub)


def test_file_hashes_match_git_and_sha256(tmp_path):
    for i, data in enumerate([b"", b"hello\n", bytes(range(256)) * 5000]):
        path = tmp_path / f"f{i}"
        path.write_bytes(data)
        git = subprocess.run(
            ["git", "hash-object", str(path)], capture_output=True, text=True, check=True
        ).stdout.strip()
        assert file_hashes(path) == (hashlib.sha256(data).hexdigest(), git)


def test_incomplete_folder_is_refused(tmp_path):
    with pytest.raises(HubPublishError, match="manifest"):
        push_to_hub(tmp_path, "me/okedit", api=FakeHub())


# ---- transient or permanent: the client's real exception classes --------------------

URL = "https://huggingface.co/api/repos/create"


def _http_error(status: int, cls: type = hf_errors.HfHubHTTPError) -> Exception:
    """As `hf_raise_for_status` builds them: a message and the httpx2 response."""
    response = httpx2.Response(status, request=httpx2.Request("POST", URL))
    return cls(f"{status} Client Error.\n\nfor url: {URL}", response=response)


def _bad_repo_id() -> Exception:
    try:
        validate_repo_id("me/not a repo id!")
    except hf_errors.HFValidationError as exc:
        return exc
    raise AssertionError("validate_repo_id accepted a bad id")


def _chained(cause: Exception) -> Exception:
    try:
        try:
            raise cause
        except Exception as exc:
            raise RuntimeError("upload failed") from exc
    except RuntimeError as wrapped:
        return wrapped


REQUEST = httpx2.Request("POST", URL)

TRANSIENT = [
    httpx2.ConnectError("[Errno 111] Connection refused", request=REQUEST),
    httpx2.ConnectTimeout("timed out", request=REQUEST),
    httpx2.ReadTimeout("The read operation timed out", request=REQUEST),
    httpx2.WriteTimeout("timed out", request=REQUEST),
    httpx2.PoolTimeout("timed out", request=REQUEST),
    httpx2.ReadError("[Errno 104] Connection reset by peer", request=REQUEST),
    httpx2.WriteError("[Errno 32] Broken pipe", request=REQUEST),
    httpx2.RemoteProtocolError("Server disconnected without sending a response."),
    httpx2.ProxyError("502 from proxy"),
    httpx.ConnectError("[Errno 111] Connection refused"),  # huggingface_hub 1.x's client
    httpx.ReadTimeout("timed out"),
    _http_error(429),
    _http_error(408),
    _http_error(500),
    _http_error(502),
    _http_error(503),
    _http_error(504),
    ConnectionResetError("reset by peer"),
    TimeoutError("slow"),
    _chained(httpx2.ReadTimeout("timed out")),
]

PERMANENT = [
    hf_errors.OfflineModeIsEnabled("Cannot reach https://huggingface.co: offline mode"),
    _bad_repo_id(),
    hf_errors.LocalTokenNotFoundError("Token is required"),
    _http_error(401),
    _http_error(403),
    _http_error(404),
    _http_error(400, hf_errors.BadRequestError),
    _http_error(401, hf_errors.RepositoryNotFoundError),
    _http_error(403, hf_errors.GatedRepoError),
    _http_error(404, hf_errors.RevisionNotFoundError),
    _http_error(403, hf_errors.DisabledRepoError),
    _http_error(404, hf_errors.RemoteEntryNotFoundError),
    _http_error(409),
    httpx2.UnsupportedProtocol("Request URL is missing an 'http://' or 'https://' protocol."),
    httpx2.LocalProtocolError("Illegal header value"),
    HubPublishError("files missing on the Hub after the push: ['manifest.json']"),
    FileNotFoundError("README.md"),
    ValueError("bad"),
    RuntimeError("bug"),
    _chained(hf_errors.OfflineModeIsEnabled("offline")),
]


def _id(exc: Exception) -> str:
    status = getattr(getattr(exc, "response", None), "status_code", "")
    cause = f"<-{type(exc.__cause__).__name__}" if exc.__cause__ else ""
    return f"{type(exc).__module__.split('.')[0]}.{type(exc).__name__}{status}{cause}"


@pytest.mark.parametrize("exc", TRANSIENT, ids=_id)
def test_transient_hub_errors_are_retried(exc):
    assert is_transient_hub_error(exc) is True


@pytest.mark.parametrize("exc", PERMANENT, ids=_id)
def test_permanent_hub_errors_are_not(exc):
    assert is_transient_hub_error(exc) is False
