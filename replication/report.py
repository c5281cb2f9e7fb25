"""Reports: the verdict on every claim from any set of stored runs, as tables and plots.

A set of runs is a pipeline batch, a list of run ids, or a selection over the whole store
(`select_runs`). Every run's numbers come from its own protocol's `measurements` (protocols.registry), so
a run stored by `densecl-bench eval` is judged exactly like a pipeline run. A claim is judged only by
runs whose protocol, layer, k, metric, pretraining and scale match it (`replication.verdicts`).
"""

from __future__ import annotations

import csv
import hashlib
import io
import logging
import math
import statistics
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from baselines.infra import UserError
from baselines.methods import paper_name
from protocols.common import PRETRAIN_NAMES
from protocols.result import ProtocolResult
from replication.claims import DEFAULT_PATH, Claim, load_claims
from replication.verdicts import RESOLVED, STATUSES, Measurement, Verdict, judge

LOG = logging.getLogger("densecl_bench.report")
BACKBONE_NAMES = {"resnet50": "R50", "resnet101": "R101", "resnet18": "R18", "resnet34": "R34"}
SELECT_KEYS = ("protocol", "pipeline", "method", "seed", "scale", "dataset", "checkpoint", "run")
REPORT_PROTOCOL = "report"
STATUS_COLOURS = {"reproduced": "tab:green", "contradicted": "tab:red", "inconclusive": "tab:gray"}


class ReportError(UserError, ValueError):
    """A selection that names no runs, an unknown key or id; one line."""


# ---------------------------------------------------------------------------------------------- selection


@dataclass
class Selection:
    records: list  # RunRecord
    label: str  # what the report is about, for its title
    pipeline: str  # where the report is stored: the batch's pipeline, else "reports"
    key: dict[str, Any] = field(default_factory=dict)  # what identifies it (an identical re-run reuses the report)


def _matches(record, key: str, value: str) -> bool:
    pretraining = record.pretraining
    if key == "protocol":
        return record.protocol == value
    if key == "pipeline":
        return record.pipeline == value
    if key == "method":
        return paper_name(str(pretraining.get("method") or "")).lower() == paper_name(value).lower()
    if key == "seed":
        return str(pretraining.get("seed")) == value
    if key == "scale":
        return record.scale == value
    if key == "dataset":
        return str(record.dataset.get("name", "")) == value
    if key == "checkpoint":
        info = record.checkpoint
        return str(info.get("sha256") or "").startswith(value) or value in str(info.get("path") or "")
    return record.run_id.startswith(value)  # "run"


def parse_select(text: str) -> list[tuple[str, str]]:
    filters = []
    for part in filter(None, (p.strip() for p in text.split(","))):
        key, sep, value = part.partition("=")
        if not sep or not value or key not in SELECT_KEYS:
            raise ReportError(f"--select expects KEY=VALUE,... with keys {', '.join(SELECT_KEYS)}; got {part!r}")
        filters.append((key, value))
    if not filters:
        raise ReportError("--select names no filter")
    return filters


def select_runs(store, pipeline: str | None = "replicate-voc", batch: str | None = None,
                runs: list[str] | None = None, select: str | None = None) -> Selection:
    """The runs a report judges: `runs` (ids), else `select` (filters), else `batch` of `pipeline` (default latest)."""
    if runs:
        every = {r.run_id: r for r in store.load_runs() if r.protocol != REPORT_PROTOCOL}
        unknown = [run for run in runs if run not in every]
        if unknown:
            raise ReportError(f"no stored run {', '.join(unknown)} in {store.root}")
        records = [every[run] for run in dict.fromkeys(runs)]
        return Selection(records, f"runs {', '.join(runs)}", "reports", {"runs": sorted(runs)})
    if select:
        filters = parse_select(select)
        records = [r for r in store.load_runs() if r.protocol != REPORT_PROTOCOL
                   and all(_matches(r, k, v) for k, v in filters)]
        if not records:
            raise ReportError(f"no stored run in {store.root} matches {select!r}")
        return Selection(records, f"runs matching {select}", "reports", {"runs": sorted(r.run_id for r in records)})
    pipeline = pipeline or "replicate-voc"
    candidates = [r for r in store.load_runs(pipeline) if r.protocol != REPORT_PROTOCOL and r.batch]
    if not candidates:
        raise ReportError(f"no {pipeline} runs in {store.root}; run the pipeline first, or pass --runs / --select")
    batch = batch or candidates[-1].batch
    records = [r for r in candidates if r.batch == batch]
    if not records:
        raise ReportError(f"no stored runs of {pipeline} batch {batch} in {store.root}")
    return Selection(records, f"{pipeline} batch {batch}", pipeline,
                     {"batch": batch, "runs": sorted(r.run_id for r in records)})


