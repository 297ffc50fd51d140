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

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from editors.config import (
    AUTHORS_BLIP2_TEMPLATE,
    EditorConfig,
    EditorPreset,
    ModelConfig,
    differences_from_authors,
)
from pipeline.check import CheckConfig, FilterMode
from pipeline.quality import QualityConfig


class Settings(BaseModel):
    """A section of the build's settings: an unknown key (a typo in a config file or in a
    deployment's parameters) is an error, never silently ignored."""

    model_config = ConfigDict(extra="forbid")


SourceName = Literal["flagworld", "okvqa-hub", "okvqa-files"]


class SourceSettings(Settings):
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


# `BuildConfig` settings that say where a build goes and how it spreads, not what it is
OUTSIDE_IDENTITY = frozenset({"out", "cache_dir", "publish", "scale"})

# `AnnotatorSettings` fields only the LLM annotator reads
LLM_ANNOTATOR_KNOBS = frozenset({"n_rephrases", "n_text_negatives", "n_votes", "prompts_dir"})


class AnnotatorSettings(Settings):
    kind: Literal["offline", "llm"] = "offline"
    llm_base_url: str | None = None
    llm_model: str = "gpt-4o-mini"
    concurrency: int = Field(16, ge=1)  # LLM requests in flight for the whole build
    # any other `pipeline.llm.LLMConfig` field (rate limits, prices, budget, batch mode)
    llm: dict[str, Any] = Field(default_factory=dict)
    # JSONL of image-free {question, answer} pairs (e.g. NQ-open) for EasyEdit's `loc`;
    # None: the LLM annotator writes one per item (the offline annotator always does)
    text_locality_file: Path | None = None
    # what the LLM annotator asks for (the offline annotator's flagworld fixes its own)
    n_rephrases: int = Field(10, ge=1)  # evaluation rephrases per item
    n_text_negatives: int = Field(3, ge=0)  # near-miss questions about the edit image
    n_votes: int = Field(3, ge=1)  # majority vote of the counterfactual-type label
    prompts_dir: Path | None = None  # templates to use instead of pipeline/prompts

    @model_validator(mode="after")
    def _text_locality_needs_llm(self) -> AnnotatorSettings:
        if self.text_locality_file is not None and self.kind != "llm":
            raise ValueError(
                "--text-locality needs --annotator llm (the offline annotator writes its own)"
            )
        return self

    def described(self) -> dict:
        """What defines the annotations: no keys, limits or budgets (see LLM_RUNTIME_FIELDS).
        Files by their sha256, not their paths (`pipeline.sources.file_sha256`); the LLM
        annotator's own knobs only for the LLM annotator (the offline one never reads them)."""
        from pipeline.sources import file_sha256

        excluded = {"concurrency", "text_locality_file", "prompts_dir"}
        if self.kind == "offline":
            excluded |= LLM_ANNOTATOR_KNOBS
        described = self.model_dump(mode="json", exclude=excluded)
        if self.text_locality_file is not None:
            described["text_locality_sha256"] = file_sha256(self.text_locality_file)
        if self.kind == "llm":  # the templates by their contents, wherever they are
            from pipeline.annotate import PROMPTS_DIR

            prompts = Path(self.prompts_dir or PROMPTS_DIR)
            described["prompts_sha256"] = {
                p.name: file_sha256(p) for p in sorted(prompts.glob("*.yaml"))
            }
        described["llm"] = {
            k: v for k, v in described["llm"].items() if k not in LLM_RUNTIME_FIELDS
        }
        return described


ImageBackendName = Literal["render", "openai", "diffusers", "retrieve"]


class ImageSettings(Settings):
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


def model_problem(name: str) -> str | None:
    """Why the model `name` (a local folder or a Hub id) cannot be loaded on this machine,
    or None. A Hub id needs a local copy in the Hugging Face cache, or (online) to exist on
    the Hub, which must then be reachable."""
    from huggingface_hub import constants, model_info, snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        HFValidationError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
    )

    if Path(name).expanduser().exists():
        return None
    if name.startswith((".", "/", "~")) or name.count("/") > 1:
        return "no such model folder"
    try:
        snapshot_download(name, local_files_only=True)
        return None  # a local copy
    except HFValidationError:
        return "neither a model folder nor a Hugging Face Hub model id"
    except LocalEntryNotFoundError:
        if constants.is_offline_mode():
            return (
                "no local copy in the Hugging Face cache, and HF_HUB_OFFLINE is set; "
                "download it once online or pass a model folder"
            )
    except Exception:
        pass
    try:
        model_info(name, timeout=10)
    except HFValidationError:
        return "neither a model folder nor a Hugging Face Hub model id"
    except GatedRepoError:
        return "gated on the Hugging Face Hub: accept its terms and set HF_TOKEN"
    except RepositoryNotFoundError:
        return "no such model on the Hugging Face Hub (a private one? set HF_TOKEN)"
    except (OSError, *httpx_errors()) as exc:
        return (
            "no local copy in the Hugging Face cache and the Hub cannot be reached "
            f"({type(exc).__name__}: {_first_line(exc)}); connect, or pass a model folder"
        )
    return None


