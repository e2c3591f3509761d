"""A model for tests of parameters some ranks do not use: `extra` takes part only when forward is asked to."""

from distbp import nn


class TwoHeads(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Linear(4, 4)
        self.extra = nn.Linear(4, 4)

    def forward(self, x, use_extra):
        h = self.body(x)
        return (self.extra(h) if use_extra else h).sum()