# ---------------------------------------------------------------------------------------------- measurements


def measurements(records) -> tuple[list[Measurement], list[str]]:
    """Every number the runs measured, as claims key them, plus one line per run that cannot be matched."""
    from protocols.registry import ProtocolError, get_protocol

    rows: list[Measurement] = []
    unmatched: list[str] = []
    derive = {}
    for record in records:
        try:
            protocol = get_protocol(record.protocol)
        except ProtocolError:
            unmatched.append(f"{record.run_id}: protocol {record.protocol!r} is not registered")
            continue
        result: ProtocolResult = record.as_result()
        pretraining = result.pretraining
        if protocol.derived is not None:
            derive[protocol.name] = protocol.derived
        readings = protocol.measurements(result)
        if readings and not any(r.method for r in readings) and not pretraining.get("method"):
            unmatched.append(f"{record.run_id}: the checkpoint's method is unknown (store it with eval --method)")
            continue
        arch = str(pretraining.get("arch") or "")
        data = str(pretraining.get("pretrain_data") or "")
        for reading in readings:
            rows.append(Measurement(
                method=paper_name(str(reading.method or pretraining.get("method"))),
                seed=pretraining.get("seed"), scale=result.scale or "small",
                pretrain_data=PRETRAIN_NAMES.get(data, data), epochs=pretraining.get("epochs"),
                backbone=BACKBONE_NAMES.get(arch, arch), protocol_id=reading.protocol_id, layer=reading.layer,
                k=reading.k, value=float(reading.value), run_id=record.run_id, metric=reading.metric,
                unit=f"{record.run_id}#{reading.replicate}" if reading.replicate is not None else ""))
    for derived in derive.values():
        rows += derived(rows)
    return rows, unmatched


def claimed_effect(claim: Claim, by_id: dict[str, Claim]) -> float | None:
    """The paper's own difference for a comparative claim: its cited deltas, else its cited number pairs."""
    cited = [by_id[i] for i in claim.derived_from if i in by_id]
    deltas = [c.value for c in cited if c.kind == "delta" and c.value is not None and c.protocol_id == claim.protocol_id
              and (c.method, c.baseline) == (claim.method, claim.baseline)]
    if deltas:
        return statistics.fmean(deltas)
    groups: dict[tuple, dict[str, float]] = defaultdict(dict)
    for c in cited:
        if c.kind == "absolute" and c.value is not None and c.metric == claim.metric:
            groups[(c.source_key, c.pretrain_data, c.epochs, c.layer, c.k)][c.method] = c.value
    differences = [g[claim.method] - g[claim.baseline] for g in groups.values()
                   if claim.method in g and claim.baseline in g]
    return statistics.fmean(differences) if differences else None


def judge_all(claims: list[Claim], rows: list[Measurement]) -> list[Verdict]:
    from replication.coverage import metrics_by_protocol

    reachable = set(metrics_by_protocol())
    by_id = {c.claim_id: c for c in claims}
    judged = []
    for claim in claims:
        effect = claimed_effect(claim, by_id) if claim.kind in ("directional", "equivalence") else None
        judged.append(judge(claim, rows, reachable, effect))
    return judged


# ---------------------------------------------------------------------------------------------- tables


