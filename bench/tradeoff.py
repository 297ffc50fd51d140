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

The key-variant experiment (issue 7) runs BalancEdit with every `EditorConfig.key_variant`
× {near-miss, black} negative. Variants other than `reference` set a text radius from the
item's last text negative, which is then not evaluated; so that every variant is scored on
the same probes, text Loc of this experiment leaves the last text negative out for all of
them (the reference included).

    .venv/bin/python bench/tradeoff.py --out docs/img  [--limit 46] [--threads 2]
        [--experiment all|tradeoff|key_variants]
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path
from statistics import mean, median

import torch

from editors.adapters import load_model
from editors.codebook import pairwise_distance, pool_keys
from editors.config import KEY_VARIANTS, EditorConfig, ModelConfig
from editors.metrics import harmonic_mean
from pipeline.assemble import build_records
from pipeline.images import RenderBackend
from pipeline.offline_annotator import FlagworldAnnotator
from pipeline.scope import build_probes, make_editor, validate_record
from pipeline.sources import flagworld as fw
from pipeline.sources.flagworld import FlagworldSource
from pipeline.tiny_model import default_model_dir
from schemas.record import OkeditRecord, Rejection

N_FAR = 3
ALPHAS = (0.0, 0.05, 0.1, 0.25, 0.5, 1.0)
POOLINGS = ("mean_all", "mean_prompt", "last_prompt")
NEGATIVES = ("near_miss", "black")
VARIANTS = ("reference", *KEY_VARIANTS)
# Issue 7's question: same-image text Loc >= 0.9 with I-Gen >= 0.9 and near-miss Loc >= 0.85.
GOAL = {"Loc text": 0.9, "I-Gen": 0.9, "Loc near": 0.85}
PROBE_GROUPS = ("rephrase", "image_rephrase", "near", "text", "far")
# Key geometry: which poolings separate which positives from which negatives at all.
GEOMETRY_POOLINGS = ("mean_all", "question", "image", "last_prompt")
GEOMETRY_PAIRS = (
    ("rephrase", "text"),
    ("image_rephrase", "near"),
    ("image_rephrase", "text"),
    ("positives", "negatives"),
)


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


def evaluated_text(record: OkeditRecord, skip_text: tuple[int, ...]) -> set[int]:
    """Indices of the text negatives scored: all but `skip_text` (Python-style indices)."""
    n = len(record.text_negatives)
    return set(range(n)) - {i % n for i in skip_text}


def summarize(
    results: list[tuple[OkeditRecord, int, object]], skip_text: tuple[int, ...] = ()
) -> dict[str, float]:
    """Macro averages over items of every metric of the trade-off. Text Loc leaves out the
    text negatives `skip_text` of every item (the training ones of the key variants)."""

    def per_item(record: OkeditRecord, validation, near: int) -> dict[str, float]:
        text = evaluated_text(record, skip_text)
        probes = [p for p in validation.probes if p.kind != "text_negative" or p.index in text]

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

    rows = [per_item(r, v, near) for r, near, v in results if v.verdict != "error"]
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
    radii = [v.epsilon for _, _, v in results if v.epsilon >= 0]
    out["epsilon"] = mean(radii) if radii else float("nan")  # FT has no radius
    return out


def routing(
    results: list[tuple[OkeditRecord, int, object]], skip_text: tuple[int, ...]
) -> dict[str, dict[str, float]]:
    """Per probe group: the fraction of probes routed to the edit, the median distance d
    (`ProbeResult.distance`: relative to ε already for two-part keys) and the median d / ε
    (≤ 1 = routed), pooled over items."""
    routed: dict[str, list[bool]] = {g: [] for g in PROBE_GROUPS}
    dist: dict[str, list[float]] = {g: [] for g in PROBE_GROUPS}
    ratio: dict[str, list[float]] = {g: [] for g in PROBE_GROUPS}
    for record, near, v in results:
        if v.verdict == "error":
            continue
        text = evaluated_text(record, skip_text)
        for p in v.probes:
            group = _group(p, near, text)
            if group is not None:
                routed[group].append(p.routed)
                dist[group].append(p.distance)
                ratio[group].append(p.distance / v.epsilon if v.epsilon > 0 else float("nan"))
    return {
        g: {
            "routed": mean(routed[g]),
            "median d": median(dist[g]),
            "median d/eps": median(ratio[g]),
        }
        for g in PROBE_GROUPS
        if routed[g]
    }


