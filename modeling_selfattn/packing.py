"""Unpadding: a padded encoder batch that is largely padding runs with its padding removed. Linear layers, the FFN
and LayerNorm treat tokens one at a time, so they run on the packed tokens unchanged; attention is confined to each
sequence. The encoder (model.py) packs after its embeddings and restores the padded layout at the end.

Shipped with saved models: the model uses it at run time.
"""

import functools
import importlib.util
import inspect
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from .config import SelfAttnConfig
from .kernels import unobserved


# Unpadding is used once padding is at least this share of a batch's tokens: below it, what the skipped padding
# saves is small next to the packing's own costs (index copies, a few attention calls instead of one).
MIN_PADDING_SHARE_TO_UNPAD = 0.2

# Without a varlen kernel, attention runs per bucket of sequences of similar length, each padded to its longest: a
# bucket takes every sequence at least BUCKET_MIN_LENGTH_RATIO as long as its longest (at most 1.56x the attention work
# for the shortest). Fewer, fuller buckets cost less in calls; more cost less in padded attention. Measured on CPU
# (2-core Xeon, all-MiniLM-L6-v2): at 2/3, against one bucket for every sequence up to 64 tokens and half the longest
# above, 5-14% less time in float32 and 2-12% in int8 on four batches of 64 SST-2 dev sentences (three runs), 6% on a
# batch of 64 lengths from 4 to 512. Once the keys filled whole runs of slots (KEY_SLOT_MULTIPLE), 4/5 took less time
# than 2/3 on 64 SST-2 sentences (0.2-0.7% in float32, 1.9% in int8) and on 64 skewed padded sentences (0.2-1.4% and
# 1.7-2.0%), in one process, alternating, two runs; against 2/3, 1/2 took 2.2-6.1% more and 0.95 up to 2.7%. One
# call per distinct length (ratio 1) had cost half the encoder's time on 64 SST-2 sentences (30 lengths).
BUCKET_MIN_LENGTH_RATIO = 4 / 5


# On the CPU, SDPA's kernel runs its softmax a vector of keys at a time, and the keys past the last whole vector one
# at a time (perf: libm's scalar exp, 15% of its samples at 44 keys, under 1% at 48). A bucket of 18 sequences of up to
# 44 tokens (all-MiniLM-L6-v2's 12 heads of 32) took 1.21 ms, against 0.63 ms with its keys in 48 slots. So in CPU
# inference a bucket's keys fill whole runs of KEY_SLOT_MULTIPLE slots (a whole AVX-512 vector of float32, two of
# AVX2), those past a sequence's end masked out, where that multiplies its keys by at most KEY_SLOT_MAX_GROWTH.
# Measured alone (2-core Xeon): 1.1-2.7x faster from 5 to 509 keys, 1.02-1.18x for 4 keys in 16 slots and for 19 in
# 32, 0.77-0.87x for 3 in 16. Queries keep their own slots: no output is computed for the added ones. In the encoder,
# in one process, alternating (two runs): 2.9-6.4% less time on 64 SST-2 sentences in float32, 3.8-8.6% in int8;
# 2.1-3.6% and 4.0-5.7% on 64 skewed padded sentences.
KEY_SLOT_MULTIPLE = 16
KEY_SLOT_MAX_GROWTH = 4


