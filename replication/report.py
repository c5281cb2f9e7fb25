"""Verdicts: for every claim, what the stored runs of one pipeline batch say about it; plus plots.

A claim is judged only by runs whose protocol, dataset, method, backbone and scale match it
(DESIGN.md, "Verdicts"):
- `not transcribed`: the paper's number could not be read (empty value);
- `not run (why)`: no stored run measures it (another protocol, layer, k, checkpoint or seed count);
- `not comparable (scale)`: an absolute/delta claim at paper scale, and only small-scale runs;
- `reproduced` / `not reproduced`: small-scale runs against *directional* claims, over >= 3 seeds,
  by the 95% confidence interval of the per-seed paired difference (inside the claimed side:
  reproduced; wholly on the other side: not reproduced; straddling zero: not reproduced,
  inconclusive); paper-scale runs against absolute numbers within the claim's tolerance.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import math
import statistics
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from protocols.result import ProtocolResult
from replication.claims import Claim, load_claims

METHOD_NAMES = {"mocov2": "MoCo-v2", "densecl": "DenseCL"}
PRETRAIN_NAMES = {"imagenet": "in1k", "in1k": "in1k", "coco": "coco"}
BACKBONE_NAMES = {"resnet50": "R50", "resnet101": "R101", "resnet18": "R18"}
MIN_SEEDS = 3
STATUSES = ("reproduced", "not reproduced", "not comparable (scale)", "not run", "not transcribed")


@dataclass(frozen=True)
class Measurement:
    method: str  # paper naming: DenseCL, MoCo-v2
    seed: int
    scale: str  # small | paper
    pretrain_data: str
    epochs: int | None
    backbone: str
    protocol_id: str
    layer: str
    k: int | None
    value: float
    run_id: str
    metric: str = "mAP"


@dataclass
class Verdict:
    claim: Claim
    status: str
    reason: str = ""
    measured: float | None = None
    interval: tuple[float, float] | None = None
    n: int = 0

    def row(self) -> dict[str, Any]:
        c = self.claim
        return {
            "claim_id": c.claim_id, "status": self.status, "reason": self.reason, "kind": c.kind,
            "protocol_id": c.protocol_id, "method": c.method, "baseline": c.baseline, "relation": c.relation,
            "layer": c.layer, "k": "" if c.k is None else c.k, "reported": "" if c.value is None else c.value,
            "tolerance": "" if c.tolerance is None else c.tolerance,
            "measured": "" if self.measured is None else round(self.measured, 3),
            "ci95_low": "" if self.interval is None else round(self.interval[0], 3),
            "ci95_high": "" if self.interval is None else round(self.interval[1], 3),
            "n": self.n or "", "source": c.source_key,
        }


# Dense protocol names as stored -> the claims' protocol ids, and the metrics claims are made about.
DENSE_PROTOCOLS = {"det_voc_c4": "det_voc_c4", "det_coco_fpn": "det_coco_mask_fpn", "seg_voc_fcn": "seg_voc_fcn",
                   "seg_cityscapes_fcn": "seg_cityscapes_fcn"}
DENSE_METRICS = ("AP", "AP50", "AP75", "bbox_AP", "bbox_AP50", "bbox_AP75", "mask_AP", "mask_AP50", "mask_AP75", "mIoU")
# Our dense runs *are* MMSelfSup's mmdet/mmseg protocols, so paper-scale runs also answer their rows.
MM_REIMPLEMENTATIONS = {("det_voc_c4", "AP50"): "det_voc_c4_mmdet", ("seg_voc_fcn", "mIoU"): "seg_voc_fcn_mmseg"}
GAP_PROTOCOLS = {("det_voc_c4", "AP"), ("seg_voc_fcn", "mIoU")}  # frozen minus fine-tuned, per method and seed


def _dense_rows(record, common: dict[str, Any]) -> list[Measurement]:
    protocol_id = DENSE_PROTOCOLS[record.protocol]
    frozen = record.config.get("mode") == "frozen"
    rows = []
    for metric in DENSE_METRICS:
        value = record.metrics.get(metric)
        if value is None:
            continue
        rows.append(Measurement(protocol_id=protocol_id + ("_frozen" if frozen else ""), layer="", k=None,
                                value=value, metric=metric, **common))
        if not frozen and (protocol_id, metric) in MM_REIMPLEMENTATIONS:
            rows.append(Measurement(protocol_id=MM_REIMPLEMENTATIONS[(protocol_id, metric)], layer="", k=None,
                                    value=value, metric=metric, **common))
    return rows


def _gap_rows(rows: list[Measurement]) -> list[Measurement]:
    """Per (method, seed): frozen minus fine-tuned, for the journal's 'larger gains when frozen'."""
    index = {(m.protocol_id, m.metric, m.method, m.seed, m.scale): m for m in rows}
    gaps = []
    for (protocol_id, metric) in sorted(GAP_PROTOCOLS):
        for (pid, met, method, seed, scale), frozen in index.items():
            finetuned = index.get((protocol_id, metric, method, seed, scale))
            if pid == f"{protocol_id}_frozen" and met == metric and finetuned is not None:
                gaps.append(dataclasses.replace(frozen, protocol_id=f"{protocol_id}_frozen_minus_finetune",
                                                value=frozen.value - finetuned.value,
                                                run_id=f"{frozen.run_id}-{finetuned.run_id}"))
    return gaps


