"""The build fingerprint covers every dataset-defining setting, and only those (issue 15).

`BuildConfig.fingerprint()` decides whether a run resumes an output folder or is refused as
a different build. A setting it ignores lets a changed build resume the old one's chunks and
publish a mix. These tests walk every field of the config generically (pydantic
`model_fields`, including the free-form `annotator.llm` and `validation.editor` dicts through
the models they feed, `LLMConfig` and `EditorConfig`), change each to another valid value and
check the fingerprint: it must change, except for the settings declared below as not
defining the dataset. A field added later lands in one of the two lists or fails here.
"""

from __future__ import annotations

import json
import shutil
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel, SecretStr, ValidationError

import editors.config as editor_config
import pipeline.config as build_config
from editors.config import EditorConfig
from pipeline.config import BuildConfig
from pipeline.llm import LLMConfig
from pipeline.tiny_model import default_model_dir

# Top-level settings that define the published dataset: every field below them is in the
# fingerprint unless declared in DECLARED_EXCLUSIONS.
DATASET_SECTIONS = {
    "source",
    "limit",
    "seed",
    "chunk_size",  # chunk boundaries: a resumed chunk must hold the same items
    "annotator",
    "images",
    "quality",
    "validation",
}
# Where the build goes, its caches, its upload and how it spreads over machines: never part
# of the fingerprint (`BuildConfig.describe()` leaves them out), so a build may resume with
# another cache folder, Hub target or shard layout.
NOT_DATASET_SECTIONS = {"out", "cache_dir", "publish", "scale"}
# Settings inside the dataset sections that only pace, pay for, retry or cache the requests
# (`AnnotatorSettings.described()`; `pipeline.config.LLM_RUNTIME_FIELDS`). Spelled out here on
# purpose: moving a setting out of the fingerprint is a decision this list must record.
DECLARED_EXCLUSIONS = {"annotator.concurrency"} | {
    f"annotator.llm.{name}"
    for name in (
        "api_key",
        "budget_usd",
        "prices",
        "requests_per_minute",
        "tokens_per_minute",
        "concurrency",
        "timeout_s",
        "connect_timeout_s",
        "max_retries",
        "cache_path",
        "build_id",
        "batch_poll_s",
        "batch_timeout_s",
    )
}
# Free-form dict settings and the model whose fields they hold.
DICT_SCHEMAS: dict[str, type[BaseModel]] = {
    "annotator.llm": LLMConfig,
    "validation.editor": EditorConfig,
}
# Values the generic generator below cannot guess: the validation model must exist (its
# family is read when the build is resolved), so another name of the shipped one.
EXTRA_VALUES: dict[str, list[Any]] = {
    "validation.model": [str(default_model_dir())],
    "scale.shard_stages": [["images", "validate"]],
}


@dataclass(frozen=True)
class Leaf:
    path: str  # dotted, e.g. "quality.min_rephrases" or "annotator.llm.temperature"
    annotation: Any
    current: Any  # the value in a default BuildConfig (resolved, for editor settings)
    schema: type[BaseModel] | None = None  # set for fields inside a DICT_SCHEMAS dict


def _is_model(annotation: Any) -> bool:
    return isinstance(annotation, type) and issubclass(annotation, BaseModel)


def _is_free_dict(annotation: Any) -> bool:
    return annotation is dict or typing.get_origin(annotation) is dict


def _is_any_dict(annotation: Any) -> bool:
    """`dict` or `dict[str, Any]`: settings whose keys no schema names."""
    return annotation is dict or (
        typing.get_origin(annotation) is dict and typing.get_args(annotation)[1:] == (Any,)
    )


def leaves(model: BaseModel, prefix: str = "") -> list[Leaf]:
    """Every setting of `model`, recursing into sub-models and the DICT_SCHEMAS dicts."""
    found: list[Leaf] = []
    for name, info in type(model).model_fields.items():
        path = f"{prefix}{name}"
        value = getattr(model, name)
        if _is_model(info.annotation):
            found += leaves(value, f"{path}.")
        elif path in DICT_SCHEMAS:
            schema = DICT_SCHEMAS[path]
            base = _dict_base(path)
            for sub, sub_info in schema.model_fields.items():
                found.append(Leaf(f"{path}.{sub}", sub_info.annotation, getattr(base, sub), schema))
        else:
            if _is_any_dict(info.annotation):
                raise AssertionError(f"{path} is a free-form dict: add its schema to DICT_SCHEMAS")
            found.append(Leaf(path, info.annotation, value))
    return found


