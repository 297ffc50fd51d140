"""`--editor-preset paper` (issue 12): BalancEdit as its authors' code runs it
(github.com/donglgcn/EasyEdit, branch MMOKVQA). The resolved settings per model family, the
key and radius of an edit against an independent computation (a forward pre-hook on the plain
Hugging Face model), and a CLI build on flagworld."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image
from pydantic import ValidationError
from tokenizers import processors
from torch import Tensor, nn
from transformers import LlavaProcessor
from typer.testing import CliRunner

from editors.adapters import ADAPTERS, VLMAdapter, load_model, to_pil
from editors.adapters.base import ImageLike
from editors.adapters.random_models import random_adapter
from editors.base import EditOutcome
from editors.config import EditorConfig, differences_from_authors, is_authors_settings
from pipeline.assemble import build_records
from pipeline.cli import app
from pipeline.config import BuildConfig, ValidateSettings, resolve_validation
from pipeline.images import RenderBackend
from pipeline.offline_annotator import FlagworldAnnotator
from pipeline.revalidate import read_folder
from pipeline.scope import edit_request, make_editor
from pipeline.sources.flagworld import FlagworldSource
from pipeline.tiny_model import default_model_dir
from schemas.record import OkeditRecord, Rejection
from tests.records import make_record

# Read off the authors' code, not off okedit: hparams/BalancEdit/blip2.yaml and minigpt4.yaml
# (alpha, inner_params, edit_lr 0.01, n_iter 50) and easyeditor/models/BalancEdit/balancedit.py
# (Adam at edit_lr * 0.01 with eps 1e-4; mean-pooled keys; black-image negative).
AUTHORS_PER_MODEL = {
    "blip2": {"alpha": 0.05, "module": "fc2"},
    "minigpt4": {"alpha": 0.25, "module": "mlp.up_proj"},
}
AUTHORS_SHARED = {
    "key_variant": "reference",
    "key_pooling": "mean_all",
    "distance": "cosine",
    "alpha_weights": "positive",
    "negative": "black",
    "negative_answer": "train_answer",
    "lr": 0.01 * 0.01,
    "steps": 50,
    "adam_eps": 1e-4,
    "edit_eos": False,
    "target_loss_stop": None,
    "sequential": False,
}
TOL = 1e-6


def authors_model(family: str) -> str:
    return "blip2" if family == "blip2" else "minigpt4"


# ----------------------------------------------------------------------- settings
@pytest.mark.parametrize("family", sorted(ADAPTERS))
def test_paper_config_is_the_authors_settings(family: str) -> None:
    authors = AUTHORS_PER_MODEL[authors_model(family)]
    config = EditorConfig.for_model("some/model", editor_preset="paper", family=family)
    assert {name: getattr(config, name) for name in AUTHORS_SHARED} == AUTHORS_SHARED
    assert config.alpha == authors["alpha"]
    assert config.module == f"{ADAPTERS[family].layers_path}.-1.{authors['module']}"
    assert config.preset == "paper"
    template = "{image}{question}" if family == "blip2" else None
    assert differences_from_authors(config, family, template, False, inherent=False) == []
    assert is_authors_settings(config, family, template, text_bos=False)


def test_differences_name_every_changed_setting() -> None:
    rows = resolve_validation(ValidateSettings()).differences_from_authors()
    assert all(set(row) == {"setting", "this build", "authors' code"} for row in rows)
    settings = {row["setting"] for row in rows}
    expected = {"wrapped module", "routing key", "radius α", "radius negative", "learning rate"}
    assert expected | {"end-of-sequence token", "model", "prompt"} <= settings
    paper_blip2 = EditorConfig.for_model("m", editor_preset="paper", family="blip2")
    prompt = differences_from_authors(paper_blip2, "blip2", inherent=False)  # default template
    assert [row["setting"] for row in prompt] == ["prompt"]
    assert "BOS after the image tokens" in prompt[0]["this build"]
    assert not is_authors_settings(paper_blip2.model_copy(update={"alpha": 0.1}), "blip2")


def test_validate_settings_resolve_the_paper_preset(tmp_path: Path) -> None:
    paper = ValidateSettings(editor_preset="paper")
    assert resolve_validation(paper).family() == "llava"
    config = resolve_validation(paper).editor
    assert (config.preset, config.alpha, config.key_variant, config.edit_eos, config.lr) == (
        "paper",
        0.25,
        "reference",
        False,
        1e-4,
    )
    overridden = ValidateSettings(editor_preset="paper", editor={"alpha": 0.5, "steps": 3})
    resolved = resolve_validation(overridden).editor
    assert (resolved.alpha, resolved.steps) == (0.5, 3)
    with pytest.raises(ValidationError, match="paper preset"):
        ValidateSettings(editor_preset="paper", editor={"editor": "grace"})
    built = BuildConfig(validation={"editor_preset": "paper"})
    assert built.fingerprint() != BuildConfig().fingerprint()
    assert built.describe()["validation"]["resolved_editor"]["preset"] == "paper"
    # BLIP-2 reads the raw question without BOS under the paper preset only
    (tmp_path / "okedit.json").write_text(json.dumps({"family": "blip2"}))
    blip2 = resolve_validation(ValidateSettings(model=str(tmp_path), editor_preset="paper")).model
    assert (blip2.prompt_template, blip2.text_bos) == ("{image}{question}", False)
    default = resolve_validation(ValidateSettings(model=str(tmp_path))).model
    assert (default.prompt_template, default.text_bos) == (None, True)


# ----------------------------------------------------------------------- independent keys
def module_input_mean(model: nn.Module, path: str, inputs: dict[str, Tensor]) -> Tensor:
    """The input of module `path` in a plain forward of one sequence, averaged over every
    position (the authors' key)."""
    seen: list[Tensor] = []
    handle = model.get_submodule(path).register_forward_pre_hook(
        lambda module, args: seen.append(args[0].detach())
    )
    try:
        with torch.no_grad():
            model(**inputs)
    finally:
        handle.remove()
    x = seen[0]
    return x.reshape(-1, x.shape[-1]).mean(dim=0)


def cos_distance(a: Tensor, b: Tensor) -> float:
    return float(1 - nn.functional.cosine_similarity(a.double(), b.double(), dim=0))


def assert_authors_radius(
    keys: tuple[Tensor, Tensor, Tensor], alpha: float, outcome: EditOutcome, stored: Tensor
) -> None:
    """The stored key is k and ε = (1 − α)·d(k, k_neg) + α·d(k, k_pos), d = 1 − cos."""
    k, k_pos, k_neg = keys
    d_pos, d_neg = cos_distance(k, k_pos), cos_distance(k, k_neg)
    torch.testing.assert_close(stored.float(), k.float(), atol=TOL, rtol=0)
    (radius,) = outcome.radii
    assert radius.d_pos == pytest.approx(d_pos, abs=TOL)
    assert radius.d_neg == pytest.approx(d_neg, abs=TOL)
    assert radius.epsilon == pytest.approx((1 - alpha) * d_neg + alpha * d_pos, abs=TOL)
    assert d_neg > TOL * 100  # the negative really differs (the check is not vacuous)


def black(image: ImageLike) -> Image.Image:
    return Image.new("RGB", to_pil(image).size, (0, 0, 0))


def edit(
    adapter: VLMAdapter, config: EditorConfig, record: OkeditRecord
) -> tuple[EditOutcome, Tensor]:
    """The outcome and the stored key of one edit; the editor is restored."""
    editor = make_editor(adapter, config)
    try:
        outcome = editor.edit(edit_request(record, config))
        assert editor.codebook.keys is not None
        return outcome, editor.codebook.keys[0, 0].clone()
    finally:
        editor.restore()


@pytest.fixture(scope="module")
def flag_record() -> OkeditRecord:
    source = FlagworldSource(relations=("capital",))
    items = [i for i in source.load_items(source.list_ids(1, 0)) if not isinstance(i, Rejection)]
    annotations = [
        a for a in FlagworldAnnotator(seed=0).annotate(items) if not isinstance(a, Rejection)
    ]
    images = RenderBackend(seed=0).make_images([(items[0], annotations[0])])
    records, _ = build_records(
        items, annotations, [i for i in images if not isinstance(i, Rejection)]
    )
    return records[0]


def test_flagworld_key_and_radius_equal_the_authors_computation(flag_record) -> None:
    torch.set_num_threads(1)
    settings = ValidateSettings(editor_preset="paper", editor={"generate_answers": False})
    resolved = resolve_validation(settings)
    adapter = load_model(resolved.model)
    outcome, stored = edit(adapter, resolved.editor, flag_record)

    # The plain LLaVA with its own processor: "<image> {question}" (okedit.json) + " " + answer.
    processor = LlavaProcessor.from_pretrained(default_model_dir(), local_files_only=True)
    model = adapter.model
    last = len(model.model.language_model.layers) - 1
    path = f"model.language_model.layers.{last}.mlp.up_proj"  # MiniGPT-4's module

    def key(image: ImageLike, question: str, answer: str) -> Tensor:
        inputs = processor(
            images=to_pil(image), text=f"<image> {question} {answer}", return_tensors="pt"
        )
        return module_input_mean(model, path, dict(inputs))

    r = flag_record
    keys = (
        key(r.image, r.question, r.target),
        key(r.image, r.rephrases_train[0], r.target),
        key(black(r.image), r.question, r.locality_answer_train),
    )
    assert_authors_radius(keys, AUTHORS_PER_MODEL["minigpt4"]["alpha"], outcome, stored)


@pytest.fixture(scope="module")
def blip2_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random BLIP-2 saved as a model folder, whose tokenizer adds BOS like OPT's."""
    torch.set_num_threads(1)
    record = make_record()
    corpus = [record.question, record.target, record.locality_answer_train]
    corpus += record.rephrases_train
    adapter = random_adapter("blip2", corpus, config_overrides={"num_query_tokens": 4})
    tok = adapter.tokenizer
    tok.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", tok.bos_token_id)]
    )
    out = tmp_path_factory.mktemp("blip2")
    for part in (adapter.model, tok, adapter.image_processor):
        part.save_pretrained(out)
    return out


