"""Dynamic sparse attention: a local window of neighbours plus salient global tokens.

The sequence is cut into blocks of `window` tokens. A query sees every key of its own block and of
the blocks on either side (so at least `window` neighbours each way, at most 2 x window - 1), plus
`global_tokens` + 1 global keys: [CLS] and the tokens the [CLS] query weighs most in this layer
(the salience score, computed in the graph, so the choice differs per sequence and per layer).
A global key already inside a query's neighbourhood is not counted twice. With a window at least
as long as the input there is one block and the result is dense attention exactly.

Only reshape, pad, matmul, softmax, topk and gather: the graph exports to ONNX with dynamic batch
and length axes and runs in ONNX Runtime (and TensorRT). Cost per query is 3 x window + globals
keys instead of n, so it pays once n is well past 3 x window. A batch of at most two blocks
(2 x window tokens) takes the dense branch of an ONNX `If` (`pattern_attention`, scripted for that
reason): there that is the same result (every query sees both blocks), without the blocked form's
overhead (measured 0.6-0.7x of dense speed there). The branch point can be set higher
(`dense_up_to`): below it the model is dense by choice, because the blocked form only pays
past some length (see models/attention_speed.py).
On a sampled batch the graph also measures what the pattern costs: the share of dense
attention's probability mass that falls on the keys it keeps (`kept_dense_mass`, behind an `If`
on the encoder's `verify` input, so other batches pay nothing for it).
Queries come scaled by 1/sqrt(head dim) (a constant of the traced caller: scaling inside the
scripted branches made it a runtime value and cost ONNX Runtime its MatMul fusions there).
TorchScript needs literal constants and explicit dtypes here: -10000.0 is BERT's own additive
mask value, and the int64 casts keep the exported branches typed.

Written by hand: no library offers a block-local + dynamic-global attention that exports to ONNX
(Longformer's implementation in transformers is neither exportable with dynamic axes nor dynamic
in its global choice).
"""

from __future__ import annotations

import torch
from torch.nn import functional


