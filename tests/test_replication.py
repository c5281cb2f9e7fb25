"""The replicate-voc pipeline, its verdicts and the CI regression, run small on synthetic data."""

import json

import pytest
import yaml

from protocols.datasets import synthetic
from replication import regression
from replication.claims import load_claims
from replication.pipelines import ReplicateVOCConfig, replicate_voc
from replication.report import summary
from replication.results import ResultsStore
from replication.verdicts import Measurement, judge

CLAIMS = {c.claim_id: c for c in load_claims()}


def rows(densecl, mocov2, scale="small", **kw):
    common = dict(scale=scale, pretrain_data=kw.get("pretrain_data", "synthetic-voc"), epochs=kw.get("epochs", 10),
                  backbone=kw.get("backbone", "R18"), protocol_id="voc07_svm", layer="feature5", k=None, run_id="r")
    return ([Measurement(method="DenseCL", seed=s, value=v, **common) for s, v in enumerate(densecl)]
            + [Measurement(method="MoCo-v2", seed=s, value=v, **common) for s, v in enumerate(mocov2)])


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
@pytest.mark.timeout(2400)  # 6 pretrainings and 27 protocol runs: ~2 min idle, up to ~6 min on 2 busy cores
def test_small_scale_pipeline_stores_runs_and_a_report_and_resumes(svm_voc, pretrain_images, tiny_preset, tmp_path,
                                                                     bench_log):
    cfg = ReplicateVOCConfig(preset=tiny_preset, pretrain_images=str(pretrain_images), voc_root="",
                             costs=(1.0, 0.01), ks=(1, 2), samples=2, workers=0, device="cpu", probe_input_size=64,
                             runs=str(tmp_path / "runs"), results=str(tmp_path / "results"), progress=False)
    # The synthetic eval set of the real pipeline is large; point the small pipeline at the 160-image one.
    import replication.pipelines as pipelines
    original = pipelines.default_voc_root
    pipelines.default_voc_root = lambda progress=True: svm_voc
    try:
        outcome = replicate_voc(cfg)
        assert len(outcome["runs"]) == 27  # (2 methods + random init) x 3 seeds x (SVM, low-shot, dense probe)
        report = outcome["report"].read_text()
        printed = summary(report)  # what the CLI prints at the end
        assert printed.startswith("## Measured") and "## Claims these runs could judge" in printed
        assert "eq.voc07_svm.map.densecl-vs-mocov2.f5" in report and "3 paired seeds" in report
        assert "dir.voc07_lowshot.map.densecl-vs-mocov2.f5.k1" in report and "MDE (80% power)" in report
        verdicts = (outcome["report"].parent / "verdicts.csv").read_text()
        assert verdicts.count("\n") == len(CLAIMS) + 1
        for name in ("lowshot", "layers", "verdicts", "pretrain_loss"):
            assert (outcome["report"].parent / "plots" / f"{name}.png").stat().st_size > 1000
        store = ResultsStore(tmp_path / "results", read_only=True)
        records = [r for r in store.load_runs("replicate-voc") if r.protocol != "report"]
        assert {(r.pretraining["method"], r.pretraining["seed"]) for r in records} == {
            (m, s) for m in ("mocov2", "densecl", "random") for s in (0, 1, 2)}
        assert all(r.scale == "small" for r in records)
        assert {r.pretraining["pretrain_data"] for r in records if r.pretraining["method"] != "random"} == {
            "synthetic-voc"}
        assert "## Did pretraining learn?" in report and "random init" in report
        assert "dir.seg_voc_dense_probe.miou.densecl-vs-mocov2.f5" in report

        bench_log.clear()
        again = replicate_voc(cfg)  # the same config resumes the batch: nothing is re-evaluated
        assert again["batch"] == outcome["batch"]
        assert bench_log.text.count("already stored") == 27
        assert again["report"] == outcome["report"]  # the same runs at the same commit: the stored report is reused
        assert len([r for r in store.load_runs("replicate-voc") if r.protocol != "report"]) == 27
    finally:
        pipelines.default_voc_root = original


