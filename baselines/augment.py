"""The MoCo-v2 two-view augmentation, run independently for query and key (spec pretraining.md §1).

Every random draw comes from torch's RNG (the official blur draws its sigma from numpy), so one
seeded generator state per sample reproduces both views exactly whatever the worker layout.
"""

from __future__ import annotations

import torch
from PIL import Image, ImageFilter
from torchvision import transforms

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class GaussianBlur:
    """PIL Gaussian blur with sigma ~ U(0.1, 2.0) in output pixels, no kernel size (OpenSelfSup)."""

    def __init__(self, sigma: tuple[float, float] = (0.1, 2.0)) -> None:
        self.sigma = sigma

    def __call__(self, img: Image.Image) -> Image.Image:
        low, high = self.sigma
        sigma = low + (high - low) * float(torch.rand(()))
        return img.filter(ImageFilter.GaussianBlur(radius=sigma))

    def __repr__(self) -> str:
        return f"GaussianBlur(sigma={self.sigma})"


def mocov2_augmentation(image_size: int = 224) -> transforms.Compose:
    """One view: crop 0.2-1, jitter 0.4/0.4/0.4/0.1 p=0.8, gray 0.2, blur p=0.5, flip, normalise."""
    return transforms.Compose(
        [
            transforms.RandomResizedCrop(image_size, scale=(0.2, 1.0)),
            transforms.RandomApply([transforms.ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8),
            transforms.RandomGrayscale(p=0.2),
            transforms.RandomApply([GaussianBlur((0.1, 2.0))], p=0.5),
            transforms.RandomHorizontalFlip(),
            transforms.ToTensor(),
            transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD),
        ]
    )


class TwoViews:
    """The same pipeline applied twice, independently: (query view, key view)."""

    def __init__(self, view: transforms.Compose) -> None:
        self.view = view

    def __call__(self, img: Image.Image) -> tuple[torch.Tensor, torch.Tensor]:
        return self.view(img), self.view(img)
