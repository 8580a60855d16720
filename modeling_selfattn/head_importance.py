"""Which attention heads matter: the head importance of Michel, Levy and Neubig (2019), "Are Sixteen Heads Really
Better than One?", and the heads it would prune.

Each head's output is multiplied by a gate g = 1 before the attention's output projection; the importance of a head is
the expected |dL/dg| over a data set. The gates exist only while `head_importance` runs (forward pre-hooks on o_proj),
so the model's forward keeps no head mask. Package-only: a saved model does not need it.

    importance = head_importance(model, batches)            # (layers, heads), batches with labels
    model.prune_heads(least_important_heads(importance, 18))
"""

from collections.abc import Iterable, Mapping

import torch
from torch import nn

from .argument_values import is_integer, shown
from .config import attention_key
from .model import SelfAttnAttention

ATTENTIONS = ("encoder", "decoder", "cross_attn")


def resolved_attention(config, attention: str | None) -> str:
    """`attention` checked, None being the model's main stack: the encoder, or the decoder of a causal LM."""
    if attention is None:
        attention = "encoder" if config.encoder_layers > 0 else "decoder"
    if attention not in ATTENTIONS:
        raise ValueError(f"attention={attention!r} is not one of {ATTENTIONS} (or None for the main stack).")
    return attention


def attention_modules(model: nn.Module, attention: str | None = None) -> list[SelfAttnAttention]:
    """The attention modules of one kind, bottom layer first: "encoder" (encoder self-attention), "decoder" (decoder
    self-attention) or "cross_attn"; None is the model's main stack (the encoder, or the decoder of a causal LM)."""
    config = model.config
    attention = resolved_attention(config, attention)
    stack, cross = ("decoder", True) if attention == "cross_attn" else (attention, False)
    layers = config.encoder_layers if stack == "encoder" else config.decoder_layers
    wanted = [attention_key(stack, layer, cross) for layer in range(layers)]
    found = {
        module.pruning_key: module
        for module in model.modules()
        if isinstance(module, SelfAttnAttention) and module.pruning_key in wanted
    }
    if not wanted or len(found) != len(wanted):
        raise ValueError(
            f"{type(model).__name__} has no {attention} attention in every layer (found {sorted(found)}); this config "
            f"has encoder_layers={config.encoder_layers}, decoder_layers={config.decoder_layers}."
        )
    return [found[key] for key in wanted]


def refuse_int8_model(model: nn.Module) -> None:
    """Refuse an int8 model by name: its int8 layers have no backward, so no gradient would reach the gates (it
    failed with "'function' object has no attribute 'device'", reading an int8 o_proj's weight)."""
    # Imported here, as model.py imports it: only models that quantize load quantization.py.
    from .quantization import int8_layer_names

    int8_layers = int8_layer_names(model)
    if int8_layers:
        raise ValueError(
            f"head_importance: {type(model).__name__} holds int8 layers ({shown(int8_layers, 1)}) from "
            "model.quantize('int8'), whose kernels have no backward, so no gradient would reach the heads' gates. "
            "Score the float32 model (before quantize('int8'), or loaded again), prune it, then quantize."
        )


