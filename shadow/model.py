"""The built-in model: a small LLaMA-style decoder (RMSNorm, RoPE, causal attention, SwiGLU, dropout).

Architecture only, built from plain `nn.Linear` layers like any user model (`model.factory`): the
precision backend swaps them for its FP8 or BF16 layers afterwards (`shadow/precision/convert.py`).
Weights are drawn from torch's global generator, which the caller seeds (`model_factory.build_model`),
and dropout masks from it too, seeded per micro-batch by the trainer.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from shadow.config.job import ModelConfig
from shadow.precision.formats import round_to_bf16


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x) * self.weight


def rope_tables(seq_len: int, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    angles = torch.outer(torch.arange(seq_len, dtype=torch.float64), inv_freq)
    return angles.cos().float(), angles.sin().float()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate (first half, second half) pairs of each head by position-dependent angles."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)


def bf16_on_cpu(x: torch.Tensor) -> torch.Tensor:
    """Round a tensor autocast would hold in bf16 (attention's operands) where autocast is emulated: on CPU."""
    return round_to_bf16(x) if x.device.type == "cpu" else x


def linear(in_features: int, out_features: int) -> nn.Linear:
    return nn.Linear(in_features, out_features, bias=False)


class Attention(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.num_heads = config.num_heads
        self.wqkv = linear(config.d_model, 3 * config.d_model)
        self.wo = linear(config.d_model, config.d_model)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        batch, seq, dim = x.shape
        q, k, v = self.wqkv(x).view(batch, seq, 3, self.num_heads, dim // self.num_heads).unbind(2)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # [batch, heads, seq, head_dim]
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        # attention runs in BF16 in both modes, as in TE
        y = F.scaled_dot_product_attention(bf16_on_cpu(q), bf16_on_cpu(k), bf16_on_cpu(v), is_causal=True)
        y = bf16_on_cpu(y).transpose(1, 2).reshape(batch, seq, dim)
        return self.wo(y)


class SwiGLU(nn.Module):
    """SwiGLU, or Smooth-SwiGLU (Fishman et al. 2024) with `config.smooth_swiglu`.

    Smooth-SwiGLU divides each channel of the SwiGLU output by a scale before w_down quantizes it and
    multiplies w_down's matching weight column by the same scale. The scale is the channel's amax over
    the micro-batch rounded up to a power of two, so dividing and multiplying back are exact: the
    function is unchanged (in BF16 bit for bit, gradients included), while under FP8 no channel's
    outliers set the input's per-tensor scale for all the others. It is computed afresh every forward
    from the current activations, as in the paper: no state to checkpoint. Under FP8 it therefore
    depends on how a step's batch is cut into micro-batches; that split is part of the job hash, so
    replays stay exact. The scaling happens inside w_down once the emulated backend has converted it
    (its layers take `smooth_input`); the SwiGLU output itself, which telemetry watches, is unchanged.
    """

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.smooth = config.smooth_swiglu
        self.w_gate = linear(config.d_model, config.ffn_width)
        self.w_up = linear(config.d_model, config.ffn_width)
        self.w_down = linear(config.ffn_width, config.d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden = F.silu(self.w_gate(x)) * self.w_up(x)
        return self.w_down(hidden, smooth_input=True) if self.smooth else self.w_down(hidden)


class Block(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.attn_norm = RMSNorm(config.d_model, config.norm_eps)
        self.attn = Attention(config)
        self.ffn_norm = RMSNorm(config.d_model, config.norm_eps)
        self.ffn = SwiGLU(config)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        x = x + self.dropout(self.attn(self.attn_norm(x), cos, sin))
        return x + self.dropout(self.ffn(self.ffn_norm(x)))


class Transformer(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.tok_emb = nn.Embedding(config.vocab_size, config.d_model)
        self.dropout = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.num_layers))
        self.norm = RMSNorm(config.d_model, config.norm_eps)
        self.lm_head = linear(config.d_model, config.vocab_size)
        cos, sin = rope_tables(config.seq_len, config.d_model // config.num_heads, config.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self._init_weights()

    @torch.no_grad()
    def _init_weights(self) -> None:
        """Normal(0, init_std) everywhere; residual output projections scaled by 1/sqrt(2 * layers)."""
        residual_std = self.config.init_std / math.sqrt(2 * self.config.num_layers)
        for name, param in self.named_parameters():
            if param.dim() < 2:
                continue  # norm gains stay 1
            std = residual_std if name.endswith(("wo.weight", "w_down.weight")) else self.config.init_std
            nn.init.normal_(param, std=std)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        """Logits (batch, seq, vocab)."""
        seq = idx.shape[1]
        cos, sin = self.rope_cos[:seq], self.rope_sin[:seq]
        x = self.dropout(self.tok_emb(idx))
        for block in self.blocks:
            x = block(x, cos, sin)
        return self.lm_head(self.norm(x))
