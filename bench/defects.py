"""The planted-defect benchmark of the item check (issue 12, item 3; design §7.4).

A flagworld build (every item of every relation unless `--items`), built in-process with the
stage functions and the build seed; in `--share` (20 %) of its items one defect is planted,
one kind per planted item, kinds assigned in turn. Then the validate stage runs with the
default validation settings (`ValidateSettings()`) and each item's `validation.check` is read:

* probe kinds (one probe of the item is bad): detected when a check reason names the
  planted probe (`image_rephrase[3]`, ...), dropped or not;
* item kinds: detected when the item's check status is `unsound` or `model_gap`.

Kinds (`KINDS`; the 7 the issue asks for, plus opt-in extras in `EXTRA_KINDS`):

- `image_rephrase_other_flag`: one image rephrase re-rendered as another flag whose answer
  differs (a look-alike when one has a different answer);
- `near_miss_edit_flag`: one near-miss image re-rendered as the edit flag itself;
- `near_miss_answer_original` (item): `locality_answer` = the original answer;
- `rephrase_other_relation`: one text rephrase asks another relation of the same flag (a
  paraphrase template of that relation);
- `text_negative_paraphrase`: one evaluated text negative = an unused paraphrase of the edit
  question, answered with the original answer;
- `target_is_gold` (item): `target` = a gold answer;
- `model_gap` (item): the gold answers swapped for a wrong but plausible value (another
  country's answer of the relation), so the unedited model's answer differs from gold;
- `image_rephrase_same_answer` (extra): one image rephrase re-rendered as another flag with
  the *same* answer to the item's relation (e.g. Italy for France's currency).

The false-positive rate is measured on the clean items (not `sound` = a false positive) and
on their probes (a probe named by a reason = flagged). Per seed (`--seeds`) the build, the
planted items and the planted probes change.

    .venv/bin/python bench/defects.py [--seeds 0 1 2] [--items N] [--share 0.2]
        [--kinds ...] [--model PATH] [--threads 1] [--out docs/img/defects.json]
    .venv/bin/python bench/defects.py --small      # the test's version: 16 items, 1 seed
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import random
import re
import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

os.environ["HF_HUB_OFFLINE"] = "1"  # before transformers is imported
BENCH = Path(__file__).resolve().parent
sys.path[:0] = [str(BENCH.parent), str(BENCH)]

import torch  # noqa: E402
import transformers  # noqa: E402
from PIL import Image  # noqa: E402

from editors.adapters import VLMAdapter, load_model  # noqa: E402
from editors.config import EditorConfig, ModelConfig  # noqa: E402
from editors.metrics import normalize_answer  # noqa: E402
from pipeline.assemble import build_records  # noqa: E402
from pipeline.config import ValidateSettings, resolve_validation  # noqa: E402
from pipeline.images import RenderBackend  # noqa: E402
from pipeline.offline_annotator import FlagworldAnnotator  # noqa: E402
from pipeline.quality import majority_answer  # noqa: E402
from pipeline.scope import training_text_negative  # noqa: E402
from pipeline.sources import flagworld as fw  # noqa: E402
from pipeline.sources.flagworld import FlagworldSource  # noqa: E402
from pipeline.validate import validate_records  # noqa: E402
from schemas.record import OkeditRecord, Rejection, TextNegative  # noqa: E402

GOAL = {"recall": 0.95, "false_positive": 0.03}  # issue 12, item 3
PROBE_FAMILIES = ("rephrase", "image_rephrase", "locality", "text_negative")
# How the check may spell a probe family in `CheckReason.probe` -> the record's list field.
FAMILY_ALIASES = {
    "rephrase": "rephrase",
    "rephrases": "rephrase",
    "image_rephrase": "image_rephrase",
    "image_rephrases": "image_rephrase",
    "locality": "locality",
    "locality_image": "locality",
    "locality_images": "locality",
    "near_miss": "locality",
    "text_negative": "text_negative",
    "text_negatives": "text_negative",
    "train_text_neg": "text_negative",
}
_PROBE = re.compile(r"^\s*([a-z_]+)\s*\[\s*(\d+)\s*\]\s*$")


def _norm(text: str) -> str:
    return normalize_answer(text.replace("_", " "))


# ------------------------------------------------------------------------------- build


def build_flagworld(
    limit: int | None, seed: int, render_seed: int | None = None
) -> list[OkeditRecord]:
    """Flagworld records as `okedit build --seed SEED` makes them (ids shuffled by the seed,
    offline annotator and render backend seeded by it), QC applied. `render_seed` re-draws
    only the image probes' renders (same items, same annotations)."""
    source = FlagworldSource()
    loaded = source.load_items(source.list_ids(limit, seed))
    items = [i for i in loaded if not isinstance(i, Rejection)]
    annotations = [
        a for a in FlagworldAnnotator(seed=seed).annotate(items) if not isinstance(a, Rejection)
    ]
    by_id = {i.item_id: i for i in items}
    backend = RenderBackend(seed=seed if render_seed is None else render_seed)
    images = backend.make_images([(by_id[a.item_id], a) for a in annotations])
    records, _ = build_records(
        items, annotations, [i for i in images if not isinstance(i, Rejection)]
    )
    return records