def _group(probe, near: int, text: set[int]) -> str | None:
    if probe.kind in ("rephrase", "image_rephrase"):
        return probe.kind
    if probe.kind == "locality":
        return "near" if probe.index < near else "far"
    if probe.kind == "text_negative" and probe.index in text:
        return "text"
    return None


def key_geometry(adapter, records: list[tuple[OkeditRecord, int]]) -> dict[str, dict]:
    """Radius-free view of each pooling: the clean keys of every probe, d = 1 − cos to the
    edit key. Per pooling: the median d of each probe group, and for pairs of groups the
    per-item AUC (the fraction of (positive, negative) pairs where the positive is nearer;
    1 = some radius separates them) and the fraction of items fully separable (every
    positive nearer than every negative), macro-averaged over items."""
    config = EditorConfig.for_model("tiny-flagworld")
    editor = make_editor(adapter, config)
    dists: dict[str, dict[str, list[float]]] = {
        p: {g: [] for g in PROBE_GROUPS} for p in GEOMETRY_POOLINGS
    }
    aucs: dict[str, dict[str, list[float]]] = {p: {} for p in GEOMETRY_POOLINGS}
    for record, near in records:
        probes = build_probes(record, config)
        batch = adapter.build_inputs(
            [p.image for p in probes], [p.question for p in probes], [p.expected for p in probes]
        )
        x = adapter.capture(batch, editor.path).x
        text = set(range(len(record.text_negatives)))
        groups = [_group(p, near, text) for p in probes]
        for pooling in GEOMETRY_POOLINGS:
            keys = pool_keys(x, batch.pool_mask(pooling))
            d = pairwise_distance(keys[:1], keys, "cosine")[0].tolist()
            by_group = {
                g: [di for di, gi in zip(d, groups, strict=True) if gi == g] for g in PROBE_GROUPS
            }
            by_group["positives"] = by_group["rephrase"] + by_group["image_rephrase"]
            by_group["negatives"] = by_group["near"] + by_group["text"] + by_group["far"]
            for g in PROBE_GROUPS:
                dists[pooling][g] += by_group[g]
            for pos, neg in GEOMETRY_PAIRS:
                pairs = [(a, b) for a in by_group[pos] for b in by_group[neg]]
                name = f"{pos} vs {neg}"
                aucs[pooling].setdefault(f"AUC {name}", []).append(mean(a < b for a, b in pairs))
                aucs[pooling].setdefault(f"separable {name}", []).append(
                    float(max(by_group[pos]) < min(by_group[neg]))
                )
    return {
        pooling: {
            **{f"median d {g}": median(dists[pooling][g]) for g in PROBE_GROUPS},
            **{k: mean(v) for k, v in aucs[pooling].items()},
        }
        for pooling in GEOMETRY_POOLINGS
    }


def goal_met(row: dict[str, float], locality: str) -> bool:
    """Issue 7's bar, on agreement or label locality (far Loc has agreement only)."""
    return (
        row[f"Loc text ({locality})"] >= GOAL["Loc text"]
        and row["I-Gen"] >= GOAL["I-Gen"]
        and row[f"Loc near ({locality})"] >= GOAL["Loc near"]
    )


def _config(model: str, **overrides) -> EditorConfig:
    """The model's preset + `overrides`; teacher-forced metrics only (greedy generation of
    every probe would triple the run and is reported by the validate stage instead)."""
    return EditorConfig.for_model(model, generate_answers=False, **overrides)


def variant_configurations(model: str) -> dict[str, EditorConfig]:
    """BalancEdit with every key variant x negative; edit strength from the model preset."""
    return {
        f"{variant} / {neg}": _config(model, key_variant=variant, negative=neg)
        for variant in VARIANTS
        for neg in NEGATIVES
    }


