"""Export-time patches for DeepSeek-V4's compressed attention (CSA / HCA).

``transformers`` 5.23's DeepSeek-V4 compressors contain Python branches on the
sequence length (``if chunk_kv.shape[1] > 0``, ``if n_windows > 1``,
``if seq_len == 1 or compressed_len == 0``, ``top_k = min(index_topk, T)``,
``if kv.shape[2] > attention_mask.shape[-1]`` ...).  ``torch.export`` resolves
them for the traced example length, so a plain export of a CSA/HCA layer only
works for ``seq >= compress_rate`` (e.g. ONNX Runtime fails with a broadcast
error at ``seq = 1``).

The functions below are branch-free rewrites of the *stateless* (``use_cache``
off, ``past_key_values is None``) path of those forwards.  They compute the same
values for every sequence length -- zero complete windows simply give empty
tensors -- and they are only swapped in while ``torch.onnx.export`` traces the
model (:func:`patched_deepseek_v4`).  The ONNX output is checked against the
*unpatched* ``transformers`` model, so the patch cannot hide a divergence.

Differences from the upstream code, all value-preserving:

* ``n_windows = seq // compress_rate`` may be 0; reshapes spell out every dim
  (no ``-1`` next to a possibly-zero dim) so that empty tensors reshape fine.
* the lightning indexer pads its scores with ``index_topk`` ``-inf`` columns
  and always takes ``TopK(k=index_topk)`` instead of ``k = min(index_topk, T)``;
  the padded picks are ``>= T >= causal_threshold`` and are therefore turned into
  the same ``-1`` "invalid" sentinel the upstream code uses for future blocks.
* the attention always concatenates the compressor's block bias onto the mask
  (an empty bias when there are no compressed entries).
"""

from __future__ import annotations

import contextlib

import torch

from transformers.models.deepseek_v4 import modeling_deepseek_v4 as m


def _compress_windows(module, hidden_states, overlap: bool):
    """Shared HCA / CSA window pooling: returns ``compressed [B, n_windows, head_dim]``."""
    batch, seq_len, _ = hidden_states.shape
    ratio, head_dim = module.compress_rate, module.head_dim
    n_windows = seq_len // ratio
    usable = n_windows * ratio
    width = 2 * head_dim if overlap else head_dim
    kv = module.kv_proj(hidden_states)[:, :usable].reshape(batch, n_windows, ratio, width)
    gate = module.gate_proj(hidden_states)[:, :usable].reshape(batch, n_windows, ratio, width) + module.position_bias
    if overlap:
        # [B, n_win, 2*ratio, head_dim]: previous window's Ca slice, then this window's Cb slice.
        # Window 0 has no predecessor (stateless call): zero kv / -inf gate -> softmax weight 0.
        prev_kv = torch.cat([kv.new_zeros((batch, 1, ratio, head_dim)), kv[:, :-1, :, :head_dim]], dim=1)
        prev_gate = torch.cat(
            [gate.new_full((batch, 1, ratio, head_dim), float("-inf")), gate[:, :-1, :, :head_dim]], dim=1
        )
        prev_kv, prev_gate = prev_kv[:, :n_windows], prev_gate[:, :n_windows]
        kv = torch.cat([prev_kv, kv[..., head_dim:]], dim=2)
        gate = torch.cat([prev_gate, gate[..., head_dim:]], dim=2)
    compressed = module.kv_norm((kv * gate.softmax(dim=2, dtype=torch.float32).to(kv.dtype)).sum(dim=2))
    positions = (torch.arange(n_windows, device=compressed.device) * ratio).unsqueeze(0).expand(batch, n_windows)
    cos, sin = module.rotary_emb(compressed, position_ids=positions, layer_type=module.rope_layer_type)
    return m.apply_rotary_pos_emb(compressed.unsqueeze(1), cos, sin).squeeze(1)


def hca_forward(self, hidden_states, q_residual, position_ids, past_key_values, layer_idx):
    assert past_key_values is None, "export patch covers the stateless path only"
    batch, seq_len, _ = hidden_states.shape
    compressed_kv = _compress_windows(self, hidden_states, overlap=False).unsqueeze(1)  # [B, 1, T, D]
    n_windows = compressed_kv.shape[2]
    entry_indices = torch.arange(n_windows, device=compressed_kv.device)
    causal_threshold = (position_ids + 1) // self.compress_rate  # [B, S]
    block_bias = compressed_kv.new_zeros((batch, 1, seq_len, n_windows)).masked_fill(
        entry_indices.view(1, 1, 1, n_windows) >= causal_threshold.unsqueeze(1).unsqueeze(-1), float("-inf")
    )
    return compressed_kv, block_bias


def indexer_forward(self, hidden_states, q_residual, position_ids, past_key_values, layer_idx):
    assert past_key_values is None, "export patch covers the stateless path only"
    batch, seq_len, _ = hidden_states.shape
    compressed_kv = _compress_windows(self, hidden_states, overlap=True)  # [B, T, D]
    compressed_len = compressed_kv.shape[1]

    cos_q, sin_q = self.rotary_emb(hidden_states, position_ids=position_ids, layer_type=self.rope_layer_type)
    q = self.q_b_proj(q_residual).view(batch, seq_len, self.num_heads, self.head_dim).transpose(1, 2)
    q = m.apply_rotary_pos_emb(q, cos_q, sin_q).transpose(1, 2)
    index_scores = self.scorer(q, compressed_kv, hidden_states)  # [B, S, T]

    causal_threshold = (position_ids + 1) // self.compress_rate  # [B, S]
    entry_indices = torch.arange(compressed_len, device=index_scores.device)
    future_mask = entry_indices.view(1, 1, compressed_len) >= causal_threshold.unsqueeze(-1)
    index_scores = index_scores.masked_fill(future_mask, float("-inf"))
    pad = index_scores.new_full((batch, seq_len, self.index_topk), float("-inf"))
    top_k_indices = torch.cat([index_scores, pad], dim=-1).topk(self.index_topk, dim=-1).indices
    invalid = top_k_indices >= causal_threshold.unsqueeze(-1)
    return torch.where(invalid, torch.full_like(top_k_indices, -1), top_k_indices)


