"""The replicate-voc pipeline, its verdicts and the CI regression, run small on synthetic data."""

import json

import pytest
import yaml

from protocols.datasets import synthetic
from replication import regression
from replication.claims import load_claims
from replication.pipelines import ReplicateVOCConfig, replicate_voc
from replication.report import Measurement, judge, paired_interval
from replication.results import ResultsStore

CLAIMS = {c.claim_id: c for c in load_claims()}
SVM_DIR = CLAIMS["dir.voc07_svm.map.densecl-vs-mocov2.f5"]  # DenseCL < MoCo-v2
SVM_ABS = CLAIMS["mmselfsup.voc07_svm.map.densecl.in1k200.f5"]  # 82.5 +- 0.5


def rows(densecl, mocov2, scale="small", **kw):
    common = dict(scale=scale, pretrain_data=kw.get("pretrain_data", "synthetic-voc"), epochs=kw.get("epochs", 10),
                  backbone=kw.get("backbone", "R18"), protocol_id="voc07_svm", layer="feature5", k=None, run_id="r")
    return ([Measurement(method="DenseCL", seed=s, value=v, **common) for s, v in enumerate(densecl)]
            + [Measurement(method="MoCo-v2", seed=s, value=v, **common) for s, v in enumerate(mocov2)])


def test_directional_verdicts_follow_the_paired_interval():
    assert judge(SVM_DIR, rows([30, 31, 32], [33, 34.5, 35])).status == "reproduced"
    assert judge(SVM_DIR, rows([36, 37, 38], [33, 34, 35])).status == "not reproduced"
    inconclusive = judge(SVM_DIR, rows([30, 35, 31], [33, 32, 32]))
    assert inconclusive.status == "not reproduced" and "straddles zero" in inconclusive.reason
    assert judge(SVM_DIR, rows([30, 31], [33, 34])).status == "not run"  # two seeds are not enough


def test_paired_interval_matches_a_hand_computed_t_interval():
    mean, low, high = paired_interval([-1.0, -2.0, -3.0])
    assert mean == -2.0
    assert high - mean == pytest.approx(4.302652729911275 * 1.0 / 3**0.5)  # t(0.975, 2) * sd / sqrt(n)


def test_absolute_claims_need_a_matching_paper_scale_run():
    assert judge(SVM_ABS, rows([30, 31, 32], [33, 34, 35])).status == "not comparable (scale)"
    paper = dict(scale="paper", pretrain_data="in1k", epochs=200, backbone="R50")
    assert judge(SVM_ABS, rows([82.3], [84.0], **paper)).status == "reproduced"
    off = judge(SVM_ABS, rows([80.0], [84.0], **paper))
    assert off.status == "not reproduced" and "gap -2.50" in off.reason
    assert judge(SVM_ABS, rows([82.3], [84.0], **{**paper, "epochs": 800})).status == "not run"
    missing = next(c for c in CLAIMS.values() if c.value is None and c.kind == "absolute")
    assert judge(missing, []).status == "not transcribed"


@pytest.fixture(scope="module")
def svm_voc(tmp_path_factory):
    return synthetic.generate(tmp_path_factory.mktemp("rvoc") / "VOC2007", images=160, size=64, seed=0, progress=False)


@pytest.fixture(scope="module")
def tiny_preset(tmp_path_factory):
    path = tmp_path_factory.mktemp("preset") / "tiny.yaml"
    path.write_text(yaml.safe_dump(dict(arch="resnet18", image_size=32, epochs=1, batch_size=8, lr=0.03, queue_size=16,
                                        epoch_order="halves", workers=0, save_every=1, log_every=2)))
    return str(path)


@pytest.mark.slow
def test_small_scale_pipeline_stores_runs_and_a_report_and_resumes(svm_voc, pretrain_images, tiny_preset, tmp_path,
                                                                     capsys):
    cfg = ReplicateVOCConfig(preset=tiny_preset, pretrain_images=str(pretrain_images), voc_root="",
                             costs=(1.0, 0.01), ks=(1, 2), samples=2, workers=0, device="cpu",
                             runs=str(tmp_path / "runs"), results=str(tmp_path / "results"), progress=False)
    # The synthetic eval set of the real pipeline is large; point the small pipeline at the 160-image one.
    import replication.pipelines as pipelines
    original = pipelines.default_voc_root
    pipelines.default_voc_root = lambda progress=True: svm_voc
    try:
        outcome = replicate_voc(cfg)
        assert len(outcome["runs"]) == 12  # 2 methods x 3 seeds x (SVM, low-shot)
        report = outcome["report"].read_text()
        assert "dir.voc07_svm.map.densecl-vs-mocov2.f5" in report and "3 seeds" in report
        verdicts = (outcome["report"].parent / "verdicts.csv").read_text()
        assert verdicts.count("\n") == len(CLAIMS) + 1
        for name in ("lowshot", "layers", "verdicts", "pretrain_loss"):
            assert (outcome["report"].parent / "plots" / f"{name}.png").stat().st_size > 1000
        store = ResultsStore(tmp_path / "results", read_only=True)
        records = [r for r in store.load_runs("replicate-voc") if r.protocol != "report"]
        assert {(r.config["replication"]["method"], r.config["replication"]["seed"]) for r in records} == {
            (m, s) for m in ("mocov2", "densecl") for s in (0, 1, 2)}
        assert all(r.config["replication"]["scale"] == "small" for r in records)

        capsys.readouterr()
        again = replicate_voc(cfg)  # the same config resumes the batch: nothing is re-evaluated
        assert again["batch"] == outcome["batch"]
        assert capsys.readouterr().err.count("already stored") == 12
        assert len([r for r in store.load_runs("replicate-voc") if r.protocol != "report"]) == 12
    finally:
        pipelines.default_voc_root = original


