"""The one place where a build is configured.

`BuildConfig` holds every setting of a build; the CLI and the Prefect flow both construct
it from their options. Its `fingerprint()` covers exactly the settings that change the
published dataset, so a re-run with the same settings resumes and a different build is
refused instead of mixed in.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field

from editors.config import EditorConfig, ModelConfig
from pipeline.quality import QualityConfig

SourceName = Literal["flagworld", "okvqa-hub", "okvqa-files"]


class SourceSettings(BaseModel):
    name: SourceName = "flagworld"
    split: str = "val2014"
    # okvqa-hub: repo id or a local parquet path for the split
    hub_repo: str = "lmms-lab/OK-VQA"
    parquet: Path | None = None
    # okvqa-files: the VQA-API json pair and the images
    questions_file: Path | None = None
    annotations_file: Path | None = None
    coco_dir: Path | None = None
    image_base_url: str = "http://images.cocodataset.org"


class AnnotatorSettings(BaseModel):
    kind: Literal["offline", "llm"] = "offline"
    llm_base_url: str | None = None
    llm_model: str = "gpt-4o-mini"
    concurrency: int = Field(16, ge=1)


class ImageSettings(BaseModel):
    backend: Literal["render"] = "render"


TINY_MODEL = "tiny-flagworld"  # the VLM shipped in editors/assets, trained on the flagworld


class ValidateSettings(BaseModel):
    enabled: bool = True
    model: str = TINY_MODEL  # or a Hub id or local path
    device: Literal["auto", "cpu", "cuda"] = "auto"
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = "auto"
    # EditorConfig fields that override the editor defaults and the model's preset
    editor: dict[str, Any] = Field(default_factory=dict)
    filter_scope: bool = False  # drop `ambiguous` items from the published set

    def model_settings(self) -> ModelConfig:
        if self.model == TINY_MODEL:
            from pipeline.tiny_model import default_model_dir

            path = default_model_dir()
            if not (path / "config.json").exists():
                raise FileNotFoundError(
                    f"the tiny flagworld VLM is missing at {path}; run `okedit tiny-model train`"
                )
            return ModelConfig(
                model=str(path), name=TINY_MODEL, device=self.device, dtype=self.dtype
            )
        return ModelConfig(model=self.model, device=self.device, dtype=self.dtype)

    def editor_settings(self) -> EditorConfig:
        return EditorConfig.for_model(self.model, **self.editor)


class PublishSettings(BaseModel):
    repo_id: str | None = None
    private: bool = False
    revision: str | None = None
    commit_message: str = "Upload OKEDIT build"


class BuildConfig(BaseModel):
    source: SourceSettings = Field(default_factory=SourceSettings)
    limit: int | None = Field(None, ge=1)
    seed: int = 0
    out: Path = Path("okedit-out")
    chunk_size: int = Field(16, ge=1)
    cache_dir: Path = Path(".okedit-cache")
    annotator: AnnotatorSettings = Field(default_factory=AnnotatorSettings)
    images: ImageSettings = Field(default_factory=ImageSettings)
    quality: QualityConfig = Field(default_factory=QualityConfig)
    validation: ValidateSettings = Field(default_factory=ValidateSettings)
    publish: PublishSettings = Field(default_factory=PublishSettings)

    def describe(self) -> dict:
        """The settings that define the dataset (no paths of this machine, no secrets)."""
        return self.model_dump(mode="json", exclude={"out", "cache_dir", "publish"})

    def fingerprint(self) -> str:
        blob = json.dumps(self.describe(), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]
