"""A factory for Hugging Face causal language models, built from a config: no weights are downloaded.

    model:
      factory: shadow.hf:causal_lm
      kwargs: {model_type: llama, hidden_size: 256, num_hidden_layers: 4, ...}

`kwargs` are the model config's fields (`transformers.AutoConfig.for_model`). Needs the `hf` extra
(`pip install shadow[hf]`). The KV cache is off (training never reuses it) and attention runs through
PyTorch's SDPA. The vocabulary must equal the job's `model.vocab_size`.
"""

from __future__ import annotations

from torch import nn

from shadow.model_errors import ModelError


def causal_lm(model_type: str, **config) -> nn.Module:
    try:
        import transformers
    except ImportError as exc:
        raise ModelError(f"model.factory 'shadow.hf:causal_lm' needs Hugging Face transformers ({exc}); install "
                         "it with `pip install shadow[hf]`") from None
    hf_config = transformers.AutoConfig.for_model(model_type, use_cache=False, **config)
    hf_config._attn_implementation = "sdpa"
    return transformers.AutoModelForCausalLM.from_config(hf_config)
