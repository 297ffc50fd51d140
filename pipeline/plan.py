"""The build plan: what a build will ask, make, edit, take and cost, before it starts.

`plan(cfg, n_items)` counts per stage the LLM requests (from the annotator's settings: one
request per field, `n_votes` for the counterfact type; pipeline/annotate.py), the images
(`n_rephrases + n_locality + 1` per item) and the edits (one per item), and estimates the
seconds on the chosen device and the LLM and image-API cost from the calibration table shipped
with the project (`pipeline/calibration.yaml`: measured figures per backend, model shape and
device kind; prices from `pipeline.llm.default_prices()` or the build's own price table and
`image_backends.openai_api.PRICES`). A setting with no calibration entry is not estimated,
and the plan says so in plain words. First attempts only: re-asks and image replacements
come on top, and every stage is planned for every item (rejections only make it shorter).

`refine(plan, stage, seconds, items_done)` replaces a stage's estimate by the rate the build
measured on its first chunk; `estimate_vs_actual(plan, manifest)` lines the plan up with a
finished build's manifest. `render_plan(plan)` is the table `okedit build --plan` prints.

    python -m pipeline.plan measure   # re-measures the CPU rows of the calibration table
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml
from pydantic import BaseModel, Field

if TYPE_CHECKING:
    from pipeline.annotate import LLMAnnotatorConfig
    from pipeline.config import BuildConfig

CALIBRATION_PATH = Path(__file__).resolve().parent / "calibration.yaml"
STAGES = ("gather", "annotate", "images", "assemble", "validate", "publish")


class StagePlan(BaseModel):
    stage: str
    items: int
    requests: int = 0  # LLM requests, first attempts
    requests_by_template: dict[str, int] = Field(default_factory=dict)
    prompt_tokens: int = 0
    completion_tokens: int = 0
    images: int = 0  # first attempts
    edits: int = 0
    device: str = ""
    seconds: float | None = None  # None: not estimated (see `calibration`)
    llm_cost_usd: float | None = None
    image_cost_usd: float | None = None
    # the calibration entry used, or "no calibration for ...: not estimated"
    calibration: str = ""
    notes: list[str] = Field(default_factory=list)

    @property
    def estimated(self) -> bool:
        return self.seconds is not None


class BuildPlan(BaseModel):
    n_items: int
    source: str
    stages: list[StagePlan]
    seconds: float = 0.0  # the estimated stages' sum
    cost_usd: float = 0.0  # LLM and image API, where priced
    not_estimated: list[str] = Field(default_factory=list)  # what the totals leave out
    calibration_version: int = 0

    def stage(self, name: str) -> StagePlan:
        for stage in self.stages:
            if stage.stage == name:
                return stage
        raise KeyError(f"no stage {name!r} in the plan (stages: {[s.stage for s in self.stages]})")


# --------------------------------------------------------------------------- calibration


@functools.lru_cache(maxsize=4)
def _read(path: str) -> dict[str, Any]:
    return yaml.safe_load(Path(path).read_text(encoding="utf-8"))


def load_calibration(path: Path | str = CALIBRATION_PATH) -> dict[str, Any]:
    return _read(str(path))


def _entry(table: dict[str, Any], *keys: Any) -> Any:
    """table[k1][k2]... or None where any level is missing (YAML int keys tried as str)."""
    node: Any = table
    for key in keys:
        if not isinstance(node, dict):
            return None
        node = node.get(key, node.get(str(key)))
        if node is None:
            return None
    return node


def _missing(what: str) -> str:
    return f"no calibration for {what}: not estimated"


# --------------------------------------------------------------------------- counts


# sample answers of templates newer than the calibration table
SAMPLE_ANSWERS = {
    "image_free_locality": '{"question": "What is the capital city of Australia?", '
    '"answer": "canberra"}',
}


def llm_requests_per_item(config: LLMAnnotatorConfig) -> dict[str, int]:
    """Requests per item and template when nothing is asked again (`_ItemRun.run`):
    image_object for A, C and D; the target; `n_votes` counterfact votes; the rephrases and
    the locality answers in one request each; the text negatives unless k = 0; the image-free
    locality question when the LLM writes it (on, and no text-locality file)."""
    counts = {
        "image_object": 3,
        "target": 1,
        "counterfact_type": config.n_votes,
        "rephrases": 1,
        "locality": 1,
        "text_negatives": 1 if config.n_text_negatives > 0 else 0,
        "image_free_locality": int(
            config.image_free_locality and config.text_locality_file is None
        ),
    }
    return {template: n for template, n in counts.items() if n}


def tokens_per_request(
    config: LLMAnnotatorConfig, calibration: dict[str, Any] | None = None
) -> dict[str, tuple[int, int]]:
    """(prompt, completion) tokens per request of each template, estimated like the client's
    budget check: the shipped template rendered with the calibration's sample item (plus the
    JSON schema the request carries), and the calibration's sample answer."""
    from pipeline.annotate import (
        PROMPTS_DIR,
        CounterfactTypeOut,
        ImageFreeLocalityOut,
        ImageObjectOut,
        LocalityOut,
        RephrasesOut,
        TargetOut,
        TextNegativesOut,
        counted,
        load_template,
    )
    from pipeline.llm import estimate_tokens, json_object_messages, schema_of

    llm = (calibration or load_calibration())["llm"]
    item = llm["sample_item"]
    answers = "; ".join(dict.fromkeys(item["answers"]))
    answer = item["answers"][0]
    k = config.n_text_negatives
    requests: dict[str, tuple[type[BaseModel], dict[str, Any]]] = {
        "image_object": (ImageObjectOut, {"question": item["question"], "answer": answer}),
        "target": (TargetOut, {"question": item["question"], "answers": answers}),
        "counterfact_type": (
            CounterfactTypeOut,
            {
                "question": item["question"],
                "answer": answer,
                "target": item["target"],
                "image_object": item["image_object"],
            },
        ),
        "rephrases": (
            counted(
                RephrasesOut,
                rephrases=config.n_rephrases,
                rephrases_train=config.n_rephrases_train,
            ),
            {
                "question": item["question"],
                "n_eval": config.n_rephrases,
                "n_train": config.n_rephrases_train,
            },
        ),
        "locality": (
            LocalityOut,
            {"question": item["question"], "answers": answers, "target": item["target"]},
        ),
        "text_negatives": (
            counted(TextNegativesOut, text_negatives=max(k, 1)),
            {
                "question": item["question"],
                "answer": answer,
                "image_object": item["image_object"],
                "k": k,
            },
        ),
        "image_free_locality": (
            ImageFreeLocalityOut,
            {"question": item["question"], "answers": answers, "target": item["target"]},
        ),
    }
    json_schema = config.llm.structured_output != "json_object"
    out: dict[str, tuple[int, int]] = {}
    for template_id, (schema, variables) in requests.items():
        template = load_template(template_id, config.prompts_dir or PROMPTS_DIR)
        messages = template.render(**variables)
        if json_schema:  # the schema travels as response_format
            schema_chars = len(json.dumps(schema_of(schema), sort_keys=True))
            prompt = estimate_tokens(messages) + schema_chars // 4
        else:  # spelled out in the system message
            prompt = estimate_tokens(json_object_messages(messages, schema))
        sample = llm["sample_answers"].get(template_id, SAMPLE_ANSWERS.get(template_id, ""))
        completion = len(" ".join(sample.split())) // 4
        out[template_id] = (prompt, completion)
    return out