def _dict_base(path: str) -> BaseModel:
    """The model a DICT_SCHEMAS dict feeds, as a default build resolves it."""
    if path == "validation.editor":
        from pipeline.config import resolve_validation

        return resolve_validation(BuildConfig().validation).editor
    return DICT_SCHEMAS[path]()


def _unwrap_optional(annotation: Any) -> tuple[Any, bool]:
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        optional = len(args) < len(typing.get_args(annotation))
        if len(args) == 1:
            return args[0], optional
        return typing.Union[tuple(args)], optional  # noqa: UP007
    return annotation, False


def candidates(annotation: Any, current: Any) -> list[Any]:
    """Values of `annotation`'s type other than `current`, most ordinary first."""
    inner, optional = _unwrap_optional(annotation)
    out: list[Any] = []
    if typing.get_origin(inner) is typing.Literal:
        out += list(typing.get_args(inner))
    elif typing.get_origin(inner) in (typing.Union, types.UnionType):
        for arg in typing.get_args(inner):
            out += candidates(arg, current)
    elif inner is bool:
        out += [not current] if isinstance(current, bool) else [True, False]
    elif inner is int:
        out += [current + 1, current - 1] if isinstance(current, int) else []
        out += [1, 2, 64, 100]
    elif inner is float:
        if isinstance(current, int | float):
            out += [current * 2, current / 2, current + 0.5, current - 0.5]
        out += [0.5, 1.0, 10.0]
    elif inner is str:
        out += [f"{current}-changed" if current else "changed", "http://changed.test/v1"]
    elif inner is Path:
        out += [Path("changed-path")]
    elif inner is SecretStr:
        out += ["sk-changed"]
    elif _is_free_dict(inner):
        out += [{}] if current else []
    if optional:
        out.append(None)
    return [v for v in out if v != current and not (v is None and current is None)]


def nested(path: str, value: Any) -> dict[str, Any]:
    data: dict[str, Any] = value
    for part in reversed(path.split(".")):
        data = {part: data}
    return data


def changed_config(leaf: Leaf) -> BuildConfig:
    """A valid BuildConfig that differs from the default in `leaf` only."""
    tried = []
    for value in EXTRA_VALUES.get(leaf.path, []) + candidates(leaf.annotation, leaf.current):
        try:
            if leaf.schema is not None:  # the dict's own model must accept the value
                leaf.schema.model_validate({leaf.path.rsplit(".", 1)[1]: value})
            return BuildConfig.model_validate(nested(leaf.path, value))
        except (ValidationError, ValueError) as exc:
            tried.append(f"{value!r}: {str(exc).splitlines()[0]}")
    raise AssertionError(
        f"no valid other value for {leaf.path} ({leaf.annotation}); tried {tried}; "
        "add one to EXTRA_VALUES"
    )


ALL_LEAVES = leaves(BuildConfig())
DATASET_LEAVES = [leaf for leaf in ALL_LEAVES if leaf.path.split(".")[0] in DATASET_SECTIONS]
# settings that need others set with them (an LLM annotator and an existing file): their
# effect on the fingerprint is tested where they are built
COVERED_ELSEWHERE = {
    # tests/test_text_locality.py: the file's contents, not its path, change the fingerprint
    "annotator.text_locality_file",
    # the LLM annotator's knobs: tested below on an LLM build (the offline one never reads them)
    *(f"annotator.{name}" for name in build_config.LLM_ANNOTATOR_KNOBS),
}
# Settings that give the same dataset by construction: batched validation equals one item at
# a time (tests/test_batched_validation.py).
SAME_RESULTS = {"validation.batch_items"}
DEFINING = [
    leaf
    for leaf in DATASET_LEAVES
    if leaf.path not in DECLARED_EXCLUSIONS | SAME_RESULTS and leaf.path not in COVERED_ELSEWHERE
]
NOT_DEFINING = [
    leaf for leaf in ALL_LEAVES if leaf not in DEFINING and leaf.path not in COVERED_ELSEWHERE
]


@pytest.fixture(scope="module")
def default_fingerprint() -> str:
    return BuildConfig().fingerprint()


def test_every_top_level_setting_is_classified() -> None:
    fields = set(BuildConfig.model_fields)
    assert fields == DATASET_SECTIONS | NOT_DATASET_SECTIONS, (
        "a BuildConfig setting is neither declared dataset-defining nor excluded: "
        f"{sorted(fields ^ (DATASET_SECTIONS | NOT_DATASET_SECTIONS))}"
    )
    assert not DATASET_SECTIONS & NOT_DATASET_SECTIONS


