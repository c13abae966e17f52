"""SGD with momentum and Adam, the two optimizers local training uses, written out.

torch.optim's optimizers import torch._dynamo (the compiler, and sympy with it: 800-odd modules)
the first time one steps, because their methods are wrapped to keep the compiler out. A board never
compiles anything, and on the CPU build that import is 73 MB of a training client's 360 MB peak
(benchmarks/results/client_memory.md): more than a 512 MB Raspberry Pi can spare. These follow
torch.optim's single-tensor code operation for operation, so results are bit for bit the same
(tests/test_optim.py compares them step by step).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch


class _Optimizer:
    def __init__(self, params: Iterable[torch.Tensor]) -> None:
        self.params = [p for p in params if p.requires_grad]

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p in self.params:
            if set_to_none:
                p.grad = None
            elif p.grad is not None:
                p.grad.zero_()


class SGD(_Optimizer):
    """torch.optim.SGD without dampening or Nesterov: weight decay added to the gradient, then a
    momentum buffer that starts as the first gradient."""

    def __init__(self, params: Iterable[torch.Tensor], lr: float, momentum: float = 0.0,
                 weight_decay: float = 0.0) -> None:
        super().__init__(params)
        self.lr, self.momentum, self.weight_decay = lr, momentum, weight_decay
        self._buffers: dict[int, torch.Tensor] = {}

    @torch.no_grad()
    def step(self) -> None:
        for i, p in enumerate(self.params):
            if p.grad is None:
                continue
            grad = p.grad
            if self.weight_decay != 0:
                grad = grad.add(p, alpha=self.weight_decay)
            if self.momentum != 0:
                buf = self._buffers.get(i)
                if buf is None:
                    buf = self._buffers[i] = torch.clone(grad).detach()
                else:
                    buf.mul_(self.momentum).add_(grad)
                grad = buf
            p.add_(grad, alpha=-self.lr)


class Adam(_Optimizer):
    """torch.optim.Adam (not AMSGrad, not decoupled weight decay): per-parameter step counts, so a
    parameter without a gradient in a step (a DCGAN's discriminator during the generator's step)
    keeps its own bias correction, as in torch."""

    def __init__(self, params: Iterable[torch.Tensor], lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.0) -> None:
        super().__init__(params)
        self.lr, self.betas, self.eps, self.weight_decay = lr, tuple(betas), eps, weight_decay
        self._state: dict[int, tuple[list[int], torch.Tensor, torch.Tensor]] = {}

    @torch.no_grad()
    def step(self) -> None:
        beta1, beta2 = self.betas
        for i, p in enumerate(self.params):
            if p.grad is None:
                continue
            grad = p.grad
            if i not in self._state:
                self._state[i] = ([0], torch.zeros_like(p, memory_format=torch.preserve_format),
                                  torch.zeros_like(p, memory_format=torch.preserve_format))
            count, exp_avg, exp_avg_sq = self._state[i]
            count[0] += 1
            step = float(count[0])
            if self.weight_decay != 0:
                grad = grad.add(p, alpha=self.weight_decay)
            exp_avg.lerp_(grad, 1 - beta1)
            exp_avg_sq.mul_(beta2).addcmul_(grad, grad.conj(), value=1 - beta2)
            bias_correction1 = 1 - beta1**step
            bias_correction2 = 1 - beta2**step
            step_size = self.lr / bias_correction1
            denom = (exp_avg_sq.sqrt() / bias_correction2**0.5).add_(self.eps)
            p.addcdiv_(exp_avg, denom, value=-step_size)