def test_blip2_key_and_radius_equal_the_authors_computation(blip2_dir: Path) -> None:
    settings = ValidateSettings(model=str(blip2_dir), device="cpu", editor_preset="paper")
    resolved = resolve_validation(settings)
    adapter = load_model(resolved.model)
    record = make_record()
    outcome, stored = edit(adapter, resolved.editor, record)
    assert outcome.path == "fast"

    # The authors' BLIP-2 sequence: the query tokens, then "question answer" tokenized without
    # special tokens (no BOS, no template).
    model, tok = adapter.model, adapter.tokenizer
    assert tok("x")["input_ids"][0] == tok.bos_token_id  # BOS would be there by default
    last = len(model.language_model.model.decoder.layers) - 1
    path = f"language_model.model.decoder.layers.{last}.fc2"

    def key(image: ImageLike, question: str, answer: str) -> Tensor:
        ids = tok(f"{question} {answer}", add_special_tokens=False)["input_ids"]
        ids = [model.config.image_token_id] * model.config.num_query_tokens + ids
        pixels = adapter.image_processor(to_pil(image), return_tensors="pt")["pixel_values"]
        inputs = {
            "input_ids": torch.tensor([ids]),
            "attention_mask": torch.ones(1, len(ids), dtype=torch.long),
            "pixel_values": pixels,
        }
        return module_input_mean(model, path, inputs)

    keys = (
        key(record.image, record.question, record.target),
        key(record.image, record.rephrases_train[0], record.target),
        key(black(record.image), record.question, record.locality_answer_train),
    )
    assert_authors_radius(keys, AUTHORS_PER_MODEL["blip2"]["alpha"], outcome, stored)


# ----------------------------------------------------------------------- CLI
def test_cli_build_with_the_paper_preset(
    prefect_api: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)  # the build cache (.okedit-cache) stays in tmp_path
    out, again = tmp_path / "out", tmp_path / "again"
    for args in (
        ["build", "--limit", "2", "--out", str(out), "--editor-preset", "paper"],
        ["validate", str(out), "--out", str(again), "--editor-preset", "paper", "--no-generate"],
    ):
        result = CliRunner().invoke(app, args, catch_exceptions=False)
        assert result.exit_code == 0, result.output
    records = read_folder(out)[0] + read_folder(again)[0]
    assert len(records) == 4
    for record in records:
        config = json.loads(record.validation.edit_config)
        assert record.validation.verdict != "error", record.validation.reason
        assert (config["preset"], config["lr"], config["steps"], config["adam_eps"]) == (
            "paper",
            1e-4,
            50,
            1e-4,
        )
        assert (config["negative"], config["negative_answer"]) == ("black", "train_answer")
        assert (config["key_variant"], config["key_parts"]) == ("reference", ["mean_all"])
        assert (config["alpha"], config["edit_eos"], config["steps_run"]) == (0.25, False, 50)
        assert config["module"].endswith(".mlp.up_proj")
