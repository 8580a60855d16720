"""The multi-head self-attention Transformer ("Attention Is All You Need", and the BERT-style encoder).

Reads top to bottom like the math: embeddings; one attention module (A = softmax(Q K^T / sqrt(d_head)),
O = A V, heads concatenated then an output Linear) that serves self-, causal- and cross-attention;
the feed-forward block FFN = Linear(act(Linear(x))); the encoder layer (post-LN: Z = LN(Attn(X) + X),
Z = LN(FFN(Z) + Z), or pre-LN); the decoder layer (causal self-attention, cross-attention over the
encoder output, FFN); the stacks; the pretrained base; then the task heads.

Only relative imports among the model files, so that `save_pretrained` can ship them as remote code.
"""

import math
import re
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.cache_utils import Cache, DynamicCache, EncoderDecoderCache
from transformers.generation import GenerationMixin
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.loss.loss_utils import ForMaskedLMLoss, fixed_cross_entropy
from transformers.masking_utils import create_bidirectional_mask, create_causal_mask
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import (
    BaseModelOutput,
    BaseModelOutputWithPastAndCrossAttentions,
    BaseModelOutputWithPoolingAndCrossAttentions,
    CausalLMOutputWithCrossAttentions,
    MaskedLMOutput,
    MultipleChoiceModelOutput,
    QuestionAnsweringModelOutput,
    Seq2SeqLMOutput,
    Seq2SeqModelOutput,
    SequenceClassifierOutput,
    TokenClassifierOutput,
)
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, PreTrainedModel
from transformers.processing_utils import Unpack
from transformers.utils import ModelOutput, TransformersKwargs, logging
from transformers.utils.generic import can_return_tuple, merge_with_config_defaults
from transformers.utils.output_capturing import OutputRecorder, capture_outputs

from .config import SelfAttnConfig, attention_key
from .heads import HEADS
from .hub import SelfAttnHubMixin, refuse_missing_local_path
from .input_checks import (
    accepts_past_key_values,
    check_attention_mask,
    check_both_labels,
    check_cache,
    check_flash_offsets,
    check_ids,
    check_per_token_shape,
    refuse_left_padding,
    refuse_unknown_kwargs,
)
from .dropout import Dropout, zero_dropped
from .kernels import Linear, in_row_blocks, linear_then_activation, rows_per_block
from .lean_generation import LeanGenerationMixin, counting_positions, reorder_cache_layers
from .packing import PackedSequences, packed_sequences_for, records_layer_outputs

logger = logging.get_logger(__name__)


def sinusoidal_positions(num_positions: int, dim: int) -> torch.Tensor:
    """The paper's fixed encodings, sines in the first half of the features and cosines in the second
    (the layout of Marian and fairseq checkpoints). Computed in float64 so the table is exact in fp32."""
    positions = torch.arange(num_positions, dtype=torch.float64).unsqueeze(1)
    inverse_frequencies = 10000.0 ** (-torch.arange(0, dim, 2, dtype=torch.float64) / dim)
    angles = positions * inverse_frequencies
    return torch.cat([angles.sin(), angles.cos()], dim=1).float()


class SelfAttnScaledEmbedding(nn.Embedding):
    """Token embeddings multiplied by sqrt(hidden_size) when `scale_embedding` is set, as in the paper.
    Scaling inside the module keeps `get_input_embeddings()(ids)` equal to what the model computes. The factor is
    named `embed_scale`, as in transformers' scaled embeddings: PEFT's adapters on an embedding (LoRA, trainable
    tokens) read it by that name to scale what they add."""

    def __init__(self, num_embeddings: int, embedding_dim: int, padding_idx: int | None, embed_scale: float = 1.0):
        super().__init__(num_embeddings, embedding_dim, padding_idx=padding_idx)
        self.embed_scale = embed_scale

    def __setstate__(self, state: dict) -> None:
        # Whole-model pickles (torch.save(model)) of earlier releases name the factor `scale`.
        if "scale" in state and "embed_scale" not in state:
            state = dict(state)
            state["embed_scale"] = state.pop("scale")
        super().__setstate__(state)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        embeddings = super().forward(input_ids)
        return embeddings * self.embed_scale if self.embed_scale != 1.0 else embeddings


def embedding_table(module: nn.Module) -> nn.Module:
    """The embedding layer under adapter wrappers, which do not pass on its sizes (num_embeddings, embedding_dim):
    PEFT's LoRA layers give theirs by get_base_layer(), its trainable-tokens wrapper by original_module."""
    while not isinstance(module, nn.Embedding):
        if hasattr(module, "get_base_layer"):
            inner = module.get_base_layer()
        else:
            inner = getattr(module, "original_module", None)
        if inner is None or inner is module:
            return module
        module = inner
    return module


class SelfAttnEmbeddings(nn.Module):
    """tokens (+ positions) (+ token types) -> optional LayerNorm -> dropout -> optional projection."""

    def __init__(self, config: SelfAttnConfig, word_embeddings: nn.Embedding | None = None):
        super().__init__()
        embedding_size = config.embedding_size or config.hidden_size
        scale = math.sqrt(config.hidden_size) if config.scale_embedding else 1.0
        self.word_embeddings = word_embeddings or SelfAttnScaledEmbedding(
            config.vocab_size, embedding_size, config.pad_token_id, scale
        )
        self.position_offset = config.position_offset
        self.padding_aware_positions = config.padding_aware_positions
        self.max_positions = config.max_position_embeddings
        self.pad_token_id = config.pad_token_id
        num_rows = config.max_position_embeddings + config.position_offset
        if config.position_embedding_type == "learned":
            self.position_embeddings = nn.Embedding(num_rows, embedding_size)
        else:
            self.register_buffer("sinusoidal_table", sinusoidal_positions(num_rows, embedding_size), persistent=False)
        self.token_type_embeddings = (
            nn.Embedding(config.type_vocab_size, embedding_size) if config.type_vocab_size > 0 else None
        )
        self.layer_norm = (
            nn.LayerNorm(embedding_size, eps=config.layer_norm_eps) if config.embedding_layer_norm else None
        )
        self.dropout = Dropout(config.hidden_dropout_prob)
        self.projection = (
            Linear(embedding_size, config.hidden_size) if embedding_size != config.hidden_size else None
        )

    def position_rows(self, input_ids, position_ids, batch_size, seq_length, past_length, device) -> torch.Tensor:
        """Rows of the position table for each token, offset included: from `position_ids` where given, else counted
        (from past_length on, or over the non-padding tokens with padding-aware positions)."""
        if position_ids is not None:
            check_per_token_shape(
                position_ids,
                (batch_size, seq_length),
                "position_ids",
                "pass one position per token of this call (the new tokens alone when decoding with a cache).",
                shared_by_batch=True,
            )
            check_ids(
                position_ids,
                self.max_positions,
                "position_ids",
                "position table",
                f"Positions run from 0 to {self.max_positions - 1}: truncate the input "
                f"(tokenizer(..., truncation=True, max_length={self.max_positions})) or generate fewer tokens "
                "(max_new_tokens).",
            )
            return position_ids + self.position_offset
        if not torch.compiler.is_compiling() and past_length + seq_length > self.max_positions:
            raise ValueError(
                f"The sequence is {past_length + seq_length} tokens long (cached {past_length} + new "
                f"{seq_length}) but this model has positions for {self.max_positions}. Truncate the input "
                f"(tokenizer(..., truncation=True, max_length={self.max_positions})) or generate fewer tokens."
            )
        if self.padding_aware_positions and input_ids is not None:
            is_token = input_ids.ne(self.pad_token_id).long()
            return (torch.cumsum(is_token, dim=1) + past_length) * is_token + (self.position_offset - 1)
        # arange(n) + past_length rather than arange(past_length, ...): a static cache's length is a tensor and
        # must stay one for torch.compile.
        positions = torch.arange(seq_length, device=device) + (past_length + self.position_offset)
        return positions.unsqueeze(0).expand(batch_size, -1)

    def token_types(self, token_type_ids, shape: tuple[int, int], device) -> torch.Tensor | None:
        """The token types to embed (zeros where none are given), or None for a model without a token-type table,
        which takes every token as one segment: given ids are checked all the same, so that segments it cannot tell
        apart are not dropped without a word."""
        if token_type_ids is None:
            if self.token_type_embeddings is None:
                return None
            return torch.zeros(shape, dtype=torch.long, device=device)
        check_per_token_shape(
            token_type_ids, shape, "token_type_ids", "pass one segment id per token, as the tokenizer returns them."
        )
        if self.token_type_embeddings is None:
            check_ids(
                token_type_ids,
                1,
                "token_type_ids",
                "single segment",
                "This model has no token-type embeddings (config.type_vocab_size=0) and takes every token as segment "
                "0: pass no token_type_ids (tokenizer(..., return_token_type_ids=False)), or use a model with a "
                "token-type table for sentence pairs.",
            )
            return None
        check_ids(
            token_type_ids,
            self.token_type_embeddings.num_embeddings,
            "token_type_ids",
            "token types",
            "This model has config.type_vocab_size segments; pass segment ids below it (or none).",
        )
        return token_type_ids

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        past_length: int = 0,
        token_indices: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """token_indices: embed only these tokens, indices into the flattened (batch * length) inputs, as one row
        (1, len(token_indices), width). Each token's embedding depends on its own id, position and type alone, so
        the unpadded encoder embeds its real tokens without the padding (packing.py)."""
        table = embedding_table(self.word_embeddings)
        if inputs_embeds is None:
            if input_ids.dim() != 2 or input_ids.numel() == 0:
                raise ValueError(
                    f"input_ids has shape {tuple(input_ids.shape)}; the model needs (batch_size, sequence_length) "
                    "with at least one sequence of at least one token. Tokenize a list of non-empty texts."
                )
            check_ids(
                input_ids,
                table.num_embeddings,
                "input_ids",
                "vocabulary",
                "Use the tokenizer that belongs to this model, or resize the embeddings with "
                "`model.resize_token_embeddings(len(tokenizer))`.",
            )
        elif (
            inputs_embeds.dim() != 3
            or inputs_embeds.shape[-1] != table.embedding_dim
            or 0 in inputs_embeds.shape
        ):
            raise ValueError(
                f"inputs_embeds has shape {tuple(inputs_embeds.shape)}; the model needs (batch_size, sequence_length, "
                f"{table.embedding_dim}) with at least one token: vectors as wide as the token "
                "embeddings (model.get_input_embeddings()(input_ids) makes them)."
            )
        inputs = input_ids if inputs_embeds is None else inputs_embeds
        batch_size, seq_length = inputs.shape[:2]
        position_rows = self.position_rows(input_ids, position_ids, batch_size, seq_length, past_length, inputs.device)
        token_type_ids = self.token_types(token_type_ids, (batch_size, seq_length), inputs.device)
        if token_indices is not None:

            def picked(tensor: torch.Tensor | None) -> torch.Tensor | None:
                if tensor is None:
                    return None
                # position ids may be shared by the batch: (length,) or (1, length)
                layout = tensor.expand(batch_size, seq_length, *tensor.shape[2:]) if tensor.dim() < 3 else tensor
                return layout.flatten(0, 1).index_select(0, token_indices).unsqueeze(0)

            input_ids, inputs_embeds, position_rows, token_type_ids = map(
                picked, (input_ids, inputs_embeds, position_rows, token_type_ids)
            )
        if inputs_embeds is None:
            inputs_embeds = self.word_embeddings(input_ids)
        if hasattr(self, "position_embeddings"):
            positions = self.position_embeddings(position_rows)
        else:
            positions = self.sinusoidal_table[position_rows]
        # Token types are added before positions, as BERT-family models do: float addition is not associative,
        # and the other order drifts from converted checkpoints by about 1e-5 after a few layers.
        embeddings = inputs_embeds
        if token_type_ids is not None:
            embeddings = embeddings + self.token_type_embeddings(token_type_ids)
        # Positions take the dtype of floating inputs (a half-precision model's own); integer vectors are promoted
        # by the sum, as BertEmbeddings promotes them.
        if inputs_embeds.is_floating_point():
            positions = positions.to(inputs_embeds.dtype)
        embeddings = embeddings + positions
        if self.layer_norm is not None:
            embeddings = self.layer_norm(embeddings)
        embeddings = self.dropout(embeddings)
        if self.projection is not None:
            embeddings = self.projection(embeddings)
        return embeddings


