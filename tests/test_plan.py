"""The build plan (issue 17): counts, seconds and costs equal hand computations from the
calibration table; the LLM request count equals what the annotator really sends; a model
with no calibration entry is said to be not estimated, never extrapolated."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import yaml

from pipeline.config import BuildConfig
from pipeline.llm import default_prices
from pipeline.plan import (
    CALIBRATION_PATH,
    BuildPlan,
    estimate_vs_actual,
    load_calibration,
    plan,
    plan_for_config,
    refine,
    render_plan,
    tokens_per_request,
)

CAL = load_calibration()
N_VAL = 5046  # OK-VQA val2014
PER_ITEM_IMAGES = 10 + 3 + 1


def okvqa_full_build(**images: Any) -> BuildConfig:
    """OK-VQA val, gpt-4o-mini, SDXL-Turbo-like diffusers settings on CUDA, BLIP-2 2.7B."""
    return BuildConfig.model_validate(
        {
            "source": {"name": "okvqa-hub", "split": "val2014"},
            "annotator": {"kind": "llm", "llm_model": "gpt-4o-mini"},
            "images": {"backend": "diffusers", "device": "cuda", "batch_size": "auto", **images},
            "validation": {"model": "Salesforce/blip2-opt-2.7b", "device": "cuda"},
        }
    )


def test_the_calibration_table_holds_the_measured_gpu_figures() -> None:
    raw = yaml.safe_load(CALIBRATION_PATH.read_text())
    cuda = raw["images"]["diffusers"]["cuda"]
    assert cuda["unet_s_per_image_eval"] == {
        "sdxl": {1024: 0.0183, 512: 0.0044},
        "sd15": {512: 0.0031},
    }
    assert cuda["vae_s_per_image"] == {1024: 0.0775, 512: 0.0138}
    assert raw["validation"]["s_per_item"]["blip2-opt-2.7b"]["cuda"] == {
        "answers": 0.269,
        "no_answers": 0.207,
    }
    assert raw["sources"]["okvqa"]["val2014"] == N_VAL


def test_okvqa_val_plan_equals_hand_computation() -> None:
    cfg = okvqa_full_build()  # defaults: stabilityai/sdxl-turbo, 512², 2 steps, guidance 0
    p = plan_for_config(cfg)
    assert isinstance(p, BuildPlan) and p.n_items == N_VAL

    annotate = p.stage("annotate")
    # per item: image_object for A, C, D; target; 3 votes; rephrases; locality; negatives;
    # the image-free locality question (EasyEdit's `loc`)
    assert annotate.requests == N_VAL * (3 + 1 + 3 + 1 + 1 + 1 + 1) == 55_506
    assert annotate.requests_by_template["counterfact_type"] == 3 * N_VAL
    tokens = tokens_per_request(_annotator_config(cfg))
    prompt = sum(annotate.requests_by_template[t] * tokens[t][0] for t in tokens)
    completion = sum(annotate.requests_by_template[t] * tokens[t][1] for t in tokens)
    assert (annotate.prompt_tokens, annotate.completion_tokens) == (prompt, completion)
    price = default_prices()["gpt-4o-mini"]
    cost = (prompt * price.prompt_per_1m + completion * price.completion_per_1m) / 1e6
    assert annotate.llm_cost_usd == pytest.approx(cost, abs=1e-6)
    assert annotate.seconds is None
    assert annotate.calibration == "no calibration for LLM latency of gpt-4o-mini: not estimated"

    images = p.stage("images")
    unet = CAL["images"]["diffusers"]["cuda"]["unet_s_per_image_eval"]["sdxl"][512]
    vae = CAL["images"]["diffusers"]["cuda"]["vae_s_per_image"][512]
    host = CAL["images"]["host_s_per_image"]["cpu"][512]
    assert images.images == N_VAL * PER_ITEM_IMAGES == 70_644
    assert images.seconds == pytest.approx(70_644 * (2 * unet + vae + host), abs=1e-2)
    assert "0.0226 s/image" in images.calibration  # 2 x 0.0044 + 0.0138
    assert images.image_cost_usd is None and images.device == "cuda"
    assert not any("batch_size" in n for n in images.notes)
    small = plan(okvqa_full_build(batch_size=1), 10).stage("images")
    assert small.seconds == pytest.approx(140 * (2 * unet + vae + host), abs=1e-3)
    assert any("batch_size 1 makes each image slower" in n for n in small.notes)

    validate = p.stage("validate")
    assert validate.edits == N_VAL
    assert validate.seconds == pytest.approx(N_VAL * 0.269, abs=1e-2)  # with answers

    for stage in ("gather", "assemble", "publish"):
        assert p.stage(stage).seconds is None
        assert p.stage(stage).calibration.startswith("no calibration for ")
    assert p.seconds == pytest.approx(images.seconds + validate.seconds, abs=1e-2)
    assert p.cost_usd == pytest.approx(annotate.llm_cost_usd, abs=1e-6)
    assert len(p.not_estimated) == 4

    text = render_plan(p)
    assert "Build plan: 5,046 items from okvqa-hub" in text
    assert "| annotate | LLM gpt-4o-mini | 55,506 |" in text
    assert "(the estimated stages only)" in text and "Not estimated:" in text


def test_guidance_doubles_the_unet_work_and_1024_uses_its_own_rows() -> None:
    """The authors' kind of setting: SDXL base at 1024², 30 steps with guidance."""
    cfg = okvqa_full_build(
        model="stabilityai/stable-diffusion-xl-base-1.0", size=1024, steps=30, guidance_scale=5.0
    )
    images = plan(cfg, 100).stage("images")
    cuda = CAL["images"]["diffusers"]["cuda"]
    per_image = 30 * 2 * cuda["unet_s_per_image_eval"]["sdxl"][1024] + cuda["vae_s_per_image"][1024]
    assert per_image == pytest.approx(1.1755)  # ≈ 1.17 s per image (docs/benchmarks.md)
    host = CAL["images"]["host_s_per_image"]["cpu"][1024]
    assert images.seconds == pytest.approx(100 * PER_ITEM_IMAGES * (per_image + host), abs=1e-2)

    sd15 = plan(okvqa_full_build(model="runwayml/stable-diffusion-v1-5", steps=4), 10)
    unet = cuda["unet_s_per_image_eval"]["sd15"][512]
    host = CAL["images"]["host_s_per_image"]["cpu"][512]
    expected = 10 * PER_ITEM_IMAGES * (4 * unet + cuda["vae_s_per_image"][512] + host)
    assert sd15.stage("images").seconds == pytest.approx(expected, abs=1e-3)


