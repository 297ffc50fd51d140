"""The one place where a build is configured.

`BuildConfig` holds every setting of a build; the CLI and the Prefect flow both construct
it from their options. Its `fingerprint()` covers exactly the settings that change the
published dataset, so a re-run with the same settings resumes and a different build is
refused instead of mixed in.
"""

from __future__ import annotations

import functools
import hashlib
import json
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, Field, ValidationError, model_validator

from editors.config import (
    AUTHORS_BLIP2_TEMPLATE,
    EditorConfig,
    EditorPreset,
    ModelConfig,
    differences_from_authors,
)
from pipeline.check import CheckConfig, FilterMode
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


# `LLMConfig` fields that set how requests are paced, paid for, retried and cached, never
# what is asked: a build resumes when they change (e.g. a raised --llm-budget-usd).
LLM_RUNTIME_FIELDS = frozenset(
    {"api_key", "budget_usd", "prices", "requests_per_minute", "tokens_per_minute",
     "concurrency", "timeout_s", "connect_timeout_s", "max_retries", "cache_path", "build_id",
     "batch_poll_s", "batch_timeout_s"}
)  # fmt: skip


class AnnotatorSettings(BaseModel):
    kind: Literal["offline", "llm"] = "offline"
    llm_base_url: str | None = None
    llm_model: str = "gpt-4o-mini"
    concurrency: int = Field(16, ge=1)  # LLM requests in flight for the whole build
    # any other `pipeline.llm.LLMConfig` field (rate limits, prices, budget, batch mode)
    llm: dict[str, Any] = Field(default_factory=dict)
    # JSONL of image-free {question, answer} pairs (e.g. NQ-open) for EasyEdit's `loc`;
    # None: the LLM annotator writes one per item (the offline annotator always does)
    text_locality_file: Path | None = None

    @model_validator(mode="after")
    def _text_locality_needs_llm(self) -> AnnotatorSettings:
        if self.text_locality_file is not None and self.kind != "llm":
            raise ValueError(
                "--text-locality needs --annotator llm (the offline annotator writes its own)"
            )
        return self

    def described(self) -> dict:
        """What defines the annotations: no keys, limits or budgets (see LLM_RUNTIME_FIELDS).
        The text-locality file by its sha256, not its path (`pipeline.sources.file_sha256`)."""
        described = self.model_dump(mode="json", exclude={"concurrency", "text_locality_file"})
        if self.text_locality_file is not None:
            from pipeline.sources import file_sha256

            described["text_locality_sha256"] = file_sha256(self.text_locality_file)
        described["llm"] = {
            k: v for k, v in described["llm"].items() if k not in LLM_RUNTIME_FIELDS
        }
        return described


ImageBackendName = Literal["render", "openai", "diffusers", "retrieve"]


class ImageSettings(BaseModel):
    """How the images stage makes, checks and caches images (design §6; docs/usage.md)."""

    backend: ImageBackendName = "render"
    # "" = the backend's default: dall-e-2 (openai), stabilityai/sdxl-turbo (diffusers),
    # `clip_model` (retrieve: the CLIP that ranks the pool)
    model: str = ""
    # side in px; None = the backend's default: render 64, openai 256, diffusers 512;
    # retrieve: photos larger than this are downscaled to fit (default 512)
    size: int | None = Field(None, ge=16, le=4096)
    steps: int = Field(2, ge=1, le=50)  # diffusers (SDXL-Turbo: 1-4)
    guidance_scale: float = Field(0.0, ge=0)  # diffusers (0 for the turbo models)
    quality: Literal["standard", "hd", "low", "medium", "high", "auto"] | None = None  # openai
    api_base_url: str | None = None  # openai; None: OPENAI_BASE_URL, else api.openai.com
    concurrency: int = Field(8, ge=1)  # openai requests in flight
    # diffusers prompts per pipeline call; "auto": as many as the device's free memory holds
    # (`image_backends.diffusion.auto_batch_size`), halved on out-of-memory
    batch_size: Annotated[int, Field(ge=1)] | Literal["auto"] = 4
    device: Literal["auto", "cpu", "cuda"] = "auto"  # diffusers and CLIP
    pool_dir: Path | None = None  # retrieve: a folder of photos (e.g. COCO train2014)
    clip_model: str = "openai/clip-vit-base-patch32"
    clip_threshold: float | None = Field(None, ge=-1, le=1)  # min cosine image-prompt; None: off
    negative_margin: float = 0.0  # retrieve: cos(img, C) - cos(img, A) for near-miss images
    min_size: int = Field(32, ge=1)
    near_duplicate_bits: int = Field(8, ge=0, le=64)  # dHash distance (of 64) ...
    near_duplicate_colour: float = Field(6.0, ge=0)  # ... and colour distance: near-duplicate
    max_attempts: int = Field(3, ge=1)  # per image: first try + replacements
    fallback: ImageBackendName | None = None  # where failed/refused images are made instead
    n_rephrases: int = Field(10, ge=1)
    n_locality: int = Field(3, ge=1)
    cache: bool = True  # generated images and the pool index under cache_dir/images/

    @model_validator(mode="after")
    def _consistent(self) -> ImageSettings:
        if self.fallback is not None and self.fallback == self.backend:
            raise ValueError("the fallback image backend must differ from the backend")
        if "retrieve" in (self.backend, self.fallback) and self.pool_dir is None:
            raise ValueError("the retrieve image backend needs pool_dir (--image-pool)")
        if self.api_base_url is not None and not self.api_base_url.startswith(
            ("http://", "https://")
        ):
            raise ValueError(f"api_base_url must be an http(s) URL, got {self.api_base_url!r}")
        return self