def eager_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float,
    dropout: float = 0.0,
    **kwargs: Unpack[TransformersKwargs],
) -> tuple[torch.Tensor, torch.Tensor]:
    """softmax(Q K^T * scaling + mask) V over (batch, heads, length, head_dim); returns the output as
    (batch, length, heads, head_dim) and the attention probabilities (in training with dropout on the CPU, the kept
    ones before dropout's 1 / (1 - p), which goes on the output). The mask is added (eager's masks) or, boolean, keeps
    where True (SDPA's, see SelfAttnAttention.forward); without one a causal module attends causally, as SDPA. A
    decoder's query that the mask lets attend to no key gets zero probabilities, as SDPA gives (queries_with_keys)."""
    if module.training:
        # On the queries, where its backward pass is cheaper (head_dim columns a position, not key_length).
        scores = torch.matmul(query * scaling, key.transpose(-1, -2))
    else:
        # The form ONNX Runtime's optimizer fuses into its Attention operator in exported graphs.
        scores = torch.matmul(query, key.transpose(-1, -2)) * scaling
    query_length, key_length = scores.shape[-2:]
    with_keys = queries_with_keys(module, attention_mask)  # of the mask given, not of the causal one made below
    if attention_mask is None and getattr(module, "is_causal", False) and query_length > 1:
        attention_mask = torch.ones(query_length, key_length, dtype=torch.bool, device=scores.device).tril(
            key_length - query_length
        )
    if attention_mask is not None and attention_mask.dtype == torch.bool:
        scores = scores.masked_fill(~attention_mask, torch.finfo(scores.dtype).min)
    elif attention_mask is not None:
        scores = scores + attention_mask
    probabilities = nn.functional.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    if with_keys is not None:
        # torch.where, not a product: a softmax over keys all at -inf gives NaN.
        probabilities = torch.where(with_keys, probabilities, 0)
    probabilities, dropout_scale = zero_dropped(probabilities, dropout, module.training)
    output = torch.matmul(probabilities, value)
    if dropout_scale != 1.0:
        output = output * dropout_scale
    return output.transpose(1, 2).contiguous(), probabilities


def queries_with_keys(module: nn.Module, attention_mask) -> torch.Tensor | None:
    """Where a query of a decoder attention may attend to at least one key: (batch or 1, heads or 1, queries or 1, 1),
    True or False; None where every query may (no mask, a block mask, the encoder).

    A query the mask lets attend to no key (a cross-attention over a source that is all padding, a decoder position
    that is left padding) has no defined softmax. SDPA (transformers' default, and MarianMTModel's) and flex attention
    give it a zero output, eager attention an even spread over the masked keys (every score at the same minimum), and
    so did the graphs traced from it (ONNX export). Such a query gets SDPA's zero on every path: eager zeroes its
    probabilities, SelfAttnAttention.forward the output of the other implementations that do not give zeros
    themselves. A 4-D mask is eager's (additive: a key is masked at the dtype's minimum, or -inf) or SDPA's (boolean);
    flash attention's is the 2-D (batch, keys) padding mask. The encoder's self-attention is left as it is: its only
    keyless queries are those of a row that is all padding, whose outputs the encoder replaces with the embeddings,
    and its exported graph keeps the pattern ONNX Runtime fuses (the softmax straight into the product with the
    values)."""
    if not (getattr(module, "is_causal", False) or getattr(module, "is_cross_attention", False)):
        return None
    if not isinstance(attention_mask, torch.Tensor) or attention_mask.dim() not in (2, 4):
        return None
    if attention_mask.dim() == 2:
        return attention_mask.bool().any(-1).view(-1, 1, 1, 1)
    if attention_mask.dtype == torch.bool:
        return attention_mask.any(-1, keepdim=True)
    return (attention_mask > torch.finfo(attention_mask.dtype).min).any(-1, keepdim=True)


class SelfAttnAttention(nn.Module):
    """Multi-head attention. Self-attention when keys come from the same sequence, cross-attention when
    `key_value_states` (the encoder output) is given; `is_causal` marks the decoder's self-attention."""

    def __init__(
        self, config: SelfAttnConfig, layer_idx: int | None = None, is_causal: bool = False, is_cross_attention=False
    ):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        # SDPA and flash read `is_causal` from the module and would otherwise assume causal.
        self.is_causal = is_causal
        self.is_cross_attention = is_cross_attention
        self.head_dim = config.head_dim
        self.scaling = self.head_dim**-0.5
        self.attention_dropout = config.attention_dropout
        # Its name in config.pruned_heads; the heads left (original indices) size the projections.
        self.pruning_key = (
            attention_key("decoder" if is_causal or is_cross_attention else "encoder", layer_idx, is_cross_attention)
            if layer_idx is not None
            else None
        )
        self.kept_heads = config.kept_heads(self.pruning_key)
        heads_width = len(self.kept_heads) * self.head_dim
        self.q_proj = Linear(config.hidden_size, heads_width)
        self.k_proj = Linear(config.hidden_size, heads_width)
        self.v_proj = Linear(config.hidden_size, heads_width)
        self.o_proj = Linear(heads_width, config.hidden_size)
        # The dtype of the attention products and the key/value cache where it is not the projections' (None: theirs):
        # model.quantize("int8") sets bfloat16 on CPUs that compute it natively (see quantization.py).
        self.attention_dtype = None

    def split_heads(self, states: torch.Tensor) -> torch.Tensor:
        # -1, not len(kept_heads): under tensor parallelism each device holds a share of the heads. A layer whose heads
        # were all pruned has no elements to infer the count from. (Not read from kept_heads: torch.compile would
        # check that list, head by head, before every compiled call.)
        heads = -1 if states.shape[-1] else 0
        states = states.view(*states.shape[:-1], heads, self.head_dim).transpose(1, 2)
        return states if self.attention_dtype is None else states.to(self.attention_dtype)

    @torch.no_grad()
    def prune(self, heads: list[int]) -> None:
        """Remove `heads` (original indices, still present): their rows of q/k/v and columns of o_proj go. The
        Linear modules stay (their class and hooks too); their parameters are replaced by smaller ones."""
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            linear = getattr(self, name)
            weight = getattr(linear, "weight", None)
            if not isinstance(linear, nn.Linear) or type(weight.detach()) is not torch.Tensor:
                kind = type(weight.detach()).__name__ if torch.is_tensor(weight) else "no"
                raise TypeError(
                    f"{name} of attention {self.pruning_key!r} is a {type(linear).__name__} with {kind} weight; heads "
                    "can be pruned from plain linear layers only. Prune before quantizing or adding adapters (or merge "
                    "the adapters first)."
                )
        removed = set(heads)
        positions = [position for position, head in enumerate(self.kept_heads) if head not in removed]
        columns = torch.tensor(
            [position * self.head_dim + offset for position in positions for offset in range(self.head_dim)],
            dtype=torch.long,
            device=self.q_proj.weight.device,
        )

        def shrunk(parameter: nn.Parameter, dim: int) -> nn.Parameter:
            return nn.Parameter(parameter.index_select(dim, columns).clone(), requires_grad=parameter.requires_grad)

        for linear in (self.q_proj, self.k_proj, self.v_proj):
            linear.weight = shrunk(linear.weight, 0)
            if linear.bias is not None:
                linear.bias = shrunk(linear.bias, 0)
            linear.out_features = len(columns)
        self.o_proj.weight = shrunk(self.o_proj.weight, 1)
        self.o_proj.in_features = len(columns)
        self.kept_heads = [self.kept_heads[position] for position in positions]

    def keys_and_values(self, source: torch.Tensor, cache: Cache | None) -> tuple[torch.Tensor, torch.Tensor]:
        if cache is None:
            return self.split_heads(self.k_proj(source)), self.split_heads(self.v_proj(source))
        if self.is_cross_attention:
            # The encoder output does not change while decoding: project it once, then reuse.
            if cache.is_updated.get(self.layer_idx):
                layer = cache.cross_attention_cache.layers[self.layer_idx]
                return layer.keys, layer.values
            keys, values = self.split_heads(self.k_proj(source)), self.split_heads(self.v_proj(source))
            cache.is_updated[self.layer_idx] = True
            return cache.cross_attention_cache.update(keys, values, self.layer_idx)
        self_cache = cache.self_attention_cache if isinstance(cache, EncoderDecoderCache) else cache
        keys, values = self.split_heads(self.k_proj(source)), self.split_heads(self.v_proj(source))
        keys, values = self_cache.update(keys, values, self.layer_idx)
        if not keys.shape[1] and isinstance(self_cache, DynamicCache):
            # Without heads the keys have no elements, in which a DynamicLayer counts no positions; transformers'
            # generate() reads the first layer's count, whether it kept heads or not.
            self_cache.layers[self.layer_idx] = counting_positions(self_cache.layers[self.layer_idx])
        return keys, values

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        key_value_states: torch.Tensor | None = None,
        cache: Cache | None = None,
        packed_sequences: PackedSequences | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        query = self.split_heads(self.q_proj(hidden_states))
        # key_value_states: the encoder output for cross-attention; in self-attention, the whole sequence when only
        # some of its positions ask (SelfAttnEncoderLayer's first_token_only).
        source = key_value_states if self.is_cross_attention or key_value_states is not None else hidden_states
        key, value = self.keys_and_values(source, cache)
        if self.attention_dtype is not None and key.dtype != self.attention_dtype:  # a cache filled before quantize()
            raise ValueError(
                f"cache: it holds {key.dtype} keys and values for layer {self.layer_idx}, but this attention computes "
                f"in {self.attention_dtype} (model.quantize('int8') on a CPU with native bfloat16). Start a new cache, "
                "or quantize with bf16_attention=False to keep the attention in the model's dtype."
            )

        attention_interface: Callable = ALL_ATTENTION_FUNCTIONS.get_interface(
            self.config._attn_implementation, eager_attention_forward
        )
        dropout = self.attention_dropout if self.training else 0.0
        if dropout and query.device.type == "cpu" and self.config._attn_implementation == "sdpa":
            # With dropout on, torch's SDPA runs its unfused math path on the CPU: this is the same math, with the
            # dropout mask drawn faster (dropout.py). An "sdpa" function registered in place of transformers' own
            # is bypassed here, in CPU training with dropout only.
            attention_interface = eager_attention_forward
        if packed_sequences is not None:
            output, probabilities = packed_sequences.attend(
                attention_interface, self, query, key, value, dropout=dropout, scaling=self.scaling, **kwargs
            )
        else:
            output, probabilities = attention_interface(
                self, query, key, value, attention_mask, dropout=dropout, scaling=self.scaling, **kwargs
            )
            # eager_attention_forward zeroes the probabilities of queries without keys itself, so that the
            # probabilities it returns are those its output is made of. transformers' SDPA with a boolean mask (the
            # masks transformers prepares for it) gives them zeros on the CPU (torch's math and CPU flash kernels),
            # with nothing to add to a decoding step; other devices' kernels have given NaN there
            # (pytorch/pytorch#110213), which the zeroing below replaces.
            zeroes_itself = attention_interface is eager_attention_forward or (
                attention_interface is sdpa_attention_forward
                and isinstance(attention_mask, torch.Tensor)
                and attention_mask.dtype == torch.bool
                and attention_mask.device.type == "cpu"
            )
            with_keys = None if zeroes_itself else queries_with_keys(self, attention_mask)
            if with_keys is not None:
                output = torch.where(with_keys.transpose(1, 2), output, 0)
        # flatten, not reshape(..., -1): a layer whose heads were all pruned has no elements to infer the width from.
        output = output.flatten(-2).contiguous()
        if self.attention_dtype is not None:  # back to the dtype of the layer's input
            output = output.to(hidden_states.dtype)
            probabilities = None if probabilities is None else probabilities.to(hidden_states.dtype)
        return self.o_proj(output), probabilities


