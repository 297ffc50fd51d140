"""BalancEdit (and the GRACE / FT baselines) on tiny random VLMs: the edit takes, far inputs
are untouched, restore is bit-exact, and the fast and slow paths agree."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from editors.adapters import VLMAdapter
from editors.adapters.random_models import random_adapter
from editors.balancedit import BalancEdit
from editors.base import Editor, EditRequest, Prompt
from editors.codebook import balanced_radius
from editors.config import EditorConfig
from editors.ft import FineTune
from editors.grace import Grace
from tests.edit_paths import edit_and_probe

CORPUS = [
    "what is the capital of this country",
    "which city is the capital",
    "name the main city of this country",
    "describe the weather in this picture today",
    "paris lyon rome berlin sunny",
]
RED = Image.new("RGB", (32, 32), (200, 10, 10))
BLUE = Image.new("RGB", (32, 32), (10, 10, 200))
NOISE = Image.fromarray((np.random.RandomState(0).rand(32, 32, 3) * 255).astype("uint8"))
QUESTION = "what is the capital of this country"
REQUEST = EditRequest(
    edit=Prompt(RED, QUESTION, "lyon"),
    positive=Prompt(RED, "which city is the capital", "lyon"),
    negative=Prompt(BLUE, QUESTION, "rome"),
)
STRONG = {"lr": 1e-2, "steps": 50}  # the tiny-model edit strength (design §9)


@pytest.fixture(scope="module")
def llava() -> VLMAdapter:
    torch.set_num_threads(1)
    return random_adapter("llava", CORPUS)


@pytest.fixture(scope="module")
def blip2() -> VLMAdapter:
    return random_adapter("blip2", CORPUS)


def _probes(adapter: VLMAdapter):
    return adapter.build_inputs(
        [RED, RED, BLUE, NOISE],
        [QUESTION, "name the main city of this country", QUESTION, "describe the weather today"],
        ["lyon", "lyon", "rome", "sunny"],
    )


def _target_id(adapter: VLMAdapter, word: str) -> int:
    return adapter.tokenizer.convert_tokens_to_ids(word)


def test_edit_reaches_target_and_leaves_far_input_unchanged(llava: VLMAdapter) -> None:
    editor = BalancEdit(llava, EditorConfig(**STRONG))
    probes = _probes(llava)
    with torch.no_grad():
        clean = llava.logits(probes)
    outcome = editor.edit(REQUEST)
    try:
        assert outcome.action == "add" and outcome.path == "fast"
        assert outcome.losses[-1] < outcome.losses[0]
        (radius,) = outcome.radii
        assert radius.epsilon == pytest.approx(
            balanced_radius(radius.d_pos, radius.d_neg, 0.05, "positive")
        )
        with editor.applied(probes) as ctx, torch.no_grad():
            edited = llava.logits(probes)
        distance = ctx.distances[0][:, 0]
        assert distance[0] == pytest.approx(0.0, abs=1e-6)
        assert ctx.route.tolist()[0] == 0  # the edit prompt routes to its entry
        n = int(probes.prompt_lengths[0])
        assert int(edited[0, n - 1].argmax()) == _target_id(llava, "lyon")
        assert int(clean[0, n - 1].argmax()) != _target_id(llava, "lyon")
        far = 3
        assert float(distance[far]) > radius.epsilon  # a different image and question
        assert ctx.route.tolist()[far] == -1
        assert torch.equal(edited[far], clean[far])  # the original module ran: bit-identical
    finally:
        editor.restore()


def test_generation_routes_from_the_prompt(llava: VLMAdapter) -> None:
    editor = BalancEdit(llava, EditorConfig(key_pooling="mean_prompt", **STRONG))
    prompts = llava.build_inputs([RED, NOISE], [QUESTION, "describe the weather today"])
    before = llava.generate(prompts, max_new_tokens=2)
    editor.edit(REQUEST)
    after = editor.generate(prompts, max_new_tokens=2)
    editor.restore()
    assert after[0].split()[0] == "lyon" and before[0].split()[0] != "lyon"
    assert after[1] == before[1]  # not routed: same greedy answer


@pytest.mark.parametrize("editor_cls", [BalancEdit, Grace, FineTune])
def test_restore_is_bit_exact(llava: VLMAdapter, editor_cls: type[Editor]) -> None:
    before = {k: v.clone() for k, v in llava.model.state_dict().items()}
    editor = editor_cls(llava, EditorConfig(editor=editor_cls.name, steps=5, fast=False))
    editor.edit(REQUEST)
    if editor_cls is FineTune:
        changed = llava.model.state_dict()[f"{editor.path}.weight"]
        assert not torch.equal(changed, before[f"{editor.path}.weight"])
    editor.restore()
    after = llava.model.state_dict()
    assert after.keys() == before.keys()
    for key, value in before.items():
        assert torch.equal(after[key], value), key
    assert len(editor.codebook) == 0


@pytest.mark.parametrize(
    ("family", "editor_cls", "layer"),
    [
        ("llava", BalancEdit, -1),
        ("llava", Grace, -1),
        ("llava", FineTune, -1),
        ("blip2", BalancEdit, -1),  # OPT's fc2 sees flattened (B·T, H) inputs
        ("llava", BalancEdit, 0),  # a module below the last layer: the tail replays layer 1
    ],
)
def test_fast_and_slow_paths_agree(
    llava: VLMAdapter, blip2: VLMAdapter, family: str, editor_cls: type[Editor], layer: int
) -> None:
    adapter = llava if family == "llava" else blip2
    module = f"{adapter.layers_path}.{layer}.{adapter.mlp_writer}"
    results = {}
    for fast in (True, False):
        config = EditorConfig(editor=editor_cls.name, module=module, fast=fast)
        if editor_cls is BalancEdit:
            config = config.model_copy(update=STRONG)
        editor = editor_cls(adapter, config)
        assert editor.fast == fast
        results[fast] = edit_and_probe(editor, _probes(adapter), REQUEST)
    (pre_f, out_f, post_f), (pre_s, out_s, post_s) = results[True], results[False]
    assert out_f.radii[0].epsilon == pytest.approx(out_s.radii[0].epsilon, rel=1e-5)
    assert out_f.losses == pytest.approx(out_s.losses, rel=1e-4, abs=1e-5)
    assert post_f.entry.tolist() == post_s.entry.tolist()
    torch.testing.assert_close(post_f.distances, post_s.distances, rtol=1e-4, atol=1e-5)
    for a, b in zip(pre_f + post_f.target_logits, pre_s + post_s.target_logits, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_sequential_mode_keeps_the_codebook(llava: VLMAdapter) -> None:
    editor = BalancEdit(llava, EditorConfig(sequential=True, steps=3))
    editor.edit(REQUEST)
    second = EditRequest(
        edit=Prompt(NOISE, "describe the weather today", "sunny"),
        positive=Prompt(NOISE, "describe the weather in this picture", "sunny"),
        negative=Prompt(BLUE, "describe the weather today", "rome"),
    )
    placed = editor.edit(second)
    assert len(editor.codebook) == 2 and placed.entry == 1
    assert editor.codebook.labels == ["lyon", "sunny"]
    again = editor.edit(REQUEST)  # the same edit again: same label, same key -> expand
    assert again.action == "expand" and again.entry == 0 and len(editor.codebook) == 2
    editor.restore()
    assert len(editor.codebook) == 0


def test_grace_value_sits_at_the_last_prompt_token(llava: VLMAdapter) -> None:
    editor = Grace(llava, EditorConfig(editor="grace"))
    assert (editor.config.lr, editor.config.steps, editor.config.distance) == (
        1.0,
        100,
        "euclidean",
    )
    editor.edit(REQUEST)
    value = editor.codebook.values[0]
    assert value.shape == (editor.base.out_features,)
    batch = llava.build_inputs([RED], [QUESTION], ["lyon"])
    captured = llava.capture(batch, editor.path)
    rows = torch.zeros(batch.input_ids.shape[1], dtype=torch.long)
    pos = torch.arange(batch.input_ids.shape[1])
    with torch.no_grad():
        out = editor.edited_output(captured.x[0], rows, pos, torch.tensor([0]), batch.last_prompt)
        base = editor.base(captured.x[0])
    last = int(batch.last_prompt[0])
    assert torch.equal(out[last], value.detach())
    others = torch.arange(len(pos)) != last
    assert torch.equal(out[others], base[others])
    editor.restore()


def test_missing_positive_or_negative_is_a_clear_error(llava: VLMAdapter) -> None:
    editor = BalancEdit(llava, EditorConfig(steps=1))
    with pytest.raises(ValueError, match="needs a positive"):
        editor.edit(EditRequest(edit=REQUEST.edit, positive=REQUEST.positive))


def test_config_defaults_and_presets() -> None:
    assert (EditorConfig().lr, EditorConfig().steps, EditorConfig().adam_eps) == (1e-4, 50, 1e-4)
    grace = EditorConfig(editor="grace")
    assert (grace.lr, grace.steps, grace.grace_epsilon, grace.distance) == (
        1.0,
        100,
        1.0,
        "euclidean",
    )
    ft = EditorConfig(editor="ft")
    assert (ft.lr, ft.steps) == (1e-2, 25)
    tiny = EditorConfig.for_model("/cache/tiny-flagworld-vlm")
    assert (tiny.lr, tiny.steps, tiny.preset) == (1e-2, 50, "tiny-flagworld")
    assert EditorConfig.for_model("Salesforce/blip2-opt-2.7b").lr == 1e-4
    assert EditorConfig.for_model("tiny-flagworld", lr=3e-3).lr == 3e-3
    assert EditorConfig.for_model("tiny-flagworld", editor="grace").lr == 1.0
    assert json.loads(tiny.to_json(path="fast"))["lr"] == 1e-2