def first_error(exc: ValidationError, default_where: str = "setting") -> str:
    """`where: why` of a pydantic error's first problem, in one line."""
    first = exc.errors()[0]
    where = ".".join(str(p) for p in first["loc"]) or default_where
    return f"{where}: {first['msg'].removeprefix('Value error, ')}"


def weights_identity(model: str) -> str:
    """A local model folder by the hash of its config and weights; a Hub id stands for
    itself. `describe()` runs several times per build: files are hashed again only when
    their size or modification time changed."""
    folder = Path(model)
    if not folder.is_dir():
        return model
    files = sorted([*folder.glob("config.json"), *folder.glob("*.safetensors")])
    return _hash_files(tuple((str(f), f.stat().st_size, f.stat().st_mtime_ns) for f in files))


@functools.lru_cache(maxsize=8)
def _hash_files(files: tuple[tuple[str, int, int], ...], whole_below: int = 256 * 2**20) -> str:
    """sha256 over (name, size, bytes) of each file; files larger than `whole_below` by their
    size and first MiB (hashing GBs per build costs too much)."""
    digest = hashlib.sha256()
    for name, size, _ in files:
        with open(name, "rb") as handle:
            data = handle.read() if size < whole_below else handle.read(2**20)
        digest.update(f"{Path(name).name}:{size}:".encode() + data)
    return digest.hexdigest()[:16]


TINY_MODEL = "tiny-flagworld"  # the VLM shipped in editors/assets, trained on the flagworld


# The validate stage's routing key. `last_prompt` is the variant measured best on flagworld
# (issue 7, docs/benchmarks.md): the paper's key, a mean over all positions, is dominated by
# the image, so its radius also routes every other question about the edit image and no item
# passes its text negatives. `editor={"key_variant": "reference"}` (CLI `--key-variant
# reference`) validates with BalancEdit exactly as published.
VALIDATION_KEY_VARIANT = "last_prompt"
# The edit also learns to stop after the target (`EditorConfig.edit_eos`): without it 30 % of
# flagworld edits answer "riga riga ..." when generating (generation exact match 0.70 against
# teacher-forced 1.00 on 20 items); with it both agree, and nothing teacher-forced changes.
VALIDATION_EDIT_EOS = True


@functools.lru_cache(maxsize=32)
def model_family(model: str) -> str:
    """The adapter family (blip2, llava, ...) of a model id or local folder, without loading
    its weights: `okedit.json` beside a local model, else its config's `model_type` (read from
    the folder or the Hub cache; fetched from the Hub otherwise, as loading the model would)."""
    import transformers

    from editors.adapters import family_of, read_meta

    family = read_meta(model).get("family")
    if family:
        return str(family)
    try:
        config = transformers.AutoConfig.from_pretrained(model)
    except OSError as exc:
        raise ValueError(f"cannot read the config of model {model!r}: {exc}") from None
    return family_of(config.model_type)