def _blocks(x: torch.Tensor, window: int) -> torch.Tensor:
    """[batch, heads, blocks x window, dim] -> [batch, heads, blocks, window, dim]."""
    batch, heads, length, dim = x.shape
    return x.reshape(batch, heads, length // window, window, dim)


def _with_neighbours(blocks: torch.Tensor) -> torch.Tensor:
    """[..., blocks, window, dim] -> [..., blocks, 3 x window, dim]: each block's previous block,
    itself and its next block (zeros past the ends)."""
    padded = functional.pad(blocks, (0, 0, 0, 0, 1, 1))
    return torch.cat([padded[..., :-2, :, :], padded[..., 1:-1, :, :], padded[..., 2:, :, :]], dim=-2)


def salient_tokens(
    query: torch.Tensor, key: torch.Tensor, key_mask: torch.Tensor, count: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The `count` tokens (after [CLS]) the [CLS] query attends to most, averaged over heads.

    query (scaled), key: [batch, heads, n, dim]; key_mask: [batch, n] (1 = real token).
    Returns indices [batch, count] and a validity mask [batch, count] (a short sequence has fewer
    candidates than `count`; its extra picks are invalid and point at token 0).
    """
    scores = torch.matmul(query[:, :, :1, :], key.transpose(-1, -2)).squeeze(2)
    weights = torch.softmax(scores + (1.0 - key_mask[:, None, :]) * -10000.0, dim=-1).mean(dim=1)
    candidate = key_mask.clone()
    candidate[:, 0] = 0.0  # [CLS] is always global
    ranked = torch.where(candidate > 0.0, weights, torch.full_like(weights, -1.0))
    # Room for `count` picks even when the sequence is shorter than that.
    room = torch.full((ranked.shape[0], count), -1.0, dtype=ranked.dtype, device=ranked.device)
    ranked = torch.cat([ranked, room], dim=1)
    top, indices = torch.topk(ranked, count, dim=-1)
    valid = top >= 0.0
    indices = indices * valid.to(torch.int64)  # an invalid pick points at token 0
    return indices, valid.to(query.dtype)


def _gather_tokens(x: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """x [batch, heads, n, dim], indices [batch, g] -> [batch, heads, g, dim]."""
    batch, heads, _, dim = x.shape
    expanded = indices[:, None, :, None].expand(batch, heads, indices.shape[1], dim)
    return torch.gather(x, 2, expanded)


def global_keys(
    query: torch.Tensor, key: torch.Tensor, key_mask: torch.Tensor, global_tokens: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """[CLS] and the salient tokens: indices [batch, 1 + global_tokens] and their validity."""
    batch = query.shape[0]
    indices = torch.zeros(batch, 1, dtype=torch.int64, device=query.device)  # [CLS]
    valid = torch.ones(batch, 1, dtype=query.dtype, device=query.device)
    if global_tokens > 0:
        salient, salient_valid = salient_tokens(query, key, key_mask, global_tokens)
        indices = torch.cat([indices, salient], dim=1)
        valid = torch.cat([valid, salient_valid], dim=1)
    return indices, valid


def local_global_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    key_mask: torch.Tensor,
    window: int,
    global_tokens: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of every query over its neighbourhood and the global keys.

    query (scaled), key, value: [batch, heads, n, dim]; key_mask: [batch, n] float (1 = real token).
    Returns the context [batch, heads, n, dim] and each sequence's attended pairs [batch] (over
    real queries and real keys; 1 - pairs / real^2 is its sparsity ratio).
    """
    indices, valid = global_keys(query, key, key_mask, global_tokens)
    return attend_blocked(query, key, value, key_mask, window, indices, valid)


def attend_blocked(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    key_mask: torch.Tensor,
    window: int,
    indices: torch.Tensor,
    valid: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """local_global_attention with its global keys chosen."""
    batch, heads, length, dim = query.shape
    global_key = _gather_tokens(key, indices)
    global_value = _gather_tokens(value, indices)

    pad = (window - length % window) % window
    q = _blocks(functional.pad(query, (0, 0, 0, pad)), window)
    k = _with_neighbours(_blocks(functional.pad(key, (0, 0, 0, pad)), window))
    v = _with_neighbours(_blocks(functional.pad(value, (0, 0, 0, pad)), window))
    real = functional.pad(key_mask, (0, pad))  # [batch, blocks x window]
    real_blocks = real.reshape(batch, 1, -1, window, 1)
    local_keys = _with_neighbours(real_blocks)  # [batch, 1, blocks, 3 x window, 1]
    blocks = real_blocks.shape[2]

    # A global key inside the query's neighbourhood is already a local key there.
    block_ids = torch.arange(blocks, device=query.device)
    global_block = torch.div(indices, window, rounding_mode="floor")  # [batch, g]
    outside = (global_block[:, None, :] - block_ids[None, :, None]).abs() > 1  # [batch, blocks, g]
    global_keys = valid[:, None, :] * outside.to(query.dtype)  # [batch, blocks, g]

    local_scores = torch.matmul(q, k.transpose(-1, -2))  # [batch, heads, blocks, w, 3w]
    local_scores = local_scores + (1.0 - local_keys.transpose(-1, -2)) * -10000.0
    global_scores = torch.matmul(q, global_key[:, :, None].transpose(-1, -2))  # [.., w, g]
    global_scores = global_scores + (1.0 - global_keys[:, None, :, None, :]) * -10000.0
    probs = torch.softmax(torch.cat([local_scores, global_scores], dim=-1), dim=-1)
    local_probs, global_probs = probs[..., : 3 * window], probs[..., 3 * window :]
    context = torch.matmul(local_probs, v) + torch.matmul(global_probs, global_value[:, :, None])
    context = context.reshape(batch, heads, -1, dim)[:, :, :length]

    queries_per_block = real_blocks.sum(dim=(1, 3, 4))  # [batch, blocks]
    keys_per_block = local_keys.sum(dim=(1, 3, 4)) + global_keys.sum(dim=-1)
    pairs = (queries_per_block * keys_per_block).sum(dim=-1)
    return context, pairs


def dense_attention(
    query: torch.Tensor, key_t: torch.Tensor, value: torch.Tensor, key_mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Every query over every real key; the same (context, attended pairs) contract. The keys
    come transposed, [batch, heads, dim, n], straight from their projection (one transpose)."""
    scores = torch.matmul(query, key_t)
    probs = torch.softmax(scores + (1.0 - key_mask[:, None, None, :]) * -10000.0, dim=-1)
    real = key_mask.sum(dim=-1)
    return torch.matmul(probs, value), real * real


def kept_dense_mass(
    query: torch.Tensor,
    key_t: torch.Tensor,
    key_mask: torch.Tensor,
    window: int,
    indices: torch.Tensor,
    valid: torch.Tensor,
) -> torch.Tensor:
    """How much of dense attention's probability mass falls on the keys the pattern keeps: per
    sequence [batch], the sum over real queries of the kept share (averaged over heads). Costs a
    dense attention's scores and softmax: computed on sampled batches only (verification)."""
    scores = torch.matmul(query, key_t) + (1.0 - key_mask[:, None, None, :]) * -10000.0
    probs = torch.softmax(scores, dim=-1)  # [batch, heads, n, n]
    block = torch.div(torch.arange(query.shape[2], device=query.device), window, rounding_mode="floor")
    local = ((block[:, None] - block[None, :]).abs() <= 1).to(query.dtype)  # [n, n]
    positions = torch.arange(query.shape[2], device=query.device)
    picked = (indices[:, :, None] == positions[None, None, :]).to(query.dtype) * valid[:, :, None]
    global_key = picked.amax(dim=1)  # [batch, n]: 1 where a key is global
    kept = torch.maximum(local[None, :, :], global_key[:, None, :])  # [batch, n, n]
    share = (probs * kept[:, None]).sum(dim=-1).mean(dim=1)  # [batch, n]
    return (share * key_mask).sum(dim=-1)


@torch.jit.script
def pattern_attention(
    query: torch.Tensor,
    key_t: torch.Tensor,
    value: torch.Tensor,
    key_mask: torch.Tensor,
    window: int,
    global_tokens: int,
    dense_up_to: int,
    verify: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """local_global_attention for batches longer than `dense_up_to` tokens, dense attention for
    the others (exactly the pattern while dense_up_to <= 2 x window). Keys transposed, as for
    dense_attention: the dense branch is the common one.

    Third output, per sequence: the dense attention mass kept (kept_dense_mass) when `verify`
    (a bool tensor) is true in the blocked branch; the real token count in the dense branch
    (all of it kept); minus the real token count when not measured."""
    real = key_mask.sum(dim=-1)
    if query.shape[2] <= dense_up_to:
        context, pairs = dense_attention(query, key_t, value, key_mask)
        return context, pairs, real
    key = key_t.transpose(-1, -2)
    indices, valid = global_keys(query, key, key_mask, global_tokens)
    context, pairs = attend_blocked(query, key, value, key_mask, window, indices, valid)
    if bool(verify):
        return context, pairs, kept_dense_mass(query, key_t, key_mask, window, indices, valid)
    return context, pairs, -real