@pytest.mark.slow
def test_paper_scale_mode_judges_given_checkpoints_against_absolute_numbers(svm_voc, pretrain_images, tmp_path):
    """The real-data path, on the synthetic data laid out as VOC2007 with two small checkpoints."""
    from conftest import tiny_config

    from baselines.train import pretrain

    checkpoints = {m: str(pretrain(tiny_config(pretrain_images, tmp_path / m, method=m, epochs=1, progress=False)))
                   for m in ("mocov2", "densecl")}
    cfg = ReplicateVOCConfig(voc_root=str(svm_voc), checkpoints=checkpoints, pretrain_data="imagenet",
                             pretrain_epochs=200, costs=(1.0, 0.01), ks=(1, 2), samples=2, workers=0, device="cpu",
                             runs=str(tmp_path / "runs"), results=str(tmp_path / "results"), progress=False)
    assert cfg.scale == "paper"
    outcome = replicate_voc(cfg)
    table = {line.split(",")[0]: line.split(",")[1] for line in
             (outcome["report"].parent / "verdicts.csv").read_text().splitlines()[1:]}
    # resnet18 checkpoints do not match the claims' R50 rows: judged "not run", never silently compared.
    assert table["mmselfsup.voc07_svm.map.densecl.in1k200.f5"] == "not run"
    assert table["dir.voc07_svm.map.densecl-vs-mocov2.f5"] in ("reproduced", "not reproduced")


def test_pipeline_bad_input(tmp_path):
    with pytest.raises(FileNotFoundError, match="checkpoint for densecl not found"):
        ReplicateVOCConfig(checkpoints={"densecl": "/nope.pth", "mocov2": "/nope2.pth"}).validate()
    with pytest.raises(ValueError, match="give a checkpoint for each"):
        ReplicateVOCConfig(checkpoints={"densecl": __file__}).validate()
    with pytest.raises(FileNotFoundError, match="not a VOC2007 root"):
        ReplicateVOCConfig(voc_root=str(tmp_path)).validate()


def test_regression_compare_flags_metrics_out_of_band():
    reference = {"metrics": {"densecl/feature5/mAP": 30.0, "densecl/final_loss": 5.0}}
    checks = regression.compare(reference, {"densecl/feature5/mAP": 31.5, "densecl/final_loss": 5.2})
    assert [c.ok for c in checks] == [True, False]
    assert not regression.compare(reference, {})[0].ok  # a missing metric fails


def test_committed_reference_is_well_formed():
    from conftest import REPO

    reference = json.loads((REPO / "results" / "reference" / "regression.json").read_text())
    assert reference["produced_by"] == "densecl-bench regression --update"
    assert {"mocov2/final_loss", "densecl/final_loss", "densecl/feature5/mAP"} <= set(reference["metrics"])
    assert all(reference["bands"][m] > 0 for m in reference["metrics"])


def test_unwritable_results_folder_is_a_one_line_error(tmp_path, capsys):
    from replication.cli import main

    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    code = main(["eval", "voc-svm", "--checkpoint", "random", "--arch", "resnet18", "--results", str(blocker / "results"),
                 "--device", "cpu"])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert code == 1 and "error:" in err and str(blocker) in err


def test_dense_runs_answer_finetuned_frozen_and_gap_claims():
    """Frozen runs count only for the frozen claims; frozen minus fine-tuned per seed answers the gap claim."""
    import dataclasses

    from replication.report import _gap_rows

    def dense(protocol_id, metric, densecl, mocov2):
        return [dataclasses.replace(m, protocol_id=protocol_id, layer="", metric=metric) for m in rows(densecl, mocov2)]

    finetuned = dense("det_voc_c4", "AP", [20, 21, 22], [19, 20.5, 21])
    frozen = dense("det_voc_c4_frozen", "AP", [15, 16.5, 17], [10, 11, 12])
    measured = finetuned + frozen + dense("det_voc_c4", "AP50", [1, 1, 1], [90, 90, 90])
    measured += _gap_rows(measured)
    assert judge(CLAIMS["dir.det_voc_c4.ap.densecl-vs-mocov2"], measured).status == "reproduced"  # AP50 not mixed in
    assert judge(CLAIMS["dir.det_voc_c4_frozen.ap.densecl-vs-mocov2"], measured).status == "reproduced"
    gap = judge(CLAIMS["dir.det_voc_c4_frozen_minus_finetune.ap.densecl-vs-mocov2"], measured)
    assert gap.status == "reproduced" and gap.measured == pytest.approx(((-5 + 9) + (-4.5 + 9.5) + (-5 + 9)) / 3)
    assert judge(CLAIMS["dir.seg_voc_fcn_frozen.miou.densecl-vs-mocov2"], measured).status == "not run"