def measurements(records) -> list[Measurement]:
    """Flatten a batch's stored runs into one row per (method, seed, protocol, layer, k, metric) number."""
    rows = []
    for record in records:
        rep = record.config.get("replication", {})
        if not rep:
            continue
        common = dict(
            method=METHOD_NAMES.get(rep["method"], rep["method"]), seed=int(rep["seed"]), scale=rep["scale"],
            pretrain_data=PRETRAIN_NAMES.get(rep.get("pretrain_data", ""), rep.get("pretrain_data", "")),
            epochs=rep.get("pretrain_epochs"), backbone=BACKBONE_NAMES.get(rep.get("arch", ""), rep.get("arch", "")),
            run_id=record.run_id,
        )
        if record.protocol in DENSE_PROTOCOLS:
            rows.extend(_dense_rows(record, common))
            continue
        for name, value in record.metrics.items():
            parts = name.split("/")
            if parts[0] == "best" or value is None:
                continue
            if record.protocol in ("voc07_svm", "voc07_svm+lowshot") and len(parts) == 2 and parts[1] == "mAP":
                rows.append(Measurement(protocol_id="voc07_svm", layer=parts[0], k=None, value=value, **common))
            elif len(parts) == 3 and parts[1].startswith("k=") and parts[2] == "mean":
                rows.append(Measurement(protocol_id="voc07_lowshot", layer=parts[0], k=int(parts[1][2:]),
                                        value=value, **common))
    return rows + _gap_rows(rows)


def t_quantile_975(df: int) -> float:
    """Two-sided 95% Student-t quantile (scipy ships with scikit-learn)."""
    from scipy.stats import t

    return float(t.ppf(0.975, df))


def paired_interval(differences: list[float]) -> tuple[float, float, float]:
    """(mean, low, high) of the 95% t-interval of the mean difference."""
    mean = statistics.fmean(differences)
    half = t_quantile_975(len(differences) - 1) * statistics.stdev(differences) / math.sqrt(len(differences))
    return mean, mean - half, mean + half


def _holds(value: float, comparator: str) -> bool:
    return {"<": value < 0, "<=": value <= 0, ">": value > 0, ">=": value >= 0}[comparator]


def _select(rows: list[Measurement], claim: Claim, method: str) -> list[Measurement]:
    return [m for m in rows if m.protocol_id == claim.protocol_id and m.method == method
            and (not claim.layer or m.layer == claim.layer) and (claim.k is None or m.k == claim.k)
            and (not claim.metric or m.metric == claim.metric)]


