"""What BalancEdit, GRACE and FT share: a codebook, a wrapper installed in place of one
linear module, the edit loop, and two ways to run it.

* slow path — the straightforward loop: every training step is a full forward + backward of
  the edit sequence with the wrapper installed; keys and probes run one forward each.
* fast path — the wrapped module's input x does not depend on the edit, so one clean pass
  caches x and the residual stream (`adapters.Capture`: each image encoded once, same-image
  rows sharing a KV-cached prefix), and every training step (and the edited probes) only runs
  the tail: `lm_head(norm(layers_after(resid + edited_module(x))))`, at the target positions
  alone when the module sits in the last decoder layer.

An editor subclass defines `edited_output` (what the module returns for routed inputs), how a
new entry's value and radius are made, and which parameters train.

Keys. The routing key k of a sequence is the wrapped module's input x pooled over positions
(`EditorConfig.key_parts()`): one part for the reference key, two for the image/text keys of
issue 7; keys are (B, P, H) tensors throughout, and the codebook routes by all parts.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from editors.adapters.base import Batch, Capture, ImageLike, VLMAdapter
from editors.codebook import Codebook, Placement, pool_key_parts
from editors.config import EditorConfig


@dataclass
class Prompt:
    """One teacher-forced sequence: image + question + answer."""

    image: ImageLike
    question: str
    answer: str


@dataclass
class EditRequest:
    """An edit (question + image -> target) with the positive and negatives that set
    BalancEdit's radius (GRACE and FT ignore them)."""

    edit: Prompt
    positive: Prompt | None = None  # a training paraphrase on the same image
    negative: Prompt | None = None  # the edit question on a near-miss (or black/white) image
    text_negative: Prompt | None = None  # another question about the same image (issue 7)
    label: str | None = None  # codebook label; default: the target

    def rows(self) -> list[Prompt]:
        """Rows in the order `new_entry` reads them: edit, positive, negative, text negative."""
        rows = (self.edit, self.positive, self.negative, self.text_negative)
        return [p for p in rows if p is not None]


@dataclass(frozen=True)
class Radius:
    """ε of one key part, and the distances d(k, k_pos), d(k, k_neg) that set it (BalancEdit;
    None for a fixed radius)."""

    epsilon: float
    d_pos: float | None = None
    d_neg: float | None = None


@dataclass
class EditOutcome:
    """What one edit did."""

    entry: int  # the codebook entry trained
    action: str  # add | split | expand
    radii: tuple[Radius, ...]  # per key part; ε after placement
    losses: list[float]
    path: str  # fast | slow
    seconds: float


@dataclass
class Routed:
    """An edited forward: per row the target-position logits and where the key fell."""

    target_logits: list[Tensor]  # row b: (m_b, V) logits at its target-predicting positions
    distances: Tensor  # (B, N) combined distance Σ_p d(row key_p, entry key_p)
    entry: Tensor  # (B,) routed entry, -1 = original module
    parts: Tensor  # (B, N, P) per-part distances


@dataclass
class _Context:
    pool_masks: list[Tensor]
    last_prompt: Tensor
    force: int | None = None
    generating: bool = False
    route: Tensor | None = None
    offset: int = 0
    distances: list[Tensor] = field(default_factory=list)
    parts: list[Tensor] = field(default_factory=list)


class EditedModule(nn.Module):
    """Stands in for the wrapped linear module while an editor is applied."""

    def __init__(self, editor: Editor) -> None:
        super().__init__()
        self.base = editor.base
        self._editor = editor

    def forward(self, x: Tensor) -> Tensor:
        return self._editor.module_forward(x)


