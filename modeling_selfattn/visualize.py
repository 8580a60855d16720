"""See what the heads attend to: attention maps, rollout, cross-attention alignments and head statistics.

    python -m modeling_selfattn.visualize MODEL_DIR --text "a sentence" --out attention/
    python -m modeling_selfattn.visualize MODEL_DIR --text "source" --target "target" --out attention/
    python -m modeling_selfattn.visualize MODEL_DIR --stats texts.txt --out attention/

Every plot is written with a JSON file holding the numbers behind it. Padding never appears: each
sequence is run on its own, so every position shown is a real token.
"""

import argparse
import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import model as selfattn_model
from .config import SelfAttnConfig
from .hub import refuse_missing_local_path

DEFAULT_TEXT = "The movie was not bad at all, and the actors clearly enjoyed themselves."


@dataclass
class AttentionRecord:
    """Attention probabilities of one input, as (layers, heads, queries, keys) tensors on the CPU."""

    tokens: list[str]
    attentions: torch.Tensor
    target_tokens: list[str] = field(default_factory=list)
    decoder_attentions: torch.Tensor | None = None
    cross_attentions: torch.Tensor | None = None
    special_mask: list[bool] = field(default_factory=list)


def local_model_dir(model: str) -> str:
    """`model` with a leading ~ expanded when it names an existing path; a mistyped local path fails here at once
    (see refuse_missing_local_path); anything else is left for the Hub to resolve."""
    refuse_missing_local_path(model, "MODEL")
    path = Path(model).expanduser()
    return str(path) if path.exists() else model


def load_model(model_dir: str):
    """A selfattn folder (any head) or a checkpoint our conversion loads, with eager attention so that
    the real probabilities come back."""
    model_dir = local_model_dir(model_dir)
    from transformers import AutoConfig, AutoTokenizer

    try:
        config = AutoConfig.from_pretrained(model_dir)
    except OSError as error:
        if Path(model_dir).exists():
            raise
        # A name that could be either: say that the local reading was considered too.
        raise OSError(
            f"MODEL {model_dir!r}: there is no local folder {Path(model_dir).absolute()}, and the Hub did not "
            f"provide a repo of that name ({error})"
        ) from error
    head_class = selfattn_model.SelfAttnModel
    if isinstance(config, SelfAttnConfig):
        for name in config.architectures or []:
            head_class = getattr(selfattn_model, name, head_class)
        if config.is_encoder_decoder:
            head_class = selfattn_model.SelfAttnForConditionalGeneration
    model = head_class.from_pretrained(model_dir, attn_implementation="eager").eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    return model, tokenizer


def _stack(layers) -> torch.Tensor:
    if not layers or any(layer is None for layer in layers):
        raise ValueError(
            "The model returned no attention probabilities. Load it with attn_implementation='eager' (SDPA and "
            "flash kernels never form them) and use a model whose forward supports output_attentions."
        )
    return torch.stack([layer[0] for layer in layers]).float().cpu()


@torch.no_grad()
def record_attention(model, tokenizer, text: str, target: str | None = None, max_new_tokens: int = 32):
    """Run one text (and, for an encoder-decoder, a target: given, or generated greedily) and keep the
    attention probabilities of every layer and head."""
    if not text or not text.strip():
        raise ValueError("The text is empty: give a sentence to look at (e.g. --text 'The cat sat.').")
    if model.config._attn_implementation != "eager":
        model.set_attn_implementation("eager")
    encoded = tokenizer(text, return_tensors="pt", truncation=True)
    encoded = {key: value.to(model.device) for key, value in encoded.items()}
    tokens = tokenizer.convert_ids_to_tokens(encoded["input_ids"][0])
    special = set(tokenizer.all_special_ids)
    special_mask = [int(i) in special for i in encoded["input_ids"][0]]

    if not model.config.is_encoder_decoder:
        outputs = model(**encoded, output_attentions=True)
        return AttentionRecord(tokens, _stack(outputs.attentions), special_mask=special_mask)

    encoded.pop("token_type_ids", None)
    if target is None:
        decoder_input_ids = model.generate(**encoded, max_new_tokens=max_new_tokens, do_sample=False, num_beams=1)
    else:
        labels = tokenizer(text_target=target, return_tensors="pt")["input_ids"].to(model.device)
        decoder_input_ids = model.prepare_decoder_input_ids_from_labels(labels)
    outputs = model(**encoded, decoder_input_ids=decoder_input_ids, output_attentions=True)
    return AttentionRecord(
        tokens,
        _stack(outputs.encoder_attentions),
        target_tokens=tokenizer.convert_ids_to_tokens(decoder_input_ids[0]),
        decoder_attentions=_stack(outputs.decoder_attentions),
        cross_attentions=_stack(outputs.cross_attentions),
        special_mask=special_mask,
    )


