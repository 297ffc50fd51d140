"""Hand-made records for schema, export and QC tests (no flagworld needed)."""

from __future__ import annotations

from io import BytesIO

from PIL import Image

from schemas.record import FieldProvenance, ImageFreeQuestion, OkeditRecord, TextNegative


def png(color: tuple[int, int, int], size: int = 48) -> bytes:
    buffer = BytesIO()
    Image.new("RGB", (size, size), color).save(buffer, format="PNG")
    return buffer.getvalue()


def make_record(item_id: str = "t-1", **overrides) -> OkeditRecord:
    fields = dict(
        item_id=item_id,
        source="test",
        question_id=item_id,
        image_id="img-1",
        question_type="capital",
        image=png((200, 0, 0)),
        question="what is the capital of the country with this flag?",
        answers=["paris"] * 10,
        original_answer="paris",
        majority_answer="paris",
        image_object="the flag of france",
        target="lyon",
        counterfact_type="text",
        counterfact_votes=["text", "text", "text"],
        counterfact_reason="the capital of an unchanged country changes",
        rephrases=[f"rephrase number {i}?" for i in range(10)],
        rephrases_train=[f"training rephrase {i}?" for i in range(3)],
        image_rephrases=[png((200, i * 10, 0)) for i in range(10)],
        locality_answer="moscow",
        locality_image_object="the flag of russia",
        locality_images=[png((0, 0, 200))],
        locality_answer_train="amsterdam",
        locality_image_train_object="the flag of the netherlands",
        locality_image_train=png((0, 200, 0)),
        text_negatives=[TextNegative(question="what currency is used there?", answer="euro")],
        image_free_locality=ImageFreeQuestion(
            question="what is the capital of russia?", answer="moscow"
        ),
        provenance=[FieldProvenance(field="target", backend="test", seed=1)],
    )
    fields.update(overrides)
    return OkeditRecord(**fields)
