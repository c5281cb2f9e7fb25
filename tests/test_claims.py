"""The claims registry: the shipped file, its consistency, its validation errors and its commands."""

from __future__ import annotations

import csv
import dataclasses
import re
from pathlib import Path

import pytest

from replication import claims as registry
from replication.claims import ClaimsError, check_consistency, load_claims, missing
from replication.cli import main

REPO = Path(__file__).resolve().parents[1]
SHIPPED = REPO / "replication" / "claims.csv"
SOURCE = REPO.parent / "shared" / "paper" / "reported_numbers.csv"
ADDENDUM = REPO.parent / "shared" / "paper" / "reported_numbers_addendum.md"
SOURCE_ROWS = 237
NOT_FOUND_ROWS = 13  # 29 before the addendum filled 16 of them
FILLED_BY_ADDENDUM = 16

REQUIRED_DIRECTIONAL = (
    "dir.det_voc_c4.ap.densecl-vs-mocov2",
    "dir.det_coco_mask_fpn.bbox_ap.densecl-vs-mocov2",
    "dir.det_coco_mask_fpn.mask_ap.densecl-vs-mocov2",
    "dir.seg_voc_fcn.miou.densecl-vs-mocov2",
    "dir.seg_cityscapes_fcn.miou.densecl-vs-mocov2",
    "dir.voc07_svm.map.densecl-vs-mocov2.f5",
    *(f"dir.voc07_lowshot.map.densecl-vs-mocov2.f5.k{k}" for k in (1, 2, 4, 8, 16, 32, 64, 96)),
    *(f"dir.knn_in1k.top1.densecl-vs-mocov2.f5.k{k}" for k in (10, 20, 100, 200)),
    "dir.linear_in1k.top1.densecl-vs-mocov2.f5",
    "dir.pretrain_overhead.step_time.densecl-vs-mocov2",
)
VOC_DET_DELTA = "cvpr_abstract.det_voc_c4.delta_ap.densecl-vs-mocov2.coco800"
VOC_SEG_DELTA = "cvpr_abstract.seg_voc_fcn.delta_miou.densecl-vs-mocov2.coco800"


@pytest.fixture(scope="module")
def shipped() -> list[registry.Claim]:
    return load_claims(SHIPPED)


@pytest.fixture(scope="module")
def by_id(shipped) -> dict[str, registry.Claim]:
    return {c.claim_id: c for c in shipped}


def rewrite(tmp_path: Path, mutate) -> Path:
    """A copy of the shipped file with `mutate(rows)` applied to its parsed rows (rows[0] is the header)."""
    with SHIPPED.open(newline="", encoding="utf-8") as handle:
        rows = list(csv.reader(handle))
    mutate(rows)
    path = tmp_path / "claims.csv"
    with path.open("w", newline="", encoding="utf-8") as handle:
        csv.writer(handle, lineterminator="\n").writerows(rows)
    return path


def set_cell(rows: list[list[str]], index: int, column: str, value: str) -> None:
    rows[index][rows[0].index(column)] = value


# ---- the shipped registry ----------------------------------------------------------------------------------------

def test_shipped_registry_loads_and_is_consistent(shipped):
    assert check_consistency(shipped) == []


def test_default_path_is_the_shipped_file():
    assert [c.claim_id for c in load_claims()] == [c.claim_id for c in load_claims(SHIPPED)]


def addendum_rows(shipped) -> list[registry.Claim]:
    """The single-number rows the addendum's multi-number cells split into (they follow the source rows)."""
    parents = [c for c in shipped[:SOURCE_ROWS] if c.notes.startswith("Value from")]
    children = {i for c in parents for i in c.derived_from}
    return [c for c in shipped if c.claim_id in children]


def test_one_row_per_source_row_plus_split_and_comparative_claims(shipped):
    comparative = [c for c in shipped if c.kind in ("directional", "equivalence")]
    split = addendum_rows(shipped)
    assert shipped[SOURCE_ROWS:SOURCE_ROWS + len(split)] == split
    assert len(shipped) == SOURCE_ROWS + len(split) + len(comparative)
    assert {c.scale for c in shipped if c not in comparative} == {"paper"}
    assert {c.scale for c in comparative} == {"any"}
    assert all(c.value is not None and c.verification != "yes" for c in split)


def test_ids_are_unique_and_readable(shipped):
    ids = [c.claim_id for c in shipped]
    assert len(set(ids)) == len(ids)
    assert all(re.fullmatch(r"[a-z0-9_.+-]+", i) for i in ids)
    assert "readme.det_voc_c4.ap.densecl.coco800" in ids


