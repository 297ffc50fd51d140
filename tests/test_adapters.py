"""Each family adapter on a tiny random model of its family: inputs, target scoring, the
cached-forward tail of the fast path, generation, loading, and clear errors."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from editors.adapters import (
    ADAPTERS,
    ModulePathError,
    TargetEncodingError,
    UnsupportedModelError,
    VLMAdapter,
    family_of,
    load_model,
)
from editors.adapters.base import IGNORE
from editors.adapters.random_models import random_adapter
from editors.config import ModelConfig

CORPUS = [
    "what is the capital of this country",
    "which city is the capital",
    "paris lyon rome berlin",
    "what colour is the flag red blue",
]
FAMILIES = sorted(ADAPTERS)
RED = Image.new("RGB", (40, 30), (200, 10, 10))
BLUE = Image.new("RGB", (30, 40), (10, 10, 200))


@pytest.fixture(scope="module")
def adapters() -> dict[str, VLMAdapter]:
    torch.set_num_threads(1)
    return {family: random_adapter(family, CORPUS) for family in FAMILIES}


def _batch(adapter: VLMAdapter):
    return adapter.build_inputs(
        [RED, BLUE, RED],
        ["what is the capital of this country", "which city", "what colour is the flag"],
        ["paris", "lyon rome", "red"],
    )


@pytest.mark.parametrize("family", FAMILIES)
def test_build_inputs_aligns_targets(adapters: dict[str, VLMAdapter], family: str) -> None:
    adapter = adapters[family]
    batch = _batch(adapter)
    assert batch.image_index == [0, 1, 0]  # the red image is processed once
    tok = adapter.tokenizer
    for row, target in enumerate(["paris", "lyon rome", "red"]):
        ids = tok(target, add_special_tokens=False)["input_ids"]
        n = int(batch.prompt_lengths[row])
        # positions n-1 .. n+m-2 predict the target tokens, which follow at n .. n+m-1
        assert batch.labels[row, n - 1 : n - 1 + len(ids)].tolist() == ids
        assert batch.input_ids[row, n : n + len(ids)].tolist() == ids
        assert int(batch.target_mask[row].sum()) == len(ids)
        assert int(batch.attention_mask[row].sum()) == n + len(ids)
    assert bool((batch.labels[~batch.attention_mask.bool()] == IGNORE).all())
    assert int(batch.image_mask[0].sum()) == int(batch.image_mask[1].sum()) > 0
    assert batch.pool_mask("last_prompt").sum(dim=1).tolist() == [1, 1, 1]


@pytest.mark.parametrize("family", FAMILIES)
def test_scoring_and_tail_match_the_full_forward(
    adapters: dict[str, VLMAdapter], family: str
) -> None:
    adapter = adapters[family]
    batch = _batch(adapter)
    mask = batch.target_mask
    with torch.no_grad():
        logits = adapter.logits(batch)
        shared = adapter.logits(batch, encode_once=True)
    assert logits.shape[:2] == batch.input_ids.shape
    torch.testing.assert_close(shared[mask], logits[mask], rtol=1e-5, atol=1e-5)
    # the fast path: resid + module(x) through the layers after it reproduces the model
    for path in (
        adapter.resolve_module(None),
        adapter.resolve_module(f"{adapter.layers_path}.0.{adapter.mlp_writer}"),
    ):
        capture = adapter.capture(batch, path)
        module = adapter.model.get_submodule(path)
        with torch.no_grad():
            hidden = adapter.run_later(capture, capture.resid + module(capture.x))
            tail = adapter.head(hidden)
        torch.testing.assert_close(tail[mask], logits[mask], rtol=1e-4, atol=1e-5)
        assert capture.per_position == (path == adapter.resolve_module(None))


@pytest.mark.parametrize("family", FAMILIES)
def test_generation_runs(adapters: dict[str, VLMAdapter], family: str) -> None:
    adapter = adapters[family]
    answers = adapter.generate(_batch(adapter), max_new_tokens=2)
    assert len(answers) == 3 and all(isinstance(a, str) for a in answers)


def test_module_paths(adapters: dict[str, VLMAdapter]) -> None:
    llava = adapters["llava"]
    assert llava.resolve_module(None) == "model.language_model.layers.1.mlp.down_proj"
    assert llava.resolve_module("model.language_model.layers[-1].mlp.down_proj") == (
        "model.language_model.layers.1.mlp.down_proj"
    )
    assert adapters["blip2"].resolve_module(None) == "language_model.model.decoder.layers.1.fc2"
    with pytest.raises(ModulePathError, match="has no child 'mpl'"):
        llava.resolve_module("model.language_model.layers.-1.mpl.down_proj")
    with pytest.raises(ModulePathError, match="out of range"):
        llava.resolve_module("model.language_model.layers.7.mlp.down_proj")
    with pytest.raises(ModulePathError, match="nn.Linear"):
        llava.resolve_module("model.language_model.layers.-1.mlp")
    with pytest.raises(ModulePathError, match="not inside a decoder layer"):
        llava.resolve_module("lm_head")


def test_bad_inputs_give_clear_errors(adapters: dict[str, VLMAdapter]) -> None:
    llava = adapters["llava"]
    with pytest.raises(TargetEncodingError, match="'xyzzy' cannot be encoded"):
        llava.build_inputs([RED], ["what is the capital"], ["xyzzy"])
    with pytest.raises(ValueError, match="same length"):
        llava.build_inputs([RED, BLUE], ["what"], None)
    with pytest.raises(TypeError, match="PIL image or encoded image bytes"):
        llava.build_inputs(["red.png"], ["what"], None)  # type: ignore[list-item]
    with pytest.raises(UnsupportedModelError, match="no adapter for model_type 'llama'"):
        family_of("llama")


def test_cuda_requested_but_absent() -> None:
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    with pytest.raises(RuntimeError, match="cuda"):
        ModelConfig(model="x", device="cuda").torch_device()
    assert ModelConfig(model="x").torch_dtype(torch.device("cpu")) == torch.float32


def test_load_model_from_local_folder(tmp_path, adapters: dict[str, VLMAdapter]) -> None:
    source = adapters["llava"]
    source.model.save_pretrained(tmp_path)
    source.tokenizer.save_pretrained(tmp_path)
    source.image_processor.save_pretrained(tmp_path)
    loaded = load_model(ModelConfig(model=str(tmp_path), prompt_template=source.prompt_template))
    assert type(loaded) is type(source)
    batch, again = _batch(source), _batch(loaded)
    assert torch.equal(batch.input_ids, again.input_ids)
    with torch.no_grad():
        torch.testing.assert_close(loaded.logits(again), source.logits(batch))
    # a saved model of a family without an adapter
    other = tmp_path / "llama"
    source.model.config.text_config.save_pretrained(other)
    with pytest.raises(UnsupportedModelError, match="no adapter"):
        load_model(ModelConfig(model=str(other)))


def test_processor_style_template_and_tiny_vlm_folder(tmp_path) -> None:
    """The tiny flagworld VLM's folder format: LlavaProcessor + okedit.json."""
    from editors.tiny_vlm import (
        build_processor,
        build_tiny_llava,
        build_word_tokenizer,
        save_tiny_vlm,
    )

    tok = build_word_tokenizer(["what is the capital of this flag ?", "paris lyon"])
    processor = build_processor(tok, image_size=32, patch_size=16)
    model = build_tiny_llava(
        tok,
        image_size=32,
        patch_size=16,
        vision_width=32,
        vision_layers=1,
        vision_heads=2,
        vision_mlp=64,
        text_width=32,
        text_layers=1,
        text_heads=2,
        text_mlp=64,
    )
    save_tiny_vlm(model, processor, tmp_path)
    adapter = load_model(ModelConfig(model=str(tmp_path)))
    question = "what is the capital of this flag?"
    batch = adapter.build_inputs([RED], [question], ["lyon"])
    expected = processor(images=[RED], text=[f"<image> {question}"], return_tensors="pt")
    n = int(batch.prompt_lengths[0])
    assert batch.input_ids[0, :n].tolist() == expected["input_ids"][0].tolist()


def test_random_models_are_built_in_the_requested_dtype() -> None:
    adapter = random_adapter("blip2", CORPUS, dtype=torch.bfloat16)
    assert {p.dtype for p in adapter.model.parameters()} == {torch.bfloat16}
    assert torch.get_default_dtype() == torch.float32  # restored for everything else
