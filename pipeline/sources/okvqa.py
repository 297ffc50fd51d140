"""OK-VQA sources (design §4): from the Hugging Face Hub, or from the VQA-API files.

Both normalise to `SourceItem` with `item_id = "okvqa-<split>-<question_id>"` and
`source = "okvqa/<split>2014"`. `list_ids(limit, seed)` returns item ids (all of them in
source order, or a seeded sample of `limit` kept in source order); `load_items(ids)` accepts
those ids (or bare question ids) and returns, per id, a `SourceItem` or a
`Rejection(stage="gather")` (unknown id, malformed entry, missing or bad image). A whole file
that is not a VQA-API file raises `OkvqaFileError`.

- `OkvqaHubSource`: `datasets.load_dataset("lmms-lab/OK-VQA", split="val2014")` (question_id
  is a string there, image_id is not stored: OK-VQA question ids are image_id * 10 + k), or
  any parquet copy of a split (e.g. train2014) via `parquet=`; extra columns are ignored.
- `OkvqaFilesSource`: `OpenEnded_mscoco_<split>2014_questions.json` +
  `mscoco_<split>2014_annotations.json`; images from a local COCO folder, else downloaded
  from `<image_base_url>/<split>2014/COCO_<split>2014_<image_id:012d>.jpg` by
  `pipeline.download.ImageDownloader` (cached, verified, resumable).
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, Literal

from pipeline.download import (
    DownloadConfig,
    DownloadFailed,
    ImageDownloader,
    check_url,
    image_problem,
)
from schemas.record import Rejection, SourceItem

DEFAULT_HUB_REPO = "lmms-lab/OK-VQA"
DEFAULT_IMAGE_BASE_URL = "http://images.cocodataset.org"
DEFAULT_MAX_PIXELS = 40_000_000
STAGE = "gather"


class OkvqaFileError(ValueError):
    """A questions/annotations file that cannot be used at all."""


def split_short(split: str) -> Literal["val", "train"]:
    """'val2014' / 'val' -> 'val'; 'train2014' / 'train' -> 'train'."""
    short = split.removesuffix("2014")
    if short not in ("val", "train"):
        raise ValueError(f"unknown OK-VQA split {split!r}: use val2014 or train2014")
    return short  # type: ignore[return-value]


def sample_ids(ids: list[str], limit: int | None, seed: int) -> list[str]:
    """All ids, or `limit` of them drawn with `seed`, kept in source order."""
    if limit is None or limit >= len(ids):
        return list(ids)
    chosen = set(random.Random(seed).sample(range(len(ids)), limit))
    return [qid for i, qid in enumerate(ids) if i in chosen]


class _Naming:
    def __init__(self, split: str):
        self.short = split_short(split)
        self.source = f"okvqa/{self.short}2014"
        self.prefix = f"okvqa-{self.short}-"

    def item_id(self, question_id: str) -> str:
        return f"{self.prefix}{question_id}"

    def question_id(self, some_id: str) -> str:
        return some_id.removeprefix(self.prefix)


def _dedupe(ids: Iterable[str]) -> list[str]:
    return list(dict.fromkeys(ids))


# --------------------------------------------------------------------------- Hub


class OkvqaHubSource:
    """OK-VQA rows from the Hub (or a local parquet copy) through `datasets`."""

    def __init__(
        self,
        repo: str = DEFAULT_HUB_REPO,
        split: str = "val2014",
        parquet: Path | str | list[Path | str] | None = None,
        max_pixels: int = DEFAULT_MAX_PIXELS,
    ):
        self.repo = repo
        self.split = split
        self.parquet = parquet
        self.max_pixels = max_pixels
        self.naming = _Naming(split)
        self.name = "okvqa-hub"
        self._dataset: Any = None
        self._index: dict[str, int] | None = None
        self._dropped: dict[str, str] = {}  # item id -> why its row is no item
        self._order: list[str] = []  # every row's item id, in order

    def _load(self) -> Any:
        if self._dataset is None:
            import datasets

            where = self.parquet or self.repo
            try:
                if self.parquet is not None:
                    files = self.parquet if isinstance(self.parquet, list) else [self.parquet]
                    for f in files:
                        _check_parquet(Path(f))
                    quiet = not datasets.utils.are_progress_bars_disabled()
                    if quiet:  # no "Generating train split" bars for a local copy
                        datasets.disable_progress_bars()
                    try:
                        ds = datasets.load_dataset(
                            "parquet", data_files=[str(f) for f in files], split="train"
                        )
                    finally:
                        if quiet:
                            datasets.enable_progress_bars()
                else:
                    ds = datasets.load_dataset(self.repo, split=self.split)
            except OkvqaFileError:
                raise
            except Exception as exc:  # datasets/pyarrow/hub errors: not a usable split
                detail = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
                raise OkvqaFileError(f"{where}: cannot load it ({detail})") from None
            missing = {"question_id", "image", "question", "answers"} - set(ds.column_names)
            if missing:
                raise OkvqaFileError(f"{where} lacks column(s) {sorted(missing)}")
            problem = _column_types_problem(ds.features)
            if problem:
                raise OkvqaFileError(f"{where}: {problem}")
            try:
                self._dataset = ds.cast_column("image", datasets.Image(decode=False))
            except Exception as exc:
                raise OkvqaFileError(
                    f"{where}: column 'image' is {ds.features['image']}, not images ({exc})"
                ) from None
        return self._dataset

    def _ids(self) -> dict[str, int]:
        if self._index is None:
            qids = (_row_qid(q) for q in self._load()["question_id"])
            self._index, self._dropped, self._order = _index_entries(
                qids, self.naming, lambda row: "no question_id"
            )
        return self._index

    def list_ids(self, limit: int | None = None, seed: int = 0) -> list[str]:
        """Every row's item id (rows without an id or repeating one included: they load as
        rejections), or a seeded sample of `limit`."""
        self._ids()
        return sample_ids(self._order, limit, seed)

    def load_items(self, ids: list[str]) -> list[SourceItem | Rejection]:
        index = self._ids()
        wanted = _dedupe(ids)
        rows = {
            i: index[self.naming.question_id(i)]
            for i in wanted
            if self.naming.question_id(i) in index
        }
        fetched = self._load().select(sorted(set(rows.values()))) if rows else []
        by_row = dict(zip(sorted(set(rows.values())), fetched, strict=True)) if rows else {}
        out: list[SourceItem | Rejection] = []
        for some_id in wanted:
            if some_id not in rows:
                item_id = self.naming.item_id(self.naming.question_id(some_id))
                reason = self._dropped.get(item_id, "unknown question id")
                out.append(Rejection(item_id=item_id, stage=STAGE, reason=reason))
                continue
            out.append(self._item(by_row[rows[some_id]]))
        return out

    def _item(self, row: dict[str, Any]) -> SourceItem | Rejection:
        qid = str(row["question_id"])
        item_id = self.naming.item_id(qid)
        image = _image_bytes(row.get("image"))
        if image is None:
            return Rejection(item_id=item_id, stage=STAGE, reason="row has no image bytes")
        problem = image_problem(image, self.max_pixels)
        if problem:
            return Rejection(item_id=item_id, stage=STAGE, reason=f"bad image: {problem}")
        raw_answers = row.get("answers") or []
        if isinstance(raw_answers, str | bytes):  # one string is no list of answers
            return Rejection(item_id=item_id, stage=STAGE, reason="answers is not a list")
        answers = [str(a) for a in raw_answers if str(a).strip()]
        question = str(row.get("question") or "").strip()
        if not question or not answers:
            return Rejection(item_id=item_id, stage=STAGE, reason="row lacks a question or answers")
        image_id = row.get("image_id")
        return SourceItem(
            item_id=item_id,
            source=self.naming.source,
            question_id=qid,
            image_id=str(image_id) if image_id is not None else _image_id_from_qid(qid),
            question_type=str(row.get("question_type") or ""),
            question=question,
            answers=answers,
            image=image,
        )


def _check_parquet(path: Path) -> None:
    """A readable parquet file, or `OkvqaFileError` (before `datasets` logs its traceback)."""
    import pyarrow.parquet as pq

    if not path.is_file():
        raise OkvqaFileError(f"{path}: file not found")
    try:
        pq.read_schema(path)
    except Exception as exc:  # pyarrow: not parquet, truncated, unreadable
        detail = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise OkvqaFileError(f"{path}: not a parquet file ({detail})") from None


def _row_qid(value: Any) -> str | None:
    if value is None or isinstance(value, bool) or not str(value).strip():
        return None
    return str(value).strip()


def _column_types_problem(features: Any) -> str | None:
    """Why the columns of an OK-VQA split have the wrong types (None when they are right):
    `answers` a list of strings, `question` a string, `question_id` a number or string."""
    from datasets import Value

    def is_value(feature: Any) -> bool:
        return isinstance(feature, Value)

    answers = features["answers"]
    lists = ("List", "LargeList", "Sequence")
    is_list = isinstance(answers, list) or type(answers).__name__ in lists
    inner = answers[0] if isinstance(answers, list) and answers else getattr(answers, "feature", 0)
    if not (is_list and is_value(inner)):
        return f"column 'answers' is {answers}, not a list of answers (List(Value('string')))"
    if not (is_value(features["question"]) and "string" in features["question"].dtype):
        return f"column 'question' is {features['question']}, not text (Value('string'))"
    if not is_value(features["question_id"]):
        return f"column 'question_id' is {features['question_id']}, not a number or text"
    return None


def _image_id_from_qid(qid: str) -> str:
    """OK-VQA question ids are image_id * 10 + k (e.g. 2971475 -> 297147)."""
    return str(int(qid) // 10) if qid.isdigit() else ""


def _image_bytes(value: Any) -> bytes | None:
    if isinstance(value, dict):
        if value.get("bytes"):
            return bytes(value["bytes"])
        path = value.get("path")
        if path and Path(path).is_file():
            return Path(path).read_bytes()
    if isinstance(value, bytes | bytearray):
        return bytes(value)
    return None


# --------------------------------------------------------------------------- files


def _read_json(path: Path, key: str) -> list[Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise OkvqaFileError(f"{path}: file not found") from None
    except OSError as exc:
        raise OkvqaFileError(f"{path}: cannot read it ({exc.strerror or exc})") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise OkvqaFileError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(data, dict) or not isinstance(data.get(key), list):
        raise OkvqaFileError(f"{path}: not a VQA-API file (expected an object with a '{key}' list)")
    return data[key]


def _qid(entry: Any) -> str | None:
    """The entry's question id, or None (not an object, no id, an id that is no number or
    text)."""
    if not isinstance(entry, dict):
        return None
    qid = entry.get("question_id")
    if isinstance(qid, bool) or not isinstance(qid, int | str) or not str(qid).strip():
        return None
    return str(qid).strip()


def _entry_problem(entry: Any) -> str:
    if not isinstance(entry, dict):
        return f"not an object but {type(entry).__name__}"
    if "question_id" not in entry:
        return "no question_id"
    return f"question_id {entry['question_id']!r} is not a number or text"


def _index_entries(
    qids: Iterable[str | None], naming: _Naming, what: Callable[[int], str]
) -> tuple[dict[str, int], dict[str, str], list[str]]:
    """(question id -> position of its first entry, dropped item id -> reason, every item id
    in source order). An entry without a usable id or with the id of an earlier entry is
    not an item but still one input: it gets an item id of its own (`<prefix>#<position>`,
    `<prefix><qid>#<position>`) and becomes a rejection with its reason, so that every
    entry of the input is accounted for."""
    index: dict[str, int] = {}
    dropped: dict[str, str] = {}
    order: list[str] = []
    for position, qid in enumerate(qids):
        if qid is None:
            item_id = naming.item_id(f"#{position}")
            dropped[item_id] = f"malformed question entry {position}: {what(position)}"
        elif qid in index:
            item_id = naming.item_id(f"{qid}#{position}")
            dropped[item_id] = (
                f"duplicate question_id {qid}: entry {position} repeats entry {index[qid]} "
                "(the first is kept)"
            )
        else:
            index[qid] = position
            item_id = naming.item_id(qid)
        order.append(item_id)
    return index, dropped, order


def _int_id(value: Any) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int) and value >= 0:
        return value
    if isinstance(value, str) and value.isdigit():
        return int(value)
    return None


def _answers(annotation: dict[str, Any]) -> list[str]:
    answers = annotation.get("answers")
    if not isinstance(answers, list):
        return []
    out = []
    for a in answers:
        text = a.get("answer") if isinstance(a, dict) else a
        if isinstance(text, str) and text.strip():
            out.append(text.strip())
    return out


class OkvqaFilesSource:
    """OK-VQA from the VQA-API json pair; images local or downloaded."""

    def __init__(
        self,
        questions_file: Path | str,
        annotations_file: Path | str,
        split: str = "val2014",
        coco_dir: Path | str | None = None,
        image_base_url: str | None = DEFAULT_IMAGE_BASE_URL,
        cache_dir: Path | str = Path(".okedit-cache/images"),
        download: DownloadConfig | None = None,
    ):
        if image_base_url:
            problem = check_url(image_base_url)
            if problem:
                raise ValueError(f"image_base_url {image_base_url!r}: {problem}")
        self.questions_file = Path(questions_file)
        self.annotations_file = Path(annotations_file)
        self.naming = _Naming(split)
        self.coco_dir = Path(coco_dir) if coco_dir else None
        if self.coco_dir is not None and not self.coco_dir.is_dir():
            raise OkvqaFileError(f"{self.coco_dir}: no such folder (the local COCO images)")
        self.image_base_url = image_base_url.rstrip("/") if image_base_url else None
        self.download = download or DownloadConfig()
        self.downloader = ImageDownloader(Path(cache_dir), self.download)
        self.name = "okvqa-files"
        self._questions: dict[str, Any] | None = None
        self._annotations: dict[str, Any] = {}
        self._dropped: dict[str, str] = {}  # item id -> why its entry is no item
        self._order: list[str] = []  # every entry's item id, in file order

    # ---- files

    def _load(self) -> dict[str, Any]:
        if self._questions is None:
            questions = _read_json(self.questions_file, "questions")
            annotations = _read_json(self.annotations_file, "annotations")
            index, self._dropped, self._order = _index_entries(
                (_qid(q) for q in questions),
                self.naming,
                lambda position: _entry_problem(questions[position]),
            )
            self._annotations = {q: a for a in annotations if (q := _qid(a)) is not None}
            if questions and not index:
                raise OkvqaFileError(f"{self.questions_file}: no entry has a question_id")
            self._questions = {qid: questions[position] for qid, position in index.items()}
        return self._questions

    def image_name(self, image_id: int) -> str:
        s = self.naming.short
        return f"COCO_{s}2014_{image_id:012d}.jpg"

    def image_url(self, image_id: int) -> str:
        return f"{self.image_base_url}/{self.naming.short}2014/{self.image_name(image_id)}"

    # ---- the source interface

    def list_ids(self, limit: int | None = None, seed: int = 0) -> list[str]:
        """Every entry's item id (malformed and repeated entries included: they load as
        rejections), or a seeded sample of `limit`."""
        self._load()
        return sample_ids(self._order, limit, seed)

    def load_items(self, ids: list[str]) -> list[SourceItem | Rejection]:
        questions = self._load()
        parsed: dict[str, SourceItem | Rejection] = {}
        for some_id in _dedupe(ids):
            qid = self.naming.question_id(some_id)
            dropped = self._dropped.get(self.naming.item_id(qid))
            if dropped is not None:
                item_id = self.naming.item_id(qid)
                parsed[some_id] = Rejection(item_id=item_id, stage=STAGE, reason=dropped)
                continue
            parsed[some_id] = self._parse(qid, questions.get(qid))
        images = self._images([p for p in parsed.values() if isinstance(p, SourceItem)])
        out: list[SourceItem | Rejection] = []
        for item in parsed.values():
            if isinstance(item, Rejection):
                out.append(item)
                continue
            image = images[item.image_id]
            if isinstance(image, str):
                out.append(Rejection(item_id=item.item_id, stage=STAGE, reason=image))
            else:
                out.append(item.model_copy(update={"image": image}))
        return out

    def _parse(self, qid: str, entry: Any) -> SourceItem | Rejection:
        item_id = self.naming.item_id(qid)

        def reject(reason: str) -> Rejection:
            return Rejection(item_id=item_id, stage=STAGE, reason=reason)

        if entry is None:
            return reject("unknown question id")
        question, image_id = entry.get("question"), _int_id(entry.get("image_id"))
        if not isinstance(question, str) or not question.strip():
            return reject("malformed question entry: no question text")
        if image_id is None:
            return reject("malformed question entry: image_id is not a non-negative integer")
        annotation = self._annotations.get(qid)
        if annotation is None:
            return reject("no annotation for this question id")
        answers = _answers(annotation)
        if not answers:
            return reject("malformed annotation: no answers")
        return SourceItem(
            item_id=item_id,
            source=self.naming.source,
            question_id=qid,
            image_id=str(image_id),
            question_type=str(annotation.get("question_type") or ""),
            question=question.strip(),
            answers=answers,
            image=b"",
        )

    # ---- images

    def _local_image(self, image_id: int) -> Path | None:
        if self.coco_dir is None:
            return None
        name = self.image_name(image_id)
        for path in (self.coco_dir / f"{self.naming.short}2014" / name, self.coco_dir / name):
            if path.is_file():
                return path
        return None

    def _images(self, items: list[SourceItem]) -> dict[str, bytes | str]:
        """image_id -> bytes, or the reason it is unusable."""
        out: dict[str, bytes | str] = {}
        to_download: dict[str, str] = {}
        for image_id in _dedupe(i.image_id for i in items):
            local = self._local_image(int(image_id))
            if local is not None:
                out[image_id] = self._checked(local.read_bytes(), f"local image {local.name}")
            elif self.image_base_url:
                to_download[image_id] = self.image_url(int(image_id))
            else:
                out[image_id] = (
                    f"image {self.image_name(int(image_id))} not found in {self.coco_dir}"
                )
        results = self.downloader.fetch_many(list(to_download.values()))
        for image_id, url in to_download.items():
            result = results[url]
            if isinstance(result, DownloadFailed):
                out[image_id] = f"image download failed: {result.reason} ({url})"
            else:
                out[image_id] = result.read()
        return out

    def _checked(self, data: bytes, what: str) -> bytes | str:
        problem = image_problem(data, self.download.max_pixels)
        return f"bad {what}: {problem}" if problem else data


# --------------------------------------------------------------------------- factory


SETTING_NAMES = (
    "split",
    "hub_repo",
    "parquet",
    "questions_file",
    "annotations_file",
    "coco_dir",
    "image_base_url",
)


def get_okvqa_source(
    name: Any,
    *,
    split: str = "val2014",
    hub_repo: str = DEFAULT_HUB_REPO,
    parquet: Path | str | list[Path | str] | None = None,
    questions_file: Path | str | None = None,
    annotations_file: Path | str | None = None,
    coco_dir: Path | str | None = None,
    image_base_url: str | None = DEFAULT_IMAGE_BASE_URL,
    cache_dir: Path | str = Path(".okedit-cache"),
    download: DownloadConfig | None = None,
) -> OkvqaHubSource | OkvqaFilesSource:
    """An OK-VQA source. `name` is "okvqa-hub" / "okvqa-files" with the options as keywords,
    or a settings object with `.name` and the same option names as attributes
    (`pipeline.config.SourceSettings`). Downloads are cached under `cache_dir/images`."""
    if not isinstance(name, str):
        settings = name
        name = settings.name
        values = {k: getattr(settings, k) for k in SETTING_NAMES if hasattr(settings, k)}
        split = values.get("split", split)
        hub_repo = values.get("hub_repo", hub_repo)
        parquet = values.get("parquet", parquet)
        questions_file = values.get("questions_file", questions_file)
        annotations_file = values.get("annotations_file", annotations_file)
        coco_dir = values.get("coco_dir", coco_dir)
        image_base_url = values.get("image_base_url", image_base_url)
    if name == "okvqa-hub":
        return OkvqaHubSource(repo=hub_repo, split=split, parquet=parquet)
    if name == "okvqa-files":
        s = split_short(split)
        if questions_file is None or annotations_file is None:
            raise ValueError(
                "okvqa-files needs --okvqa-questions and --okvqa-annotations "
                f"(OpenEnded_mscoco_{s}2014_questions.json, mscoco_{s}2014_annotations.json)"
            )
        return OkvqaFilesSource(
            questions_file=questions_file,
            annotations_file=annotations_file,
            split=split,
            coco_dir=coco_dir,
            image_base_url=image_base_url,
            cache_dir=Path(cache_dir) / "images",
            download=download,
        )
    raise ValueError(f"unknown OK-VQA source {name!r}: use okvqa-hub or okvqa-files")
