"""The generality-locality trade-off on flagworld with the tiny VLM (issue 3, part 5).

Every flagworld capital edit that passes QC is edited once per configuration, on a clean
model each time, and probed on:

* T-Gen / I-Gen — the item's 10 paraphrases and 10 re-rendered flags (must answer the target);
* near-miss Loc — look-alike flags, same question (must keep their own capital);
* text Loc — other questions about the same flag (currency, language, ...: must keep theirs);
* far Loc — flags from other look-alike groups, same question.

Locality is reported label-based (accuracy of the correct answer after the edit) and as
top-1 agreement with the unedited model; HM3 = HM(T-Gen, I-Gen, near Loc), HM5 adds text
and far Loc (agreement). Nothing here is tuned toward a winner: one fixed edit strength per
editor, every pooling and negative option, and an α sweep.

    .venv/bin/python bench/tradeoff.py --out docs/img  [--limit 46] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path
from statistics import mean

import torch

from editors.adapters import load_model
from editors.config import EditorConfig, ModelConfig
from editors.metrics import harmonic_mean
from editors.scope import make_editor, validate_record
from pipeline.build import build_records
from pipeline.images import RenderBackend
from pipeline.offline_annotator import FlagworldAnnotator
from pipeline.sources import flagworld as fw
from pipeline.sources.flagworld import FlagworldSource
from pipeline.tiny_model import default_model_dir
from schemas.record import OkeditRecord, Rejection

N_FAR = 3
ALPHAS = (0.0, 0.05, 0.1, 0.25, 0.5, 1.0)
POOLINGS = ("mean_all", "mean_prompt", "last_prompt")
NEGATIVES = ("near_miss", "black")


def flagworld_records(limit: int, seed: int) -> list[OkeditRecord]:
    """Capital edits built by the real pipeline stages (source, annotator, render, QC)."""
    source = FlagworldSource(relations=("capital",))
    items = [
        i for i in source.load_items(source.list_ids(None, seed)) if not isinstance(i, Rejection)
    ]
    anns = [
        a for a in FlagworldAnnotator(seed=seed).annotate(items) if not isinstance(a, Rejection)
    ]
    by_id = {i.item_id: i for i in items}
    images = RenderBackend(seed=seed).make_images([(by_id[a.item_id], a) for a in anns])
    records, _ = build_records(items, anns, [i for i in images if not isinstance(i, Rejection)])
    return records[:limit]


def with_far_probes(record: OkeditRecord, seed: int) -> tuple[OkeditRecord, int]:
    """Append N_FAR flags from other look-alike groups to the locality images.

    Returns the record and the number of near-miss images, so results can be split again.
    Far flags have their own answers, so only agreement (not the label C) is used for them.
    """
    group = next(g for g in fw.LOOKALIKE_GROUPS if record.image_id in g)
    others = sorted(c.code for c in fw.COUNTRIES if c.code not in group)
    far = random.Random(f"{seed}-{record.item_id}").sample(others, N_FAR)
    near = len(record.locality_images)
    images = [*record.locality_images, *(fw.to_png(fw.render_flag(c)) for c in far)]
    return record.model_copy(update={"locality_images": images}), near


def summarize(results: list[tuple[OkeditRecord, int, object]]) -> dict[str, float]:
    """Macro averages over items of every metric of the trade-off."""

    def per_item(validation, near: int) -> dict[str, float]:
        probes = validation.probes

        def post(kind: str, keep=lambda p: True) -> list[float]:
            return [p.post_accuracy for p in probes if p.kind == kind and keep(p)]

        def agree(kind: str, keep=lambda p: True) -> list[float]:
            return [p.agreement for p in probes if p.kind == kind and keep(p)]

        is_near, is_far = (lambda p: p.index < near), (lambda p: p.index >= near)
        return {
            "Acc": mean(post("edit")),
            "T-Gen": mean(post("rephrase")),
            "I-Gen": mean(post("image_rephrase")),
            "Loc near (label)": mean(post("locality", is_near)),
            "Loc near (agree)": mean(agree("locality", is_near)),
            "Loc text (label)": mean(post("text_negative")),
            "Loc text (agree)": mean(agree("text_negative")),
            "Loc far (agree)": mean(agree("locality", is_far)),
        }

    rows = [per_item(v, near) for _, near, v in results if v.verdict != "error"]
    if not rows:
        return {"errors": len(results)}
    out = {k: mean(r[k] for r in rows) for k in rows[0]}
    out["HM3"] = harmonic_mean([out["T-Gen"], out["I-Gen"], out["Loc near (agree)"]])
    out["HM5"] = harmonic_mean(
        [
            out["T-Gen"],
            out["I-Gen"],
            out["Loc near (agree)"],
            out["Loc text (agree)"],
            out["Loc far (agree)"],
        ]
    )
    out["ok"] = mean(v.verdict == "ok" for _, _, v in results)
    out["ambiguous"] = mean(v.verdict == "ambiguous" for _, _, v in results)
    out["errors"] = sum(v.verdict == "error" for _, _, v in results)
    out["epsilon"] = mean(v.epsilon for _, _, v in results if v.epsilon >= 0)
    return out


def configurations(model: str) -> dict[str, EditorConfig]:
    """Every editor setting of the experiment, named; edit strength from the model preset."""
    configs = {
        f"BalancEdit {pool} / {neg}": EditorConfig.for_model(model, key_pooling=pool, negative=neg)
        for pool in POOLINGS
        for neg in NEGATIVES
    }
    configs["GRACE (last token, eps 1.0)"] = EditorConfig.for_model(model, editor="grace")
    configs["FT (no routing)"] = EditorConfig.for_model(model, editor="ft")
    for alpha in ALPHAS:
        configs[f"alpha {alpha:g}"] = EditorConfig.for_model(model, alpha=alpha)
    return configs


def run(limit: int, seed: int, model_dir: Path) -> dict:
    adapter = load_model(ModelConfig(model=str(model_dir), name="tiny-flagworld"))
    records = [with_far_probes(r, seed) for r in flagworld_records(limit, seed)]
    table = {}
    for name, config in configurations("tiny-flagworld").items():
        editor = make_editor(adapter, config)
        start = time.perf_counter()
        results = [(r, near, validate_record(r, editor, "tiny-flagworld")) for r, near in records]
        summary = summarize(results)
        summary["s/item"] = (time.perf_counter() - start) / len(records)
        table[name] = summary
        print(name, json.dumps({k: round(v, 3) for k, v in summary.items()}), flush=True)
    first = configurations("tiny-flagworld")["alpha 0.05"]
    return {
        "items": len(records),
        "seed": seed,
        "edit_strength": {"lr": first.lr, "steps": first.steps, "preset": first.preset},
        "grace": {
            "lr": EditorConfig(editor="grace").lr,
            "steps": EditorConfig(editor="grace").steps,
        },
        "ft": {"lr": EditorConfig(editor="ft").lr, "steps": EditorConfig(editor="ft").steps},
        "results": table,
    }


def plot_alpha(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = ["T-Gen", "I-Gen", "Loc near (agree)", "Loc text (agree)", "Loc far (agree)", "HM3"]
    fig, ax = plt.subplots(figsize=(6.5, 4), dpi=120)
    for metric in metrics:
        ys = [report["results"][f"alpha {a:g}"][metric] for a in ALPHAS]
        ax.plot(ALPHAS, ys, marker="o", label=metric)
    ax.set_xlabel("α (weight of d(k, k_pos) in ε)")
    ax.set_ylabel("score")
    ax.set_ylim(-0.02, 1.02)
    ax.set_title(f"BalancEdit α sweep, tiny flagworld VLM, {report['items']} capital edits")
    ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


def markdown(report: dict) -> str:
    cols = [
        "Acc",
        "T-Gen",
        "I-Gen",
        "Loc near (label)",
        "Loc near (agree)",
        "Loc text (agree)",
        "Loc far (agree)",
        "HM3",
        "HM5",
        "ok",
        "epsilon",
        "s/item",
    ]
    lines = ["| setting | " + " | ".join(cols) + " |", "|---|" + "---|" * len(cols)]
    for name, row in report["results"].items():
        lines.append(
            f"| {name} | " + " | ".join(f"{row.get(c, float('nan')):.3f}" for c in cols) + " |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--limit", type=int, default=46)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--model", type=Path, default=default_model_dir())
    parser.add_argument("--out", type=Path, default=Path("docs/img"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    report = run(args.limit, args.seed, args.model)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "tradeoff.json").write_text(json.dumps(report, indent=2))
    plot_alpha(report, args.out / "tradeoff_alpha.png")
    print(markdown(report))


if __name__ == "__main__":
    main()
