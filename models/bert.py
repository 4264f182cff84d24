"""A BERT encoder in plain torch, loading Hugging Face BERT weights one to one.

Written here rather than taken from `transformers` so that the attention pattern is ours to
change (the sparse local-window + global-token attention of models/sparse_attention.py plugs in
at `SelfAttention`) and so that the build needs no `transformers` install.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from models.sparse_attention import (
    attend_blocked,
    dense_attention,
    global_keys,
    kept_dense_mass,
    pattern_attention,
)


@dataclass(frozen=True)
class BertConfig:
    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    intermediate_size: int
    max_position_embeddings: int
    type_vocab_size: int
    layer_norm_eps: float

    @classmethod
    def from_json(cls, path: Path) -> BertConfig:
        raw = json.loads(path.read_text())
        if raw.get("hidden_act", "gelu") != "gelu":
            raise ValueError(f"unsupported hidden_act {raw['hidden_act']!r}")
        return cls(**{name: raw[name] for name in cls.__dataclass_fields__})


@dataclass(frozen=True)
class AttentionPattern:
    """window None: dense attention. Else local blocks of `window` tokens plus [CLS] and
    `global_tokens` salient tokens (models/sparse_attention.py), for batches longer than
    `dense_up_to` tokens (default 2 x window: below that the pattern is dense anyway)."""

    window: int | None = None
    global_tokens: int = 0
    dense_up_to: int | None = None

    @property
    def dense_limit(self) -> int:
        if self.window is None:
            return 1 << 62
        return self.dense_up_to if self.dense_up_to is not None else 2 * self.window

    @property
    def sparse(self) -> bool:
        return self.window is not None


class Packing:
    """Where a batch's real tokens sit. With `drop_padding`, the projections, feed-forward layers
    and layer norms run on the real tokens only ([tokens, hidden]); attention, which needs each
    sequence's tokens side by side, on the padded [batch, seq, hidden]. Padding then costs the
    encoder only its share of attention (in the exported INT8 graph on this CPU, mixed-length
    batches ran ~12% faster; see README, "Padding-free encoder"). Without it every position is a
    row ([batch x seq, hidden]): static shapes, which CUDA graphs need.

    Unpacked, a padding position holds a copy of the batch's first token: any finite value will
    do, since attention masks padding as keys and packing drops it as queries (one Gather, where
    zero rows would cost a Concat and a ConstantOfShape per unpacking in the exported graph)."""

    def __init__(self, attention_mask: torch.Tensor, drop_padding: bool) -> None:
        self.batch, self.seq_len = attention_mask.shape
        self.real: torch.Tensor | None = None  # [tokens]: flat positions of real tokens
        self.slots: torch.Tensor | None = None  # [batch x seq]: each position's packed row
        if drop_padding:
            flat = attention_mask.reshape(-1)
            self.real = torch.nonzero(flat).squeeze(1)
            self.slots = ((torch.cumsum(flat, dim=0) - 1) * flat).clamp(min=0)

    def pack(self, x: torch.Tensor) -> torch.Tensor:
        """[batch, seq, dim] -> [tokens, dim]."""
        rows = x.reshape(self.batch * self.seq_len, x.shape[-1])
        return rows if self.real is None else rows.index_select(0, self.real)

    def unpack(self, x: torch.Tensor) -> torch.Tensor:
        """[tokens, dim] -> [batch, seq, dim]."""
        rows = x if self.slots is None else x.index_select(0, self.slots)
        return rows.view(self.batch, self.seq_len, x.shape[-1])


class Embeddings(nn.Module):
    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size)
        self.position_embeddings = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.token_type_embeddings = nn.Embedding(config.type_vocab_size, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        seq_len = input_ids.shape[1]
        positions = torch.arange(seq_len, device=input_ids.device).unsqueeze(0)
        # Single-segment inputs only: token type 0 everywhere.
        summed = (
            self.word_embeddings(input_ids)
            + self.position_embeddings(positions)
            + self.token_type_embeddings.weight[0]
        )
        return self.LayerNorm(summed)


class SelfAttention(nn.Module):
    def __init__(self, config: BertConfig, pattern: AttentionPattern, sdpa: bool = False) -> None:
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.head_dim = config.hidden_size // config.num_attention_heads
        self.pattern = pattern
        # Dense attention (and a sparse pattern's dense branch) through torch's fused
        # scaled_dot_product_attention: the torch runtime's form. Export keeps the plain matmuls
        # (the ONNX graph's If needs both branches as traced ops).
        self.sdpa = sdpa
        self.scale = 1.0 / math.sqrt(self.head_dim)
        self.query = nn.Linear(config.hidden_size, config.hidden_size)
        self.key = nn.Linear(config.hidden_size, config.hidden_size)
        self.value = nn.Linear(config.hidden_size, config.hidden_size)

    def _split_heads(self, x: torch.Tensor) -> torch.Tensor:
        batch, seq_len, _ = x.shape
        return x.view(batch, seq_len, self.num_heads, self.head_dim).transpose(1, 2)

    def forward(
        self, hidden: torch.Tensor, key_mask: torch.Tensor, verify: torch.Tensor, packing: Packing
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """hidden [tokens, hidden] (packed), key_mask [batch, seq] float (1 = real token) ->
        context [tokens, hidden], attended pairs and kept dense mass per sequence
        (pattern_attention's contract)."""
        context, pairs, kept = self._attend(hidden, key_mask, verify, packing)
        return packing.pack(context.transpose(1, 2).reshape(packing.batch, packing.seq_len, -1)), pairs, kept

    def _attend(
        self, hidden: torch.Tensor, key_mask: torch.Tensor, verify: torch.Tensor, packing: Packing
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """-> context [batch, heads, seq, head dim], pairs, kept."""
        q, k, v = (packing.unpack(projection(hidden)) for projection in (self.query, self.key, self.value))
        if self.sdpa and packing.seq_len <= self.pattern.dense_limit:
            return self._fused_dense(q, k, v, key_mask)
        q = self._split_heads(q) * self.scale
        v = self._split_heads(v)
        if self.sdpa:
            return self._blocked(q, self._split_heads(k), v, key_mask, verify)
        k_t = k.view(packing.batch, packing.seq_len, self.num_heads, self.head_dim).permute(0, 2, 3, 1)
        if self.pattern.window is not None:
            pattern = self.pattern
            return pattern_attention(
                q, k_t, v, key_mask, pattern.window, pattern.global_tokens, pattern.dense_limit, verify
            )
        context, pairs = dense_attention(q, k_t, v, key_mask)
        return context, pairs, key_mask.sum(dim=-1)

    def _blocked(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        key_mask: torch.Tensor,
        verify: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """pattern_attention's blocked branch, eagerly (the scripted function is for export)."""
        pattern = self.pattern
        assert pattern.window is not None
        indices, valid = global_keys(q, k, key_mask, pattern.global_tokens)
        context, pairs = attend_blocked(q, k, v, key_mask, pattern.window, indices, valid)
        real = key_mask.sum(dim=-1)
        if bool(verify):
            kept = kept_dense_mass(q, k.transpose(-1, -2), key_mask, pattern.window, indices, valid)
        else:
            kept = -real
        return context, pairs, kept

    def _fused_dense(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        q, k, v = (self._split_heads(x) for x in (q, k, v))
        keys = key_mask[:, None, None, :] > 0  # a row with no real key would be NaN: callers give each one
        context = nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=keys)
        real = key_mask.sum(dim=-1)
        return context, real * real, real


class AttentionBlock(nn.Module):
    def __init__(self, config: BertConfig, pattern: AttentionPattern, sdpa: bool = False) -> None:
        super().__init__()
        self.self = SelfAttention(config, pattern, sdpa)
        self.output = nn.ModuleDict(
            {
                "dense": nn.Linear(config.hidden_size, config.hidden_size),
                "LayerNorm": nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps),
            }
        )

    def forward(
        self, hidden: torch.Tensor, key_mask: torch.Tensor, verify: torch.Tensor, packing: Packing
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        context, pairs, kept = self.self(hidden, key_mask, verify, packing)
        return self.output["LayerNorm"](self.output["dense"](context) + hidden), pairs, kept


class Layer(nn.Module):
    def __init__(self, config: BertConfig, pattern: AttentionPattern, sdpa: bool = False) -> None:
        super().__init__()
        self.attention = AttentionBlock(config, pattern, sdpa)
        self.intermediate = nn.ModuleDict({"dense": nn.Linear(config.hidden_size, config.intermediate_size)})
        self.output = nn.ModuleDict(
            {
                "dense": nn.Linear(config.intermediate_size, config.hidden_size),
                "LayerNorm": nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps),
            }
        )

    def forward(
        self, hidden: torch.Tensor, key_mask: torch.Tensor, verify: torch.Tensor, packing: Packing
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """hidden [tokens, hidden] (packed, see Packing)."""
        attended, pairs, kept = self.attention(hidden, key_mask, verify, packing)
        expanded = nn.functional.gelu(self.intermediate["dense"](attended))
        return self.output["LayerNorm"](self.output["dense"](expanded) + attended), pairs, kept


class BertEncoder(nn.Module):
    """input_ids, attention_mask [batch, seq] -> last hidden state [batch, seq, hidden]."""

    def __init__(
        self,
        config: BertConfig,
        pattern: AttentionPattern | None = None,
        *,
        sdpa: bool = False,
        drop_padding: bool = True,
    ) -> None:
        """`sdpa`: dense attention through torch's fused kernel (serving in torch; not for export).
        `drop_padding`: see Packing (off for CUDA graphs, whose shapes are fixed when captured)."""
        super().__init__()
        self.config = config
        self.pattern = pattern or AttentionPattern()
        self.drop_padding = drop_padding
        self.embeddings = Embeddings(config)
        self.layers = nn.ModuleList(
            Layer(config, self.pattern, sdpa) for _ in range(config.num_hidden_layers)
        )

    def encode(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The last hidden state and each sequence's sparsity ratio: 1 - attended (query, key)
        pairs / n^2 over its n real tokens, averaged over layers (global picks differ per layer)."""
        hidden, sparsity, _ = self.encode_verified(input_ids, attention_mask, torch.tensor(False))
        return hidden, sparsity

    def encode_verified(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, verify: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """encode, and each sequence's kept share of dense attention mass (averaged over layers,
        heads and real queries): measured where `verify` (bool) and the batch takes the blocked
        form, 1.0 on the dense branch, -1.0 when not measured."""
        key_mask = attention_mask.to(torch.float32)
        packing = Packing(attention_mask, self.drop_padding)
        hidden = packing.pack(self.embeddings(input_ids))
        pairs = torch.zeros(input_ids.shape[0], device=input_ids.device)
        kept = torch.zeros(input_ids.shape[0], device=input_ids.device)
        for layer in self.layers:
            hidden, layer_pairs, layer_kept = layer(hidden, key_mask, verify, packing)
            pairs = pairs + layer_pairs
            kept = kept + layer_kept
        real = key_mask.sum(dim=-1).clamp(min=1.0)
        sparsity = 1.0 - pairs / len(self.layers) / (real * real)
        return packing.unpack(hidden), sparsity, kept / len(self.layers) / real

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.encode(input_ids, attention_mask)[0]


class EncoderWithSparsity(nn.Module):
    """The export form of a sparse encoder: inputs (input_ids, attention_mask, verify),
    outputs (last_hidden_state, sparsity [batch], kept_attention_mass [batch])."""

    def __init__(self, encoder: BertEncoder) -> None:
        super().__init__()
        self.encoder = encoder

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, verify: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.encoder.encode_verified(input_ids, attention_mask, verify)


def load_hf_bert(checkpoint_dir: Path, pattern: AttentionPattern | None = None) -> BertEncoder:
    """Build a BertEncoder from a Hugging Face BERT checkpoint directory (safetensors)."""
    from safetensors.torch import load_file

    config = BertConfig.from_json(checkpoint_dir / "config.json")
    model = BertEncoder(config, pattern)
    state = load_file(str(checkpoint_dir / "model.safetensors"))
    renamed = {}
    for name, tensor in state.items():
        name = name.removeprefix("bert.")
        if name.startswith(("pooler.", "embeddings.position_ids")):
            continue
        renamed[name.replace("encoder.layer.", "layers.")] = tensor
    missing, unexpected = model.load_state_dict(renamed, strict=False)
    if missing or unexpected:
        raise ValueError(f"checkpoint does not match BERT: missing={missing} unexpected={unexpected}")
    return model.eval()


def save_encoder_weights(model: BertEncoder, path: Path) -> None:
    """The encoder's weights in FP16 safetensors with its config (the torch runtime's file):
    FP16 halves the file, and the runtime computes in FP16 or BF16 anyway."""
    from safetensors.torch import save_file

    tensors = {
        name: tensor.detach().to(torch.float16).contiguous() for name, tensor in model.state_dict().items()
    }
    save_file(tensors, str(path), metadata={"config": json.dumps(asdict(model.config))})
    path.chmod(0o644)  # safetensors writes 0600: a server running as another user could not read it


def load_encoder_weights(
    path: Path, pattern: AttentionPattern, *, sdpa: bool = True, drop_padding: bool = True
) -> BertEncoder:
    """A BertEncoder from save_encoder_weights' file, in FP32 (autocast picks the compute type)."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata() or {}
    if "config" not in metadata:
        raise ValueError(f"{path.name} holds no encoder config: not written by save_encoder_weights")
    config = BertConfig(**json.loads(metadata["config"]))
    model = BertEncoder(config, pattern, sdpa=sdpa, drop_padding=drop_padding)
    state = {name: tensor.to(torch.float32) for name, tensor in load_file(str(path)).items()}
    model.load_state_dict(state, strict=True)
    return model.eval()