def _missing_reason(rows: list[Measurement], claim: Claim) -> str:
    same = [m for m in rows if m.protocol_id == claim.protocol_id]
    if not same:
        return f"protocol {claim.protocol_id} is not part of this pipeline"
    if claim.layer and claim.layer not in {m.layer for m in same}:
        return f"layer {claim.layer} not evaluated (ran {', '.join(sorted({m.layer for m in same}))})"
    if claim.k is not None and claim.k not in {m.k for m in same}:
        ran = sorted({m.k for m in same if m.k is not None})
        return f"k={claim.k} not evaluated (ran k={ran}; the dataset has too few images per class)"
    return f"no {claim.method} run in this batch"


def judge_directional(claim: Claim, rows: list[Measurement]) -> Verdict:
    ours, theirs = _select(rows, claim, claim.method), _select(rows, claim, claim.baseline)
    if not ours or not theirs:
        return Verdict(claim, "not run", _missing_reason(rows, claim) if not ours else f"no {claim.baseline} run")
    by_seed = {m.seed: m.value for m in theirs}
    pairs = [(m.value, by_seed[m.seed]) for m in ours if m.seed in by_seed]
    comparator = claim.comparator
    if ours[0].scale == "paper":
        diff = ours[0].value - claim.factor * theirs[0].value
        status = "reproduced" if _holds(diff, comparator) else "not reproduced"
        return Verdict(claim, status, f"{claim.method} {ours[0].value:.2f} vs {claim.baseline} {theirs[0].value:.2f}",
                       measured=diff, n=1)
    if len(pairs) < MIN_SEEDS:
        return Verdict(claim, "not run", f"{len(pairs)} paired seed(s); a directional verdict needs {MIN_SEEDS}")
    differences = [a - claim.factor * b for a, b in pairs]
    mean, low, high = paired_interval(differences)
    if _holds(low, comparator) and _holds(high, comparator):
        status, why = "reproduced", "the whole 95% interval is on the claimed side"
    elif not _holds(low, comparator) and not _holds(high, comparator):
        status, why = "not reproduced", "the whole 95% interval is on the other side"
    else:
        status, why = "not reproduced", "inconclusive: the 95% interval straddles zero"
    reason = f"{claim.method} - {claim.baseline} = {mean:+.2f} (95% CI {low:+.2f} .. {high:+.2f}, {len(pairs)} seeds): {why}"
    return Verdict(claim, status, reason, measured=mean, interval=(low, high), n=len(pairs))


def judge_absolute(claim: Claim, rows: list[Measurement]) -> Verdict:
    candidates = [m for m in _select(rows, claim, claim.method) if m.scale == "paper"
                  and (not claim.pretrain_data or m.pretrain_data == claim.pretrain_data)
                  and (claim.epochs is None or m.epochs == claim.epochs)
                  and (not claim.backbone or m.backbone == claim.backbone)]
    if not candidates:
        if any(m.protocol_id == claim.protocol_id and m.scale == "small" for m in rows):
            return Verdict(claim, "not comparable (scale)", "small-scale runs are judged by directional claims only")
        same = [m for m in rows if m.protocol_id == claim.protocol_id]
        if same:
            return Verdict(claim, "not run", f"no {claim.method} {claim.backbone} {claim.pretrain_data} "
                           f"{claim.epochs or ''} checkpoint in this batch".replace("  ", " "))
        return Verdict(claim, "not run", _missing_reason(rows, claim))
    measured = statistics.fmean(m.value for m in candidates)
    tolerance = claim.tolerance if claim.tolerance is not None else 0.0
    gap = measured - claim.value
    status = "reproduced" if abs(gap) <= tolerance + claim.rounding else "not reproduced"
    return Verdict(claim, status, f"measured {measured:.2f} vs reported {claim.value} (±{tolerance}); gap {gap:+.2f}",
                   measured=measured, n=len(candidates))


