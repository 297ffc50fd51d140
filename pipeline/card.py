"""The dataset card (README.md with Hub YAML) and the scope plot (PNG)."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import polars as pl

from schemas.features import GENERATION_METRICS, stats_frame
from schemas.record import OkeditRecord, Rejection

POSITIVE_KINDS = ("edit", "rephrase", "image_rephrase")
NEGATIVE_KINDS = ("locality", "text_negative")

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
    metric_cols = [
        "reliability",
        "text_generality",
        "image_generality",
        "locality_label",
        "text_locality_label",
        "hm",
    ]
    measured = frame.filter(pl.col("reliability") >= 0)
    means = measured.select([pl.col(c).mean().alias(c) for c in metric_cols])
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
    return text


def plot_scope(records: list[OkeditRecord], path: Path) -> Path | None:
    """Per item, each probe's distance to the edit key divided by ε (1.0 = the radius)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    validated = [r for r in records if r.validation.epsilon > 0 and r.validation.probes]
    if not validated:
        return None
    fig, ax = plt.subplots(figsize=(max(6.0, 0.25 * len(validated) + 2), 4), dpi=120)
    styles = {
        "positive": ("tab:green", "o", POSITIVE_KINDS),
        "near-miss image": ("tab:red", "x", ("locality",)),
        "text negative": ("tab:orange", "^", ("text_negative",)),
    }
    for label, (color, marker, kinds) in styles.items():
        xs, ys = [], []
        for i, record in enumerate(validated):
            eps = record.validation.epsilon
            for probe in record.validation.probes:
                if probe.kind in kinds:
                    xs.append(i)
                    ys.append(probe.distance / eps)
        ax.scatter(xs, ys, s=12, c=color, marker=marker, label=label, alpha=0.7)
    ax.axhline(1.0, color="black", lw=1, ls="--", label="radius ε")
    ax.set_yscale("symlog", linthresh=1.0)
    ax.set_xlabel("item")
    ax.set_ylabel("distance to edit key / ε")
    ax.set_title("Influence scope per item (below the line = routed to the edit)")
    ax.legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


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
    records: list[OkeditRecord], rejections: list[Rejection], manifest: dict, plot: str | None
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
| validation model | `{validation.get("model", "-")}` |
| editor | `{validation.get("editor", "-")}` |
| key variant | `{validation.get("key_variant") or "-"}` |
| seed | {manifest["config"]["seed"]} |
| build fingerprint | `{manifest["fingerprint"]}` |
| okedit | {manifest["versions"]["okedit"]} |
| LLM tokens (prompt / completion) | {tokens.get("prompt", 0)} / {tokens.get("completion", 0)} |

## Counts

{counts["in"]} items in, {counts["published"]} published, {counts["rejected"]} rejected.

Per question type / relation:

{_count_table(records, "question_type") if records else "(none)"}

Per counterfact type:

{_count_table(records, "counterfact_type") if records else "(none)"}

Rejections:

{rejection_table(rejections)}

## Validation (BalancEdit scope check)

{validation_table(records)}

{plot_md}
## Fields

See `docs/schema.md` in okedit. The `easyedit/` folder holds the same edits in the 11-field
JSON that EasyEdit's multimodal loaders read.

## License notes

{LICENSE_NOTES[license_key]}

## Citation

```bibtex
{CITATION}
```
"""
