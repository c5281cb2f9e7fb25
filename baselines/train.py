"""Pretraining loop for MoCo-v2 and DenseCL: one process or torchrun DDP, resumable to the bit.

The recipe is the official one (spec pretraining.md §3): SGD momentum 0.9, weight decay 1e-4 on
every parameter, cosine learning rate set once per epoch, no warm-up. Around it: atomic
checkpoints (every N epochs, optionally every N iterations, on SIGINT/SIGTERM and at the end) that
hold the optimizer, queues, RNG states and position, so `--resume auto` continues exactly where a
run stopped; a JSONL log per window of iterations; a stop with a clear message on a non-finite
loss, leaving the last good checkpoint untouched.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import math
import os
import random
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader
from tqdm import tqdm

from baselines import config as configs
from baselines.augment import TwoViews, mocov2_augmentation
from baselines.backbone import create_backbone
from baselines.data import PretrainImages, PretrainSampler, data_name, find_images
from baselines.distributed import Distributed
from baselines.infra import (
    Interrupted,
    StopRequest,
    UserError,
    atomic_torch_save,
    atomic_write_text,
    get_logger,
    link_or_copy,
    load_torch_file,
    naming_write_errors,
    provenance,
    remove_stale_temp_files,
    seed_everything,
)
from baselines.methods import METHODS
from baselines.pretrain_config import RUNTIME_FIELDS, PretrainConfig  # re-exported: the trainer's config

CHECKPOINT_FORMAT = "densecl-bench/pretrain"
LOG = get_logger("pretrain")
class NonFiniteLossError(UserError, RuntimeError):
    """Training blew up (too high a learning rate, or bad data); the message names the last good checkpoint."""


def cosine_lr(base_lr: float, epoch: int, epochs: int) -> float:
    """lr_e = base * 0.5 * (1 + cos(pi * e / E)) for the whole (0-indexed) epoch e (spec §3)."""
    return base_lr * 0.5 * (1.0 + math.cos(math.pi * epoch / epochs))


def build_model(cfg: PretrainConfig) -> nn.Module:
    """The method's pretraining model on a freshly initialised backbone (seed first for a reproducible init)."""
    backbone = create_backbone(cfg.arch, conv_init=cfg.conv_init, **backbone_kwargs(cfg))
    return METHODS[cfg.method].build(backbone, cfg)


def backbone_kwargs(cfg: PretrainConfig) -> dict:
    """timm arguments of the training backbone; the official ResNet takes none (DESIGN.md, Backbone)."""
    return {"output_stride": cfg.output_stride} if cfg.output_stride != 32 else {}


def rng_state() -> dict:
    """Every RNG state, as tensors and plain lists so the checkpoint loads with weights_only=True."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": [name, keys.tolist(), pos, has_gauss, cached],
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"].cpu())
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])


@dataclass
class Position:
    """Where training stands: `iteration` iterations of `epoch` are done."""

    epoch: int = 0
    iteration: int = 0
    global_step: int = 0


def _ignore_signals_in_worker(worker_id: int) -> None:
    """Workers leave SIGINT/SIGTERM to the main process, which checkpoints before stopping (`stop_workers` ends
    them when it is done)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def stop_workers(loader: DataLoader) -> None:
    """End a loader's worker processes now, idle, busy or already gone.

    Our workers ignore SIGTERM and persist between epochs, so after an error Python's exit handler, which
    sends SIGTERM to child processes and then joins them, would wait for them forever. torch (2.14) has no
    public shutdown: this makes the call the iterator's finaliser makes, then kills any worker it left alive.
    """
    iterator = getattr(loader, "_iterator", None)
    if iterator is None:
        return
    loader._iterator = None
    workers = list(getattr(iterator, "_workers", ()))
    try:
        iterator._shutdown_workers()
    finally:
        for worker in workers:
            if worker.is_alive():
                worker.kill()
                worker.join(timeout=1.0)