# ----------------------------------------------------------------------------- planting


@dataclass(frozen=True)
class Planted:
    item_id: str
    kind: str
    probe: str  # the planted probe, e.g. "image_rephrase[3]"; "" for item-level kinds
    detail: str  # what was planted, in words


Plant = Callable[[OkeditRecord, random.Random, int], tuple[OkeditRecord, Planted] | None]


def _code_relation(record: OkeditRecord) -> tuple[str, str]:
    return fw.parse_item_id(record.item_id)


def _image_size(record: OkeditRecord) -> int:
    with Image.open(io.BytesIO(record.image)) as img:
        return img.width


def _render(code: str, record: OkeditRecord, field: str, seed: int) -> bytes:
    rng = random.Random(f"defect:{seed}:{record.item_id}:{field}:{code}")
    return fw.to_png(fw.render_variant(code, rng, _image_size(record)))


def _other_flag(
    record: OkeditRecord, rng: random.Random, same_answer: bool
) -> tuple[str, bool] | None:
    """Another flag whose answer to the item's relation differs from (or, `same_answer`,
    equals) the original: a look-alike when one qualifies, else any flag. (code, look-alike)."""
    code, relation = _code_relation(record)
    true = _norm(fw.answer(code, relation))

    def ok(c: str) -> bool:
        return c != code and (_norm(fw.answer(c, relation)) == true) == same_answer

    near = [c for c in fw.lookalikes(code) if ok(c)]
    if near:
        return rng.choice(near), True
    far = [c.code for c in fw.COUNTRIES if ok(c.code)]
    return (rng.choice(far), False) if far else None


def _image_rephrase_flag(same_answer: bool) -> Plant:
    kind = "image_rephrase_same_answer" if same_answer else "image_rephrase_other_flag"

    def plant(record: OkeditRecord, rng: random.Random, seed: int):
        choice = _other_flag(record, rng, same_answer)
        if choice is None or not record.image_rephrases:
            return None
        other, lookalike = choice
        j = rng.randrange(len(record.image_rephrases))
        images = list(record.image_rephrases)
        images[j] = _render(other, record, f"image_rephrases[{j}]", seed)
        relation = _code_relation(record)[1]
        detail = (
            f"flag of {other} ({'look-alike' if lookalike else 'other group'}; "
            f"{relation} {fw.answer(other, relation)})"
        )
        planted = Planted(record.item_id, kind, f"image_rephrase[{j}]", detail)
        return record.model_copy(update={"image_rephrases": images}), planted

    return plant


def plant_near_miss_edit_flag(record: OkeditRecord, rng: random.Random, seed: int):
    if not record.locality_images:
        return None
    code, _ = _code_relation(record)
    j = rng.randrange(len(record.locality_images))
    images = list(record.locality_images)
    images[j] = _render(code, record, f"locality_images[{j}]", seed)
    planted = Planted(record.item_id, "near_miss_edit_flag", f"locality[{j}]", f"flag of {code}")
    return record.model_copy(update={"locality_images": images}), planted


def plant_near_miss_answer_original(record: OkeditRecord, rng: random.Random, seed: int):
    detail = f"locality_answer {record.locality_answer!r} -> {record.original_answer!r}"
    planted = Planted(record.item_id, "near_miss_answer_original", "", detail)
    return record.model_copy(update={"locality_answer": record.original_answer}), planted


