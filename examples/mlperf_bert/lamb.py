"""LAMB (You et al. 2019, "Large Batch Optimization for Deep Learning", Algorithm 2) and the
MLPerf BERT learning-rate schedule.

Written here because the maintained implementations available offline pull in heavy dependencies
(timm's imports torchvision). Per tensor x with gradient g, step t:

    m = b1 m + (1 - b1) g                 v = b2 v + (1 - b2) g^2
    m_hat = m / (1 - b1^t)                v_hat = v / (1 - b2^t)          (bias_correction)
    u = m_hat / (sqrt(v_hat) + eps) + wd x
    r = ||x|| / ||u||   (1 if either norm is 0)                           (layer adaptation)
    x = x - lr r u

As in NVIDIA's FusedLAMB used by MLPerf's BERT submissions (use_nvlamb=False), a group without
weight decay (biases, LayerNorm) gets neither decay nor the trust ratio: it is updated like Adam.
Gradient clipping by the global norm (MLPerf: 1.0) is left to the caller (Trainer's max_grad_norm).
"""

import math

import torch
from torch.optim.lr_scheduler import LambdaLR

# MLPerf BERT excludes these from weight decay (and so from layer adaptation).
NO_DECAY = ("bias", "LayerNorm", "layer_norm", "gamma", "beta")


class Lamb(torch.optim.Optimizer):
    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.01,
                 bias_correction=True, adapt=None):
        if lr < 0 or eps < 0 or weight_decay < 0:
            raise ValueError(f"invalid lr={lr}, eps={eps} or weight_decay={weight_decay}")
        if not (0.0 <= betas[0] < 1.0 and 0.0 <= betas[1] < 1.0):
            raise ValueError(f"invalid betas {betas}")
        # adapt=None: trust ratio only where weight decay is on (see the module docstring).
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                        bias_correction=bias_correction, adapt=adapt)
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            if any(p.grad.is_sparse for p in params):
                raise RuntimeError("Lamb does not support sparse gradients")
            b1, b2 = group["betas"]
            wd, eps, lr = group["weight_decay"], group["eps"], group["lr"]
            adapt = group["adapt"] if group["adapt"] is not None else wd != 0
            grads, ms, vs = [], [], []
            for p in params:
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["step"] += 1
                grads.append(p.grad)
                ms.append(state["exp_avg"])
                vs.append(state["exp_avg_sq"])
            # Every tensor of a group is stepped together, so one step count serves the group.
            t = self.state[params[0]]["step"]
            bc1 = 1.0 - b1**t if group["bias_correction"] else 1.0
            bc2 = 1.0 - b2**t if group["bias_correction"] else 1.0

            # foreach ops: a few hundred tensors per step, one launch per op instead of per tensor.
            torch._foreach_mul_(ms, b1)
            torch._foreach_add_(ms, grads, alpha=1.0 - b1)
            torch._foreach_mul_(vs, b2)
            torch._foreach_addcmul_(vs, grads, grads, value=1.0 - b2)
            denom = torch._foreach_sqrt(vs)
            torch._foreach_div_(denom, math.sqrt(bc2))
            torch._foreach_add_(denom, eps)
            updates = torch._foreach_div(ms, denom)
            torch._foreach_div_(updates, bc1)
            if wd != 0:
                torch._foreach_add_(updates, params, alpha=wd)
            if adapt:
                w_norm = torch.stack(torch._foreach_norm(params))
                u_norm = torch.stack(torch._foreach_norm(updates))
                # Kept on the device: no host sync per step.
                ratio = torch.where((w_norm > 0) & (u_norm > 0), w_norm / u_norm,
                                    torch.ones_like(w_norm))
                for p, u, r in zip(params, updates, ratio.unbind()):
                    p.sub_(u * (lr * r))
            else:
                torch._foreach_add_(params, updates, alpha=-lr)
        return loss


def lamb_param_groups(model, weight_decay, no_decay=NO_DECAY):
    """Two groups, MLPerf-style: decayed (and layer-adapted) weights, and biases/LayerNorm without."""
    decay, rest = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (rest if any(k in name for k in no_decay) else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": rest, "weight_decay": 0.0}]


def warmup_poly_lambda(warmup_steps, total_steps, power=1.0):
    """lr multiplier: linear warmup from 0 to 1 over warmup_steps, then (1 - progress)^power to 0
    at total_steps (MLPerf BERT: power 1.0)."""

    def f(step):
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        span = max(1, total_steps - warmup_steps)
        return max(0.0, 1.0 - (step - warmup_steps) / span) ** power

    return f


def warmup_poly_schedule(optimizer, warmup_steps, total_steps, power=1.0):
    return LambdaLR(optimizer, warmup_poly_lambda(warmup_steps, total_steps, power))
