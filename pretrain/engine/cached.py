"""GradCache (Gao et al. 2021): gradient accumulation that gives exactly the one-big-batch gradient for losses
that couple the samples of a batch (contrastive), at the memory of one micro-batch.

    1. embed every micro-batch without a graph, remembering the RNG state it started from;
    2. the loss once over all of them (leaf tensors): d loss / d features, d loss / d scale, d loss / d bias;
    3. per micro-batch, replay the RNG (dropout, drop-path, patch dropout draw the same numbers) and backpropagate
       <features, cached gradient> through the towers; the scale/bias terms ride on the last micro-batch only.

The engine runs step 3 through its wrapped module (DDP `no_sync` except the last, DeepSpeed `backward` without
its 1/k scaling), so gradients are reduced across ranks exactly once. An objective opts in by providing
`embed(batch)`, `loss_of(features, scale, bias)` and `forward(batch, cached=...)` (pretrain/objectives/
contrastive.py): `forward(batch, cached="graph")` -> {"features", "scale", "bias"}, and `forward(batch,
cached={...})` -> the surrogate loss.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn as nn


def uses_cache(module: nn.Module) -> bool:
    """Whether steps of this objective run through CachedStep: objectives whose loss couples the samples of a
    batch across ranks (they provide `loss_of`). With one micro-batch nothing is recomputed: the features keep
    their graph and only the split of the backward remains (the loss's collectives then never run inside an
    engine's backward, where DeepSpeed ZeRO-3's own reductions interleave with them)."""
    return callable(getattr(module, "loss_of", None))


def _rng_state(device: torch.device) -> tuple:
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return torch.get_rng_state(), cuda


def _set_rng_state(state: tuple, device: torch.device) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state(state[1], device)


class CachedStep:
    """One optimizer step's GradCache plan: `prepare` runs steps 1-2, then `chunks()` yields, per micro-batch,
    the `cached` argument for the objective's forward with the RNG already replayed."""

    def __init__(self, module: nn.Module, batches: list[dict], device: torch.device, autocast: Callable):
        self.module, self.batches, self.device, self.autocast = module, batches, device, autocast

    def prepare(self, call: Callable | None = None) -> dict:
        """Steps 1 and 2. Returns the objective's output over the whole batch (loss and logged scalars).

        One micro-batch: `call` (the engine's wrapped module) embeds it WITH a graph, kept for `backward_single`
        (nothing is recomputed). Several: embedded without a graph through the module itself."""
        outs, self.states = [], []
        self.graph = None
        if len(self.batches) == 1 and call is not None:
            with self.autocast():
                self.graph = call(self.batches[0], cached="graph")
            outs.append(self.graph)
        else:
            with torch.no_grad():
                for batch in self.batches:
                    self.states.append(_rng_state(self.device))
                    with self.autocast():
                        outs.append(self.module(batch, cached="graph"))  # __call__: ZeRO-3 gathers weights
        feats = [o["features"] for o in outs]
        self.sizes = [next(iter(f.values())).shape[0] for f in feats]
        whole = {}
        for key in feats[0]:
            t = torch.cat([f[key] for f in feats]) if len(feats) > 1 else feats[0][key]
            whole[key] = t.detach().requires_grad_(t.is_floating_point())
        scale = outs[0]["scale"].detach().requires_grad_()
        bias = None if outs[0]["bias"] is None else outs[0]["bias"].detach().requires_grad_()
        with self.autocast():
            loss = self.module.loss_of(whole, scale, bias)
        loss.backward()  # collectives inside (gathers) run on every rank alike
        self.grads = {k: v.grad for k, v in whole.items() if v.grad is not None}
        self.scale_grad = scale.grad
        self.bias_grad = None if bias is None else bias.grad
        from pretrain.objectives.contrastive import scalars

        return {"loss": loss.detach(), **scalars(scale, bias)}

    def surrogate_single(self) -> torch.Tensor:
        """One micro-batch: the surrogate over the features `prepare` embedded with their graph."""
        from pretrain.objectives.contrastive import surrogate

        g = self.graph
        cached = {"grads": self.grads, "scale": self.scale_grad, "bias": self.bias_grad}
        return surrogate(g["features"], cached, g["scale"], g["bias"])

    def chunks(self):
        """Yield (i, batch, cached) for every micro-batch, with the RNG as it was when step 1 embedded it."""
        start = 0
        last = len(self.batches) - 1
        for i, (batch, size) in enumerate(zip(self.batches, self.sizes)):
            grads = {k: g[start : start + size] for k, g in self.grads.items()}
            start += size
            _set_rng_state(self.states[i], self.device)
            yield (
                i,
                batch,
                {
                    "grads": grads,
                    "scale": self.scale_grad if i == last else None,
                    "bias": self.bias_grad if i == last else None,
                },
            )