class SelfAttnFeedForward(nn.Module):
    """FFN(x) = fc2(dropout(act(fc1(x)))), each position alone."""

    def __init__(self, config: SelfAttnConfig):
        super().__init__()
        self.fc1 = Linear(config.hidden_size, config.intermediate_size)
        self.activation = ACT2FN[config.hidden_act]
        self.activation_dropout = Dropout(config.activation_dropout)
        self.fc2 = Linear(config.intermediate_size, config.hidden_size)
        # transformers' feed-forward chunking: this many positions of each row of the batch at a time (0: all)
        self.chunk_size = config.chunk_size_feed_forward

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        # Positions a block at a time: the config's chunks, or blocks that are faster where each row's result is the
        # same to the bit (kernels.rows_per_block).
        modules = (self.activation, self.activation_dropout, self.fc2)
        rows = rows_per_block(self.fc1, modules, hidden_states, self.chunk_size)
        if rows is None:
            return self.position_wise(hidden_states)
        return in_row_blocks(self.position_wise, hidden_states, rows)

    def position_wise(self, hidden_states: torch.Tensor) -> torch.Tensor:
        # act(fc1(x)) is one oneDNN call where kernels.Linear runs oneDNN (CPU float32 inference); read only by the
        # dropout and fc2, it may reuse a scratch buffer
        consumers = (self.activation_dropout, self.fc2)
        hidden_states = linear_then_activation(self.fc1, self.activation, hidden_states, consumers)
        return self.fc2(self.activation_dropout(hidden_states))


class SelfAttnEncoderLayer(GradientCheckpointingLayer):
    """Post-LN: Z = LN(Attn(X) + X); Z = LN(FFN(Z) + Z). Pre-LN: Z = X + Attn(LN(X)); Z = Z + FFN(LN(Z))."""

    def __init__(self, config: SelfAttnConfig, layer_idx: int | None = None, is_causal: bool = False):
        super().__init__()
        self.pre_layer_norm = config.pre_layer_norm
        self.dropout = Dropout(config.hidden_dropout_prob)
        self.self_attn = SelfAttnAttention(config, layer_idx, is_causal=is_causal)
        self.self_attn_layer_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.ffn = SelfAttnFeedForward(config)
        self.ffn_layer_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def residual(
        self, hidden_states: torch.Tensor, layer_norm: nn.LayerNorm, sublayer: Callable, rows: slice | None = None
    ) -> torch.Tensor:
        """Apply one sub-layer with its dropout, residual connection and LayerNorm (before or after); the output
        keeps the positions `rows` (all if None), which the sub-layer returns."""
        inputs = layer_norm(hidden_states) if self.pre_layer_norm else hidden_states
        kept = hidden_states if rows is None else hidden_states[:, rows]
        hidden_states = kept + self.dropout(sublayer(inputs))
        return hidden_states if self.pre_layer_norm else layer_norm(hidden_states)

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        cache: Cache | None = None,
        first_token_only: bool = False,
        **kwargs: Unpack[TransformersKwargs],
    ) -> torch.Tensor:
        """first_token_only: return the first position alone, computed from every position's keys and values; the
        queries, the output projection and the FFN then run on that one row."""
        rows = slice(0, 1) if first_token_only else None
        if first_token_only and attention_mask is not None:
            attention_mask = attention_mask[:, :, rows]  # (batch, 1 or heads, queries, keys)

        def attention(inputs: torch.Tensor) -> torch.Tensor:
            queries, key_value_states = (inputs[:, rows], inputs) if first_token_only else (inputs, None)
            return self.self_attn(
                queries, attention_mask=attention_mask, key_value_states=key_value_states, cache=cache, **kwargs
            )[0]

        hidden_states = self.residual(hidden_states, self.self_attn_layer_norm, attention, rows)
        return self.residual(hidden_states, self.ffn_layer_norm, self.ffn)


class SelfAttnDecoderLayer(SelfAttnEncoderLayer):
    """Causal self-attention, then cross-attention over the encoder output (absent in a decoder-only
    model), then the FFN; each a residual sub-layer like the encoder's."""

    def __init__(self, config: SelfAttnConfig, layer_idx: int | None = None, has_cross_attention: bool = True):
        super().__init__(config, layer_idx, is_causal=True)
        if has_cross_attention:
            self.cross_attn = SelfAttnAttention(config, layer_idx, is_cross_attention=True)
            self.cross_attn_layer_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        encoder_hidden_states: torch.Tensor | None = None,
        encoder_attention_mask: torch.Tensor | None = None,
        cache: Cache | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> torch.Tensor:
        hidden_states = self.residual(
            hidden_states,
            self.self_attn_layer_norm,
            lambda x: self.self_attn(x, attention_mask=attention_mask, cache=cache, **kwargs)[0],
        )
        if hasattr(self, "cross_attn"):
            hidden_states = self.residual(
                hidden_states,
                self.cross_attn_layer_norm,
                lambda x: self.cross_attn(
                    x, attention_mask=encoder_attention_mask, key_value_states=encoder_hidden_states, cache=cache,
                    **kwargs,
                )[0],
            )
        return self.residual(hidden_states, self.ffn_layer_norm, self.ffn)


