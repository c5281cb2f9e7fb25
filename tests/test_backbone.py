import math

import pytest
import torch
import torchvision
from torch import nn

from baselines.backbone import FEATURE_NAMES, create_backbone


def test_resnet50_maps_channels_and_torchvision_keys():
    backbone = create_backbone("resnet50")
    features = backbone(torch.randn(1, 3, 64, 64))
    assert list(features) == list(FEATURE_NAMES)
    assert {k: tuple(v.shape[1:]) for k, v in features.items()} == {
        "feature1": (64, 32, 32), "feature2": (256, 16, 16), "feature3": (512, 8, 8),
        "feature4": (1024, 4, 4), "feature5": (2048, 2, 2),
    }
    assert backbone.channels == {"feature1": 64, "feature2": 256, "feature3": 512, "feature4": 1024, "feature5": 2048}
    reference = {k: v for k, v in torchvision.models.resnet50().state_dict().items() if not k.startswith("fc.")}
    assert list(backbone.state_dict()) == list(reference)  # same names, same order: 318 keys
    backbone.load_state_dict(reference, strict=True)


def test_feature1_is_the_stem_before_the_maxpool():
    backbone = create_backbone("resnet18").eval()
    x = torch.randn(2, 3, 64, 64)
    stem = torch.relu(backbone.bn1(backbone.conv1(x)))
    torch.testing.assert_close(backbone(x)["feature1"], stem, rtol=0, atol=0)


def test_official_init_no_zero_init_and_fan_in():
    backbone = create_backbone("resnet50")
    bn3 = [m.weight for name, m in backbone.named_modules() if name.endswith("bn3")]
    assert len(bn3) == 16 and all(bool((w == 1).all()) for w in bn3)  # timm would zero these
    conv = backbone.layer3[0].conv2  # 256 x 256 x 3 x 3
    fan_in = conv.weight[0].numel()
    assert conv.weight.std().item() == pytest.approx(math.sqrt(2.0 / fan_in), rel=0.05)


def test_timm_init_keeps_fan_out():
    conv = create_backbone("resnet50", conv_init="timm").layer3[0].conv2
    fan_out = conv.weight.shape[0] * 9
    assert conv.weight.std().item() == pytest.approx(math.sqrt(2.0 / fan_out), rel=0.05)


def test_other_timm_cnn_with_five_reductions():
    backbone = create_backbone("efficientnet_b0")
    shapes = {k: v.shape[-1] for k, v in backbone(torch.randn(1, 3, 64, 64)).items()}
    assert shapes == {"feature1": 32, "feature2": 16, "feature3": 8, "feature4": 4, "feature5": 2}


@pytest.mark.parametrize(
    "name, message",
    [("resnet5", "unknown architecture 'resnet5'"), ("convnext_tiny", "cannot give five feature maps"),
     ("vit_tiny_patch16_224", "five")],
)
def test_bad_architectures_are_named(name, message):
    with pytest.raises(ValueError, match=message):
        create_backbone(name)


def test_bad_conv_init():
    with pytest.raises(ValueError, match="unknown conv_init"):
        create_backbone("resnet18", conv_init="xavier")


def test_backbone_is_an_nn_module_with_no_wrapper_prefix():
    backbone = create_backbone("resnet18")
    assert isinstance(backbone, nn.Module)
    assert next(iter(backbone.state_dict())) == "conv1.weight"