def judge(claim: Claim, rows: list[Measurement]) -> Verdict:
    if claim.kind == "directional":
        return judge_directional(claim, rows)
    if claim.value is None:
        return Verdict(claim, "not transcribed", "the source's table could not be read; value missing")
    if claim.kind == "absolute":
        return judge_absolute(claim, rows)
    if claim.kind == "delta" and any(m.protocol_id == claim.protocol_id for m in rows):
        if all(m.scale == "small" for m in rows):
            return Verdict(claim, "not comparable (scale)", "a paper-scale difference; small runs are judged by direction")
    return Verdict(claim, "not run", _missing_reason(rows, claim) if claim.kind in ("absolute", "delta")
                   else f"a {claim.kind} claim: not a quantity this pipeline measures")


def verdicts(claims: list[Claim], rows: list[Measurement]) -> list[Verdict]:
    return [judge(claim, rows) for claim in claims]


# ---------------------------------------------------------------------------------------------- plots


def _mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.pstdev(values) if len(values) > 1 else 0.0)


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
             title=f"this batch ({'/'.join(sorted(scale))} scale; mean ± std over seeds)")
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
    fig, ax = plt.subplots(figsize=(6, 4))
    width = 0.38
    for i, method in enumerate(("MoCo-v2", "DenseCL")):
        stats = [_mean_std([m.value for m in svm if m.method == method and m.layer == layer] or [math.nan]) for layer in layers]
        xs = [j + (i - 0.5) * width for j in range(len(layers))]
        ax.bar(xs, [s[0] for s in stats], width, yerr=[s[1] for s in stats], capsize=3, label=method)
    ax.set_xticks(range(len(layers)), layers)
    ax.set(ylabel="VOC07 SVM mAP (x100)", title="SVM mAP per backbone stage (mean ± std over seeds)")
    ax.legend()
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    return fig


def plot_verdicts(judged: list[Verdict]):
    """Small scale: each directional claim's measured difference and 95% CI; paper scale: measured vs reported."""
    import matplotlib.pyplot as plt

    directional = [v for v in judged if v.claim.kind == "directional" and v.measured is not None]
    absolute = [v for v in judged if v.claim.kind == "absolute" and v.measured is not None]
    fig, ax = plt.subplots(figsize=(9, max(3, 0.4 * (len(directional) or len(absolute)) + 1.5)))
    if absolute:
        reported = [v.claim.value for v in absolute]
        measured = [v.measured for v in absolute]
        tol = [v.claim.tolerance or 0 for v in absolute]
        ax.errorbar(reported, measured, yerr=tol, fmt="o", capsize=3, label="measured (bar: ± tolerance)")
        lo, hi = min(reported + measured) - 2, max(reported + measured) + 2
        ax.plot([lo, hi], [lo, hi], "k--", lw=1, label="measured = reported")
        ax.set(xlabel="reported", ylabel="measured", title="measured vs reported (paper scale)")
        ax.legend()
    elif directional:
        names = [v.claim.claim_id.removeprefix("dir.") for v in directional]
        means = [v.measured for v in directional]
        errors = [[m - (v.interval or (m, m))[0] for m, v in zip(means, directional)],
                  [(v.interval or (m, m))[1] - m for m, v in zip(means, directional)]]
        colors = ["tab:green" if v.status == "reproduced" else "tab:red" for v in directional]
        ys = range(len(names))
        ax.errorbar(means, ys, xerr=errors, fmt="none", ecolor="gray", capsize=3)
        ax.scatter(means, ys, c=colors, zorder=3)
        ax.axvline(0, color="k", lw=1)
        ax.set_yticks(list(ys), [f"{n} ({v.claim.relation} 0)" for n, v in zip(names, directional)], fontsize=8)
        ax.set(xlabel="DenseCL − MoCo-v2, mean over seeds with 95% CI", title="directional claims (green: reproduced)")
    else:
        ax.text(0.5, 0.5, "no claim measured in this batch", ha="center", va="center")
        ax.set_axis_off()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def plot_losses(records):
    """Pretraining loss per iteration, read from each checkpoint's log.jsonl."""
    import json

    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    seen = set()
    for record in records:
        rep = record.config.get("replication", {})
        log = Path(rep.get("pretrain", {}).get("log", ""))
        key = (rep.get("method"), rep.get("seed"))
        if key in seen or not log.is_file():
            continue
        seen.add(key)
        steps, losses = [], []
        for line in log.read_text().splitlines():
            entry = json.loads(line)
            steps.append(entry["step"])
            losses.append(entry["loss"])
        style = "-" if rep.get("method") == "densecl" else "--"
        ax.plot(steps, losses, style, label=f"{METHOD_NAMES.get(rep.get('method'), rep.get('method'))} seed {rep.get('seed')}")
    if seen:
        ax.set(xlabel="iteration", ylabel="training loss", title="pretraining loss")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    else:
        ax.text(0.5, 0.5, "no pretraining logs (checkpoints were given)", ha="center", va="center")
        ax.set_axis_off()
    fig.tight_layout()
    return fig