@pytest.mark.skipif(not SOURCE.exists(), reason="shared/paper/reported_numbers.csv is not next to the repo")
def test_regenerating_gives_the_same_bytes():
    from replication.build_claims import build

    assert build(SOURCE) == SHIPPED.read_text(encoding="utf-8")


@pytest.mark.skipif(not SOURCE.exists(), reason="shared/paper/reported_numbers.csv is not next to the repo")
def test_values_equal_the_source_rows(shipped):
    with SOURCE.open(newline="", encoding="utf-8") as handle:
        source = list(csv.DictReader(handle))
    transcribed = shipped[:SOURCE_ROWS]
    assert [c.source for c in transcribed] == [r["source"] for r in source]
    for claim, row in zip(transcribed, source, strict=True):
        if claim.verification in ("yes", "no"):
            assert claim.value_text == row["value"], claim.claim_id
        else:  # an "NA" cell the addendum filled
            assert row["value"] == "NA" and claim.notes.startswith("Value from"), claim.claim_id
    assert sum(c.verification not in ("yes", "no") for c in transcribed) == FILLED_BY_ADDENDUM


def test_every_value_is_written_in_its_source_cell(shipped):
    for claim in shipped:
        if claim.value is not None:
            numbers = [float(n) for n in re.findall(r"\d+(?:\.\d+)?", claim.value_text)]
            assert numbers and claim.value == numbers[0], claim.claim_id


def test_not_transcribed_rows_are_reported_missing(shipped):
    absent = missing(shipped)
    assert all(c.value is None and not c.verified and c.value_text == "NA" for c in absent)
    assert sum(c.notes.startswith("NOT FOUND") for c in absent) == NOT_FOUND_ROWS
    assert {c.claim_id for c in shipped if c.value_text == "NA"} == {c.claim_id for c in absent}


def test_addendum_values_keep_their_grade_and_source(by_id):
    assert by_id["cvpr_paper.det_voc_c4.ap.densecl.coco800"].value == 56.7
    assert by_id["cvpr_paper.det_voc_c4.ap75.mocov2.in1k200"].value == 63.6
    assert by_id["cvpr_paper.det_voc_c4.ap.random"].verification == "screenshot"
    assert by_id["cvpr_paper.det_coco_mask_fpn.mask_ap.densecl.coco800"].value == 35.7
    assert by_id["cvpr_paper.det_coco_mask_fpn.bbox_ap.densecl.in1k200"].verification == "secondary (uncertain)"
    svm = by_id["cvpr_paper.voc07_svm.densecl.coco800"]
    assert svm.value_text == "82.9 / 82.6" and svm.derived_from == (
        "cvpr_paper.voc07_svm.map.densecl.coco800.f5", "cvpr_paper.voc07_svm.map.mocov2.coco800.f5")
    assert by_id["cvpr_paper.voc07_svm.map.mocov2.coco800.f5"].method == "MoCo-v2"
    assert by_id["cvpr_paper.pretrain_overhead.slowdown_pct.densecl-vs-mocov2.in1k200"].value == 0.6
    assert by_id["cvpr_paper.ablation_schedule.densecl.coco800"].verification == "figure-read ±0.1"
    assert "S in {1,3,5,7,9}" in by_id["cvpr_paper.ablation_grid.densecl.coco800"].protocol


def test_voc07_svm_scopes(by_id):
    """'DenseCL below MoCo-v2' holds for the ImageNet-200 pair only; across both pairs the claim is 'comparable'."""
    below = by_id["dir.voc07_svm.map.densecl-vs-mocov2.f5"]
    assert (below.pretrain_data, below.epochs) == ("in1k", 200)
    comparable = by_id["eq.voc07_svm.map.densecl-vs-mocov2.f5"]
    assert comparable.kind == "equivalence" and comparable.tolerance == 2.0 and not comparable.pretrain_data
    assert {"cvpr_paper.voc07_svm.map.densecl.coco800.f5", "mmselfsup.voc07_svm.map.mocov2.in1k200.f5"} <= set(
        comparable.derived_from)


def test_an_equivalence_claim_without_a_positive_margin_is_an_error(tmp_path):
    def zero_margin(rows):
        index = next(i for i, r in enumerate(rows) if r[0] == "eq.voc07_svm.map.densecl-vs-mocov2.f5")
        set_cell(rows, index, "tolerance", "0")

    with pytest.raises(ClaimsError, match="column 'tolerance': an equivalence claim needs its margin > 0"):
        load_claims(rewrite(tmp_path, zero_margin))


