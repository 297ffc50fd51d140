"""Greedy answers decoded from a clean capture (the fast path's generation).

With the wrapped module the residual writer of the last decoder layer, an edit changes no key
or value of any layer: the clean and the edited model attend over the same KV cache and differ
only in the logits, `head(resid + module(x))` for a routed row. So the capture's clean pass
(prompt + target, `capture(keep_kv=True)`) already holds everything a decode needs:

* the first answer token comes from the capture at each row's last prompt token (no forward);
* every further token is one batched step of the text model over all unfinished rows, on the
  capture's cache restricted to the prompt (the target and padding positions are masked out),
  recording x and the residual at the wrapped module so the edited rows' logits come from the
  tail, as in training.

Rows are routed once, from the prompt (`Editor.generation_route`), as the wrapper does when
generating. Decoding is plain greedy (argmax) until an end-of-sequence token or
`max_new_tokens`, the same answers as the straightforward `generate` one row at a time up to
float rounding between batched and single-row forwards.
"""

from __future__ import annotations

import torch
from torch import Tensor

from editors.adapters.base import Batch, Capture
from editors.base import Editor


@torch.no_grad()
def greedy_answers(
    editor: Editor,
    batch: Batch,
    capture: Capture,
    edited: bool,
    max_new_tokens: int,
    groups: Tensor | None = None,
) -> list[str]:
    """Greedy answers of the clean (or, with `edited`, the edited) model to every row's prompt;
    with the rows' codebook `groups`, each row routes among its group's entries only (the
    probes of several items edited side by side decode in one batch)."""
    if capture.kv is None or capture.position_shift is None:
        raise ValueError("decoding needs a capture taken with keep_kv=True")
    adapter = editor.adapter
    device = capture.x.device
    route = editor.generation_route(batch, capture, groups) if edited else None
    active = torch.arange(batch.size, device=device)  # rows still decoding
    position = batch.last_prompt.clone()  # where the newest token's output was computed
    x, resid, final = (
        t[active, position] for t in (capture.x, capture.resid, capture.final_hidden)
    )
    kv, mask = capture.kv, batch.prompt_mask.long()
    shift = capture.position_shift  # text-model position = token index + shift (M-RoPE)
    stop = _stop_ids(editor)
    answers: list[list[int]] = [[] for _ in range(batch.size)]
    for step in range(max_new_tokens):
        logits = _next_logits(editor, x, resid, final, active, position, route, batch.last_prompt)
        tokens = logits.argmax(dim=-1)
        going = torch.tensor([int(t) not in stop for t in tokens.tolist()], device=device)
        for row, token in zip(active[going].tolist(), tokens[going].tolist(), strict=True):
            answers[row].append(token)
        if step == max_new_tokens - 1 or not bool(going.any()):
            break
        if not bool(going.all()):  # finished rows leave the batch
            keep = going.nonzero().squeeze(1)
            active, tokens, position, mask = active[keep], tokens[keep], position[keep], mask[keep]
            kv = [(k[keep], v[keep]) for k, v in kv]
        position = position + 1
        mask = torch.cat([mask, mask.new_ones(len(active), 1)], dim=1)
        at = (position + shift[active]).unsqueeze(1)
        record, kv = adapter.decode_step(editor.path, kv, tokens.unsqueeze(1), mask, at)
        x, resid, final = (record[name][:, 0] for name in ("x", "resid", "final"))
    return [adapter.tokenizer.decode(ids, skip_special_tokens=True).strip() for ids in answers]


def _next_logits(
    editor: Editor,
    x: Tensor,
    resid: Tensor,
    final: Tensor,
    rows: Tensor,
    position: Tensor,
    route: Tensor | None,
    last_prompt: Tensor,
) -> Tensor:
    """Next-token logits (N, V) of the active rows: clean from the lm_head input, edited from
    the tail where the row is routed."""
    lm_head = editor.adapter.model.get_submodule(editor.adapter.lm_head_path)
    clean = lm_head(final)
    if route is None or not bool((route[rows] >= 0).any()):
        return clean
    edited = editor.position_logits(x, resid, rows, position, route, last_prompt)
    return torch.where((route[rows] >= 0).unsqueeze(-1), edited, clean)


def _stop_ids(editor: Editor) -> set[int]:
    """End-of-sequence ids as `generate` uses them: the generation config's (an int or a list),
    else the tokenizer's."""
    adapter = editor.adapter
    config = getattr(adapter.model, "generation_config", None)
    ids = getattr(config, "eos_token_id", None)
    if ids is None:
        ids = adapter.tokenizer.eos_token_id
    return set(ids) if isinstance(ids, list) else set() if ids is None else {int(ids)}