def test_declared_exclusions_exist() -> None:
    paths = {leaf.path for leaf in ALL_LEAVES}
    assert DECLARED_EXCLUSIONS <= paths, sorted(DECLARED_EXCLUSIONS - paths)
    # the walk reaches the sections the issue names, down to the editor overrides
    for expected in (
        "quality.min_rephrases",
        "quality.min_image_side",
        "validation.check.paraphrase_min_cos",
        "validation.filter",
        "validation.editor_preset",
        "validation.editor.lr",
        "annotator.llm.temperature",
        "images.clip_threshold",
        "source.split",
        "limit",
        "seed",
    ):
        assert expected in paths


@pytest.mark.parametrize("leaf", DEFINING, ids=lambda leaf: leaf.path)
def test_a_dataset_setting_changes_the_fingerprint(leaf: Leaf, default_fingerprint: str) -> None:
    config = changed_config(leaf)
    assert config.fingerprint() != default_fingerprint, (
        f"changing {leaf.path} does not change the fingerprint: a build with another "
        f"{leaf.path} would resume this one's chunks"
    )


@pytest.mark.parametrize("leaf", NOT_DEFINING, ids=lambda leaf: leaf.path)
def test_a_runtime_setting_keeps_the_fingerprint(leaf: Leaf, default_fingerprint: str) -> None:
    config = changed_config(leaf)
    assert config.fingerprint() == default_fingerprint, (
        f"{leaf.path} changes the fingerprint though it is declared not to define the dataset"
    )


def test_the_declared_exclusions_are_exactly_what_the_config_leaves_out() -> None:
    """The annotator's runtime knobs named by the config are the declared ones, no more."""
    described = {f"annotator.llm.{name}" for name in build_config.LLM_RUNTIME_FIELDS}
    assert described | {"annotator.concurrency"} == DECLARED_EXCLUSIONS


@pytest.mark.parametrize(
    "change",
    [
        ("tiny-flagworld edit preset", editor_config.EDIT_PRESETS["tiny-flagworld"], "lr", 5e-3),
        ("validation key variant", build_config, "VALIDATION_KEY_VARIANT", "question"),
        ("validation edit_eos", build_config, "VALIDATION_EDIT_EOS", False),
    ],
    ids=lambda change: change[0],
)
def test_a_change_of_resolved_editor_defaults_changes_the_fingerprint(
    change: tuple[str, Any, str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The editor settings enter as resolved (defaults and the model's preset), so a new
    default in code is a new build, never a resume of validations made with the old one."""
    _, target, name, value = change
    before = BuildConfig().fingerprint()
    if isinstance(target, dict):
        monkeypatch.setitem(target, name, value)
    else:
        monkeypatch.setattr(target, name, value)
    assert BuildConfig().fingerprint() != before


def test_the_fingerprint_is_stable_and_keeps_no_secret() -> None:
    secret = "sk-fingerprint-secret-DO-NOT-STORE"
    config = BuildConfig(annotator={"kind": "llm", "llm": {"api_key": secret}})
    assert (
        config.fingerprint()
        == BuildConfig.model_validate_json(config.model_dump_json()).fingerprint()
    )
    assert secret not in repr(config.describe())


LLM_BUILD = {"annotator": {"kind": "llm", "llm_base_url": "http://127.0.0.1:9/v1"}}


@pytest.mark.parametrize("knob", sorted(build_config.LLM_ANNOTATOR_KNOBS - {"prompts_dir"}))
def test_an_llm_annotator_knob_changes_an_llm_builds_fingerprint_only(knob: str) -> None:
    """What the LLM is asked for defines an LLM build; an offline build never reads it."""
    changed = {"annotator": {knob: 1}}
    llm = BuildConfig.model_validate(LLM_BUILD)
    llm_changed = BuildConfig.model_validate(
        {"annotator": {**LLM_BUILD["annotator"], **changed["annotator"]}}
    )
    assert llm_changed.fingerprint() != llm.fingerprint()
    assert BuildConfig.model_validate(changed).fingerprint() == BuildConfig().fingerprint()


def test_the_prompts_enter_by_their_contents(tmp_path: Path) -> None:
    from pipeline.annotate import PROMPTS_DIR

    mine = tmp_path / "prompts"
    shutil.copytree(PROMPTS_DIR, mine)
    llm = BuildConfig.model_validate(LLM_BUILD)
    copied = BuildConfig.model_validate(
        {"annotator": {**LLM_BUILD["annotator"], "prompts_dir": str(mine)}}
    )
    before = copied.fingerprint()
    assert before == llm.fingerprint()  # the same templates, elsewhere
    assert str(mine) not in json.dumps(copied.describe())
    template = sorted(mine.glob("*.yaml"))[0]
    template.write_text(template.read_text() + "\n# edited\n")
    assert copied.fingerprint() != before