def plant_rephrase_other_relation(record: OkeditRecord, rng: random.Random, seed: int):
    code, relation = _code_relation(record)
    true = _norm(fw.answer(code, relation))
    others = [r for r in fw.RELATIONS if r != relation and _norm(fw.answer(code, r)) != true]
    if not others or not record.rephrases:
        return None
    other = rng.choice(others)
    question = rng.choice(fw.PARAPHRASE_TEMPLATES[other])
    j = rng.randrange(len(record.rephrases))
    rephrases = list(record.rephrases)
    rephrases[j] = question
    detail = f"{other}: {question!r} (answer {fw.answer(code, other)})"
    planted = Planted(record.item_id, "rephrase_other_relation", f"rephrase[{j}]", detail)
    return record.model_copy(update={"rephrases": rephrases}), planted


def _evaluated_text_negatives(record: OkeditRecord, config: EditorConfig) -> list[int]:
    """Indices of the text negatives the validate stage evaluates (not the training one)."""
    held_out = training_text_negative(record, config) if record.text_negatives else None
    return [i for i in range(len(record.text_negatives)) if i != held_out]


def plant_text_negative_paraphrase(record: OkeditRecord, rng: random.Random, seed: int):
    _, relation = _code_relation(record)
    used = {record.question, *record.rephrases, *record.rephrases_train}
    unused = [t for t in fw.PARAPHRASE_TEMPLATES[relation] if t not in used]
    slots = _evaluated_text_negatives(record, resolve_validation(ValidateSettings()).editor)
    if not unused or not slots:
        return None
    question = rng.choice(unused)
    j = rng.choice(slots)
    negatives = list(record.text_negatives)
    negatives[j] = TextNegative(question=question, answer=record.original_answer)
    detail = f"{question!r} -> {record.original_answer}"
    planted = Planted(record.item_id, "text_negative_paraphrase", f"text_negative[{j}]", detail)
    return record.model_copy(update={"text_negatives": negatives}), planted


def plant_target_is_gold(record: OkeditRecord, rng: random.Random, seed: int):
    gold = rng.choice(record.answers)
    planted = Planted(record.item_id, "target_is_gold", "", f"target {record.target!r} -> {gold!r}")
    return record.model_copy(update={"target": gold}), planted


def plant_model_gap(record: OkeditRecord, rng: random.Random, seed: int):
    """Gold answers swapped for another country's answer of the same relation (a wrong but
    plausible value), never one of the item's other answers (target, C, D, text negatives)."""
    code, relation = _code_relation(record)
    taken = {
        _norm(v)
        for v in (
            fw.answer(code, relation),
            record.target,
            record.locality_answer,
            record.locality_answer_train,
            *(n.answer for n in record.text_negatives),
        )
    }
    values = sorted({fw.answer(c.code, relation) for c in fw.COUNTRIES} - {""})
    options = [v for v in values if _norm(v) not in taken]
    if not options:
        return None
    wrong = rng.choice(options)
    answers = [wrong] * len(record.answers)
    update = {
        "answers": answers,
        "original_answer": wrong,
        "majority_answer": majority_answer(answers),
    }
    detail = f"gold {record.original_answer!r} -> {wrong!r}"
    return record.model_copy(update=update), Planted(record.item_id, "model_gap", "", detail)


KINDS: dict[str, Plant] = {
    "image_rephrase_other_flag": _image_rephrase_flag(same_answer=False),
    "near_miss_edit_flag": plant_near_miss_edit_flag,
    "near_miss_answer_original": plant_near_miss_answer_original,
    "rephrase_other_relation": plant_rephrase_other_relation,
    "text_negative_paraphrase": plant_text_negative_paraphrase,
    "target_is_gold": plant_target_is_gold,
    "model_gap": plant_model_gap,
}
EXTRA_KINDS: dict[str, Plant] = {
    "image_rephrase_same_answer": _image_rephrase_flag(same_answer=True),
}
ALL_KINDS = {**KINDS, **EXTRA_KINDS}
# The reason codes that name each kind's defect (reported as "right code"; detection itself
# only asks for a reason on the planted probe, or a not-sound item).
EXPECTED_CODES: dict[str, tuple[str, ...]] = {
    "image_rephrase_other_flag": ("image_rephrase_differs",),
    "image_rephrase_same_answer": ("image_rephrase_differs",),
    "near_miss_edit_flag": ("near_miss_looks_original",),
    "near_miss_answer_original": ("near_miss_answer_is_gold",),
    "rephrase_other_relation": ("rephrase_far", "rephrase_differs"),
    "text_negative_paraphrase": ("text_negative_paraphrase", "text_negative_same_fact"),
    "target_is_gold": ("target_is_gold",),
    "model_gap": ("model_gap",),
}


