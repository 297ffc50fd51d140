"""image_object: which object a photo must show so that the question's answer is the given
answer (design §5 steps 1 and 6): a text-to-image prompt for A, C and D."""

from __future__ import annotations

from typing import Any, ClassVar

from pipeline.fields.base import FieldTask, ItemInput, _Out, clean


class ImageObjectOut(_Out):
    image_object: str


class ImageObject(FieldTask):
    """The object for the reference answer A (the item's own image)."""

    template_id = "image_object"
    fills = ("image_object",)
    answer_of: ClassVar[str | None] = None  # the record field holding the answer; None: A

    def schema(self) -> type[ImageObjectOut]:
        return ImageObjectOut

    def format_input(self, inp: ItemInput) -> dict[str, Any]:
        answer = inp.answer if self.answer_of is None else inp.values[self.answer_of]
        return {"question": inp.question, "answer": answer}

    def validate(self, out: ImageObjectOut, inp: ItemInput) -> list[str]:
        return [] if clean(out.image_object) else ["empty image object"]

    def parse(self, out: ImageObjectOut, inp: ItemInput) -> dict[str, Any]:
        return {self.name: clean(out.image_object)}


class LocalityImageObject(ImageObject):
    """The object for the near-miss answer C (the evaluation locality images)."""

    fills = ("locality_image_object",)
    needs = ("locality_answer",)
    answer_of = "locality_answer"


class LocalityImageTrainObject(ImageObject):
    """The object for the training negative D."""

    fills = ("locality_image_train_object",)
    needs = ("locality_answer_train",)
    answer_of = "locality_answer_train"
