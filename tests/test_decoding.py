"""Greedy answers decoded from the capture's KV cache (`editors.decoding`, the fast path's
generation) equal `generate` one row at a time, on the clean and on the edited model, for every
family (Qwen2-VL at its multimodal RoPE positions)."""

from __future__ import annotations

import pytest
import torch

from editors.adapters import VLMAdapter
from editors.adapters.base import Batch, Capture
from editors.adapters.random_models import random_adapter
from editors.balancedit import BalancEdit
from editors.base import Editor
from editors.config import EditorConfig
from editors.decoding import greedy_answers
from editors.ft import FineTune
from editors.grace import Grace
from pipeline.scope import keeps_kv
from tests.edit_paths import (
    BLUE,
    CORPUS,
    FAMILIES,
    QUESTION,
    RED,
    REQUEST,
    overridden,
    random_adapters,
)

CONFIGS = {
    BalancEdit: {"lr": 1e-2, "steps": 50, "key_pooling": "mean_prompt", "edit_eos": True},
    Grace: {},
    FineTune: {},
}
NEW_TOKENS = 4


@pytest.fixture(scope="module")
def adapters() -> dict[str, VLMAdapter]:
    return random_adapters()


def _probes(adapter: VLMAdapter) -> Batch:
    """The edit prompt first; rows on the same image (prefix sharing) and one on another."""
    return adapter.build_inputs(
        [RED, BLUE, RED, RED],
        [QUESTION, QUESTION, "name the main city of this country", "which city is the capital"],
        ["lyon", "rome berlin", "rome berlin paris", "berlin"],
    )


def _editor(adapter: VLMAdapter, cls: type[Editor]) -> Editor:
    return cls(adapter, EditorConfig(editor=cls.name, **CONFIGS[cls]))


def _answers_both_ways(
    editor: Editor, batch: Batch, capture: Capture
) -> tuple[list[str], list[str]]:
    """(clean, edited) answers decoded from `capture`, each asserted equal to `generate` row
    by row; the editor is restored."""
    adapter = editor.adapter
    clean = greedy_answers(editor, batch, capture, edited=False, max_new_tokens=NEW_TOKENS)
    assert clean == adapter.generate(batch, NEW_TOKENS)
    editor.edit(REQUEST)
    try:
        edited = greedy_answers(editor, batch, capture, edited=True, max_new_tokens=NEW_TOKENS)
        assert edited == editor.generate(batch, NEW_TOKENS)
    finally:
        editor.restore()
    return clean, edited


@pytest.mark.parametrize("shared", [True, False], ids=["shared-prefix", "plain"])
@pytest.mark.parametrize("cls", list(CONFIGS), ids=lambda c: c.name)
@pytest.mark.parametrize("family", FAMILIES)
def test_decoded_answers_equal_generate(
    adapters: dict[str, VLMAdapter], family: str, cls: type[Editor], shared: bool
) -> None:
    adapter = adapters[family]
    editor = _editor(adapter, cls)
    batch = _probes(adapter)
    with overridden(adapter, prefix_min_saved=1 if shared else 10**9):  # short tiny prompts
        capture = adapter.capture(batch, editor.path, keep_kv=True)
        assert bool(adapter.prefix_groups(batch)) is (shared and adapter.shares_prefix)
    assert capture.kv is not None and len(capture.kv) == len(adapter.layers())
    clean, edited = _answers_both_ways(editor, batch, capture)
    if cls is BalancEdit:  # the edit is reached, and with edit_eos its answer stops
        assert edited[0] == "lyon" != clean[0]


def test_qwen2_vl_decodes_at_its_multimodal_positions(adapters: dict[str, VLMAdapter]) -> None:
    """M-RoPE gives an image fewer positions than tokens: decoded tokens continue from the
    positions the capture used, not from the token count."""
    adapter = adapters["qwen2_vl"]
    batch = _probes(adapter)
    capture = adapter.capture(batch, adapter.resolve_module(None), keep_kv=True)
    assert capture.position_shift is not None and bool((capture.position_shift < 0).all())
    other = adapters["llava"]
    plain = other.capture(_probes(other), other.resolve_module(None), keep_kv=True)
    assert plain.position_shift is not None and not bool(plain.position_shift.any())


def test_decoding_needs_a_kept_cache(adapters: dict[str, VLMAdapter]) -> None:
    adapter = adapters["llava"]
    editor = _editor(adapter, BalancEdit)
    batch = _probes(adapter)
    with pytest.raises(ValueError, match="keep_kv"):
        greedy_answers(editor, batch, adapter.capture(batch, editor.path), False, 2)


@pytest.mark.parametrize("family", FAMILIES)
def test_kv_budget_counts_the_kept_cache(adapters: dict[str, VLMAdapter], family: str) -> None:
    adapter = adapters[family]
    batch = _probes(adapter)
    editor = _editor(adapter, BalancEdit)
    kv = adapter.capture(batch, editor.path, keep_kv=True).kv
    assert kv is not None
    kept = sum(t.numel() * t.element_size() for pair in kv for t in pair)
    assert adapter.kv_bytes(batch) == kept
    assert keeps_kv(editor, batch)
    tight = adapter.kv_bytes(batch) / 2**30 * 0.99
    over = _editor(adapter, BalancEdit)
    over.config = over.config.model_copy(update={"decode_kv_gb": tight})
    assert not keeps_kv(over, batch)


@pytest.mark.parametrize("shared", [True, False], ids=["shared-prefix", "plain"])
@pytest.mark.parametrize("family", FAMILIES)
def test_a_decode_step_equals_the_full_forward(
    adapters: dict[str, VLMAdapter], family: str, shared: bool
) -> None:
    """Feeding each row's first target token on the capture's cache (prompt positions only,
    at the position the capture's text model used) gives the teacher-forced forward's logits
    at that token: the cache (assembled from a shared prefix too), the mask over it and the
    positions are right."""
    adapter = adapters[family]
    batch = _probes(adapter)
    path = adapter.resolve_module(None)
    with overridden(adapter, prefix_min_saved=1 if shared else 10**9):
        capture = adapter.capture(batch, path, keep_kv=True)
        assert bool(adapter.prefix_groups(batch)) is (shared and adapter.shares_prefix)
    assert capture.kv is not None and capture.position_shift is not None
    rows = torch.arange(batch.size)
    first = batch.prompt_lengths  # index of each row's first target token
    with torch.no_grad():
        full = adapter.logits(batch)[rows, first]
    mask = torch.cat([batch.prompt_mask.long(), torch.ones(batch.size, 1, dtype=torch.long)], 1)
    at = (first + capture.position_shift).unsqueeze(1)
    record, _ = adapter.decode_step(path, capture.kv, batch.input_ids[rows, first, None], mask, at)
    lm_head = adapter.model.get_submodule(adapter.lm_head_path)
    with torch.no_grad():
        step = lm_head(record["final"][:, 0])
    torch.testing.assert_close(step, full, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("family", FAMILIES)
def test_decoding_in_bfloat16(family: str) -> None:
    """The half-precision path a GPU runs (fp32 edit copies on bf16 activations) decodes the
    same answers as `generate`."""
    adapter = random_adapter(family, CORPUS, dtype=torch.bfloat16)
    editor = _editor(adapter, BalancEdit)
    batch = _probes(adapter)
    capture = adapter.capture(batch, editor.path, keep_kv=True)
    assert capture.x.dtype == torch.bfloat16
    _, edited = _answers_both_ways(editor, batch, capture)
    assert edited[0] == "lyon"
