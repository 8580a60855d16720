"""Checks of what a forward() is given, so that bad input fails with an error that names the argument, the problem
and the fix rather than deep inside torch, and no keyword is dropped without a word. Shipped with saved models: the
model calls them at run time."""

import functools
import inspect
from collections.abc import Callable

import torch
from transformers.cache_utils import Cache, EncoderDecoderCache
from transformers.masking_utils import BlockMask
from transformers.utils.deprecation import deprecate_kwarg

from .config import SelfAttnConfig, attention_key


def check_ids(ids: torch.Tensor, table_size: int, name: str, table: str, fix: str) -> None:
    """An id outside an embedding table would index out of bounds (a crash deep in torch, or on GPU a
    device-side assert); say which ids are wrong instead. The range is skipped under torch.compile, where reading
    the ids back would break the graph."""
    # nn.Embedding looks up int64 and int32 ids alone; a float tensor is not ids rounded down.
    if ids.dtype not in (torch.long, torch.int):
        raise ValueError(
            f"{name} must hold integer ids (torch.long or torch.int), got a {ids.dtype} tensor; pass the "
            f"tokenizer's output as it is, or {name}.long() for ids held in another dtype."
        )
    if ids.numel() == 0 or torch.compiler.is_compiling():
        return
    low, high = torch.stack(torch.aminmax(ids)).tolist()  # one read back from the device, not two
    if low < 0 or high >= table_size:
        raise ValueError(
            f"{name} contains ids outside the {table} [0, {table_size - 1}] (min {low}, max {high}). {fix}"
        )


def check_both_labels(**labels: torch.Tensor | None) -> None:
    """A loss made of two label tensors (QA's span ends, pre-training's masked tokens and next sentence): with one
    alone, transformers' BERT heads return no loss without a word."""
    (first, first_value), (second, second_value) = labels.items()
    if (first_value is None) != (second_value is None):
        given, missing = (first, second) if second_value is None else (second, first)
        raise ValueError(
            f"{given} was given without {missing}: the loss needs both. Pass {missing} too, or neither for outputs "
            "without a loss."
        )


def check_per_token_shape(
    tensor: torch.Tensor, expected: tuple[int, int], name: str, fix: str, shared_by_batch: bool = False
) -> None:
    """A per-token input (token_type_ids, position_ids) must have the inputs' (batch_size, sequence_length); one the
    batch may share (`shared_by_batch`: position_ids) may also be (1, sequence_length) or (sequence_length,)."""
    shape = tuple(tensor.shape)
    shared = ((1, expected[1]), (expected[1],)) if shared_by_batch else ()
    if shape != expected and shape not in shared:
        also = f", or {shared[0]} or {shared[1]} shared by the batch" if shared else ""
        raise ValueError(
            f"{name} has shape {shape} but the inputs have (batch_size, sequence_length) = {expected}{also}: {fix}"
        )


def check_attention_mask(
    attention_mask: torch.Tensor | None,
    expected: tuple[int, int],
    name: str,
    query_length: int | None = None,
    key_slots: int | None = None,
) -> None:
    """A 2-D mask must have one 0/1 entry per token: `expected` is (batch_size, key_length). A prepared 4-D mask, as
    generate() builds for a static cache, must broadcast over the attention scores (batch_size, heads, query_length,
    key_slots), which are (batch_size, heads, key_length, key_length) unless given: a static cache has key slots
    beyond the tokens so far. Flex attention's block masks pass as they are."""
    if attention_mask is None:
        return
    if not isinstance(attention_mask, (torch.Tensor, BlockMask)):
        raise TypeError(
            f"{name} must be a torch.Tensor, got {type(attention_mask).__name__}; tokenize with return_tensors='pt', "
            "or pass torch.tensor(mask)."
        )
    # A static cache's length is a tensor: comparing it under torch.compile would break the graph.
    if not isinstance(attention_mask, torch.Tensor) or torch.compiler.is_compiling():
        return
    batch_size, key_length = expected
    if attention_mask.dim() == 4:
        query_length, key_slots = query_length or key_length, key_slots or key_length
        batch, _, queries, keys = attention_mask.shape
        if batch not in (1, batch_size) or queries not in (1, query_length) or keys != key_slots:
            raise ValueError(
                f"{name} is 4-D with shape {tuple(attention_mask.shape)}, which does not fit the attention scores' "
                f"(batch_size, heads, query_length, key_length) = ({batch_size}, heads, {query_length}, {key_slots}) "
                "(1 also fits the first three). Pass the 2-D (batch_size, key_length) = "
                f"{expected} mask of 1 (attend) and 0 (padding) instead, which the model prepares itself."
            )
        return
    if attention_mask.dim() != 2 or tuple(attention_mask.shape) != expected:
        raise ValueError(
            f"{name} has shape {tuple(attention_mask.shape)} but the inputs need (batch_size, key_length) = "
            f"{expected}: one entry per token (1 = attend, 0 = padding), covering any cached tokens too."
        )
    # One read back from the device per call; the range for the message only when the mask is wrong.
    if attention_mask.dtype != torch.bool and bool(((attention_mask != 0) & (attention_mask != 1)).any()):
        low, high = attention_mask.min().item(), attention_mask.max().item()
        raise ValueError(
            f"{name} may hold only 1 (attend) and 0 (padding), but holds values from {low} to {high}; pass the "
            "tokenizer's attention_mask, or (mask > 0).long() for a mask of another scale."
        )