def attention_rollout(attentions: torch.Tensor, residual_weight: float = 0.5) -> torch.Tensor:
    """Abnar & Zuidema (2020): average the heads, mix in the residual connection as identity, renormalise
    the rows, and multiply layer by layer from the input upwards. Row i says how much each input token
    flows into position i at the top."""
    num_layers, _, length, _ = attentions.shape
    identity = torch.eye(length, dtype=attentions.dtype)
    rollout = identity
    for layer in range(num_layers):
        mixed = residual_weight * identity + (1 - residual_weight) * attentions[layer].mean(dim=0)
        mixed = mixed / mixed.sum(dim=-1, keepdim=True)
        rollout = mixed @ rollout
    return rollout


def rank_tokens(rollout: torch.Tensor, tokens: list[str], position: int = 0) -> list[tuple[str, float]]:
    """Tokens ordered by their rollout relevance to `position` (0: the [CLS] token the classifier reads)."""
    relevance = rollout[position]
    order = torch.argsort(relevance, descending=True)
    return [(tokens[i], float(relevance[i])) for i in order]


def alignment(cross_attentions: torch.Tensor, layer: int | None = None) -> torch.Tensor:
    """Target-by-source alignment: cross-attention averaged over heads (and over layers unless one is
    chosen). Its row-wise argmax is the source token each target token looks at most."""
    chosen = cross_attentions if layer is None else cross_attentions[layer : layer + 1]
    return chosen.mean(dim=(0, 1))


def head_statistics(records: list[AttentionRecord]) -> dict[str, torch.Tensor]:
    """Per layer and head, averaged over query positions and texts: the entropy of the attention
    distribution (nats), the mean distance |i - j| attended, and the share of attention on special tokens."""
    if not records:
        raise ValueError("Head statistics need at least one text.")
    totals = {"entropy": 0.0, "distance": 0.0, "special_share": 0.0}
    for record in records:
        probabilities = record.attentions
        length = probabilities.shape[-1]
        positions = torch.arange(length, dtype=probabilities.dtype)
        distance = (positions[:, None] - positions[None, :]).abs()
        special = torch.tensor(record.special_mask, dtype=probabilities.dtype)
        entropy = -(probabilities * probabilities.clamp_min(1e-12).log()).sum(-1)
        totals["entropy"] = totals["entropy"] + entropy.mean(-1)
        totals["distance"] = totals["distance"] + (probabilities * distance).sum(-1).mean(-1)
        totals["special_share"] = totals["special_share"] + (probabilities * special).sum(-1).mean(-1)
    return {name: value / len(records) for name, value in totals.items()}