class SelfAttnPreTrainedModel(SelfAttnHubMixin, PreTrainedModel):
    config: SelfAttnConfig
    config_class = SelfAttnConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["SelfAttnEmbeddings", "SelfAttnEncoderLayer", "SelfAttnDecoderLayer"]
    _supports_flash_attn = True
    _supports_sdpa = True
    _supports_flex_attn = True
    _supports_attention_backend = True
    _can_compile_fullgraph = True
    # Set by the selfattn package when imported (its checkpoint conversion, which saved models do not ship): a
    # function (model class, source, from_pretrained kwargs) -> the kwargs that load a BERT-family folder into the
    # class, or None for a selfattn folder. Without the package, from_pretrained reads selfattn folders only.
    foreign_checkpoint_loader: Callable | None = None
    # Keywords forward() takes without naming them in its signature (input_checks.refuse_unknown_kwargs); a class
    # attribute, so that the check every forward makes reads it without nn.Module.__getattr__'s fallback.
    keywords_outside_signature: tuple[str, ...] = ()

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *model_args, **kwargs):
        """With the selfattn package installed, also loads a BERT-family checkpoint (config.json model_type bert,
        roberta, xlm-roberta, distilbert or electra) without a conversion step: its config and tensor names are
        translated on the fly, then loading proceeds as usual (a head the checkpoint lacks is initialised and
        reported)."""
        refuse_missing_local_path(pretrained_model_name_or_path)
        loader = cls.foreign_checkpoint_loader
        if loader is not None and pretrained_model_name_or_path is not None and kwargs.get("state_dict") is None:
            translated = loader(cls, pretrained_model_name_or_path, kwargs)
            if translated is not None:
                loaded = super().from_pretrained(None, *model_args, **translated)
                # Loaded "from None", the model would name no source; PEFT and model cards read this name.
                model = loaded[0] if isinstance(loaded, tuple) else loaded  # tuple with output_loading_info=True
                model.name_or_path = model.config.name_or_path = str(pretrained_model_name_or_path)
                return loaded
        return super().from_pretrained(pretrained_model_name_or_path, *model_args, **kwargs)

    def mark_tied_weights_as_initialized(self, loading_info):
        # The decoder of an encoder-decoder holds the encoder's token table module itself (one table, as in the
        # paper), and the table is also declared tied. transformers marks tied targets as loaded, which with a shared
        # module marks the table itself, and would then drop it from missing_keys when the checkpoint lacks it (left
        # on the meta device, never initialised). Keep every parameter that was not actually loaded reported missing.
        not_loaded = {
            key
            for key in loading_info.missing_keys
            if not getattr(self.get_parameter_or_buffer(key), "_is_hf_initialized", False)
        }
        super().mark_tied_weights_as_initialized(loading_info)
        loading_info.missing_keys |= not_loaded

    def init_parallel_plans(self):
        super().init_parallel_plans()
        # config.base_model_tp_plan names modules of SelfAttnModel ("encoder.layers.*.ffn.fc1"). The encoder and decoder
        # stacks are pretrained models too, so transformers applies the plan to them as well and copies their rules,
        # prefixed, into every parent: rules naming no module, which it would warn about. Keep the ones that do.
        module_names = {re.sub(r"\.\d+(?=\.|$)", ".*", name) for name, _ in self.named_modules()}
        self._tp_plan = {rule: style for rule, style in (self._tp_plan or {}).items() if rule in module_names}

    def get_output_embeddings(self):
        # An LM head is either the projection onto the vocabulary itself, or BERT's MLM head, which projects with its
        # `decoder` after a transform.
        lm_head = getattr(self, "lm_head", None)
        return getattr(lm_head, "decoder", lm_head)

    def set_output_embeddings(self, new_embeddings):
        if hasattr(self.lm_head, "decoder"):
            self.lm_head.decoder = new_embeddings
        else:
            self.lm_head = new_embeddings

    def resize_token_embeddings(self, new_num_tokens=None, pad_to_multiple_of=None, mean_resizing=True):
        lm_head = self.get_output_embeddings()
        if lm_head is not None and not isinstance(lm_head, nn.Linear):  # int8 layers are no nn.Linear
            # A local import: quantization.py imports torch.ao, which only models that quantize should load (as in
            # quantize()); a float model never gets here.
            from .quantization import refuse_resizing_int8_lm_head

            refuse_resizing_int8_lm_head(self, new_num_tokens)
        if new_num_tokens is not None:
            # Refused before any weight changes: a config naming ids outside the table would not load again.
            # pad_to_multiple_of rounds the size up, as in transformers.
            size = new_num_tokens
            if isinstance(pad_to_multiple_of, int) and pad_to_multiple_of > 0:
                size = math.ceil(size / pad_to_multiple_of) * pad_to_multiple_of
            outside, largest = {}, -1
            for name in ("pad_token_id", "bos_token_id", "eos_token_id", "decoder_start_token_id"):
                value = getattr(self.config, name)
                ids = value if isinstance(value, list) else [] if value is None else [value]  # eos may be a list
                if ids and max(ids) >= size:
                    outside[name], largest = value, max(largest, *ids)
            if outside:
                raise ValueError(
                    f"resize_token_embeddings(new_num_tokens={new_num_tokens}) keeps token ids 0..{size - 1}, but "
                    f"the config names ids beyond them: {outside}. Pass new_num_tokens >= {largest + 1}, or first "
                    "set those ids in model.config (and model.generation_config) to tokens that stay."
                )
        embeddings = super().resize_token_embeddings(new_num_tokens, pad_to_multiple_of, mean_resizing)
        # The fixed logits bias of converted Marian/BART models follows the vocabulary: kept, cut or zero-extended.
        bias = getattr(self, "final_logits_bias", None)
        if bias is not None:
            extension = bias.new_zeros(1, max(0, embeddings.num_embeddings - bias.shape[-1]))
            self.final_logits_bias = torch.cat([bias[:, : embeddings.num_embeddings], extension], dim=1)
        return embeddings

    def prune_heads(self, heads_to_prune: dict[int | str, list[int]]) -> None:
        """Remove attention heads for good: their rows of q/k/v and columns of o_proj go, and `config.pruned_heads`
        records them, so the pruned model saves, reloads (also as remote code) and trains on as it is.

        heads_to_prune: {layer: [heads]} as transformers 4 took it for BERT, layer an int for a model with one stack
        (the encoder, or the decoder of a causal LM); or keyed by attention name, "encoder.L", "decoder.L" (decoder
        self-attention) or "decoder.L.cross_attn", which an encoder-decoder needs. Heads are numbered as before any
        pruning, so pruning twice accumulates. A layer may lose all its heads: its attention then adds only o_proj's
        bias. Prune before creating an optimizer (the parameters are replaced) and before quantizing."""
        resolved = self.config.resolve_heads_to_prune(heads_to_prune)
        attentions = {
            module.pruning_key: module
            for module in self.modules()
            if isinstance(module, SelfAttnAttention) and module.pruning_key is not None
        }
        absent = sorted(set(resolved) - set(attentions))
        if absent:
            raise ValueError(
                f"heads_to_prune names {absent}, which this {type(self).__name__} does not hold (it has "
                f"{sorted(attentions)}); call prune_heads on the model that holds them."
            )
        for key, heads in resolved.items():
            attentions[key].prune(heads)
        # Submodules share the config; any that holds its own is kept in step.
        configs = {id(self.config): self.config}
        configs.update({id(module.config): module.config for module in attentions.values()})
        for config in configs.values():
            pruned = dict(config.pruned_heads or {})
            for key, heads in resolved.items():
                pruned[key] = sorted({*pruned.get(key, ()), *heads})
            config.pruned_heads = {key: pruned[key] for key in config.attention_keys() if key in pruned}

    def _init_weights(self, module):
        super()._init_weights(module)
        if isinstance(module, SelfAttnEmbeddings) and hasattr(module, "sinusoidal_table"):
            init.copy_(module.sinusoidal_table, sinusoidal_positions(*module.sinusoidal_table.shape))
        elif getattr(module, "final_logits_bias", None) is not None:
            init.zeros_(module.final_logits_bias)

    @property
    def quantization_mode(self) -> str | None:
        """None, or the mode quantize() applied ("int8" or "bf16") while the model still is what it made: after
        model.float() or .half(), a bf16 model is no longer "bf16". The recorded mode lives in the instance's
        __dict__ (where models pickled by earlier releases hold it too); for bf16 the dtypes decide, as a bf16 model
        has no _apply hook to record a conversion (quantization.quantize)."""
        mode = self.__dict__.get("quantization_mode")
        if mode == "bf16":
            tensors = (*self.parameters(), *self.buffers())
            if {tensor.dtype for tensor in tensors if tensor.is_floating_point()} != {torch.bfloat16}:
                return None
        return mode

    @quantization_mode.setter
    def quantization_mode(self, mode: str | None) -> None:
        self.__dict__["quantization_mode"] = mode

    def quantize(
        self, mode: str, keep_float32=None, per_token_activations=None, bf16_attention=None
    ) -> "SelfAttnPreTrainedModel":
        """In place, for inference; returns the model. See quantization.py.

        "int8": on the CPU, int8 linear layers with per-channel weight scales, through torch's dynamic quantization;
        inference only, not saved. `keep_float32`: fnmatch patterns of linear layers' names to leave in float32 (by
        default the encoder's value projections); `per_token_activations`: those whose activations get one scale
        per token (by default the encoder's fc1 and fc2); `bf16_attention`: attention and its key/value cache in
        bfloat16 (by default, None: where the CPU computes bfloat16 natively).
        "bf16": every weight in bfloat16, on any device."""
        from .quantization import quantize  # torch.ao is imported only by models that quantize

        return quantize(self, mode, keep_float32, per_token_activations, bf16_attention)


class SelfAttnStack(SelfAttnPreTrainedModel):
    """What the encoder and the decoder share: embeddings, the layers, and a final LayerNorm if pre-LN."""

    def __init__(self, config: SelfAttnConfig, layers: list[nn.Module], word_embeddings: nn.Embedding | None = None):
        super().__init__(config)
        self.embeddings = SelfAttnEmbeddings(config, word_embeddings)
        self.layers = nn.ModuleList(layers)
        self.final_layer_norm = (
            nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps) if config.pre_layer_norm else None
        )
        self.gradient_checkpointing = False
        self.post_init()

    def get_input_embeddings(self):
        return self.embeddings.word_embeddings

    def set_input_embeddings(self, value):
        self.embeddings.word_embeddings = value