def _mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def _summary_table(rows: list[Measurement]) -> list[str]:
    groups = defaultdict(list)
    for m in rows:
        if m.unit:  # per-round readings (step times) are summarised by their claim, not here
            continue
        groups[(m.protocol_id, m.metric, m.layer, m.k, m.scale, m.method)].append(m.value)
    lines = ["| protocol | metric | layer | k | scale | method | mean | std | runs |",
             "|---|---|---|---|---|---|---|---|---|"]
    for (protocol, metric, layer, k, scale, method), values in sorted(
            groups.items(), key=lambda kv: (*kv[0][:3], kv[0][3] or 0, *kv[0][4:])):
        mean, std = _mean_std(values)
        lines.append(f"| {protocol} | {metric} | {layer} | {'' if k is None else k} | {scale} | {method} | {mean:.2f} "
                     f"| {std:.2f} | {len(values)} |")
    return lines


def _claimed(v: Verdict) -> str:
    c = v.claim
    if c.kind == "directional":
        return f"{c.method} {c.relation} {c.baseline}"
    if c.kind == "equivalence":
        return f"{c.method} within ±{c.tolerance:g} of {c.baseline}"
    return f"{c.value:g} ± {c.tolerance:g}" if c.value is not None and c.tolerance is not None else c.value_text


def _number(value: float | None, digits: int = 2) -> str:
    return "" if value is None or not math.isfinite(value) else f"{value:+.{digits}f}"


def verdict_table(judged: list[Verdict]) -> list[str]:
    lines = ["| claim | claimed | measured | 95% interval | MDE (80% power) | seeds to resolve | "
             "paper's effect | status |",
             "|---|---|---|---|---|---|---|---|"]
    for v in judged:
        interval = f"{v.interval[0]:+.2f} .. {v.interval[1]:+.2f}" if v.interval else ""
        if v.claim.kind == "equivalence" and v.interval:
            interval += " (90%)"
        lines.append(f"| `{v.claim.claim_id}` | {_claimed(v)} | {_number(v.measured)} | {interval} | "
                     f"{'' if v.mde is None or not math.isfinite(v.mde) else f'{v.mde:.2f}'} | "
                     f"{v.seeds_needed or ''} | {_number(v.claimed_effect)} | **{v.status}** |")
    return lines


def verdict_csv(judged: list[Verdict]) -> str:
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=list(judged[0].row()), lineterminator="\n")
    writer.writeheader()
    for v in judged:
        writer.writerow(v.row())
    return out.getvalue()


MEASURED_HEADING = "## Measured (x100 metrics; seconds for step times)"
JUDGED_HEADING = "## Claims these runs could judge"
HOW_TO_READ = (
    "How to read this: small-scale runs (synthetic data, small backbones) cannot be compared with the paper's "
    "absolute numbers; they are judged on *directional* claims (DenseCL above or below MoCo-v2) from the per-seed "
    "paired difference, and on *equivalence* claims ('comparable') by two one-sided tests against the stated margin. "
    "`reproduced`: the 95% interval lies on the claimed side (for equivalence: the 90% interval lies inside the "
    "margin); `contradicted`: it lies wholly on the other side (or outside the margin); `inconclusive`: it "
    "straddles zero, and the MDE column says the smallest true difference this design detects with 80% power, "
    "the next column how many seeds would resolve the measured mean. Paper-scale runs (real data, real "
    "checkpoints) are judged against the paper's numbers within each claim's tolerance; where one run per method "
    "is all there is, a difference is judged against the protocol's noise band.")


