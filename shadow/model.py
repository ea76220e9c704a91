"""A small LLaMA-style decoder: RMSNorm, RoPE, causal attention, SwiGLU, optional dropout.

Architecture only. Every GEMM in the blocks comes from the precision backend (`backend.linear`), so
FP8 vs BF16 is decided there and switched at run time; the lm head is always BF16 (`output_linear`).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from shadow.config.job import ModelConfig
from shadow.precision.base import PrecisionBackend


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


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, backend: PrecisionBackend):
        super().__init__()
        self.num_heads = config.num_heads
        self.backend = backend
        self.wqkv = backend.linear(config.d_model, 3 * config.d_model)
        self.wo = backend.linear(config.d_model, config.d_model)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        batch, seq, dim = x.shape
        q, k, v = self.wqkv(x).view(batch, seq, 3, self.num_heads, dim // self.num_heads).unbind(2)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # [batch, heads, seq, head_dim]
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        round_bf16 = self.backend.round_activation  # attention runs in BF16 in both modes, as in TE
        y = F.scaled_dot_product_attention(round_bf16(q), round_bf16(k), round_bf16(v), is_causal=True)
        y = round_bf16(y).transpose(1, 2).reshape(batch, seq, dim)
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
    replays stay exact.
    """

    def __init__(self, config: ModelConfig, backend: PrecisionBackend):
        super().__init__()
        self.smooth = config.smooth_swiglu
        self.w_gate = backend.linear(config.d_model, config.ffn_width)
        self.w_up = backend.linear(config.d_model, config.ffn_width)
        self.w_down = backend.linear(config.ffn_width, config.d_model)
        self.output = nn.Identity()  # names the SwiGLU output so telemetry can observe it (a forward hook)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden = self.output(F.silu(self.w_gate(x)) * self.w_up(x))
        if not self.smooth:
            return self.w_down(hidden)
        channel_scale = power_of_two_channel_amax(hidden)
        return self.w_down(hidden / channel_scale, column_scale=channel_scale)


def power_of_two_channel_amax(x: torch.Tensor) -> torch.Tensor:
    """Per last-dim channel, the smallest power of two above its amax (1 for an all-zero channel)."""
    amax = x.detach().abs().float().amax(dim=tuple(range(x.dim() - 1)))
    _, exponent = torch.frexp(amax)  # amax = m * 2**e with 0.5 <= m < 1, so 2**e > amax
    return torch.where(amax > 0, torch.ldexp(torch.ones_like(amax), exponent), torch.ones_like(amax))


def dropout(x: torch.Tensor, p: float, generator: torch.Generator | None) -> torch.Tensor:
    """Inverted dropout with its mask drawn from `generator` (the caller's, so replays can reproduce it).
    Without a generator (evaluation) or at p = 0 it is the identity."""
    if p == 0.0 or generator is None:
        return x
    keep = torch.rand(x.shape, generator=generator, device=x.device) >= p
    return x * keep / (1.0 - p)


class Block(nn.Module):
    def __init__(self, config: ModelConfig, backend: PrecisionBackend):
        super().__init__()
        self.attn_norm = RMSNorm(config.d_model, config.norm_eps)
        self.attn = Attention(config, backend)
        self.ffn_norm = RMSNorm(config.d_model, config.norm_eps)
        self.ffn = SwiGLU(config, backend)
        self.dropout = config.dropout

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                generator: torch.Generator | None = None) -> torch.Tensor:
        x = x + dropout(self.attn(self.attn_norm(x), cos, sin), self.dropout, generator)
        return x + dropout(self.ffn(self.ffn_norm(x)), self.dropout, generator)


class Transformer(nn.Module):
    def __init__(self, config: ModelConfig, backend: PrecisionBackend):
        super().__init__()
        self.config = config
        self.tok_emb = nn.Embedding(config.vocab_size, config.d_model)
        self.blocks = nn.ModuleList(Block(config, backend) for _ in range(config.num_layers))
        self.norm = RMSNorm(config.d_model, config.norm_eps)
        self.lm_head = backend.output_linear(config.d_model, config.vocab_size)
        cos, sin = rope_tables(config.seq_len, config.d_model // config.num_heads, config.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)

    @torch.no_grad()
    def init_weights(self, seed: int) -> None:
        """Normal(0, init_std) everywhere; residual output projections scaled by 1/sqrt(2 * layers)."""
        generator = torch.Generator().manual_seed(seed)
        residual_std = self.config.init_std / math.sqrt(2 * self.config.num_layers)
        for name, param in self.named_parameters():
            if param.dim() < 2:
                continue  # norm gains stay 1
            std = residual_std if name.endswith(("wo.weight", "w_down.weight")) else self.config.init_std
            values = torch.randn(param.shape, generator=generator) * std
            param.copy_(values.to(param.device))

    def forward(self, idx: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Logits; `generator` draws the dropout masks (training only: evaluation passes none)."""
        seq = idx.shape[1]
        cos, sin = self.rope_cos[:seq], self.rope_sin[:seq]
        x = dropout(self.tok_emb(idx), self.config.dropout, generator)
        for block in self.blocks:
            x = block(x, cos, sin, generator)
        return self.lm_head(self.norm(x))

    def loss(self, idx: torch.Tensor, targets: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        logits = self.forward(idx, generator)
        return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1))