class SelfAttnEncoder(SelfAttnStack):
    """Embeddings and `config.encoder_layers` bidirectional layers (plus a final LayerNorm if pre-LN).

    A batch that is largely padding runs unpadded (PackedSequences). The output at padding positions (attention_mask
    0) is defined once for every path: the embedding output there (the input of the first layer), not values nothing
    should read. Recorded per-layer hidden states are the layers' own outputs, except the last, which transformers sets
    to last_hidden_state."""

    _can_record_outputs = {
        "hidden_states": OutputRecorder(SelfAttnEncoderLayer, num_hidden_layers_key="encoder_layers"),
        "attentions": OutputRecorder(SelfAttnAttention, index=1, layer_name="self_attn"),
    }

    def __init__(self, config: SelfAttnConfig):
        super().__init__(config, [SelfAttnEncoderLayer(config, i) for i in range(config.encoder_layers)])

    @refuse_unknown_kwargs
    @merge_with_config_defaults
    @capture_outputs
    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        first_token_only: bool = False,
        **kwargs: Unpack[TransformersKwargs],
    ) -> BaseModelOutput:
        r"""first_token_only: last_hidden_state holds the first position alone (batch, 1, hidden), for heads that read
        nothing else; the last layer then computes that position's output alone. Refused with recorded per-layer
        outputs, which need every position."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("Pass exactly one of input_ids or inputs_embeds to the encoder.")
        if first_token_only and records_layer_outputs(self.config, kwargs):
            raise ValueError(
                "first_token_only=True keeps the first position of the last layer alone, but per-layer outputs "
                "(output_attentions / output_hidden_states) were asked for, which need every position: ask for one "
                "or the other."
            )
        check_flash_offsets(self.config, kwargs)
        inputs = input_ids if inputs_embeds is None else inputs_embeds
        # Unpadding is decided before the embeddings, from a mask of the inputs' (batch_size, length); any other mask
        # is refused below, after the embeddings' own checks of the inputs.
        mask_fits = isinstance(attention_mask, torch.Tensor) and attention_mask.shape == inputs.shape[:2]
        packed_sequences = packed_sequences_for(attention_mask, self.config, kwargs) if mask_fits else None
        # Padding positions hold the embedding output on every path: the unpadded one never computes them, and the
        # padded one (light padding, recorded outputs, torch.compile/export) overwrites what it computed there.
        embeddings_are_own = packed_sequences is not None and packed_sequences.embeds_tokens_alone(
            self.embeddings, input_ids
        )
        if embeddings_are_own:
            hidden_states, embeddings = packed_sequences.embed(self.embeddings, input_ids, token_type_ids, position_ids)
        else:
            hidden_states = embeddings = self.embeddings(input_ids, inputs_embeds, token_type_ids, position_ids)
        check_attention_mask(attention_mask, tuple(embeddings.shape[:2]), "attention_mask")
        padding_mask = None
        if packed_sequences is not None:
            if not embeddings_are_own:
                hidden_states = packed_sequences.pack(hidden_states)
            attention_mask = None
        else:
            if isinstance(attention_mask, torch.Tensor) and attention_mask.dim() == 2:
                padding_mask = attention_mask.bool().unsqueeze(-1)
            attention_mask = create_bidirectional_mask(
                config=self.config, inputs_embeds=hidden_states, attention_mask=attention_mask
            )
        # The last layer runs on the first row where its mask is a tensor to slice (eager's, SDPA's or none); the
        # unpadded path, flash's 2-D masks and flex's block masks compute every position, and the first is kept below.
        first_row_in_last_layer = (
            first_token_only and packed_sequences is None and self.config._attn_implementation in ("eager", "sdpa")
        )
        for index, layer in enumerate(self.layers):
            last = index == len(self.layers) - 1
            hidden_states = layer(
                hidden_states,
                attention_mask,
                packed_sequences=packed_sequences,
                first_token_only=first_row_in_last_layer and last,
                **kwargs,
            )
        if self.final_layer_norm is not None:
            hidden_states = self.final_layer_norm(hidden_states)
        if packed_sequences is not None:
            hidden_states = packed_sequences.unpack(hidden_states, embeddings, padding_is_own=embeddings_are_own)
        if first_token_only:
            hidden_states, embeddings = hidden_states[:, :1], embeddings[:, :1]
            padding_mask = padding_mask[:, :1] if padding_mask is not None else None
        if padding_mask is not None:
            hidden_states = torch.where(padding_mask, hidden_states, embeddings)
        return BaseModelOutput(last_hidden_state=hidden_states)


class SelfAttnDecoder(SelfAttnStack):
    """Embeddings and `config.decoder_layers` causal layers with cross-attention over the encoder output
    (none in a decoder-only model), plus a final LayerNorm if pre-LN."""

    _can_record_outputs = {
        "hidden_states": OutputRecorder(SelfAttnDecoderLayer, num_hidden_layers_key="decoder_layers"),
        "attentions": OutputRecorder(SelfAttnAttention, index=1, layer_name="self_attn"),
        "cross_attentions": OutputRecorder(SelfAttnAttention, index=1, layer_name="cross_attn"),
    }

    def __init__(self, config: SelfAttnConfig, word_embeddings: nn.Embedding | None = None):
        has_cross_attention = config.encoder_layers > 0
        layers = [SelfAttnDecoderLayer(config, i, has_cross_attention) for i in range(config.decoder_layers)]
        super().__init__(config, layers, word_embeddings)

    @accepts_past_key_values
    @refuse_unknown_kwargs
    @merge_with_config_defaults
    @capture_outputs
    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        encoder_hidden_states: torch.Tensor | None = None,
        encoder_attention_mask: torch.Tensor | None = None,
        cache: Cache | None = None,
        use_cache: bool | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> BaseModelOutputWithPastAndCrossAttentions:
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError(
                "The decoder needs exactly one of input_ids or inputs_embeds (decoder_input_ids or labels for an "
                "encoder-decoder model)."
            )
        # Past positions are counted in the cache of the first self-attention that kept heads: transformers' cache
        # layers count none where their keys have no elements, as those of a layer whose heads were all pruned. (Read
        # from q_proj's width, not kept_heads: torch.compile would check that list, head by head, at every step.)
        layers_with_heads = [index for index, layer in enumerate(self.layers) if layer.self_attn.q_proj.out_features]
        if cache is not None:
            check_cache(cache, self.config)
            if not layers_with_heads:
                raise ValueError(
                    "cache: every self-attention layer of this decoder has lost all its heads (config.pruned_heads), "
                    "so no cache layer counts the positions decoded. Decode without a cache: use_cache=False (also "
                    "model.generate(..., use_cache=False))."
                )
        check_flash_offsets(self.config, kwargs)
        is_encoder_decoder = self.config.encoder_layers > 0
        if is_encoder_decoder and encoder_hidden_states is None:
            raise ValueError("The decoder of an encoder-decoder model needs encoder_hidden_states.")
        if use_cache and cache is None:
            cache = (
                EncoderDecoderCache(DynamicCache(config=self.config), DynamicCache(config=self.config))
                if is_encoder_decoder
                else DynamicCache(config=self.config)
            )
        self_attention_cache = cache.self_attention_cache if isinstance(cache, EncoderDecoderCache) else cache
        counting_layer = layers_with_heads[0] if layers_with_heads else 0
        past_length = self_attention_cache.get_seq_length(counting_layer) if cache is not None else 0

        hidden_states = self.embeddings(input_ids, inputs_embeds, token_type_ids, position_ids, past_length)
        batch_size, seq_length = hidden_states.shape[:2]
        # A prepared 4-D mask covers every key slot of the cache: a static cache's whole length (asked for only then:
        # create_causal_mask asks the cache again).
        four_d = isinstance(attention_mask, torch.Tensor) and attention_mask.dim() == 4
        key_slots = cache.get_mask_sizes(seq_length, counting_layer)[0] if four_d and cache is not None else None
        check_attention_mask(
            attention_mask, (batch_size, past_length + seq_length), "decoder attention_mask", seq_length, key_slots
        )
        attention_mask = create_causal_mask(
            config=self.config,
            inputs_embeds=hidden_states,
            attention_mask=attention_mask,
            cache=self_attention_cache,
            layer_idx=counting_layer,
        )
        if encoder_hidden_states is not None:
            check_attention_mask(
                encoder_attention_mask, tuple(encoder_hidden_states.shape[:2]), "encoder attention_mask", seq_length
            )
            encoder_attention_mask = create_bidirectional_mask(
                config=self.config,
                inputs_embeds=hidden_states,
                attention_mask=encoder_attention_mask,
                encoder_hidden_states=encoder_hidden_states,
            )
        for layer in self.layers:
            hidden_states = layer(
                hidden_states,
                attention_mask,
                encoder_hidden_states,  # positional, so gradient checkpointing passes it through
                encoder_attention_mask=encoder_attention_mask,
                cache=cache,
                **kwargs,
            )
        if self.final_layer_norm is not None:
            hidden_states = self.final_layer_norm(hidden_states)
        return BaseModelOutputWithPastAndCrossAttentions(last_hidden_state=hidden_states, cache=cache)


class SelfAttnPooler(nn.Module):
    """dense + activation on the first token: the sentence representation of BERT-style classifiers."""

    def __init__(self, config: SelfAttnConfig):
        super().__init__()
        self.dense = Linear(config.hidden_size, config.hidden_size)
        self.activation = ACT2FN[config.pooler_activation]

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.activation(self.dense(hidden_states[:, 0]))


class SelfAttnModel(SelfAttnPreTrainedModel):
    """The bare model. Its shape follows the config: encoder-only (decoder_layers=0, returns the encoder
    output and the pooled first token), encoder-decoder (both > 0, returns the decoder output with the
    encoder's), or decoder-only (encoder_layers=0)."""

    def __init__(self, config: SelfAttnConfig, add_pooling_layer: bool | None = None):
        super().__init__(config)
        config.check()
        self.encoder = SelfAttnEncoder(config) if config.encoder_layers > 0 else None
        shared = self.encoder.embeddings.word_embeddings if self.encoder is not None else None
        self.decoder = SelfAttnDecoder(config, shared) if config.decoder_layers > 0 else None
        if self.encoder is not None and self.decoder is not None:
            # One token table for both stacks, as in the paper.
            self._tied_weights_keys = {
                "decoder.embeddings.word_embeddings.weight": "encoder.embeddings.word_embeddings.weight"
            }
        if add_pooling_layer is None:
            add_pooling_layer = config.add_pooling_layer
        self.pooler = SelfAttnPooler(config) if add_pooling_layer and self.decoder is None else None
        self.post_init()

    def get_input_embeddings(self):
        return (self.encoder or self.decoder).embeddings.word_embeddings

    def set_input_embeddings(self, value):
        for stack in (self.encoder, self.decoder):
            if stack is not None:
                stack.embeddings.word_embeddings = value

    # get_encoder() and get_decoder() are PreTrainedModel's, which find the `encoder` and `decoder` attributes (None
    # where the shape has no such stack). Its get_encoder(modality="image" / "video" / "audio") returns the model
    # itself, as for every text model, and refuses an unknown modality: transformers' exporters ask for those
    # encoders to tell a multimodal model, which they would export in pieces.

    @accepts_past_key_values
    @can_return_tuple
    @refuse_unknown_kwargs
    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        decoder_input_ids: torch.Tensor | None = None,
        decoder_attention_mask: torch.Tensor | None = None,
        decoder_position_ids: torch.Tensor | None = None,
        decoder_inputs_embeds: torch.Tensor | None = None,
        encoder_outputs: tuple | BaseModelOutput | None = None,
        cache: Cache | None = None,
        use_cache: bool | None = None,
        first_token_only: bool = False,
        **kwargs: Unpack[TransformersKwargs],
    ) -> BaseModelOutputWithPoolingAndCrossAttentions | Seq2SeqModelOutput | BaseModelOutputWithPastAndCrossAttentions:
        r"""first_token_only (encoder-only models): last_hidden_state holds the first position alone, which the last
        layer then computes alone (see SelfAttnEncoder); the pooled output is the same."""
        if first_token_only and self.decoder is not None:
            raise ValueError(
                "first_token_only applies to encoder-only SelfAttnModel (decoder_layers=0), whose pooled output reads "
                "the first token; this model has a decoder. Leave first_token_only unset."
            )
        if self.encoder is None or self.decoder is None:
            unused = {
                "decoder_input_ids": decoder_input_ids,
                "decoder_attention_mask": decoder_attention_mask,
                "decoder_position_ids": decoder_position_ids,
                "decoder_inputs_embeds": decoder_inputs_embeds,
                # a decoder-only model encodes nothing; an encoder-only one caches nothing
                "encoder_outputs": encoder_outputs if self.encoder is None else None,
                "cache": cache if self.decoder is None else None,
            }
            given = sorted(name for name, value in unused.items() if value is not None)
            if given:
                shape = "decoder-only" if self.encoder is None else "encoder-only"
                raise ValueError(
                    f"{given} have no use in this {shape} SelfAttnModel, which takes input_ids (or inputs_embeds) "
                    "and attention_mask; they belong to an encoder-decoder config (encoder_layers and decoder_layers "
                    "both > 0)."
                )
        if self.encoder is None:
            return self.decoder(
                input_ids=input_ids,
                attention_mask=attention_mask,
                token_type_ids=token_type_ids,
                position_ids=position_ids,
                inputs_embeds=inputs_embeds,
                cache=cache,
                use_cache=use_cache,
                # Inner calls always return outputs objects (their fields are read here); this forward makes the
                # tuple when config.return_dict or the caller asks for one.
                return_dict=True,
                **kwargs,
            )

        if encoder_outputs is not None and (input_ids is not None or inputs_embeds is not None):
            given = "input_ids" if input_ids is not None else "inputs_embeds"
            raise ValueError(
                f"encoder_outputs and {given} were both given: the encoder's outputs replace its run, so {given} "
                f"would go unread. Pass {given} to encode it, or encoder_outputs (with the attention_mask of the "
                "encoded tokens) to reuse an encoding."
            )
        if encoder_outputs is None:
            encoder_outputs = self.encoder(
                input_ids=input_ids,
                attention_mask=attention_mask,
                token_type_ids=token_type_ids,
                position_ids=position_ids,
                inputs_embeds=inputs_embeds,
                return_dict=True,
                first_token_only=first_token_only,
                **kwargs,
            )
        elif not isinstance(encoder_outputs, BaseModelOutput):
            encoder_outputs = BaseModelOutput(*encoder_outputs)
        encoder_width = encoder_outputs.last_hidden_state.shape[-1]
        if encoder_width != self.config.hidden_size:
            raise ValueError(
                f"encoder_outputs hold states {encoder_width} wide but this model is {self.config.hidden_size} wide: "
                "pass the outputs of this model's own encoder (model.get_encoder()(input_ids, attention_mask))."
            )

        if self.decoder is None:
            sequence_output = encoder_outputs.last_hidden_state
            if first_token_only:  # encoder_outputs passed in hold every position
                sequence_output = sequence_output[:, :1]
            return BaseModelOutputWithPoolingAndCrossAttentions(
                last_hidden_state=sequence_output,
                pooler_output=self.pooler(sequence_output) if self.pooler is not None else None,
                hidden_states=encoder_outputs.hidden_states,
                attentions=encoder_outputs.attentions,
            )

        if decoder_input_ids is None and decoder_inputs_embeds is None:
            raise ValueError(
                "This encoder-decoder model needs decoder inputs: pass decoder_input_ids (or "
                "decoder_inputs_embeds), or labels to a SelfAttnForConditionalGeneration, which shifts them right "
                "with config.decoder_start_token_id."
            )
        decoder_outputs = self.decoder(
            input_ids=decoder_input_ids,
            attention_mask=decoder_attention_mask,
            position_ids=decoder_position_ids,
            inputs_embeds=decoder_inputs_embeds,
            encoder_hidden_states=encoder_outputs.last_hidden_state,
            encoder_attention_mask=attention_mask,
            cache=cache,
            use_cache=use_cache,
            return_dict=True,
            **kwargs,
        )
        return Seq2SeqModelOutput(
            last_hidden_state=decoder_outputs.last_hidden_state,
            cache=decoder_outputs.cache,
            decoder_hidden_states=decoder_outputs.hidden_states,
            decoder_attentions=decoder_outputs.attentions,
            cross_attentions=decoder_outputs.cross_attentions,
            encoder_last_hidden_state=encoder_outputs.last_hidden_state,
            encoder_hidden_states=encoder_outputs.hidden_states,
            encoder_attentions=encoder_outputs.attentions,
        )