class Editor(ABC):
    """A routed editor over one linear module of a VLM (see module docstring).

    Creating an editor freezes the model (`requires_grad_(False)`); only the codebook values
    (or, for FT, the wrapped module) train. The wrapper is installed only inside `applied()`,
    so between calls the model's modules and state dict are the original ones.
    """

    name: ClassVar[str] = ""
    uses_radius_probes: ClassVar[bool] = False  # needs EditRequest.positive and .negative

    def __init__(self, adapter: VLMAdapter, config: EditorConfig) -> None:
        self.adapter = adapter
        self.config = config
        self.path = adapter.resolve_module(config.module)
        self.base: nn.Linear = adapter.model.get_submodule(self.path)  # type: ignore[assignment]
        self.layer = adapter.layer_of(self.path)
        self.fast = config.fast and adapter.supports_tail(self.path)
        self.codebook: Codebook[Any] = Codebook(distance=config.distance)
        self._ctx: _Context | None = None
        self._shape: tuple[int, int] | None = None
        adapter.model.requires_grad_(False)

    # ----------------------------------------------------------------- per editor
    @abstractmethod
    def edited_output(
        self, x: Tensor, rows: Tensor, pos: Tensor, route: Tensor, last_prompt: Tensor
    ) -> Tensor:
        """The module's output for inputs x (..., H_in) at (row, position) pairs (...)."""

    @abstractmethod
    def new_entry(
        self, keys: Tensor, x_edit: Tensor, last_prompt: int
    ) -> tuple[Any, tuple[Radius, ...]]:
        """(value, radius per key part) of a new entry; keys (R, P, H), rows as
        `EditRequest.rows()`: edit, positive, negative, text negative."""

    @abstractmethod
    def trainable(self, entry: int) -> list[Tensor]:
        """The parameters trained for codebook entry `entry`."""

    def place(self, key: Tensor, value: Any, radii: list[float], label: str) -> Placement:
        """Put a new edit in the codebook (GRACE's add / split / expand rules)."""
        return self.codebook.add(key, value, radii, label)

    def restore(self) -> None:
        """Forget every edit: the model is exactly as before the first edit."""
        self.codebook.clear()

    # ----------------------------------------------------------------- editing
    def edit(self, request: EditRequest) -> EditOutcome:
        """Place the edit in the codebook and train its value on the target loss."""
        rows = request.rows() if self.uses_radius_probes else [request.edit]
        batch = self.adapter.build_inputs(
            [p.image for p in rows], [p.question for p in rows], [p.answer for p in rows]
        )
        capture = self.adapter.capture(batch, self.path) if self.fast else None
        label = request.label or request.edit.answer
        return self.edit_rows(batch, capture, list(range(batch.size)), label)

    def edit_rows(
        self, batch: Batch, capture: Capture | None, rows: list[int], label: str
    ) -> EditOutcome:
        """Edit from rows [edit, positive, negative] (or [edit]) of a built batch; with a clean
        `capture` of that batch (fast path) no further forward of the network is needed."""
        start = time.perf_counter()
        if capture is not None:
            masks = [mask[rows] for mask in self.key_masks(batch)]
            keys = pool_key_parts(capture.x[rows], masks)
            x_edit = capture.x[rows[0]]
        else:
            sub = self.adapter.select(batch, rows)
            x = self.module_inputs(sub)
            keys, x_edit = self.keys_of(x, sub), x[0]
        last_prompt = int(batch.last_prompt[rows[0]])
        value, radii = self.new_entry(keys, x_edit, last_prompt)
        placement = self.place(keys[0], value, [r.epsilon for r in radii], label)
        edit_batch = self.adapter.select(batch, rows[:1])
        losses = self._train(
            placement, edit_batch, self._edit_capture(capture, rows[0], edit_batch)
        )
        placed = self.codebook.radii[placement.index]
        return EditOutcome(
            entry=placement.index,
            action=placement.action,
            radii=tuple(replace(r, epsilon=e) for r, e in zip(radii, placed, strict=True)),
            losses=losses,
            path="fast" if capture is not None else "slow",
            seconds=time.perf_counter() - start,
        )

    def _edit_capture(self, capture: Capture | None, row: int, edit_batch: Batch) -> Capture | None:
        if capture is None:
            return None
        if capture.per_position:
            return capture.rows([row])
        return self.adapter.capture(edit_batch, self.path)

    def training_targets(self, batch: Batch) -> tuple[Tensor, Tensor, Tensor]:
        """(rows, positions, token ids) the edit is trained on: the target tokens, and with
        `edit_eos` the end-of-sequence token predicted from the last target token, so the
        edited answer stops (trained on the target alone, greedy decoding of a routed
        sequence tends to repeat it: "riga riga riga ...")."""
        rows, pos = batch.target_mask.nonzero(as_tuple=True)
        targets = batch.labels[rows, pos]
        eos = self.adapter.tokenizer.eos_token_id
        if not self.config.edit_eos or eos is None:
            return rows, pos, targets
        trained = rows.unique()
        ends = torch.stack([pos[rows == r].max() + 1 for r in trained])
        rows, pos = torch.cat([rows, trained]), torch.cat([pos, ends])
        return rows, pos, torch.cat([targets, torch.full_like(ends, eos)])

    def _train(self, placement: Placement, batch: Batch, capture: Capture | None) -> list[float]:
        rows, pos, targets = self.training_targets(batch)
        route = torch.tensor([placement.index], device=targets.device)
        if capture is not None:
            return self._optimize(
                placement.index,
                lambda: _loss(self.tail_logits(capture, batch, route, rows, pos), targets),
            )
        with self.applied(batch, force_entry=placement.index):
            return self._optimize(
                placement.index,
                lambda: _loss(self.adapter.logits(batch)[rows, pos], targets),
            )

    def _optimize(self, entry: int, loss_fn: Callable[[], Tensor]) -> list[float]:
        """Adam on the entry's parameters; all other weights are frozen."""
        optimizer = _adam(self.trainable(entry), self.config.lr, self.config.adam_eps)
        losses: list[float] = []
        for _ in range(self.config.steps):
            loss = loss_fn()
            losses.append(loss.item())
            if (
                self.config.target_loss_stop is not None
                and losses[-1] < self.config.target_loss_stop
            ):
                break
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        return losses

    # ----------------------------------------------------------------- keys
    def key_masks(self, batch: Batch) -> list[Tensor]:
        """Per key part, the (B, T) positions its part of the key is pooled over."""
        return [batch.pool_mask(part.pooling) for part in self.config.key_parts()]

    def keys_of(self, x: Tensor, batch: Batch) -> Tensor:
        """Keys (B, P, H): the module input x pooled over each key part's positions."""
        return pool_key_parts(x, self.key_masks(batch))

    @torch.no_grad()
    def module_inputs(self, batch: Batch) -> Tensor:
        """The wrapped module's input (B, T, H_in) from full forwards, one row at a time."""
        inputs = []
        for row in range(batch.size):
            single = self.adapter.select(batch, [row])
            recorded: dict[str, Tensor] = {}
            hook = self.base.register_forward_pre_hook(_recorder(recorded))
            with self._shape_hook():
                try:
                    self.adapter.logits(single)
                finally:
                    hook.remove()
            x = recorded["x"].reshape(1, single.input_ids.shape[1], -1)
            inputs.append(nn.functional.pad(x, (0, 0, 0, batch.input_ids.shape[1] - x.shape[1])))
        return torch.cat(inputs)

    # ----------------------------------------------------------------- evaluating
    def clean_target_logits(self, batch: Batch, capture: Capture | None = None) -> list[Tensor]:
        """Target-position logits of the unedited model, per row."""
        rows, pos = batch.target_mask.nonzero(as_tuple=True)
        if capture is not None:
            head = self.adapter.model.get_submodule(self.adapter.lm_head_path)
            with torch.no_grad():
                flat = head(capture.final_hidden[rows, pos])
        else:
            with torch.no_grad():
                flat = self.adapter.logits(batch)[rows, pos]
        return _split_rows(flat, batch)

    @torch.no_grad()
    def evaluate(self, batch: Batch, capture: Capture | None = None) -> Routed:
        """The edited model on `batch`: from a clean capture (fast) or a full forward (slow)."""
        if capture is None:
            with self.applied(batch) as ctx:
                logits = self.adapter.logits(batch)
            rows, pos = batch.target_mask.nonzero(as_tuple=True)
            return Routed(
                _split_rows(logits[rows, pos], batch), ctx.distances[0], ctx.route, ctx.parts[0]
            )
        keys = self.keys_of(capture.x, batch)
        parts = self.codebook.part_distances(keys)
        _, route = self.codebook.route(keys)
        rows, pos = batch.target_mask.nonzero(as_tuple=True)
        head = self.adapter.model.get_submodule(self.adapter.lm_head_path)
        flat = head(capture.final_hidden[rows, pos])
        if bool((route >= 0).any()):
            edited = self.tail_logits(capture, batch, route, rows, pos)
            flat = torch.where((route[rows] >= 0).unsqueeze(-1), edited, flat)
        return Routed(_split_rows(flat, batch), parts.sum(dim=-1), route, parts)

    def tail_logits(
        self, capture: Capture, batch: Batch, route: Tensor, rows: Tensor, pos: Tensor
    ) -> Tensor:
        """Edited logits at (rows, pos) from the cached module input and residual."""
        last_prompt = batch.last_prompt
        if capture.per_position:
            x, resid = capture.x[rows, pos], capture.resid[rows, pos]
            return self.position_logits(x, resid, rows, pos, route, last_prompt)
        b, t = capture.x.shape[:2]
        grid_rows = torch.arange(b, device=capture.x.device).unsqueeze(1).expand(b, t)
        grid_pos = torch.arange(t, device=capture.x.device).unsqueeze(0).expand(b, t)
        out = self.edited_output(capture.x, grid_rows, grid_pos, route, last_prompt)
        hidden = self.adapter.run_later(capture, capture.resid + out.to(capture.resid.dtype))
        return self.adapter.head(hidden[rows, pos])

    def position_logits(
        self,
        x: Tensor,
        resid: Tensor,
        rows: Tensor,
        pos: Tensor,
        route: Tensor,
        last_prompt: Tensor,
    ) -> Tensor:
        """Edited logits at single positions (the module in the last decoder layer): x and the
        residual (N, H) at (rows, pos), routed by `route` (B,)."""
        out = self.edited_output(x, rows, pos, route, last_prompt)
        return self.adapter.head(resid + out.to(resid.dtype))

    def generation_route(self, batch: Batch, capture: Capture) -> Tensor:
        """(B,) entry of each row when generating: keys pooled over the prompt alone, as the
        wrapper does on a prompt-only forward (-1 = original module)."""
        masks = [mask & batch.prompt_mask for mask in self.key_masks(batch)]
        _, route = self.codebook.route(pool_key_parts(capture.x, masks))
        return route

    @torch.no_grad()
    def generate(self, batch: Batch, max_new_tokens: int = 8) -> list[str]:
        """Greedy answers of the edited model; routing is decided once, from the prompt."""
        answers = []
        for row in range(batch.size):
            single = self.adapter.select(batch, [row], prompt_only=True)
            with self.applied(single, generating=True):
                answers.extend(self.adapter.generate(single, max_new_tokens))
        return answers

    # ----------------------------------------------------------------- the wrapper
    @contextmanager
    def applied(
        self, batch: Batch, force_entry: int | None = None, generating: bool = False
    ) -> Iterator[_Context]:
        """Install the wrapper for forwards over `batch` (routing per row from its keys)."""
        parent_path, _, name = self.path.rpartition(".")
        parent = self.adapter.model.get_submodule(parent_path)
        ctx = _Context(
            pool_masks=self.key_masks(batch),
            last_prompt=batch.last_prompt,
            force=force_entry,
            generating=generating,
        )
        self._ctx = ctx
        setattr(parent, name, EditedModule(self))
        try:
            with self._shape_hook():
                yield ctx
        finally:
            setattr(parent, name, self.base)
            self._ctx = None

    @contextmanager
    def _shape_hook(self) -> Iterator[None]:
        def record(module: nn.Module, args: tuple, kwargs: dict) -> None:
            hidden = args[0] if args else kwargs["hidden_states"]
            self._shape = (int(hidden.shape[0]), int(hidden.shape[1]))

        handle = self.layer.register_forward_pre_hook(record, with_kwargs=True)
        try:
            yield
        finally:
            handle.remove()

    def module_forward(self, x: Tensor) -> Tensor:
        """The wrapper's forward: route each sequence once, then compute the edited output."""
        ctx = self._ctx
        if ctx is None or self._shape is None:
            raise RuntimeError("EditedModule called outside Editor.applied()")
        b, t = self._shape
        x3 = x.reshape(b, t, -1)
        if ctx.route is None or not ctx.generating:
            keys = pool_key_parts(x3, ctx.pool_masks)
            parts = self.codebook.part_distances(keys)
            _, route = self.codebook.route(keys)
            if ctx.force is not None:
                route = torch.full_like(route, ctx.force)
            ctx.route = route
            ctx.distances.append(parts.sum(dim=-1))
            ctx.parts.append(parts)
        rows = torch.arange(b, device=x.device).unsqueeze(1).expand(b, t)
        pos = (ctx.offset + torch.arange(t, device=x.device)).unsqueeze(0).expand(b, t)
        if ctx.generating:
            ctx.offset += t
        out = self.edited_output(x3, rows, pos, ctx.route, ctx.last_prompt)
        return out.to(x.dtype).reshape(*x.shape[:-1], out.shape[-1])


def _recorder(store: dict[str, Tensor]) -> Callable[[nn.Module, tuple], None]:
    def hook(module: nn.Module, args: tuple) -> None:
        store["x"] = args[0]

    return hook


def _adam(params: list[Tensor], lr: float, eps: float) -> torch.optim.Optimizer:
    """Adam, fused where torch has a fused kernel for the parameters: the same update up to
    float rounding, one pass over the value instead of ~10 (a 4.2 M-parameter OPT fc2 copy:
    10 -> 2.5 ms per CPU step, most of the fast path's edit time)."""
    if all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in params):
        try:
            return torch.optim.Adam(params, lr=lr, eps=eps, fused=True)
        except RuntimeError:  # an older torch without a fused kernel for this device
            pass
    return torch.optim.Adam(params, lr=lr, eps=eps)


def _loss(logits: Tensor, targets: Tensor) -> Tensor:
    """Teacher-forced target loss: mean cross-entropy over the target tokens."""
    return nn.functional.cross_entropy(logits.float(), targets)


def _split_rows(flat: Tensor, batch: Batch) -> list[Tensor]:
    counts = batch.target_mask.sum(dim=1).tolist()
    return list(torch.split(flat.float(), counts))
