"""A small causal Transformer language model in flax.linen.

Pre-LayerNorm blocks (attention, then a 4x GELU MLP), learned position
embeddings, no dropout. The attention mask is the causal mask combined with
the key padding mask (``tokens != PAD``): a position attends to the real
positions at or before it. With right padding every query row keeps at least
the ``BOS`` key, so no row is fully masked (no NaN); padded query rows are
computed and then weighted 0 by the loss.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from examples.char_data import PAD

__all__ = ["CausalLM", "attention_mask", "num_params"]


def attention_mask(tokens: jax.Array) -> jax.Array:
  """``[B, 1, L, L]`` boolean: causal AND the key is not padding."""
  causal = nn.make_causal_mask(tokens)  # [B, 1, L, L]
  keys = nn.make_attention_mask(jnp.ones_like(tokens, bool), tokens != PAD)
  return nn.combine_masks(causal, keys).astype(bool)


class Block(nn.Module):
  d_model: int
  num_heads: int

  @nn.compact
  def __call__(self, x, mask):
    h = nn.LayerNorm()(x)
    h = nn.MultiHeadDotProductAttention(
        num_heads=self.num_heads, qkv_features=self.d_model,
        deterministic=True)(h, h, mask=mask)
    x = x + h
    h = nn.LayerNorm()(x)
    h = nn.Dense(4 * self.d_model)(h)
    h = nn.Dense(self.d_model)(nn.gelu(h))
    return x + h


class CausalLM(nn.Module):
  """``tokens [B, L] int -> logits [B, L, vocab_size]``."""
  vocab_size: int
  num_layers: int
  d_model: int
  num_heads: int
  max_len: int

  @nn.compact
  def __call__(self, tokens, train: bool = False):
    del train  # No dropout and no batch statistics: same in both modes.
    length = tokens.shape[-1]
    x = nn.Embed(self.vocab_size, self.d_model)(tokens)
    pos = self.param("pos_embedding", nn.initializers.normal(0.02),
                     (self.max_len, self.d_model))
    x = x + pos[:length]
    mask = attention_mask(tokens)
    for _ in range(self.num_layers):
      x = Block(self.d_model, self.num_heads)(x, mask)
    x = nn.LayerNorm()(x)
    return nn.Dense(self.vocab_size, name="logits")(x)


def num_params(params) -> int:
  return int(sum(x.size for x in jax.tree.leaves(params)))
