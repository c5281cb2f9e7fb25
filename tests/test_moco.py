import math

import pytest
import torch
import torch.nn.functional as F

from baselines.backbone import create_backbone
from baselines.densecl import DenseCL, dense_correspondence
from baselines.moco import MoCoV2, dequeue_and_enqueue, info_nce, momentum_update


def make(cls=MoCoV2, seed=0, **kwargs):
    torch.manual_seed(seed)
    return cls(create_backbone("resnet18"), **kwargs)


def perturb_query(model, scale=0.05):
    with torch.no_grad():
        for p in model.encoder_q.parameters():
            p.add_(torch.randn_like(p) * scale)


def test_official_state_dict_layout():
    keys = list(make(queue_size=64).state_dict())
    assert "encoder_q.0.conv1.weight" in keys and "encoder_q.0.layer4.1.bn2.num_batches_tracked" in keys
    assert {k for k in keys if k.startswith("encoder_q.1.")} == {
        "encoder_q.1.mlp.0.weight", "encoder_q.1.mlp.0.bias", "encoder_q.1.mlp.2.weight", "encoder_q.1.mlp.2.bias"
    }
    assert {k.replace("encoder_k", "encoder_q") for k in keys if k.startswith("encoder_k.")} == {
        k for k in keys if k.startswith("encoder_q.")
    }
    assert {k for k in keys if not k.startswith("encoder_")} == {"queue", "queue_ptr"}


def test_key_encoder_starts_as_a_frozen_copy_and_queue_is_unit_columns():
    model = make(queue_size=64)
    for q, k in zip(model.encoder_q.parameters(), model.encoder_k.parameters(), strict=True):
        assert torch.equal(q, k) and not k.requires_grad
    assert model.queue.shape == (128, 64)
    torch.testing.assert_close(model.queue.norm(dim=0), torch.ones(64))
    head = model.encoder_q[1].mlp
    assert head[0].weight.shape == (512, 512) and head[2].weight.shape == (128, 512)
    assert head[0].weight.std().item() == pytest.approx(math.sqrt(2 / 512), rel=0.05)  # kaiming fan_in
    assert not head[0].bias.detach().any()


def test_momentum_update_math_parameters_only():
    model = make(queue_size=64)
    perturb_query(model)
    with torch.no_grad():
        model.encoder_k[0].bn1.running_mean.fill_(3.0)
    before_k = [p.clone() for p in model.encoder_k.parameters()]
    momentum_update(model.encoder_q, model.encoder_k, 0.9)
    for q, k0, k in zip(model.encoder_q.parameters(), before_k, model.encoder_k.parameters(), strict=True):
        torch.testing.assert_close(k, 0.9 * k0 + 0.1 * q)
    assert bool((model.encoder_k[0].bn1.running_mean == 3.0).all())  # buffers are not copied


def test_keys_use_the_updated_key_encoder():
    """The update runs before the key forward: enqueued keys equal the post-update encoder's keys."""
    model = make(queue_size=64, momentum=0.5)
    perturb_query(model, 0.2)
    im_q, im_k = torch.randn(4, 3, 32, 32), torch.randn(4, 3, 32, 32)
    model(im_q, im_k)
    with torch.no_grad():
        expected = F.normalize(model.encoder_k[1](model.encoder_k[0](im_k)["feature5"]), dim=1)
    torch.testing.assert_close(model.queue[:, :4].T, expected, rtol=1e-4, atol=1e-5)


def test_info_nce_against_float64():
    torch.manual_seed(0)
    q, k = F.normalize(torch.randn(6, 16), dim=1), F.normalize(torch.randn(6, 16), dim=1)
    queue = F.normalize(torch.randn(16, 40), dim=0)
    loss, top1 = info_nce(q, k, queue, 0.2)
    qd, kd, nd = q.double(), k.double(), queue.double()
    pos = (qd * kd).sum(1) / 0.2
    neg = qd @ nd / 0.2
    expected = (torch.logsumexp(torch.cat([pos[:, None], neg], 1), 1) - pos).mean()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    assert top1.item() == pytest.approx(100.0 * float((pos > neg.max(1).values).double().mean()))


