import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import baselines.moco
from baselines.backbone import create_backbone
from baselines.densecl import DenseCL, dense_correspondence
from baselines.moco import MoCoV2


def make(seed=0, **kwargs):
    torch.manual_seed(seed)
    return DenseCL(create_backbone("resnet18"), **kwargs)


def test_state_dict_adds_the_dense_head_and_second_queue():
    model = make(queue_size=64)
    keys = set(model.state_dict())
    assert {"encoder_q.1.mlp2.0.weight", "encoder_q.1.mlp2.0.bias", "encoder_q.1.mlp2.2.weight",
            "encoder_q.1.mlp2.2.bias"} <= keys
    assert {"queue2", "queue2_ptr"} <= keys
    assert model.encoder_q[1].mlp2[0].weight.shape == (512, 512, 1, 1)
    assert model.encoder_q[1].mlp2[2].weight.shape == (128, 512, 1, 1)


def test_dense_convs_keep_pytorch_default_init():
    conv = make(queue_size=64).encoder_q[1].mlp2[0]
    bound = 1 / math.sqrt(512)  # kaiming_uniform(a=sqrt(5)) and the default bias: U(-1/sqrt(fan_in), ..)
    assert (conv.weight.abs().max().item() <= bound
            and conv.weight.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.05))
    assert conv.bias.detach().any() and conv.bias.abs().max().item() <= bound


def test_correspondence_direction_each_query_location_takes_its_best_key_location():
    torch.manual_seed(0)
    q_b = F.normalize(torch.randn(2, 32, 6), dim=1)
    where = torch.tensor([3, 0, 5, 1, 4, 2])  # key location j holds query location where[j]
    k_b = q_b[:, :, where]
    match = dense_correspondence(q_b, k_b)
    expected = torch.argsort(where)  # query location i is found at key location argsort(where)[i]
    assert torch.equal(match, expected.expand(2, -1))
    assert not torch.equal(dense_correspondence(k_b, q_b), expected.expand(2, -1))  # direction matters


def symmetrise_convs(module: nn.Module) -> None:
    """Mirror-symmetric kernels make a ResNet exactly equivariant to horizontal flips (odd sizes)."""
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, nn.Conv2d):
                m.weight.copy_((m.weight + m.weight.flip(-1)) / 2)


def flip_recovery(model: DenseCL, im_q: torch.Tensor) -> float:
    """Fraction of query locations matched to their mirror location when the key is the flipped image."""
    with torch.no_grad():
        q_b = F.normalize(model.encoder_q[0](im_q)["feature5"].flatten(2), dim=1)
        k_b = model.keys(im_q.flip(3))[3]
        match = dense_correspondence(q_b, k_b)
    side = math.isqrt(match.shape[1])
    mirror = torch.tensor([h * side + (side - 1 - w) for h in range(side) for w in range(side)])
    return (match == mirror).float().mean().item()


def test_correspondence_recovers_a_horizontal_flip_through_shuffled_ghost_bn_keys(monkeypatch):
    model = make(queue_size=64, bn_group_size=2)
    symmetrise_convs(model.encoder_q)
    model.encoder_k.load_state_dict(model.encoder_q.state_dict())
    torch.manual_seed(1)
    # Smooth random scenes, 257 px: odd at every stride-2 layer (257 -> 129 -> 65 -> 33 -> 17 -> 9).
    im_q = 2 * F.interpolate(torch.randn(8, 3, 33, 33), size=(257, 257), mode="bilinear", align_corners=True)
    assert flip_recovery(model, im_q) > 0.95
    # Without the un-shuffle, key row i belongs to another image and the recovery collapses.
    monkeypatch.setattr(baselines.moco, "batch_unshuffle", lambda x, index: x)
    assert flip_recovery(model, im_q) < 0.3


def test_lambda_zero_gives_exactly_the_mocov2_loss():
    dense = make(queue_size=64, loss_lambda=0.0)
    torch.manual_seed(0)
    moco = MoCoV2(create_backbone("resnet18"), queue_size=64)
    moco.load_state_dict({k: v for k, v in dense.state_dict().items() if "mlp2" not in k and "queue2" not in k})
    im_q, im_k = torch.randn(4, 3, 32, 32), torch.randn(4, 3, 32, 32)
    out_dense, out_moco = dense(im_q, im_k), moco(im_q, im_k)
    assert torch.equal(out_dense["loss"], out_moco["loss"])
    assert torch.equal(out_dense["loss_global"], out_moco["loss_global"])
    assert out_dense["loss_dense"].item() > 0


def test_total_is_the_lambda_weighted_sum_and_warmup_holds_lambda_at_zero():
    model = make(queue_size=64, loss_lambda=0.5, lambda_warmup_iters=2)
    x = torch.randn(4, 3, 32, 32)
    model.iteration = 1
    out = model(x, x)
    assert out["loss_lambda"].item() == 0.0 and out["loss"].item() == out["loss_global"].item()
    model.iteration = 2
    out = model(x, x)
    assert out["loss_lambda"].item() == 0.5
    assert out["loss"].item() == pytest.approx(0.5 * out["loss_global"].item() + 0.5 * out["loss_dense"].item(),
                                               rel=1e-6)


def test_dense_negatives_are_pooled_then_normalised_keys():
    model = make(queue_size=64)
    im_q, im_k = torch.randn(4, 3, 64, 64), torch.randn(4, 3, 64, 64)
    model(im_q, im_k)
    with torch.no_grad():
        dense = model.encoder_k[1].mlp2(model.encoder_k[0](im_k)["feature5"])
    pooled_then_normalised = F.normalize(dense.mean(dim=(2, 3)), dim=1)
    mean_of_normalised = F.normalize(F.normalize(dense, dim=1).mean(dim=(2, 3)), dim=1)
    torch.testing.assert_close(model.queue2[:, :4].T, pooled_then_normalised, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(model.queue2[:, :4].T, mean_of_normalised, atol=1e-3)
    assert int(model.queue2_ptr) == 4


def test_dense_loss_has_one_row_per_location_against_its_own_negatives():
    """Identical views through identical encoders: every query location matches itself, each of the
    N * S^2 rows has positive logit 1/tau, and the loss is the mean of the rows' closed forms."""
    model = make(queue_size=64)
    x = torch.randn(2, 3, 64, 64)
    queue2 = model.queue2.clone()
    out = model(x, x)
    with torch.no_grad():
        q_grid = F.normalize(model.encoder_q[1](model.encoder_q[0](x)["feature5"])[1], dim=1)
    rows = q_grid.transpose(1, 2).reshape(-1, 128)
    assert rows.shape[0] == 2 * 2 * 2
    negatives = rows @ queue2 / 0.2
    positive = torch.full((rows.shape[0], 1), 1 / 0.2)
    expected = (torch.logsumexp(torch.cat([positive, negatives], 1), 1) - 1 / 0.2).mean()
    assert out["loss_dense"].item() == pytest.approx(expected.item(), rel=1e-4)
    assert out["acc_dense"].item() == 100.0
