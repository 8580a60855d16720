"""See what the heads attend to: attention maps, rollout, cross-attention alignments and head statistics.

    python -m modeling_selfattn.visualize MODEL_DIR --text "a sentence" --out attention/
    python -m modeling_selfattn.visualize MODEL_DIR --text "source" --target "target" --out attention/
    python -m modeling_selfattn.visualize MODEL_DIR --stats texts.txt --out attention/
    python -m modeling_selfattn.visualize CLASSIFIER_DIR --importance labelled.tsv --out attention/

Every plot is written with a JSON file holding the numbers behind it. Padding never appears: each
sequence is run on its own, so every position shown is a real token. Heads removed by `prune_heads` are
kept in their places as NaN (blank in the plots, null in the JSON), so head h is head h in every layer.
"""

import argparse
import contextlib
import json
import math
import sys
from dataclasses import dataclass, field
from numbers import Real
from pathlib import Path

import torch

from . import model as selfattn_model
from .argument_values import is_integer
from .config import SelfAttnConfig, attention_key
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


def _stack(layers, config: SelfAttnConfig | None = None, attention: str = "encoder") -> torch.Tensor:
    """(layers, num_attention_heads, queries, keys) of the first sequence; with `config`, the heads of each layer
    are put back at their original indices and pruned ones are NaN."""
    if not layers or any(layer is None for layer in layers):
        raise ValueError(
            "The model returned no attention probabilities. Load it with attn_implementation='eager' (SDPA and "
            "flash kernels never form them) and use a model whose forward supports output_attentions."
        )
    if config is None or not config.pruned_heads:
        return torch.stack([layer[0] for layer in layers]).float().cpu()
    stack, cross = ("decoder", True) if attention == "cross_attn" else (attention, False)
    stacked = torch.full((len(layers), config.num_attention_heads, *layers[0].shape[-2:]), float("nan"))
    for index, layer in enumerate(layers):
        stacked[index, config.kept_heads(attention_key(stack, index, cross))] = layer[0].float().cpu()
    return stacked


def _json_ready(values: torch.Tensor) -> list:
    """Nested lists with NaN (pruned heads) as None, which JSON can hold."""

    def clean(item):
        return [clean(entry) for entry in item] if isinstance(item, list) else None if math.isnan(item) else item

    return clean(values.tolist())


@contextlib.contextmanager
def eager_attention(model):
    """`model` with eager attention (SDPA and flash kernels never form the probabilities) while inside; the
    caller's attention implementation is put back on leaving, also on an error."""
    attention = model.config._attn_implementation
    if attention != "eager":
        model.set_attn_implementation("eager")
    try:
        yield model
    finally:
        if attention != "eager":
            model.set_attn_implementation(attention)


@torch.no_grad()
def record_attention(model, tokenizer, text: str, target: str | None = None, max_new_tokens: int = 32):
    """Run one text (and, for an encoder-decoder, a target: given, or generated greedily) and keep the
    attention probabilities of every layer and head. The model runs with eager attention, and is left with the
    attention implementation it had."""
    if not text or not text.strip():
        raise ValueError("The text is empty: give a sentence to look at (e.g. --text 'The cat sat.').")
    if target is not None and not model.config.is_encoder_decoder:
        raise ValueError(
            f"A target (--target) is the decoder's input of an encoder-decoder; {type(model).__name__} is not one, so "
            "it would go unread. Leave out the target, or pass an encoder-decoder model."
        )
    with eager_attention(model):
        encoded = tokenizer(text, return_tensors="pt", truncation=True)
        encoded = {key: value.to(model.device) for key, value in encoded.items()}
        tokens = tokenizer.convert_ids_to_tokens(encoded["input_ids"][0])
        special = set(tokenizer.all_special_ids)
        special_mask = [int(i) in special for i in encoded["input_ids"][0]]

        config = model.config
        if not config.is_encoder_decoder:
            outputs = model(**encoded, output_attentions=True)
            main_stack = "encoder" if config.encoder_layers > 0 else "decoder"
            return AttentionRecord(tokens, _stack(outputs.attentions, config, main_stack), special_mask=special_mask)

        encoded.pop("token_type_ids", None)
        if target is None:
            decoder_input_ids = model.generate(**encoded, max_new_tokens=max_new_tokens, do_sample=False, num_beams=1)
        else:
            labels = tokenizer(text_target=target, return_tensors="pt")["input_ids"].to(model.device)
            decoder_input_ids = model.prepare_decoder_input_ids_from_labels(labels)
        outputs = model(**encoded, decoder_input_ids=decoder_input_ids, output_attentions=True)
        return AttentionRecord(
            tokens,
            _stack(outputs.encoder_attentions, config, "encoder"),
            target_tokens=tokenizer.convert_ids_to_tokens(decoder_input_ids[0]),
            decoder_attentions=_stack(outputs.decoder_attentions, config, "decoder"),
            cross_attentions=_stack(outputs.cross_attentions, config, "cross_attn"),
            special_mask=special_mask,
        )


