"""What every model family shares: building teacher-forced inputs, running the model,
caching the wrapped module's input for the fast edit path, and generation.

A family adapter (LLaVA, BLIP-2, Qwen2-VL, Idefics3/SmolVLM) only says how its images become
pixel tensors and placeholder tokens, and where its language-model layers live.

Sequences are `prompt ids + target ids`, right-padded. For a prompt of n tokens (image
placeholders included) and a target of m tokens, positions n-1 … n+m-2 predict the target:
`Batch.labels` holds the target ids there and -100 elsewhere.
"""

from __future__ import annotations

import inspect
import io
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any, ClassVar

import torch
from PIL import Image
from torch import Tensor, nn

ImageLike = Image.Image | bytes
IGNORE = -100


class ModulePathError(ValueError):
    """A module path that does not exist or is not a linear module inside a decoder layer."""


class TargetEncodingError(ValueError):
    """A target answer that the tokenizer cannot encode."""


@dataclass
class Batch:
    """Right-padded model inputs with the masks the editors need (all (B, T) unless noted)."""

    input_ids: Tensor
    attention_mask: Tensor
    labels: Tensor  # next-token target ids at target-predicting positions, IGNORE elsewhere
    prompt_mask: Tensor  # real prompt tokens (image placeholders included), bool
    image_mask: Tensor  # image placeholder tokens, bool
    question_mask: Tensor  # the question's own tokens (no image, template words or target)
    pixel: dict[str, Tensor]  # image-processor output for the *unique* images of the batch
    image_index: list[int]  # row -> index into the unique images
    extra: dict[str, Tensor] = field(default_factory=dict)  # e.g. Qwen2-VL mm_token_type_ids

    @property
    def size(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def target_mask(self) -> Tensor:
        return self.labels != IGNORE

    @property
    def prompt_lengths(self) -> Tensor:
        return self.prompt_mask.sum(dim=1)

    @property
    def last_prompt(self) -> Tensor:
        """Position of each row's last prompt token (B,)."""
        return self.prompt_lengths - 1

    def pool_mask(self, pooling: str) -> Tensor:
        """Positions a key is pooled over: all real tokens (`mean_all`, the reference: image,
        question and appended target), the prompt only (`mean_prompt`), its last token, the
        question's tokens (`question`) or the image placeholders (`image`)."""
        if pooling == "mean_all":
            return self.attention_mask.bool()
        if pooling == "mean_prompt":
            return self.prompt_mask
        if pooling == "last_prompt":
            positions = torch.arange(self.input_ids.shape[1], device=self.input_ids.device)
            return positions.unsqueeze(0) == self.last_prompt.unsqueeze(1)
        if pooling == "question":
            return self.question_mask
        if pooling == "image":
            return self.image_mask
        raise ValueError(
            f"unknown key pooling {pooling!r}; use mean_all, mean_prompt, last_prompt, "
            "question or image"
        )

    def to(self, device: torch.device) -> Batch:
        return replace(
            self,
            input_ids=self.input_ids.to(device),
            attention_mask=self.attention_mask.to(device),
            labels=self.labels.to(device),
            prompt_mask=self.prompt_mask.to(device),
            image_mask=self.image_mask.to(device),
            question_mask=self.question_mask.to(device),
            pixel={k: v.to(device) for k, v in self.pixel.items()},
            extra={k: v.to(device) for k, v in self.extra.items()},
        )


@dataclass
class Capture:
    """One clean forward, cached for the fast path.

    The wrapped module's input `x` does not depend on the edit, and its output is added to the
    residual stream `resid`; so the edited model's logits are
    `head(layers_after(resid + edited_module(x)))`, with no need to rerun the network below.
    """

    x: Tensor  # (B, T, H_in) input of the wrapped module
    resid: Tensor  # (B, T, H) residual stream its output is added to
    later: list[tuple[nn.Module, tuple[Any, ...], dict[str, Any]]]  # decoder layers after it
    final_hidden: Tensor  # (B, T, H) the clean model's lm_head input
    # Per decoder layer, the clean keys and values (B, heads, T, d), kept for decoding
    # (`capture(keep_kv=True)`): an edit of the last layer's residual writer changes no KV.
    kv: list[tuple[Tensor, Tensor]] | None = None
    # (B,) position of each row's first generated token minus its prompt length: 0, except
    # where the text model's positions are not token counts (Qwen2-VL's M-RoPE gives an image
    # fewer positions than tokens). Recorded with the KV cache.
    position_shift: Tensor | None = None

    @property
    def per_position(self) -> bool:
        """True when no decoder layer follows: the tail then acts on each position alone."""
        return not self.later

    def rows(self, index: list[int]) -> Capture:
        if not self.per_position:
            raise ValueError("row selection needs a capture of the last decoder layer")
        return Capture(self.x[index], self.resid[index], [], self.final_hidden[index])


class _StopForward(Exception):
    """Raised by the capture hook on the lm_head: everything needed has been recorded."""


def to_pil(image: ImageLike) -> Image.Image:
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    if isinstance(image, bytes | bytearray):
        return Image.open(io.BytesIO(image)).convert("RGB")
    raise TypeError(f"expected a PIL image or encoded image bytes, got {type(image).__name__}")


def _image_identity(image: ImageLike) -> Any:
    return bytes(image) if isinstance(image, bytes | bytearray) else id(image)


def resolve_module_path(root: nn.Module, path: str) -> str:
    """The canonical dotted path of `path` in `root`: negative list indices resolved
    (`layers.-1.mlp` and `layers[-1].mlp` both work).

    Raises ModulePathError naming the first missing part and the children that do exist.
    """
    current, canonical = root, []
    for part in path.replace("[", ".").replace("]", "").split("."):
        is_index = part.lstrip("-").isdigit()
        if is_index and isinstance(current, nn.ModuleList | nn.Sequential):
            index = int(part)
            if not -len(current) <= index < len(current):
                raise ModulePathError(
                    f"module path {path!r}: index {index} out of range for "
                    f"'{'.'.join(canonical)}' with {len(current)} entries"
                )
            index %= len(current)
            current, part = current[index], str(index)
        elif part in current._modules and current._modules[part] is not None:
            current = current._modules[part]
        else:
            children = ", ".join(name for name, m in current._modules.items() if m is not None)
            raise ModulePathError(
                f"module path {path!r}: '{'.'.join(canonical) or type(root).__name__}' has no "
                f"child {part!r} (children: {children or 'none'})"
            )
        canonical.append(part)
    return ".".join(canonical)


class VLMAdapter:
    """A loaded VLM with its tokenizer and image processor, behind one interface."""

    family: ClassVar[str] = ""
    model_class: ClassVar[str] = ""  # the transformers class that loads this family
    model_types: ClassVar[tuple[str, ...]] = ()
    default_template: ClassVar[str] = "{image}{question}"
    layers_path: ClassVar[str] = ""  # the language model's decoder layers (an nn.ModuleList)
    final_norm_path: ClassVar[str] = ""
    project_out_path: ClassVar[str | None] = None  # OPT's optional projection before lm_head
    lm_head_path: ClassVar[str] = "lm_head"
    mlp_writer: ClassVar[str] = "mlp.down_proj"  # writes the MLP output into the residual
    residual_input: ClassVar[str] = "post_attention_layernorm"  # its input = that residual
    image_before_bos: ClassVar[bool] = False  # BLIP-2 puts the query tokens before BOS
    # With image_before_bos: the text after the image starts with BOS (Blip2Processor). Set
    # per instance from `ModelConfig.text_bos`; the BalancEdit authors' BLIP-2 has no BOS.
    text_bos: bool = True
    # Same-image rows may share a KV-cached prefix in `capture` (the suffixes continue the
    # positions the model gave the prefix, e.g. Qwen2-VL's M-RoPE).
    shares_prefix: ClassVar[bool] = True
    # ... when that saves at least this many positions (each group costs two more forwards).
    prefix_min_saved: ClassVar[int] = 16
    key_proj: ClassVar[str] = "self_attn.k_proj"  # in each decoder layer: sizes its KV cache

    def __init__(
        self,
        model: nn.Module,
        tokenizer: Any,
        image_processor: Any,
        prompt_template: str | None = None,
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        template = prompt_template or getattr(model.config, "okedit_prompt_template", None)
        self.prompt_template = self._image_slot(template or self.default_template)
        if "{image}" not in self.prompt_template or "{question}" not in self.prompt_template:
            raise ValueError(
                f"prompt template {self.prompt_template!r} needs an '{{image}}' and a "
                "'{question}' slot"
            )
        self.pad_id = next(
            (i for i in (tokenizer.pad_token_id, tokenizer.eos_token_id) if i is not None), 0
        )

    def _image_slot(self, template: str) -> str:
        """Accept processor-style templates ("<image> {question}"): the first image token
        becomes the "{image}" slot."""
        if "{image}" in template:
            return template
        token = self.tokenizer.convert_ids_to_tokens(self.image_token_id)
        return template.replace(token, "{image}", 1) if isinstance(token, str) else template

    # ----------------------------------------------------------------- family specifics
    def process_images(self, images: list[Image.Image]) -> dict[str, Tensor]:
        """Image-processor output for a list of images (one entry per image)."""
        raise NotImplementedError

    def image_placeholder(self, pixel: dict[str, Tensor], index: int) -> list[int]:
        """Token ids standing for image `index` in the prompt."""
        raise NotImplementedError

    def expand_pixels(self, pixel: dict[str, Tensor], index: list[int]) -> dict[str, Tensor]:
        """Per-row pixel inputs from the unique images (row r shows image index[r])."""
        return {k: v[index] for k, v in pixel.items()}

    def image_features(self, pixel: dict[str, Tensor]) -> list[Tensor]:
        """The language-model inputs of each unique image (vision tower + projector)."""
        raise NotImplementedError

    def encoder_inputs(self, features: list[Tensor], batch: Batch) -> dict[str, Any]:
        """Model kwargs feeding precomputed per-row image features (`mm_encoder_outputs`)."""
        from transformers.modeling_outputs import BaseModelOutputWithPooling

        return {"mm_encoder_outputs": {"image": BaseModelOutputWithPooling(pooler_output=features)}}

    def extra_inputs(self, input_ids: Tensor, attention_mask: Tensor) -> dict[str, Tensor]:
        return {}

    # ----------------------------------------------------------------- layout
    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    def layers(self) -> nn.ModuleList:
        return self.model.get_submodule(self.layers_path)  # type: ignore[return-value]

    def default_module(self) -> str:
        return f"{self.layers_path}.{len(self.layers()) - 1}.{self.mlp_writer}"

    def resolve_module(self, path: str | None) -> str:
        """Canonical path of the linear module to wrap (None = the family default)."""
        canonical = resolve_module_path(self.model, path or self.default_module())
        module = self.model.get_submodule(canonical)
        if not isinstance(module, nn.Linear):
            raise ModulePathError(
                f"module {canonical!r} is a {type(module).__name__}; the editors wrap an nn.Linear "
                f"(default for {self.family}: {self.default_module()!r})"
            )
        if self.layer_index(canonical) is None:
            raise ModulePathError(
                f"module {canonical!r} is not inside a decoder layer of the language model "
                f"({self.layers_path}.N...)"
            )
        return canonical

    def layer_index(self, canonical: str) -> int | None:
        prefix = self.layers_path + "."
        if not canonical.startswith(prefix):
            return None
        head = canonical[len(prefix) :].split(".", 1)[0]
        return int(head) if head.isdigit() else None

    def layer_of(self, canonical: str) -> nn.Module:
        index = self.layer_index(canonical)
        if index is None:
            raise ModulePathError(f"module {canonical!r} is not inside {self.layers_path}")
        return self.layers()[index]

    def supports_tail(self, canonical: str) -> bool:
        """The fast path needs the module whose output is added straight to the residual."""
        index = self.layer_index(canonical)
        return index is not None and canonical == f"{self.layers_path}.{index}.{self.mlp_writer}"

    def head(self, hidden: Tensor) -> Tensor:
        """Final norm (+ projection) + lm_head on hidden states of the last decoder layer."""
        hidden = self.model.get_submodule(self.final_norm_path)(hidden)
        if self.project_out_path is not None:
            project = self.model.get_submodule(self.project_out_path)
            if project is not None:
                hidden = project(hidden)
        return self.model.get_submodule(self.lm_head_path)(hidden)

    # ----------------------------------------------------------------- inputs
    def encode_target(self, text_after: str, target: str) -> list[int]:
        """Token ids of `target` as it continues the prompt text (tokenized jointly when the
        prompt's ids are a prefix, so word boundaries match the tokenizer's own)."""
        add_special = self.image_before_bos and self.text_bos
        after = self._ids(text_after, add_special)
        joint = self._ids(f"{text_after} {target}", add_special)
        ids = (
            joint[len(after) :] if joint[: len(after)] == after else self._ids(f" {target}", False)
        )
        unk = self.tokenizer.unk_token_id
        if not ids or (unk is not None and unk in ids):
            raise TargetEncodingError(
                f"target {target!r} cannot be encoded by the {type(self.tokenizer).__name__} "
                f"tokenizer (ids {ids}; unknown token id {unk}); fix the target or the tokenizer"
            )
        return ids

    def prompt_ids(self, question: str, placeholder: list[int]) -> tuple[list[int], str]:
        """(prompt ids with the image placeholder, the text after the image)."""
        before, after = self.prompt_template.split("{image}", 1)
        before = before.replace("{question}", question)
        after = after.replace("{question}", question)
        if self.image_before_bos:
            return placeholder + self._ids(before + after, self.text_bos), before + after
        return self._ids(before, True) + placeholder + self._ids(after, False), after

    def question_span(self, question: str, placeholder: list[int]) -> tuple[int, int]:
        """[start, stop) of the question's own tokens in `prompt_ids(question, placeholder)`.

        The question sits in the template text before or after the image; its span is the
        token count of that text up to the question's start and end (its longest common
        prefix with the whole text's ids, for tokenizers that merge across the boundary).
        """
        before, after = self.prompt_template.split("{image}", 1)
        if self.image_before_bos:
            text, offset, special = before + after, len(placeholder), self.text_bos
        elif "{question}" in before:
            text, offset, special = before, 0, True
        else:
            text, special = after, False
            offset = len(self._ids(before.replace("{question}", question), True))
            offset += len(placeholder)
        head, _, _ = text.partition("{question}")
        full = self._ids(text.replace("{question}", question), special)
        start = _common_prefix(self._ids(head, special), full)
        stop = _common_prefix(self._ids(head + question, special), full)
        return offset + start, offset + max(start, stop)

    def build_inputs(
        self,
        images: list[ImageLike],
        prompts: list[str],
        targets: list[str] | None = None,
    ) -> Batch:
        """Teacher-forced inputs: image + prompt (+ target) per row, right-padded."""
        if len(images) != len(prompts) or (targets is not None and len(targets) != len(prompts)):
            raise ValueError("images, prompts and targets must have the same length")
        if not prompts:
            raise ValueError("build_inputs needs at least one row")
        unique: dict[Any, int] = {}
        index = [unique.setdefault(_image_identity(im), len(unique)) for im in images]
        first = {i: im for im, i in zip(images, index, strict=True)}
        pixel = self.process_images([to_pil(first[i]) for i in range(len(unique))])
        rows, labels, prompt_lengths, spans = [], [], [], []
        for row, question in enumerate(prompts):
            placeholder = self.image_placeholder(pixel, index[row])
            ids, after = self.prompt_ids(question, placeholder)
            target_ids = self.encode_target(after, targets[row]) if targets is not None else []
            rows.append(ids + target_ids)
            prompt_lengths.append(len(ids))
            spans.append(self.question_span(question, placeholder))
            labels.append([IGNORE] * (len(ids) - 1) + target_ids + [IGNORE])
        return self._pad(rows, labels, prompt_lengths, spans, pixel, index)

    def _pad(
        self,
        rows: list[list[int]],
        labels: list[list[int]],
        prompt_lengths: list[int],
        spans: list[tuple[int, int]],
        pixel: dict[str, Tensor],
        index: list[int],
    ) -> Batch:
        width = max(len(r) for r in rows)
        input_ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        label_t = torch.full((len(rows), width), IGNORE, dtype=torch.long)
        attention = torch.zeros((len(rows), width), dtype=torch.long)
        prompt_mask = torch.zeros((len(rows), width), dtype=torch.bool)
        question_mask = torch.zeros((len(rows), width), dtype=torch.bool)
        for b, (ids, lab, n) in enumerate(zip(rows, labels, prompt_lengths, strict=True)):
            input_ids[b, : len(ids)] = torch.tensor(ids)
            label_t[b, : len(lab)] = torch.tensor(lab)
            attention[b, : len(ids)] = 1
            prompt_mask[b, :n] = True
            question_mask[b, slice(*spans[b])] = True
        image_mask = (input_ids == self.image_token_id) & attention.bool()
        batch = Batch(
            input_ids=input_ids,
            attention_mask=attention,
            labels=label_t,
            prompt_mask=prompt_mask,
            image_mask=image_mask,
            question_mask=question_mask & prompt_mask & ~image_mask,
            pixel=pixel,
            image_index=index,
            extra=self.extra_inputs(input_ids, attention),
        )
        return batch.to(self.device)

    @property
    def image_token_id(self) -> int:
        return int(self.model.config.image_token_id)

    def _ids(self, text: str, add_special_tokens: bool) -> list[int]:
        if not text and not add_special_tokens:
            return []
        return list(self.tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"])

    def model_inputs(
        self, batch: Batch, encode_once: bool = False, features: list[Tensor] | None = None
    ) -> dict[str, Any]:
        """Keyword arguments for `model(...)`. With `encode_once` (or precomputed `features`
        of the batch's unique images), each unique image goes through the vision tower once
        and rows share its features."""
        inputs: dict[str, Any] = {
            "input_ids": batch.input_ids,
            "attention_mask": batch.attention_mask,
            **batch.extra,
        }
        if encode_once and features is None:
            features = self.image_features(self._cast(batch.pixel))
        if features is not None:
            per_row = [features[i] for i in batch.image_index]
            inputs.update(self.encoder_inputs(per_row, batch))
        else:
            inputs.update(self._cast(self.expand_pixels(batch.pixel, batch.image_index)))
        return inputs

    def _cast(self, pixel: dict[str, Tensor]) -> dict[str, Tensor]:
        return {k: v.to(self.dtype) if v.is_floating_point() else v for k, v in pixel.items()}

    # ----------------------------------------------------------------- running
    def logits(self, batch: Batch, encode_once: bool = False) -> Tensor:
        """Full forward: logits (B, T, V)."""
        return self.model(**self.model_inputs(batch, encode_once), use_cache=False).logits

    def capture(self, batch: Batch, module_path: str, keep_kv: bool = False) -> Capture:
        """One clean pass (no grad) recording what the fast path needs; see `Capture`.

        Each unique image goes through the vision tower once. When the wrapped module sits in
        the last decoder layer (the tail then acts on each position alone), rows that show the
        same image and begin with the same tokens share that prefix (`prefix_groups`): it runs
        once, its KV cache is repeated over the rows, and only their suffixes run; the other
        rows run as one plain batch. The results equal the plain batched forward up to float
        rounding: causal attention makes a prefix's states independent of what follows it.
        Below the last layer the later layers are replayed on whole rows, so the batch runs
        as one plain forward. `keep_kv` also keeps every layer's KV cache (last layer only).
        """
        layer_index = self.layer_index(module_path)
        if layer_index is None or not self.supports_tail(module_path):
            raise ModulePathError(
                f"the fast path needs the residual-writing module of a decoder layer "
                f"({self.layers_path}.N.{self.mlp_writer}), not {module_path!r}"
            )
        with torch.no_grad():
            features = self.image_features(self._cast(batch.pixel))
            last = layer_index == len(self.layers()) - 1
            keep_kv = keep_kv and last  # decoding needs the tail per position
            groups = self.prefix_groups(batch) if last else []
            if not groups:
                cache = self._cache_kwargs(self.model) if keep_kv else {}
                record = self._recorded(
                    module_path, lambda: self._forward(batch, features, **cache)
                )
                if not keep_kv:
                    return Capture(record["x"], record["resid"], record["later"], record["final"])
                shift = _position_shift(record.get("positions"), batch)
                return Capture(
                    record["x"], record["resid"], [], record["final"], _kv_of(cache), shift
                )
            return self._shared_capture(batch, module_path, features, groups, keep_kv)

    def prefix_groups(self, batch: Batch) -> list[tuple[list[int], int]]:
        """(rows, prefix length) of row groups that show the same image and share their first
        tokens, image placeholders included (the suffixes run through the text model alone,
        which cannot embed an image); a group saves `(rows - 1) * prefix` positions and is
        kept when that is at least `prefix_min_saved`. Empty when `shares_prefix` is off."""
        if not self.shares_prefix:
            return []
        lengths = batch.attention_mask.sum(dim=1).tolist()
        by_image: dict[int, list[int]] = {}
        for row, image in enumerate(batch.image_index):
            by_image.setdefault(image, []).append(row)
        groups = []
        for rows in by_image.values():
            ids = [batch.input_ids[r, : lengths[r]].tolist() for r in rows]
            prefix = min(lengths[r] for r in rows) - 1  # every row keeps a suffix
            for other in ids[1:]:
                prefix = min(prefix, _common_prefix(ids[0], other))
            image = batch.image_mask[rows].any(dim=0).nonzero()
            image_end = int(image.max()) + 1 if len(image) else 0
            if prefix >= image_end and (len(rows) - 1) * prefix >= self.prefix_min_saved:
                groups.append((rows, prefix))
        return groups

    def _shared_capture(
        self,
        batch: Batch,
        module_path: str,
        features: list[Tensor],
        groups: list[tuple[list[int], int]],
        keep_kv: bool = False,
    ) -> Capture:
        b, t = batch.input_ids.shape
        out: dict[str, Tensor] = {}
        kv = _KVAssembly(b, t) if keep_kv else None
        shift = torch.zeros(b, dtype=torch.long, device=batch.input_ids.device)

        def put(name: str, rows: list[int], start: int, value: Tensor) -> None:
            if name not in out:
                out[name] = value.new_zeros(b, t, value.shape[-1])
            out[name][rows, start : start + value.shape[1]] = value

        shared = {r for rows, _ in groups for r in rows}
        plain = [r for r in range(b) if r not in shared]
        if plain:
            sub = self.select(batch, plain)
            cache = self._cache_kwargs(self.model) if kv else {}
            sub_features = _sub_features(batch, plain, features)
            record = self._recorded(module_path, lambda: self._forward(sub, sub_features, **cache))
            for name in ("x", "resid", "final"):
                put(name, plain, 0, record[name])
            shift[plain] = _position_shift(record.get("positions"), sub)
            if kv:
                kv.put(plain, _kv_of(cache))
        for bundle, prefix in _bundles(batch, groups):
            head, tail, group_kv = self._group_records(batch, module_path, features, bundle, prefix)
            rows = [r for group in bundle for r in group]
            owner = [g for g, group in enumerate(bundle) for _ in group]  # row -> its head
            for name in ("x", "resid", "final"):
                put(name, rows, 0, head[name][owner])
                put(name, rows, prefix, tail[name])
            shift[rows] = head["shift"].to(shift.device)[owner]
            if kv:
                kv.put(rows, group_kv)
        if kv is None:
            return Capture(out["x"], out["resid"], [], out["final"])
        return Capture(out["x"], out["resid"], [], out["final"], kv.layers, shift)

    def _group_records(
        self,
        batch: Batch,
        module_path: str,
        features: list[Tensor],
        groups: list[list[int]],
        prefix: int,
    ) -> tuple[dict[str, Any], dict[str, Any], list[tuple[Tensor, Tensor]]]:
        """Records of the groups' shared prefixes, all `prefix` tokens long (one row per group,
        with its image, in one batch) and of their rows' suffixes (the text model alone, each
        row on its group's prefix KV cache; one batch), and the rows' KV cache."""
        firsts = [rows[0] for rows in groups]
        head = self.select(batch, firsts)
        ids, mask = head.input_ids[:, :prefix], head.attention_mask[:, :prefix]
        head = replace(head, input_ids=ids, attention_mask=mask, extra=self.extra_inputs(ids, mask))
        body = self.text_model()
        kwargs = self._cache_kwargs(body)
        cache = _cache_in(kwargs)
        head_features = _sub_features(batch, firsts, features)
        head_record = self._recorded(
            module_path, lambda: self._forward(head, head_features, **kwargs)
        )
        rows = [r for group in groups for r in group]
        owner = torch.tensor([g for g, group in enumerate(groups) for _ in group])
        cache.batch_select_indices(owner.to(ids.device))
        width = int(batch.attention_mask[rows].sum(dim=1).max())
        mask = batch.attention_mask[rows, :width]  # (a copy: list indexing)
        mask[:, :prefix] = 1
        ids = batch.input_ids[rows, prefix:width]
        head_record["shift"] = _prefix_shift(head_record["positions"], prefix, len(groups))
        if head_record["positions"] is not None:  # the model gave explicit positions
            # (Qwen2-VL's M-RoPE): the suffixes' text tokens continue after the prefix's.
            at = torch.arange(prefix, width, device=ids.device).unsqueeze(0)
            shift = head_record["shift"].to(ids.device)[owner.to(ids.device)].unsqueeze(1)
            kwargs = {**kwargs, "position_ids": at + shift}
        tail_record = self._recorded(
            module_path,
            lambda: body(input_ids=ids, attention_mask=mask, **kwargs).last_hidden_state,
        )
        return head_record, tail_record, _kv_of(kwargs)

    def kv_bytes(self, batch: Batch) -> int:
        """Size of the KV cache that `capture(batch, keep_kv=True)` keeps, all layers."""
        per_token = sum(
            2 * layer.get_submodule(self.key_proj).out_features for layer in self.layers()
        )
        return per_token * batch.size * int(batch.input_ids.shape[1]) * self.dtype.itemsize

    def text_model(self) -> nn.Module:
        """The language model's decoder stack (embeddings, layers, final norm; no lm_head)."""
        return self.model.get_submodule(self.layers_path.rsplit(".", 1)[0])

    @staticmethod
    def _cache_kwargs(module: nn.Module, cache: Any = None) -> dict[str, Any]:
        """Keyword arguments passing a KV cache (a new DynamicCache by default) to `module`."""
        from transformers import DynamicCache

        params = inspect.signature(module.forward).parameters
        # transformers 5 renamed `past_key_values` to `cache` (BLIP-2 passes either on)
        name = "past_key_values" if "past_key_values" in params else "cache"
        return {name: DynamicCache() if cache is None else cache, "use_cache": True}

    def decode_step(
        self,
        module_path: str,
        kv: list[tuple[Tensor, Tensor]],
        tokens: Tensor,
        attention_mask: Tensor,
        positions: Tensor,
    ) -> tuple[dict[str, Any], list[tuple[Tensor, Tensor]]]:
        """One greedy step on the text model: new tokens (B, 1) at `positions` (B, 1) after the
        cached keys/values `kv` (`attention_mask` covers both). Returns the record of the new
        position (`_recorded`: x, resid, final) and the grown cache."""
        from transformers import DynamicCache

        body = self.text_model()
        kwargs = self._cache_kwargs(body, DynamicCache(ddp_cache_data=kv))
        record = self._recorded(
            module_path,
            lambda: (
                body(
                    input_ids=tokens,
                    attention_mask=attention_mask,
                    position_ids=positions,
                    **kwargs,
                ).last_hidden_state
            ),
        )
        return record, _kv_of(kwargs)

    def _forward(self, batch: Batch, features: list[Tensor], **kwargs: Any) -> None:
        """A full forward feeding precomputed image features; the capture hooks stop it at
        the lm_head."""
        kwargs.setdefault("use_cache", False)
        self.model(**self.model_inputs(batch, features=features), **kwargs)

    def _recorded(self, module_path: str, run: Callable[[], Tensor | None]) -> dict[str, Any]:
        """Run a forward with hooks recording the wrapped module's input `x`, the residual it
        is added to, the calls of the decoder layers after it (`later`) and the lm_head input
        (`final`; or what `run` returns when it stops before any lm_head), all (B, T, ·)."""
        layer_index = self.layer_index(module_path)
        assert layer_index is not None
        layers = self.layers()
        record: dict[str, Any] = {"later": []}
        hooks = [
            layers[layer_index].register_forward_pre_hook(_record_shape(record), with_kwargs=True),
            self.model.get_submodule(module_path).register_forward_pre_hook(
                _record_arg(record, "x")
            ),
            layers[layer_index]
            .get_submodule(self.residual_input)
            .register_forward_pre_hook(_record_arg(record, "resid")),
            self.model.get_submodule(self.lm_head_path).register_forward_pre_hook(_stop(record)),
            self.text_model().register_forward_pre_hook(
                _record_positions(record), with_kwargs=True
            ),
        ]
        for layer in list(layers)[layer_index + 1 :]:
            hooks.append(
                layer.register_forward_pre_hook(_record_call(record, layer), with_kwargs=True)
            )
        try:
            with torch.no_grad():
                final = run()
            if final is not None:
                record["final"] = final
        except _StopForward:
            pass
        finally:
            for hook in hooks:
                hook.remove()
        b, t = record["shape"]
        for name in ("x", "resid", "final"):
            record[name] = record[name].reshape(b, t, -1)
        return record

    def run_later(self, capture: Capture, hidden: Tensor) -> Tensor:
        """Replay the decoder layers after the wrapped one on new hidden states."""
        for layer, args, kwargs in capture.later:
            if "hidden_states" in kwargs:
                out = layer(*args, **{**kwargs, "hidden_states": hidden})
            else:
                out = layer(hidden, *args[1:], **kwargs)
            hidden = out[0] if isinstance(out, tuple) else out
        return hidden

    @torch.no_grad()
    def generate(self, batch: Batch, max_new_tokens: int = 8) -> list[str]:
        """Greedy answers to the prompts of `batch` (one row at a time: no left padding)."""
        answers = []
        for row in range(batch.size):
            single = self.select(batch, [row], prompt_only=True)
            inputs = self.model_inputs(single)
            out = self.model.generate(
                **inputs, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=self.pad_id
            )
            new = out[0, single.input_ids.shape[1] :]
            answers.append(self.tokenizer.decode(new, skip_special_tokens=True).strip())
        return answers

    def select(self, batch: Batch, rows: list[int], prompt_only: bool = False) -> Batch:
        """Rows of a batch, trimmed to their own length (and to the prompt if asked)."""
        keep = batch.prompt_mask if prompt_only else batch.attention_mask.bool()
        width = int(keep[rows].sum(dim=1).max())
        idx = torch.tensor(rows, device=batch.input_ids.device)
        unique = sorted({batch.image_index[r] for r in rows})
        remap = {old: new for new, old in enumerate(unique)}
        input_ids = batch.input_ids[idx, :width]
        attention = keep[idx, :width].long()
        labels = (
            batch.labels[idx, :width] if not prompt_only else torch.full_like(input_ids, IGNORE)
        )
        return Batch(
            input_ids=input_ids,
            attention_mask=attention,
            labels=labels,
            prompt_mask=batch.prompt_mask[idx, :width],
            image_mask=batch.image_mask[idx, :width] & attention.bool(),
            question_mask=batch.question_mask[idx, :width] & attention.bool(),
            pixel=self.select_pixels(batch.pixel, unique),
            image_index=[remap[batch.image_index[r]] for r in rows],
            extra=self.extra_inputs(input_ids, attention),
        )

    def select_pixels(self, pixel: dict[str, Tensor], unique: list[int]) -> dict[str, Tensor]:
        return self.expand_pixels(pixel, unique)


def _common_prefix(a: list[int], b: list[int]) -> int:
    """Length of the longest common prefix of two id lists."""
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def _record_positions(record: dict[str, Any]):
    """Hook on the text model: the position ids its caller passed (None when it passed none)."""

    def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
        record["positions"] = kwargs.get("position_ids")

    return hook


def _axes(position_ids: Tensor) -> Tensor:
    """Position ids as (axes, B, T): (B, T) plain, or multimodal RoPE's (3, B, T) (Qwen2-VL's
    temporal/height/width axes, which text tokens advance together; a leading fourth row of
    plain text positions is dropped)."""
    ids = position_ids if position_ids.ndim == 3 else position_ids.unsqueeze(0)
    return ids[-3:] if ids.shape[0] == 4 else ids


def _position_shift(position_ids: Tensor | None, batch: Batch) -> Tensor:
    """(B,) next position after each row's prompt minus its prompt length (0 for positions
    that count tokens; negative where an image takes fewer positions than tokens)."""
    lengths = batch.prompt_lengths
    if position_ids is None:
        return torch.zeros_like(lengths)
    rows = torch.arange(batch.size, device=lengths.device)
    return _axes(position_ids)[:, rows, batch.last_prompt].amax(dim=0) + 1 - lengths


def _prefix_shift(position_ids: Tensor | None, prefix: int, rows: int) -> Tensor:
    """The same for `rows` prefixes of `prefix` tokens each, (rows,)."""
    if position_ids is None:
        return torch.zeros(rows, dtype=torch.long)
    return _axes(position_ids)[:, :, prefix - 1].amax(dim=0) + 1 - prefix


def _bundles(
    batch: Batch, groups: list[tuple[list[int], int]]
) -> list[tuple[list[list[int]], int]]:
    """Prefix groups bundled to run together: (groups, common prefix length). A bundle's
    prefixes are cut to its shortest one, which must still hold every member's image (the
    suffixes run through the text model alone); so the groups of several items (other images,
    other questions) share one prefix forward and one suffix forward. Groups whose image ends
    later go to the next bundle."""
    ends = {}
    for rows, _ in groups:
        image = batch.image_mask[rows].any(dim=0).nonzero()
        ends[rows[0]] = int(image.max()) + 1 if len(image) else 0
    bundles = []
    left = sorted(groups, key=lambda group: group[1])
    while left:
        prefix = left[0][1]
        bundle = [(rows, p) for rows, p in left if ends[rows[0]] <= prefix]
        bundles.append(([rows for rows, _ in bundle], prefix))
        left = [(rows, p) for rows, p in left if ends[rows[0]] > prefix]
    return bundles


def _cache_in(kwargs: dict[str, Any]) -> Any:
    return kwargs.get("cache", kwargs.get("past_key_values"))


def _kv_of(kwargs: dict[str, Any]) -> list[tuple[Tensor, Tensor]]:
    """Per layer (keys, values) of the cache passed in `kwargs`."""
    return [(layer.keys, layer.values) for layer in _cache_in(kwargs).layers]


class _KVAssembly:
    """Per-layer KV tensors (B, heads, T, d) filled row group by row group."""

    def __init__(self, rows: int, width: int) -> None:
        self.rows, self.width = rows, width
        self.layers: list[tuple[Tensor, Tensor]] = []

    def put(self, rows: list[int], kv: list[tuple[Tensor, Tensor]]) -> None:
        if not self.layers:
            self.layers = [
                tuple(t.new_zeros(self.rows, t.shape[1], self.width, t.shape[3]) for t in pair)
                for pair in kv
            ]
        for (keys, values), (k, v) in zip(self.layers, kv, strict=True):
            keys[rows, :, : k.shape[2]] = k
            values[rows, :, : v.shape[2]] = v


def _sub_features(batch: Batch, rows: list[int], features: list[Tensor]) -> list[Tensor]:
    """The features of `select(batch, rows)`'s unique images, in its order."""
    return [features[i] for i in sorted({batch.image_index[r] for r in rows})]


def _record_shape(record: dict[str, Any]):
    def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
        hidden = args[0] if args else kwargs["hidden_states"]
        record["shape"] = tuple(hidden.shape[:2])

    return hook


def _record_arg(record: dict[str, Any], name: str):
    def hook(module: nn.Module, args: tuple) -> None:
        record[name] = args[0]

    return hook


def _record_call(record: dict[str, Any], layer: nn.Module):
    def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
        record["later"].append((layer, args, dict(kwargs)))

    return hook


def _stop(record: dict[str, Any]):
    def hook(module: nn.Module, args: tuple) -> None:
        record["final"] = args[0]
        raise _StopForward

    return hook