def test_abstract_deltas_equal_the_readme_rows(by_id):
    det, seg = by_id[VOC_DET_DELTA], by_id[VOC_SEG_DELTA]
    assert (det.value, seg.value) == (2.0, 3.0)
    assert [by_id[i].value for i in det.derived_from] == [56.7, 54.7]
    assert [by_id[i].value for i in seg.derived_from] == [67.5, 64.5]


@pytest.mark.parametrize("claim_id, wrong", [(VOC_DET_DELTA, 2.5), (VOC_SEG_DELTA, 2.0)])
def test_a_delta_that_disagrees_with_its_rows_is_a_problem(shipped, claim_id, wrong):
    altered = [dataclasses.replace(c, value=wrong) if c.claim_id == claim_id else c for c in shipped]
    problems = check_consistency(altered)
    assert problems[0].startswith(f"{claim_id}: delta") and all(claim_id in p for p in problems)


def test_directional_claims_cite_existing_rows_and_agree_with_them(by_id):
    for claim_id in REQUIRED_DIRECTIONAL:
        claim = by_id[claim_id]
        assert claim.kind == "directional" and claim.value is None and claim.baseline == "MoCo-v2"
        assert claim.derived_from and all(i in by_id for i in claim.derived_from)
        assert claim.notes
    assert by_id["dir.voc07_svm.map.densecl-vs-mocov2.f5"].comparator == "<"
    speed = by_id["dir.pretrain_overhead.step_time.densecl-vs-mocov2"]
    assert (speed.comparator, speed.factor) == ("<", 1.01)


def test_a_directional_claim_its_numbers_contradict_is_a_problem(shipped):
    flipped = [dataclasses.replace(c, relation=">") if c.claim_id == "dir.voc07_svm.map.densecl-vs-mocov2.f5" else c
               for c in shipped]
    problems = check_consistency(flipped)
    assert problems and all("dir.voc07_svm" in p and "82.5" in p for p in problems)


def test_a_directional_claim_citing_an_unknown_row_is_a_problem(shipped):
    target = "dir.seg_voc_fcn.miou.densecl-vs-mocov2"
    broken = [dataclasses.replace(c, derived_from=("no.such.claim",)) if c.claim_id == target else c for c in shipped]
    assert check_consistency(broken) == [f"{target}: derived_from names unknown claim(s) no.such.claim"]


def test_listed_trials_must_match_their_mean_and_std(shipped):
    moco = next(c for c in shipped if c.value_text == "67.5 +- 0.1")
    assert check_consistency([moco]) == []
    assert check_consistency([dataclasses.replace(moco, value_text="67.9 +- 0.1")])


def test_tolerances_come_from_reported_spread_then_defaults(shipped, by_id):
    voc = {c.metric: c for c in shipped
           if c.source_key == "moco_det_readme" and c.method == "MoCo-v2" and c.epochs == 200}
    assert {m: (c.tolerance, c.tolerance_basis) for m, c in voc.items()} == {
        "AP50": (0.4, "spread_2sigma"), "AP": (0.4, "spread_2sigma"), "AP75": (0.8, "spread_2sigma")}
    assert by_id["moco_readme.linear_in1k.top1.mocov2.in1k200.f5"].tolerance == 0.2
    assert by_id["mmselfsup.voc07_svm.map.densecl.in1k200.f5"].tolerance_basis == "default"
    assert set(registry.TOLERANCE_DEFAULTS) == set(registry.PROTOCOLS)
    assert all(c.tolerance is None or c.tolerance >= 0 for c in shipped)


def test_backbone_comes_from_the_method_when_the_protocol_text_disagrees(by_id):
    r101 = by_id["readme.det_voc_c4.ap.densecl.r101.in1k200"]
    assert r101.backbone == "R101" and "R50" in r101.protocol


# ---- validation errors -------------------------------------------------------------------------------------------

def test_bad_value_names_line_and_column(tmp_path):
    path = rewrite(tmp_path, lambda rows: set_cell(rows, 5, "value", "5x.3"))
    with pytest.raises(ClaimsError) as err:
        load_claims(path)
    message = str(err.value)
    assert f"{path}:6:" in message and "'value'" in message and "'5x.3'" in message and "\n" not in message


def test_duplicate_id_names_both_lines(tmp_path):
    def duplicate(rows):
        set_cell(rows, 9, "claim_id", rows[3][0])

    with pytest.raises(ClaimsError, match=r":10: column 'claim_id': duplicate id .* \(first on line 4\)"):
        load_claims(rewrite(tmp_path, duplicate))


