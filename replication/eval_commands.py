"""`densecl-bench eval <protocol>`: load any checkpoint, run one protocol, print a table, write JSON.

Each command is a thin layer over `protocols.<name>.run`; the JSON it writes is the
`ProtocolResult` (metrics, resolved config, checkpoint sha256 and detected format, dataset summary,
timings) plus the command line, git state and package versions, stored by `replication.results`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def _floats(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def _ints(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def _layers(text: str) -> tuple[str, ...]:
    from baselines.backbone import FEATURE_NAMES

    if text == "all":
        return FEATURE_NAMES
    layers = tuple(v.strip() for v in text.split(",") if v.strip())
    unknown = [layer for layer in layers if layer not in FEATURE_NAMES]
    if unknown or not layers:
        raise argparse.ArgumentTypeError(f"unknown layer(s) {unknown or text!r}: use feature1..feature5 or 'all'")
    return layers


def _common_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True,
                        help="checkpoint in any supported layout (ours, official DenseCL/OpenSelfSup, MMSelfSup, "
                        "MoCo, torchvision/timm, detectron2 .pkl), or 'random' for a random-init baseline")
    parser.add_argument("--arch", help="backbone architecture (default: from the checkpoint; resnet50 for 'random')")
    parser.add_argument("--data", help="dataset root (default: the synthetic VOC-layout dataset, generated on demand)")
    parser.add_argument("--device", default="auto", help="auto (default), cpu, cuda or cuda:N")
    parser.add_argument("--batch-size", type=int, default=32, help="images per feature-extraction batch (default: 32)")
    parser.add_argument("--workers", type=int, default=2, help="data-loading processes (default: 2)")
    parser.add_argument("--seed", type=int, default=0, help="seeds samplers, solvers and the random-init baseline (default: 0)")
    parser.add_argument("--cache-dir", help="feature cache (default: $DENSECL_BENCH_CACHE/features)")
    parser.add_argument("--results", default="results",
                        help="results store: the run goes to RESULTS/eval/<run-id>/ and a row to RESULTS/index.csv "
                        "(default: results)")
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")


def _data_root(args: argparse.Namespace) -> Path:
    from protocols.common import default_voc_root

    if args.data:
        root = Path(args.data)
        if not root.is_dir():
            raise FileNotFoundError(f"data folder {root} does not exist")
        return root
    root = default_voc_root(progress=args.progress)
    print(f"[eval] no --data given: using the synthetic VOC-layout dataset in {root}", file=sys.stderr)
    return root


def _subject(args: argparse.Namespace):
    from protocols.common import backbone_under_test, resolve_device

    subject = backbone_under_test(args.checkpoint, args.arch, args.seed, resolve_device(args.device))
    print(f"[eval] checkpoint {args.checkpoint}: {subject.info['format']}, {subject.backbone.name}", file=sys.stderr)
    return subject


def _store(args: argparse.Namespace):
    """The results store, checked writable before any work starts (nothing computed is lost)."""
    from replication.results import ResultsStore

    args.store = ResultsStore(args.results)
    return args.store


def write_result(result, args: argparse.Namespace) -> Path:
    """Store the run as results/eval/<run-id>/ (result.json, metrics.csv) and index it."""
    record = args.store.write_run("eval", result, seed=args.seed, command=["densecl-bench", *args.argv])
    return record.path / "result.json"


def _print_svm_table(result) -> None:
    details = result.details
    if details["svm"]:
        print(f"VOC07 SVM mAP (x100; {result.dataset['name']}, {result.dataset['splits']})")
        for layer, r in details["svm"].items():
            mark = "  <- best" if layer == details["best_layer"] else ""
            print(f"  {layer:9s} {r['mAP']:6.2f}{mark}")
    for layer, r in details["low_shot"].items():
        print(f"VOC07 low-shot SVM, {layer} (x100 over {r['config']['samples']} samples; cost chosen on test, as the reference)")
        print(f"  {'k':>3s} {'mean':>7s} {'min':>7s} {'max':>7s} {'std':>6s}")
        for row in r["per_k"]:
            print(f"  {row['k']:3d} {row['mean']:7.2f} {row['min']:7.2f} {row['max']:7.2f} {row['std']:6.2f}")


def cmd_voc(args: argparse.Namespace, full: bool) -> int:
    from protocols import voc_svm

    _store(args)
    subject = _subject(args)
    root = _data_root(args)
    cfg = voc_svm.VOCEvalConfig(layers=args.layers, batch_size=args.batch_size, workers=args.workers,
                                device=args.device, cache_dir=args.cache_dir)
    svm = low_shot = None
    if full:
        svm = voc_svm.SVMConfig(costs=args.costs, seed=args.seed, workers=args.svm_workers)
    else:
        low_shot = voc_svm.LowShotConfig(ks=args.ks, samples=args.samples, costs=args.costs, seed=args.seed,
                                         sample_dir=args.sample_dir, workers=args.svm_workers)
    result = voc_svm.run(subject, root, cfg, svm=svm, low_shot=low_shot, progress=args.progress)
    _print_svm_table(result)
    print(f"result: {write_result(result, args)}")
    return 0


def _print_metrics(title: str, metrics: dict[str, float]) -> None:
    print(title)
    for name, value in metrics.items():
        print(f"  {name:22s} {value:7.2f}")


def cmd_knn(args: argparse.Namespace) -> int:
    from protocols import knn
    from protocols.common import resolve_device

    _store(args)
    subject = _subject(args)
    root = _data_root(args)
    cfg = knn.KNNConfig(ks=args.ks, temperature=args.temperature, train_split=args.train_split,
                        test_split=args.test_split, batch_size=args.batch_size, workers=args.workers,
                        device=str(resolve_device(args.device)), cache_dir=args.cache_dir, progress=args.progress)
    result = knn.run(subject.backbone, cfg, root, checkpoint=subject.info)
    _print_metrics(f"weighted k-NN (T={args.temperature}; {result.dataset['splits']})", result.metrics)
    print(f"result: {write_result(result, args)}")
    return 0


def cmd_linear(args: argparse.Namespace) -> int:
    from protocols import linear
    from protocols.common import resolve_device

    _store(args)
    subject = _subject(args)
    root = _data_root(args)
    cfg = linear.LinearConfig(
        variant=args.variant, epochs=args.epochs, batch_size=args.linear_batch_size, lr=args.lr,
        scale_lr=args.scale_lr, image_size=args.image_size, layers=args.layers, train_split=args.train_split,
        test_split=args.test_split, seed=args.seed, workers=args.workers, device=str(resolve_device(args.device)),
        eval_every=args.eval_every, progress=args.progress,
    )
    result = linear.run(subject.backbone, cfg, root, checkpoint=subject.info, out=args.state_dir)
    _print_metrics(f"linear probe ({args.variant}; {result.config.get('epochs')} epochs)", result.metrics)
    print(f"result: {write_result(result, args)}")
    return 0


def add_eval_commands(commands) -> None:
    from protocols import voc_svm

    evaluate = commands.add_parser("eval", help="evaluate any checkpoint under one of the paper's protocols")
    protocols = evaluate.add_subparsers(dest="protocol", required=True, metavar="PROTOCOL")
    costs_help = "SVM costs C (default: the reference's 19: 1,10,100 and 0.5^4..0.5^19)"

    svm = protocols.add_parser(
        "voc-svm", help="VOC07 linear SVM per layer, cost by 3-fold CV (spec §1.4-1.5)",
        description="VOC07 SVM: features (short side 256, squashed to 224x224, per-layer AvgPool) of "
        "trainval and test, one LinearSVC per (class, cost), cost chosen by 3-fold CV, test AP "
        "(all-point interpolated, difficult dropped), mAP x100 per layer and the best layer.",
    )
    _common_arguments(svm)
    svm.add_argument("--layers", type=_layers, default=("feature5",), help="comma list of feature1..feature5, or 'all' (default: feature5, as the DenseCL scripts)")
    svm.add_argument("--costs", type=_floats, default=voc_svm.DEFAULT_COSTS, help=costs_help)
    svm.add_argument("--svm-workers", type=int, help="parallel SVM fits (default: every core)")
    svm.set_defaults(func=lambda a: cmd_voc(a, full=True))

    low = protocols.add_parser(
        "voc-lowshot", help="VOC07 low-shot SVM, k positives per class (spec §1.7)",
        description="VOC07 low-shot SVM: for each k, 5 samples of k positives and 19k negatives per class "
        "(seeded, or FAIR's sample files via --sample-dir), no CV; the cost is chosen on the test set as "
        "the reference does. Reports mean/min/max/std over samples. ks the data cannot supply are dropped "
        "with a warning.",
    )
    _common_arguments(low)
    low.add_argument("--layers", type=_layers, default=("feature5",), help="comma list of feature1..feature5, or 'all' (default: feature5, as the DenseCL scripts)")
    low.add_argument("--costs", type=_floats, default=voc_svm.DEFAULT_COSTS, help=costs_help)
    low.add_argument("--ks", type=_ints, default=voc_svm.LOW_SHOT_KS, help="positives per class (default: 1,2,4,8,16,32,64,96)")
    low.add_argument("--samples", type=int, default=5, help="independent samples per k (default: 5)")
    low.add_argument("--sample-dir", help="folder of FAIR-format train_targets_sample{s}_k{k}.npy files")
    low.add_argument("--svm-workers", type=int, help="parallel SVM fits (default: every core)")
    low.set_defaults(func=lambda a: cmd_voc(a, full=False))

    nn = protocols.add_parser(
        "knn", help="weighted k-NN on global-average-pooled res5 features via FAISS (spec §3)",
        description="Weighted k-NN: L2-normalised GAP features of the last stage (Resize 256, CenterCrop 224), "
        "FAISS inner-product search over the train split, votes sum exp(s/T) (computed without overflow), "
        "top-1/top-5 on the val split. Data: an ImageNet-style folder (train/<class>/*, val/<class>/*), "
        "meta/{train,val}_labeled.txt list files, or a VOC root (each image labelled by its largest object).",
    )
    _common_arguments(nn)
    nn.add_argument("--ks", type=_ints, default=(10, 20, 100, 200), help="neighbour counts (default: 10,20,100,200)")
    nn.add_argument("--temperature", type=float, default=0.07, help="T of the vote (default: 0.07)")
    nn.add_argument("--train-split", help="bank split (default: train, or trainval on a VOC root)")
    nn.add_argument("--test-split", help="query split (default: val, or test on a VOC root)")
    nn.set_defaults(func=cmd_knn, batch_size=256)

    lin = protocols.add_parser(
        "linear", help="linear probe on the frozen backbone, one head per stage (spec §2)",
        description="Linear probe: frozen backbone in eval mode. mhead (§2.1): per stage AvgPool -> BN without "
        "affine -> Linear, SGD lr 0.01 Nesterov wd 1e-4, steps at 30/60 of 90 epochs, batch 256. avgpool "
        "(§2.3): GAP res5 -> Linear, lr 30, wd 0, steps 60/80 of 100. --epochs scales the milestones; the "
        "resolved schedule is recorded.",
    )
    _common_arguments(lin)
    lin.add_argument("--variant", choices=("mhead", "avgpool"), default="mhead", help="head recipe (default: mhead)")
    lin.add_argument("--epochs", type=int, help="epochs (default: the recipe's 90/100; milestones scale with it)")
    lin.add_argument("--lr", type=float, help="base lr at batch 256 (default: the recipe's 0.01/30)")
    lin.add_argument("--linear-batch-size", type=int, default=256, help="training batch (default: 256)")
    lin.add_argument("--scale-lr", action="store_true", help="multiply lr by batch/256")
    lin.add_argument("--image-size", type=int, default=224, help="crop size; < 224 only for small runs (default: 224)")
    lin.add_argument("--layers", type=_layers, help="mhead heads to train (default: all five)")
    lin.add_argument("--train-split", help="default: train, or trainval on a VOC root")
    lin.add_argument("--test-split", help="default: val, or test on a VOC root")
    lin.add_argument("--eval-every", type=int, default=0, help="also evaluate every N epochs (default: only at the end)")
    lin.add_argument("--state-dir", help="folder for the resumable head/optimizer state (nothing lost on interrupt)")
    lin.set_defaults(func=cmd_linear)

    add_dense_commands(protocols)


DENSE_TASKS = {"detection": ("voc-c4", "coco-fpn"), "segmentation": ("voc-fcn", "cityscapes-fcn")}


def _dense_setup(args: argparse.Namespace) -> tuple[list[Path], dict]:
    """Data roots and preset: the synthetic set with the `small` preset unless --data is given."""
    from protocols.common import default_voc_root
    from protocols.datasets import dense

    overrides: dict = {}
    if args.data:
        roots = [Path(p) for p in args.data]
        for root in roots:
            if not root.is_dir():
                raise FileNotFoundError(f"data folder {root} does not exist")
        preset = args.preset or "reference"
    else:
        root, overrides = dense.synthetic_for_task(args.task, default_voc_root(progress=args.progress))
        roots = [root]
        preset = args.preset or "small"
        print(f"[eval] no --data given: using the synthetic {args.task} data in {roots[0]} ({preset} preset)",
              file=sys.stderr)
    return roots, {"preset": preset, **overrides}


def _work_dir(args: argparse.Namespace, subject, cfg) -> Path:
    """--work-dir, else one folder per (weights, resolved config): re-running a command resumes it, changing
    a setting starts a new run instead of colliding with the old state."""
    import dataclasses

    from protocols.transfer import config_digest

    if args.work_dir:
        return Path(args.work_dir)
    weights = (subject.info.get("sha256") or "")[:16] or f"random-{subject.info['arch']}-seed{args.seed}"
    settings = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in ("workers", "device", "save_every")}
    return Path("runs") / "eval" / args.task / f"{weights}-{args.mode}-{config_digest(settings)[:8]}"


def cmd_dense(args: argparse.Namespace, kind: str) -> int:
    import warnings

    from protocols import detection, segmentation
    from protocols.common import resolve_device
    from protocols.transfer import ProtocolDeviation, require_mm_stack

    require_mm_stack("mmdet" if kind == "detection" else "mmseg")
    _store(args)
    subject = _subject(args)
    roots, base = _dense_setup(args)
    module = detection if kind == "detection" else segmentation
    common = dict(mode=args.mode, iterations=args.iterations, batch_size=args.total_batch, lr=args.lr,
                  seed=args.seed, workers=args.workers, device=str(resolve_device(args.device)),
                  save_every=args.save_every, train_split=args.train_split or base.get("train_split"),
                  test_split=args.test_split or base.get("test_split"))
    if kind == "detection":
        cfg = module.make_config(args.task, base["preset"], rois_per_image=args.rois_per_image,
                                 test_proposals=args.test_proposals, difficult=args.difficult, **common)
        data = roots
    else:
        if len(roots) != 1:
            raise ValueError(f"segmentation takes one --data root, got {len(roots)}")
        cfg = module.make_config(args.task, base["preset"], crop_size=args.crop_size, aug_split=args.aug_split,
                                 check_counts=args.check_counts, **common)
        data = roots[0]
    work_dir = _work_dir(args, subject, cfg)
    print(f"[eval] {kind} {args.task} ({args.mode}, {base['preset']} preset): state in {work_dir}", file=sys.stderr)
    with warnings.catch_warnings():
        warnings.simplefilter("always", ProtocolDeviation)
        warnings.filterwarnings("ignore", category=UserWarning, module=r"mm(cv|det|engine|seg)\.")  # API notices
        default_show = warnings.showwarning

        def show(message, category, *rest, **kwargs) -> None:
            if issubclass(category, ProtocolDeviation):
                print(f"[eval] differs from the reference: {message}", file=sys.stderr)
            else:
                default_show(message, category, *rest, **kwargs)

        warnings.showwarning = show
        result = module.run(subject, data, cfg, work_dir, progress=args.progress)
    title = f"{kind} {args.task}, {args.mode} ({result.dataset['name']}, {result.dataset['splits']})"
    _print_metrics(title, result.metrics)
    print(f"result: {write_result(result, args)}")
    return 0


def _dense_arguments(parser: argparse.ArgumentParser, tasks: tuple[str, ...]) -> None:
    parser.add_argument("--checkpoint", required=True,
                        help="checkpoint in any supported layout, or 'random' for a random-init baseline")
    parser.add_argument("--arch", help="backbone architecture (default: from the checkpoint; resnet50 for 'random')")
    parser.add_argument("--task", choices=tasks, default=tasks[0], help=f"default: {tasks[0]}")
    parser.add_argument("--mode", choices=("finetune", "frozen"), default="finetune",
                        help="finetune: nothing frozen (the paper); frozen: backbone stages fixed, BN in eval (journal)")
    parser.add_argument("--data", nargs="+", metavar="ROOT",
                        help="dataset root(s) (default: the synthetic scenes in this task's layout)")
    parser.add_argument("--preset", choices=("reference", "small"),
                        help="reference: the published protocol; small: CPU scale "
                        "(default: reference with --data, small on the synthetic data)")
    parser.add_argument("--iterations", type=int, help="training iterations (default: the preset's)")
    parser.add_argument("--total-batch", type=int, help="images per iteration over all devices (default: the preset's)")
    parser.add_argument("--lr", type=float, help="base learning rate (default: the preset's)")
    parser.add_argument("--train-split", help="training list (default: the task's)")
    parser.add_argument("--test-split", help="test list (default: the task's)")
    parser.add_argument("--device", default="auto", help="auto (default), cpu, cuda or cuda:N")
    parser.add_argument("--workers", type=int, default=2, help="data-loading processes (default: 2)")
    parser.add_argument("--seed", type=int, default=0, help="seeds the data order, augmentation and new layers")
    parser.add_argument("--save-every", type=int, default=50, help="iterations between resumable state saves (default: 50)")
    parser.add_argument("--work-dir", help="resumable training state (default: runs/eval/<task>/<weights>-<mode>-<config "
                        "hash>, so the same command resumes)")
    parser.add_argument("--results", default="results", help="results store (default: results)")
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")


def add_dense_commands(protocols) -> None:
    det = protocols.add_parser(
        "detection", help="detection transfer on mmdet: VOC Faster R-CNN R50-C4, COCO Mask R-CNN R50-FPN (spec §4.2-4.3)",
        description="Fine-tune a detector from the checkpoint's backbone (every backbone key must load) and test it. "
        "voc-c4: Faster R-CNN C4 on VOC07(+12) trainval, res5 + extra norm as the RoI head, tested on VOC07 test: "
        "AP50 (11-point, MMSelfSup's number), AP over IoU .50:.95 and AP75 (the paper's detectron2 numbers). "
        "Pass --data VOCdevkit/VOC2007 VOCdevkit/VOC2012 for 07+12. coco-fpn: Mask R-CNN FPN 1x on COCO "
        "(--data the folder with annotations/, train2017/, val2017/): box and mask AP. Settings that differ "
        "from the reference (batch, LR, iterations, sizes, SyncBN) are warned about and recorded. Needs the "
        "OpenMMLab stack (README 'Dense protocols').")
    _dense_arguments(det, DENSE_TASKS["detection"])
    det.add_argument("--rois-per-image", type=int, help="RoI head samples per image (reference 512)")
    det.add_argument("--test-proposals", type=int, help="RPN proposals per test image (reference 1000)")
    det.add_argument("--difficult", choices=("ignore", "train"),
                     help="VOC 'difficult' boxes: ignore (mmdet, default) or train on them (detectron2)")
    det.set_defaults(func=lambda a: cmd_dense(a, "detection"))

    seg = protocols.add_parser(
        "segmentation", help="semantic segmentation transfer on mmseg: FCN-D8 on VOC12aug and Cityscapes (spec §4.4)",
        description="Fine-tune FCN-D8 (plain 7x7-stem ResNet, output stride 8, aux head on res4) from the "
        "checkpoint's backbone and report mIoU as mmseg computes it. voc-fcn: --data VOCdevkit/VOC2012 with "
        "SegmentationClass and SegmentationClassAug plus ImageSets/Segmentation/{train,aug,val}.txt "
        "(10,582 training images, checked); cityscapes-fcn: --data the folder with leftImg8bit/ and gtFine/ "
        "(*_gtFine_labelTrainIds.png). Needs the OpenMMLab stack (README 'Dense protocols').")
    _dense_arguments(seg, DENSE_TASKS["segmentation"])
    seg.add_argument("--crop-size", type=int, help="training crop (reference 512 VOC, 769 Cityscapes)")
    seg.add_argument("--aug-split", help="VOC: extra list read from SegmentationClassAug (reference 'aug'; '' for none)")
    seg.add_argument("--no-check-counts", dest="check_counts", action="store_false", default=None,
                     help="run even when the training/test sets do not have the reference sizes")
    seg.set_defaults(func=lambda a: cmd_dense(a, "segmentation"))