def images_per_item(cfg: BuildConfig) -> int:
    return cfg.images.n_rephrases + cfg.images.n_locality + 1


def resolved_image_model(cfg: BuildConfig) -> str:
    """The image model a build uses: `images.model`, else the backend's default."""
    settings = cfg.images
    if settings.model:
        return settings.model
    if settings.backend == "diffusers":
        from pipeline.image_backends.diffusion import DEFAULT_MODEL

        return DEFAULT_MODEL
    if settings.backend == "openai":
        from pipeline.image_backends.openai_api import DEFAULT_MODEL

        return DEFAULT_MODEL
    if settings.backend == "retrieve":
        return settings.clip_model
    return "flagworld/render"


def _image_size(cfg: BuildConfig) -> int:
    from pipeline.images import DEFAULT_SIZES

    size = cfg.images.size or DEFAULT_SIZES[cfg.images.backend]
    model = resolved_image_model(cfg)
    if cfg.images.backend == "openai" and model != "dall-e-2" and not cfg.images.size:
        size = 1024  # as pipeline.images does for dall-e-3 and gpt-image-*
    return size


def _device(setting: str) -> str:
    if setting != "auto":
        return setting
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def source_size(cfg: BuildConfig, calibration: dict[str, Any] | None = None) -> int | None:
    """Items the build will take: `limit`, else the split's size (None: unknown)."""
    table = calibration or load_calibration()
    if cfg.source.name == "flagworld":
        from pipeline.sources import get_source

        total = len(get_source(cfg.source, cache_dir=cfg.cache_dir).list_ids(None, cfg.seed))
    else:
        split = cfg.source.split if cfg.source.split.endswith("2014") else f"{cfg.source.split}2014"
        total = _entry(table, "sources", "okvqa", split)
    if cfg.limit is not None:
        return cfg.limit if total is None else min(cfg.limit, int(total))
    return None if total is None else int(total)


