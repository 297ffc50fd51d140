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

import functools
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
    force: Tensor | None = None  # (B,) entry of each row, routing aside (training)
    groups: Tensor | None = None  # (B,) codebook group of each row
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
    independent_entries: ClassVar[bool] = True  # an edit changes only its own entry's value

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

    def place(
        self, key: Tensor, value: Any, radii: list[float], label: str, group: int = 0
    ) -> Placement:
        """Put a new edit in the codebook (GRACE's add / split / expand rules, within its
        group)."""
        return self.codebook.add(key, value, radii, label, group)

    def restore(self) -> None:
        """Forget every edit: the model is exactly as before the first edit."""
        self.codebook.clear()

    @property
    def edits_side_by_side(self) -> bool:
        """Whether `edit_rows` may train several independent edits at once: on the fast path,
        for an editor whose edits live in their own codebook entries (not FT, which trains
        the shared module), outside sequential editing (where each edit sees the previous)."""
        return self.fast and self.independent_entries and not self.config.sequential

    # ----------------------------------------------------------------- editing
    def edit(self, request: EditRequest) -> EditOutcome:
        """Place the edit in the codebook and train its value on the target loss."""
        rows = request.rows() if self.uses_radius_probes else [request.edit]
        batch = self.adapter.build_inputs(
            [p.image for p in rows], [p.question for p in rows], [p.answer for p in rows]
        )
        capture = self.adapter.capture(batch, self.path) if self.fast else None
        label = request.label or request.edit.answer
        return self.edit_rows(batch, capture, [list(range(batch.size))], [label])[0]

    def edit_rows(
        self, batch: Batch, capture: Capture | None, edits: list[list[int]], labels: list[str]
    ) -> list[EditOutcome]:
        """Edits from rows [edit, positive, negative, ...] (or [edit]) of a built batch, one
        row list and label per edit; with a clean `capture` of that batch (fast path) no
        further forward of the network is needed.

        Several edits are independent: edit i goes to codebook group i (it routes only rows of
        group i; see `evaluate`) and their values train side by side (`_optimize`). One edit
        is the same code with one group.
        """
        if len(edits) > 1 and not self.edits_side_by_side:
            raise ValueError(f"{self.name} edits one at a time here (fast path, not sequential)")
        start = time.perf_counter()
        placements, radii = [], []
        for group, (rows, label) in enumerate(zip(edits, labels, strict=True)):
            if capture is not None:
                masks = [mask[rows] for mask in self.key_masks(batch)]
                keys = pool_key_parts(capture.x[rows], masks)
                x_edit = capture.x[rows[0]]
            else:
                sub = self.adapter.select(batch, rows)
                x = self.module_inputs(sub)
                keys, x_edit = self.keys_of(x, sub), x[0]
            value, entry_radii = self.new_entry(keys, x_edit, int(batch.last_prompt[rows[0]]))
            epsilons = [r.epsilon for r in entry_radii]
            placements.append(self.place(keys[0], value, epsilons, label, group))
            radii.append(entry_radii)
        firsts = [rows[0] for rows in edits]
        edit_batch = self.adapter.select(batch, firsts)
        edit_capture = self._edit_capture(capture, firsts, edit_batch)
        losses = self._train(placements, edit_batch, edit_capture)
        seconds = (time.perf_counter() - start) / len(edits)  # each edit's share
        return [
            EditOutcome(
                entry=placement.index,
                action=placement.action,
                radii=tuple(
                    replace(r, epsilon=e)
                    for r, e in zip(entry_radii, self.codebook.radii[placement.index], strict=True)
                ),
                losses=entry_losses,
                path="fast" if capture is not None else "slow",
                seconds=seconds,
            )
            for placement, entry_radii, entry_losses in zip(placements, radii, losses, strict=True)
        ]

    def _edit_capture(
        self, capture: Capture | None, rows: list[int], edit_batch: Batch
    ) -> Capture | None:
        if capture is None:
            return None
        if capture.per_position:
            return capture.rows(rows)
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

    def _train(
        self, placements: list[Placement], batch: Batch, capture: Capture | None
    ) -> list[list[float]]:
        """Train each placement's entry on row i of `batch` (edit i's sequence)."""
        rows, pos, targets = self.training_targets(batch)
        token_rows, device = rows.tolist(), targets.device

        @functools.cache
        def selection(active: tuple[bool, ...]) -> tuple[Tensor, Tensor, Tensor]:
            """(route, trained tokens, active edits) for the edits still training; built on
            the host once per set, so a step copies nothing to the device."""
            entries = [p.index if on else -1 for p, on in zip(placements, active, strict=True)]
            keep = [t for t, r in enumerate(token_rows) if active[r]]
            moved = torch.tensor([*entries, *keep, *_true(list(active))], device=device)
            route, tokens, edits = moved.split([len(entries), len(keep), sum(active)])
            return route, tokens, edits

        def losses(active: list[bool]) -> Tensor:
            # A finished edit routes nowhere: its entry leaves the graph and gets no gradient.
            route, keep, edits = selection(tuple(active))
            r, p = rows[keep], pos[keep]
            if capture is not None:
                logits = self.tail_logits(capture, batch, route, r, p)
            else:
                with self.applied(batch, force=route):
                    logits = self.adapter.logits(batch)[r, p]
            return _losses(logits, targets[keep], r, len(placements))[edits]

        return self._optimize([p.index for p in placements], losses)

    def _optimize(
        self, entries: list[int], losses_of: Callable[[list[bool]], Tensor]
    ) -> list[list[float]]:
        """Adam on the entries' parameters; all other weights are frozen. The edits train side
        by side on the sum of their losses: edit i's loss depends on its own entry alone, so
        each entry gets exactly its own gradient, and Adam updates each parameter on its own.
        An edit whose loss falls below `target_loss_stop` stops there (no further step)."""
        params = [self.trainable(entry) for entry in entries]
        optimizer = _adam([t for own in params for t in own], self.config.lr, self.config.adam_eps)
        active = [True] * len(entries)  # edits still training
        history: list[list[float]] = [[] for _ in entries]
        stop = self.config.target_loss_stop
        for _ in range(self.config.steps):
            loss = losses_of(active)  # (active edits,)
            going = []
            for i, value in zip(_true(active), loss.tolist(), strict=True):
                history[i].append(value)
                going.append(stop is None or value >= stop)
            if not any(going):
                break
            optimizer.zero_grad(set_to_none=True)
            trained = loss if all(going) else loss[torch.tensor(_true(going), device=loss.device)]
            trained.sum().backward()
            for i, keep in zip(_true(active), going, strict=True):
                active[i] = keep
                if not keep:  # its zero gradient would still move it (Adam's momentum)
                    for t in params[i]:
                        t.grad = None
            optimizer.step()
        return history

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
    def evaluate(
        self, batch: Batch, capture: Capture | None = None, groups: Tensor | None = None
    ) -> Routed:
        """The edited model on `batch`: from a clean capture (fast) or a full forward (slow).
        With the (B,) codebook `groups` of the rows, each row routes among its group's entries
        only (independent edits, `edit_rows`)."""
        if capture is None:
            with self.applied(batch, groups=groups) as ctx:
                logits = self.adapter.logits(batch)
            rows, pos = batch.target_mask.nonzero(as_tuple=True)
            return Routed(
                _split_rows(logits[rows, pos], batch), ctx.distances[0], ctx.route, ctx.parts[0]
            )
        keys = self.keys_of(capture.x, batch)
        parts = self.codebook.part_distances(keys)
        _, route = self.codebook.route(keys, groups)
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

    def generation_route(
        self, batch: Batch, capture: Capture, groups: Tensor | None = None
    ) -> Tensor:
        """(B,) entry of each row when generating: keys pooled over the prompt alone, as the
        wrapper does on a prompt-only forward (-1 = original module; `groups` as `evaluate`)."""
        masks = [mask & batch.prompt_mask for mask in self.key_masks(batch)]
        _, route = self.codebook.route(pool_key_parts(capture.x, masks), groups)
        return route

    @torch.no_grad()
    def generate(
        self, batch: Batch, max_new_tokens: int = 8, groups: Tensor | None = None
    ) -> list[str]:
        """Greedy answers of the edited model; routing is decided once, from the prompt."""
        answers = []
        for row in range(batch.size):
            single = self.adapter.select(batch, [row], prompt_only=True)
            group = groups[row : row + 1] if groups is not None else None
            with self.applied(single, generating=True, groups=group):
                answers.extend(self.adapter.generate(single, max_new_tokens))
        return answers

    # ----------------------------------------------------------------- the wrapper
    @contextmanager
    def applied(
        self,
        batch: Batch,
        force: Tensor | None = None,
        generating: bool = False,
        groups: Tensor | None = None,
    ) -> Iterator[_Context]:
        """Install the wrapper for forwards over `batch` (routing per row from its keys, among
        the entries of its codebook group; or the (B,) entries `force`d)."""
        parent_path, _, name = self.path.rpartition(".")
        parent = self.adapter.model.get_submodule(parent_path)
        ctx = _Context(
            pool_masks=self.key_masks(batch),
            last_prompt=batch.last_prompt,
            force=force,
            groups=groups,
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
            _, route = self.codebook.route(keys, ctx.groups)
            if ctx.force is not None:
                route = ctx.force
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


def _losses(logits: Tensor, targets: Tensor, rows: Tensor, edits: int) -> Tensor:
    """Teacher-forced target loss of each edit (edits,): the mean cross-entropy over the
    target tokens of its row (`rows`: the row of each token)."""
    tokens = nn.functional.cross_entropy(logits.float(), targets, reduction="none")
    total = tokens.new_zeros(edits).index_add(0, rows, tokens)
    count = tokens.new_zeros(edits).index_add(0, rows, torch.ones_like(tokens))
    return total / count.clamp_min(1)


def routed_positions(entry_of: Tensor) -> dict[int, Tensor]:
    """Flat indices of the inputs routed to each entry (entry_of: each input's entry, -1 for
    none), read with one device sync for all entries."""
    by_entry: dict[int, list[int]] = {}
    for i, entry in enumerate(entry_of.reshape(-1).tolist()):
        if entry >= 0:
            by_entry.setdefault(entry, []).append(i)
    flat = [i for at in by_entry.values() for i in at]
    moved = torch.tensor(flat, device=entry_of.device)  # one copy to the device for all
    return dict(zip(by_entry, moved.split([len(at) for at in by_entry.values()]), strict=True))


def _true(flags: list[bool]) -> list[int]:
    return [i for i, flag in enumerate(flags) if flag]


def _split_rows(flat: Tensor, batch: Batch) -> list[Tensor]:
    counts = batch.target_mask.sum(dim=1).tolist()
    return list(torch.split(flat.float(), counts))
