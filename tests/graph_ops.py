"""``graph.Ops`` over torch: runs sdport's plain-function components where diffusers' own modules are the oracle."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


class TorchOps:
    def tensor(self, array):
        return torch.from_numpy(np.ascontiguousarray(array, np.float32))

    def numpy(self, x):
        return x.numpy()

    def conv2d(self, x, w, b, stride, padding):
        if isinstance(padding, tuple):
            x, padding = F.pad(x, padding), 0
        return F.conv2d(x, w, b, stride=stride, padding=padding)

    def matmul(self, a, b):
        return a @ b

    def transpose(self, x, perm):
        return x.permute(*perm)

    def reshape(self, x, shape):
        return x.reshape(shape)

    def concat(self, xs, axis):
        return torch.cat(xs, axis)

    def mean(self, x, axes):
        return x.mean(dim=axes, keepdim=True)

    def rsqrt(self, x):
        return torch.rsqrt(x)

    def softmax(self, x):
        return torch.softmax(x, -1)

    def sigmoid(self, x):
        return torch.sigmoid(x)

    def erf(self, x):
        return torch.erf(x)

    def upsample2x(self, x):
        return F.interpolate(x, scale_factor=2.0, mode="nearest")

    def shape(self, x):
        return tuple(x.shape)
