"""The dataset card (README.md with Hub YAML) and the scope plot (PNG)."""

from __future__ import annotations

import statistics
from collections import Counter
from pathlib import Path

import polars as pl

from pipeline.check import REASONS, check_summary
from schemas.features import GENERATION_METRICS, stats_frame
from schemas.record import OkeditRecord, Rejection

CITATION = """@inproceedings{guo2025balancedit,
  title     = {BalancEdit: Dynamically Balancing the Generality-Locality Trade-off in
               Multi-modal Model Editing},
  author    = {Guo, Dongliang and others},
  booktitle = {International Conference on Machine Learning (ICML)},
  year      = {2025},
  eprint    = {2505.01343},
  archivePrefix = {arXiv}
}"""

LICENSE_NOTES = {
    "flagworld": "Flagworld images are drawn by okedit from public flag designs; the facts are "
    "public knowledge. Released under CC BY 4.0.",
    "okvqa": "Questions and answers come from OK-VQA (Marino et al., 2019) and images from "
    "MS-COCO; both are for research use under their own terms (COCO images: Flickr terms of "
    "use, annotations CC BY 4.0). Generated fields are derived works; check the LLM "
    "provider's terms before redistribution.",
}


def _markdown_table(frame: pl.DataFrame) -> str:
    header = "| " + " | ".join(frame.columns) + " |"
    rule = "|" + "---|" * len(frame.columns)
    body = ["| " + " | ".join(_cell(v) for v in row) + " |" for row in frame.iter_rows()]
    return "\n".join([header, rule, *body])


def _cell(value: object) -> str:
    return f"{value:.3f}" if isinstance(value, float) else str(value)


def _count_table(records: list[OkeditRecord], column: str) -> str:
    frame = stats_frame(records).group_by(column).len("items").sort(column)
    return _markdown_table(frame)


def rejection_table(rejections: list[Rejection]) -> str:
    counts = Counter((r.stage, r.reason.split(";")[0][:90]) for r in rejections)
    frame = pl.DataFrame(
        [{"stage": s, "reason": r, "items": n} for (s, r), n in counts.most_common()],
        schema={"stage": pl.String, "reason": pl.String, "items": pl.Int64},
    )
    return _markdown_table(frame) if len(frame) else "No item was rejected."


def validation_table(records: list[OkeditRecord]) -> str:
    """Verdict counts and mean metrics over the validated items."""
    frame = stats_frame(records).filter(pl.col("verdict") != "not_run")
    if frame.is_empty():
        return "Validation was not run for this build."
    verdicts = frame.group_by("verdict").len("items").sort("verdict")
    verdicts = verdicts.rename({"verdict": "editor verdict"})
    metric_cols = [
        "reliability",
        "text_generality",
        "image_generality",
        "locality_label",
        "text_locality_label",
        "image_free_locality",
        "hm",
    ]
    measured = frame.filter(pl.col("reliability") >= 0)
    # -1 marks a metric the item has no probe for (e.g. no image-free question)
    means = measured.select([pl.col(c).filter(pl.col(c) >= 0).mean().alias(c) for c in metric_cols])
    generated = frame.filter(pl.col("gen_reliability") >= 0)
    gen_means = generated.select(
        [pl.col(c).mean().alias(c.removeprefix("gen_")) for c in GENERATION_METRICS]
    )
    text = (
        _markdown_table(verdicts)
        + "\n\nMean metrics over measured items (teacher-forced target accuracy; "
        + "locality: the expected answer kept):\n\n"
        + (_markdown_table(means) if len(measured) else "(none measured)")
    )
    if len(generated):
        text += (
            "\n\nGeneration exact match (greedy answers of the edited model, "
            + "VQA-normalised):\n\n"
            + _markdown_table(gen_means)
        )
    return text + "\n\n" + scope_table(records)


def scope_table(records: list[OkeditRecord]) -> str:
    """Per probe family: routed share and median d/ε over items; how many items some radius
    could separate, and which training negative set ε."""
    summaries = [r.validation.edit for r in records if r.validation.edit.families]
    if not summaries:
        return ""
    rows = []
    for family in PLOT_FAMILIES:
        scopes = [f for s in summaries for f in s.families if f.family == family]
        if scopes:
            rows.append(
                {
                    "probe family": family,
                    "items": len(scopes),
                    "routed share": sum(f.routed_share for f in scopes) / len(scopes),
                    "median d/ε": statistics.median(f.median_relative_distance for f in scopes),
                }
            )
    separable = sum(s.separable for s in summaries)
    set_by = Counter(s.epsilon_set_by for s in summaries)
    negatives = ", ".join(f"`{k}` {n}" for k, n in set_by.most_common())
    return (
        "Where the probes fell (d/ε < 1: routed to the edit):\n\n"
        + _markdown_table(pl.DataFrame(rows))
        + f"\n\nSome radius separates every positive from every negative in {separable} of "
        + f"{len(summaries)} items; ε was set by: {negatives}."
    )