def test_the_flagworld_demo_plan() -> None:
    p = plan_for_config(BuildConfig(limit=40))  # `okedit demo`: 40 flagworld items, CPU
    assert p.n_items == 40 and p.source == "flagworld"
    cpu = CAL["stages"]["flagworld"]["cpu"]
    validation = CAL["validation"]
    expected = {
        "gather": 40 * cpu["gather"],
        "annotate": 40 * cpu["annotate_offline"],
        "images": 40 * PER_ITEM_IMAGES * CAL["images"]["render"]["cpu"][64],
        "assemble": 40 * cpu["assemble"],
        "validate": 40 * validation["s_per_item"]["tiny-flagworld"]["cpu"]["answers"]
        + validation["load_s"]["tiny-flagworld"]["cpu"],
        "publish": 40 * cpu["publish"],
    }
    assert {s.stage: s.seconds for s in p.stages} == pytest.approx(expected, abs=1e-3)
    assert p.seconds == pytest.approx(sum(expected.values()), abs=1e-2)
    assert p.not_estimated == [] and p.cost_usd == 0
    assert p.stage("annotate").requests == 0 and p.stage("images").images == 560
    assert p.stage("validate").edits == 40
    assert "Not estimated" not in render_plan(p)

    import torch

    whole = plan_for_config(BuildConfig())  # no limit: every flagworld item
    from pipeline.sources import get_source

    source = get_source(BuildConfig().source, cache_dir=Path(".okedit-cache"))
    assert whole.n_items == len(source.list_ids(None, 0)) > 40
    if not torch.cuda.is_available():
        assert {s.device for s in p.stages} == {"cpu"}