class SelfAttnLMHead(nn.Module):
    """BERT's MLM head: dense + activation + LayerNorm, then the decoder tied to the token embeddings."""

    def __init__(self, config: SelfAttnConfig):
        super().__init__()
        embedding_size = config.embedding_size or config.hidden_size
        self.dense = Linear(config.hidden_size, embedding_size)
        self.activation = ACT2FN[config.hidden_act]
        self.layer_norm = nn.LayerNorm(embedding_size, eps=config.layer_norm_eps)
        self.decoder = Linear(embedding_size, config.vocab_size)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.layer_norm(self.activation(self.dense(hidden_states))))


def scored_token_logits(lm_head: nn.Module, hidden_states, logits, labels, ignore_index: int = -100):
    """(logits, labels) of the tokens a masked-LM loss scores (labels != -100). When a gradient is needed the head
    is applied again to those tokens alone, so that backpropagating the loss skips the vocabulary projection of
    every unscored token (85% of them in BERT's masking) and its cross-entropy; `logits` stay whole and
    differentiable for any other use, and the loss is the same mean over the same tokens."""
    labels = labels.to(logits.device)
    scored = labels != ignore_index
    if logits.requires_grad:
        return lm_head(hidden_states[scored]), labels[scored]
    return logits[scored], labels[scored]


def generation_lm_head(config: SelfAttnConfig, token_table: str) -> tuple[nn.Module, dict[str, str]]:
    """The LM head of a generating model and its tie to `token_table` (the table's parameter name): a plain
    projection onto the token table, or BERT's MLM head with `config.lm_head_transform` (its projection, not the
    head, is then what ties to the table)."""
    if config.lm_head_transform:
        return SelfAttnLMHead(config), {"lm_head.decoder.weight": token_table}
    return Linear(config.hidden_size, config.vocab_size, bias=False), {"lm_head.weight": token_table}


class SelfAttnEncoderHeadModel(SelfAttnPreTrainedModel):
    """What the encoder heads share: an encoder-only SelfAttnModel under `model` and, for the heads that score
    `labels` from the encoder outputs alone, one forward that runs the model and hands its outputs to the head's
    `head_outputs`."""

    # Whether the loss divides by Trainer's `num_items_in_batch`: heads whose loss is a mean over their batch say False,
    # so that Trainer passes them no count, and refuse one given by hand.
    accepts_loss_kwargs = True
    # Whether the model gets a pooler (dense + activation over the first token): False, True, or None for
    # config.add_pooling_layer (heads that read the pooler where the checkpoint has one, the first token otherwise).
    add_pooling_layer: bool | None = False
    # Whether the head reads the first token alone: its last encoder layer then computes that row alone, unless
    # per-layer outputs are recorded.
    reads_first_token_only = False
    # The output read from the first position, for the heads that have one (else None): they refuse left padding, under
    # which that position is padding (input_checks.refuse_left_padding).
    first_position_output: str | None = None

    def __init__(self, config: SelfAttnConfig):
        super().__init__(config)
        if config.encoder_layers == 0 or config.decoder_layers > 0:
            raise ValueError(
                f"{type(self).__name__} is an encoder head and needs encoder_layers > 0 and decoder_layers = 0 (got "
                f"{config.encoder_layers} and {config.decoder_layers}); use SelfAttnForConditionalGeneration for an "
                "encoder-decoder config and SelfAttnForCausalLM for a decoder-only one."
            )
        self.model = SelfAttnModel(config, add_pooling_layer=self.add_pooling_layer)

    def classifier_dropout(self) -> Dropout:
        """The dropout before a classifier: config.classifier_dropout, or hidden_dropout_prob where unset."""
        dropout = self.config.classifier_dropout
        return Dropout(dropout if dropout is not None else self.config.hidden_dropout_prob)

    @can_return_tuple
    @refuse_unknown_kwargs
    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> ModelOutput:
        r"""labels: what the head scores (its class docstring says which)."""
        if self.first_position_output is not None:
            refuse_left_padding(attention_mask, self, self.first_position_output)
        outputs = self.model(
            input_ids,
            attention_mask,
            token_type_ids,
            position_ids,
            inputs_embeds,
            first_token_only=self.first_token_only(kwargs),
            return_dict=True,
            **kwargs,
        )
        return self.head_outputs(outputs, labels, attention_mask, **kwargs)

    def first_token_only(self, kwargs: dict) -> bool:
        return self.reads_first_token_only and not records_layer_outputs(self.config, kwargs)

    def head_outputs(self, outputs, labels, attention_mask, **kwargs) -> ModelOutput:
        raise NotImplementedError(f"{type(self).__name__} runs the encoder in a forward of its own.")