PLOT_FAMILIES = {
    "edit": "tab:green",
    "rephrase": "tab:olive",
    "image_rephrase": "tab:cyan",
    "locality": "tab:red",
    "text_negative": "tab:orange",
    "image_free_locality": "tab:purple",
}


CHECK_INTRO = """Each item carries two outcomes. **`check`** says whether the item is sound
benchmark data, from what the *unedited* model answers, from the annotation and from text
similarity: `sound`; `unsound` (e.g. an image rephrase that shows something else, a near-miss
answered with the original answer, a target that is a gold answer; single bad probes are
dropped from the item and listed, too many make it unsound); `model_gap` (the model does not
know the original fact, so an edit would insert a fact rather than change one: kept and
labelled). **`edit`** is what the editor did on the item (reliability, generality, locality,
where each probe family fell relative to the radius ε, and whether any radius separates the
positives from the negatives): the benchmark figure, reported and never used to filter. The
editor outcome on the validation model — here possibly a tiny model — is not a property of
the item."""

PER_ITEM_ROWS = 200  # larger builds list their items in checks.parquet instead


def reason_counts(records: list[OkeditRecord]) -> Counter[str]:
    """Items per check reason code (each item counted once per code)."""
    return Counter(code for r in records for code in {x.code for x in r.validation.check.reasons})


def check_table(records: list[OkeditRecord]) -> str:
    """Items per check status, then per reason (items, probes dropped, meaning)."""
    statuses = Counter(r.validation.check.status for r in records)
    if not records or set(statuses) == {"not_run"}:
        return "The item check was not run for this build."
    status_frame = pl.DataFrame(
        [{"check": k, "items": v} for k, v in sorted(statuses.items())],
        schema={"check": pl.String, "items": pl.Int64},
    )
    dropped = Counter(x.code for r in records for x in r.validation.check.reasons if x.dropped)
    rows = [
        {"reason": code, "items": n, "probes dropped": dropped[code], "meaning": REASONS[code]}
        for code, n in reason_counts(records).most_common()
    ]
    schema = {"reason": pl.String, "items": pl.Int64, "probes dropped": pl.Int64}
    reasons = pl.DataFrame(rows, schema={**schema, "meaning": pl.String})
    text = _markdown_table(status_frame) + "\n\nReasons:\n\n"
    return text + (_markdown_table(reasons) if rows else "None: every check passed.")


def check_rows(records: list[OkeditRecord]) -> pl.DataFrame:
    """One row per item: id, check status and reasons, and a short editor outcome."""
    rows = []
    for r in records:
        v = r.validation
        rows.append(
            {
                "item_id": r.item_id,
                "check": v.check.status,
                "reasons": check_summary(r).split(": ", 1)[1],
                "dropped": ", ".join(x.probe for x in v.check.reasons if x.dropped) or "-",
                "editor verdict": v.verdict,
                "reliability": v.metrics.reliability,
                "T-Gen": v.metrics.text_generality,
                "I-Gen": v.metrics.image_generality,
                "Loc": v.metrics.locality_agreement,
                "margin (×ε)": v.edit.margin,
            }
        )
    return pl.DataFrame(rows)


def per_item_section(records: list[OkeditRecord], checks_file: str | None) -> str:
    if not records:
        return ""
    if len(records) > PER_ITEM_ROWS or checks_file is None:
        where = f"[`{checks_file}`]({checks_file})" if checks_file else "the parquet"
        return f"Per-item check and editor outcome: {where} (one row per item)."
    return "Per item:\n\n" + _markdown_table(check_rows(records))


def write_checks(records: list[OkeditRecord], path: Path) -> Path:
    """`checks.parquet`: the per-item rows of the card, for builds too large to list."""
    path.parent.mkdir(parents=True, exist_ok=True)
    frame = check_rows(records) if records else pl.DataFrame()
    frame.write_parquet(path)
    return path


