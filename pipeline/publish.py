"""Publish: the local dataset folder (parquet with embedded images, EasyEdit export, card,
manifest, plot); the Hugging Face Hub push builds on the same folder."""

from __future__ import annotations

import json
import os
import shutil
from contextlib import contextmanager
from importlib import metadata
from pathlib import Path
from typing import Any, Protocol

from datasets import Dataset
from datasets.utils import logging as datasets_logging

from pipeline.card import plot_scope, render_card
from schemas.easyedit import export_easyedit
from schemas.features import OKEDIT_FEATURES, to_hf_row
from schemas.record import OkeditRecord, Rejection

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
    """Parquet shards with image bytes embedded (never paths), named as the Hub expects."""
    if data_dir.exists():
        shutil.rmtree(data_dir)
    data_dir.mkdir(parents=True)
    shards = max(1, -(-len(records) // SHARD_SIZE))
    paths = []
    for i in range(shards):
        part = records[i * SHARD_SIZE : (i + 1) * SHARD_SIZE]
        dataset = Dataset.from_list([to_hf_row(r) for r in part], features=OKEDIT_FEATURES)
        path = data_dir / f"train-{i:05d}-of-{shards:05d}.parquet"
        with _quiet_datasets():
            dataset.to_parquet(str(path))
        paths.append(path)
    return paths


def token_totals(records: list[OkeditRecord]) -> dict[str, int]:
    prompt = sum(p.prompt_tokens for r in records for p in r.provenance)
    completion = sum(p.completion_tokens for r in records for p in r.provenance)
    return {"prompt": prompt, "completion": completion}


def validation_summary(records: list[OkeditRecord]) -> dict:
    validated = [r for r in records if r.validation.verdict != "not_run"]
    verdicts: dict[str, int] = {}
    for r in validated:
        verdicts[r.validation.verdict] = verdicts.get(r.validation.verdict, 0) + 1
    first = validated[0].validation if validated else None
    return {
        "validated": len(validated),
        "verdicts": verdicts,
        "model": first.model if first else None,
        "editor": first.editor if first else None,
        "key_variant": first.key_variant if first else None,
        "edit_config": json.loads(first.edit_config) if first else None,
    }


def publish_local(
    records: list[OkeditRecord],
    rejections: list[Rejection],
    out: Path,
    manifest: dict,
) -> dict[str, Path]:
    """Write the dataset folder; returns the paths of what was written.

    `manifest` carries the config, counts and annotator; versions, token totals and the
    validation summary are added here. Files are written before the manifest, which is
    written last and atomically, so a manifest means a complete folder.
    """
    out.mkdir(parents=True, exist_ok=True)
    shards = write_parquet(records, out / "data")
    easyedit_dir = out / "easyedit"
    if easyedit_dir.exists():
        shutil.rmtree(easyedit_dir)
    easyedit = export_easyedit(records, easyedit_dir)
    rejected_path = out / "rejected.jsonl"
    rejected_path.write_text("".join(r.model_dump_json() + "\n" for r in rejections))
    plot = plot_scope(records, out / "plots" / "scope.png")
    manifest = {
        **manifest,
        "versions": package_versions(),
        "tokens": token_totals(records),
        "validation": validation_summary(records),
        "files": {"data": [p.relative_to(out).as_posix() for p in shards]},
    }
    card = out / "README.md"
    card.write_text(
        render_card(
            records, rejections, manifest, plot.relative_to(out).as_posix() if plot else None
        )
    )
    manifest_path = out / "manifest.json"
    tmp = manifest_path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(manifest, indent=2, default=str))
    os.replace(tmp, manifest_path)
    return {
        "data": out / "data",
        "easyedit": easyedit,
        "card": card,
        "manifest": manifest_path,
        "rejected": rejected_path,
        **({"plot": plot} if plot else {}),
    }


# ---- Hugging Face Hub -------------------------------------------------------------------

HUB_DATA_PATTERNS = [
    "data/*.parquet",
    "easyedit/*.json",
    "easyedit/images/*",
    "plots/*.png",
    "manifest.json",
    "rejected.jsonl",
]


class HubPublishError(RuntimeError):
    """The push did not land as expected (missing files, size mismatch, no token)."""


class HubApi(Protocol):
    """The part of `huggingface_hub.HfApi` that publishing uses (a fake in tests)."""

    def create_repo(self, repo_id: str, **kwargs: Any) -> Any: ...
    def create_branch(self, repo_id: str, **kwargs: Any) -> None: ...
    def upload_folder(self, **kwargs: Any) -> Any: ...
    def upload_file(self, **kwargs: Any) -> Any: ...
    def list_repo_files(self, repo_id: str, **kwargs: Any) -> list[str]: ...
    def get_paths_info(self, repo_id: str, paths: list[str], **kwargs: Any) -> list[Any]: ...


def default_hub_api() -> HubApi:
    """An `HfApi` with the token from `HF_TOKEN` (or the saved login); never printed."""
    from huggingface_hub import HfApi

    return HfApi(token=os.environ.get("HF_TOKEN") or None)


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
    that is not there yet; its YAML header (configs, license) is kept as written.
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
        delete_patterns=["data/*.parquet"],  # stale shards of an earlier, larger build
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
    """Every local file is on the Hub with the same size; returns files and rows pushed."""
    local = _local_files(folder)
    remote = set(api.list_repo_files(repo_id, repo_type="dataset", revision=revision))
    missing = sorted(set(local) - remote)
    if missing:
        raise HubPublishError(f"files missing on the Hub after the push: {missing[:5]}")
    parquet = [p for p in local if p.endswith(".parquet")]
    infos = api.get_paths_info(repo_id, parquet, repo_type="dataset", revision=revision)
    sizes = {info.path: info.size for info in infos}
    wrong = [p for p in parquet if sizes.get(p) != local[p]]
    if wrong:
        raise HubPublishError(f"size mismatch on the Hub for {wrong[:5]}")
    return {"files": len(local), "rows": _parquet_rows(folder)}