def csa_forward(self, hidden_states, q_residual, position_ids, past_key_values, layer_idx):
    assert past_key_values is None, "export patch covers the stateless path only"
    batch, seq_len, _ = hidden_states.shape
    compressed_kv = _compress_windows(self, hidden_states, overlap=True).unsqueeze(1)  # [B, 1, T, D]
    compressed_len = compressed_kv.shape[2]
    top_k_indices = self.indexer(hidden_states, q_residual, position_ids, past_key_values, layer_idx)
    valid = top_k_indices >= 0
    safe_indices = torch.where(valid, top_k_indices, torch.full_like(top_k_indices, compressed_len))
    block_bias = compressed_kv.new_full((batch, 1, seq_len, compressed_len + 1), float("-inf"))
    block_bias = block_bias.scatter(-1, safe_indices.unsqueeze(1), 0.0)
    return compressed_kv, block_bias[..., :compressed_len]


def attention_forward(self, hidden_states, position_embeddings, position_ids, attention_mask,
                      past_key_values=None, **kwargs):
    assert past_key_values is None, "export patch covers the stateless path only"
    input_shape = hidden_states.shape[:-1]
    hidden_shape = (*input_shape, -1, self.head_dim)
    cos, sin = position_embeddings[self.rope_layer_type]

    q_residual = self.q_a_norm(self.q_a_proj(hidden_states))
    q = self.q_b_proj(q_residual).view(*hidden_shape).transpose(1, 2)
    q = self.q_b_norm(q)
    q = m.apply_rotary_pos_emb(q, cos, sin)
    kv = self.kv_norm(self.kv_proj(hidden_states)).view(*hidden_shape).transpose(1, 2)
    kv = m.apply_rotary_pos_emb(kv, cos, sin)

    if self.compressor is not None:
        compressed_kv, block_bias = self.compressor(hidden_states, q_residual, position_ids, None, self.layer_idx)
        kv = torch.cat([kv, compressed_kv], dim=2)
        if isinstance(attention_mask, torch.Tensor):
            attention_mask = torch.cat([attention_mask, block_bias.to(attention_mask.dtype)], dim=-1)

    attention_interface = m.ALL_ATTENTION_FUNCTIONS.get_interface(
        self.config._attn_implementation, m.eager_attention_forward
    )
    attn_output, attn_weights = attention_interface(
        self, q, kv, kv, attention_mask, dropout=0.0, scaling=self.scaling,
        sliding_window=self.sliding_window, s_aux=self.sinks, **kwargs,
    )
    attn_output = m.apply_rotary_pos_emb(attn_output.transpose(1, 2), cos, -sin).transpose(1, 2)
    grouped = attn_output.reshape(*input_shape, self.config.o_groups, -1)
    grouped = self.o_a_proj(grouped).flatten(2)
    return self.o_b_proj(grouped), attn_weights


_PATCHES = {
    m.DeepseekV4HCACompressor: hca_forward,
    m.DeepseekV4CSACompressor: csa_forward,
    m.DeepseekV4Indexer: indexer_forward,
    m.DeepseekV4Attention: attention_forward,
}


@contextlib.contextmanager
def patched_deepseek_v4():
    """Swap in the branch-free forwards for the duration of the ``with`` block."""
    saved = {cls: cls.forward for cls in _PATCHES}
    try:
        for cls, fn in _PATCHES.items():
            cls.forward = fn
        yield
    finally:
        for cls, fn in saved.items():
            cls.forward = fn


# ---- DeepSeek-V2: RoPE in complex numbers -> the same product in real pairs -------------------
# The dynamo exporter has no ONNX lowering for complex tensors (torch.polar, view_as_complex).
# The rotary embedding returns (cos, sin) stacked in a last axis of 2 instead of cos + i sin, and
# apply_rotary_emb multiplies the interleaved (re, im) pairs of q and k by it: the same values.

def _v2_rotary_forward(self, x, position_ids):
    freqs = position_ids[..., None].float() * self.inv_freq.to(device=x.device, dtype=torch.float)
    return torch.stack([freqs.cos(), freqs.sin()], dim=-1) * self.attention_scaling


def _v2_apply_rotary_emb(xq, xk, freqs_cis):
    cos, sin = freqs_cis.unsqueeze(1)[..., 0], freqs_cis.unsqueeze(1)[..., 1]   # [1, 1, seq, dim // 2]

    def rotate(x):
        pairs = x.float().reshape(*x.shape[:-1], -1, 2)
        re, im = pairs[..., 0], pairs[..., 1]
        return torch.stack([re * cos - im * sin, re * sin + im * cos], dim=-1).flatten(3).type_as(x)

    return rotate(xq), rotate(xk)


@contextlib.contextmanager
def patched_deepseek_v2():
    """Real-valued RoPE for the duration of the ``with`` block."""
    from transformers.models.deepseek_v2 import modeling_deepseek_v2 as m2

    saved = m2.DeepseekV2RotaryEmbedding.forward, m2.apply_rotary_emb
    try:
        m2.DeepseekV2RotaryEmbedding.forward, m2.apply_rotary_emb = _v2_rotary_forward, _v2_apply_rotary_emb
        yield
    finally:
        m2.DeepseekV2RotaryEmbedding.forward, m2.apply_rotary_emb = saved
