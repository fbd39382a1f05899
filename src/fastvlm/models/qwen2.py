"""The Qwen2 decoder: RMSNorm, rotary GQA attention with q/k/v bias, SwiGLU MLP.

It maps embeddings to hidden states. It knows nothing about images or text: the
caller embeds tokens (and merges image features) and supplies positions and masks.
Parameter names follow transformers' ``Qwen2Model``. ``FusedAttention`` and ``FusedMLP``
are the same layers with their projections fused into one matmul each; loading
builds the plain ones and ``models.optimize`` swaps the fused ones in.
"""

from __future__ import annotations

import torch
from torch import nn

from ..config import TextConfig
from .activations import activation
from .attention import attend
from .cache import KVCache
from .rope import rope_frequencies


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in float32 and cast back before the weight, as the reference does.
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


class RotaryEmbedding(nn.Module):
    def __init__(self, head_dim: int, rope_parameters: dict) -> None:
        super().__init__()
        # Not a buffer: the model is built on the meta device and this is cheap to recompute.
        self.head_dim = head_dim
        self.rope_parameters = dict(rope_parameters)

    def forward(self, position_ids: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        # Angles in float32 whatever the model dtype: bf16 positions lose precision past 256.
        inv_freq, scale = rope_frequencies(self.head_dim, self.rope_parameters, position_ids.device)
        freqs = position_ids[..., None].float() * inv_freq  # (B, T, hd/2)
        emb = torch.cat((freqs, freqs), dim=-1)  # (B, T, hd)
        return (emb.cos() * scale).to(dtype), (emb.sin() * scale).to(dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (B, T, heads, hd); cos, sin (B, T, hd), the same for every head."""
    cos, sin = cos[:, :, None], sin[:, :, None]
    return x * cos + _rotate_half(x) * sin


class Attention(nn.Module):
    """Rotary GQA attention with q/k/v bias, over an optional KV cache.

    ``implementation`` picks the kernel for multi-token queries ("sdpa", "eager" or
    "flash_attention_2"; see ``models.attention``); ``models.optimize`` sets it.
    """

    def __init__(self, cfg: TextConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.implementation = "sdpa"
        self.dropout = cfg.attention_dropout
        self.num_heads = cfg.num_attention_heads
        self.num_kv_heads = cfg.num_key_value_heads
        self.head_dim = cfg.head_dim
        self.q_proj = nn.Linear(cfg.hidden_size, self.num_heads * self.head_dim, bias=True)
        self.k_proj = nn.Linear(cfg.hidden_size, self.num_kv_heads * self.head_dim, bias=True)
        self.v_proj = nn.Linear(cfg.hidden_size, self.num_kv_heads * self.head_dim, bias=True)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, cfg.hidden_size, bias=False)

    def project(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x (B, T, D) -> q|k (B, T, (nh + nkv) * hd) and v (B, T, nkv * hd).

        Queries and keys stay one tensor so the rotary embedding runs once on both.
        """
        return torch.cat([self.q_proj(x), self.k_proj(x)], dim=-1), self.v_proj(x)

    def forward(
        self,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        mask: torch.Tensor | None,
        cache: KVCache | None,
        rows: slice,
        slots: torch.Tensor | None,
        kv_len: int,
    ) -> torch.Tensor:
        B, T, _ = x.shape
        nh, nkv, hd = self.num_heads, self.num_kv_heads, self.head_dim
        qk, v = self.project(x)
        qk = apply_rotary(qk.view(B, T, nh + nkv, hd), *rope)  # (B, T, nh + nkv, hd)
        q, k = qk[:, :, :nh].transpose(1, 2), qk[:, :, nh:]  # (B, nh, T, hd), (B, T, nkv, hd)
        v = v.view(B, T, nkv, hd)
        if cache is not None:
            cache.write(self.layer_idx, rows, slots, k, v)
            k, v = cache.read(self.layer_idx, rows, kv_len)  # (B, nkv, S, hd)
        else:
            k, v = k.transpose(1, 2), v.transpose(1, 2)  # (B, nkv, T, hd)
        dropout = self.dropout if self.training else 0.0
        if T == 1 and self.implementation != "eager" and not dropout:
            out = decode_attention(q, k, v, mask)
        else:
            out = attend(self.implementation, q, k, v, mask, dropout)  # (B, nh, T, hd)
        return self.o_proj(out.transpose(1, 2).reshape(B, T, -1))  # (B, T, nh*hd) -> (B, T, D)


def decode_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None
) -> torch.Tensor:
    """Attention for one new token per row: q (B, nh, 1, hd), k/v (B, nkv, S, hd).

    Grouping the query heads that share a key/value head turns GQA into two batched
    matmuls with no repeated K/V copies; for a single query this is much cheaper than
    SDPA, whose fused kernels are tuned for long queries. Scores are float32. On CPU the
    products run in float32 too: these small batched matmuls are faster in float32 than
    in bfloat16 there, casts included; elsewhere the casts would only add traffic.
    """
    B, nh, _, hd = q.shape
    nkv = k.shape[1]
    compute = torch.float32 if q.device.type == "cpu" else q.dtype
    qg = q.reshape(B, nkv, nh // nkv, hd).to(compute) * hd**-0.5  # (B, nkv, g, hd): g heads per kv head
    scores = (qg @ k.to(compute).transpose(-1, -2)).float()  # (B, nkv, g, S)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))  # mask (B, 1, 1, S) broadcasts
    probs = scores.softmax(dim=-1).to(compute)
    return (probs @ v.to(compute)).to(v.dtype).reshape(B, nh, 1, hd)  # (B, nkv, g, hd) -> (B, nh, 1, hd)


class MLP(nn.Module):
    def __init__(self, cfg: TextConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)
        self.act = activation(cfg.hidden_act, "text_config.hidden_act")

    def gate_up(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.gate_proj(x), self.up_proj(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up(x)
        return self.down_proj(self.act(gate) * up)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: TextConfig, layer_idx: int) -> None:
        super().__init__()
        self.self_attn = Attention(cfg, layer_idx)
        self.mlp = MLP(cfg)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, x, rope, mask, cache, rows, slots, kv_len) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), rope, mask, cache, rows, slots, kv_len)
        return x + self.mlp(self.post_attention_layernorm(x))