def _check_layer(layer: int | None, num_layers: int) -> list[int]:
    if layer is None:
        return list(range(num_layers))
    if not -num_layers <= layer < num_layers:
        raise ValueError(f"Layer {layer} is out of range: this model has layers 0..{num_layers - 1} (or 'all').")
    return [layer % num_layers]


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _heatmap(axis, matrix, row_labels, column_labels, title):
    axis.imshow(matrix, cmap="viridis", vmin=0.0, aspect="auto")
    axis.set_title(title, fontsize=9)
    font = max(4, min(8, 200 // max(len(row_labels), len(column_labels), 1)))
    axis.set_xticks(range(len(column_labels)), column_labels, rotation=90, fontsize=font)
    axis.set_yticks(range(len(row_labels)), row_labels, fontsize=font)


def plot_heads(attentions: torch.Tensor, tokens, path, layer: int, query_tokens=None, title="layer"):
    """One heatmap per head of one layer, in a grid."""
    plt = _pyplot()
    num_heads = attentions.shape[1]
    columns = min(4, num_heads)
    rows = math.ceil(num_heads / columns)
    figure, axes = plt.subplots(rows, columns, figsize=(3.2 * columns, 3.2 * rows), squeeze=False)
    for head in range(rows * columns):
        axis = axes[head // columns][head % columns]
        if head < num_heads:
            _heatmap(axis, attentions[layer, head], query_tokens or tokens, tokens, f"{title} {layer} head {head}")
        else:
            axis.axis("off")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def plot_matrix(matrix: torch.Tensor, row_labels, column_labels, path, title):
    plt = _pyplot()
    figure, axis = plt.subplots(figsize=(6, 6))
    _heatmap(axis, matrix, row_labels, column_labels, title)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def plot_head_statistics(statistics: dict[str, torch.Tensor], path):
    plt = _pyplot()
    figure, axes = plt.subplots(1, len(statistics), figsize=(5 * len(statistics), 4), squeeze=False)
    for axis, (name, values) in zip(axes[0], statistics.items()):
        image = axis.imshow(values, cmap="magma", aspect="auto")
        axis.set_title(name.replace("_", " "))
        axis.set_xlabel("head")
        axis.set_ylabel("layer")
        figure.colorbar(image, ax=axis)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def visualize(model, tokenizer, text: str, out_dir, target: str | None = None, layer: int | None = -1):
    """Write the head grids, the rollout (encoders) or alignment (encoder-decoders), and their numbers.
    Returns {name: path} of what was written."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    record = record_attention(model, tokenizer, text, target)
    layers = _check_layer(layer, record.attentions.shape[0])
    written, numbers = {}, {"tokens": record.tokens}
    for index in layers:
        path = out_dir / f"heads_layer{index}.png"
        plot_heads(record.attentions, record.tokens, path, index)
        written[path.stem] = path
    numbers["attentions"] = {str(index): record.attentions[index].tolist() for index in layers}

    rollout = attention_rollout(record.attentions)
    plot_matrix(rollout, record.tokens, record.tokens, out_dir / "rollout.png", "attention rollout")
    written["rollout"] = out_dir / "rollout.png"
    numbers["rollout"] = rollout.tolist()
    numbers["relevance_to_first_token"] = rank_tokens(rollout, record.tokens)

    if record.cross_attentions is not None:
        aligned = alignment(record.cross_attentions)
        plot_matrix(aligned, record.target_tokens, record.tokens, out_dir / "alignment.png", "cross-attention")
        written["alignment"] = out_dir / "alignment.png"
        numbers["target_tokens"] = record.target_tokens
        numbers["alignment"] = aligned.tolist()
        numbers["aligned_source_token"] = [record.tokens[i] for i in aligned.argmax(-1).tolist()]

    json_path = out_dir / "attention.json"
    json_path.write_text(json.dumps(numbers, indent=1))
    written["numbers"] = json_path
    return written


def visualize_statistics(model, tokenizer, texts: list[str], out_dir):
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    statistics = head_statistics([record_attention(model, tokenizer, text) for text in texts if text.strip()])
    plot_head_statistics(statistics, out_dir / "head_statistics.png")
    table = {name: values.tolist() for name, values in statistics.items()}
    (out_dir / "head_statistics.json").write_text(json.dumps(table, indent=1))
    return statistics


def format_statistics(statistics: dict[str, torch.Tensor]) -> str:
    lines = ["layer head  entropy  distance  special_share"]
    num_layers, num_heads = statistics["entropy"].shape
    for layer in range(num_layers):
        for head in range(num_heads):
            row = [float(statistics[name][layer, head]) for name in ("entropy", "distance", "special_share")]
            lines.append(f"{layer:5d} {head:4d} {row[0]:8.3f} {row[1]:9.2f} {row[2]:14.3f}")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m modeling_selfattn.visualize",
        description="Plot what selfattn's attention heads attend to: per-head heatmaps of a layer, attention "
        "rollout (encoders) and cross-attention alignments (encoder-decoders), with the numbers as JSON; or "
        "per-head statistics over a file of texts.",
    )
    parser.add_argument(
        "model",
        metavar="MODEL",
        help="a selfattn model folder, or a BERT-style folder that selfattn loads (or a Hub repo id)",
    )
    parser.add_argument("--text", default=DEFAULT_TEXT, help="the input text (default: a sample sentence)")
    parser.add_argument("--target", help="encoder-decoder only: the target text (default: greedy generation)")
    parser.add_argument("--layer", default="-1", help="layer index to draw (negative counts from the top), or 'all'")
    parser.add_argument("--stats", metavar="TEXTS_FILE", help="also compute head statistics over these lines")
    parser.add_argument("--out", default="attention", help="output folder (default: ./attention)")
    args = parser.parse_args(argv)
    try:
        layer = None if args.layer == "all" else int(args.layer)
    except ValueError:
        parser.error(f"--layer must be an integer or 'all', got {args.layer!r}")
    try:
        model, tokenizer = load_model(args.model)
        written = visualize(model, tokenizer, args.text, args.out, args.target, layer)
        if args.stats:
            texts = Path(args.stats).read_text().splitlines()
            print(format_statistics(visualize_statistics(model, tokenizer, texts, args.out)))
    except (ValueError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    for name, path in written.items():
        print(f"{name}: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