def learning_lines(records) -> list[str]:
    """Per pretrained checkpoint: the global contrastive loss and top-1 at the end against chance."""
    seen, lines = set(), []
    for record in records:
        pretraining = record.pretraining
        learning = pretraining.get("learning") or {}
        key = (pretraining.get("method"), pretraining.get("seed"))
        if not learning or key in seen:
            continue
        seen.add(key)
        lines.append(f"| {paper_name(str(key[0]))} | {key[1]} | {learning['first_loss_global']:.3f} | "
                     f"{learning['last_loss_global']:.3f} | {learning['chance_loss']:.3f} | "
                     f"{learning['last_acc_global']:.1f} | {learning['chance_acc']:.2f} | "
                     f"{'yes' if learning['learned'] else '**no**'} |")
    if not lines:
        return []
    return ["| method | seed | first global loss | last | chance ln(K+1) | last top-1 % | chance % | learned |",
            "|---|---|---|---|---|---|---|---|", *sorted(lines)]


def random_baseline_lines(rows: list[Measurement]) -> list[str]:
    """Each method against the random-init backbone of the same seed, beside the DenseCL - MoCo-v2 difference."""
    groups: dict[tuple, dict[str, dict[Any, float]]] = defaultdict(lambda: defaultdict(dict))
    for m in rows:
        if not m.unit:
            groups[(m.protocol_id, m.metric, m.layer, m.k, m.scale)][m.method][m.seed] = m.value
    lines = []
    for (protocol, metric, layer, k, _scale), by_method in sorted(groups.items(), key=lambda kv: str(kv[0])):
        if "Random" not in by_method:
            continue
        random = by_method["Random"]

        def gain(method: str, by_method=by_method, random=random) -> float | None:
            seeds = [s for s in by_method.get(method, {}) if s in random]
            return statistics.fmean(by_method[method][s] - random[s] for s in seeds) if seeds else None

        moco, dense = gain("MoCo-v2"), gain("DenseCL")
        gap = abs(dense - moco) if moco is not None and dense is not None else None
        weak = gap is not None and min(moco, dense) <= gap
        lines.append(f"| {protocol} | {metric} | {layer} | {'' if k is None else k} | "
                     f"{statistics.fmean(random.values()):.2f} | {_number(moco)} | {_number(dense)} | "
                     f"{'' if gap is None else f'{gap:.2f}'} | {'**no**' if weak else 'yes'} |")
    if not lines:
        return []
    return ["| protocol | metric | layer | k | random init | MoCo-v2 - random | DenseCL - random | "
            "abs(DenseCL - MoCo-v2) | both beat random by more |", "|---|---|---|---|---|---|---|---|---|", *lines]


def markdown(selection: Selection, judged: list[Verdict], rows: list[Measurement], unmatched: list[str]) -> str:
    counts = defaultdict(int)
    for v in judged:
        counts[v.status] += 1
    scale = ", ".join(sorted({m.scale for m in rows})) or "none"
    measured_protocols = {m.protocol_id for m in rows}
    judged_rows = [v for v in judged if v.status in (*RESOLVED, "inconclusive")]
    unjudged = [v for v in judged
                if v.status not in (*RESOLVED, "inconclusive") and v.claim.protocol_id in measured_protocols]
    lines = [
        f"# Verdicts: {selection.label}", "",
        f"Scale: **{scale}**. Runs: {len(selection.records)} stored protocol runs. Claims: {len(judged)} "
        "(`replication/claims.csv`).", "", HOW_TO_READ, "",
        "| status | claims |", "|---|---|",
        *[f"| {status} | {counts[status]} |" for status in STATUSES if counts[status]],
        "",
    ]
    if unmatched:
        lines += ["Runs that could not be matched to claims:", "", *[f"- {line}" for line in unmatched], ""]
    learned, baseline = learning_lines(selection.records), random_baseline_lines(rows)
    if learned or baseline:
        lines += ["## Did pretraining learn?", "",
                  "A comparison of two methods means little if neither learned: the contrastive loss should end "
                  "below chance and each method should beat the random-init backbone of its seed by more than the "
                  "two methods differ.", "", *learned, "", *baseline, ""]
    lines += [
        MEASURED_HEADING, "", *_summary_table(rows), "",
        JUDGED_HEADING, "", *verdict_table(judged_rows), "",
        "Why, claim by claim:", "", *[f"- `{v.claim.claim_id}`: {v.reason}" for v in judged_rows], "",
        "## Claims about these protocols that they could not judge", "",
        "| claim | status | why |", "|---|---|---|",
        *[f"| `{v.claim.claim_id}` | {v.status} | {v.reason} |" for v in unjudged], "",
        "Every other claim is listed in `verdicts.csv` with its status and reason.", "",
        "Plots: `plots/verdicts.png` (each judged claim's interval, the MDE band and the paper's own effect), and "
        "where the runs have them `plots/lowshot.png`, `plots/layers.png`, `plots/dense.png`, "
        "`plots/pretrain_loss.png`.",
    ]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------- plots