def plant_defects(
    records: list[OkeditRecord], kinds: list[str], share: float, seed: int
) -> tuple[list[OkeditRecord], list[Planted]]:
    """Plant one defect in each of `share` of the records (at least one per kind when
    there are enough records), kinds in turn; a kind that does not fit an item (e.g. no
    flag with the same answer) passes the item to the next kind. Deterministic in `seed`."""
    rng = random.Random(f"defects:{seed}")
    n = min(len(records), max(round(share * len(records)), len(kinds)))
    chosen = rng.sample(range(len(records)), n)
    out = list(records)
    planted: list[Planted] = []
    for turn, index in enumerate(chosen):
        for step in range(len(kinds)):
            kind = kinds[(turn + seed + step) % len(kinds)]
            result = ALL_KINDS[kind](records[index], random.Random(f"{seed}:{index}:{kind}"), seed)
            if result is not None:
                out[index], mark = result
                planted.append(mark)
                break
    return out, planted


# ---------------------------------------------------------------------------- scoring


def probe_name(text: str) -> str | None:
    """`image_rephrases[3]` / `image_rephrase[3]` -> `image_rephrase[3]`; None when `text`
    names no probe of an evaluated family (item-level reasons, training probes)."""
    match = _PROBE.match(text or "")
    if not match or match.group(1) not in FAMILY_ALIASES:
        return None
    return f"{FAMILY_ALIASES[match.group(1)]}[{int(match.group(2))}]"


def flagged_probes(record: OkeditRecord) -> set[str]:
    return {
        name for r in record.validation.check.reasons if (name := probe_name(r.probe)) is not None
    }


def n_probes(record: OkeditRecord) -> int:
    return (
        len(record.rephrases)
        + len(record.image_rephrases)
        + len(record.locality_images)
        + len(record.text_negatives)
    )


def _reasons(record: OkeditRecord) -> list[dict[str, Any]]:
    return [r.model_dump() for r in record.validation.check.reasons]


