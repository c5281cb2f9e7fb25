"""Unlabelled pretraining images: discovery, decoding, per-sample seeding and a resumable sampler.

Sources: a folder read recursively (as COCO train2017 is used, spec §1.1), which also covers
ImageNet-style `train/<class>/*` folders, or a list file of `<path> [label]` lines (OpenSelfSup's
`meta/train.txt`), paths relative to a root. Each sample's augmentation is seeded from
(seed, epoch, index), so the views do not depend on the number of workers and a run resumed
mid-epoch sees exactly the images and views it would have seen.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path

import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset, Sampler

from baselines.config import ConfigError
from baselines.infra import UserError, derived_seed, get_logger

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".pgm", ".tif", ".tiff", ".webp")
LIST_FORMAT = "'<path> [label]' lines"
SHOWN = 3  # missing files named in a message
LOG = get_logger("data")


class BadImageError(UserError, RuntimeError):
    """An image that cannot be decoded; the message names the file."""


def find_images(data: str | os.PathLike, root: str | os.PathLike | None = None,
                allow_missing: bool = False) -> list[str]:
    """All image paths of a folder (recursive, sorted) or of a list file (in file order).

    Every listed image must exist, so a wrong root is named here rather than by the batch arithmetic;
    `allow_missing` (for `skip_bad_images`) keeps missing ones, with a warning, as long as one exists.
    """
    data = Path(data)
    if not data.exists():
        raise FileNotFoundError(f"pretraining data not found: {data}")
    if data.is_file():
        base = Path(root) if root else data.parent
        files = [str(base / line.split()[0]) for line in _list_lines(data) if line.strip()]
        where = f"list file {data}"
        if files:
            _check_listed_images(files, data, base, allow_missing)
    else:
        files = sorted(
            str(Path(dirpath) / name)
            for dirpath, _, names in os.walk(data, followlinks=True)
            for name in names
            if name.lower().endswith(IMAGE_EXTENSIONS)
        )
        where = f"folder {data} (searched recursively for {', '.join(IMAGE_EXTENSIONS)})"
    if not files:
        raise FileNotFoundError(f"no images in {where}; give a folder of images or a list file of {LIST_FORMAT}")
    return files


def _list_lines(path: Path) -> list[str]:
    """The lines of a list file; an image or any other binary file given instead is named as such."""
    with open(path, "rb") as handle:
        head = handle.read(4096)
    try:
        head.decode("utf-8")
        text = b"\0" not in head
    except UnicodeDecodeError as err:
        text = err.start >= len(head) - 3  # only a character cut at the end of the sample
    if not text:
        kind = "an image" if _is_image(path) else "a binary file"
        raise ConfigError(f"data {path} is {kind}, not a folder of images or a list file of {LIST_FORMAT}; "
                          "give the folder that holds the images")
    try:
        return path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as err:
        raise ConfigError(f"list file {path} is not UTF-8 text (byte {err.start}); a list file holds "
                          f"{LIST_FORMAT}") from None


def _is_image(path: Path) -> bool:
    if path.suffix.lower() in IMAGE_EXTENSIONS:
        return True
    try:
        with Image.open(path):
            return True
    except (OSError, ValueError, Image.DecompressionBombError):
        return False


def _check_listed_images(files: list[str], listing: Path, base: Path, allow_missing: bool) -> None:
    """Name the listed images that do not exist (how many, the first few, and the root they were looked for in)."""
    missing = [f for f in files if not os.path.isfile(f)]
    if not missing:
        return
    shown = ", ".join(missing[:SHOWN]) + (", ..." if len(missing) > SHOWN else "")
    problem = f"list file {listing}: {len(missing)} of {len(files)} listed images do not exist ({shown})"
    if allow_missing and len(missing) < len(files):
        LOG.warning("%s; they are skipped as unreadable (skip_bad_images)", problem)
        return
    raise FileNotFoundError(f"{problem}; paths are read relative to {base}: fix the list or give their root "
                            "(--data-root)")


def data_name(data: str | os.PathLike) -> str:
    """A short name for the pretraining data: the `name` in a generated set's `dataset.json` (in the folder or
    the folder above, as for `<synthetic>/JPEGImages`), else the folder or list file's own name."""
    data = Path(data)
    for folder in (data, data.parent):
        with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
            return str(json.loads((folder / "dataset.json").read_text())["name"])
    return data.name