# ---------------------------------------------------------------------------------------------- report


def verdict_csv(judged: list[Verdict]) -> str:
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=list(judged[0].row()))
    writer.writeheader()
    for v in judged:
        writer.writerow(v.row())
    return out.getvalue()


def _summary_table(rows: list[Measurement]) -> list[str]:
    groups = defaultdict(list)
    for m in rows:
        groups[(m.protocol_id, m.metric, m.layer, m.k, m.method)].append(m.value)
    lines = ["| protocol | metric | layer | k | method | mean | std | seeds |", "|---|---|---|---|---|---|---|---|"]
    for (protocol, metric, layer, k, method), values in sorted(groups.items(),
                                                               key=lambda kv: (*kv[0][:3], kv[0][3] or 0, kv[0][4])):
        mean, std = _mean_std(values)
        lines.append(f"| {protocol} | {metric} | {layer} | {'' if k is None else k} | {method} | {mean:.2f} | {std:.2f} "
                     f"| {len(values)} |")
    return lines


PIPELINE_PLOTS = {
    "replicate-voc": "`plots/lowshot.png` (low-shot mAP vs k, with the MMSelfSup reference curves), `plots/layers.png` "
                     "(SVM mAP per stage)",
    "replicate-dense": "`plots/dense.png` (each task and mode: mean ± std over seeds per method)",
}


def markdown(batch: str, judged: list[Verdict], rows: list[Measurement], records, pipeline: str = "replicate-voc") -> str:
    counts = defaultdict(int)
    for v in judged:
        counts[v.status] += 1
    scale = ", ".join(sorted({m.scale for m in rows})) or "none"
    measured = {m.protocol_id for m in rows}
    lines = [
        f"# {pipeline}: verdicts for batch {batch}",
        "",
        f"Scale: **{scale}**. Runs: {len(records)} stored protocol runs. Claims: {len(judged)} "
        f"(`replication/claims.csv`).",
        "",
        "How to read this: small-scale runs (synthetic data, resnet18) cannot be compared with the paper's "
        "absolute numbers, so they are judged only on *directional* claims (for example, DenseCL below MoCo-v2 "
        f"on the VOC07 SVM), from the per-seed paired difference over at least {MIN_SEEDS} seeds: `reproduced` when "
        "the whole 95% confidence interval lies on the claimed side, `not reproduced` otherwise (inconclusive "
        "when it straddles zero). Paper-scale runs (real data and real checkpoints) are judged against the "
        "absolute numbers within each claim's tolerance.",
        "",
        "| status | claims |", "|---|---|",
        *[f"| {status} | {counts[status]} |" for status in STATUSES if counts[status]],
        "",
        "## Measured (x100)",
        "",
        *_summary_table(rows),
        "",
        "## Claims this batch could judge",
        "",
        "| claim | status | why |", "|---|---|---|",
        *[f"| `{v.claim.claim_id}` | **{v.status}** | {v.reason} |" for v in judged
          if v.status in ("reproduced", "not reproduced")],
        "",
        "## Claims about the protocols this batch ran that it could not judge",
        "",
        "| claim | status | why |", "|---|---|---|",
        *[f"| `{v.claim.claim_id}` | {v.status} | {v.reason} |" for v in judged
          if v.status not in ("reproduced", "not reproduced") and v.claim.protocol_id in measured],
        "",
        "Every other claim is listed in `verdicts.csv` with its status and reason.",
        "",
        f"Plots: {PIPELINE_PLOTS.get(pipeline, '')}, `plots/verdicts.png` (directional differences with 95% "
        "intervals, or measured vs reported at paper scale), `plots/pretrain_loss.png`.",
    ]
    return "\n".join(lines) + "\n"


