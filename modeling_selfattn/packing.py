"""Unpadding: a padded encoder batch that is largely padding runs with its padding removed. Linear layers, the FFN
and LayerNorm treat tokens one at a time, so they run on the packed tokens unchanged; attention is confined to each
sequence. The encoder (model.py) packs after its embeddings and restores the padded layout at the end.

Shipped with saved models: the model uses it at run time.
"""

import importlib.util
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from .config import SelfAttnConfig


# Unpadding is used once padding is at least this share of a batch's tokens: below it, what the skipped padding
# saves is small next to the packing's own costs (index copies, one attention call per distinct length).
MIN_PADDING_SHARE_TO_UNPAD = 0.2


@dataclass
class PackedSequences:
    """A padded batch with its padding removed: the real tokens of every sequence, one sequence after another
    (longest first), in one row of `num_tokens`. Linear layers, the FFN and LayerNorm treat tokens one at a time,
    so they run on the packed row unchanged and skip the padding's cost; `attend` confines attention to each
    sequence. The encoder packs after its embeddings and restores the padded layout at the end, where padding
    positions keep their embeddings.
    """

    token_indices: torch.Tensor  # where each packed token sits in the flattened (batch * length) padded layout
    length_groups: list[tuple[int, int, int]]  # (first packed token, number of sequences, their length)
    cu_seq_lens: torch.Tensor  # int32 start of each sequence in the row, then num_tokens: for varlen kernels
    max_length: int
    padded_shape: tuple[int, int]

    @classmethod
    def from_attention_mask(cls, attention_mask: torch.Tensor) -> "PackedSequences":
        real = attention_mask.bool()
        lengths = real.sum(1)
        order = torch.argsort(lengths, descending=True, stable=True)
        rows, columns = real[order].nonzero(as_tuple=True)  # row-major: sequence after sequence, tokens in order
        token_indices = order[rows] * real.shape[1] + columns
        sorted_lengths = [length for length in lengths[order].tolist() if length > 0]
        length_groups, start = [], 0
        for length in sorted_lengths:  # sequences of one length are adjacent: one group each
            if length_groups and length_groups[-1][2] == length:
                first, count, _ = length_groups[-1]
                length_groups[-1] = (first, count + 1, length)
            else:
                length_groups.append((start, 1, length))
            start += length
        cu_seq_lens = torch.tensor([0, *sorted_lengths], device=attention_mask.device).cumsum(0).int()
        return cls(token_indices, length_groups, cu_seq_lens, max(sorted_lengths, default=0), tuple(real.shape))

    def pack(self, padded: torch.Tensor) -> torch.Tensor:
        """(batch, length, features) -> (1, num_tokens, features)."""
        return padded.flatten(0, 1).index_select(0, self.token_indices).unsqueeze(0)

    def unpack(self, packed: torch.Tensor, padding: torch.Tensor) -> torch.Tensor:
        """(1, num_tokens, features) -> (batch, length, features), taking padding positions from `padding`.
        Not zeros: a constant row makes LayerNorm's fp16 backward divide 0 by 0 in any head applied after."""
        padded = padding.flatten(0, 1).to(packed.dtype)
        return padded.index_copy(0, self.token_indices, packed[0]).view(*self.padded_shape, -1)

    def attend(self, attention_interface: Callable, module: nn.Module, query, key, value, **kwargs):
        """Attention of each sequence over itself, for query, key and value of shape (1, heads, num_tokens,
        head_dim); returns the output as (1, num_tokens, heads, head_dim) and no probabilities."""
        if module.config._attn_implementation.startswith("flash_attention"):
            # transformers' flash integration runs the varlen kernel given the sequence offsets.
            lengths = dict(cu_seq_lens_q=self.cu_seq_lens, cu_seq_lens_k=self.cu_seq_lens)
            maxima = dict(max_length_q=self.max_length, max_length_k=self.max_length)
            return attention_interface(module, query, key, value, None, **lengths, **maxima, **kwargs)
        if uses_torch_varlen_kernel(module, query, kwargs.get("dropout", 0.0)):
            from torch.nn.attention.varlen import varlen_attn

            query, key, value = (states[0].transpose(0, 1) for states in (query, key, value))  # (tokens, heads, dim)
            output = varlen_attn(
                query, key, value, self.cu_seq_lens, self.cu_seq_lens, self.max_length, self.max_length,
                scale=kwargs.get("scaling"),
            )
            return output.unsqueeze(0), None
        outputs = []
        for start, count, length in self.length_groups:

            def group(states: torch.Tensor) -> torch.Tensor:
                # A view, no copy: (count, heads, length, head_dim) over the group's adjacent sequences.
                return states[0, :, start : start + count * length].unflatten(1, (count, length)).transpose(0, 1)

            output, _ = attention_interface(module, group(query), group(key), group(value), None, **kwargs)
            outputs.append(output.flatten(0, 1))
        return torch.cat(outputs).unsqueeze(0), None


def uses_torch_varlen_kernel(module: nn.Module, query: torch.Tensor, dropout: float) -> bool:
    """torch's own varlen flash kernel (torch.nn.attention.varlen, torch >= 2.10) serves SDPA models on CUDA in half
    precision; it has no dropout."""
    return (
        query.is_cuda
        and query.dtype in (torch.float16, torch.bfloat16)
        and module.config._attn_implementation == "sdpa"
        and dropout == 0.0
        and query.shape[-1] % 8 == 0
        and importlib.util.find_spec("torch.nn.attention.varlen") is not None
    )


def packed_sequences_for(attention_mask: torch.Tensor | None, config: SelfAttnConfig, kwargs: dict):
    """PackedSequences of the batch where unpadding applies and pays, else None (the padded path). It does not
    apply when per-layer outputs are recorded (attention maps and hidden states keep the padded layout), under
    torch.compile or tracing (shapes would depend on the data), or with attention implementations that cannot
    take packed sequences (flex, custom kernels)."""
    if attention_mask is None or attention_mask.dim() != 2 or attention_mask.numel() == 0:
        return None
    if torch.compiler.is_compiling() or torch.jit.is_tracing():
        return None
    implementation = config._attn_implementation
    if implementation not in ("eager", "sdpa") and not implementation.startswith("flash_attention"):
        return None
    for output in ("output_attentions", "output_hidden_states"):
        if kwargs.get(output, getattr(config, output, False)):
            return None
    num_padding = attention_mask.numel() - int(attention_mask.bool().sum())
    # A batch of padding only leaves nothing to pack; the padded path handles it.
    if num_padding < MIN_PADDING_SHARE_TO_UNPAD * attention_mask.numel() or num_padding == attention_mask.numel():
        return None
    return PackedSequences.from_attention_mask(attention_mask)