def attention_rollout(attentions: torch.Tensor, residual_weight: float = 0.5) -> torch.Tensor:
    """Abnar & Zuidema (2020): average the heads, mix in the residual connection as identity, renormalise
    the rows, and multiply layer by layer from the input upwards. Row i says how much each input token
    flows into position i at the top. Pruned heads (NaN) are left out of the average; a layer without heads
    mixes nothing across tokens. `residual_weight` is the residual's share of each layer's mix, from 0 to 1."""
    if isinstance(residual_weight, bool) or not isinstance(residual_weight, Real) or not 0 <= residual_weight <= 1:
        # Beyond 1 the attention enters with a negative weight, and the rollout holds negative "relevances".
        raise ValueError(
            f"attention_rollout(residual_weight={residual_weight!r}): residual_weight must be a number from 0 to 1, "
            "the residual connection's share of each layer's mix (0.5 by default, as in Abnar & Zuidema)."
        )
    num_layers, _, length, _ = attentions.shape
    identity = torch.eye(length, dtype=attentions.dtype)
    rollout = identity
    for layer in range(num_layers):
        heads = attentions[layer][~attentions[layer].isnan().flatten(1).all(1)]
        averaged = heads.mean(dim=0) if len(heads) else identity
        mixed = residual_weight * identity + (1 - residual_weight) * averaged
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
    chosen; a negative `layer` counts from the last, as `visualize` takes it). Its row-wise argmax is the source
    token each target token looks at most."""
    chosen = cross_attentions[_check_layer(layer, cross_attentions.shape[0])]
    return chosen.flatten(0, 1).nanmean(dim=0)  # pruned heads (NaN) left out


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


def _check_layer_type(layer) -> None:
    # bool is an int to Python: layer=True would draw layer 1. A float passed the range check and failed later.
    if layer is not None and not is_integer(layer):
        raise TypeError(
            f"layer={layer!r}: pass a layer index as an int (negative ones count from the last), or None ('all' on "
            f"the command line) for every layer; got a {type(layer).__name__}."
        )


def _check_layer(layer: int | None, num_layers: int) -> list[int]:
    _check_layer_type(layer)
    if layer is None:
        return list(range(num_layers))
    if not -num_layers <= layer < num_layers:
        raise ValueError(
            f"layer={layer} is out of range: this model has layers 0..{num_layers - 1} (negative ones count from the "
            "last); pass one of them, or None ('all' on the command line) for every layer."
        )
    return [int(layer) % num_layers]


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
        if head < num_heads and attentions[layer, head].isnan().all():
            axis.set_title(f"{title} {layer} head {head}: pruned", fontsize=9)
            axis.axis("off")
        elif head < num_heads:
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
    _check_layer_type(layer)  # before the model runs; its range once the record gives the number of layers
    record = record_attention(model, tokenizer, text, target)
    layers = _check_layer(layer, record.attentions.shape[0])
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)  # once text, target and layer are accepted: refusing them creates none
    written, numbers = {}, {"tokens": record.tokens}
    for index in layers:
        path = out_dir / f"heads_layer{index}.png"
        plot_heads(record.attentions, record.tokens, path, index)
        written[path.stem] = path
    numbers["attentions"] = {str(index): _json_ready(record.attentions[index]) for index in layers}

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
    texts = [text for text in texts if text.strip()]
    if not texts:
        raise ValueError("Head statistics need at least one text; every line given is blank.")
    statistics = head_statistics([record_attention(model, tokenizer, text) for text in texts])
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    plot_head_statistics(statistics, out_dir / "head_statistics.png")
    table = {name: _json_ready(values) for name, values in statistics.items()}
    (out_dir / "head_statistics.json").write_text(json.dumps(table, indent=1))
    return statistics


def plot_head_importance(importance: torch.Tensor, path, title: str = "head importance"):
    """Layers (rows, layer 0 at the top) by heads (columns), each cell with its value; pruned heads (NaN) blank."""
    plt = _pyplot()
    num_layers, num_heads = importance.shape
    figure, axis = plt.subplots(figsize=(1.0 + 0.55 * num_heads, 1.0 + 0.45 * num_layers))
    image = axis.imshow(importance, cmap="viridis", vmin=0.0, aspect="auto")
    axis.set_title(title, fontsize=10)
    axis.set_xlabel("head")
    axis.set_ylabel("layer")
    axis.set_xticks(range(num_heads))
    axis.set_yticks(range(num_layers))
    if num_layers * num_heads <= 400:
        high = float(importance.nan_to_num(0.0).max())
        for layer in range(num_layers):
            for head in range(num_heads):
                value = float(importance[layer, head])
                text, color = ("pruned", "grey") if math.isnan(value) else (f"{value:.2f}", "black")
                if not math.isnan(value) and value < 0.5 * high:
                    color = "white"  # on viridis' dark end
                axis.text(head, layer, text, ha="center", va="center", fontsize=6, color=color)
    figure.colorbar(image, ax=axis)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def read_labelled_texts(path, config: SelfAttnConfig) -> list[tuple[str, int]]:
    """(text, label id) from a tab-separated file of `text<TAB>label` lines (GLUE's layout: a first line
    `sentence<TAB>label` is a header). A label is a name of config.label2id, or else a class id. A name wins over
    the id its digits spell, as in examples/common.py's LabelEncoder: a model whose classes are named "1" to "5"
    (ids 0 to 4) reads "3" as id 2. A file where such a name meets a label that only an id explains is refused, as
    its labels could be meant either way."""
    pairs = []
    label2id = {str(name): index for name, index in (config.label2id or {}).items()}
    ambiguous = as_id = None  # the first (line, label) of each kind
    lines = Path(path).read_text().splitlines()
    for number, line in enumerate(lines, start=1):
        if not line.strip() or (number == 1 and line.rstrip().endswith("\tlabel")):
            continue
        text, tab, label = line.rstrip("\n").rpartition("\t")
        label = label.strip()
        if not tab or not text.strip():
            raise ValueError(f"{path} line {number}: expected 'text<TAB>label', got {line[:80]!r}.")
        is_id = label.isdecimal() and int(label) < config.num_labels
        if label in label2id:
            pairs.append((text, label2id[label]))
            if is_id and int(label) != label2id[label] and ambiguous is None:
                ambiguous = number, label
        elif is_id:
            pairs.append((text, int(label)))
            as_id = as_id or (number, label)
        else:
            raise ValueError(
                f"{path} line {number}: label {label!r} is neither a class id below num_labels={config.num_labels} "
                f"nor a name in the model's label2id {sorted(label2id)}; write one of those for each label."
            )
    if ambiguous and as_id:
        (name_line, name), (id_line, id_label) = ambiguous, as_id
        raise ValueError(
            f"{path}: label {name!r} (line {name_line}) is the name of class {label2id[name]} but also the id of class "
            f"{name}, and label {id_label!r} (line {id_line}) is an id, not a name, so the file's labels could be ids "
            f"or names. Write every label as a name of the model's label2id {label2id}."
        )
    if not pairs:
        raise ValueError(f"{path} holds no labelled texts; write one 'text<TAB>label' line per example.")
    return pairs


def check_importance_model(model) -> None:
    if not type(model).__name__.endswith("ForSequenceClassification"):
        raise ValueError(
            f"--importance scores a sequence classifier from labelled texts; this model is {type(model).__name__}. "
            "For other heads call modeling_selfattn.head_importance.head_importance with batches that hold labels."
        )


def read_texts(path) -> list[str]:
    """The non-blank lines of a --stats file; ValueError where there is none."""
    texts = [line for line in Path(path).read_text().splitlines() if line.strip()]
    if not texts:
        raise ValueError(f"--stats {path} holds no text (it is empty or blank); write one text per line.")
    return texts


def visualize_importance(model, tokenizer, pairs: list[tuple[str, int]], out_dir, batch_size: int = 16):
    """Michel et al.'s head importance (layer-normalised) of a sequence classifier over labelled texts, drawn as a
    layers x heads heatmap (head_importance.png) with its numbers (head_importance.json). Returns the importance."""
    from .head_importance import head_importance

    check_importance_model(model)
    batches = []
    for start in range(0, len(pairs), batch_size):
        texts, labels = zip(*pairs[start : start + batch_size])
        batch = tokenizer(list(texts), padding=True, truncation=True, return_tensors="pt")
        batches.append({**batch, "labels": torch.tensor(labels)})
    importance = head_importance(model, batches)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    plot_head_importance(importance, out_dir / "head_importance.png", f"head importance ({len(pairs)} texts)")
    numbers = {"importance": _json_ready(importance), "texts": len(pairs), "normalized_per_layer": True}
    (out_dir / "head_importance.json").write_text(json.dumps(numbers, indent=1))
    return importance


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
    parser.add_argument(
        "--target", help="encoder-decoder only (refused otherwise): the target text (default: greedy generation)"
    )
    parser.add_argument("--layer", default="-1", help="layer index to draw (negative counts from the top), or 'all'")
    parser.add_argument("--stats", metavar="TEXTS_FILE", help="also compute head statistics over these lines")
    parser.add_argument(
        "--importance",
        metavar="LABELLED_TSV",
        help="sequence classifiers: also draw each head's importance (Michel et al. 2019, normalised per layer) over "
        "these 'text<TAB>label' lines as head_importance.png",
    )
    parser.add_argument("--out", default="attention", help="output folder (default: ./attention)")
    args = parser.parse_args(argv)
    try:
        layer = None if args.layer == "all" else int(args.layer)
    except ValueError:
        parser.error(f"--layer must be an integer or 'all', got {args.layer!r}")
    try:
        model, tokenizer = load_model(args.model)
        # Every input is read and checked before the first file is written: a refusal leaves --out as it was.
        texts = read_texts(args.stats) if args.stats else None
        pairs = None
        if args.importance:
            check_importance_model(model)
            try:
                pairs = read_labelled_texts(args.importance, model.config)
            except ValueError as error:
                raise ValueError(f"--importance: {error}") from error
        written = visualize(model, tokenizer, args.text, args.out, args.target, layer)
        if texts is not None:
            print(format_statistics(visualize_statistics(model, tokenizer, texts, args.out)))
            written["head_statistics"] = Path(args.out) / "head_statistics.png"
        if pairs is not None:
            visualize_importance(model, tokenizer, pairs, args.out)
            written["head_importance"] = Path(args.out) / "head_importance.png"
    except (ValueError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    for name, path in written.items():
        print(f"{name}: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