def refuse_left_padding(attention_mask: torch.Tensor | None, model: torch.nn.Module, output: str) -> None:
    """A head whose `output` is read from the first position (sequence classification, multiple choice, next-sentence
    prediction): in a row padded on the left, that position is padding, which holds the pad token's embedding (the
    padding rule), so every such row would get the same output whatever its text. Refused: rows whose mask starts
    with 0 and holds a 1 further on. A row of padding alone has no text to misread, and passes. `attention_mask` is
    (batch, length), or (batch, choices, length) for multiple choice; prepared 4-D masks are not read. Skipped under
    torch.compile, where reading the mask back would break the graph."""
    if not isinstance(attention_mask, torch.Tensor) or attention_mask.dim() not in (2, 3):
        return
    if attention_mask.shape[-1] == 0 or torch.compiler.is_compiling():
        return
    mask = attention_mask != 0
    left_padded = ~mask[..., 0] & mask.any(-1)
    if not bool(left_padded.any()):  # one read back from the device when nothing is wrong
        return
    rows = [tuple(index) if len(index) > 1 else index[0] for index in left_padded.nonzero().tolist()]
    what = "rows" if attention_mask.dim() == 2 else "(example, choice) pairs"
    raise ValueError(
        f"attention_mask: {what} {rows[:10]}{' ...' if len(rows) > 10 else ''} are padded on the left (0 at the first "
        f"position, 1 further on), but {type(model).__name__} reads its {output} from the first position, which is "
        "then padding: every left-padded row would get the same output whatever its text. Pad on the right: "
        "tokenizer.padding_side = \"right\" (BERT-style tokenizers' default)."
    )


# What forward() takes through **kwargs besides its named parameters: the keywords transformers itself passes on
# (output flags, return_dict, Trainer's item count, flash attention's offsets of packed sequences). Anything else is
# refused: a misspelt or misplaced argument would otherwise be dropped without a word.
# Offsets of packed sequences, which transformers' flash-attention integration reads.
# seq_idx (each token's sequence) says again what cu_seq_lens says; DataCollatorWithFlattening and
# sentence-transformers' unpadded encoding pass it beside them.
FLASH_OFFSET_KWARGS = ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k", "seq_idx")
FORWARDED_KWARGS = frozenset(
    {"output_attentions", "output_hidden_states", "return_dict", "num_items_in_batch", *FLASH_OFFSET_KWARGS}
)


def refuse_unknown_kwargs(forward: Callable) -> Callable:
    """Wraps a forward() so that a keyword it neither names nor passes on to transformers raises a TypeError. Its
    signature says so too (the passed-on keywords as keyword-only parameters, no **kwargs): generate() hands an
    encoder only what its signature names, and Trainer keeps the data columns the signature names. A model's
    `keywords_outside_signature` (a class attribute of SelfAttnPreTrainedModel) are taken too, without a place in
    the signature."""
    signature = inspect.signature(forward)
    named = frozenset(signature.parameters) - {"self", "kwargs"}

    @functools.wraps(forward)
    def checked_forward(self, *args, **kwargs):
        # A loop, not set arithmetic on kwargs.keys(): torch 2.11's compiler cannot trace the latter (generate()
        # compiles the forward on GPUs with a static cache).
        outside = self.keywords_outside_signature
        unknown = [
            name for name in kwargs if name not in named and name not in FORWARDED_KWARGS and name not in outside
        ]
        # Trainer's num_items_in_batch (the scored items over all processes and accumulated steps) divides a loss
        # that sums over items; a head whose loss is a mean over its batch (accepts_loss_kwargs=False: Trainer passes
        # it none) would ignore it.
        if kwargs.get("num_items_in_batch") is not None and not getattr(self, "accepts_loss_kwargs", True):
            raise ValueError(
                f"num_items_in_batch has no effect on {type(self).__name__}, whose loss is a mean over the batch; "
                "leave it out (Trainer passes it only to models with accepts_loss_kwargs=True), or divide the loss "
                "yourself."
            )
        if unknown:
            raise TypeError(
                f"{type(self).__name__}.forward() got unexpected keyword argument(s) {sorted(unknown)}. It takes "
                f"{sorted(named | frozenset(outside))}, and passes on {sorted(FORWARDED_KWARGS)}. Check the spelling, "
                "and that the argument belongs to this kind of model."
            )
        return forward(self, *args, **kwargs)

    parameters = [parameter for parameter in signature.parameters.values() if parameter.kind != parameter.VAR_KEYWORD]
    passed_on = [
        inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=None) for name in sorted(FORWARDED_KWARGS)
    ]
    checked_forward.__signature__ = signature.replace(parameters=parameters + passed_on)
    return checked_forward


