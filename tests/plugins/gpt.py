"""A model defined outside shadow, as a user brings one (`model.factory: plugins.gpt:build`): GPT-2
style, unlike the built-in model in every way shadow must not depend on: learned positions, LayerNorm,
linear layers with biases, a GELU MLP (no SwiGLU), an output head tied to the embedding, nn.Dropout,
blocks in an nn.Sequential-free ModuleList named `h`. Plain torch; nothing from shadow."""

import torch
import torch.nn.functional as F
from torch import nn


class GptBlock(nn.Module):
    def __init__(self, width: int, heads: int, dropout: float):
        super().__init__()
        self.heads = heads
        self.ln_1 = nn.LayerNorm(width)
        self.c_attn = nn.Linear(width, 3 * width)
        self.c_proj = nn.Linear(width, width)
        self.ln_2 = nn.LayerNorm(width)
        self.c_fc = nn.Linear(width, 4 * width)
        self.mlp_proj = nn.Linear(4 * width, width)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, seq, width = x.shape
        q, k, v = self.c_attn(self.ln_1(x)).view(batch, seq, 3, self.heads, width // self.heads).unbind(2)
        y = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True)
        x = x + self.drop(self.c_proj(y.transpose(1, 2).reshape(batch, seq, width)))
        return x + self.drop(self.mlp_proj(F.gelu(self.c_fc(self.ln_2(x)))))


class Gpt(nn.Module):
    def __init__(self, vocab: int, width: int, layers: int, heads: int, seq_len: int, dropout: float):
        super().__init__()
        self.wte = nn.Embedding(vocab, width)
        self.wpe = nn.Embedding(seq_len, width)
        self.h = nn.ModuleList(GptBlock(width, heads, dropout) for _ in range(layers))
        self.ln_f = nn.LayerNorm(width)
        self.lm_head = nn.Linear(width, vocab, bias=False)
        self.lm_head.weight = self.wte.weight  # tied
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, std=0.02)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(idx.shape[1], device=idx.device)
        x = self.wte(idx) + self.wpe(positions)
        for block in self.h:
            x = block(x)
        return self.lm_head(self.ln_f(x))


def build(vocab: int = 256, width: int = 64, layers: int = 2, heads: int = 4, seq_len: int = 128,
          dropout: float = 0.0) -> nn.Module:
    return Gpt(vocab, width, layers, heads, seq_len, dropout)


def wrong_vocab(**kwargs) -> nn.Module:
    """A model whose logits are not over the job's vocabulary: refused at start, naming the factory."""
    return Gpt(**{**dict(vocab=100, width=32, layers=2, heads=2, seq_len=128, dropout=0.0), **kwargs})