class Qwen2Model(nn.Module):
    def __init__(self, cfg: TextConfig) -> None:
        super().__init__()
        self.config = cfg
        # An explicit weight skips nn.Embedding's random init on the meta device, where it
        # pulls in sympy (~80 MB resident) for a tensor the loader overwrites anyway.
        weight = torch.empty(cfg.vocab_size, cfg.hidden_size)
        if weight.device.type != "meta":
            nn.init.normal_(weight)
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size, _weight=weight)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.rotary_emb = RotaryEmbedding(cfg.head_dim, cfg.rope_parameters)

    def forward(
        self,
        inputs_embeds: torch.Tensor,
        position_ids: torch.Tensor,
        mask: torch.Tensor | None = None,
        cache: KVCache | None = None,
        slots: torch.Tensor | None = None,
        kv_len: int = 0,
        rows: slice | None = None,
    ) -> torch.Tensor:
        """inputs_embeds (B, T, D), position_ids (B, T) -> hidden states (B, T, D).

        ``mask`` is a boolean (B, 1, T, S) "may attend" mask over the S keys (the cache's
        first ``kv_len`` columns when a cache is given, else the T inputs); None means
        plain causal attention. With a cache, the batch occupies cache rows ``rows``
        (default the first B) and its new keys are written at columns ``slots`` (B, T).
        """
        rows = slice(0, inputs_embeds.shape[0]) if rows is None else rows
        rope = self.rotary_emb(position_ids, inputs_embeds.dtype)
        x = inputs_embeds
        for layer in self.layers:
            x = layer(x, rope, mask, cache, rows, slots, kv_len)
        return self.norm(x)


# ---- fused projections: one matmul where the reference runs two or three ---------------


class FusedLinear(nn.Module):
    """Several linears on the same input as one matmul; the output is split back into
    parts of ``sizes`` (default: one per linear)."""

    def __init__(self, linears: list[nn.Linear], sizes: list[int] | None = None) -> None:
        super().__init__()
        self.sizes = sizes or [lin.out_features for lin in linears]
        weight = torch.cat([lin.weight for lin in linears])
        bias = None
        if any(lin.bias is not None for lin in linears):
            bias = torch.cat(
                [lin.bias if lin.bias is not None else torch.zeros_like(lin.weight[:, 0]) for lin in linears]
            )
        self.linear = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device="meta")
        self.linear.weight = nn.Parameter(weight, requires_grad=False)
        if bias is not None:
            self.linear.bias = nn.Parameter(bias, requires_grad=False)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return self.linear(x).split(self.sizes, dim=-1)

    def extra_repr(self) -> str:
        return f"sizes={self.sizes}"


class FusedAttention(Attention):
    """``Attention`` with q, k and v projected by one matmul (``qkv_proj``), split as q|k and v."""

    def __init__(self, plain: Attention) -> None:
        nn.Module.__init__(self)  # the projections come from ``plain``, not from a config
        self.training = plain.training  # a new module starts in training mode; keep eval (no dropout)
        self.layer_idx, self.implementation = plain.layer_idx, plain.implementation
        self.dropout = plain.dropout
        self.num_heads, self.num_kv_heads, self.head_dim = plain.num_heads, plain.num_kv_heads, plain.head_dim
        qk_size = plain.q_proj.out_features + plain.k_proj.out_features
        self.qkv_proj = FusedLinear(
            [plain.q_proj, plain.k_proj, plain.v_proj], [qk_size, plain.v_proj.out_features]
        )
        self.o_proj = plain.o_proj

    def project(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.qkv_proj(x)


class FusedMLP(MLP):
    """``MLP`` with gate and up projected by one matmul (``gate_up_proj``)."""

    def __init__(self, plain: MLP) -> None:
        nn.Module.__init__(self)  # the projections come from ``plain``, not from a config
        self.gate_up_proj = FusedLinear([plain.gate_proj, plain.up_proj])
        self.down_proj = plain.down_proj
        self.act = plain.act

    def gate_up(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.gate_up_proj(x)


def fuse_projections(layer: DecoderLayer) -> None:
    """Give ``layer`` a ``FusedAttention`` and a ``FusedMLP``; a fused part stays as it is.

    Only plain ``nn.Linear`` projections are fused (not transposed or quantised ones).
    """
    attn, mlp = layer.self_attn, layer.mlp
    if type(attn) is Attention and all(
        isinstance(p, nn.Linear) for p in (attn.q_proj, attn.k_proj, attn.v_proj)
    ):
        layer.self_attn = FusedAttention(attn)
    if type(mlp) is MLP and isinstance(mlp.gate_proj, nn.Linear) and isinstance(mlp.up_proj, nn.Linear):
        layer.mlp = FusedMLP(mlp)