# --------------------------------------------------------------------------- the plan


def plan(
    cfg: BuildConfig,
    n_items: int,
    *,
    calibration: dict[str, Any] | None = None,
    annotator: LLMAnnotatorConfig | None = None,
) -> BuildPlan:
    """Per stage: requests, images, edits, seconds on the chosen device, LLM and image-API
    cost, and the calibration entry each figure comes from. `annotator` overrides the LLM
    annotator settings derived from `cfg` (tests; other vote or rephrase counts)."""
    table = calibration or load_calibration()
    stages = [
        _gather(cfg, n_items, table),
        _annotate(cfg, n_items, table, annotator),
        _images(cfg, n_items, table),
        _per_item_stage("assemble", "assemble", cfg, n_items, table),
        _validate(cfg, n_items, table),
        _per_item_stage("publish", "publish", cfg, n_items, table),
    ]
    return _totals(
        BuildPlan(
            n_items=n_items,
            source=cfg.source.name,
            stages=stages,
            calibration_version=int(table.get("version", 0)),
        )
    )


def plan_for_config(cfg: BuildConfig) -> BuildPlan:
    """The plan of this build (`okedit build --plan`; the first lines of every build): its
    items are `limit`, else the whole split (OK-VQA val2014: 5,046 items)."""
    n_items = source_size(cfg)
    if n_items is None:
        raise ValueError(
            f"cannot tell how many items source {cfg.source.name!r} split {cfg.source.split!r} "
            "has: set --limit to plan the build"
        )
    return plan(cfg, n_items)


def _totals(result: BuildPlan) -> BuildPlan:
    result.seconds = round(sum(s.seconds or 0.0 for s in result.stages), 3)
    costs = [c for s in result.stages for c in (s.llm_cost_usd, s.image_cost_usd) if c]
    result.cost_usd = round(sum(costs), 6)
    result.not_estimated = [
        f"{s.stage}: {s.calibration}" for s in result.stages if s.seconds is None
    ] + [f"{s.stage}: {n}" for s in result.stages for n in s.notes if "cost not estimated" in n]
    return result


def _gather(cfg: BuildConfig, n: int, table: dict[str, Any]) -> StagePlan:
    if cfg.source.name == "flagworld":
        return _per_item_stage("gather", "gather", cfg, n, table)
    return StagePlan(
        stage="gather",
        items=n,
        device="network",
        calibration=_missing(f"downloading {cfg.source.name} (network)"),
    )


def _per_item_stage(
    stage: str, key: str, cfg: BuildConfig, n: int, table: dict[str, Any]
) -> StagePlan:
    """A CPU stage with a per-item figure measured on the flagworld."""
    rate = _entry(table, "stages", cfg.source.name, "cpu", key)
    if rate is None:
        return StagePlan(
            stage=stage,
            items=n,
            device="cpu",
            calibration=_missing(f"{stage} of {cfg.source.name}"),
        )
    return StagePlan(
        stage=stage,
        items=n,
        device="cpu",
        seconds=round(n * float(rate), 3),
        calibration=f"stages.{cfg.source.name}.cpu.{key}: {rate} s/item",
    )