def score(
    validated: list[OkeditRecord], planted: list[Planted], before: list[OkeditRecord]
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(planted rows, clean rows): per item, the check outcome and whether it is right.
    `before`: the records as validated (the stage returns them without dropped probes)."""
    marks = {p.item_id: p for p in planted}
    sizes = {r.item_id: n_probes(r) for r in before}
    planted_rows, clean_rows = [], []
    for record in validated:
        check = record.validation.check
        flagged = flagged_probes(record)
        row: dict[str, Any] = {
            "item_id": record.item_id,
            "status": check.status,
            "clean_answer": check.clean_answer,
            "knows_original": check.knows_original,
            "reasons": _reasons(record),
            "verdict": record.validation.verdict,
        }
        mark = marks.get(record.item_id)
        if mark is None:
            row |= {"flagged_probes": sorted(flagged), "probes": sizes[record.item_id]}
            clean_rows.append(row)
            continue
        if mark.probe:
            detected = mark.probe in flagged
            on_probe = [r.code for r in check.reasons if probe_name(r.probe) == mark.probe]
            others = sorted(flagged - {mark.probe})
        else:
            detected = check.status in ("unsound", "model_gap")
            on_probe = [r.code for r in check.reasons if probe_name(r.probe) is None]
            others = sorted(flagged)
        row |= asdict(mark) | {
            "detected": detected,
            "detected_by": sorted(set(on_probe)),
            "right_code": any(c in EXPECTED_CODES[mark.kind] for c in on_probe),
            "other_flagged_probes": others,
        }
        planted_rows.append(row)
    return planted_rows, clean_rows


def summarize(
    planted_rows: list[dict[str, Any]], clean_rows: list[dict[str, Any]], kinds: list[str]
) -> dict[str, Any]:
    per_kind: dict[str, Any] = {}
    for kind in kinds:
        rows = [r for r in planted_rows if r["kind"] == kind]
        hits = sum(r["detected"] for r in rows)
        per_kind[kind] = {
            "planted": len(rows),
            "detected": hits,
            "recall": hits / len(rows) if rows else float("nan"),
            "right_code": sum(r["right_code"] for r in rows),
            "statuses": dict(Counter(r["status"] for r in rows)),
            "detected_by": dict(Counter(c for r in rows for c in r["detected_by"])),
            "misses": [
                r["item_id"] + (f" {r['probe']}" if r["probe"] else "")
                for r in rows
                if not r["detected"]
            ],
        }
    not_sound = [r for r in clean_rows if r["status"] != "sound"]
    probes = sum(r["probes"] for r in clean_rows)
    flagged = sum(len(r["flagged_probes"]) for r in clean_rows)
    codes = Counter(reason["code"] for r in clean_rows for reason in r["reasons"])
    return {
        "per_kind": per_kind,
        "clean_items": len(clean_rows),
        "clean_not_sound": len(not_sound),
        "false_positive_items": len(not_sound) / len(clean_rows) if clean_rows else float("nan"),
        "clean_statuses": dict(Counter(r["status"] for r in clean_rows)),
        "clean_probes": probes,
        "clean_probes_flagged": flagged,
        "false_positive_probes": flagged / probes if probes else float("nan"),
        "clean_reason_codes": dict(codes),
        "clean_flagged_by_family": dict(
            Counter(p.split("[")[0] for r in clean_rows for p in r["flagged_probes"])
        ),
        "clean_not_sound_codes": dict(
            Counter(
                reason["code"]
                for r in not_sound
                for reason in r["reasons"]
                if not reason["dropped"]
            )
        ),
        "clean_not_sound_items": [
            {"item_id": r["item_id"], "status": r["status"], "reasons": r["reasons"]}
            for r in not_sound
        ],
    }


# -------------------------------------------------------------------------------- run


def validate(
    records: list[OkeditRecord], adapter: VLMAdapter, model_config: ModelConfig
) -> list[OkeditRecord]:
    """The validate stage with the default validation settings on a loaded model."""
    settings = ValidateSettings()
    return validate_records(
        records,
        resolve_validation(settings).editor,
        model_config,
        model=adapter,
        show_progress=False,
        check=settings.check,
    )


def model_config_for(model: Path | None) -> ModelConfig:
    """The shipped tiny VLM (None) or a local model folder, as `okedit build --model` has it."""
    if model is None:
        return resolve_validation(ValidateSettings()).model
    return resolve_validation(ValidateSettings(model=str(model))).model


def run_seed(
    seed: int,
    limit: int | None,
    share: float,
    kinds: list[str],
    adapter: VLMAdapter,
    model_config: ModelConfig,
) -> dict[str, Any]:
    start = time.perf_counter()
    records = build_flagworld(limit, seed)
    build_s = time.perf_counter() - start
    planted_records, planted = plant_defects(records, kinds, share, seed)
    start = time.perf_counter()
    validated = validate(planted_records, adapter, model_config)
    validate_s = time.perf_counter() - start
    planted_rows, clean_rows = score(validated, planted, planted_records)
    return {
        "seed": seed,
        "items": len(records),
        "planted": len(planted),
        "build_s": round(build_s, 1),
        "validate_s": round(validate_s, 1),
        "summary": summarize(planted_rows, clean_rows, kinds),
        "planted_rows": planted_rows,
        "clean_rows": clean_rows,
    }


def pooled(per_seed: list[dict[str, Any]], kinds: list[str]) -> dict[str, Any]:
    planted_rows = [r for s in per_seed for r in s["planted_rows"]]
    clean_rows = [r for s in per_seed for r in s["clean_rows"]]
    summary = summarize(planted_rows, clean_rows, kinds)
    for kind, stats in summary["per_kind"].items():
        stats["misses"] = [
            f"seed {s['seed']}: {r['item_id']}" + (f" {r['probe']}" if r["probe"] else "")
            for s in per_seed
            for r in s["planted_rows"]
            if r["kind"] == kind and not r["detected"]
        ]
        stats["per_seed_recall"] = [s["summary"]["per_kind"][kind]["recall"] for s in per_seed]
    required = [k for k in kinds if k in KINDS]
    summary["meets_goal"] = {
        "recall": all(summary["per_kind"][k]["recall"] >= GOAL["recall"] for k in required),
        "false_positive_items": summary["false_positive_items"] <= GOAL["false_positive"],
        "false_positive_probes": summary["false_positive_probes"] <= GOAL["false_positive"],
    }
    return summary


def run(
    seeds: list[int],
    limit: int | None,
    share: float,
    kinds: list[str],
    model: Path | None = None,
) -> dict[str, Any]:
    """The whole benchmark: one model load, then build, plant and validate per seed."""
    model_config = model_config_for(model)
    adapter = load_model(model_config)
    per_seed = [run_seed(s, limit, share, kinds, adapter, model_config) for s in seeds]
    return {
        "seeds": seeds,
        "items": limit,
        "share": share,
        "kinds": kinds,
        "model": model_config.model,
        "goal": GOAL,
        "summary": pooled(per_seed, kinds),
        "per_seed": per_seed,
    }


# ---------------------------------------------------------------------------- report


def _pct(x: float) -> str:
    return "–" if x != x else f"{x:.3f}"


def markdown(report: dict[str, Any]) -> str:
    summary = report["summary"]
    n = len(report["seeds"])
    lines = [
        f"| kind | planted ({n} seeds) | detected | recall | per seed | check status | "
        "reasons on the planted probe (item kinds: item reasons) |",
        "|---|---:|---:|---:|---|---|---|",
    ]
    for kind, stats in summary["per_kind"].items():
        label = kind if kind in KINDS else f"{kind} (extra)"
        per_seed = " / ".join(_pct(x) for x in stats["per_seed_recall"])
        statuses = ", ".join(f"{k} {v}" for k, v in sorted(stats["statuses"].items()))
        by = ", ".join(f"{k} {v}" for k, v in sorted(stats["detected_by"].items())) or "–"
        lines.append(
            f"| {label} | {stats['planted']} | {stats['detected']} | "
            f"{_pct(stats['recall'])} | {per_seed} | {statuses} | {by} |"
        )
    statuses = ", ".join(f"{k} {v}" for k, v in sorted(summary["clean_statuses"].items()))
    families = ", ".join(f"{k} {v}" for k, v in sorted(summary["clean_flagged_by_family"].items()))
    lines += [
        "",
        "| clean items | not sound | FP rate (items) | statuses | clean probes | flagged | "
        "FP rate (probes) | flagged per family |",
        "|---:|---:|---:|---|---:|---:|---:|---|",
        f"| {summary['clean_items']} | {summary['clean_not_sound']} | "
        f"{_pct(summary['false_positive_items'])} | {statuses} | {summary['clean_probes']} | "
        f"{summary['clean_probes_flagged']} | {_pct(summary['false_positive_probes'])} | "
        f"{families} |",
    ]
    return "\n".join(lines)


def misses_text(report: dict[str, Any]) -> str:
    lines = []
    for kind, stats in report["summary"]["per_kind"].items():
        for miss in stats["misses"]:
            lines.append(f"miss {kind}: {miss}")
    for item in report["summary"]["clean_not_sound_items"]:
        reasons = "; ".join(
            f"{r['code']} {r['probe']} ({r['measured']})".strip() for r in item["reasons"]
        )
        lines.append(f"false positive {item['item_id']}: {item['status']}: {reasons}")
    return "\n".join(lines)


# ------------------------------------------------------------------------------- main


def code_version() -> dict[str, str]:
    """The commit and the hashes of the check's files (they may be uncommitted while the
    check is being written), so a result names the code it measured."""
    import hashlib
    import subprocess

    root = BENCH.parent
    head = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True
    ).stdout.strip()
    files = ("pipeline/check.py", "pipeline/validate.py", "pipeline/scope.py")
    return {"commit": head} | {
        f: hashlib.sha256((root / f).read_bytes()).hexdigest()[:12] for f in files
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--items", type=int, default=None, help="items per build (all: 184)")
    parser.add_argument("--share", type=float, default=0.2, help="share of items planted")
    parser.add_argument(
        "--kinds", nargs="+", default=list(KINDS), choices=list(ALL_KINDS), metavar="KIND"
    )
    parser.add_argument("--model", type=Path, default=None, help="default: the shipped model")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--small", action="store_true", help="16 items, seed 0, half planted")
    parser.add_argument("--out", type=Path, default=Path("docs/img/defects.json"))
    args = parser.parse_args(argv)
    if args.small:
        args.items, args.seeds, args.share = 16, [0], 0.5
    return args


def machine(threads: int) -> dict[str, Any]:
    """Where a bench ran, for its JSON."""
    return {
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "torch_threads": threads,
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    wall = time.perf_counter()
    report = run(args.seeds, args.items, args.share, args.kinds, args.model)
    report |= {
        "wall_s": round(time.perf_counter() - wall, 1),
        "command": " ".join([".venv/bin/python", "bench/defects.py", *(argv or sys.argv[1:])]),
        "code": code_version(),
        "machine": machine(args.threads),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(markdown(report))
    print(misses_text(report))
    print(f"\nwall {report['wall_s']:.0f} s; wrote {args.out}")
    return report


if __name__ == "__main__":
    main()