def text_negative_configurations(model: str) -> dict[str, EditorConfig]:
    """Sensitivity to which text negative sets the text radius: the last (default) or the
    first, near-miss image negative; the reference (no text negative) as the baseline."""
    configs = {"reference / near_miss": _config(model)}
    for variant in KEY_VARIANTS:
        for index, name in ((-1, "last"), (0, "first")):
            configs[f"{variant} / near_miss / text neg {name}"] = _config(
                model, key_variant=variant, train_text_negative=index
            )
    return configs


def configurations(model: str) -> dict[str, EditorConfig]:
    """Every editor setting of the experiment, named; edit strength from the model preset."""
    configs = {
        f"BalancEdit {pool} / {neg}": _config(model, key_pooling=pool, negative=neg)
        for pool in POOLINGS
        for neg in NEGATIVES
    }
    configs["GRACE (last token, eps 1.0)"] = _config(model, editor="grace")
    configs["FT (no routing)"] = _config(model, editor="ft")
    for alpha in ALPHAS:
        configs[f"alpha {alpha:g}"] = _config(model, alpha=alpha)
    return configs


def run_configs(
    adapter,
    records: list[tuple[OkeditRecord, int]],
    configs: dict[str, EditorConfig],
    skip_text: tuple[int, ...] | None = None,
) -> tuple[dict, dict]:
    """Validate every record under every config; (summary table, routing table). With
    `skip_text` (key-variant experiments) text Loc leaves those text negatives out for every
    config, and the goal of issue 7 and the routing per probe group are added."""
    table, routes = {}, {}
    for name, config in configs.items():
        editor = make_editor(adapter, config)
        start = time.perf_counter()
        results = [(r, near, validate_record(r, editor, "tiny-flagworld")) for r, near in records]
        summary = summarize(results, skip_text or ())
        summary["s/item"] = (time.perf_counter() - start) / len(records)
        if skip_text is not None:
            summary["goal (agree)"] = float(goal_met(summary, "agree"))
            summary["goal (label)"] = float(goal_met(summary, "label"))
            routes[name] = routing(results, skip_text)
        table[name] = summary
        print(name, json.dumps({k: round(v, 3) for k, v in summary.items()}), flush=True)
    return table, routes