def _annotate(
    cfg: BuildConfig, n: int, table: dict[str, Any], annotator: LLMAnnotatorConfig | None
) -> StagePlan:
    if cfg.annotator.kind == "offline":
        step = _per_item_stage("annotate", "annotate_offline", cfg, n, table)
        step.notes.append("offline annotator: no LLM request")
        return step
    from pipeline.annotate import settings_config

    # no request account: counting sends nothing
    config = annotator or settings_config(cfg.annotator, cache_dir=cfg.cache_dir)
    per_item = llm_requests_per_item(config)
    tokens = tokens_per_request(config, table)
    by_template = {t: c * n for t, c in per_item.items()}
    prompt = sum(c * tokens[t][0] for t, c in by_template.items())
    completion = sum(c * tokens[t][1] for t, c in by_template.items())
    llm = config.llm
    step = StagePlan(
        stage="annotate",
        items=n,
        requests=sum(by_template.values()),
        requests_by_template=by_template,
        prompt_tokens=prompt,
        completion_tokens=completion,
        device=f"LLM {llm.model}",
    )
    price = llm.price()
    if price is None:
        step.notes.append(f"no price for LLM model {llm.model!r}: cost not estimated")
    else:
        cost = (prompt * price.prompt_per_1m + completion * price.completion_per_1m) / 1e6
        if llm.batch_mode:
            cost *= llm.batch_discount
            step.notes.append(f"Batch API: list price x {llm.batch_discount}")
        step.llm_cost_usd = round(cost, 6)
        if llm.budget_usd is not None and cost > llm.budget_usd:
            step.notes.append(
                f"the estimate exceeds the budget (${llm.budget_usd:,.2f}): the build stops "
                "there, and a re-run with a raised budget continues"
            )
        step.notes.append(
            f"price {llm.model}: ${price.prompt_per_1m}/${price.completion_per_1m} per 1M "
            "prompt/completion tokens"
        )
    step.notes.append(
        f"{sum(per_item.values())} requests per item ({n_votes_note(per_item)}); each re-ask of a "
        f"malformed or invalid answer adds one (up to {config.retries} per field)"
    )
    rate = _entry(table, "llm", "seconds_per_request", llm.model)
    if llm.batch_mode:
        step.calibration = _missing("Batch API turnaround (up to 24 h)")
    elif rate is None:
        step.calibration = _missing(f"LLM latency of {llm.model}")
        if llm.requests_per_minute:
            floor = step.requests / llm.requests_per_minute * 60
            step.notes.append(f"at least {floor:.0f} s at {llm.requests_per_minute} requests/min")
    else:
        step.seconds = round(step.requests * float(rate), 3)
        step.calibration = f"llm.seconds_per_request.{llm.model}: {rate} s"
    return step


def n_votes_note(per_item: dict[str, int]) -> str:
    return ", ".join(f"{t} x{c}" for t, c in per_item.items())


def _images(cfg: BuildConfig, n: int, table: dict[str, Any]) -> StagePlan:
    settings = cfg.images
    backend = settings.backend
    count = n * images_per_item(cfg)
    size = _image_size(cfg)
    model = resolved_image_model(cfg)
    step = StagePlan(stage="images", items=n, images=count)
    step.notes.append(
        f"{images_per_item(cfg)} images per item ({settings.n_rephrases} rephrases, "
        f"{settings.n_locality} near-miss, 1 training negative); replacements of images that "
        f"fail a check add more (up to {settings.max_attempts} attempts each)"
    )
    if backend == "render":
        step.device = "cpu"
        rate = _entry(table, "images", "render", "cpu", size)
        if rate is None:
            step.calibration = _missing(f"the render backend at {size} px")
        else:
            step.seconds = round(count * float(rate), 3)
            step.calibration = f"images.render.cpu.{size}: {rate} s/image"
        return step
    if backend == "openai":
        from pipeline.image_backends.openai_api import price_per_image

        step.device = f"Images API {model}"
        price = price_per_image(model, size, settings.quality)
        if price is None:
            step.notes.append(
                f"no price for image model {model!r} at {size}² quality {settings.quality}: "
                "cost not estimated"
            )
        else:
            step.image_cost_usd = round(count * price, 6)
            step.notes.append(f"price {model} {size}²: ${price} per image")
        rate = _entry(table, "images", "openai_seconds_per_request", model)
        if rate is None:
            step.calibration = _missing(f"Images API latency of {model}")
        else:
            step.seconds = round(count * float(rate) / settings.concurrency, 3)
            step.calibration = f"images.openai_seconds_per_request.{model}: {rate} s"
        return step
    device = _device(settings.device)
    step.device = device
    if backend == "retrieve":
        step.calibration = _missing(f"the retrieve backend (CLIP {model}) on {device}")
        return step
    return _diffusers(step, cfg, model, size, device, table)