def test_missing_column_is_named(tmp_path):
    def drop_tolerance(rows):
        index = rows[0].index("tolerance")
        for row in rows:
            del row[index]

    with pytest.raises(ClaimsError, match=r"claims\.csv:1: missing column\(s\) 'tolerance'$"):
        load_claims(rewrite(tmp_path, drop_tolerance))


@pytest.mark.parametrize("column, bad, expected", [
    ("protocol_id", "voc_svm", "unknown protocol id 'voc_svm'"),
    ("tolerance", "-0.4", "is negative"),
    ("epochs", "800ep", "is not a whole number"),
    ("kind", "guess", "is not one of"),
])
def test_other_bad_cells_name_their_column(tmp_path, column, bad, expected):
    path = rewrite(tmp_path, lambda rows: set_cell(rows, 12, column, bad))
    with pytest.raises(ClaimsError, match=rf":13: column '{column}': .*{re.escape(expected)}"):
        load_claims(path)


def test_short_row_and_missing_file_are_one_line_errors(tmp_path):
    with pytest.raises(ClaimsError, match=r":3: expected \d+ fields, found 3$"):
        load_claims(rewrite(tmp_path, lambda rows: rows.__setitem__(2, rows[2][:3])))
    with pytest.raises(ClaimsError, match="cannot read"):
        load_claims(tmp_path / "absent.csv")


# ---- commands ----------------------------------------------------------------------------------------------------

@pytest.fixture()
def run_claims(capsys):
    """`densecl-bench claims ARGV` through the real entry point, so errors take its one-line form."""
    def run(*argv: str) -> tuple[int, str, str]:
        code = main(["claims", *argv])
        out, err = capsys.readouterr()
        return code, out, err

    return run


def test_claims_list_filters(run_claims):
    code, out, _ = run_claims("list", "--protocol", "voc07_svm", "--method", "densecl")
    assert code == 0
    assert "mmselfsup.voc07_svm.map.densecl.in1k200.f5" in out and "openselfsup" not in out
    code, out, _ = run_claims("list", "--missing")
    assert code == 0 and f"\n{NOT_FOUND_ROWS + 1} of " in out


def test_claims_coverage_reaches_every_claim_of_an_implemented_protocol(run_claims, shipped):
    """The table's last column is 0 for each protocol the registry implements; the last line is for scripts."""
    from replication.coverage import coverage, metrics_by_protocol, unreachable_in_implemented

    assert unreachable_in_implemented(shipped) == []
    rows = {r["protocol_id"]: r for r in coverage(shipped)}
    for protocol_id in metrics_by_protocol():
        if protocol_id in rows:
            assert rows[protocol_id]["no_code_path"] == 0, protocol_id
    assert rows["knn_in1k"]["small_scale"] == 4 and rows["knn_in1k"]["paper_scale"] == 12
    assert rows["semisup_in1k_1pct"]["no_code_path"] == rows["semisup_in1k_1pct"]["claims"]
    code, out, _ = run_claims("coverage")
    total = sum(int(r["no_code_path"]) for r in rows.values())
    assert code == 0 and out.rstrip().splitlines()[-1] == f"unreachable claims: {total}"


def test_claims_list_rejects_an_unknown_protocol(run_claims):
    code, _, err = run_claims("list", "--protocol", "nope")
    assert code == 1 and len(err.strip().splitlines()) == 1 and "unknown protocol 'nope'" in err


def test_claims_missing_prints_the_untranscribed(run_claims):
    code, out, _ = run_claims("missing")
    assert code == 0 and "cvpr_paper.seg_cityscapes_fcn.miou.densecl.coco800" in out and "not transcribed" in out


def test_claims_check_passes_on_the_shipped_file_and_fails_on_a_broken_one(run_claims, tmp_path):
    code, out, _ = run_claims("check")
    assert code == 0 and "consistent" in out
    broken = rewrite(tmp_path, lambda rows: set_cell(rows, 1, "value", "2.5"))
    code, out, _ = run_claims("check", "--file", str(broken))
    assert code == 1 and f"problem: {VOC_DET_DELTA}" in out
    malformed = rewrite(tmp_path, lambda rows: set_cell(rows, 1, "value", "two"))
    code, _, err = run_claims("check", "--file", str(malformed))
    assert code == 1 and len(err.strip().splitlines()) == 1 and ":2: column 'value'" in err