def plot_scope(records: list[OkeditRecord], path: Path) -> Path | None:
    """Fixed-size figure, readable at any number of items: histograms of d/ε per probe family
    (1.0 = the radius; left of it = routed to the edit) and a bar chart of the check's reasons."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    validated = [r for r in records if r.validation.epsilon > 0 and r.validation.probes]
    reasons = reason_counts(records)
    if not validated and not reasons:
        return None
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4), dpi=120)
    bins = [i / 10 for i in range(0, 41)]  # d/ε from 0 to 4; farther probes in the last bin
    for family, color in PLOT_FAMILIES.items():
        values = [
            min(p.distance / r.validation.epsilon, 4.0)
            for r in validated
            for p in r.validation.probes
            if p.kind == family
        ]
        if values:
            left.hist(values, bins=bins, histtype="step", color=color, label=family, lw=1.5)
    left.axvline(1.0, color="black", lw=1, ls="--", label="radius ε")
    left.set_xlabel("distance to the edit key / ε (clipped at 4)")
    left.set_ylabel("probes")
    left.set_title(f"Editor: where probes fall ({len(validated)} items)")
    left.legend(fontsize=7)
    codes = sorted(reasons, key=lambda code: -reasons[code])
    right.barh(codes, [reasons[c] for c in codes], color="tab:gray")
    right.invert_yaxis()
    right.set_xlabel("items")
    right.set_title("Item check: reasons")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def settings_section(validation: dict) -> str:
    """The editor settings against the BalancEdit authors' code (donglgcn/EasyEdit, branch
    MMOKVQA): one row per difference."""
    rows = validation.get("differences_from_authors")
    if rows is None:
        return ""
    config = validation.get("edit_config") or {}
    main = ", ".join(
        f"{k} {config[k]}" for k in ("lr", "steps", "alpha", "negative", "edit_eos") if k in config
    )
    preset = validation.get("editor_preset") or "default"
    head = f"Editor settings (preset `{preset}`): {main}.\n\n"
    if not rows:
        return head + "These are the authors' settings (donglgcn/EasyEdit, branch MMOKVQA)."
    lead = (
        "The authors' settings, except what no setting can change:"
        if preset == "paper"
        else "Where this build differs from the authors' code (donglgcn/EasyEdit, MMOKVQA):"
    )
    return head + lead + "\n\n" + _markdown_table(pl.DataFrame(rows))


def llm_section(llm: dict | None, items_in: int) -> str:
    """What the annotation cost: every request the build sent, as the server counted it."""
    if not llm:
        return ""
    cost = llm.get("cost_usd")
    per_1k = f"${cost / items_in * 1000:.4f}" if cost is not None and items_in else "-"
    rows = [
        ("model", f"`{llm.get('model', '-')}`"),
        ("requests (answered)", f"{llm['requests']} ({llm['answered']})"),
        ("cache hits", llm["cache_hits"]),
        ("tokens prompt / completion / total",
         f"{llm['prompt_tokens']} / {llm['completion_tokens']} / {llm['total_tokens']}"),
        ("cost", f"${cost:.4f}" if cost is not None else llm["cost_note"]),
        ("cost per 1k items in", per_1k),
        ("budget", f"${llm['budget_usd']}" if llm.get("budget_usd") is not None else "none"),
        ("retries by cause",
         ", ".join(f"{k} {v}" for k, v in llm["retries"].items() if v) or "none"),
        ("refusals / malformed / re-asks",
         f"{llm['refusals']} / {llm['malformed']} / {llm['reasks']}"),
    ]  # fmt: skip
    table = _markdown_table(
        pl.DataFrame({"LLM usage": [r[0] for r in rows], "": [str(r[1]) for r in rows]})
    )
    templates = llm.get("by_template") or {}
    if templates:
        frame = pl.DataFrame([{"prompt template": k, **v} for k, v in templates.items()])
        table += "\n\nPer prompt template:\n\n" + _markdown_table(frame)
    return "## Annotation cost\n\n" + table + "\n"


def images_section(usage: dict | None) -> str:
    """What the image generation did and cost, per backend (requests, images, cache hits,
    list-price cost); nothing for the offline flagworld renderer alone."""
    backends = (usage or {}).get("backends") or {}
    if not backends or set(backends) == {"render"}:
        return ""
    rows = []
    for name, counts in backends.items():
        cost = counts.get("cost_usd")
        rows.append(
            {
                "backend": name,
                "requests": counts.get("requests", 0),
                "images": counts.get("images", 0),
                "cache hits": counts.get("cache_hits", 0),
                "cost": "-" if cost is None else f"${cost:.4f}",
            }
        )
    accepted = usage.get("images", 0)
    failed = usage.get("check_failed", 0)
    return (
        "## Image generation\n\n"
        f"{accepted} images accepted, {failed} failed their checks (every run and process of "
        "the build; cost at list price).\n\n" + _markdown_table(pl.DataFrame(rows)) + "\n"
    )


def count_line(counts: dict) -> str:
    """`in = published + rejected (+ deferred)` in words."""
    line = f"{counts['in']} items in, {counts['published']} published"
    line += f", {counts['rejected']} rejected"
    n = counts.get("deferred", 0)
    deferred = f", {n} deferred (failed only on 429/5xx/timeouts: a re-run asks again)"
    return line + (deferred if n else "") + "."


def plan_section(rows: list[dict] | None) -> str:
    """The build plan's estimates (`pipeline.plan`) against this run's measurements."""
    if not rows:
        return ""
    frame = pl.DataFrame(
        [{k: "-" if v is None else str(v) for k, v in row.items()} for row in rows]
    )
    note = "Seconds are this run's wall time: a resumed run only times what it redid."
    return "## Estimate vs actual\n\n" + _markdown_table(frame) + "\n\n" + note + "\n"


def _yaml_header(source: str, n: int) -> str:
    size = "n<1K" if n < 1000 else "1K<n<10K"
    return f"""---