def plot_verdicts(judged: list[Verdict]):
    """Each comparative claim: the measured difference with its interval (colour = status), the ±MDE band around
    zero, and the paper's own difference; paper-scale absolute claims: measured against reported."""
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    comparative = [v for v in judged if v.claim.kind in ("directional", "equivalence") and v.measured is not None]
    absolute = [v for v in judged if v.claim.kind == "absolute" and v.measured is not None and v.status in RESOLVED]
    fig, ax = plt.subplots(figsize=(10, max(3.0, 0.42 * (len(comparative) or len(absolute)) + 1.8)))
    if comparative:
        ys = list(range(len(comparative)))
        for y, v in zip(ys, comparative, strict=True):
            if v.mde is not None and math.isfinite(v.mde):
                ax.fill_betweenx([y - 0.35, y + 0.35], -v.mde, v.mde, color="tab:blue", alpha=0.12, lw=0)
            if v.interval:
                ax.plot(v.interval, [y, y], color=STATUS_COLOURS.get(v.status, "k"), lw=2)
            ax.plot([v.measured], [y], "o", color=STATUS_COLOURS.get(v.status, "k"))
            if v.claimed_effect is not None:
                ax.plot([v.claimed_effect], [y], "D", mfc="none", mec="k", ms=6)
            if v.claim.kind == "equivalence":
                margin = v.claim.tolerance
                ax.plot([-margin, margin], [y, y], "|", color="purple", ms=14, mew=2)
        ax.axvline(0, color="k", lw=1)
        ax.set_yticks(ys, [f"{v.claim.claim_id.split('.', 1)[1]} ({_claimed(v)})" for v in comparative], fontsize=7)
        ax.invert_yaxis()
        ax.set(xlabel="DenseCL − MoCo-v2 (metric units): mean over paired seeds with its interval",
               title="comparative claims")
        handles = [Line2D([], [], color=c, marker="o", lw=2, label=s) for s, c in STATUS_COLOURS.items()]
        handles += [Patch(color="tab:blue", alpha=0.12, label="±MDE (80% power)"),
                    Line2D([], [], ls="none", marker="D", mfc="none", mec="k", label="paper's own difference"),
                    Line2D([], [], ls="none", marker="|", color="purple", ms=12, mew=2, label="equivalence margin")]
        ax.legend(handles=handles, fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    elif absolute:
        reported = [v.claim.value for v in absolute]
        measured = [v.measured for v in absolute]
        tol = [v.claim.tolerance or 0 for v in absolute]
        ax.errorbar(reported, measured, yerr=tol, fmt="o", capsize=3, label="measured (bar: ± tolerance)")
        lo, hi = min(reported + measured) - 2, max(reported + measured) + 2
        ax.plot([lo, hi], [lo, hi], "k--", lw=1, label="measured = reported")
        ax.set(xlabel="reported", ylabel="measured", title="measured vs reported (paper scale)")
        ax.legend()
    else:
        ax.text(0.5, 0.5, "no claim measured by these runs", ha="center", va="center")
        ax.set_axis_off()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def plot_lowshot(rows: list[Measurement], claims: list[Claim]):
    import matplotlib.pyplot as plt

    fig, (ours, ref) = plt.subplots(1, 2, figsize=(10, 4))
    for method in ("MoCo-v2", "DenseCL"):
        by_k = defaultdict(list)
        for m in rows:
            if m.protocol_id == "voc07_lowshot" and m.method == method:
                by_k[m.k].append(m.value)
        if by_k:
            ks = sorted(by_k)
            stats = [_mean_std(by_k[k]) for k in ks]
            ours.errorbar(ks, [s[0] for s in stats], yerr=[s[1] for s in stats], marker="o", capsize=3, label=method)
        reference = sorted((c.k, c.value) for c in claims if c.protocol_id == "voc07_lowshot" and c.kind == "absolute"
                           and c.method == method and c.source_key == "mmselfsup" and c.value is not None)
        if reference:
            ref.plot([k for k, _ in reference], [v for _, v in reference], marker="s", label=f"{method} (MMSelfSup)")
    scale = {m.scale for m in rows} or {"small"}
    ours.set(xscale="log", xlabel="k (positives per class)", ylabel="mAP (x100)",
             title=f"these runs ({'/'.join(sorted(scale))} scale; mean ± std over seeds)")
    ref.set(xscale="log", xlabel="k (positives per class)", ylabel="mAP (x100)",
            title="reported: ImageNet 200 ep, R50, VOC07")
    for ax in (ours, ref):
        ticks = sorted({int(x) for line in ax.get_lines() for x in line.get_xdata()})
        if ticks:
            ax.set_xticks(ticks, [str(k) for k in ticks])
            ax.minorticks_off()
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    return fig


def plot_layers(rows: list[Measurement]):
    import matplotlib.pyplot as plt

    svm = [m for m in rows if m.protocol_id == "voc07_svm"]
    layers = sorted({m.layer for m in svm})
    methods = sorted({m.method for m in svm})
    fig, ax = plt.subplots(figsize=(max(5, 1.6 * len(layers) + 3), 4))
    width = 0.8 / max(1, len(methods))
    for i, method in enumerate(methods):
        stats = [_mean_std([m.value for m in svm if m.method == method and m.layer == layer] or [math.nan])
                 for layer in layers]
        xs = [j + (i - (len(methods) - 1) / 2) * width for j in range(len(layers))]
        ax.bar(xs, [s[0] for s in stats], width, yerr=[s[1] for s in stats], capsize=3, label=method)
    ax.set_xticks(range(len(layers)), layers)
    ax.set(ylabel="VOC07 SVM mAP (x100)", title="SVM mAP per backbone stage (mean ± std over seeds)")
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    return fig


def plot_dense(rows: list[Measurement]):
    """One panel per dense task: the claimed metric, fine-tuned and frozen, mean ± std over seeds per method."""
    import matplotlib.pyplot as plt

    headline = {"det_voc_c4": "AP", "det_coco_mask_fpn": "bbox_AP", "seg_voc_fcn": "mIoU", "seg_cityscapes_fcn": "mIoU"}
    tasks = [t for t in headline if any(m.protocol_id.removesuffix("_frozen") == t for m in rows)]
    fig, axes = plt.subplots(1, max(1, len(tasks)), figsize=(4 * max(1, len(tasks)), 3.8), squeeze=False)
    for ax, task in zip(axes[0], tasks, strict=False):
        width = 0.38
        for i, method in enumerate(("MoCo-v2", "DenseCL")):
            stats = [_mean_std([m.value for m in rows if m.protocol_id == pid and m.metric == headline[task]
                                and m.method == method] or [math.nan]) for pid in (task, f"{task}_frozen")]
            xs = [j + (i - 0.5) * width for j in range(2)]
            ax.bar(xs, [s[0] for s in stats], width, yerr=[s[1] for s in stats], capsize=3, label=method)
        ax.set_xticks([0, 1], ["fine-tuned", "frozen"])
        ax.set(title=task, ylabel=headline[task])
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def plot_losses(records):
    """Pretraining loss per iteration, read from each checkpoint's log.jsonl (once per method and seed)."""
    import json

    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    seen = set()
    for record in records:
        pretraining = record.pretraining
        log = Path(str(pretraining.get("log") or ""))
        key = (pretraining.get("method"), pretraining.get("seed"))
        if key in seen or not log.is_file():
            continue
        seen.add(key)
        entries = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
        style = "-" if pretraining.get("method") == "densecl" else "--"
        ax.plot([e["step"] for e in entries], [e["loss"] for e in entries], style,
                label=f"{paper_name(str(key[0]))} seed {key[1]}")
    if seen:
        ax.set(xlabel="iteration", ylabel="training loss", title="pretraining loss")
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
        ax.grid(alpha=0.3)
        fig.tight_layout()
        return fig
    plt.close(fig)
    return None


# ---------------------------------------------------------------------------------------------- the report


def _claims_digest(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def build_report(selection: Selection, claims: list[Claim] | None = None, claims_path: Path = DEFAULT_PATH):
    """(ProtocolResult of the report, plots, files) for the selected runs."""
    claims = claims if claims is not None else load_claims(claims_path)
    rows, unmatched = measurements(selection.records)
    judged = judge_all(claims, rows)
    counts = defaultdict(int)
    for v in judged:
        counts[v.status] += 1
    result = ProtocolResult(
        protocol=REPORT_PROTOCOL, metrics={f"claims/{status}": float(counts[status]) for status in STATUSES},
        config={"selection": selection.label, "key": {**selection.key, "claims_sha256": _claims_digest(claims_path)},
                "runs": [r.run_id for r in selection.records], "batch": selection.key.get("batch")},
        dataset={}, details={"verdicts": [v.row() for v in judged if v.status in (*RESOLVED, "inconclusive")],
                             "unmatched": unmatched},
    )
    plots = {"verdicts": plot_verdicts(judged)}
    protocols = {m.protocol_id for m in rows}
    if "voc07_lowshot" in protocols:
        plots["lowshot"] = plot_lowshot(rows, claims)
    if "voc07_svm" in protocols:
        plots["layers"] = plot_layers(rows)
    if protocols & {"det_voc_c4", "det_coco_mask_fpn", "seg_voc_fcn", "seg_cityscapes_fcn", "det_voc_c4_frozen",
                    "seg_voc_fcn_frozen"}:
        plots["dense"] = plot_dense(rows)
    losses = plot_losses(selection.records)
    if losses is not None:
        plots["pretrain_loss"] = losses
    files = {"report.md": markdown(selection, judged, rows, unmatched), "verdicts.csv": verdict_csv(judged)}
    return result, plots, files


def _existing_report(store, selection: Selection, key: dict[str, Any], files: dict[str, str]) -> Path | None:
    """A stored report of the same runs and claims whose tables are identical: re-running adds no clutter."""
    for record in reversed(store.load_runs(selection.pipeline, REPORT_PROTOCOL)):
        if record.config.get("key") == key and all(
                (record.path / name).is_file() and (record.path / name).read_text() == text
                for name, text in files.items()):
            return record.path / "report.md"
    return None


def summary(report_text: str) -> str:
    """What a pipeline prints when it ends: the report's measured table and the claims it judged."""
    start = report_text.find(MEASURED_HEADING)
    if start < 0:
        return report_text.strip()
    end = report_text.find("\n## ", report_text.find(JUDGED_HEADING, start) + 1)
    return report_text[start:end if end >= 0 else None].split("\nWhy, claim by claim:")[0].strip()


def write_report(store, selection: Selection, claims_path: Path = DEFAULT_PATH) -> Path:
    """Store the report as its own run (`<pipeline>/<run-id>/report.md`, verdicts.csv, plots); returns report.md."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    result, plots, files = build_report(selection, claims_path=claims_path)
    try:
        existing = _existing_report(store, selection, result.config["key"], files)
        if existing is not None:
            LOG.info("the same report of the same runs is stored already: %s", existing)
            return existing
        record = store.write_run(selection.pipeline, result, plots=plots, extra_files=files)
    finally:
        for fig in plots.values():
            plt.close(fig)
    return record.path / "report.md"