def head_importance(
    model: nn.Module,
    batches: Iterable[Mapping],
    attention: str | None = None,
    normalize_layers: bool = True,
    max_batches: int | None = None,
) -> torch.Tensor:
    """Importance of every head of one kind of attention, as a float32 CPU tensor (layers, num_attention_heads).

    batches: mappings of model inputs with labels (a DataLoader over tokenized examples and a collator, or a list of
    tokenizer outputs with "labels"), so that `model(**batch).loss` is the loss L of the batch. The importance of a
    head is the mean over batches of |dL/dg|, g the head's gate; with batches of one example it is the paper's
    E_x |dL(x)/dg|. The model runs in eval mode (no dropout) and its parameters' .grad is left as it was.
    attention: "encoder", "decoder" (decoder self-attention) or "cross_attn"; None is the main stack.
    normalize_layers: divide each layer's importances by their L2 norm, as the paper does before ranking heads
    across layers.
    Heads already pruned have no importance: NaN. The tensor records the attention it scores as `.attention`
    ("encoder", "decoder" or "cross_attn"), which least_important_heads keys its plan by.
    """
    if max_batches is not None and not (is_integer(max_batches) and max_batches >= 1):
        raise ValueError(
            f"max_batches={max_batches!r}: pass an integer >= 1 (the number of batches to read), or None for all."
        )
    refuse_int8_model(model)
    attention = resolved_attention(model.config, attention)
    modules = attention_modules(model, attention)
    device = next(model.parameters()).device
    gates = [
        torch.ones(len(module.kept_heads), device=module.o_proj.weight.device, requires_grad=True)
        for module in modules
    ]

    def gate_hook(gate: torch.Tensor, head_dim: int):
        def multiply(_module, inputs):
            (states,) = inputs
            gated = states.unflatten(-1, (gate.shape[0], head_dim)) * gate.to(states.dtype)[:, None]
            return (gated.flatten(-2),)

        return multiply

    handles = [
        module.o_proj.register_forward_pre_hook(gate_hook(gate, module.head_dim))
        for module, gate in zip(modules, gates)
    ]
    totals = [torch.zeros_like(gate) for gate in gates]
    was_training, num_batches = model.training, 0
    model.eval()
    try:
        for batch in batches:
            if max_batches is not None and num_batches >= max_batches:
                break
            if not isinstance(batch, Mapping):
                raise TypeError(
                    f"head_importance takes batches as mappings of model inputs (with labels), got "
                    f"{type(batch).__name__}; pass a DataLoader with a data collator, or tokenizer outputs."
                )
            inputs = {key: value.to(device) if torch.is_tensor(value) else value for key, value in batch.items()}
            loss = model(**inputs).loss
            if loss is None:
                raise ValueError(
                    "The model returned no loss for a batch: head importance is the gradient of the loss, so each "
                    "batch needs its labels (e.g. 'labels' for a classifier)."
                )
            gradients = torch.autograd.grad(loss, gates, allow_unused=True)
            for total, gradient in zip(totals, gradients):
                if gradient is not None:
                    total += gradient.detach().abs()
            num_batches += 1
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    if num_batches == 0:
        raise ValueError("head_importance got no batches; pass at least one batch with labels.")

    config = model.config
    importance = torch.full((len(modules), config.num_attention_heads), float("nan"))
    for layer, (module, total) in enumerate(zip(modules, totals)):
        importance[layer, module.kept_heads] = total.float().cpu() / num_batches
    if normalize_layers:
        norms = importance.nan_to_num(0.0).pow(2).sum(-1, keepdim=True).sqrt()
        importance = importance / (norms + 1e-20)
    # A plan from this importance must name the heads it scored: an encoder-decoder has three kinds of attention.
    importance.attention = attention
    return importance


def least_important_heads(
    importance: torch.Tensor, num_heads: int, attention: str | None = None
) -> dict[str | int, list[int]]:
    """The `num_heads` heads of lowest importance across all layers (NaN, already pruned, left out), as the
    `heads_to_prune` of `model.prune_heads`. Keyed by the names of the attention head_importance scored ("encoder.L",
    "decoder.L" or "decoder.L.cross_attn"), which it records as `importance.attention`; `attention`, where given, must
    be that one. An importance without that record (a tensor of your own, or one computed from head_importance's) is
    keyed by layer index, as prune_heads takes it for a model with one stack (and refuses it for an encoder-decoder),
    unless `attention` names its attention. Ties go to the lower layer and head."""
    if importance.dim() != 2:
        raise ValueError(
            f"importance must be (layers, heads) as head_importance returns it, got shape {tuple(importance.shape)}."
        )
    if attention is not None and attention not in ATTENTIONS:
        raise ValueError(f"attention={attention!r} is not one of {ATTENTIONS} (or None).")
    scored = getattr(importance, "attention", None)
    if attention is not None and scored is not None and attention != scored:
        raise ValueError(
            f"attention={attention!r}, but this importance is of the {scored!r} attention (head_importance(..., "
            f"attention={scored!r})): the plan would prune other heads than those scored. Leave attention out, or "
            f"compute the importance with head_importance(..., attention={attention!r})."
        )
    attention = attention or scored
    present = (~importance.isnan()).nonzero().tolist()
    if not is_integer(num_heads) or not 0 <= num_heads <= len(present):
        raise ValueError(f"num_heads={num_heads!r}: choose an integer between 0 and the {len(present)} heads left.")
    values = torch.tensor([float(importance[layer, head]) for layer, head in present])
    order = torch.argsort(values, stable=True)[:num_heads].tolist()
    stack, cross = ("decoder", True) if attention == "cross_attn" else (attention, False)
    chosen: dict[str | int, list[int]] = {}
    for index in sorted(order, key=lambda i: present[i]):
        layer, head = present[index]
        key = layer if attention is None else attention_key(stack, layer, cross)
        chosen.setdefault(key, []).append(head)
    return chosen


__all__ = ["head_importance", "least_important_heads", "attention_modules"]
