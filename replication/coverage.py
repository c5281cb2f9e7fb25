"""Which claims a run can judge: `densecl-bench claims coverage`.

Per claims protocol_id: how many claims there are, how many a small-scale run can judge (directional and
equivalence claims whose scope admits synthetic pretraining), how many a paper-scale run can judge (those,
plus transcribed numbers with a tolerance), and how many no code path reaches (no registered protocol
measures that protocol id and metric). The last column is 0 for every protocol the project implements; a
test holds it there.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

from replication.claims import Claim

COLUMNS = ("protocol_id", "claims", "small_scale", "paper_scale", "no_code_path", "neither")


@dataclass(frozen=True)
class Reach:
    measurable: bool  # some registered protocol measures this protocol id and metric
    small: bool  # a small-scale run can give a verdict on it
    paper: bool  # a paper-scale run can give a verdict on it


def base_metric(claim: Claim) -> str:
    """The metric a run measures for this claim: `delta_AP` -> `AP`; a ratio's `slowdown_pct` is itself."""
    return claim.metric.removeprefix("max_").removeprefix("delta_")


def is_summary(claim: Claim) -> bool:
    """A transcribed cell of several numbers, judged through the single-number rows it lists in derived_from."""
    return claim.value is None and claim.verified and bool(claim.derived_from) and claim.kind == "absolute"


def reach(claim: Claim, metrics_by_protocol: dict[str, tuple[str, ...]]) -> Reach:
    measurable = (claim.protocol_id in metrics_by_protocol
                  and base_metric(claim) in metrics_by_protocol[claim.protocol_id])
    if not measurable:
        return Reach(False, False, False)
    comparative = claim.kind in ("directional", "equivalence")
    small = comparative and claim.scale == "any" and not claim.pretrain_data
    numeric = claim.value is not None and (
        claim.tolerance is not None or (claim.kind == "ratio" and bool(claim.relation)))
    paper = comparative or (claim.kind in ("absolute", "delta", "ratio") and numeric)
    return Reach(True, small, paper)


def metrics_by_protocol() -> dict[str, tuple[str, ...]]:
    """claims protocol_id -> the metrics some registered protocol's readings carry for it."""
    from protocols.registry import all_protocols

    found: dict[str, set[str]] = defaultdict(set)
    for protocol in all_protocols():
        for pid in (protocol.name, *protocol.produces):
            found[pid].update(protocol.metrics)
    return {pid: tuple(sorted(metrics)) for pid, metrics in found.items()}


def coverage(claims: list[Claim]) -> list[dict[str, int | str]]:
    """One row per claims protocol_id (see the module docstring), in the registry's order of protocol ids."""
    measured = metrics_by_protocol()
    rows: dict[str, dict[str, int | str]] = {}
    for claim in claims:
        row = rows.setdefault(claim.protocol_id, {c: 0 for c in COLUMNS} | {"protocol_id": claim.protocol_id})
        row["claims"] += 1
        where = reach(claim, measured)
        implemented = claim.protocol_id in measured
        text_only = claim.kind in ("qualitative", "setting") or is_summary(claim) or not claim.verified
        if where.small:
            row["small_scale"] += 1
        if where.paper:
            row["paper_scale"] += 1
        if not where.measurable and not (implemented and text_only):
            row["no_code_path"] += 1
        elif not where.small and not where.paper:
            row["neither"] += 1
    return sorted(rows.values(), key=lambda r: (r["protocol_id"] not in measured, str(r["protocol_id"])))


def unreachable_in_implemented(claims: list[Claim]) -> list[Claim]:
    """Claims of an implemented protocol that no code path measures (must be empty)."""
    measured = metrics_by_protocol()
    return [c for c in claims if c.protocol_id in measured and not reach(c, measured).measurable
            and not (c.kind in ("qualitative", "setting") or is_summary(c) or not c.verified)]
