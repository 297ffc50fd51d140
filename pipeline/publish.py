"""Publish: the local dataset folder (parquet with embedded images, EasyEdit export, card,
manifest, plot); the Hugging Face Hub push builds on the same folder."""

from __future__ import annotations

import json
import os
import shutil
from collections import Counter
from contextlib import contextmanager
from importlib import metadata
from pathlib import Path
from typing import Any, Protocol

from datasets.utils import logging as datasets_logging

from pipeline.card import plot_scope, render_card, write_checks
from schemas.easyedit import export_easyedit
from schemas.features import records_to_dataset
from schemas.record import OkeditRecord, Rejection

CHECKS_FILE = "checks.parquet"  # one row per item: check and editor outcome (linked by the card)
SHARD_SIZE = 500  # records per parquet file; keeps files well under the Hub's 5 GB limit


@contextmanager
def _quiet_datasets():
    """Our own progress is shown by the flow; hide datasets' per-write bars."""
    was_enabled = datasets_logging.is_progress_bar_enabled()
    datasets_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            datasets_logging.enable_progress_bar()


def package_versions() -> dict[str, str]:
    names = ["okedit", "datasets", "transformers", "torch", "prefect", "openai", "pydantic"]
    versions = {}
    for name in names:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def write_parquet(records: list[OkeditRecord], data_dir: Path) -> list[Path]:
    """Parquet shards with image bytes embedded (never paths), named as the Hub expects, in
    the new folder `data_dir`. No records still write one shard with the full schema (and no
    row group), so an empty build is a valid, typed dataset."""
    data_dir.mkdir(parents=True)
    shards = max(1, -(-len(records) // SHARD_SIZE))
    paths = []
    for i in range(shards):
        dataset = records_to_dataset(records[i * SHARD_SIZE : (i + 1) * SHARD_SIZE])
        path = data_dir / f"train-{i:05d}-of-{shards:05d}.parquet"
        with _quiet_datasets():
            dataset.to_parquet(str(path))
        paths.append(path)
    return paths


def token_totals(manifest: dict) -> dict[str, int]:
    """Prompt/completion tokens of every request the build sent (votes, re-asks, failures and
    rejected items included), from the LLM usage report; 0 without an LLM annotator."""
    llm = manifest.get("llm") or {}
    return {"prompt": llm.get("prompt_tokens", 0), "completion": llm.get("completion_tokens", 0)}


def validation_summary(records: list[OkeditRecord], settings: dict | None) -> dict:
    """Editor verdicts and item-check statuses of the published records, next to the
    settings the caller resolved once for the whole build (`ResolvedValidation.summary`)."""
    validated = [r for r in records if r.validation.verdict != "not_run"]
    settings = settings or {}  # validation off: every setting below is None
    editor = settings.get("editor") or {}
    return {
        "validated": len(validated),
        "verdicts": dict(Counter(r.validation.verdict for r in validated)),
        "checks": dict(Counter(r.validation.check.status for r in records)),
        "model": settings.get("model"),
        "editor": editor.get("editor"),
        "key_variant": editor.get("key_variant"),
        "filter": settings.get("filter"),
        "check_config": settings.get("check"),
        "edit_config": settings.get("editor"),
        "editor_preset": settings.get("editor_preset"),
        "differences_from_authors": settings.get("differences_from_authors"),
    }


# source settings each source reads (`pipeline.config.SourceSettings`); any other is a default
# the build never used, and a flagworld manifest naming an OK-VQA split misleads
_SOURCE_KEYS = {
    "flagworld": ("name",),
    "okvqa-hub": ("name", "split", "hub_repo", "parquet"),
    "okvqa-files": (
        "name",
        "split",
        "questions_file",
        "annotations_file",
        "coco_dir",
        "image_base_url",
    ),
}
# annotator settings only the LLM annotator reads
_LLM_ANNOTATOR_KEYS = ("llm_base_url", "llm_model", "llm", "concurrency")


def describe_for_manifest(config: dict) -> dict:
    """A build's `BuildConfig.describe()` without the settings its source and annotator
    never read (no OK-VQA split for flagworld, no LLM for the offline annotator)."""
    config = dict(config)
    source = config.get("source")
    if isinstance(source, dict) and source.get("name") in _SOURCE_KEYS:
        keep = _SOURCE_KEYS[source["name"]]
        config["source"] = {k: v for k, v in source.items() if k in keep}
    annotator = config.get("annotator")
    if isinstance(annotator, dict) and annotator.get("kind") == "offline":
        config["annotator"] = {k: v for k, v in annotator.items() if k not in _LLM_ANNOTATOR_KEYS}
    return config


def _check_counts(counts: dict, records: list, rejections: list) -> None:
    """The manifest's counts describe exactly the files written: in = published + rejected."""
    if (
        counts.get("published") != len(records)
        or counts.get("rejected", 0) + counts.get("deferred", 0) != len(rejections)
        or counts.get("in") != len(records) + len(rejections)
    ):
        raise ValueError(
            f"manifest counts {counts} do not match {len(records)} published and "
            f"{len(rejections)} rejected items"
        )


def _staging(target: Path) -> Path:
    """A fresh hidden sibling of `target` to write its next version into (one left by an
    interrupted publish is discarded: the old `target` was never touched)."""
    staged = target.with_name(f".{target.name}.new")
    if staged.exists():
        shutil.rmtree(staged)
    return staged


def _swap_in(staged: Path, target: Path) -> None:
    """Replace `target` by the complete `staged` folder: the old one is moved away before
    the new one is moved in and deleted only after, so there is always a whole version."""
    old = target.with_name(f".{target.name}.old")
    if old.exists():
        shutil.rmtree(old)
    if target.exists():
        target.rename(old)
    staged.rename(target)
    if old.exists():
        shutil.rmtree(old)


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def publish_local(
    records: list[OkeditRecord],
    rejections: list[Rejection],
    out: Path,
    manifest: dict,
    validation: dict | None = None,
) -> dict[str, Path]:
    """Write the dataset folder; returns the paths of what was written.

    `manifest` carries the config, counts and annotator; versions, token totals and the
    validation summary (from `validation`, see `ResolvedValidation.summary`) are added here. The
    parquet, EasyEdit export and plot are written from the same records into hidden staging
    folders first, so a failure there leaves the old folder as it was. Then the old manifest
    goes, the new folders are swapped in, and the manifest is written last and atomically:
    a manifest always means a complete, consistent folder.
    """
    _check_counts(manifest["counts"], records, rejections)
    out.mkdir(parents=True, exist_ok=True)
    staged = {name: _staging(out / name) for name in ("data", "easyedit", "plots")}
    shards = write_parquet(records, staged["data"])
    easyedit_name = export_easyedit(records, staged["easyedit"]).name
    staged["plots"].mkdir()
    plot = plot_scope(records, staged["plots"] / "scope.png")
    manifest = {
        **manifest,
        **({"config": describe_for_manifest(manifest["config"])} if "config" in manifest else {}),
        "versions": package_versions(),
        "tokens": token_totals(manifest),
        "validation": validation_summary(records, validation),
        "files": {"data": [f"data/{p.name}" for p in shards]},
    }
    checks_tmp = write_checks(records, out / ".checks.parquet.tmp")
    card_text = render_card(
        records, rejections, manifest, "plots/scope.png" if plot else None, CHECKS_FILE
    )

    manifest_path = out / "manifest.json"
    manifest_path.unlink(missing_ok=True)
    for name, folder in staged.items():
        _swap_in(folder, out / name)
    rejected_path = out / "rejected.jsonl"
    _write_atomic(rejected_path, "".join(r.model_dump_json() + "\n" for r in rejections))
    os.replace(checks_tmp, out / CHECKS_FILE)
    card = out / "README.md"
    _write_atomic(card, card_text)
    _write_atomic(manifest_path, json.dumps(manifest, indent=2, default=str))
    return {
        "data": out / "data",
        "easyedit": out / "easyedit" / easyedit_name,
        "card": card,
        "manifest": manifest_path,
        "rejected": rejected_path,
        "checks": out / CHECKS_FILE,
        **({"plot": out / "plots" / "scope.png"} if plot else {}),
    }


# ---- Hugging Face Hub -------------------------------------------------------------------

HUB_DATA_PATTERNS = [
    "data/*.parquet",
    "easyedit/*.json",
    "easyedit/images/*",
    "plots/*.png",
    "checks.parquet",
    "manifest.json",
    "rejected.jsonl",
]
PATHS_INFO_BATCH = 100  # paths per `get_paths_info` call when verifying a push


class HubPublishError(RuntimeError):
    """The push did not land as expected (missing files, hash mismatch, not a build)."""


class HubApi(Protocol):
    """The part of `huggingface_hub.HfApi` that publishing uses (a fake in tests)."""

    def create_repo(self, repo_id: str, **kwargs: Any) -> Any: ...
    def create_branch(self, repo_id: str, **kwargs: Any) -> None: ...
    def upload_folder(self, **kwargs: Any) -> Any: ...
    def upload_file(self, **kwargs: Any) -> Any: ...
    def get_paths_info(self, repo_id: str, paths: list[str], **kwargs: Any) -> list[Any]:
        """`RepoFile`s (path, size, blob_id, lfs) of the `paths` that exist; others left out."""
        ...


def default_hub_api() -> HubApi:
    """An `HfApi` with the token from `HF_TOKEN` (or the saved login), never printed, and
    the endpoint from `HF_ENDPOINT` as set when the push runs (huggingface_hub reads it
    once, at import)."""
    from huggingface_hub import HfApi

    return HfApi(
        endpoint=os.environ.get("HF_ENDPOINT") or None,
        token=os.environ.get("HF_TOKEN") or None,
    )


# ---- which Hub errors a retry can cure

# HTTP statuses worth another try: request timeout, rate limit, server errors
_TRANSIENT_STATUS = {408, 429}


def _http_client_errors() -> tuple[tuple[type, ...], tuple[type, ...]]:
    """(transport errors, permanent ones among them) of the HTTP client huggingface_hub is
    built on: httpx2 (huggingface_hub 2.x), httpx (1.x), requests (0.x). httpx's
    `TransportError`s (connect/read/write/pool timeouts, connection and read errors, a peer
    closing the connection) derive from neither `OSError` nor `ConnectionError`."""
    import importlib

    from huggingface_hub.errors import HfHubHTTPError

    names = {c.__module__.partition(".")[0] for c in HfHubHTTPError.__mro__[1:]}
    transport: list[type] = []
    permanent: list[type] = []
    for name in sorted((names | {"httpx2", "httpx"}) - {"builtins"}):
        try:
            module = importlib.import_module(name)
        except ImportError:
            continue
        if isinstance(getattr(module, "TransportError", None), type):  # httpx, httpx2
            transport.append(module.TransportError)
            # a URL without http(s):// or a request we built wrong: the same next time
            permanent += [module.UnsupportedProtocol, module.LocalProtocolError]
        elif name == "requests":
            errors = module.exceptions
            transport += [errors.ConnectionError, errors.Timeout, errors.ChunkedEncodingError]
            permanent += [errors.InvalidSchema, errors.MissingSchema, errors.InvalidURL]
    return tuple(transport), tuple(permanent)


# huggingface_hub.errors classes a retry cannot cure (those of the installed version)
_PERMANENT_HUB_ERRORS = (
    "OfflineModeIsEnabled",  # a ConnectionError, but no retry can ever reach the Hub
    "HFValidationError",  # a bad repo id
    "LocalTokenNotFoundError",  # an OSError
    "RepositoryNotFoundError",  # and GatedRepoError: 401/403/404
    "RevisionNotFoundError",
    "DisabledRepoError",
    "RemoteEntryNotFoundError",
)


def is_transient_hub_error(exc: BaseException) -> bool:
    """True when pushing again can succeed: transport errors of the HTTP client, timeouts,
    dropped connections, HTTP 408/429/5xx. False for offline mode (`HF_HUB_OFFLINE=1`),
    401/403/404 (bad token, no permission, unknown repo or revision, gated or disabled
    repo), other 4xx, an invalid repo id, no token, a folder that is not a complete build,
    a push that landed wrong (`HubPublishError`) and anything unknown (a bug)."""
    from huggingface_hub import errors

    permanent = tuple(getattr(errors, n) for n in _PERMANENT_HUB_ERRORS if hasattr(errors, n))
    if isinstance(exc, (HubPublishError, *permanent)):
        return False
    status = getattr(getattr(exc, "response", None), "status_code", None)
    if isinstance(status, int):  # HfHubHTTPError, the client's HTTPStatusError
        return status in _TRANSIENT_STATUS or 500 <= status < 600
    transport, permanent_transport = _http_client_errors()
    if isinstance(exc, permanent_transport):
        return False
    if isinstance(exc, (*transport, ConnectionError, TimeoutError)):
        return True
    cause = exc.__cause__
    return cause is not None and cause is not exc and is_transient_hub_error(cause)


# ---- push and verify


def _local_files(folder: Path) -> dict[str, int]:
    """Repo path -> byte size of everything that will be pushed."""
    files = {}
    for pattern in [*HUB_DATA_PATTERNS, "README.md"]:
        for path in folder.glob(pattern):
            if path.is_file():
                files[path.relative_to(folder).as_posix()] = path.stat().st_size
    return files


def _parquet_rows(folder: Path) -> int:
    import pyarrow.parquet as pq

    return sum(pq.ParquetFile(p).metadata.num_rows for p in (folder / "data").glob("*.parquet"))


def file_hashes(path: Path) -> tuple[str, str]:
    """(sha256, git blob sha1) of a file in one read: the Hub reports the first for LFS
    files (`lfs.sha256`) and the second for regular ones (`blob_id`)."""
    import hashlib

    size = path.stat().st_size
    sha256 = hashlib.sha256()
    blob = hashlib.sha1(b"blob %d\0" % size, usedforsecurity=False)
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            sha256.update(chunk)
            blob.update(chunk)
    return sha256.hexdigest(), blob.hexdigest()


def _landed_wrong(path: Path, info: Any) -> str | None:
    """Why the Hub's copy of `path` is not the local file (None when it is)."""
    sha256, blob_id = file_hashes(path)
    lfs = getattr(info, "lfs", None)
    if lfs is not None:
        remote = lfs["sha256"] if isinstance(lfs, dict) else lfs.sha256
        return None if remote == sha256 else f"sha256 {remote[:12]}… != local {sha256[:12]}…"
    remote = getattr(info, "blob_id", None)
    return None if remote == blob_id else f"git blob {str(remote)[:12]}… != local {blob_id[:12]}…"


def push_to_hub(
    folder: Path,
    repo_id: str,
    *,
    private: bool = False,
    revision: str | None = None,
    commit_message: str = "Upload OKEDIT build",
    api: HubApi | None = None,
) -> dict[str, Any]:
    """Push a published folder: data first, then the card, then verify what landed.

    The card goes last and on its own so that the Hub never shows a card describing data
    that is not there yet; its YAML header (configs, license) is kept as written. No retry
    here: a caller retries the whole push when `is_transient_hub_error` says so (the
    flow's `publish-hub` task does); pushing the same folder again is harmless.
    """
    folder = Path(folder)
    if not (folder / "manifest.json").exists():
        raise HubPublishError(f"{folder} is not a complete okedit build (no manifest.json)")
    api = api or default_hub_api()
    api.create_repo(repo_id, repo_type="dataset", private=private, exist_ok=True)
    if revision:
        api.create_branch(repo_id, branch=revision, repo_type="dataset", exist_ok=True)
    common = {"repo_id": repo_id, "repo_type": "dataset", "revision": revision}
    api.upload_folder(
        folder_path=str(folder),
        allow_patterns=HUB_DATA_PATTERNS,
        # what an earlier build left (more shards, other images) and this one lacks: the
        # branch holds this build only, as `main` will after `move_main`
        delete_patterns=HUB_DATA_PATTERNS,
        commit_message=f"{commit_message} (data)",
        **common,
    )
    commit = api.upload_file(
        path_or_fileobj=str(folder / "README.md"),
        path_in_repo="README.md",
        commit_message=f"{commit_message} (card)",
        **common,
    )
    verified = verify_push(folder, repo_id, revision=revision, api=api)
    return {
        "repo_id": repo_id,
        "commit_url": getattr(commit, "commit_url", str(commit)),
        **verified,
    }


def verify_push(
    folder: Path, repo_id: str, *, revision: str | None = None, api: HubApi
) -> dict[str, Any]:
    """Every local file is on the Hub with the same content: its sha256 equals the Hub's
    `lfs.sha256` (LFS files: parquet, images) or its git blob sha1 the Hub's `blob_id`
    (regular files). Raises `HubPublishError` naming the files missing or different;
    returns the files verified and rows pushed."""
    local = _local_files(folder)
    paths = sorted(local)
    infos: dict[str, Any] = {}
    for start in range(0, len(paths), PATHS_INFO_BATCH):
        batch = paths[start : start + PATHS_INFO_BATCH]
        for info in api.get_paths_info(repo_id, batch, repo_type="dataset", revision=revision):
            infos[info.path] = info
    missing = [p for p in paths if p not in infos]
    if missing:
        raise HubPublishError(
            f"{len(missing)} files missing on the Hub after the push: {missing[:5]}"
        )
    wrong = {p: why for p in paths if (why := _landed_wrong(folder / p, infos[p]))}
    if wrong:
        shown = "; ".join(f"{p}: {why}" for p, why in list(wrong.items())[:5])
        raise HubPublishError(
            f"{len(wrong)} files on the Hub differ from the local build ({shown})"
        )
    return {"files": len(local), "verified": len(local), "rows": _parquet_rows(folder)}


MAIN = "main"


def move_main(
    folder: Path,
    repo_id: str,
    revision: str,
    *,
    commit_message: str = "Upload OKEDIT build",
    api: HubApi | None = None,
) -> dict[str, Any]:
    """Point `main` at the build `push_to_hub` pushed to `revision` and verified, and at
    nothing unverified.

    The Hub has no call that moves a branch to another commit, so the same files are
    committed to `main` once more, after `revision` was verified again against the local
    folder (a `HubPublishError` there leaves `main` untouched): one commit, data and card
    together, that also deletes what an earlier build left on `main` and this one lacks.
    The Hub already holds the LFS content (parquet, images) from the first push, so only
    the small regular files travel again. `main` is then verified like `revision`."""
    folder = Path(folder)
    if revision == MAIN:
        raise ValueError("move_main: the build was pushed to main itself")
    api = api or default_hub_api()
    verify_push(folder, repo_id, revision=revision, api=api)
    pushed = [*HUB_DATA_PATTERNS, "README.md"]
    commit = api.upload_folder(
        folder_path=str(folder),
        repo_id=repo_id,
        repo_type="dataset",
        revision=MAIN,
        allow_patterns=pushed,
        delete_patterns=pushed,  # files of another build; those uploaded here are kept
        commit_message=f"{commit_message} (main = {revision})",
    )
    verified = verify_push(folder, repo_id, revision=MAIN, api=api)
    return {
        "revision": MAIN,
        "from_revision": revision,
        "commit_url": getattr(commit, "commit_url", str(commit)),
        **verified,
    }
