"""``core.optim.cosine_adam``: the written-out Adam of the per-pair optimisations is torch's Adam with
torch's cosine decay, step for step."""

from __future__ import annotations

import torch

from cyclereg.core.optim import cosine_adam


def _loss(p, q, target):
    return ((p - target) ** 2).sum() + (q ** 4).sum() + (p.sum() * q.sum()) ** 2


def test_it_follows_torch_adam_with_cosine_annealing():
    target = torch.randn(5, dtype=torch.float64)
    start_p, start_q = torch.randn(5, dtype=torch.float64), torch.randn(3, dtype=torch.float64)
    p, q = start_p.clone().requires_grad_(), start_q.clone().requires_grad_()
    cosine_adam([(p, 0.1), (q, 0.03)], lambda: _loss(p, q, target), 25)
    ref_p, ref_q = start_p.clone().requires_grad_(), start_q.clone().requires_grad_()
    optimizer = torch.optim.Adam([{"params": [ref_p], "lr": 0.1}, {"params": [ref_q], "lr": 0.03}])
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=25)
    for _ in range(25):
        optimizer.zero_grad()
        _loss(ref_p, ref_q, target).backward()
        optimizer.step()
        schedule.step()
    torch.testing.assert_close(p.detach(), ref_p.detach())
    torch.testing.assert_close(q.detach(), ref_q.detach())
    assert not torch.allclose(p.detach(), start_p)


def test_it_stops_when_the_loss_is_none():
    p = torch.ones(2, requires_grad=True)
    calls = []

    def loss():
        calls.append(1)
        return (p ** 2).sum() if len(calls) <= 3 else None

    cosine_adam([(p, 0.1)], loss, 10)
    assert len(calls) == 4
    torch.testing.assert_close(p.detach(), torch.full((2,), 1 - 3 * 0.1), atol=0.02, rtol=0)
