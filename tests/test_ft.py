"""FT's restore on a module with a bias (issue 12): fine-tuning trains the weight and the bias
of the wrapped module, and restore brings back every parameter of the model bit for bit."""

from __future__ import annotations

import pytest
import torch

from editors.adapters import VLMAdapter
from editors.adapters.random_models import random_adapter
from editors.base import EditRequest, Prompt
from editors.config import EditorConfig
from editors.ft import FineTune
from tests.edit_paths import BLUE, CORPUS, QUESTION, RED, REQUEST

SECOND = EditRequest(edit=Prompt(BLUE, QUESTION, "berlin"))


@pytest.fixture(scope="module")
def blip2() -> VLMAdapter:
    torch.set_num_threads(1)
    return random_adapter("blip2", CORPUS)


@pytest.mark.parametrize("fast", [True, False])
def test_restore_brings_back_weight_and_bias_bit_for_bit(blip2: VLMAdapter, fast: bool) -> None:
    editor = FineTune(blip2, EditorConfig(editor="ft", steps=5, fast=fast))
    assert editor.path.endswith("fc2") and editor.base.bias is not None  # OPT's fc2 has a bias
    probes = blip2.build_inputs([RED, BLUE], [QUESTION, QUESTION], ["lyon", "rome"])
    with torch.no_grad():
        clean = blip2.logits(probes)
    before = {k: v.clone() for k, v in blip2.model.state_dict().items()}
    editor.edit(REQUEST)
    editor.edit(SECOND)  # restore goes back to before the first edit, not the last
    edited = blip2.model.state_dict()
    for name in ("weight", "bias"):  # the edit really moved both, or restore is not tested
        key = f"{editor.path}.{name}"
        assert not torch.equal(edited[key], before[key]), key
    editor.restore()
    after = blip2.model.state_dict()
    assert after.keys() == before.keys()
    for key, value in before.items():
        assert torch.equal(after[key], value), key
    assert not any(p.requires_grad for p in blip2.model.parameters())
    assert len(editor.codebook) == 0
    with torch.no_grad():
        assert torch.equal(blip2.logits(probes), clean)