@pytest.mark.slow
def test_paper_scale_mode_judges_given_checkpoints_against_absolute_numbers(svm_voc, pretrain_images, tmp_path):
    """The real-data path, on the synthetic data laid out as VOC2007 with two small checkpoints."""
    import shutil

    import torch
    from conftest import tiny_config

    from baselines.train import pretrain

    real = tmp_path / "VOC2007"  # the synthetic scenes without the generator's marker: "real" data to the code
    shutil.copytree(svm_voc, real)
    (real / "dataset.json").unlink()
    checkpoints = {}
    for method in ("mocov2", "densecl"):  # foreign files: a bare torchvision state dict says nothing about itself
        exported = pretrain(tiny_config(pretrain_images, tmp_path / method, method=method, epochs=1, progress=False))
        checkpoints[method] = str(tmp_path / f"{method}.pth")
        torch.save(torch.load(exported, weights_only=True)["state_dict"], checkpoints[method])
    cfg = ReplicateVOCConfig(voc_root=str(real), checkpoints=checkpoints, pretrain_data="imagenet",
                             pretrain_epochs=200, costs=(1.0, 0.01), ks=(1, 2), samples=2, workers=0, device="cpu",
                             runs=str(tmp_path / "runs"), results=str(tmp_path / "results"), progress=False)
    assert cfg.scale == "paper"
    outcome = replicate_voc(cfg)
    table = {line.split(",")[0]: line.split(",")[1] for line in
             (outcome["report"].parent / "verdicts.csv").read_text().splitlines()[1:]}
    # resnet18 checkpoints do not match the claims' R50 rows: judged "not run", never silently compared.
    assert table["mmselfsup.voc07_svm.map.densecl.in1k200.f5"] == "not run"
    # One checkpoint per method at paper scale: the difference is judged against the SVM's noise band.
    assert table["dir.voc07_svm.map.densecl-vs-mocov2.f5"] in ("reproduced", "contradicted", "inconclusive")
    records = [r for r in ResultsStore(tmp_path / "results", read_only=True).load_runs("replicate-voc")
               if r.protocol != "report"]
    assert {r.scale for r in records} == {"paper"} and {r.pretraining["pretrain_data"] for r in records} == {"in1k"}


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
    code = main(["eval", "voc-svm", "--checkpoint", "random", "--arch", "resnet18",
                 "--results", str(blocker / "results"),
                 "--device", "cpu"])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert code == 1 and "error:" in err and str(blocker) in err


def test_dense_runs_answer_finetuned_frozen_and_gap_claims():
    """Frozen runs count only for the frozen claims; frozen minus fine-tuned per seed answers the gap claim."""
    import dataclasses

    from protocols.transfer import frozen_gap_rows

    def dense(protocol_id, metric, densecl, mocov2):
        return [dataclasses.replace(m, protocol_id=protocol_id, layer="", metric=metric) for m in rows(densecl, mocov2)]

    finetuned = dense("det_voc_c4", "AP", [20, 21, 22], [19, 20.5, 21])
    frozen = dense("det_voc_c4_frozen", "AP", [15, 16.5, 17], [10, 11, 12])
    measured = finetuned + frozen + dense("det_voc_c4", "AP50", [1, 1, 1], [90, 90, 90])
    measured += frozen_gap_rows(measured, "det_voc_c4", "AP")
    assert judge(CLAIMS["dir.det_voc_c4.ap.densecl-vs-mocov2"], measured).status == "reproduced"  # AP50 not mixed in
    assert judge(CLAIMS["dir.det_voc_c4_frozen.ap.densecl-vs-mocov2"], measured).status == "reproduced"
    gap = judge(CLAIMS["dir.det_voc_c4_frozen_minus_finetune.ap.densecl-vs-mocov2"], measured)
    assert gap.status == "reproduced" and gap.measured == pytest.approx(((-5 + 9) + (-4.5 + 9.5) + (-5 + 9)) / 3)
    assert judge(CLAIMS["dir.seg_voc_fcn_frozen.miou.densecl-vs-mocov2"], measured).status == "not run"
