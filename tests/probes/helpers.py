"""Models shared by the probe tests."""

from torch import nn


class TupleInputs(nn.Module):
    """`net` on the sum of a pair of inputs: a batch whose inputs are a tuple."""

    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, inputs):
        first, second = inputs
        return self.net(first + second)