# transformers 5.24 renamed the cache argument; the old name still works, with a FutureWarning, as in transformers'
# own models.
renames_past_key_values = deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")


def accepts_past_key_values(forward: Callable) -> Callable:
    """forward() taking the cache by its old name too (renames_past_key_values, with its FutureWarning). Where both
    names are given: two caches are refused, saying what does that (transformers' own message says the old one is
    ignored, though the call fails); where one of them is None, the other is passed on as `cache` and the None one
    dropped (transformers' rename would keep `cache` even where it is None, silently losing past_key_values, and put
    the whole cache in its warning)."""
    renamed = renames_past_key_values(forward)

    @functools.wraps(renamed)
    def checked_forward(self, *args, **kwargs):
        if "past_key_values" in kwargs and "cache" in kwargs:
            if kwargs["past_key_values"] is None:
                del kwargs["past_key_values"]
            elif kwargs["cache"] is None:
                del kwargs["cache"]  # the rename then passes past_key_values on as `cache`
            else:
                raise ValueError(
                    f"{type(self).__name__}.forward() got both cache and past_key_values (the name transformers "
                    "used before 5.24): pass one. generate() passes its own cache as `cache`, so a past_key_values "
                    "added to its calls would be dropped: PEFT's prefix tuning adds its prefix so. A prefix-tuned "
                    "model trains and runs forward() here, but cannot generate(); LoRA or prompt tuning can."
                )
        return renamed(self, *args, **kwargs)

    return checked_forward


def check_flash_offsets(config: SelfAttnConfig, kwargs: dict) -> None:
    """Offsets of packed sequences (cu_seq_lens_q/k, from DataCollatorWithFlattening) confine attention to each
    sequence only in the flash kernels; any other attention would mix the sequences without a word."""
    given = sorted(name for name in FLASH_OFFSET_KWARGS if name in kwargs)
    if given and not config._attn_implementation.startswith("flash_attention"):
        raise ValueError(
            f"{given} describe packed sequences, which only flash attention keeps apart, but this model uses "
            f"attn_implementation={config._attn_implementation!r}. Load it with attn_implementation="
            "'flash_attention_2', or pass padded batches with an attention_mask instead."
        )
    if "seq_idx" in kwargs and "cu_seq_lens_q" not in kwargs:
        raise ValueError(
            "seq_idx was given without cu_seq_lens_q/cu_seq_lens_k: flash attention keeps packed sequences apart by "
            "their offsets, which seq_idx alone does not give. Pass the offsets too (DataCollatorWithFlattening("
            "return_flash_attn_kwargs=True) does)."
        )


def check_cache(cache, config: SelfAttnConfig) -> None:
    """A cache given to the decoder: a transformers Cache built for this model. One of another kind or built for
    another model shape would fail later with an opaque attribute or size error; name it here."""
    if not isinstance(cache, Cache):
        raise TypeError(
            f"cache must be a transformers Cache, got {type(cache).__name__}. The tuple-of-tuples cache of older "
            "transformers versions is not accepted: pass the `cache` a previous call returned, or a new "
            "DynamicCache() (EncoderDecoderCache(DynamicCache(), DynamicCache()) for an encoder-decoder model)."
        )
    if config.encoder_layers > 0 and not isinstance(cache, EncoderDecoderCache):
        raise ValueError(
            f"An encoder-decoder model needs an EncoderDecoderCache (self- and cross-attention), got "
            f"{type(cache).__name__}. Pass EncoderDecoderCache(DynamicCache(), DynamicCache()), or cache=None with "
            "use_cache=True to let the model create one."
        )
    self_attention_cache = cache.self_attention_cache if isinstance(cache, EncoderDecoderCache) else cache
    for index, layer in enumerate(self_attention_cache.layers):
        keys = getattr(layer, "keys", None)
        if keys is not None and keys.dim() == 4 and keys.numel() > 0:
            # The layer's own heads: prune_heads may have left it fewer than num_attention_heads.
            heads, head_dim = len(config.kept_heads(attention_key("decoder", index))), config.head_dim
            # Under tensor parallelism each device caches an equal share of the heads.
            if keys.shape[3] != head_dim or heads % keys.shape[1] != 0:
                raise ValueError(
                    f"The cache holds keys with {keys.shape[1]} heads of size {keys.shape[3]} but this model has "
                    f"{heads} heads of size {head_dim}: the cache was built for another model. Pass "
                    "cache=None (or a new cache) to start decoding afresh."
                )
            break
    if len(self_attention_cache.layers) > config.decoder_layers:
        raise ValueError(
            f"The cache has {len(self_attention_cache.layers)} layers but this decoder has {config.decoder_layers}: "
            "it was built for another model. Pass cache=None to start afresh."
        )