def test_queue_pointer_wraps_and_enqueue_follows_the_loss():
    model = make(queue_size=16)
    torch.manual_seed(1)
    for step in range(5):
        im_q, im_k = torch.randn(4, 3, 32, 32), torch.randn(4, 3, 32, 32)
        queue_before = model.queue.clone()
        q = F.normalize(model.encoder_q[1](model.encoder_q[0](im_q)["feature5"]), dim=1).detach()
        out = model(im_q, im_k)
        k = model.queue[:, (4 * step) % 16 : (4 * step) % 16 + 4].T
        # The loss saw the queue as it was *before* this step's keys were written.
        expected, _ = info_nce(q, k, queue_before, 0.2)
        assert out["loss"].item() == pytest.approx(expected.item(), rel=1e-4)
        assert int(model.queue_ptr) == (4 * (step + 1)) % 16
        changed = (model.queue != queue_before).any(0).nonzero().flatten().tolist()
        assert changed == list(range((4 * step) % 16, (4 * step) % 16 + 4))


def test_enqueue_rejects_a_batch_that_does_not_divide_the_queue():
    queue, ptr = torch.zeros(8, 10), torch.zeros(1, dtype=torch.long)
    with pytest.raises(ValueError, match="not divisible by the global batch 4"):
        dequeue_and_enqueue(queue, ptr, torch.ones(4, 8))


def test_gradients_reach_the_query_branch_only():
    model = make(queue_size=64)
    out = model(torch.randn(4, 3, 32, 32), torch.randn(4, 3, 32, 32))
    out["loss"].backward()
    assert all(p.grad is not None for p in model.encoder_q.parameters())
    assert all(p.grad is None for p in model.encoder_k.parameters())
    assert not model.queue.requires_grad


@pytest.mark.parametrize("cls", [MoCoV2, DenseCL])
def test_loss_at_initialisation_is_ln_k_plus_one_less_the_positive_head_start(cls):
    """At init the queue holds random unit vectors, so every negative logit n_j is ~0 and
    loss = ln(e^p + sum_j e^n_j) - p ~ ln(K + 1) - (p - mean n) + var(n)/2.
    The key encoder starts as a copy of the query encoder, so the positive logit p is well above
    the negatives (as in the official log's first iterations, spec §5.4); removing that head
    start must leave ln(K + 1), for the global and for the dense branch."""
    K, tau = 4096, 0.2
    model = make(cls, queue_size=K)
    im_q, im_k = torch.randn(8, 3, 64, 64), torch.randn(8, 3, 64, 64)
    queues = {"queue": model.queue.clone(), "queue2": getattr(model, "queue2", model.queue).clone()}
    out = model(im_q, im_k)
    with torch.no_grad():
        feat_q = model.encoder_q[0](im_q)["feature5"]
        keys = model.keys(im_k)
        heads = model.encoder_q[1](feat_q)
        rows = {"loss_global": (heads[0] if cls is DenseCL else heads, keys[0], queues["queue"])}
        if cls is DenseCL:
            match = dense_correspondence(F.normalize(feat_q.flatten(2), dim=1), keys[3])
            k_grid = keys[1].gather(2, match.unsqueeze(1).expand(-1, 128, -1))
            rows["loss_dense"] = (heads[1].transpose(1, 2).reshape(-1, 128), k_grid.transpose(1, 2).reshape(-1, 128),
                                  queues["queue2"])
    for name, (q, k, queue) in rows.items():
        q = F.normalize(q, dim=1)
        pos = (q * k).sum(1) / tau
        head_start = (pos - (q @ queue / tau).mean(1)).mean().item()
        assert head_start > 1.0  # the positive is easy at init
        assert out[name].item() + head_start == pytest.approx(math.log(K + 1), abs=0.25), name