def plot_dense(rows: list[Measurement]):
    """One panel per dense task: the claimed metric, fine-tuned and frozen, mean ± std over seeds per method."""
    import matplotlib.pyplot as plt

    headline = {"det_voc_c4": "AP", "det_coco_mask_fpn": "bbox_AP", "seg_voc_fcn": "mIoU", "seg_cityscapes_fcn": "mIoU"}
    tasks = [t for t in headline if any(m.protocol_id.removesuffix("_frozen") == t for m in rows)]
    fig, axes = plt.subplots(1, max(1, len(tasks)), figsize=(4 * max(1, len(tasks)), 3.8), squeeze=False)
    for ax, task in zip(axes[0], tasks):
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
    if not tasks:
        axes[0][0].text(0.5, 0.5, "no dense runs in this batch", ha="center", va="center")
        axes[0][0].set_axis_off()
    fig.tight_layout()
    return fig


def build_report(store, pipeline: str, batch: str, claims: list[Claim] | None = None):
    """(ProtocolResult of the report, plots, files) for the runs of `batch`."""
    claims = claims if claims is not None else load_claims()
    records = [r for r in store.load_runs(pipeline) if r.config.get("replication", {}).get("batch") == batch]
    if not records:
        raise ValueError(f"no stored runs of {pipeline} batch {batch} in {store.root}")
    rows = measurements(records)
    judged = verdicts(claims, rows)
    counts = defaultdict(int)
    for v in judged:
        counts[v.status] += 1
    result = ProtocolResult(
        protocol="report", metrics={f"claims/{status}": float(counts[status]) for status in STATUSES},
        config={"batch": batch, "pipeline": pipeline, "runs": [r.run_id for r in records], "min_seeds": MIN_SEEDS},
        dataset={name: value for name, value in records[0].dataset.items() if name != "splits"},
        details={"verdicts": [v.row() for v in judged if v.status in ("reproduced", "not reproduced")]},
    )
    plots = {"verdicts": plot_verdicts(judged), "pretrain_loss": plot_losses(records)}
    if pipeline == "replicate-dense":
        plots["dense"] = plot_dense(rows)
    else:
        plots.update(lowshot=plot_lowshot(rows, claims), layers=plot_layers(rows))
    files = {"report.md": markdown(batch, judged, rows, records, pipeline), "verdicts.csv": verdict_csv(judged)}
    return result, plots, files


def write_report(store, pipeline: str, batch: str) -> Path:
    """Store the report as its own run (`<pipeline>/<run-id>/report.md`, verdicts.csv, plots); returns report.md."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    result, plots, files = build_report(store, pipeline, batch)
    try:
        record = store.write_run(pipeline, result, plots=plots, extra_files=files)
    finally:
        for fig in plots.values():
            plt.close(fig)
    return record.path / "report.md"
