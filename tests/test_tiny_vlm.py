"""The tiny LLaVA building blocks and the shipped flagworld VLM (design §9)."""

from __future__ import annotations

import json
import os
import random

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from editors.tiny_vlm import (  # noqa: E402
    IMAGE,
    build_processor,
    build_tiny_llava,
    build_word_tokenizer,
    load_tiny_vlm,
    save_tiny_vlm,
)

VOCAB = ["what is the capital of this flag?", "which country uses it?", "Paris", "Mexico_City"]


@pytest.fixture(scope="module")
def tiny():
    tok = build_word_tokenizer(VOCAB)
    return build_tiny_llava(tok, vision_layers=1, text_layers=1, text_width=64), build_processor(
        tok
    )


def _red():
    from PIL import Image

    return Image.new("RGB", (80, 50), (200, 10, 10))  # any size: the processor resizes


def test_tokenizer_words_and_specials():
    tok = build_word_tokenizer(VOCAB)
    ids = tok("what is the capital of this flag? Mexico_City").input_ids
    toks = tok.convert_ids_to_tokens(ids)
    assert toks == ["<s>", "what", "is", "the", "capital", "of", "this", "flag", "?", "Mexico_City"]
    assert tok.unk_token_id not in ids
    assert tok.convert_tokens_to_ids(IMAGE) != tok.unk_token_id
    assert tok("Lyon", add_special_tokens=False).input_ids == [tok.unk_token_id]
    assert (
        tok.decode(ids, skip_special_tokens=True) == "what is the capital of this flag? Mexico_City"
    )


def test_processor_gives_16_image_tokens(tiny):
    model, proc = tiny
    batch = proc(
        images=[_red()], text=[f"{IMAGE} what is the capital of this flag?"], return_tensors="pt"
    )
    image_id = proc.tokenizer.convert_tokens_to_ids(IMAGE)
    assert int((batch["input_ids"] == image_id).sum()) == 16
    assert tuple(batch["pixel_values"].shape) == (1, 3, 64, 64)
    with torch.no_grad():
        logits = model(**batch).logits
    assert logits.shape[:2] == batch["input_ids"].shape


def test_save_load_round_trip(tiny, tmp_path):
    model, proc = tiny
    save_tiny_vlm(model, proc, tmp_path)
    meta = json.loads((tmp_path / "okedit.json").read_text())
    assert meta["family"] == "llava" and meta["prompt_template"] == "<image> {question}"
    model2, proc2, meta2 = load_tiny_vlm(tmp_path)
    assert meta2 == meta
    assert type(proc2.image_processor).__name__.endswith("Pil")  # no torchvision needed
    text = [f"{IMAGE} which country uses it?"]
    a = proc(images=[_red()], text=text, return_tensors="pt")
    b = proc2(images=[_red()], text=text, return_tensors="pt")
    assert torch.equal(a["input_ids"], b["input_ids"])
    assert torch.equal(a["pixel_values"], b["pixel_values"])
    with torch.no_grad():
        assert torch.equal(model(**a).logits, model2(**b).logits)


def test_load_missing_model_says_what_to_do(tmp_path):
    with pytest.raises(FileNotFoundError, match="tiny-model train"):
        load_tiny_vlm(tmp_path / "nothing")


# ----------------------------------------------------------------- the flagworld model