class SelfAttnForMaskedLM(SelfAttnEncoderHeadModel):
    """BERT's masked-LM head. labels: token ids to predict, -100 where no prediction is scored."""

    # The loss divides by Trainer's `num_items_in_batch` (the scored tokens of all processes and accumulated steps).
    accepts_loss_kwargs = True
    _tied_weights_keys = {"lm_head.decoder.weight": "model.encoder.embeddings.word_embeddings.weight"}

    def __init__(self, config: SelfAttnConfig):
        super().__init__(config)
        self.lm_head = SelfAttnLMHead(config)
        self.post_init()

    def head_outputs(self, outputs, labels, attention_mask, **kwargs) -> MaskedLMOutput:
        logits = self.lm_head(outputs.last_hidden_state)
        loss = None
        if labels is not None:
            scored_logits, scored_labels = scored_token_logits(self.lm_head, outputs.last_hidden_state, logits, labels)
            loss = self.loss_function(scored_logits, scored_labels, vocab_size=self.config.vocab_size, **kwargs)
        return MaskedLMOutput(
            loss=loss, logits=logits, hidden_states=outputs.hidden_states, attentions=outputs.attentions
        )


class SelfAttnForSequenceClassification(SelfAttnEncoderHeadModel):
    """Classifier over the pooled first token; regression, single- or multi-label by `config.problem_type`.
    labels: class ids (batch,), floats for regression, or multi-hot floats (batch, num_labels)."""

    # The loss is a mean over this process's batch and ignores `num_items_in_batch`: Trainer must not pass that count
    # and then scale the loss by the number of processes.
    accepts_loss_kwargs = False
    add_pooling_layer = None
    reads_first_token_only = True
    first_position_output = "logits"

    def __init__(self, config: SelfAttnConfig):
        super().__init__(config)
        self.num_labels = config.num_labels
        self.dropout = self.classifier_dropout()
        self.classifier = Linear(config.hidden_size, config.num_labels)
        self.post_init()

    def head_outputs(self, outputs, labels, attention_mask, **kwargs) -> SequenceClassifierOutput:
        pooled = outputs.pooler_output if outputs.pooler_output is not None else outputs.last_hidden_state[:, 0]
        logits = self.classifier(self.dropout(pooled))
        loss = self.loss_function(labels, logits, self.config) if labels is not None else None
        return SequenceClassifierOutput(
            loss=loss, logits=logits, hidden_states=outputs.hidden_states, attentions=outputs.attentions
        )


class SelfAttnForTokenClassification(SelfAttnEncoderHeadModel):
    """A classifier over every token. labels: a class id per token, -100 where no prediction is scored."""

    # The loss divides by Trainer's `num_items_in_batch` (the scored tokens of all processes and accumulated steps).
    accepts_loss_kwargs = True

    def __init__(self, config: SelfAttnConfig):
        super().__init__(config)
        self.num_labels = config.num_labels
        self.dropout = self.classifier_dropout()
        self.classifier = Linear(config.hidden_size, config.num_labels)
        self.post_init()

    def head_outputs(self, outputs, labels, attention_mask, **kwargs) -> TokenClassifierOutput:
        logits = self.classifier(self.dropout(outputs.last_hidden_state))
        # kwargs carry Trainer's `num_items_in_batch`: the loss is then a sum over the scored tokens divided by their
        # count over all processes, so several processes give the loss of one process with the whole batch.
        loss = self.loss_function(logits, labels, self.config, **kwargs) if labels is not None else None
        return TokenClassifierOutput(
            loss=loss, logits=logits, hidden_states=outputs.hidden_states, attentions=outputs.attentions
        )


class SelfAttnForQuestionAnswering(SelfAttnEncoderHeadModel):
    """Extractive QA: start and end logits per token from `qa_outputs`."""

    accepts_loss_kwargs = False  # a mean over this process's batch, as SelfAttnForSequenceClassification

    def __init__(self, config: SelfAttnConfig):
        super().__init__(config)
        self.qa_outputs = Linear(config.hidden_size, 2)
        self.post_init()

    @can_return_tuple
    @refuse_unknown_kwargs
    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        start_positions: torch.Tensor | None = None,
        end_positions: torch.Tensor | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> QuestionAnsweringModelOutput:
        r"""start_positions / end_positions: token index of the answer span's first and last token."""
        check_both_labels(start_positions=start_positions, end_positions=end_positions)
        outputs = self.model(
            input_ids, attention_mask, token_type_ids, position_ids, inputs_embeds, return_dict=True, **kwargs
        )
        start_logits, end_logits = self.qa_outputs(outputs.last_hidden_state).split(1, dim=-1)
        start_logits, end_logits = start_logits.squeeze(-1).contiguous(), end_logits.squeeze(-1).contiguous()
        loss = None
        if start_positions is not None and end_positions is not None:
            loss = self.loss_function(start_logits, end_logits, start_positions, end_positions, **kwargs)
        return QuestionAnsweringModelOutput(
            loss=loss,
            start_logits=start_logits,
            end_logits=end_logits,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
        )


class SelfAttnForMultipleChoice(SelfAttnEncoderHeadModel):
    """Scores each (batch, choice) sequence with the pooled first token; softmax across choices."""

    accepts_loss_kwargs = False  # a mean over this process's batch, as SelfAttnForSequenceClassification
    add_pooling_layer = None
    reads_first_token_only = True
    first_position_output = "logits"

    def __init__(self, config: SelfAttnConfig):
        super().__init__(config)
        self.dropout = self.classifier_dropout()
        self.classifier = Linear(config.hidden_size, 1)
        self.post_init()

    @can_return_tuple
    @refuse_unknown_kwargs
    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> MultipleChoiceModelOutput:
        r"""Inputs have shape (batch, num_choices, length); labels: index of the right choice per example."""
        refuse_left_padding(attention_mask, self, self.first_position_output)
        reference = input_ids if input_ids is not None else inputs_embeds
        # Without the choice dimension the flattening below would silently merge tokens into "choices".
        expected_dims = 3 if input_ids is not None else 4
        if reference is None or reference.dim() != expected_dims:
            got = "neither" if reference is None else f"shape {tuple(reference.shape)}"
            raise ValueError(
                "SelfAttnForMultipleChoice needs input_ids of shape (batch, num_choices, length) or inputs_embeds of "
                f"shape (batch, num_choices, length, hidden_size), got {got}. Tokenize each (context, choice) pair "
                "and stack the choices of one example along dimension 1."
            )
        num_choices = reference.shape[1]

        def flatten(tensor):
            return tensor.reshape(-1, *tensor.shape[2:]) if tensor is not None else None

        outputs = self.model(
            flatten(input_ids),
            flatten(attention_mask),
            flatten(token_type_ids),
            flatten(position_ids),
            flatten(inputs_embeds),
            first_token_only=self.first_token_only(kwargs),
            return_dict=True,
            **kwargs,
        )
        pooled = outputs.pooler_output if outputs.pooler_output is not None else outputs.last_hidden_state[:, 0]
        logits = self.classifier(self.dropout(pooled)).view(-1, num_choices)
        loss = fixed_cross_entropy(logits, labels.to(logits.device)) if labels is not None else None
        return MultipleChoiceModelOutput(
            loss=loss, logits=logits, hidden_states=outputs.hidden_states, attentions=outputs.attentions
        )


def shift_tokens_right(labels: torch.Tensor, pad_token_id: int | None, decoder_start_token_id: int | None):
    """Teacher forcing: the decoder sees <start> y1 ... y(n-1) and predicts y1 ... yn."""
    if decoder_start_token_id is None:
        raise ValueError("config.decoder_start_token_id must be set to train an encoder-decoder from labels.")
    if pad_token_id is None:
        raise ValueError("config.pad_token_id must be set to replace the -100 of labels in decoder inputs.")
    shifted = labels.new_full(labels.shape, decoder_start_token_id)
    shifted[:, 1:] = labels[:, :-1]
    return shifted.masked_fill(shifted == -100, pad_token_id)


class SelfAttnForConditionalGeneration(SelfAttnPreTrainedModel, LeanGenerationMixin, GenerationMixin):
    """The paper's encoder-decoder with an LM head over the shared token embeddings."""

    # The loss divides by Trainer's `num_items_in_batch` (the scored tokens of all processes and accumulated steps).
    accepts_loss_kwargs = True

    def __init__(self, config: SelfAttnConfig):
        super().__init__(config)
        if config.encoder_layers == 0 or config.decoder_layers == 0:
            raise ValueError(
                "SelfAttnForConditionalGeneration needs encoder_layers > 0 and decoder_layers > 0 (got "
                f"{config.encoder_layers} and {config.decoder_layers})."
            )
        self.model = SelfAttnModel(config)
        # One token table for the encoder, the decoder and the output layer, as in the paper.
        token_table = "model.encoder.embeddings.word_embeddings.weight"
        self.lm_head, self._tied_weights_keys = generation_lm_head(config, token_table)
        self.register_buffer(
            "final_logits_bias", torch.zeros(1, config.vocab_size) if config.add_final_logits_bias else None
        )
        self.post_init()

    def prepare_decoder_input_ids_from_labels(self, labels: torch.Tensor):
        return shift_tokens_right(labels, self.config.pad_token_id, self.config.decoder_start_token_id)

    def _reorder_cache(self, cache: EncoderDecoderCache, beam_idx: torch.Tensor) -> EncoderDecoderCache:
        """Beam search's reordering of the cache after each step (generate() calls this hook when a model has it).
        Only the self-attention cache moves: generate() repeats each encoder output once per beam and beams never
        move between source sentences, so the cross-attention keys and values of all beams of a sentence are the
        same, and reordering them would copy every layer's tensors to no effect. (The model takes no other cache than
        an EncoderDecoderCache.)"""
        reorder_cache_layers(cache.self_attention_cache, beam_idx)
        return cache

    @accepts_past_key_values
    @can_return_tuple
    @refuse_unknown_kwargs
    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        decoder_input_ids: torch.Tensor | None = None,
        decoder_attention_mask: torch.Tensor | None = None,
        decoder_position_ids: torch.Tensor | None = None,
        encoder_outputs: tuple | BaseModelOutput | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        decoder_inputs_embeds: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        use_cache: bool | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> Seq2SeqLMOutput:
        r"""labels: target ids, -100 where no prediction is scored; shifted right to make the decoder inputs
        when those are not given."""
        if labels is not None:
            if use_cache:
                logger.warning(
                    "The `use_cache` argument is changed to `False` since `labels` is provided. Leave use_cache "
                    "unset when passing labels."
                )
            use_cache = False
            if decoder_input_ids is None and decoder_inputs_embeds is None:
                decoder_input_ids = self.prepare_decoder_input_ids_from_labels(labels)
        outputs = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            token_type_ids=token_type_ids,
            position_ids=position_ids,
            inputs_embeds=inputs_embeds,
            decoder_input_ids=decoder_input_ids,
            decoder_attention_mask=decoder_attention_mask,
            decoder_position_ids=decoder_position_ids,
            decoder_inputs_embeds=decoder_inputs_embeds,
            encoder_outputs=encoder_outputs,
            cache=cache,
            use_cache=use_cache,
            return_dict=True,
            **kwargs,
        )
        logits = self.lm_head(outputs.last_hidden_state)
        if self.final_logits_bias is not None:
            logits = logits + self.final_logits_bias
        loss = None
        if labels is not None:
            # Labels are already aligned with the logits (the shift happened on the decoder inputs).
            loss = self.loss_function(
                logits, None, vocab_size=self.config.vocab_size, shift_labels=labels, **kwargs
            )
        return Seq2SeqLMOutput(
            loss=loss,
            logits=logits,
            cache=outputs.cache,
            decoder_hidden_states=outputs.decoder_hidden_states,
            decoder_attentions=outputs.decoder_attentions,
            cross_attentions=outputs.cross_attentions,
            encoder_last_hidden_state=outputs.encoder_last_hidden_state,
            encoder_hidden_states=outputs.encoder_hidden_states,
            encoder_attentions=outputs.encoder_attentions,
        )


