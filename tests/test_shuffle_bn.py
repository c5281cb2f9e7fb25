import pytest
import torch
from torch import nn

from baselines.backbone import create_backbone
from baselines.shuffle_bn import GhostBatchNorm2d, batch_shuffle, batch_unshuffle, convert_to_ghost_bn


def test_ghost_bn_equals_plain_bn_per_group():
    torch.manual_seed(0)
    plain = nn.BatchNorm2d(5)
    nn.init.uniform_(plain.weight)
    nn.init.uniform_(plain.bias)
    ghost = convert_to_ghost_bn(nn.Sequential(plain), group_size=4)[0]
    assert isinstance(ghost, GhostBatchNorm2d)
    reference = nn.BatchNorm2d(5)
    reference.load_state_dict(plain.state_dict())
    x = torch.randn(12, 5, 3, 3) * 3 + 1
    y = ghost(x)
    expected, means, variances = [], [], []
    for chunk in x.split(4):
        bn = nn.BatchNorm2d(5)
        bn.load_state_dict(reference.state_dict())
        expected.append(bn(chunk))
        means.append(bn.running_mean)
        variances.append(bn.running_var)
    torch.testing.assert_close(y, torch.cat(expected), rtol=1e-5, atol=1e-5)
    # One running-statistics update per step, from the mean of the groups' statistics.
    torch.testing.assert_close(ghost.running_mean, torch.stack(means).mean(0))
    torch.testing.assert_close(ghost.running_var, torch.stack(variances).mean(0))
    assert int(ghost.num_batches_tracked) == 1


def test_ghost_bn_gradients_match_per_group_bn():
    torch.manual_seed(1)
    x = torch.randn(8, 3, 4, 4, requires_grad=True)
    ghost = GhostBatchNorm2d(3)
    ghost.group_size = 4
    (ghost(x) ** 3).sum().backward()
    x2 = x.detach().clone().requires_grad_(True)
    bn = nn.BatchNorm2d(3)
    (torch.cat([bn(c) for c in x2.split(4)]) ** 3).sum().backward()
    torch.testing.assert_close(x.grad, x2.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(ghost.weight.grad, bn.weight.grad, rtol=1e-4, atol=1e-5)


def test_ghost_bn_eval_and_state_dict_are_plain_bn():
    backbone = create_backbone("resnet18")
    keys = list(backbone.state_dict())
    convert_to_ghost_bn(backbone, 2)
    assert list(backbone.state_dict()) == keys
    assert sum(isinstance(m, GhostBatchNorm2d) for m in backbone.modules()) == 20
    backbone.eval()
    plain = create_backbone("resnet18").eval()
    plain.load_state_dict(backbone.state_dict())
    x = torch.randn(4, 3, 32, 32)
    torch.testing.assert_close(backbone(x)["feature5"], plain(x)["feature5"])


def test_ghost_bn_rejects_uneven_batches():
    ghost = GhostBatchNorm2d(3)
    ghost.group_size = 4
    with pytest.raises(ValueError, match="does not split into groups of 4"):
        ghost(torch.randn(6, 3, 2, 2))


def test_single_process_shuffle_round_trip():
    torch.manual_seed(0)
    x = torch.arange(10.0).view(10, 1)
    shuffled, unshuffle_index = batch_shuffle(x)
    assert not torch.equal(shuffled, x) and sorted(shuffled.flatten().tolist()) == x.flatten().tolist()
    torch.testing.assert_close(batch_unshuffle(shuffled * 2, unshuffle_index), x * 2)