def load_rgb(path: str) -> Image.Image:
    try:
        with Image.open(path) as img:
            return img.convert("RGB")
    except (OSError, ValueError, UnidentifiedImageError, Image.DecompressionBombError) as err:
        raise BadImageError(f"cannot read image {path}: {err}") from err


class PretrainImages(Dataset):
    """Map-style dataset indexed by (epoch, index) keys; returns (view_q, view_k, bad_index).

    `bad_index` is -1, or the index of an unreadable image that `skip_bad_images` replaced by the
    next readable one (so every batch keeps its size and the queue arithmetic holds).
    """

    def __init__(self, files: list[str], transform, seed: int = 0, skip_bad_images: bool = False) -> None:
        self.files = files
        self.transform = transform
        self.seed = seed
        self.skip_bad_images = skip_bad_images

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, key: tuple[int, int]):
        epoch, index = key
        bad = -1
        for offset in range(len(self.files)):
            i = (index + offset) % len(self.files)
            try:
                img = load_rgb(self.files[i])
                break
            except BadImageError:
                if not self.skip_bad_images:
                    raise
                bad = i if bad < 0 else bad
        else:
            raise BadImageError(f"no readable image among the {len(self.files)} files")
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(derived_seed(self.seed, epoch, index))
            view_q, view_k = self.transform(img)
        return view_q, view_k, bad


class PretrainSampler(Sampler):
    """Yields this process's (epoch, index) keys for one epoch, from `start_iteration` on.

    The epoch's permutation depends only on (seed, epoch). Global batch t is the slice
    [t*B, (t+1)*B) of it, and process r takes the r-th per-process share, so the global batches are
    the same whatever the number of processes. The tail that does not fill a batch is dropped.

    `order="halves"` splits the images once (by seed) into two fixed halves and visits the first,
    then the second, each shuffled anew every epoch. An image then comes back only after more than
    N/2 - B others, so a queue of K <= N/2 - B keys never holds its own previous key, as on
    ImageNet with the official K (spec pretraining.md §2.6); plain shuffling cannot promise that on
    a small dataset.
    """

    ORDERS = ("shuffle", "halves")

    def __init__(self, num_images: int, global_batch: int, seed: int, rank: int = 0, world_size: int = 1,
                 order: str = "shuffle") -> None:
        if num_images < global_batch:
            raise ConfigError(f"{num_images} images cannot fill one global batch of {global_batch}: use a smaller "
                              "batch_size or more images")
        if order not in self.ORDERS:
            raise ValueError(f"unknown epoch order {order!r}; choose one of {', '.join(self.ORDERS)}")
        self.order = order
        self.num_images = num_images
        self.global_batch = global_batch
        self.local_batch = global_batch // world_size
        self.seed = seed
        self.rank = rank
        self.epoch = 0
        self.start_iteration = 0

    @property
    def iterations_per_epoch(self) -> int:
        return self.num_images // self.global_batch

    def set_epoch(self, epoch: int, start_iteration: int = 0) -> None:
        self.epoch = epoch
        self.start_iteration = start_iteration

    def __len__(self) -> int:
        return (self.iterations_per_epoch - self.start_iteration) * self.local_batch

    def permutation(self) -> list[int]:
        generator = torch.Generator().manual_seed(derived_seed(self.seed, self.epoch))
        if self.order == "shuffle":
            return torch.randperm(self.num_images, generator=generator).tolist()
        split_seed = derived_seed(self.seed, 2**40)  # a key no epoch number reaches
        halves = torch.randperm(self.num_images, generator=torch.Generator().manual_seed(split_seed))
        first, second = halves[: self.num_images // 2], halves[self.num_images // 2 :]
        return [int(i) for half in (first, second) for i in half[torch.randperm(len(half), generator=generator)]]

    def min_return_gap(self) -> int:
        """Fewest other images consumed between two visits of one image (a lower bound)."""
        if self.order == "shuffle":
            return 0
        return self.num_images // 2 - self.global_batch + 1

    def __iter__(self):
        perm = self.permutation()
        for t in range(self.start_iteration, self.iterations_per_epoch):
            start = t * self.global_batch + self.rank * self.local_batch
            for index in perm[start : start + self.local_batch]:
                yield self.epoch, index