def test_unknown_settings_are_stated_not_invented() -> None:
    p = plan(okvqa_full_build(model="acme/unknown-diffusion"), 10)
    assert p.stage("images").seconds is None
    assert (
        p.stage("images").calibration
        == "no calibration for diffusers model 'acme/unknown-diffusion': not estimated"
    )
    odd = plan(okvqa_full_build(size=768), 10).stage("images")  # a calibrated model, odd size
    assert odd.seconds is None
    assert odd.calibration == (
        "no calibration for diffusers sdxl (stabilityai/sdxl-turbo) at 768² on cuda: not estimated"
    )
    on_cpu = plan(okvqa_full_build(device="cpu"), 10).stage("images")
    assert on_cpu.seconds is None and "on cpu: not estimated" in on_cpu.calibration

    cfg = okvqa_full_build().model_copy(deep=True)
    cfg.annotator.llm_model = "my-local-llama"
    cfg.validation.model = "llava-hf/llava-1.5-7b-hf"
    other = plan(cfg, 10)
    annotate = other.stage("annotate")
    assert annotate.requests == 110 and annotate.llm_cost_usd is None
    assert "no price for LLM model 'my-local-llama': cost not estimated" in annotate.notes
    assert other.stage("validate").seconds is None
    assert other.stage("validate").calibration == (
        "no calibration for validation model 'llava-hf/llava-1.5-7b-hf' on cuda: not estimated"
    )
    text = render_plan(other)
    assert "- annotate: no price for LLM model 'my-local-llama': cost not estimated" in text
    assert "- validate: no calibration for validation model" in text


def test_image_api_cost_from_the_backend_prices() -> None:
    cfg = okvqa_full_build().model_copy(deep=True)
    cfg.images.backend = "openai"  # dall-e-2 at 256² by default
    images = plan(cfg, N_VAL).stage("images")
    assert images.image_cost_usd == pytest.approx(70_644 * 0.016)
    assert images.seconds is None and "Images API latency of dall-e-2" in images.calibration
    assert images.device == "Images API dall-e-2"


def test_budget_and_unknown_split_are_said_up_front() -> None:
    cfg = okvqa_full_build().model_copy(deep=True)
    cfg.annotator.llm = {"budget_usd": 1.0}
    annotate = plan_for_config(cfg).stage("annotate")
    assert annotate.llm_cost_usd > 1.0
    assert any(n.startswith("the estimate exceeds the budget ($1.00)") for n in annotate.notes)

    cfg.source.split = "test2015"
    with pytest.raises(ValueError, match="set --limit to plan the build"):
        plan_for_config(cfg)
    assert plan_for_config(cfg.model_copy(update={"limit": 7})).n_items == 7


def test_requests_per_item_are_what_the_annotator_sends(tmp_path: Path) -> None:
    """Counted against the real annotator on the loopback server, with other counts."""
    from pipeline.annotate import LLMAnnotatorConfig, make_annotator
    from tests.fixtures_servers import llm_server, okedit_responder, schema_name
    from tests.test_llm_annotator import make_items

    schema_to_template = {
        "ImageObjectOut": "image_object",
        "TargetOut": "target",
        "CounterfactTypeOut": "counterfact_type",
        "RephrasesOut": "rephrases",
        "LocalityOut": "locality",
        "TextNegativesOut": "text_negatives",
        "ImageFreeLocalityOut": "image_free_locality",
    }
    for counts in ({"n_votes": 3}, {"n_votes": 5, "n_text_negatives": 0}):
        with llm_server(responder=okedit_responder, keep_raw=True) as server:
            settings = {
                "llm": {
                    "base_url": server.url,
                    "model": "gpt-4o-mini",
                    "api_key": "sk-test",
                    "cache_path": str(tmp_path / f"llm-{len(counts)}.sqlite"),
                    "max_retries": 0,
                },
                **counts,
            }
            make_annotator(settings).annotate(make_items(3))
            sent = Counter(schema_to_template[schema_name(b)] for b in server.log.raw)
        config = LLMAnnotatorConfig.model_validate(settings)
        planned = plan(okvqa_full_build(), 3, annotator=config).stage("annotate")
        assert planned.requests_by_template == dict(sent), counts
        assert planned.requests == server.log.requests