def _diffusers(
    step: StagePlan, cfg: BuildConfig, model: str, size: int, device: str, table: dict[str, Any]
) -> StagePlan:
    settings = cfg.images
    shape = _entry(table, "images", "diffusers_models", model)
    if shape is None:
        step.calibration = _missing(f"diffusers model {model!r}")
        return step
    stage_rate = _entry(table, "images", "diffusers", device, "stage_s_per_image", shape, size)
    if stage_rate is not None:
        step.seconds = round(step.images * float(stage_rate), 3)
        step.calibration = (
            f"images.diffusers.{device}.stage_s_per_image.{shape}.{size}: {stage_rate} s/image"
        )
        return step
    unet = _entry(table, "images", "diffusers", device, "unet_s_per_image_eval", shape, size)
    vae = _entry(table, "images", "diffusers", device, "vae_s_per_image", size)
    if unet is None or vae is None:
        step.calibration = _missing(f"diffusers {shape} ({model}) at {size}² on {device}")
        return step
    if settings.batch_size != "auto" and settings.batch_size < 8:
        step.notes.append(
            f"the GPU figures were measured in batches of 8-16 images; batch_size "
            f"{settings.batch_size} makes each image slower than estimated (batch_size auto "
            "sizes batches to the GPU's memory)"
        )
    guided = 2 if settings.guidance_scale > 1 else 1  # diffusers' classifier-free guidance
    gpu = settings.steps * guided * float(unet) + float(vae)
    host = _entry(table, "images", "host_s_per_image", "cpu", size)
    per_image = gpu + (float(host) if host is not None else 0.0)
    step.seconds = round(step.images * per_image, 3)
    step.calibration = (
        f"images.diffusers.{device}: {shape} UNet {unet} s/eval x {settings.steps} steps"
        f"{' x 2 (guidance)' if guided == 2 else ''} + VAE {vae} s = {gpu:.4f} s/image"
        + (f"; host (PNG + checks) {host} s/image" if host is not None else "")
    )
    if host is None:
        step.notes.append(_missing(f"PNG encoding and checks at {size}²") + " (GPU time only)")
    else:
        step.notes.append(
            "host time from the CPU row of the calibration (PNG encoding overlaps the next "
            "batch, the checks run beside other chunks): an upper bound on a larger machine"
        )
    return step


def _validate(cfg: BuildConfig, n: int, table: dict[str, Any]) -> StagePlan:
    settings = cfg.validation
    if not settings.enabled:
        return StagePlan(stage="validate", items=n, seconds=0.0, calibration="validation disabled")
    device = _device(settings.device)
    shape = _entry(table, "validation", "models", settings.model)
    step = StagePlan(stage="validate", items=n, edits=n, device=device)
    if shape is None:
        step.calibration = _missing(f"validation model {settings.model!r} on {device}")
        return step
    answers = bool(settings.editor.get("generate_answers", True))
    which = "answers" if answers else "no_answers"
    rate = _entry(table, "validation", "s_per_item", shape, device, which)
    if rate is None:
        step.calibration = _missing(f"validation of {shape} on {device} ({which})")
        return step
    seconds = n * float(rate)
    step.calibration = f"validation.s_per_item.{shape}.{device}.{which}: {rate} s/item"
    load = _entry(table, "validation", "load_s", shape, device)
    if load is not None:
        seconds += float(load)
        step.calibration += f" + load {load} s"
    else:
        step.notes.append("model load time not calibrated: not included")
    if cfg.scale.validate_deployment:
        seconds /= cfg.scale.shards
        step.notes.append(f"spread over {cfg.scale.shards} shard runs (one GPU each)")
    step.seconds = round(seconds, 3)
    return step


# --------------------------------------------------------------------------- refine, compare


def refine(
    build_plan: BuildPlan,
    stage: str,
    measured_seconds: float,
    items_done: int,
    *,
    cost_usd: float | None = None,
) -> BuildPlan:
    """A new plan whose `stage` estimate is the rate the build measured on its first chunk
    (`items_done` items in `measured_seconds`), scaled to the stage's items; `cost_usd`, the
    chunk's LLM or image-API spend, refines the stage's cost the same way."""
    if items_done < 1:
        raise ValueError(f"refine needs at least one item done, got {items_done}")
    if measured_seconds < 0:
        raise ValueError(f"measured_seconds must be >= 0, got {measured_seconds}")
    new = build_plan.model_copy(deep=True)
    step = new.stage(stage)
    rate = measured_seconds / items_done
    step.seconds = round(rate * step.items, 3)
    step.calibration = (
        f"measured on the build's first chunk: {items_done} items in {measured_seconds:.2f} s "
        f"({rate:.4f} s/item)"
    )
    if cost_usd is not None:
        scaled = round(cost_usd / items_done * step.items, 6)
        if step.image_cost_usd is not None and step.llm_cost_usd is None:
            step.image_cost_usd = scaled
        else:
            step.llm_cost_usd = scaled
        step.notes = [n for n in step.notes if "cost not estimated" not in n]
        step.notes.append(f"cost measured on the first chunk: ${cost_usd:.6f} for {items_done}")
    return _totals(new)