def run(limit: int, seed: int, model_dir: Path, experiments: tuple[str, ...]) -> dict:
    adapter = load_model(ModelConfig(model=str(model_dir), name="tiny-flagworld"))
    records = [with_far_probes(r, seed) for r in flagworld_records(limit, seed)]
    report: dict = {}
    if "tradeoff" in experiments:
        report["results"], _ = run_configs(adapter, records, configurations("tiny-flagworld"))
    if "key_variants" in experiments:
        report["key_variants"], report["key_variant_routing"] = run_configs(
            adapter, records, variant_configurations("tiny-flagworld"), skip_text=(-1,)
        )
        report["key_geometry"] = key_geometry(adapter, records)
        # Scored on the text negatives that neither choice trains on (first and last out).
        report["text_negative_choice"], report["text_negative_choice_routing"] = run_configs(
            adapter, records, text_negative_configurations("tiny-flagworld"), skip_text=(0, -1)
        )
    first = configurations("tiny-flagworld")["alpha 0.05"]
    return {
        "items": len(records),
        "seed": seed,
        "model": str(model_dir),
        "edit_strength": {
            "lr": first.lr,
            "steps": first.steps,
            "preset": first.preset,
            "alpha": first.alpha,
        },
        "grace": {
            "lr": EditorConfig(editor="grace").lr,
            "steps": EditorConfig(editor="grace").steps,
        },
        "ft": {"lr": EditorConfig(editor="ft").lr, "steps": EditorConfig(editor="ft").steps},
        **report,
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


def plot_variants(report: dict, path: Path) -> None:
    """Grouped bars per key variant, one panel per negative, with issue 7's bars dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = ["T-Gen", "I-Gen", "Loc near (agree)", "Loc text (agree)", "Loc far (agree)", "HM5"]
    goals = {"I-Gen": GOAL["I-Gen"], "Loc near (agree)": GOAL["Loc near"]}
    goals["Loc text (agree)"] = GOAL["Loc text"]
    fig, axes = plt.subplots(1, len(NEGATIVES), figsize=(12, 4), dpi=120, sharey=True)
    width = 0.8 / len(metrics)
    for ax, neg in zip(axes, NEGATIVES, strict=True):
        for m, metric in enumerate(metrics):
            xs = [i + (m - len(metrics) / 2 + 0.5) * width for i in range(len(VARIANTS))]
            ys = [report["key_variants"][f"{v} / {neg}"][metric] for v in VARIANTS]
            bars = ax.bar(xs, ys, width, label=metric)
            if metric in goals:
                for x in xs:
                    ax.plot(
                        [x - width / 2, x + width / 2],
                        [goals[metric]] * 2,
                        color=bars.patches[0].get_facecolor(),
                        lw=1,
                        ls="--",
                    )
        ax.set_xticks(range(len(VARIANTS)), VARIANTS, rotation=15, fontsize=8)
        ax.set_ylim(0, 1.05)
        ax.set_title(f"negative: {neg}", fontsize=9)
    axes[0].set_ylabel("score (dashes: issue 7 bars)")
    axes[-1].legend(fontsize=7, loc="lower right")
    edit = report["edit_strength"]
    fig.suptitle(
        f"BalancEdit key variants, tiny flagworld VLM, {report['items']} capital edits "
        f"(lr {edit['lr']:g}, {edit['steps']} steps, α {edit['alpha']:g})",
        fontsize=10,
    )
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


def markdown_variants(report: dict, table: str = "key_variants") -> str:
    cols = [
        "Acc",
        "T-Gen",
        "I-Gen",
        "Loc near (agree)",
        "Loc near (label)",
        "Loc text (agree)",
        "Loc text (label)",
        "Loc far (agree)",
        "HM5",
        "ok",
        "goal (agree)",
        "goal (label)",
    ]
    lines = ["| variant / negative | " + " | ".join(cols) + " |", "|---|" + "---:|" * len(cols)]
    for name, row in report[table].items():
        cells = [
            ("yes" if row[c] else "no") if c.startswith("goal") else f"{row[c]:.3f}" for c in cols
        ]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += ["", "Routed fraction (median d/ε) per probe group:", ""]
    lines.append("| variant / negative | " + " | ".join(PROBE_GROUPS) + " |")
    lines.append("|---|" + "---:|" * len(PROBE_GROUPS))
    routing_table = "key_variant_routing" if table == "key_variants" else f"{table}_routing"
    for name, groups in report[routing_table].items():
        cells = [
            f"{groups[g]['routed']:.2f} ({groups[g]['median d/eps']:.2f})" if g in groups else "-"
            for g in PROBE_GROUPS
        ]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def markdown_geometry(report: dict) -> str:
    groups = [f"median d {g}" for g in PROBE_GROUPS]
    pairs = [f"{a} vs {b}" for a, b in GEOMETRY_PAIRS]
    cols = groups + [f"AUC {p}" for p in pairs] + [f"separable {p}" for p in pairs]
    lines = ["| pooling | " + " | ".join(cols) + " |", "|---|" + "---:|" * len(cols)]
    for pooling, row in report["key_geometry"].items():
        lines.append(f"| {pooling} | " + " | ".join(f"{row[c]:.3f}" for c in cols) + " |")
    return "\n".join(lines)


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
    parser.add_argument("--experiment", choices=("all", "tradeoff", "key_variants"), default="all")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    experiments = ("tradeoff", "key_variants") if args.experiment == "all" else (args.experiment,)
    report = run(args.limit, args.seed, args.model, experiments)
    args.out.mkdir(parents=True, exist_ok=True)
    if "results" in report:
        (args.out / "tradeoff.json").write_text(json.dumps(report, indent=2))
        plot_alpha(report, args.out / "tradeoff_alpha.png")
        print(markdown(report))
    if "key_variants" in report:
        (args.out / "key_variants.json").write_text(json.dumps(report, indent=2))
        plot_variants(report, args.out / "key_variants.png")
        print(markdown_variants(report))
        print(markdown_variants(report, "text_negative_choice"))
        print(markdown_geometry(report))


if __name__ == "__main__":
    main()
