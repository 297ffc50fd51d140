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

    # 40 probes on renders from a stream the training pool never used, through the
    # standard LLaVA path: processor(prompt + " " + answer), argmax before the answer.
    rng = random.Random(987654)
    images, texts, answers = [], [], []
    for _ in range(40):
        code = rng.choice(fw.COUNTRIES).code
        rel = rng.choice(fw.RELATIONS)
        question = rng.choice(fw.TRAIN_TEMPLATES[rel] + fw.HELDOUT_TEMPLATES[rel])
        answer = fw.answer(code, rel)
        images.append(fw.render_variant(code, rng))
        texts.append(meta["prompt_template"].format(question=question) + " " + answer)
        answers.append(proc.tokenizer.convert_tokens_to_ids(answer))
    batch = proc(images=images, text=texts, padding=True, return_tensors="pt")
    last = batch["attention_mask"].sum(1) - 1  # right padding: the answer is the last token
    assert batch["input_ids"][torch.arange(40), last].tolist() == answers
    with torch.no_grad():
        logits = model(**batch).logits
    pred = logits[torch.arange(40), last - 1].argmax(-1)
    assert (pred == torch.tensor(answers)).float().mean().item() >= 0.8


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