def refine_from_chunk(
    build_plan: BuildPlan, report: dict[str, dict[str, Any]], items: int
) -> tuple[BuildPlan, list[str]]:
    """`build_plan` with the estimate of every stage that did work on this chunk of `items`
    items (a `pipeline.stages.run_chunk_stages` report) replaced by the chunk's rate;
    returns the new plan and the stages it refined."""
    refined = []
    for stage, ran in report.items():
        if ran.get("ran") and items > 0 and stage in {s.stage for s in build_plan.stages}:
            build_plan = refine(build_plan, stage, ran["end"] - ran["start"], items)
            refined.append(stage)
    return build_plan, refined


def estimate_vs_actual(build_plan: BuildPlan, manifest: dict[str, Any]) -> list[dict[str, Any]]:
    """Rows {stage, quantity, estimate, actual, ratio} (ratio = actual / estimate) for the
    manifest and the card. Reads `manifest["stage_seconds"]` ({stage: wall seconds}),
    `manifest["build_seconds"]` (the run's wall time from its first chunk to its last),
    `manifest["llm"]` (the ledger's usage report) and `manifest["stages"]` (per-stage
    ok/rejected counts). A quantity the manifest lacks has
    actual None; one the plan did not estimate has estimate None."""
    rows: list[dict[str, Any]] = []

    def row(stage: str, quantity: str, estimate: Any, actual: Any) -> None:
        ratio = None
        if estimate and actual is not None:
            ratio = round(float(actual) / float(estimate), 3)
        rows.append(
            {
                "stage": stage,
                "quantity": quantity,
                "estimate": estimate,
                "actual": actual,
                "ratio": ratio,
            }
        )

    seconds = manifest.get("stage_seconds") or {}
    llm = manifest.get("llm") or {}
    counts = manifest.get("stages") or {}
    for step in build_plan.stages:
        row(step.stage, "seconds", step.seconds, seconds.get(step.stage))
        if step.requests:
            row(step.stage, "LLM requests", step.requests, llm.get("requests"))
            row(step.stage, "LLM tokens", step.prompt_tokens + step.completion_tokens,
                llm.get("total_tokens"))  # fmt: skip
            row(step.stage, "LLM cost (USD)", step.llm_cost_usd, llm.get("cost_usd"))
        if step.images:
            done = counts.get("images", {}).get("ok")
            per_item = step.images // max(1, step.items)
            row(
                step.stage,
                "images (accepted)",
                step.images,
                None if done is None else done * per_item,
            )
        if step.edits:
            row(step.stage, "edits", step.edits, counts.get("validate", {}).get("ok"))
    # the whole run's wall time (stages of one chunk task overlap) against the estimates of
    # the stages it timed (publishing writes the manifest, so it times itself nowhere)
    timed = [s.seconds for s in build_plan.stages if s.stage in seconds and s.seconds]
    wall = manifest.get("build_seconds", sum(seconds.values()) if seconds else None)
    row("total", "seconds", round(sum(timed), 3) if timed else build_plan.seconds, wall)
    return rows


# --------------------------------------------------------------------------- rendering


