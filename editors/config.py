"""Typed configuration of the editors and of the model they edit (design §7).

`EditorConfig` holds every knob of BalancEdit, GRACE and FT. Values that the caller does not
set come from the editor's reference defaults (`EDITOR_DEFAULTS`), and, for BalancEdit, from
the per-model edit-strength preset (`EDIT_PRESETS`, chosen by `EditorConfig.for_model`):
the paper's lr 1e-4 suits BLIP-2-sized models but does not flip the answer of the tiny
flagworld VLM in 50 steps (design §9), so edit strength is per model and reported with
every result (`Validation.edit_config`). The "paper" preset (`EditorConfig.for_model(...,
editor_preset="paper", family=...)`) replaces all of that by the settings of the BalancEdit
authors' code (`authors_settings`); `differences_from_authors` lists what still differs.
All three are data, in presets.yaml beside this file.

`ModelConfig` says which VLM to load and where (`editors.adapters.load_model`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path, PurePath
from typing import Any, Literal

import torch
import yaml
from pydantic import BaseModel, ConfigDict, Field, model_validator

EditorName = Literal["balancedit", "grace", "ft"]
# Positions of the module input a key (part) is averaged over; see `Batch.pool_mask`.
KeyPooling = Literal["mean_all", "mean_prompt", "last_prompt", "question", "image"]
KeyVariant = Literal["reference", "question", "last_prompt", "two_part", "two_part_last"]
RadiusNegative = Literal["image", "text"]
Distance = Literal["cosine", "euclidean"]
NegativeSource = Literal["near_miss", "black", "white"]
NegativeAnswer = Literal["target", "train_answer"]
Family = Literal["auto", "llava", "blip2", "qwen2_vl", "idefics3", "smolvlm"]
EditorPreset = Literal["default", "paper"]

# Editor defaults, per-model edit strengths and the authors' settings: data in presets.yaml.
PRESETS: dict[str, Any] = yaml.safe_load((Path(__file__).parent / "presets.yaml").read_text())
EDITOR_DEFAULTS: dict[str, dict[str, Any]] = PRESETS["editor_defaults"]
EDIT_PRESETS: dict[str, dict[str, Any]] = PRESETS["edit_presets"]


@dataclass(frozen=True)
class KeyPart:
    """One part of a routing key: the positions of the module input it is pooled over, and
    the training negatives its radius ε must stay inside ("image": the near-miss or
    black/white image with the edit question; "text": the item's training text negative)."""

    pooling: KeyPooling
    negatives: tuple[RadiusNegative, ...]


# Key variants beyond the reference (issue 7). `reference` is BalancEdit as published: one key
# pooled by `key_pooling` (mean over all positions), ε from the image negative only. The others
# also keep ε inside the item's training text negative (same image, another fact). A two-part
# key routes only when *every* part lies inside its own ε.
KEY_VARIANTS: dict[str, tuple[KeyPart, ...]] = {
    # Mean over the question's tokens: no image tokens, no template words, no target.
    "question": (KeyPart("question", ("image", "text")),),
    # The last prompt token (GRACE's key): the state from which the answer is predicted.
    "last_prompt": (KeyPart("last_prompt", ("image", "text")),),
    # Image part (image tokens; ε from image negatives) AND text part (question tokens; ε from
    # the text negative).
    "two_part": (KeyPart("image", ("image",)), KeyPart("question", ("text",))),
    # As two_part, with the last prompt token as the text part.
    "two_part_last": (KeyPart("image", ("image",)), KeyPart("last_prompt", ("text",))),
}


# BalancEdit as its authors' code runs it (presets.yaml `authors`: where it was read, the
# two models they edited and what okedit's families map to, α and module per model, the
# settings both share, BLIP-2's template and MiniGPT-4's prompt).
_AUTHORS: dict[str, Any] = PRESETS["authors"]
AUTHORS_CODE: str = _AUTHORS["code"]
AUTHORS_MODEL: dict[str, str] = _AUTHORS["model"]
AUTHORS_ALPHA: dict[str, float] = _AUTHORS["alpha"]
AUTHORS_MODULE: dict[str, str] = _AUTHORS["module"]
AUTHORS_SETTINGS: dict[str, Any] = _AUTHORS["settings"]
AUTHORS_BLIP2_TEMPLATE: str = _AUTHORS["blip2_template"]
AUTHORS_MINIGPT4_PROMPT: str = _AUTHORS["minigpt4_prompt"]


def _authors_model(family: str) -> str:
    if family not in AUTHORS_MODEL:
        raise ValueError(
            f"the paper preset needs the model family (blip2, llava, qwen2_vl, idefics3 or "
            f"smolvlm) to pick the authors' α and module; got {family!r}"
        )
    return AUTHORS_MODEL[family]


def _layers_path(family: str) -> str:
    from editors.adapters import ADAPTERS  # the adapters import this module

    return ADAPTERS[family].layers_path


def authors_settings(family: str) -> dict[str, Any]:
    """`EditorConfig` fields of BalancEdit as the authors' code runs it, for an okedit model
    family: `AUTHORS_SETTINGS` plus the α and the wrapped module (in the last decoder layer)
    of the authors' model that family maps to (`AUTHORS_MODEL`)."""
    model = _authors_model(family)
    module = f"{_layers_path(family)}.-1.{AUTHORS_MODULE[model]}"
    return {**AUTHORS_SETTINGS, "alpha": AUTHORS_ALPHA[model], "module": module}


def preset_name(model: str) -> str:
    """The `EDIT_PRESETS` key for a model id or path: an exact key, else a key contained in
    the model's last path component (e.g. `.okedit-cache/tiny-flagworld-v1`), else `default`."""
    if model in EDIT_PRESETS:
        return model
    leaf = PurePath(model.rstrip("/")).name.lower()
    for name in EDIT_PRESETS:
        if name != "default" and name in leaf:
            return name
    return "default"


class EditorConfig(BaseModel):
    """Settings of one editor run. Unset fields take the editor's defaults (`EDITOR_DEFAULTS`)."""

    model_config = ConfigDict(extra="forbid")

    editor: EditorName = "balancedit"
    # Dotted path of the linear module to wrap, negative list indices allowed
    # (e.g. "model.language_model.layers.-1.mlp.down_proj"); None = the adapter's default.
    module: str | None = None
    key_pooling: KeyPooling = "mean_all"  # the pooling of the `reference` key variant
    # Which key routes an input (KEY_VARIANTS); "reference" = one key pooled by `key_pooling`,
    # ε from the image negative only (BalancEdit's code; issue 3). BalancEdit only.
    key_variant: KeyVariant = "reference"
    # The item's text negative that sets the text radius (variants with a "text" negative); it
    # becomes a training probe and is left out of the evaluation probes. -1 = the last one.
    train_text_negative: int = -1
    distance: Distance = "cosine"
    # Radius: eps = (1 - alpha) * d(k, k_neg) + alpha * d(k, k_pos) when alpha_weights is
    # "positive" (the reference code); "negative" puts alpha on the negative term instead.
    alpha: float = Field(default=0.05, ge=0.0, le=1.0)
    alpha_weights: Literal["positive", "negative"] = "positive"
    negative: NegativeSource = "near_miss"
    # The answer after a black/white negative's question: the edit target, or the item's
    # training near-miss answer `locality_answer_train` (the authors' code). A near-miss
    # negative always takes that answer.
    negative_answer: NegativeAnswer = "target"
    lr: float = Field(default=1e-4, gt=0.0)
    steps: int = Field(default=50, ge=0)
    adam_eps: float = Field(default=1e-4, gt=0.0)
    # Stop training early once the teacher-forced target loss falls below this value.
    # Also train the end-of-sequence token after the target (not in the paper or EasyEdit,
    # whose metrics are teacher-forced): without it edited greedy answers often do not stop.
    edit_eos: bool = False
    target_loss_stop: float | None = Field(default=None, gt=0.0)
    grace_epsilon: float = Field(default=1.0, gt=0.0)  # GRACE's fixed initial radius
    sequential: bool = False  # keep the codebook across edits instead of restoring
    # Cached module input + tail-only training + batched probes. Needs the module that writes
    # the MLP output into the residual (down_proj / OPT fc2); other modules run the slow path.
    fast: bool = True
    top_k_text: int = Field(default=1, ge=1)  # agreement on text probes (EasyEdit: top-1)
    top_k_image: int = Field(default=10, ge=1)  # agreement on image probes (EasyEdit: top-10)
    hm_locality: Literal["agreement", "label"] = "agreement"  # which Loc enters HM
    # `ambiguous` compares a negative with the positives of its own probe family (image:
    # image rephrases vs near-miss images; text: rephrases vs text negatives). "all" compares
    # across families too: with an image-dominated key (the reference), other questions about
    # the edit image always sit nearer than a re-rendered image, so every item is ambiguous.
    ambiguity: Literal["family", "all"] = "family"
    # Greedy answers of every probe before and after the edit, scored by VQA exact match.
    # The fast path decodes them from its capture's KV cache (`editors.decoding`), kept when
    # it fits `decode_kv_gb` (e.g. LLaVA-1.5-7B, 30 probes of ~600 tokens: 9.5 GB in fp16;
    # twice that while decoding); otherwise, and on the slow path, one generate() per probe.
    generate_answers: bool = True
    max_new_tokens: int = Field(default=8, ge=1)  # capped at the longest answer + 1 token
    decode_kv_gb: float = Field(default=8.0, ge=0.0)
    # The EDIT_PRESETS entry the edit strength came from, or "paper" (`authors_settings`)
    preset: str = "default"
    seed: int = 0

    @model_validator(mode="before")
    @classmethod
    def _editor_defaults(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        editor = data.get("editor", "balancedit")
        defaults = EDITOR_DEFAULTS.get(editor, {})
        return {**defaults, **data}

    @model_validator(mode="after")
    def _variant_needs_balancedit(self) -> EditorConfig:
        if self.key_variant != "reference" and self.editor != "balancedit":
            raise ValueError(
                f"key_variant {self.key_variant!r} sets its radius from positives and negatives: "
                f"BalancEdit only (editor {self.editor!r} uses key_variant 'reference')"
            )
        return self

    def key_parts(self) -> tuple[KeyPart, ...]:
        """The parts of the routing key of this config (one part except for two-part keys)."""
        if self.key_variant == "reference":
            return (KeyPart(self.key_pooling, ("image",)),)
        return KEY_VARIANTS[self.key_variant]

    @property
    def needs_text_negative(self) -> bool:
        """True when some key part's radius is set by the item's training text negative."""
        return any("text" in part.negatives for part in self.key_parts())

    @property
    def key_label(self) -> str:
        """The key's name in reports (`Validation.key_variant`): the variant, and for the
        reference variant with another pooling than mean_all, `reference/<pooling>`."""
        if self.key_variant == "reference" and self.key_pooling != "mean_all":
            return f"reference/{self.key_pooling}"
        return self.key_variant

    @classmethod
    def for_model(
        cls,
        model: str,
        *,
        editor_preset: EditorPreset = "default",
        family: str | None = None,
        **overrides: Any,
    ) -> EditorConfig:
        """Config for `model` (id or path): editor defaults, then the model's BalancEdit
        edit-strength preset, then `overrides`. `editor_preset="paper"` takes the authors'
        settings for the model's `family` (`authors_settings`) instead of the preset; the
        overrides still win."""
        editor = overrides.get("editor", "balancedit")
        if editor_preset == "paper":
            if editor != "balancedit":
                raise ValueError(
                    f"the paper preset is the authors' BalancEdit; editor {editor!r} has none"
                )
            return cls(**{**authors_settings(family or "auto"), "preset": "paper", **overrides})
        name = preset_name(model)
        preset = EDIT_PRESETS[name] if editor == "balancedit" else {}
        return cls(**{**preset, "preset": name, **overrides})

    def to_json(self, **extra: Any) -> str:
        """The settings actually used, as stored in `Validation.edit_config`."""
        return json.dumps({**self.model_dump(), **extra}, sort_keys=True)


class ModelConfig(BaseModel):
    """Which VLM to load (Hub id or local folder) and how."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    model: str
    family: Family = "auto"  # "auto" = from `config.model_type`
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = "auto"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    # Prompt with an "{image}" and a "{question}" slot; None = the family's chat format.
    prompt_template: str | None = None
    # BLIP-2: the text after the query tokens starts with BOS, as Blip2Processor does (the
    # authors' code has none). Other families ignore it.
    text_bos: bool = True
    name: str | None = None  # short name for reports and presets; default: path leaf

    @property
    def display_name(self) -> str:
        return self.name or PurePath(self.model.rstrip("/")).name or self.model

    def torch_device(self) -> torch.device:
        """The device to run on; CUDA requested but absent is an error, not a silent CPU run."""
        if self.device == "cuda" and not torch.cuda.is_available():
            raise RuntimeError(
                "ModelConfig.device is 'cuda' but torch.cuda.is_available() is False "
                f"(torch {torch.__version__}); use device='cpu' or 'auto', or install a CUDA build "
                "of torch on a machine with a GPU."
            )
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(self.device)

    def torch_dtype(self, device: torch.device | None = None) -> torch.dtype:
        """fp32 on CPU; bf16 (or fp16 where bf16 is unsupported) on CUDA, unless set."""
        if self.dtype != "auto":
            return getattr(torch, self.dtype)
        device = device or self.torch_device()
        if device.type != "cuda":
            return torch.float32
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


Difference = dict[str, str]  # {"setting": ..., "this build": ..., "authors' code": ...}


def _row(setting: str, this: str, authors: str) -> Difference:
    return {"setting": setting, "this build": this, "authors' code": authors}


def _negative_text(negative: str, answer: str) -> str:
    if negative == "near_miss":
        return "the training near-miss image + edit question + locality_answer_train"
    said = "locality_answer_train" if answer == "train_answer" else "target"
    return f"an all-{negative} image + edit question + {said}"


def _setting_rows(config: EditorConfig, family: str) -> list[Difference]:
    """Differences in what an `EditorConfig` controls (none under the paper preset)."""
    from editors.adapters import ADAPTERS  # the adapters import this module

    authors = authors_settings(family)
    model = _authors_model(family)
    rows: list[Difference] = []
    if config.editor != "balancedit":
        rows.append(_row("editor", config.editor, "BalancEdit"))
    default_module = f"{_layers_path(family)}.-1.{ADAPTERS[family].mlp_writer}"
    module = (config.module or default_module).replace("[", ".").replace("]", "")
    if module != authors["module"]:
        rows.append(
            _row(
                "wrapped module",
                config.module or f"{ADAPTERS[family].mlp_writer} of the last decoder layer",
                f"{AUTHORS_MODULE[model]} of the last decoder layer, as in {model}",
            )
        )
    if (config.key_variant, config.key_pooling) != ("reference", "mean_all"):
        rows.append(
            _row(
                "routing key",
                config.key_label,
                "module input averaged over all positions (image, question, target)",
            )
        )
    if config.distance != authors["distance"]:
        rows.append(_row("distance", config.distance, "cosine (d = 1 − cos)"))
    if (config.alpha, config.alpha_weights) != (authors["alpha"], authors["alpha_weights"]):
        term = "d(k, k_pos)" if config.alpha_weights == "positive" else "d(k, k_neg)"
        rows.append(
            _row(
                "radius α",
                f"{config.alpha:g} on {term}",
                f"{authors['alpha']:g} on d(k, k_pos), as for {model}",
            )
        )
    if (config.negative, config.negative_answer) != (
        authors["negative"],
        authors["negative_answer"],
    ):
        rows.append(
            _row(
                "radius negative",
                _negative_text(config.negative, config.negative_answer),
                _negative_text(authors["negative"], authors["negative_answer"]),
            )
        )
    for name, setting in (
        ("lr", "learning rate"),
        ("steps", "Adam steps"),
        ("adam_eps", "Adam eps"),
    ):
        if getattr(config, name) != authors[name]:
            rows.append(_row(setting, f"{getattr(config, name):g}", f"{authors[name]:g}"))
    if config.target_loss_stop is not None:
        rows.append(_row("early stop", f"at target loss < {config.target_loss_stop:g}", "none"))
    if config.edit_eos:
        rows.append(_row("end-of-sequence token", "trained after the target", "not trained"))
    if config.sequential:
        rows.append(
            _row("edits", "sequential, one codebook", "single, each undone before the next")
        )
    return rows


def _prompt_row(family: str, prompt_template: str | None, text_bos: bool) -> Difference | None:
    """BLIP-2's prompt (a setting: `ModelConfig.prompt_template` and `text_bos`)."""
    from editors.adapters import ADAPTERS  # the adapters import this module

    template = prompt_template or ADAPTERS[family].default_template
    if template == AUTHORS_BLIP2_TEMPLATE and not text_bos:
        return None
    bos = ", BOS after the image tokens" if text_bos else ", no BOS"
    return _row("prompt", f"`{template}`{bos}", f"`{AUTHORS_BLIP2_TEMPLATE}`, no BOS")


def _inherent_rows(
    config: EditorConfig, family: str, prompt_template: str | None
) -> list[Difference]:
    """Differences no okedit setting removes: other models, preprocessing, precision."""
    model = _authors_model(family)
    rows: list[Difference] = []
    if family != "blip2":
        rows.append(_row("model", family, f"{model}, whose α and module it takes"))
        rows.append(
            _row(
                "prompt",
                f"`{prompt_template}`" if prompt_template else "the family's chat format",
                f"`{AUTHORS_MINIGPT4_PROMPT}` (MiniGPT-4's, no ###Assistant: turn)",
            )
        )
    rows.append(
        _row(
            "image preprocessing",
            "the model's own image processor",
            "BlipImageEvalProcessor at 364×364 px for both models",
        )
    )
    rows.append(
        _row(
            "trained copy",
            "float32 copy of the module",
            "copy in the language model's dtype (float16)",
        )
    )
    if config.generate_answers:
        rows.append(
            _row(
                "routing while generating",
                "decided once from the prompt",
                "recomputed at every forward (teacher-forced metrics only)",
            )
        )
    return rows


def differences_from_authors(
    config: EditorConfig,
    family: str,
    prompt_template: str | None = None,
    text_bos: bool = True,
    *,
    inherent: bool = True,
) -> list[Difference]:
    """Every way a BalancEdit run with `config` on a model of `family` (blip2, llava,
    qwen2_vl, idefics3, smolvlm) differs from the authors' code (`AUTHORS_CODE`), as rows
    `{"setting", "this build", "authors' code"}` for the dataset card.

    `prompt_template` is the template the adapter used (`VLMAdapter.prompt_template`; None =
    the family default), `text_bos` `ModelConfig.text_bos`. With `inherent=False` only the
    differences a setting can remove are listed (the model itself, its image processor, the
    copy's precision and routing while generating are left out).
    """
    rows = _setting_rows(config, family)
    prompt = _prompt_row(family, prompt_template, text_bos) if family == "blip2" else None
    rows += [prompt] if prompt is not None else []
    return rows + (_inherent_rows(config, family, prompt_template) if inherent else [])


def is_authors_settings(
    config: EditorConfig, family: str, prompt_template: str | None = None, text_bos: bool = True
) -> bool:
    """True when every setting okedit controls equals the authors' code (`--editor-preset
    paper`): `differences_from_authors` lists only differences no setting removes."""
    return not differences_from_authors(config, family, prompt_template, text_bos, inherent=False)