def test_prompt_tokens_counted_from_the_template_by_hand() -> None:
    from pipeline.annotate import LLMAnnotatorConfig

    template = yaml.safe_load(Path("pipeline/prompts/target.yaml").read_text())
    item = CAL["llm"]["sample_item"]
    answers = "; ".join(dict.fromkeys(item["answers"]))
    system = template["system"].strip()
    user = template["user"].format(question=item["question"], answers=answers).strip()
    schema = (
        '{"additionalProperties": false, "properties": {"target": {"title": "Target", '
        '"type": "string"}}, "required": ["target"], "title": "TargetOut", "type": "object"}'
    )
    by_hand = (len(system) + len(user)) // 4 + 2 * 4 + len(schema) // 4
    answer = len('{"target": "surfing"}') // 4
    assert tokens_per_request(LLMAnnotatorConfig())["target"] == (by_hand, answer)


def test_refine_from_the_first_chunk_and_estimate_vs_actual() -> None:
    p = plan(okvqa_full_build(), N_VAL)
    before = p.seconds
    refined = refine(p, "annotate", measured_seconds=48.0, items_done=16, cost_usd=0.01)
    step = refined.stage("annotate")
    assert step.seconds == pytest.approx(48.0 / 16 * N_VAL)
    assert step.calibration.startswith("measured on the build's first chunk: 16 items in 48.00 s")
    assert step.llm_cost_usd == pytest.approx(0.01 / 16 * N_VAL)
    assert refined.seconds == pytest.approx(before + step.seconds, abs=1e-2)
    assert not any(n.startswith("annotate:") for n in refined.not_estimated)
    assert p.stage("annotate").seconds is None  # the plan given is not changed
    with pytest.raises(ValueError, match="at least one item"):
        refine(p, "images", 1.0, 0)

    manifest = {
        "stage_seconds": {"annotate": 15000.0, "images": 9000.0, "validate": 1300.0},
        "llm": {"requests": 50_500, "total_tokens": 14_000_000, "cost_usd": 3.0},
        "stages": {"images": {"ok": 5000, "rejected": 46}, "validate": {"ok": 4990}},
    }
    rows = {(r["stage"], r["quantity"]): r for r in estimate_vs_actual(refined, manifest)}
    images = rows[("images", "seconds")]
    assert images["estimate"] == refined.stage("images").seconds and images["actual"] == 9000.0
    assert images["ratio"] == pytest.approx(9000.0 / images["estimate"], abs=1e-3)
    assert rows[("annotate", "LLM requests")] == {
        "stage": "annotate",
        "quantity": "LLM requests",
        "estimate": 55_506,
        "actual": 50_500,
        "ratio": round(50_500 / 55_506, 3),
    }
    assert rows[("images", "images (accepted)")]["actual"] == 5000 * PER_ITEM_IMAGES
    assert rows[("validate", "edits")]["actual"] == 4990
    assert rows[("gather", "seconds")]["estimate"] is None
    assert rows[("gather", "seconds")]["ratio"] is None
    assert rows[("total", "seconds")]["actual"] == 25300.0


def _annotator_config(cfg: BuildConfig) -> Any:
    from pipeline.annotate import annotator_config

    return annotator_config(cfg)


def test_a_chunk_refines_the_stages_it_did_and_no_other() -> None:
    from pipeline.plan import refine_from_chunk

    p = plan(okvqa_full_build(), N_VAL)
    report = {
        "gather": {"start": 0.0, "end": 0.0, "ran": False},  # finished by an earlier run
        "annotate": {"start": 10.0, "end": 58.0, "ran": True},
    }
    refined, stages = refine_from_chunk(p, report, items=16)
    assert stages == ["annotate"]
    assert refined.stage("annotate").seconds == pytest.approx(48.0 / 16 * N_VAL)
    assert refined.stage("gather").seconds == p.stage("gather").seconds