def httpx_errors() -> tuple[type[Exception], ...]:
    """The transport errors of the HTTP client huggingface_hub uses (httpx or its fork)."""
    found: list[type[Exception]] = []
    for module in ("httpx", "httpx2"):
        try:
            found.append(__import__(module).TransportError)
        except (ImportError, AttributeError):
            pass
    return tuple(found)


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


class ValidateSettings(Settings):
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
    # items edited and probed together (`pipeline.validate.validate_records`): the same
    # results as one at a time, so not part of the build's identity; > 1 keeps a GPU busy
    batch_items: int = Field(1, ge=1)

    @model_validator(mode="after")
    def _editor_settings_build(self) -> ValidateSettings:
        """A bad editor setting fails with the config, in one line, before any work."""
        family = _family_or_auto(self) if self.editor_preset == "paper" else "auto"
        try:
            _editor_config(self, family)
        except ValidationError as exc:
            raise ValueError(f"editor setting {first_error(exc, 'editor')}") from None
        return self


class ResolvedValidation(BaseModel):
    """A validation's settings with every default applied: the model to load, the editor
    settings (defaults, then the model's preset or the authors' settings, then overrides)
    and the model's weights. Made by `resolve_validation`, the one place that resolves them.
    It needs the model's files only where the settings depend on its family (the paper
    preset), so a build can be planned and fingerprinted on a machine without the model."""

    model_config = ConfigDict(frozen=True, protected_namespaces=())

    settings: ValidateSettings
    model: ModelConfig
    editor: EditorConfig
    weights: str  # `weights_identity` of the model

    def family(self) -> str:
        """The model's adapter family, read from its config; ValueError saying why the model
        cannot be read here."""
        return _read_family(self.model.model, self.settings.model)

    def differences_from_authors(self) -> list[dict[str, str]]:
        """How this validation differs from the BalancEdit authors' code, as rows
        `{"setting", "this build", "authors' code"}` (`editors.config.differences_from_authors`).
        Under `editor_preset="paper"` only what no setting changes is left (e.g. the model)."""
        from editors.adapters import read_meta

        template = self.model.prompt_template or read_meta(self.model.model).get("prompt_template")
        return differences_from_authors(self.editor, self.family(), template, self.model.text_bos)

    def summary(self) -> dict:
        """What the manifest and card record of the validation (`pipeline.publish`)."""
        return {
            "model": self.settings.model,
            "editor": self.editor.model_dump(mode="json"),
            "check": self.settings.check.model_dump(mode="json"),
            "filter": self.settings.filter,
            "editor_preset": self.settings.editor_preset,
            "differences_from_authors": self.differences_from_authors(),
        }


def resolve_validation(settings: ValidateSettings) -> ResolvedValidation:
    """`settings` resolved (see `ResolvedValidation`); raises FileNotFoundError when the tiny
    flagworld VLM is missing, and ValueError under the paper preset for a model whose config
    cannot be read."""
    model = _model_config(settings)
    paper = settings.editor_preset == "paper"
    family = _read_family(model.model, settings.model) if paper else "auto"
    return ResolvedValidation(
        settings=settings,
        model=model,
        editor=_editor_config(settings, family),
        weights=weights_identity(model.model),
    )


def _read_family(path: str, name: str) -> str:
    try:
        return model_family(path)
    except ValueError as exc:  # say why it cannot be loaded here, if we can tell
        why = model_problem(path) or _first_line(exc)
        raise ValueError(f"--model {name}: {why}") from None


def _model_config(settings: ValidateSettings) -> ModelConfig:
    if settings.model == TINY_MODEL:
        from pipeline.tiny_model import default_model_dir

        path = default_model_dir()
        if not (path / "config.json").exists():
            raise FileNotFoundError(
                f"the tiny flagworld VLM is missing at {path}; run `okedit tiny-model train`"
            )
        config = ModelConfig(
            model=str(path), name=TINY_MODEL, device=settings.device, dtype=settings.dtype
        )
    else:
        config = ModelConfig(model=settings.model, device=settings.device, dtype=settings.dtype)
    if settings.editor_preset == "paper" and model_family(config.model) == "blip2":
        return config.model_copy(
            update={"prompt_template": AUTHORS_BLIP2_TEMPLATE, "text_bos": False}
        )
    return config


def _family_or_auto(settings: ValidateSettings) -> str:
    """The model's family for checking the editor settings early; "auto" where it cannot be
    read yet (preflight reports that)."""
    try:
        return model_family(_model_config(settings).model)
    except (OSError, ValueError):
        return "auto"


