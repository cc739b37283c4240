"""Exact distributed contrastive losses: CLIP (InfoNCE), SigLIP (sigmoid) and FILIP (token-wise late interaction).

Every rank passes its local batch: b samples, the same b on every rank, so the global batch is N = W·b over W
ranks. The other ranks' features arrive through communication that carries gradient back to where they came
from (an all-gather whose backward sums the gathered gradients over ranks, or a ring of neighbour exchanges whose
backward runs the ring in reverse). Hence, for the loss L_r returned on rank r and the global-batch loss L:

- (1/W) Σ_r L_r = L;
- the gradient reaching rank r's features is Σ_r' ∂L_r'/∂x_r = W · ∂L/∂x_r, so DDP's mean over ranks of the
  parameter gradients is exactly ∂L/∂θ (open_clip's `local_loss` + `gather_with_grad`, its only exact pair of
  flags; here exactness is the only mode). Code that reuses raw feature gradients (GradCache) must expect the W;
- `scale` and `bias` are replicated, never communicated: rank r gets ∂L_r/∂s, whose mean over ranks is ∂L/∂s.

Without torch.distributed (not initialized, or world size 1) every function is the plain loss of the one batch.
Losses are computed in float32 at least (float64 stays float64) in log-softmax / log-sigmoid form; communication
happens in the features' own dtype. Nothing here modifies its inputs in place.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

# ---------------------------------------------------------------------------------------------- communication


def world() -> tuple[int, int]:
    """(rank, world size) of the default process group; (0, 1) when torch.distributed is not initialized."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class _AllGather(torch.autograd.Function):
    """(b, ...) on every rank -> (W·b, ...) in rank order. Backward: every rank's gradient of the gathered tensor
    is summed over ranks and rank r keeps its own slice (what torch.distributed.nn's all_gather does, written
    out so the reduction is ours: an all-reduce, since gloo has no reduce-scatter)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        rank, size = world()
        ctx.rank, ctx.b = rank, x.shape[0]
        x = x.contiguous()
        parts = [torch.empty_like(x) for _ in range(size)]
        dist.all_gather(parts, x)
        return torch.cat(parts, 0)  # (W·b, ...)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous().clone()  # all_reduce works in place; never on a buffer autograd may share
        dist.all_reduce(grad)  # Σ_r' ∂L_r'/∂gathered, (W·b, ...)
        return grad[ctx.rank * ctx.b : (ctx.rank + 1) * ctx.b].clone()  # own slice, not a view of the whole


def all_gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """(b, ...) -> (W·b, ...), every rank's tensor in rank order, gradient flowing back to each rank's slot.
    All ranks must pass the same shape. Single process: `x` itself."""
    if world()[1] == 1:
        return x
    return _AllGather.apply(x)


def all_gather_no_grad(x: torch.Tensor) -> torch.Tensor:
    """(b, ...) -> (W·b, ...) without gradient (masks, labels). Bool tensors travel as uint8."""
    if world()[1] == 1:
        return x
    wire = x.to(torch.uint8) if x.dtype == torch.bool else x.contiguous()
    parts = [torch.empty_like(wire) for _ in range(world()[1])]
    dist.all_gather(parts, wire)
    out = torch.cat(parts, 0)
    return out.bool() if x.dtype == torch.bool else out


def _exchange(send_to: int, recv_from: int, x: torch.Tensor) -> torch.Tensor:
    """One P2P round: send `x` to rank `send_to` while receiving a tensor of the same shape from `recv_from`."""
    x = x.contiguous()
    out = torch.empty_like(x)
    ops = [dist.P2POp(dist.isend, x, send_to), dist.P2POp(dist.irecv, out, recv_from)]
    for req in dist.batch_isend_irecv(ops):
        req.wait()
    return out


class _NeighbourExchange(torch.autograd.Function):
    """Forward: send x to `send_to`, return what `recv_from` sent. Backward: the gradient of what was received
    goes back to its sender, and the gradient of what was sent comes back from its receiver."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, send_to: int, recv_from: int) -> torch.Tensor:
        ctx.send_to, ctx.recv_from = send_to, recv_from
        return _exchange(send_to, recv_from, x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return _exchange(ctx.recv_from, ctx.send_to, grad), None, None


def neighbour_exchange(x: torch.Tensor, send_to: int, recv_from: int) -> torch.Tensor:
    """Send `x` to rank `send_to`, receive the same shape from `recv_from`, with autograd through the P2P.
    Every rank must call it in the same order (ring patterns: `ring_pass`)."""
    return _NeighbourExchange.apply(x, send_to, recv_from)


def ring_pass(x: torch.Tensor) -> torch.Tensor:
    """One step of the ring: send to rank + 1, return the tensor of rank − 1 (mod W), with autograd. Calling it
    k times on rank r yields rank (r − k) mod W's tensor. Single process: `x` itself."""
    rank, size = world()
    if size == 1:
        return x
    return neighbour_exchange(x, (rank + 1) % size, (rank - 1) % size)


# ---------------------------------------------------------------------------------------------- helpers


def _wide(x: torch.Tensor) -> torch.Tensor:
    """At least float32 for the loss math (bf16/fp16 features are upcast; float64 stays)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def _logits(a: torch.Tensor, b: torch.Tensor, scale, bias) -> torch.Tensor:
    """(m, E) x (n, E) -> (m, n): scale·⟨a_i, b_j⟩ (+ bias)."""
    logits = scale * (a @ b.T)  # (m, n)
    return logits if bias is None else logits + bias


def _check_pair(name: str, image: torch.Tensor, text: torch.Tensor, ndim: int) -> None:
    if image.ndim != ndim or text.ndim != ndim:
        want = "(b, E)" if ndim == 2 else "(b, n, E)"
        raise ValueError(
            f"{name}: features must be {want}, got image {tuple(image.shape)} and text {tuple(text.shape)}"
        )
    if image.shape[0] != text.shape[0] or image.shape[-1] != text.shape[-1]:
        raise ValueError(
            f"{name}: image and text need the same batch size b and width E, got image {tuple(image.shape)} "
            f"and text {tuple(text.shape)}"
        )


def _local_labels(b: int, rank: int, device: torch.device) -> torch.Tensor:
    """(b,) the column of each local row's own pair in the gathered batch: arange(b) + b·rank."""
    return torch.arange(b, device=device) + b * rank


# ---------------------------------------------------------------------------------------------- CLIP


class ClipLoss(nn.Module):
    """CLIP InfoNCE, ½[CE(image→text rows) + CE(text→image rows)], mean over rows, over the global batch.

    local_loss=True: rank r builds only its b rows against all N columns (b×N logits per direction, memory linear
    in N), labels arange(b) + b·r; the mean of the rank losses is the global loss. local_loss=False: every rank
    builds the full N×N matrix and returns the global loss itself (for checks; memory quadratic in N). Either way
    the features are gathered with gradient. `bias` (optional) is added to every logit; it cancels in a softmax,
    so its gradient is 0, but a SigLIP-initialised model can share the code path.
    """

    def __init__(self, local_loss: bool = True, chunk_size: int = 0):
        super().__init__()
        if not isinstance(chunk_size, int) or chunk_size < 0:
            raise ValueError(
                f"ClipLoss chunk_size: must be an int >= 0 (0 = no chunking), got {chunk_size!r}"
            )
        if chunk_size and not local_loss:
            raise ValueError("ClipLoss chunk_size: chunks the local rows; it needs local_loss=True")
        self.local_loss, self.chunk_size = local_loss, chunk_size

    def forward(self, image_features, text_features, scale, bias=None) -> torch.Tensor:
        _check_pair("ClipLoss", image_features, text_features, ndim=2)
        rank, _ = world()
        b = image_features.shape[0]
        img_all = _wide(all_gather_with_grad(image_features))  # (N, E)
        txt_all = _wide(all_gather_with_grad(text_features))  # (N, E)
        if self.local_loss and self.chunk_size:  # rows in blocks, each recomputed in backward: O(chunk x N)
            labels = _local_labels(b, rank, image_features.device)  # (b,)
            i2t = _ce_rows(_wide(image_features), txt_all, labels, scale, bias, self.chunk_size)
            t2i = _ce_rows(_wide(text_features), img_all, labels, scale, bias, self.chunk_size)
            return 0.5 * (i2t + t2i) / b
        if self.local_loss:
            labels = _local_labels(b, rank, image_features.device)  # (b,)
            logits_i2t = _logits(_wide(image_features), txt_all, scale, bias)  # (b, N)
            logits_t2i = _logits(_wide(text_features), img_all, scale, bias)  # (b, N)
        else:
            labels = torch.arange(img_all.shape[0], device=image_features.device)  # (N,)
            logits_i2t = _logits(img_all, txt_all, scale, bias)  # (N, N)
            logits_t2i = logits_i2t.T  # (N, N)
        return 0.5 * (F.cross_entropy(logits_i2t, labels) + F.cross_entropy(logits_t2i, labels))


def _ce_block(q: torch.Tensor, keys: torch.Tensor, labels: torch.Tensor, scale, bias) -> torch.Tensor:
    return F.cross_entropy(_logits(q, keys, scale, bias), labels, reduction="sum")


def _ce_rows(q, keys, labels, scale, bias, chunk: int) -> torch.Tensor:
    """Σ over rows of CE(scale·q·keysᵀ + bias, labels), `chunk` rows at a time, each block's (chunk, N) logits
    recomputed in backward (torch.utils.checkpoint): memory O(chunk·N) instead of O(b·N)."""
    total = q.new_zeros(())
    for i in range(0, q.shape[0], chunk):
        part = checkpoint(
            _ce_block, q[i : i + chunk], keys, labels[i : i + chunk], scale, bias, use_reentrant=False
        )
        total = total + part
    return total


# ---------------------------------------------------------------------------------------------- SigLIP


def _softplus_sum(x: torch.Tensor, y: torch.Tensor, scale, bias) -> torch.Tensor:
    """Σ_ij softplus(l_ij) = Σ_ij −log σ(−l_ij) over one column chunk. Not F.softplus: its threshold turns it
    linear above 20, which is off by up to 2e-9."""
    return -F.logsigmoid(-_logits(x, y, scale, bias)).sum()  # (b, c) logits summed


def _siglip_block(x, y, scale, bias, positive: bool, chunk: int) -> torch.Tensor:
    """Σ_ij −log σ(z_ij·l_ij) over one (b, b') block, l = scale·⟨x_i, y_j⟩ + bias, z = 2·I − 1 on the diagonal
    block (`positive`: y is x's own text) and −1 elsewhere.

    chunk > 0: the sum runs over column chunks, each recomputed in backward (activation checkpointing), so the
    block never holds more than b×chunk logits; it uses −log σ(l) = softplus(l) − l, i.e. Σ softplus(l) over the
    block minus the positive logits, which come from the b own pairs directly.
    """
    if chunk <= 0:
        logits = _logits(x, y, scale, bias)  # (b, b')
        sign = -torch.ones_like(logits)
        if positive:
            sign = sign + 2 * torch.eye(*logits.shape, dtype=logits.dtype, device=logits.device)
        return -F.logsigmoid(sign * logits).sum()
    total = sum(
        checkpoint(
            _softplus_sum, x, y[c : c + chunk], scale, bias, use_reentrant=False, preserve_rng_state=False
        )
        for c in range(0, y.shape[0], chunk)
    )
    if positive:
        own = scale * (x * y).sum(-1)  # (b,) the positive logits
        total = total - (own if bias is None else own + bias).sum()
    return total


class SigLipLoss(nn.Module):
    """SigLIP: L_r = −(1/b) Σ_{i on rank r} Σ_{j=1..N} log σ(z_ij (scale·⟨x_i, y_j⟩ + bias)), z = +1 for i's own
    pair and −1 otherwise; the mean over ranks is the global loss (sum over N×N, divided by N).

    impl="ring": the text features travel around the ring W − 1 times with autograd (one b×E block in flight,
    b×b logits per block); impl="gather": one all-gather with gradient (W·b×E held). chunk_size > 0 computes each
    block in column chunks with activation checkpointing (exact; memory O(b·chunk_size) in forward and backward).
    """

    IMPLS = ("ring", "gather")

    def __init__(self, impl: str = "ring", chunk_size: int = 0):
        super().__init__()
        if impl not in self.IMPLS:
            raise ValueError(f"SigLipLoss impl: expected one of {self.IMPLS}, got {impl!r}")
        if not isinstance(chunk_size, int) or chunk_size < 0:
            raise ValueError(
                f"SigLipLoss chunk_size: must be an int >= 0 (0 = no chunking), got {chunk_size!r}"
            )
        self.impl, self.chunk_size = impl, chunk_size

    def forward(self, image_features, text_features, scale, bias=None) -> torch.Tensor:
        _check_pair("SigLipLoss", image_features, text_features, ndim=2)
        rank, size = world()
        b = image_features.shape[0]
        x = _wide(image_features)  # (b, E)
        total = _siglip_block(x, _wide(text_features), scale, bias, True, self.chunk_size)
        if self.impl == "gather":
            blocks = all_gather_with_grad(text_features).split(b)  # W × (b, E)
            for k, y in enumerate(blocks):
                if k != rank:  # the own block used the local features directly
                    total = total + _siglip_block(x, _wide(y), scale, bias, False, self.chunk_size)
        else:
            y = text_features
            for _ in range(size - 1):
                y = ring_pass(y)  # (b, E): after k passes, the texts of rank (rank − k) mod W
                total = total + _siglip_block(x, _wide(y), scale, bias, False, self.chunk_size)
        return total / b


# ---------------------------------------------------------------------------------------------- FILIP


def _late_interaction(q, q_mask, k, k_mask) -> torch.Tensor:
    """Queries (b, n_q, E) against keys (c, n_k, E) -> (b, c): for each pair, the mean over the query's valid
    tokens of the max over the key's valid tokens of ⟨q, k⟩. Invalid keys are set to −inf before the max, and
    invalid queries are selected out of the mean, so a padding token never wins, counts, or gets a gradient."""
    sim = torch.einsum("iqe,jke->ijqk", q, k)  # (b, c, n_q, n_k)
    sim = sim.masked_fill(~k_mask[None, :, None, :], float("-inf"))
    best = sim.amax(-1)  # (b, c, n_q)
    best = torch.where(q_mask[:, None, :], best, torch.zeros((), dtype=best.dtype, device=best.device))
    return best.sum(-1) / q_mask.sum(-1, keepdim=True).to(best.dtype)  # (b, c)


def _filip_block(x, x_mask, y, y_mask, x_cols, x_cols_mask, y_cols, y_cols_mask):
    """Local images/texts against a chunk of gathered columns -> (s^I (b, c), s^T (b, c))."""
    return _late_interaction(x, x_mask, y_cols, y_cols_mask), _late_interaction(
        y, y_mask, x_cols, x_cols_mask
    )


class FilipLoss(nn.Module):
    """FILIP token-wise late interaction (Yao et al., 2022), local-loss style over the gathered batch.

    Image→text: s^I_ij = mean_k max_r ⟨X_i[k], Y_j[r]⟩ (k over image i's valid tokens, r over text j's real
    tokens); text→image: s^T_ij = mean_k max_r ⟨Y_i[k], X_j[r]⟩ (k over text i's real tokens, r over image j's
    valid tokens). The two are different matrices. Loss ½[CE(scale·s^I) + CE(scale·s^T)] over the b local rows
    against the N gathered columns, labels arange(b) + b·rank; tokens are gathered with gradient. Tokens must be
    L2-normalised by the caller. text_mask (b, n2): True (or nonzero) on real tokens; image_mask (b, n1): the same
    for patches (None: all valid). chunk_size > 0 builds the b×N matrices over column chunks of the gathered batch
    with activation checkpointing, so the b·c·n1·n2 interaction tensor is bounded in forward and backward.
    """

    def __init__(self, chunk_size: int = 0):
        super().__init__()
        if not isinstance(chunk_size, int) or chunk_size < 0:
            raise ValueError(
                f"FilipLoss chunk_size: must be an int >= 0 (0 = no chunking), got {chunk_size!r}"
            )
        self.chunk_size = chunk_size

    @staticmethod
    def _mask(name: str, mask: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        if mask.shape != tokens.shape[:2]:
            raise ValueError(
                f"FilipLoss: {name} must be (b, n) = {tuple(tokens.shape[:2])}, got {tuple(mask.shape)}"
            )
        mask = mask.bool()
        if mask.device.type != "meta" and not bool(mask.any(-1).all()):  # meta: FLOP counts, no values
            rows = (~mask.any(-1)).nonzero().flatten().tolist()
            raise ValueError(f"FilipLoss: {name} has no valid token in local rows {rows}")
        return mask

    def forward(self, image_tokens, text_tokens, text_mask, scale, image_mask=None) -> torch.Tensor:
        _check_pair("FilipLoss", image_tokens, text_tokens, ndim=3)
        if image_mask is None:
            image_mask = torch.ones(image_tokens.shape[:2], dtype=torch.bool, device=image_tokens.device)
        image_mask = self._mask("image_mask", image_mask, image_tokens)  # (b, n1)
        text_mask = self._mask("text_mask", text_mask, text_tokens)  # (b, n2)
        rank, _ = world()
        b = image_tokens.shape[0]
        img_all = all_gather_with_grad(image_tokens)  # (N, n1, E)
        txt_all = all_gather_with_grad(text_tokens)  # (N, n2, E)
        img_mask_all, txt_mask_all = all_gather_no_grad(image_mask), all_gather_no_grad(text_mask)  # (N, n)
        x, y = _wide(image_tokens), _wide(text_tokens)
        n = img_all.shape[0]
        step = self.chunk_size or n
        s_i2t, s_t2i = [], []
        for c in range(0, n, step):
            args = (x, image_mask, y, text_mask, _wide(img_all[c : c + step]), img_mask_all[c : c + step])
            args += (_wide(txt_all[c : c + step]), txt_mask_all[c : c + step])
            if self.chunk_size:
                i2t, t2i = checkpoint(_filip_block, *args, use_reentrant=False, preserve_rng_state=False)
            else:
                i2t, t2i = _filip_block(*args)
            s_i2t.append(i2t)
            s_t2i.append(t2i)
        labels = _local_labels(b, rank, image_tokens.device)  # (b,)
        logits_i2t = scale * torch.cat(s_i2t, 1)  # (b, N)
        logits_t2i = scale * torch.cat(s_t2i, 1)  # (b, N)
        return 0.5 * (F.cross_entropy(logits_i2t, labels) + F.cross_entropy(logits_t2i, labels))
