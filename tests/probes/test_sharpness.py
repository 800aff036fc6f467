import pytest
import torch
from torch import nn

from fastbn.probes import top_hessian_eigenvalue


@pytest.mark.parametrize("batch_norm", [False, True])
def test_top_eigenvalue_matches_the_dense_hessian(batch_norm):
    torch.manual_seed(0)
    middle = [nn.BatchNorm1d(4)] if batch_norm else []
    stock = nn.Sequential(nn.Linear(3, 4), *middle, nn.Tanh(), nn.Linear(4, 2)).double()
    inputs = torch.randn(8, 3, dtype=torch.float64)
    targets = torch.randn(8, 2, dtype=torch.float64)
    criterion = nn.MSELoss()
    names = [n for n, _ in stock.named_parameters()]
    shapes = [p.shape for p in stock.parameters()]
    flat = torch.cat([p.detach().reshape(-1) for p in stock.parameters()])

    def loss(vector):  # stock torch, BN on batch statistics (running stats passed as copies)
        params, offset = {}, 0
        for name, shape in zip(names, shapes):
            params[name] = vector[offset:offset + shape.numel()].reshape(shape)
            offset += shape.numel()
        buffers = {k: b.clone() for k, b in stock.named_buffers()}
        return criterion(torch.func.functional_call(stock, {**params, **buffers}, (inputs,)),
                         targets)

    expected = torch.linalg.eigvalsh(torch.autograd.functional.hessian(loss, flat))[-1].item()
    before = {k: v.clone() for k, v in stock.state_dict().items()}
    value = top_hessian_eigenvalue(stock, criterion, (inputs, targets), tol=1e-8,
                                   max_iter=len(flat))
    assert value == pytest.approx(expected, rel=1e-5)
    assert all(torch.equal(before[k], v) for k, v in stock.state_dict().items())
