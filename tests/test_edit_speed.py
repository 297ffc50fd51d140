"""The fast path's shared prefix (issue 3 part 6): rows that show the same image run their
common prefix once, on a KV cache, and the capture equals the plain batched forward; fast and
slow edits agree when the prefix is shared (Qwen2-VL's suffixes continue its M-RoPE
positions); prefixes that stop before the image fall back to the plain forward."""

from __future__ import annotations

import pytest
import torch

from editors.adapters import VLMAdapter
from editors.adapters.base import Batch
from editors.adapters.random_models import random_adapter
from editors.balancedit import BalancEdit
from editors.config import EditorConfig
from tests.edit_paths import (
    BLUE,
    CORPUS,
    FAMILIES,
    QUESTION,
    RED,
    REQUEST,
    edit_and_probe,
    overridden,
    random_adapters,
)


@pytest.fixture(scope="module")
def adapters() -> dict[str, VLMAdapter]:
    return random_adapters()


def _probes(adapter: VLMAdapter) -> Batch:
    """Three rows on the red image (questions and targets of different lengths), one on blue."""
    return adapter.build_inputs(
        [RED, BLUE, RED, RED],
        [QUESTION, "which city", "name the main city of this country", "which city is the capital"],
        ["paris", "lyon rome", "rome berlin paris", "berlin"],
    )


@pytest.mark.parametrize("family", FAMILIES)
def test_shared_prefix_capture_equals_the_plain_forward(
    adapters: dict[str, VLMAdapter], family: str
) -> None:
    adapter = adapters[family]
    batch = _probes(adapter)
    path = adapter.resolve_module(None)
    with overridden(adapter, prefix_min_saved=1):  # the tiny models' prefixes are short
        groups = adapter.prefix_groups(batch)
        shared = adapter.capture(batch, path)
    with overridden(adapter, shares_prefix=False):
        plain = adapter.capture(batch, path)
    (rows, prefix), *others = groups
    assert rows == [0, 2, 3] and not others
    assert int(batch.image_mask[0].nonzero().max()) < prefix < int(batch.prompt_lengths.min())
    assert shared.per_position and shared.x.shape == plain.x.shape
    real = batch.attention_mask.bool()
    for name in ("x", "resid", "final_hidden"):
        torch.testing.assert_close(
            getattr(shared, name)[real], getattr(plain, name)[real], rtol=1e-5, atol=1e-5
        )


def test_no_sharing_below_the_last_layer_or_before_the_image(
    adapters: dict[str, VLMAdapter],
) -> None:
    llava = adapters["llava"]
    batch = _probes(llava)
    # a module below the last layer: the later layers replay whole rows
    capture = llava.capture(batch, f"{llava.layers_path}.0.{llava.mlp_writer}")
    assert not capture.per_position
    # the question before the image: same-image rows differ before it, nothing to share
    question_first = random_adapter("llava", CORPUS, prompt_template="{question} {image} answer :")
    with overridden(question_first, prefix_min_saved=1):
        assert question_first.prefix_groups(_probes(question_first)) == []


def _edit_and_probe(adapter: VLMAdapter, fast: bool):
    editor = BalancEdit(adapter, EditorConfig(fast=fast, lr=1e-2, steps=20))
    pre, outcome, routed = edit_and_probe(editor, _probes(adapter), REQUEST)
    return pre, outcome, routed.target_logits, routed.distances


@pytest.mark.parametrize("family", ["blip2", "llava", "idefics3", "qwen2_vl"])
def test_fast_and_slow_agree_with_a_shared_prefix(
    adapters: dict[str, VLMAdapter], family: str
) -> None:
    adapter = adapters[family]
    with overridden(adapter, prefix_min_saved=1):
        assert adapter.prefix_groups(_probes(adapter))
        pre_f, out_f, post_f, d_f = _edit_and_probe(adapter, fast=True)
    pre_s, out_s, post_s, d_s = _edit_and_probe(adapter, fast=False)
    assert out_f.path == "fast" and out_s.path == "slow"
    assert out_f.radii[0].epsilon == pytest.approx(out_s.radii[0].epsilon, rel=1e-5)
    assert out_f.losses == pytest.approx(out_s.losses, rel=1e-4, abs=1e-5)
    torch.testing.assert_close(d_f, d_s, rtol=1e-4, atol=1e-5)
    for a, b in zip(pre_f + post_f, pre_s + post_s, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