license: cc-by-4.0
task_categories:
- visual-question-answering
tags:
- model-editing
- knowledge-editing
- okedit
- balancedit
size_categories:
- {size}
configs:
- config_name: default
  data_files:
  - split: train
    path: data/*.parquet
pretty_name: OKEDIT ({source})
---
"""


def render_card(
    records: list[OkeditRecord],
    rejections: list[Rejection],
    manifest: dict,
    plot: str | None,
    checks_file: str | None = None,
) -> str:
    source = manifest["config"]["source"]["name"]
    license_key = "flagworld" if source == "flagworld" else "okvqa"
    counts = manifest["counts"]
    validation = manifest.get("validation", {})
    plot_md = f"![scope]({plot})\n" if plot else ""
    tokens = manifest.get("tokens", {})
    checked = (
        ", and every item was checked by editing a model with BalancEdit before publication"
        if validation.get("validated")
        else ""
    )
    split = manifest["config"]["source"].get("split", "-") if license_key == "okvqa" else "-"
    return f"""{_yaml_header(source, len(records))}
# OKEDIT — {source}

OKEDIT is a benchmark for editing facts inside vision-language models: each item is a
knowledge-based visual question with a counterfactual edit target, paraphrased questions and
re-drawn images that the edit **should** reach (generality), and near-miss images and
questions that it **should not** reach (locality). It follows BalancEdit (Guo et al., ICML
2025). This build was made with okedit{checked}.

## How this build was made

| setting | value |
|---|---|
| source | `{source}` (split `{split}`) |
| annotator | `{manifest["annotator"]}` |
| image backend | `{manifest["config"]["images"]["backend"]}` |
| image model | `{manifest.get("image_model") or "-"}` |
| validation model | `{validation.get("model", "-")}` |
| editor | `{validation.get("editor", "-")}` |
| key variant | `{validation.get("key_variant") or "-"}` |
| seed | {manifest["config"]["seed"]} |
| build fingerprint | `{manifest["fingerprint"]}` |
| okedit | {manifest["versions"]["okedit"]} |
| LLM tokens (prompt / completion) | {tokens.get("prompt", 0)} / {tokens.get("completion", 0)} |

{llm_section(manifest.get("llm"), counts["in"])}{images_section(manifest.get("images_usage"))}

{plan_section(manifest.get("estimate_vs_actual"))}

## Counts

{count_line(counts)}

Per question type / relation:

{_count_table(records, "question_type") if records else "(none)"}

Per counterfact type:

{_count_table(records, "counterfact_type") if records else "(none)"}

Rejections:

{rejection_table(rejections)}

## Validation: item check and editor outcome

{CHECK_INTRO}

### Item check

{check_table(records)}

{per_item_section(records, checks_file)}

### Editor outcome

{validation_table(records)}

{settings_section(validation)}

{plot_md}
## Fields

See `docs/schema.md` in okedit. The `easyedit/` folder holds the same edits in the 11-field
JSON that EasyEdit's multimodal loaders read, plus each record's `item_id`; `loc`/`loc_ans`
is an image-free question on an unrelated fact, as EasyEdit evaluates it.

## License notes

{LICENSE_NOTES[license_key]}

## Citation

```bibtex
{CITATION}
```
"""