class Trainer:
    """Holds the run's state; `run()` trains to the end or raises with the checkpoint intact."""

    def __init__(self, cfg: PretrainConfig) -> None:
        self.cfg = cfg
        cfg.validate(int(os.environ.get("WORLD_SIZE", "1")))  # settings first: a bad --device fails in one line
        self.dist = Distributed(cfg.device)
        self.out = Path(cfg.out)
        self.ckpt_dir = self.out / "checkpoints"
        self.log_path = self.out / "log.jsonl"
        if self.dist.is_main:
            self._prepare_out()
        self.files = find_images(cfg.data, cfg.data_root or None, allow_missing=cfg.skip_bad_images)

        seed_everything(cfg.seed)
        if self.dist.device.type == "cuda":
            torch.backends.cudnn.benchmark = not cfg.deterministic
            torch.backends.cudnn.deterministic = cfg.deterministic
        self.model = build_model(cfg).to(self.dist.device)
        if cfg.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
        self.position = Position()
        self.bad_images: set[int] = set()
        self.log_window: list[list[float]] = []  # per-iteration values since the last log record
        self.resumed_from = self._resume()

        self.dataset = PretrainImages(self.files, TwoViews(mocov2_augmentation(cfg.image_size)), cfg.seed,
                                      cfg.skip_bad_images)
        self.sampler = PretrainSampler(len(self.files), cfg.batch_size, cfg.seed, self.dist.rank, self.dist.world_size,
                                       order=cfg.epoch_order)
        self._check_queue_fits_data()
        self.loader = DataLoader(
            self.dataset,
            batch_size=cfg.batch_size // self.dist.world_size,
            sampler=self.sampler,
            num_workers=cfg.workers,
            pin_memory=self.dist.device.type == "cuda",
            persistent_workers=cfg.workers > 0,
            worker_init_fn=_ignore_signals_in_worker if cfg.workers > 0 else None,
            # Its own generator: iterating must not draw from the global RNG that the key shuffle uses.
            generator=torch.Generator().manual_seed(cfg.seed),
        )
        self.net = self.model
        if self.dist.world_size > 1:
            device_ids = [self.dist.device.index] if self.dist.device.type == "cuda" else None
            # No buffer sync in forward: per-GPU BN statistics, as OpenSelfSup's
            # broadcast_buffers=False (spec §2.9); buffers are identical at init anyway.
            self.net = DistributedDataParallel(self.model, device_ids=device_ids, forward_sync_buffers=False)

    # ----------------------------------------------------------------------------- checkpoints
    def _prepare_out(self) -> None:
        """A writable output folder, before any work; temp files of killed writes there are removed (and said)."""
        try:
            self.ckpt_dir.mkdir(parents=True, exist_ok=True)
            probe = self.ckpt_dir / f".write-check.{os.getpid()}.tmp"
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as err:
            raise configs.ConfigError(f"output folder {self.out} is not writable ({err.strerror or err}); "
                                      "choose another --out") from None
        removed = [remove_stale_temp_files(folder) for folder in (self.out, self.ckpt_dir)]
        count, size = sum(r[0] for r in removed), sum(r[1] for r in removed)
        if count:
            LOG.info("removed %d temporary file(s) of interrupted writes (%.1f MiB) in %s", count, size / 2**20,
                     self.out)

    def _check_queue_fits_data(self) -> None:
        """Spec §2.6: with the official K an image never meets its own old key; say when that cannot hold."""
        n, k, b = len(self.files), self.cfg.queue_size, self.cfg.batch_size
        if self.cfg.epoch_order == "halves" and k >= self.sampler.min_return_gap():
            raise configs.ConfigError(
                f"queue_size {k} must be at most N/2 - B = {n // 2 - b} for {n} images and batch {b} "
                "so that no image meets its own old key (epoch_order halves)")
        if self.cfg.epoch_order == "shuffle" and k + b > n and self.dist.is_main:
            LOG.warning("queue_size %d + batch %d exceeds the %d images: the queue holds old keys of the very images "
                        "it contrasts (use --epoch-order halves with K <= N/2 - B)", k, b, n)

    def _resume(self) -> Path | None:
        cfg = self.cfg
        if not cfg.resume:
            if (self.ckpt_dir / "last.pth").exists():
                raise configs.ConfigError(
                    f"{self.out} already holds a run; pass --resume auto to continue it or choose another --out"
                )
            return None
        path = self.ckpt_dir / "last.pth" if cfg.resume == "auto" else Path(cfg.resume)
        if not path.exists():
            if cfg.resume == "auto":
                return None
            raise FileNotFoundError(f"checkpoint to resume not found: {path}")
        path, state = self._readable_checkpoint(path)
        # A setting added after the checkpoint was written had its default then.
        saved = {**configs.to_dict(PretrainConfig()), **state["config"]}
        changed = [
            f"{k}: {saved.get(k)!r} -> {v!r}"
            for k, v in configs.to_dict(cfg).items()
            if k not in RUNTIME_FIELDS and saved.get(k) != v
        ]
        if changed:
            raise configs.ConfigError(
                f"cannot resume {path} with different settings ({'; '.join(changed)}); "
                "use the checkpoint's settings or start a new --out"
            )
        if state["num_images"] != len(self.files):
            raise configs.ConfigError(
                f"cannot resume {path}: it was trained on {state['num_images']} images, the data now has "
                f"{len(self.files)}; give the same data or start a new --out"
            )
        self.model.load_state_dict(state["state_dict"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.position = Position(**state["position"])
        self.bad_images = set(state.get("bad_images", []))
        self.log_window = [list(values) for values in state.get("log_window", [])]
        set_rng_state(state["rng"])
        return path

    def _readable_checkpoint(self, path: Path) -> tuple[Path, dict]:
        """`path`'s state; with `--resume auto` an unreadable last.pth falls back to the newest readable kept
        epoch checkpoint (and says so). Unreadable means truncated, empty, not a torch file, or holding objects."""
        try:
            return path, read_training_checkpoint(path, self.dist.device)
        except configs.ConfigError as err:
            if self.cfg.resume != "auto":
                raise configs.ConfigError(f"{err}; resume from another checkpoint, or start a new --out") from None
            problem = err
        for kept in sorted(self.ckpt_dir.glob("epoch_*.pth"), reverse=True):
            try:
                state = read_training_checkpoint(kept, self.dist.device)
            except (configs.ConfigError, OSError):
                continue
            if self.dist.is_main:
                LOG.warning("%s; resuming from %s instead", problem, kept)
            return kept, state
        raise configs.ConfigError(f"{problem}, and no kept epoch checkpoint in {self.ckpt_dir} is readable: "
                                  "start a new --out")

    def _state(self) -> dict:
        return {
            "format": CHECKPOINT_FORMAT,
            "version": 1,
            "method": self.cfg.method,
            "arch": self.cfg.arch,
            "config": configs.to_dict(self.cfg),
            "num_images": len(self.files),
            "position": dataclasses.asdict(self.position),
            "state_dict": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "rng": rng_state(),
            "bad_images": sorted(self._all_bad_images()),
            "log_window": [list(values) for values in self.log_window],
            "meta": provenance(),
        }

    def _all_bad_images(self) -> set[int]:
        if self.dist.world_size == 1:
            return self.bad_images
        return set().union(*map(set, self.dist.all_gather_object(sorted(self.bad_images))))

    def save(self, keep: bool) -> Path:
        """Write last.pth (and, if `keep`, epoch_NNNN.pth); every rank calls this, rank 0 writes.

        Weights, buffers and optimizer state are checked finite first: a checkpoint that holds inf in a BN
        running_var would be a "last good checkpoint" that cannot be resumed, so it is never written.
        """
        self._check_ranks_agree()
        state = self._state()
        bad = non_finite_tensors({"model": state["state_dict"], "optimizer": state["optimizer"]["state"]})
        if bad:
            raise NonFiniteLossError(f"non-finite values in {', '.join(bad[:3])}{' ...' if len(bad) > 3 else ''} at "
                                     f"epoch {self.position.epoch + 1}, iteration {self.position.iteration}: not "
                                     f"saved; {self._last_good()}. Lower the learning rate, or check the data")
        last = self.ckpt_dir / "last.pth"
        if self.dist.is_main:
            fix = f"free space there, then continue with --resume auto ({self._last_good()})"
            if keep:
                kept = self.ckpt_dir / f"epoch_{self.position.epoch:04d}.pth"
                with naming_write_errors(kept, "checkpoint", fix):
                    self.ckpt_dir.mkdir(parents=True, exist_ok=True)
                    atomic_torch_save(state, kept)
                with naming_write_errors(last, "checkpoint", fix):
                    link_or_copy(kept, last)
            else:
                with naming_write_errors(last, "checkpoint", fix):
                    self.ckpt_dir.mkdir(parents=True, exist_ok=True)
                    atomic_torch_save(state, last)
        self.dist.barrier()
        return last

    def _check_ranks_agree(self) -> None:
        """Query/key weights and queues must be identical on every rank; fail loudly if not."""
        if self.dist.world_size == 1:
            return
        names = [n for n, _ in self.model.named_parameters()]
        names += [n for n, _ in self.model.named_buffers() if "queue" in n]
        tensors = dict(self.model.named_parameters()) | dict(self.model.named_buffers())
        digest = torch.stack([tensors[n].detach().double().sum() for n in names]).to(self.dist.device)
        gathered = [torch.empty_like(digest) for _ in range(self.dist.world_size)]
        dist.all_gather(gathered, digest)
        for other in gathered[1:]:
            if not torch.equal(other, gathered[0]):
                bad = names[int((other != gathered[0]).nonzero()[0])]
                raise RuntimeError(f"processes disagree on {bad} (weights or queues diverged across ranks)")

    def export_backbone(self) -> Path:
        """The query backbone alone, in the layout of the official `extract_backbone_weights.py`."""
        path = self.out / "backbone.pth"
        if self.dist.is_main:
            state = {
                "state_dict": self.model.backbone.state_dict(),
                "author": "densecl-bench",
                "meta": {"method": self.cfg.method, "arch": self.cfg.arch, "epochs": self.cfg.epochs,
                         "pretrain_data": data_name(self.cfg.data), "seed": self.cfg.seed,
                         "output_stride": self.cfg.output_stride, **provenance()},
            }
            with naming_write_errors(path, "backbone", "free space there, then run the same command with "
                                     f"--resume auto ({self._last_good()})"):
                atomic_torch_save(state, path)
        self.dist.barrier()
        return path

    def close(self) -> None:
        """Stop the data-loading workers and leave the process group, whether the run finished or failed."""
        try:
            stop_workers(self.loader)
        finally:
            self.dist.close()

    # ----------------------------------------------------------------------------- logging
    def _prepare_log(self) -> None:
        """Keep log records up to the resumed step; later ones belong to lost, re-run work."""
        if not self.dist.is_main:
            return
        with naming_write_errors(self.out / "config.yaml", "run config", "free space there or choose another --out"):
            self.out.mkdir(parents=True, exist_ok=True)
            configs.write_yaml(self.cfg, self.out / "config.yaml")
        kept = []
        if self.resumed_from is not None and self.log_path.exists():
            for line in self.log_path.read_text().splitlines():
                try:
                    if json.loads(line)["step"] <= self.position.global_step:
                        kept.append(line)
                except (ValueError, KeyError):
                    continue
        with naming_write_errors(self.log_path, "training log", "free space there or choose another --out"):
            atomic_write_text(self.log_path, "".join(line + "\n" for line in kept))

    def _write_log(self, record: dict) -> None:
        if self.dist.is_main:
            with naming_write_errors(self.log_path, "training log", "free space there, then continue with "
                                     f"--resume auto ({self._last_good()})"), open(self.log_path, "a") as f:
                f.write(json.dumps(record) + "\n")

    # ----------------------------------------------------------------------------- loop
    def run(self) -> Path:
        cfg = self.cfg
        self._prepare_log()
        iters = self.sampler.iterations_per_epoch
        if self.dist.is_main:
            if not self.resumed_from:
                where = "starting"
            elif self.position.epoch >= cfg.epochs:
                where = f"{self.resumed_from} already finished all {cfg.epochs} epochs; nothing to train"
            else:
                where = (f"resuming {self.resumed_from} at epoch {self.position.epoch + 1}, "
                         f"iteration {self.position.iteration}")
            LOG.info("%s: %s %s, %d images, %d it/epoch, %d process(es) on %s, out %s", where, cfg.method, cfg.arch,
                     len(self.files), iters, self.dist.world_size, self.dist.device, self.out)
        trains = self.position.epoch < cfg.epochs
        with StopRequest() as stop:
            while self.position.epoch < cfg.epochs:
                self._train_epoch(stop)
                self.position = Position(self.position.epoch + 1, 0, self.position.global_step)
                if self.position.epoch % cfg.save_every == 0 or self.position.epoch == cfg.epochs:
                    self.save(keep=True)
        bad = self._all_bad_images()  # every rank takes part in the gather
        if bad and self.dist.is_main:
            listing = self.out / "bad_images.txt"
            with naming_write_errors(listing, "list of unreadable images", "free space there, then run the same "
                                     "command with --resume auto"):
                atomic_write_text(listing, "".join(self.files[i] + "\n" for i in sorted(bad)))
            LOG.warning("skipped %d unreadable image(s), listed in %s", len(bad), listing)
        exported = self.out / "backbone.pth"
        if not trains and exported.is_file():
            # A finished run reused (the pipelines do so for every batch) keeps its file byte for byte: results
            # and resumable dense runs name it by sha256, and a re-export would change its provenance bytes.
            self.dist.barrier()
            return exported
        return self.export_backbone()

    def _train_epoch(self, stop: StopRequest) -> None:
        cfg = self.cfg
        epoch, start = self.position.epoch, self.position.iteration
        lr = cosine_lr(cfg.lr, epoch, cfg.epochs)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.sampler.set_epoch(epoch, start)
        self.model.train()
        bar = tqdm(
            total=self.sampler.iterations_per_epoch, initial=start, desc=f"epoch {epoch + 1}/{cfg.epochs}", unit="it",
            disable=not (self.dist.is_main and cfg.progress), dynamic_ncols=True,
            mininterval=1.0 if sys.stderr.isatty() else 30.0,
        )
        try:
            self._train_iterations(stop, bar, lr)
        finally:
            bar.close()

    def _train_iterations(self, stop: StopRequest, bar: tqdm, lr: float) -> None:
        cfg, device = self.cfg, self.dist.device
        epoch, start = self.position.epoch, self.position.iteration
        iters = self.sampler.iterations_per_epoch
        window = self.log_window  # a resumed run continues the averaging window it stopped in
        keys: list[str] = []
        window_start = time.perf_counter()
        amp = torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=cfg.amp == "bf16")
        memory_format = torch.channels_last if cfg.channels_last else torch.contiguous_format
        for iteration, (im_q, im_k, bad) in enumerate(self.loader, start=start):
            im_q = im_q.to(device, non_blocking=True, memory_format=memory_format)
            im_k = im_k.to(device, non_blocking=True, memory_format=memory_format)
            self.model.iteration = self.position.global_step
            with amp:
                outputs = self.net(im_q, im_k)
            loss = outputs["loss"]
            keys = sorted(outputs)
            skipped = bad[bad >= 0]
            self.bad_images.update(skipped.tolist())
            flags = torch.tensor([float(stop.requested), float(len(skipped))], device=device)
            values = torch.cat([torch.stack([outputs[k].detach().float() for k in keys]), flags])
            values = self.dist.all_mean(values).cpu()
            if not math.isfinite(values[keys.index("loss")]):
                raise NonFiniteLossError(self._non_finite_message(float(values[keys.index("loss")]), iteration))
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
            self.position = Position(epoch, iteration + 1, self.position.global_step + 1)
            window.append(values[: len(keys)].tolist())
            bar.update(1)
            bar.set_postfix(loss=f"{values[keys.index('loss')]:.3f}", lr=f"{lr:.3g}", refresh=False)
            if self.position.global_step % cfg.log_every == 0 or iteration + 1 == iters:
                elapsed = time.perf_counter() - window_start
                means = np.mean(window, axis=0)
                self._write_log(
                    {"step": self.position.global_step, "epoch": epoch + 1, "iter": iteration + 1, "lr": lr,
                     **{k: round(float(v), 6) for k, v in zip(keys, means, strict=True)},
                     "images_per_s": round(len(window) * cfg.batch_size / elapsed, 2),
                     "time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
                )
                window.clear()
                window_start = time.perf_counter()
            if values[-2] > 0:  # some rank was asked to stop: all stop at this same iteration
                bar.close()
                path = self.save(keep=False)
                raise Interrupted(
                    f"interrupted at epoch {epoch + 1}, iteration {iteration + 1}; state saved to {path}; "
                    "continue with --resume auto"
                )
            if cfg.save_every_iters and self.position.global_step % cfg.save_every_iters == 0 and iteration + 1 < iters:
                self.save(keep=False)

    def _last_good(self) -> str:
        """Where the last checkpoint is, if any: every written checkpoint passed the finiteness check."""
        last = self.ckpt_dir / "last.pth"
        return f"the last good checkpoint is {last}" if last.exists() else "no checkpoint was written yet"

    def _non_finite_message(self, value: float, iteration: int) -> str:
        kept = self._last_good()
        return (
            f"non-finite loss ({value}) at epoch {self.position.epoch + 1}, iteration {iteration + 1} "
            f"(step {self.position.global_step + 1}); {kept}. Lower the learning rate, or check the data"
        )


def read_training_checkpoint(path: Path, device: torch.device | str = "cpu") -> dict:
    """A densecl-bench training checkpoint, or a one-line ConfigError saying what is wrong with the file."""
    state = load_torch_file(path, "checkpoint", map_location=device)
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise configs.ConfigError(f"{path} is not a densecl-bench pretraining checkpoint")
    return state


def non_finite_tensors(tree, name: str = "") -> list[str]:
    """Dotted names of the floating tensors in a nested dict/list that hold NaN or infinity."""
    if isinstance(tree, torch.Tensor):
        return [name] if tree.is_floating_point() and not bool(torch.isfinite(tree).all()) else []
    items = tree.items() if isinstance(tree, dict) else enumerate(tree) if isinstance(tree, (list, tuple)) else ()
    return [bad for key, value in items for bad in non_finite_tensors(value, f"{name}.{key}" if name else str(key))]


def pretrain(cfg: PretrainConfig) -> Path:
    """Train to the end (or resume) and return the path of the exported query backbone."""
    trainer = Trainer(cfg)
    try:
        return trainer.run()
    finally:
        trainer.close()