class ValidateSettings(BaseModel):
    enabled: bool = True
    model: str = TINY_MODEL  # or a Hub id or local path
    device: Literal["auto", "cpu", "cuda"] = "auto"
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = "auto"
    # EditorConfig fields that override the editor defaults and the model's preset
    editor: dict[str, Any] = Field(default_factory=dict)
    # which items the item check drops from the published set (`pipeline.check`); never the
    # editor outcome
    filter: FilterMode = "none"
    check: CheckConfig = Field(default_factory=CheckConfig)
    # "paper": BalancEdit as its authors' code runs it, for the model's family
    # (`editors.config.authors_settings`; BLIP-2 then reads the raw question). Instead of the
    # validation defaults above and the model's edit-strength preset; `editor` still overrides.
    editor_preset: EditorPreset = "default"

    def model_settings(self) -> ModelConfig:
        if self.model == TINY_MODEL:
            from pipeline.tiny_model import default_model_dir

            path = default_model_dir()
            if not (path / "config.json").exists():
                raise FileNotFoundError(
                    f"the tiny flagworld VLM is missing at {path}; run `okedit tiny-model train`"
                )
            config = ModelConfig(
                model=str(path), name=TINY_MODEL, device=self.device, dtype=self.dtype
            )
        else:
            config = ModelConfig(model=self.model, device=self.device, dtype=self.dtype)
        if self.editor_preset == "paper" and model_family(config.model) == "blip2":
            return config.model_copy(
                update={"prompt_template": AUTHORS_BLIP2_TEMPLATE, "text_bos": False}
            )
        return config

    def weights(self) -> str:
        """`weights_identity` of the validation model ("missing" before it exists: preflight
        says what to do about that)."""
        try:
            return weights_identity(self.model_settings().model)
        except FileNotFoundError:
            return "missing"

    def family(self) -> str:
        """The model's adapter family, read without loading the model."""
        return model_family(self.model_settings().model)

    def differences_from_authors(self) -> list[dict[str, str]]:
        """How this validation differs from the BalancEdit authors' code, as rows
        `{"setting", "this build", "authors' code"}` (`editors.config.differences_from_authors`).
        Under `editor_preset="paper"` only what no setting changes is left (e.g. the model)."""
        from editors.adapters import read_meta

        model = self.model_settings()
        template = model.prompt_template or read_meta(model.model).get("prompt_template")
        return differences_from_authors(
            self.editor_settings(), self.family(), template, model.text_bos
        )

    @model_validator(mode="after")
    def _editor_settings_build(self) -> ValidateSettings:
        """A bad editor setting fails with the config, in one line, before any work."""
        try:
            self.editor_settings()
        except ValidationError as exc:
            raise ValueError(f"editor setting {first_error(exc, 'editor')}") from None
        return self

    def editor_settings(self) -> EditorConfig:
        if self.editor_preset == "paper":
            return EditorConfig.for_model(
                self.model, editor_preset="paper", family=self.family(), **self.editor
            )
        defaults: dict[str, Any] = {"edit_eos": VALIDATION_EDIT_EOS}
        if self.editor.get("editor", "balancedit") == "balancedit":
            defaults["key_variant"] = VALIDATION_KEY_VARIANT
        return EditorConfig.for_model(self.model, **{**defaults, **self.editor})


class PublishSettings(BaseModel):
    repo_id: str | None = None
    private: bool = False
    revision: str | None = None
    commit_message: str = "Upload OKEDIT build"


class ScaleSettings(BaseModel):
    """How the build spreads over machines (docs/scaling.md). None of it changes the dataset,
    so it is not part of the fingerprint: a build may resume sharded or not."""

    # `FLOW/DEPLOYMENT` of the shard flow (flows/validate_shard.py) on a GPU work pool, e.g.
    # "validate-okedit-shard/validate-okedit-shard"; None validates in the build's process.
    validate_deployment: str | None = None
    shards: int = Field(2, ge=1)  # shard flow runs; one per GPU worker is the usual choice
    poll_s: float = Field(5.0, gt=0)  # how often the parent checks shard runs and progress
    shard_timeout_s: float | None = Field(None, gt=0)  # None: wait as long as shards run


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
    scale: ScaleSettings = Field(default_factory=ScaleSettings)

    def describe(self) -> dict:
        """The settings that define the dataset (no paths of this machine, no secrets), with
        the editor settings as resolved (defaults and model preset included), so that a
        change of defaults is a different build, never a resume of stale validations."""
        from pipeline.llm import redact_secrets

        described = self.model_dump(mode="json", exclude={"out", "cache_dir", "publish", "scale"})
        described["annotator"] = self.annotator.described()
        if self.validation.enabled:
            resolved = self.validation.editor_settings().model_dump(mode="json")
            described["validation"]["resolved_editor"] = resolved
            # new weights under the same name (a retrained tiny VLM) are a new build
            described["validation"]["weights"] = self.validation.weights()
        if self.annotator.kind == "offline":
            from pipeline.offline_annotator import FlagworldAnnotator

            described["annotator"]["offline_version"] = FlagworldAnnotator.version
        return redact_secrets(described)  # credentials in URLs (user:key@, ?api-key=)

    def fingerprint(self) -> str:
        blob = json.dumps(self.describe(), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]