def key_slots(length: int, multiple: int) -> int:
    """The key slots of a bucket whose longest sequence has `length` tokens: `length` rounded up to `multiple`, where
    that pays (KEY_SLOT_MAX_GROWTH)."""
    slots = -(-length // multiple) * multiple
    return slots if slots <= KEY_SLOT_MAX_GROWTH * length else length


@dataclass
class AttentionBucket:
    """Adjacent packed sequences attended in one call, padded to the longest: `count` sequences from packed token
    `first`, `length` query slots each and `key_length` key slots (at least `length`, see KEY_SLOT_MULTIPLE). Where
    the sequences are of unequal length, `gather` gives the packed token each query slot reads and `real_slots` picks
    the real tokens' outputs back out, in packed order; `key_gather` gives the packed token each key slot reads where
    the keys' slots are not the queries' (padding slots read a real token of their sequence, masked out as keys), and
    `key_mask` (count, 1, 1, key_length) is True at the real keys where any slot is padding."""

    first: int
    count: int
    length: int
    key_length: int
    gather: torch.Tensor | None = None
    real_slots: torch.Tensor | None = None
    key_gather: torch.Tensor | None = None
    key_mask: torch.Tensor | None = None

    @classmethod
    def of(cls, first: int, lengths: list[int], device: torch.device, key_multiple: int = 1) -> "AttentionBucket":
        longest = lengths[0]
        key_length = key_slots(longest, key_multiple)
        if lengths[-1] == longest and key_length == longest:
            return cls(first, len(lengths), longest, key_length)
        starts = torch.tensor([0, *lengths[:-1]], device=device).cumsum(0) + first
        sizes = torch.tensor(lengths, device=device)

        def slots_of(count: int) -> tuple[torch.Tensor, torch.Tensor]:
            """For `count` slots a sequence: the packed token each slot reads, and whether it is a real one."""
            slots = torch.arange(count, device=device)
            return (starts[:, None] + torch.minimum(slots, sizes[:, None] - 1)).flatten(), slots < sizes[:, None]

        bucket = cls(first, len(lengths), longest, key_length)
        if lengths[-1] != longest:
            bucket.gather, real = slots_of(longest)
            bucket.real_slots = real.flatten().nonzero()[:, 0]
        if key_length != longest:
            bucket.key_gather, real_keys = slots_of(key_length)
        else:  # the keys take the queries' slots, which the early return leaves only for unequal lengths
            real_keys = real
        bucket.key_mask = real_keys[:, None, None, :]
        return bucket


@dataclass
class PackedSequences:
    """A padded batch with its padding removed: the real tokens of every sequence, one sequence after another
    (longest first), in one row of `num_tokens`. Linear layers, the FFN and LayerNorm treat tokens one at a time,
    so they run on the packed row unchanged and skip the padding's cost; `attend` confines attention to each
    sequence. The encoder packs after its embeddings and restores the padded layout at the end, where padding
    positions keep their embeddings.
    """

    token_indices: torch.Tensor  # where each packed token sits in the flattened (batch * length) padded layout
    buckets: list[AttentionBucket]
    cu_seq_lens: torch.Tensor  # int32 start of each sequence in the row, then num_tokens: for varlen kernels
    max_length: int
    padded_shape: tuple[int, int]

    @classmethod
    def from_attention_mask(cls, attention_mask: torch.Tensor, key_multiple: int = 1) -> "PackedSequences":
        """`key_multiple`: the buckets' keys fill whole runs of that many slots where it pays (KEY_SLOT_MULTIPLE)."""
        real = attention_mask.bool()
        lengths = real.sum(1)
        order = torch.argsort(lengths, descending=True, stable=True)
        rows, columns = real[order].nonzero(as_tuple=True)  # row-major: sequence after sequence, tokens in order
        token_indices = order[rows] * real.shape[1] + columns
        sorted_lengths = [length for length in lengths[order].tolist() if length > 0]
        buckets, start, bucket_lengths = [], 0, []
        for length in sorted_lengths + [0]:  # a last 0 closes the last bucket
            if bucket_lengths and (length == 0 or length < BUCKET_MIN_LENGTH_RATIO * bucket_lengths[0]):
                buckets.append(AttentionBucket.of(start, bucket_lengths, attention_mask.device, key_multiple))
                start += sum(bucket_lengths)
                bucket_lengths = []
            bucket_lengths.append(length)
        cu_seq_lens = torch.tensor([0, *sorted_lengths], device=attention_mask.device).cumsum(0).int()
        return cls(token_indices, buckets, cu_seq_lens, max(sorted_lengths, default=0), tuple(real.shape))

    def pack(self, padded: torch.Tensor) -> torch.Tensor:
        """(batch, length, features) -> (1, num_tokens, features)."""
        return padded.flatten(0, 1).index_select(0, self.token_indices).unsqueeze(0)

    @staticmethod
    def embeds_tokens_alone(embeddings: nn.Module, input_ids: torch.Tensor | None) -> bool:
        """Whether `embed` gives what the embeddings of the whole padded batch, then `pack`, give, bit for bit: each
        token's embedding then depends on its own id, position and type alone, computed by the same kernels on fewer
        rows (no projection, whose product may round otherwise on another number of rows; no dropout drawing; no
        gradient, whose sums would run in another order), and nothing observes the embeddings' calls (a hook would
        see other shapes)."""
        return (
            input_ids is not None
            and embeddings.projection is None
            and not (embeddings.dropout.training and embeddings.dropout.p > 0)
            and not (torch.is_grad_enabled() and any(p.requires_grad for p in embeddings.parameters()))
            and all(unobserved(module) for module in embeddings.modules())
        )

    def embed(
        self, embeddings: nn.Module, input_ids, token_type_ids, position_ids
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The embeddings' output for the real tokens, packed (1, num_tokens, features), and for the padded layout
        (batch, length, features) at the padding positions (what the output holds there; the real positions hold
        any value, overwritten by unpack). Padding is embedded once per distinct (token, position, type): a padded
        batch repeats one pad token, so that is at most one row per position, where embedding every padding token
        took a fifth of the encoder's time on a batch of 64 lengths up to 512 (all-MiniLM-L6-v2, 2-core Xeon)."""
        packed = embeddings(input_ids, None, token_type_ids, position_ids, token_indices=self.token_indices)
        batch_size, length = self.padded_shape
        rows = embeddings.position_rows(input_ids, position_ids, batch_size, length, 0, input_ids.device)
        key = input_ids.long() * (embeddings.max_positions + embeddings.position_offset) + rows  # int64: no overflow
        types = embeddings.token_types(token_type_ids, self.padded_shape, input_ids.device)
        if types is not None:
            key = key * embeddings.token_type_embeddings.num_embeddings + types
        is_padding = torch.ones(batch_size * length, dtype=torch.bool, device=input_ids.device)
        is_padding[self.token_indices] = False
        padding_positions = is_padding.nonzero()[:, 0]
        distinct, which = torch.unique(key.flatten()[padding_positions], return_inverse=True)
        # any one position of each distinct key: all of them embed alike
        representatives = torch.empty_like(distinct).scatter_(0, which, padding_positions)
        distinct_rows = embeddings(input_ids, None, token_type_ids, position_ids, token_indices=representatives)[0]
        row_of_position = torch.zeros(batch_size * length, dtype=torch.long, device=input_ids.device)
        row_of_position[padding_positions] = which
        # a lookup in the padded layout's shape gives a tensor of its own, not a view (see unpack)
        return packed, nn.functional.embedding(row_of_position.view(batch_size, length), distinct_rows)

    def unpack(self, packed: torch.Tensor, padding: torch.Tensor, padding_is_own: bool = False) -> torch.Tensor:
        """(1, num_tokens, features) -> (batch, length, features), taking padding positions from `padding`, which
        is written into where `padding_is_own` (a tensor nothing else holds, as `embed` gives). Not zeros: a
        constant row makes LayerNorm's fp16 backward divide 0 by 0 in any head applied after."""
        padded = padding.to(packed.dtype, memory_format=torch.contiguous_format, copy=not padding_is_own)
        # Written through a flat view, returned whole: an encoder output that is a view of another tensor would cost
        # compiled decoding a graph of its own (torch.compile guards an input's view base).
        padded.view(-1, padded.shape[-1]).index_copy_(0, self.token_indices, packed[0])
        return padded

    def attend(self, attention_interface: Callable, module: nn.Module, query, key, value, **kwargs):
        """Attention of each sequence over itself, for query, key and value of shape (1, heads, num_tokens,
        head_dim); returns the output as (1, num_tokens, heads, head_dim) and no probabilities."""
        if module.config._attn_implementation.startswith("flash_attention"):
            # transformers' flash integration runs the varlen kernel given the sequence offsets.
            lengths = dict(cu_seq_lens_q=self.cu_seq_lens, cu_seq_lens_k=self.cu_seq_lens)
            maxima = dict(max_length_q=self.max_length, max_length_k=self.max_length)
            return attention_interface(module, query, key, value, None, **lengths, **maxima, **kwargs)
        if uses_torch_varlen_kernel(module, query, kwargs.get("dropout", 0.0), kwargs.get("scaling")):
            from torch.nn.attention.varlen import varlen_attn

            query, key, value = (states[0].transpose(0, 1) for states in (query, key, value))  # (tokens, heads, dim)
            scale = {"scale": kwargs["scaling"]} if varlen_takes_scale() and "scaling" in kwargs else {}
            output = varlen_attn(
                query, key, value, self.cu_seq_lens, self.cu_seq_lens, self.max_length, self.max_length, **scale
            )
            return output.unsqueeze(0), None
        outputs = []
        for bucket in self.buckets:

            def padded(states: torch.Tensor, gather: torch.Tensor | None, length: int) -> torch.Tensor:
                """(count, heads, length, head_dim) over the bucket's sequences: a view where no slot is padding,
                else a copy gathered by token (whole rows of the projections' output)."""
                tokens = states[0].transpose(0, 1)  # (num_tokens, heads, head_dim)
                if gather is None:
                    slots = tokens[bucket.first : bucket.first + bucket.count * length]
                else:
                    # on two dimensions: index_select copies whole rows there, several times faster than on three
                    # sized, not -1: an attention whose heads were all pruned has no elements to infer it from
                    rows = tokens.flatten(1).index_select(0, gather)
                    slots = rows.view(len(gather), *tokens.shape[1:])
                return slots.unflatten(0, (bucket.count, length)).transpose(1, 2)

            key_gather = bucket.gather if bucket.key_gather is None else bucket.key_gather
            keys, values = (padded(states, key_gather, bucket.key_length) for states in (key, value))
            output, _ = attention_interface(
                module, padded(query, bucket.gather, bucket.length), keys, values, bucket.key_mask, **kwargs
            )
            output = output.flatten(0, 1)
            if bucket.real_slots is not None:
                real = output.flatten(1).index_select(0, bucket.real_slots)
                output = real.view(len(bucket.real_slots), *output.shape[1:])
            outputs.append(output)
        return (outputs[0] if len(outputs) == 1 else torch.cat(outputs)).unsqueeze(0), None


def uses_torch_varlen_kernel(module: nn.Module, query: torch.Tensor, dropout: float, scaling: float | None) -> bool:
    """torch's own varlen flash kernel (torch.nn.attention.varlen, torch >= 2.10) serves SDPA models on CUDA in half
    precision; it has no dropout, and its first releases no scale argument (their scale is 1/sqrt(head_dim))."""
    return (
        query.is_cuda
        and query.dtype in (torch.float16, torch.bfloat16)
        and module.config._attn_implementation == "sdpa"
        and dropout == 0.0
        and query.shape[-1] % 8 == 0
        and importlib.util.find_spec("torch.nn.attention.varlen") is not None
        and (scaling is None or varlen_takes_scale() or math.isclose(scaling, query.shape[-1] ** -0.5))
    )


@functools.cache
def varlen_takes_scale() -> bool:
    from torch.nn.attention.varlen import varlen_attn

    return "scale" in inspect.signature(varlen_attn).parameters


def records_layer_outputs(config: SelfAttnConfig, kwargs: dict) -> bool:
    """Whether a forward with `kwargs` records per-layer outputs (attention maps, hidden states), by its keywords or
    the config's defaults."""
    outputs = ("output_attentions", "output_hidden_states")
    return any(kwargs.get(output, getattr(config, output, False)) for output in outputs)


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
    if records_layer_outputs(config, kwargs):
        return None
    num_padding = attention_mask.numel() - int(attention_mask.bool().sum())
    # A batch of padding only leaves nothing to pack; the padded path handles it.
    if num_padding < MIN_PADDING_SHARE_TO_UNPAD * attention_mask.numel() or num_padding == attention_mask.numel():
        return None
    # Keys in whole runs of slots for the CPU's SDPA kernel in inference (KEY_SLOT_MULTIPLE); not measured under
    # autograd, whose backward would also run through the gathered copies.
    pads_keys = implementation == "sdpa" and attention_mask.device.type == "cpu" and not torch.is_grad_enabled()
    return PackedSequences.from_attention_mask(attention_mask, KEY_SLOT_MULTIPLE if pads_keys else 1)
