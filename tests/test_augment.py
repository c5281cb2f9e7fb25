import torch
from PIL import Image
from torchvision import transforms

from baselines.augment import GaussianBlur, TwoViews, mocov2_augmentation


def test_pipeline_matches_the_spec():
    view = mocov2_augmentation(64)
    steps = view.transforms
    crop, jitter, gray, blur, flip, _, normalise = steps
    assert isinstance(crop, transforms.RandomResizedCrop) and crop.size == (64, 64) and crop.scale == (0.2, 1.0)
    assert jitter.p == 0.8
    cj = jitter.transforms[0]
    assert (cj.brightness, cj.contrast, cj.saturation, cj.hue) == ((0.6, 1.4), (0.6, 1.4), (0.6, 1.4), (-0.1, 0.1))
    assert gray.p == 0.2 and blur.p == 0.5 and isinstance(blur.transforms[0], GaussianBlur)
    assert blur.transforms[0].sigma == (0.1, 2.0) and flip.p == 0.5
    assert normalise.mean == (0.485, 0.456, 0.406) and normalise.std == (0.229, 0.224, 0.225)


def test_two_independent_views_reproducible_from_the_torch_seed():
    img = Image.effect_noise((80, 60), 40).convert("RGB")
    two = TwoViews(mocov2_augmentation(32))
    torch.manual_seed(3)
    q1, k1 = two(img)
    torch.manual_seed(3)
    q2, k2 = two(img)
    assert q1.shape == k1.shape == (3, 32, 32)
    assert torch.equal(q1, q2) and torch.equal(k1, k2)
    assert not torch.equal(q1, k1)


def test_blur_sigma_is_drawn_from_torch():
    blur = GaussianBlur((0.1, 2.0))
    img = Image.effect_noise((32, 32), 60).convert("RGB")
    torch.manual_seed(0)
    a = blur(img)
    torch.manual_seed(0)
    b = blur(img)
    assert a.tobytes() == b.tobytes()