class SelfAttnForCausalLM(SelfAttnPreTrainedModel, LeanGenerationMixin, GenerationMixin):
    """Decoder-only language model (encoder_layers=0): causal self-attention layers and an LM head."""

    # The loss divides by Trainer's `num_items_in_batch` (the scored tokens of all processes and accumulated steps).
    accepts_loss_kwargs = True
    # Taken by forward() but kept out of its signature, as transformers' causal LMs take it through **kwargs: Trainer
    # counts every parameter named like a label among its label_names, and computes an evaluation loss only for
    # batches that hold them all (a `shift_labels` parameter left causal LMs without eval_loss or compute_metrics).
    keywords_outside_signature = ("shift_labels",)

    def __init__(self, config: SelfAttnConfig):
        super().__init__(config)
        if config.encoder_layers != 0 or config.decoder_layers == 0:
            raise ValueError(
                "SelfAttnForCausalLM is decoder-only: it needs encoder_layers=0 and decoder_layers > 0 (got "
                f"{config.encoder_layers} and {config.decoder_layers})."
            )
        self.model = SelfAttnModel(config)
        self.lm_head, self._tied_weights_keys = generation_lm_head(
            config, "model.decoder.embeddings.word_embeddings.weight"
        )
        self.register_buffer(
            "final_logits_bias", torch.zeros(1, config.vocab_size) if config.add_final_logits_bias else None
        )
        self.post_init()

    @accepts_past_key_values
    @can_return_tuple
    @refuse_unknown_kwargs
    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        cache: Cache | None = None,
        labels: torch.Tensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs: Unpack[TransformersKwargs],
    ) -> CausalLMOutputWithCrossAttentions:
        r"""labels: the input ids (shifted inside the loss), -100 where no prediction is scored.
        shift_labels (a keyword, as in transformers' causal LMs; see `keywords_outside_signature`): targets already
        aligned with the logits, used instead of shifting `labels` (Trainer passes both under context parallelism,
        where the sequence is split before the model sees it, so labels are not read)."""
        shift_labels = kwargs.pop("shift_labels", None)
        if input_ids is None and inputs_embeds is None:
            raise ValueError(
                "SelfAttnForCausalLM needs input_ids or inputs_embeds; to generate from nothing, pass a prompt "
                "such as [[config.bos_token_id]]."
            )
        # type() rather than isinstance: True would keep one position.
        if not (isinstance(logits_to_keep, torch.Tensor) or (type(logits_to_keep) is int and logits_to_keep >= 0)):
            raise ValueError(
                f"logits_to_keep must be an int >= 0 (the last positions to score; 0 for all) or a tensor of "
                f"positions, got {logits_to_keep!r}."
            )
        outputs = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            token_type_ids=token_type_ids,
            position_ids=position_ids,
            inputs_embeds=inputs_embeds,
            cache=cache,
            use_cache=use_cache,
            return_dict=True,
            **kwargs,
        )
        hidden_states = outputs.last_hidden_state
        keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = self.lm_head(hidden_states[:, keep, :])
        if self.final_logits_bias is not None:
            logits = logits + self.final_logits_bias
        loss = None
        if labels is not None or shift_labels is not None:
            loss = self.loss_function(
                logits, labels, vocab_size=self.config.vocab_size, shift_labels=shift_labels, **kwargs
            )
        return CausalLMOutputWithCrossAttentions(
            loss=loss,
            logits=logits,
            cache=outputs.cache,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
        )


@dataclass
class SelfAttnForPreTrainingOutput(ModelOutput):
    r"""
    loss: masked-LM loss plus next-sentence loss, when `labels` and `next_sentence_label` are given.
    prediction_logits: masked-LM scores over the vocabulary, (batch_size, sequence_length, vocab_size).
    seq_relationship_logits: is-next / is-random scores of the sentence pair, (batch_size, 2).
    """

    loss: torch.Tensor | None = None
    prediction_logits: torch.Tensor | None = None
    seq_relationship_logits: torch.Tensor | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None
    attentions: tuple[torch.Tensor, ...] | None = None


class SelfAttnForPreTraining(SelfAttnEncoderHeadModel):
    """BERT's pre-training heads: masked-LM over every token and next-sentence prediction over the pooled
    first token."""

    accepts_loss_kwargs = False  # a mean over this process's batch, as SelfAttnForSequenceClassification
    add_pooling_layer = True
    first_position_output = "next-sentence logits (seq_relationship_logits)"
    _tied_weights_keys = {"lm_head.decoder.weight": "model.encoder.embeddings.word_embeddings.weight"}

    def __init__(self, config: SelfAttnConfig):
        super().__init__(config)
        self.lm_head = SelfAttnLMHead(config)
        self.next_sentence = Linear(config.hidden_size, 2)
        self.post_init()

    @can_return_tuple
    @refuse_unknown_kwargs
    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        next_sentence_label: torch.Tensor | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> SelfAttnForPreTrainingOutput:
        r"""labels: token ids to predict, -100 where no prediction is scored. next_sentence_label: 0 if the second
        segment continues the first, 1 if it is random. The loss needs both."""
        check_both_labels(labels=labels, next_sentence_label=next_sentence_label)
        refuse_left_padding(attention_mask, self, self.first_position_output)
        outputs = self.model(
            input_ids, attention_mask, token_type_ids, position_ids, inputs_embeds, return_dict=True, **kwargs
        )
        prediction_logits = self.lm_head(outputs.last_hidden_state)
        seq_relationship_logits = self.next_sentence(outputs.pooler_output)
        loss = None
        if labels is not None and next_sentence_label is not None:
            masked_lm_loss = ForMaskedLMLoss(prediction_logits, labels, self.config.vocab_size)
            next_sentence_loss = fixed_cross_entropy(
                seq_relationship_logits.view(-1, 2), next_sentence_label.to(prediction_logits.device).view(-1)
            )
            loss = masked_lm_loss + next_sentence_loss
        return SelfAttnForPreTrainingOutput(
            loss=loss,
            prediction_logits=prediction_logits,
            seq_relationship_logits=seq_relationship_logits,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
        )


@dataclass
class SelfAttnForReplacedTokenDetectionOutput(ModelOutput):
    r"""
    loss: binary cross-entropy of the replaced-token scores over the attended tokens, when `labels` are given.
    logits: one score per token, (batch_size, sequence_length); positive means "replaced".
    """

    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None
    attentions: tuple[torch.Tensor, ...] | None = None


class SelfAttnReplacedTokenHead(nn.Module):
    """dense + activation + a one-unit projection: ELECTRA's discriminator head."""

    def __init__(self, config: SelfAttnConfig):
        super().__init__()
        self.dense = Linear(config.hidden_size, config.hidden_size)
        self.activation = ACT2FN[config.hidden_act]
        self.out_proj = Linear(config.hidden_size, 1)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.out_proj(self.activation(self.dense(hidden_states))).squeeze(-1)


class SelfAttnForReplacedTokenDetection(SelfAttnEncoderHeadModel):
    """ELECTRA's discriminator: scores every token as original or replaced (by a small generator MLM).
    labels: 1 where the token was replaced, 0 where it is original; padding (attention_mask 0) is not scored."""

    accepts_loss_kwargs = False  # a mean over this process's batch, as SelfAttnForSequenceClassification

    def __init__(self, config: SelfAttnConfig):
        super().__init__(config)
        self.discriminator = SelfAttnReplacedTokenHead(config)
        self.post_init()

    def head_outputs(self, outputs, labels, attention_mask, **kwargs) -> SelfAttnForReplacedTokenDetectionOutput:
        logits = self.discriminator(outputs.last_hidden_state)
        loss = None
        if labels is not None:
            if labels.numel() and not torch.compiler.is_compiling() and not torch.all((labels == 0) | (labels == 1)):
                raise ValueError(
                    f"labels of SelfAttnForReplacedTokenDetection may hold only 0 (original token) and 1 (replaced), "
                    f"got values {sorted(set(labels.unique().tolist()))[:10]}; padding is left out through "
                    "attention_mask, not through a label value."
                )
            labels = labels.to(logits.device).float()
            scored = torch.ones_like(labels, dtype=torch.bool)
            if attention_mask is not None:
                scored = attention_mask.to(logits.device) == 1
            loss = nn.functional.binary_cross_entropy_with_logits(logits[scored], labels[scored])
        return SelfAttnForReplacedTokenDetectionOutput(
            loss=loss, logits=logits, hidden_states=outputs.hidden_states, attentions=outputs.attentions
        )


__all__ = ["SelfAttnPreTrainedModel", "SelfAttnEncoder", "SelfAttnDecoder", *(head.class_name for head in HEADS)]