def _editor_config(settings: ValidateSettings, family: str) -> EditorConfig:
    if settings.editor_preset == "paper":
        return EditorConfig.for_model(
            settings.model, editor_preset="paper", family=family, **settings.editor
        )
    defaults: dict[str, Any] = {"edit_eos": VALIDATION_EDIT_EOS}
    if settings.editor.get("editor", "balancedit") == "balancedit":
        defaults["key_variant"] = VALIDATION_KEY_VARIANT
    return EditorConfig.for_model(settings.model, **{**defaults, **settings.editor})


class PublishSettings(Settings):
    repo_id: str | None = None
    private: bool = False
    revision: str | None = None
    commit_message: str = "Upload OKEDIT build"


class ScaleSettings(Settings):
    """How the build spreads over machines (docs/scaling.md). None of it changes the dataset,
    so it is not part of the fingerprint: a build may resume sharded or not."""

    # `FLOW/DEPLOYMENT` of the shard flow (flows/validate_shard.py) on a GPU work pool, e.g.
    # "validate-okedit-shard/validate-okedit-shard"; None: every stage runs in the build's
    # process. It runs the stages in `shard_stages` (one flow run per shard and stage).
    validate_deployment: str | None = None
    shard_stages: list[Literal["images", "validate"]] = Field(default_factory=lambda: ["validate"])
    shards: int = Field(2, ge=1)  # shard flow runs; one per GPU worker is the usual choice
    poll_s: float = Field(5.0, gt=0)  # how often the parent checks shard runs and progress
    shard_timeout_s: float | None = Field(None, gt=0)  # None: wait as long as shards run


class BuildConfig(Settings):
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
        """The settings that define the dataset (`ResolvedBuild.described`)."""
        return resolve(self).described

    def fingerprint(self) -> str:
        return resolve(self).fingerprint


def _describe(cfg: BuildConfig, validation: ResolvedValidation | None) -> dict:
    """The settings that define the dataset (no paths of this machine, no secrets), with
    the editor settings as resolved (defaults and model preset included), so that a change
    of defaults is a different build, never a resume of stale validations."""
    from pipeline.llm import redact_secrets

    described = cfg.model_dump(mode="json", exclude=set(OUTSIDE_IDENTITY))
    described["validation"].pop("batch_items")  # the same results either way
    described["annotator"] = cfg.annotator.described()
    if validation is not None:
        described["validation"]["resolved_editor"] = validation.editor.model_dump(mode="json")
        # new weights under the same name (a retrained tiny VLM) are a new build
        described["validation"]["weights"] = validation.weights
    if cfg.annotator.kind == "offline":
        from pipeline.offline_annotator import FlagworldAnnotator

        described["annotator"]["offline_version"] = FlagworldAnnotator.version
    return redact_secrets(described)  # credentials in URLs (user:key@, ?api-key=)


class ResolvedBuild(BaseModel):
    """A build's settings resolved once, at its start (`resolve`): what every stage is handed
    (and validation shards on other machines receive), so that no stage re-derives a
    default, a model preset or the build's identity."""

    model_config = ConfigDict(frozen=True, protected_namespaces=())

    config: BuildConfig
    described: dict[str, Any]  # `BuildConfig.describe()`
    fingerprint: str
    inputs: dict[str, str]  # sha256 of the source's input files (`pipeline.sources`)
    validation: ResolvedValidation | None  # None: validation off
    key: str  # identity of the settings and their files, for this process's caches

    def __hash__(self) -> int:  # one build's parts (source, annotator, model) are cached by it
        return hash(self.key)

    @property
    def out(self) -> Path:
        return self.config.out

    def moved(self, **update: Any) -> ResolvedBuild:
        """This build with settings changed that are not part of its identity (`out`,
        `cache_dir`, `publish`, `scale`): nothing is resolved again."""
        if not set(update) <= OUTSIDE_IDENTITY:
            raise ValueError(f"{sorted(set(update) - OUTSIDE_IDENTITY)} define the build")
        cfg = self.config.model_copy(update=update)
        return self.model_copy(
            update={"config": cfg, "key": _cache_key(cfg, self.fingerprint, self.inputs)}
        )


def resolve(cfg: BuildConfig) -> ResolvedBuild:
    """`cfg` with every default applied and its identity computed: done once at the start of
    a build (it reads the model's config and hashes the weights and input files, which may
    change between two builds of one long-lived process, so it is never cached)."""
    from pipeline.sources import input_hashes

    validation = resolve_validation(cfg.validation) if cfg.validation.enabled else None
    described = _describe(cfg, validation)
    blob = json.dumps(described, sort_keys=True).encode()
    fingerprint = hashlib.sha256(blob).hexdigest()[:16]
    inputs = input_hashes(cfg.source)
    return ResolvedBuild(
        config=cfg,
        described=described,
        fingerprint=fingerprint,
        inputs=inputs,
        validation=validation,
        key=_cache_key(cfg, fingerprint, inputs),
    )


def _cache_key(cfg: BuildConfig, fingerprint: str, inputs: dict[str, str]) -> str:
    key = json.dumps([cfg.model_dump(mode="json"), fingerprint, inputs], sort_keys=True)
    return hashlib.sha256(key.encode()).hexdigest()