def _answer_accuracy(model, proc, images, texts, answers) -> float:
    """Teacher-forced: every word of each answer is the argmax before it. `texts` end with
    their answer (right padding: the answer is the last tokens of each row)."""
    kwargs = {"images": images} if images is not None else {}
    batch = proc(text=texts, padding=True, return_tensors="pt", **kwargs)
    if images is None:  # text-only rows: the tokenizer alone, as a text-only LLaVA batch
        batch = proc.tokenizer(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        logits = model(**batch).logits
    right = []
    for row, answer in enumerate(answers):
        ids = proc.tokenizer(answer, add_special_tokens=False).input_ids
        end = int(batch["attention_mask"][row].sum())
        assert batch["input_ids"][row, end - len(ids) : end].tolist() == ids
        pred = logits[row, end - len(ids) - 1 : end - 1].argmax(-1).tolist()
        right.append(pred == ids)
    return sum(right) / len(right)


def test_shipped_model_answers_fresh_renders():
    from pipeline.sources import flagworld as fw
    from pipeline.tiny_model import default_model_dir

    model_dir = default_model_dir()
    assert (model_dir / "model.safetensors").is_file(), "run `okedit tiny-model train`"
    model, proc, meta = load_tiny_vlm(model_dir)
    assert meta["family"] == "llava" and meta["prompt_template"] == "<image> {question}"
    metrics = json.loads((model_dir / "metrics.json").read_text())
    assert metrics["eval"]["train_templates"] >= 0.95
    assert metrics["eval"]["heldout_templates"] >= 0.90
    assert meta["templates_version"] == fw.TEMPLATES_VERSION  # trained on this world

    # 40 probes on renders from a stream the training pool never used, through the
    # standard LLaVA path: processor(prompt + " " + answer), argmax before each answer word.
    rng = random.Random(987654)
    images, texts, answers = [], [], []
    for _ in range(40):
        code = rng.choice(fw.COUNTRIES).code
        rel = rng.choice(fw.RELATIONS)
        question = rng.choice(fw.TRAIN_TEMPLATES[rel] + fw.HELDOUT_TEMPLATES[rel])
        answer = fw.answer(code, rel)
        images.append(fw.render_variant(code, rng))
        texts.append(meta["prompt_template"].format(question=question) + " " + answer)
        answers.append(answer)
    assert any(" " in a for a in answers)  # multi-word answers among them
    assert _answer_accuracy(model, proc, images, texts, answers) >= 0.8


def test_shipped_model_answers_image_free_questions_and_stops():
    """The image-free locality questions of the demo's items (EasyEdit's `loc`): answered
    with no image at all and on the grey stand-in the validate stage shows; greedy
    generation of a two-word answer stops after it."""
    from pipeline.offline_annotator import FlagworldAnnotator
    from pipeline.scope import image_free_image
    from pipeline.sources import flagworld as fw
    from pipeline.tiny_model import default_model_dir

    model, proc, meta = load_tiny_vlm(default_model_dir())
    source = fw.FlagworldSource()
    items = source.load_items(source.list_ids(40, seed=0))
    anns = [a for a in FlagworldAnnotator(seed=0).annotate(items) if hasattr(a, "target")]
    pairs = [(a.image_free_locality.question, a.image_free_locality.answer) for a in anns]
    assert len(pairs) >= 30
    texts = [f"{q} {a}" for q, a in pairs]
    answers = [a for _, a in pairs]
    assert _answer_accuracy(model, proc, None, texts, answers) >= 0.9
    grey = [image_free_image((64, 64))] * len(pairs)
    framed = [meta["prompt_template"].format(question=t) for t in texts]
    assert _answer_accuracy(model, proc, grey, framed, answers) >= 0.9

    question = fw.text_question(fw.TEXT_TRAIN_TEMPLATES["capital"][0], "MX")
    inputs = proc.tokenizer([question], return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    new = out[0, inputs["input_ids"].shape[1] :].tolist()
    assert proc.tokenizer.decode(new, skip_special_tokens=True) == "mexico city"
    assert new[2] == proc.tokenizer.eos_token_id  # stops after the two words


def test_training_recipe_is_deterministic(tmp_path):
    from pipeline.tiny_model import train_flagworld_vlm

    def run(name):
        train_flagworld_vlm(
            tmp_path / name,
            seed=3,
            steps=5,
            pool_per_flag=2,
            batch_size=8,
            evaluate=False,
            log=lambda _msg: None,
        )
        model, _, _ = load_tiny_vlm(tmp_path / name)
        return model.state_dict()

    a, b = run("a"), run("b")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    fresh = build_tiny_llava(load_tiny_vlm(tmp_path / "a")[1].tokenizer, seed=3)
    assert not all(torch.equal(a[k], v) for k, v in fresh.state_dict().items())  # it trained


def test_validation_measures_the_image_free_locality_probe():
    """The validate stage asks the record's image-free question (on the grey stand-in) as a
    negative probe, and reports its top-1 agreement as `image_free_locality`."""
    from editors.adapters import load_model
    from editors.config import EditorConfig, ModelConfig
    from pipeline.assemble import build_records
    from pipeline.images import RenderBackend
    from pipeline.offline_annotator import FlagworldAnnotator
    from pipeline.scope import make_editor, validate_record
    from pipeline.sources.flagworld import FlagworldSource
    from pipeline.tiny_model import default_model_dir

    source = FlagworldSource(relations=("capital",))
    items = source.load_items(source.list_ids(3, 0))
    anns = FlagworldAnnotator(seed=0).annotate(items)
    images = RenderBackend(seed=0).make_images(list(zip(items, anns, strict=True)))
    records, _ = build_records(items, anns, images)
    adapter = load_model(ModelConfig(model=str(default_model_dir()), name="tiny-flagworld"))
    config = EditorConfig.for_model("tiny-flagworld", editor="ft", generate_answers=False)
    editor = make_editor(adapter, config)
    for record in records:
        validation = validate_record(record, editor, "tiny-flagworld")
        (probe,) = [p for p in validation.probes if p.kind == "image_free_locality"]
        assert probe.expected == record.image_free_locality.answer
        assert probe.pre_accuracy == 1.0  # the clean model knows the other country's fact
        assert validation.metrics.image_free_locality == probe.agreement >= 0
        old = validate_record(record.model_copy(update={"image_free_locality": None}), editor)
        assert "image_free_locality" not in {p.kind for p in old.probes}
        assert old.metrics.image_free_locality == -1.0
