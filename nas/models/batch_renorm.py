"""Batch Renormalization (Ioffe, 2017): BatchNorm whose batch statistics are corrected toward
the running ones by r and d, clipped to [1/r_max, r_max] and [-d_max, d_max].

    x_hat = (x - mu_B) / sigma_B * r + d,   r = clip(sigma_B / sigma, 1/r_max, r_max),
                                            d = clip((mu_B - mu) / sigma, -d_max, d_max)

r and d carry no gradient. As in the paper, the limits stay at 1 and 0 (plain BatchNorm) until
the running statistics have converged, `delay` steps (by default CONVERGED_AFTER / momentum:
an exponential average then weighs its start by (1 - momentum)^delay < e^-3, so it is 95 %
converged), and then relax linearly to r_max and d_max over `warmup` steps. Evaluation uses
the running statistics, as BatchNorm does. With r_max = 1 and d_max = 0 it is BatchNorm in
training mode.
"""

from __future__ import annotations

import math

import torch
from torch import nn

CONVERGED_AFTER = 3.0  # steps in multiples of 1 / momentum before r and d may correct anything


class BatchRenorm(nn.Module):
    def __init__(
        self,
        num_features: int,
        dims: int,
        momentum: float = 0.1,
        eps: float = 1e-5,
        affine: bool = True,
        r_max: float = 3.0,
        d_max: float = 5.0,
        warmup: int = 1000,
        delay: int | None = None,
    ):
        super().__init__()
        self.num_features, self.dims = num_features, dims
        self.momentum, self.eps, self.affine = momentum, eps, affine
        self.r_max, self.d_max, self.warmup = r_max, d_max, warmup
        self.delay = math.ceil(CONVERGED_AFTER / momentum) if delay is None else delay
        self.weight = nn.Parameter(torch.ones(num_features)) if affine else None
        self.bias = nn.Parameter(torch.zeros(num_features)) if affine else None
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))
        self.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long))

    def limits(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(r_max, d_max) at the current step: 1 and 0 for `delay` steps, then relaxed over `warmup`, as tensors
        (no device sync)."""
        relaxing = self.num_batches_tracked.float() - self.delay
        done = (relaxing / max(self.warmup, 1)).clamp(min=0.0, max=1.0)
        if self.warmup <= 0:
            done = (relaxing >= 0).float()
        return 1.0 + (self.r_max - 1.0) * done, self.d_max * done

    def _shape(self, t: torch.Tensor) -> torch.Tensor:
        return t.view(1, -1, *([1] * self.dims))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.to(torch.promote_types(x.dtype, torch.float32))  # bf16 under autocast computes in float32; float64 stays
        if self.training:
            axes = [0, *range(2, x.dim())]
            mean = xf.mean(axes)
            var = xf.var(axes, unbiased=False)
            std = (var + self.eps).sqrt()
            running_std = (self.running_var + self.eps).sqrt()
            r_max, d_max = self.limits()
            with torch.no_grad():
                r = torch.minimum(torch.maximum(std / running_std, 1.0 / r_max), r_max)
                d = torch.minimum(torch.maximum((mean - self.running_mean) / running_std, -d_max), d_max)
                n = xf.numel() / xf.shape[1]
                self.running_mean.lerp_(mean, self.momentum)
                self.running_var.lerp_(var * n / max(n - 1, 1), self.momentum)
                self.num_batches_tracked.add_(1)
            out = (xf - self._shape(mean)) / self._shape(std) * self._shape(r) + self._shape(d)
        else:
            out = (xf - self._shape(self.running_mean)) / self._shape((self.running_var + self.eps).sqrt())
        if self.affine:
            out = out * self._shape(self.weight) + self._shape(self.bias)
        return out.to(x.dtype)

    def extra_repr(self) -> str:
        return (
            f"{self.num_features}, momentum={self.momentum}, eps={self.eps}, affine={self.affine}, r_max={self.r_max}, "
            f"d_max={self.d_max}, delay={self.delay}, warmup={self.warmup}"
        )