def duration(seconds: float | None) -> str:
    if seconds is None:
        return "not estimated"
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes = seconds / 60
    if minutes < 60:
        return f"{minutes:.1f} min"
    hours = int(minutes // 60)
    return f"{hours} h {int(round(minutes - 60 * hours)):02d} min"


def _money(value: float | None) -> str:
    return "-" if value is None else f"${value:,.2f}"


def render_plan(build_plan: BuildPlan) -> str:
    """The plan as a markdown table, its totals and what it leaves out."""
    lines = [
        f"Build plan: {build_plan.n_items:,} items from {build_plan.source}",
        "",
        "| stage | device | LLM requests | images | edits | time | LLM cost | image cost "
        "| calibration |",
        "|---|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for s in build_plan.stages:
        lines.append(
            f"| {s.stage} | {s.device or '-'} | {s.requests:,} | {s.images:,} | {s.edits:,} "
            f"| {duration(s.seconds)} | {_money(s.llm_cost_usd)} | {_money(s.image_cost_usd)} "
            f"| {s.calibration} |"
        )
    complete = not build_plan.not_estimated
    lines += [
        "",
        f"Estimated time: {duration(build_plan.seconds)}"
        + ("" if complete else " (the estimated stages only)")
        + f"; estimated cost: {_money(build_plan.cost_usd)}.",
    ]
    tokens = sum(s.prompt_tokens + s.completion_tokens for s in build_plan.stages)
    if tokens:
        lines.append(f"LLM tokens (estimate): {tokens:,}.")
    if not complete:
        lines += ["", "Not estimated:"] + [f"- {what}" for what in build_plan.not_estimated]
    notes = [f"- {s.stage}: {n}" for s in build_plan.stages for n in s.notes]
    if notes:
        lines += ["", "Notes:", *notes]
    return "\n".join(lines)


# --------------------------------------------------------------------------- measuring


def measure_cpu(n_items: int = 40, out: Path | None = None) -> dict[str, Any]:
    """The CPU rows of the calibration table: the flagworld stages (the demo's settings) in
    two chunks of `n_items / 2`, per item from the second (warm) chunk and the first chunk's
    extra as a fixed cost (source set-up, model and MiniLM loads); the publish step for all
    items; and the host work per generated image (PNG encoding of a photo-like image and the
    images stage's checks) at 512² and 1024². Run where the figures should hold."""
    import tempfile
    import time

    from PIL import Image
    from sklearn.datasets import load_sample_images

    from pipeline import stages
    from pipeline.config import BuildConfig, resolve
    from pipeline.image_backends.checks import ImageChecker, fingerprint
    from pipeline.image_backends.diffusion import _png

    half = max(1, n_items // 2)
    root = Path(out or tempfile.mkdtemp(prefix="okedit-measure-"))
    cfg = BuildConfig(limit=2 * half, chunk_size=half, out=root / "b", cache_dir=root / "c")
    build = resolve(cfg)
    names = {"annotate": "annotate_offline"}  # the calibration's name of a stage
    per_item: dict[str, float] = {}
    fixed: dict[str, float] = {}
    for stage in stages.STAGE_NAMES:
        name = names.get(stage, stage)
        seconds = []
        for index in (0, 1):
            start = time.perf_counter()
            stages.run_chunk(build, stage, index)
            seconds.append(time.perf_counter() - start)
        per_item[name] = seconds[1] / half
        fixed[name] = max(0.0, seconds[0] - seconds[1])
    start = time.perf_counter()
    stages.finalize(build)
    publish = time.perf_counter() - start
    n_images = half * images_per_item(cfg)
    result: dict[str, Any] = {
        "items": 2 * half,
        "stages_s_per_item": {
            k: round(v, 4) for k, v in per_item.items() if k not in ("images", "validate")
        }
        | {"publish": round(publish / (2 * half), 4)},
        "fixed_s": {k: round(v, 2) for k, v in fixed.items()},
        "render_s_per_image": round(per_item["images"] * half / n_images, 4),
        "validate_s_per_item": round(per_item["validate"], 4),
    }
    photos = [Image.fromarray(a) for a in load_sample_images().images]
    original = fingerprint(_png(photos[0]))
    host: dict[int, float] = {}
    for size in (512, 1024):
        images = [p.resize((size, size)).rotate(7 * i) for i, p in enumerate(photos * 4)]
        checker, chosen = ImageChecker(), []
        start = time.perf_counter()
        for img in images:
            checked = checker.check(_png(img), original, chosen)
            if not isinstance(checked, str):
                chosen.append(checked.fingerprint)
        host[size] = round((time.perf_counter() - start) / len(images), 4)
    result["host_s_per_image"] = host
    return result


def main(argv: list[str] | None = None) -> None:
    import argparse

    parser = argparse.ArgumentParser(description="Build plan calibration helpers")
    sub = parser.add_subparsers(dest="command", required=True)
    measure = sub.add_parser("measure", help="measure the CPU rows of pipeline/calibration.yaml")
    measure.add_argument("--items", type=int, default=40)
    measure.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    args = parser.parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    print(json.dumps(measure_cpu(args.items), indent=2))


if __name__ == "__main__":
    main()
