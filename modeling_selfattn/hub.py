"""What the selfattn models add for the Hub: a model card (README.md) generated from the config, written by
`save_pretrained` and uploaded by `push_to_hub`; the check that `save_pretrained` (the model's and the config's)
writes its remote code over no one's own files; and the refusal to save or push a model holding int8 layers.

A model file imports this one relatively, so `save_pretrained` ships it with the remote code and a model
loaded with `trust_remote_code=True` writes the same card. MODEL_CARD_TEMPLATE below is the template's one copy
(model_card.md at the root of the selfattn repository describes it).

A generated card is the YAML metadata, a marker line holding the SHA-256 of the text below it, and that text. The
text is ours while its hash matches: save_pretrained and push_to_hub then write it afresh from the config, keeping
the metadata a person added (license, datasets, base_model, model-index...) and setting only what the model decides
(library_name, pipeline_tag, our tags). Once the text is edited it is the owner's: save_pretrained leaves the
README.md alone, and push_to_hub keeps the card on the Hub, adding only tags.
"""

import functools
import hashlib
import json
import os
import re
import sys
from pathlib import Path

from huggingface_hub import ModelCard, ModelCardData
from huggingface_hub.errors import HFValidationError
from huggingface_hub.utils import validate_repo_id
from transformers.dynamic_module_utils import get_relative_import_files
from transformers.utils import logging

from .heads import HEADS_BY_CLASS

logger = logging.get_logger(__name__)

# The start of the marker line of a generated card, which ends with the hash of the text below it. The conversion
# command (convert_cli.write_model_card) removes lines holding "selfattn: generated from config.json" from a card
# it extends by hand.
GENERATED_MARKER = "<!-- selfattn: generated from config.json by save_pretrained"
# Cards of earlier releases carry the marker without a hash: whether their text was edited since cannot be told, so
# they count as edited.
MARKER_LINE = re.compile(
    r"[ \t\r\n]*<!-- selfattn: generated from config\.json by save_pretrained(?:; sha256 ([0-9a-f]{64}))? -->[ \t]*"
)
OUR_TAGS = ("selfattn", "custom_code")
# The text of the card transformers' push_to_hub writes where the Hub has none (create_and_tag_model_card).
TRANSFORMERS_PLACEHOLDER_DESCRIPTION = (
    "This is the model card of a 🤗 transformers model that has been pushed on the Hub. This model card has been "
    "automatically generated."
)

# The text of the card, below its metadata and marker line (render_model_card).
MODEL_CARD_TEMPLATE = """# {name}

A `{class_name}` of the selfattn family: the multi-head self-attention Transformer of
"Attention Is All You Need" (Vaswani et al., 2017) as a Hugging Face transformers model, here in its
{shape} form. The model code ships with the weights.

## Architecture

| | |
|---|---|
| shape | {shape} |
| layers | {layers} |
| width | hidden size {hidden_size}, {attention_heads} |
| feed-forward | inner size {intermediate_size}, {hidden_act} |
| positions | {positions}, up to {max_position_embeddings} tokens |
| normalisation | {normalisation} |
| vocabulary | {vocab_size} tokens |
| parameters | {num_parameters} ({parameters_in_millions} M) |

## How to load

```python
from transformers import {auto_class}

model = {auto_class}.from_pretrained("{repo_id}", trust_remote_code=True)
```

`trust_remote_code=True` runs the Python files stored beside the weights (`model.py` and the
files it imports): read them first, or pin a revision. Where the `selfattn` package is installed
(`import modeling_selfattn`), the Auto classes find the model without it.

## Intended use

{intended_use}

## Limits

- This card is generated from the configuration: it describes the architecture, not the training. Before
  relying on the model, add what it was trained on and how it was evaluated.
- Inputs longer than {max_position_embeddings} tokens are refused; truncate them.
- Use the tokenizer the model was trained with: ids outside its {vocab_size}-token vocabulary are refused.
- A model trained on text reproduces the biases and errors of that text.
"""


def attention_heads_text(config) -> str:
    heads = f"{config.num_attention_heads} attention heads of size {config.head_dim}"
    removed = sum(len(pruned) for pruned in (config.pruned_heads or {}).values())
    if removed:
        heads += f" per attention before pruning, {removed} of them removed (`config.pruned_heads`)"
    return heads


def render_model_card(model, repo_id: str, tags: list[str] | None = None) -> str:
    """The model card of `model` as it will be published under `repo_id`, with fresh metadata."""
    config = model.config
    class_name = type(model).__name__
    head = head_of(model)
    if config.encoder_layers and config.decoder_layers:
        shape = "encoder-decoder"
        layers = f"{config.encoder_layers} encoder + {config.decoder_layers} decoder"
    elif config.encoder_layers:
        shape, layers = "encoder-only (BERT-style)", f"{config.encoder_layers} encoder"
    else:
        shape, layers = "decoder-only", f"{config.decoder_layers} decoder"
    num_parameters = model.num_parameters()
    metadata = ModelCardData(library_name="transformers", pipeline_tag=head.pipeline_tag, tags=merged_tags(tags))
    text = MODEL_CARD_TEMPLATE.format(
        name=repo_id.split("/")[-1],
        class_name=class_name,
        shape=shape,
        layers=layers,
        hidden_size=config.hidden_size,
        attention_heads=attention_heads_text(config),
        intermediate_size=config.intermediate_size,
        hidden_act=config.hidden_act,
        positions="learned" if config.position_embedding_type == "learned" else "sinusoidal (fixed)",
        max_position_embeddings=config.max_position_embeddings,
        normalisation="pre-LN" if config.pre_layer_norm else "post-LN",
        vocab_size=config.vocab_size,
        num_parameters=f"{num_parameters:,}",
        parameters_in_millions=f"{num_parameters / 1e6:.3g}",
        auto_class=head.auto_class,
        repo_id=repo_id,
        intended_use=head.intended_use.format(labels=", ".join(str(label) for label in config.id2label.values())),
    )
    return f"---\n{metadata.to_yaml()}\n---\n{GENERATED_MARKER}; sha256 {text_digest(text)} -->\n\n{text}"


def head_of(model):
    # A user's subclass of a head is described as that head; the bare stacks as the base model.
    return HEADS_BY_CLASS[
        next((cls.__name__ for cls in type(model).__mro__ if cls.__name__ in HEADS_BY_CLASS), "SelfAttnModel")
    ]


def merged_tags(*tag_lists) -> list[str]:
    """Our tags first, then those of `tag_lists` in order, each once."""
    return list(dict.fromkeys([*OUR_TAGS, *(tag for tags in tag_lists for tag in tags or [])]))


def text_digest(text: str) -> str:
    # Blind to line endings and surrounding blank lines, which a save through huggingface_hub or an editor may change.
    return hashlib.sha256(text.replace("\r\n", "\n").strip().encode("utf-8")).hexdigest()


def holds_generated_text(card: ModelCard) -> bool:
    """Whether the text of `card` below its metadata is as render_model_card wrote it: the marker line, then text
    whose hash it holds."""
    match = MARKER_LINE.match(card.text)
    return match is not None and match.group(1) == text_digest(card.text[match.end() :])


@functools.cache
def transformers_placeholder_text() -> str | None:
    try:
        return ModelCard.from_template(ModelCardData(), model_description=TRANSFORMERS_PLACEHOLDER_DESCRIPTION).text
    except ImportError:  # huggingface_hub renders templates with jinja2, which transformers does not require
        return None


def refreshed_card(model, repo_id: str, existing: str | None) -> str | None:
    """What to write over the card `existing` (a README.md's content; None where there is none): the card generated
    for `model`, keeping the metadata of `existing`, where `existing` holds generated text unedited or transformers'
    placeholder card; None where its text is someone's (written or edited by hand), or its metadata unreadable."""
    fresh = render_model_card(model, repo_id)
    if existing is None:
        return fresh
    try:
        card = ModelCard(existing)
    except Exception:  # yaml's errors, and huggingface_hub's ValueError for metadata it cannot read
        return None
    if not (holds_generated_text(card) or card.text == transformers_placeholder_text()):
        return None
    generated = ModelCard(fresh)
    card.data.library_name = generated.data.library_name
    card.data.pipeline_tag = generated.data.pipeline_tag
    card.data.tags = merged_tags(card.data.tags)
    card.text = generated.text
    return str(card)


def readable_card(existing: str) -> ModelCard:
    """`existing` (a README.md's content) as a ModelCard; one whose metadata cannot be read keeps all of its content
    as text, with no metadata, rather than lose it."""
    try:
        return ModelCard(existing)
    except Exception:  # yaml's errors, and huggingface_hub's ValueError for metadata it cannot read
        card = ModelCard("")
        card.text = existing
        return card


def card_with_source(
    card: str,
    source_card: str | None,
    source: str,
    base_model: str | None = None,
    served_libraries: tuple = (),
) -> str:
    """`card`, the card of a model converted from `source` (render_model_card's, with the conversion's section),
    keeping what the source's card `source_card` (its README.md; None where it has none) says: its metadata
    (license, language, datasets, model-index...) merged into ours, its tags after ours, its library_name and
    pipeline_tag instead of ours where that library is one of `served_libraries` (the converted folder still
    carries what it loads, e.g. the sentence-transformers modules), base_model set to `base_model` where given (the
    source's Hub id; a local path names nothing on the Hub, and the source card's own base_model stays); and the
    source card's text below ours, under a heading that says whose it is."""
    ours = ModelCard(card)
    theirs = readable_card(source_card) if source_card is not None else ModelCard("")
    metadata = theirs.data.to_dict()
    metadata["tags"] = merged_tags(ours.data.tags, metadata.get("tags"))
    if metadata.get("library_name") not in served_libraries:
        metadata.update(library_name=ours.data.library_name, pipeline_tag=ours.data.pipeline_tag)
    if base_model is not None:
        metadata["base_model"] = base_model
    ours.data = ModelCardData(**metadata)
    if theirs.text.strip():
        ours.text = (
            f"{ours.text.rstrip()}\n\n## Source model card\n\nThe model card of `{source}`, the model this one was "
            f"converted from, as it came with the checkpoint:\n\n{theirs.text.strip()}\n"
        )
    return str(ours)


def exported_card(
    selfattn_card: str | None, section: str, pipeline_tag: str | None, served_libraries: tuple = ()
) -> str:
    """The card of a checkpoint exported from a selfattn folder whose card is `selfattn_card` (None where it has
    none): that card's metadata less our tags (the export runs without custom code), with library_name
    transformers and `pipeline_tag` (the exported head's task) unless the card's library is one of
    `served_libraries` (the folder still carries what it loads, e.g. the sentence-transformers modules); then
    `section`, saying what was exported from what; then the selfattn card's text, unless it is only the text
    generated from the config (holds_generated_text), which describes the selfattn model and nothing of the
    owner's."""
    card = readable_card(selfattn_card) if selfattn_card is not None else ModelCard("")
    metadata = card.data.to_dict()
    metadata["tags"] = [tag for tag in metadata.get("tags") or [] if tag not in OUR_TAGS] or None
    if metadata.get("library_name") not in served_libraries:
        metadata.update(library_name="transformers", pipeline_tag=pipeline_tag or metadata.get("pipeline_tag"))
    kept = "" if holds_generated_text(card) else card.text.strip()
    text = section.strip() + "\n"
    if kept:
        kept = "\n".join(line for line in kept.splitlines() if not MARKER_LINE.fullmatch(line))
        text += (
            "\n## The selfattn model's card\n\nThe model card of the selfattn model this checkpoint was exported "
            f"from:\n\n{kept}\n"
        )
    exported = ModelCard("")
    exported.data = ModelCardData(**{name: value for name, value in metadata.items() if value is not None})
    exported.text = text
    return str(exported)


def tagged_card(model, existing: str) -> str:
    """The card `existing`, someone's own, with our tags added, and library_name and pipeline_tag where it has none."""
    card = ModelCard(existing)
    card.data.tags = list(dict.fromkeys([*(card.data.tags or []), *OUR_TAGS]))
    if card.data.library_name is None:
        card.data.library_name = "transformers"
    if card.data.pipeline_tag is None:
        card.data.pipeline_tag = head_of(model).pipeline_tag
    return str(card)


def refuse_missing_local_path(source, argument: str = "pretrained_model_name_or_path") -> None:
    """Raise at once for a source meant as a local path that does not exist: a path object, a string that cannot be
    a Hub repository id (absolute, relative with ./ or ../, ~, more than one /), or one whose first folder exists
    here. Anything else may be a Hub id and is left to the Hub (which, without a network, retries for half a minute)."""
    if source is None:
        return
    path = Path(source).expanduser()
    if path.exists():
        return
    try:
        validate_repo_id(str(source))
        could_be_hub_id = not isinstance(source, os.PathLike)
    except HFValidationError:
        could_be_hub_id = False
    if not could_be_hub_id or (len(path.parts) > 1 and Path(path.parts[0]).is_dir()):
        raise OSError(
            f"{argument}={str(source)!r} names no existing folder ({path.absolute()} does not exist), and reads as a "
            "local path, not a Hub repo id. Give the folder of a saved model (the one holding config.json, as "
            "written by save_pretrained; relative paths start from the current folder), or a Hub repo id such as "
            "'username/model-name'."
        )


def refuse_to_overwrite_foreign_code(saved: object, save_directory, model_type: str) -> None:
    """save_pretrained copies the files that define `saved`'s class (its module and those that module imports
    relatively: model.py, config.py, ...) into `save_directory` as remote code, over any file of the same name. Where
    the folder holds such a file with other content and is not a selfattn save (its config.json names another
    model type than `model_type`, or there is none), that file is someone's own code: refuse before anything is
    written."""
    folder = Path(save_directory)
    if getattr(saved, "_auto_class", None) is None or not folder.is_dir() or holds_save_of(folder, model_type):
        return
    module_file = getattr(sys.modules[type(saved).__module__], "__file__", None)
    if type(saved).__module__ == "__main__" or module_file is None:
        return  # no code to copy: transformers' custom_object_save warns and saves none either
    module_file = Path(module_file)
    clashes = [
        code.name
        for code in map(Path, [module_file, *get_relative_import_files(module_file)])
        if (folder / code.name).is_file() and (folder / code.name).read_bytes() != code.read_bytes()
    ]
    if clashes:
        raise FileExistsError(
            f"save_directory={str(save_directory)!r} holds {', '.join(sorted(clashes))}, which save_pretrained would "
            "replace with the model's code (saved models carry it as remote code), and the folder is no selfattn "
            "save. Save into another folder, or move those files away first."
        )


def holds_save_of(folder: Path, model_type: str) -> bool:
    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(config, dict) and config.get("model_type") == model_type


def refuse_saving_int8(model, method: str) -> None:
    """Raise, before anything is written, where any module of `model` holds int8 layers (quantization.py)."""
    # Looked up rather than imported: quantization.py is imported by the first quantize() (or the unpickling of a
    # quantized model), before which no model holds int8 layers; an import here would also ship it, and the torch it
    # needs, with every saved config.
    quantization = sys.modules.get(f"{__package__}.quantization")
    if quantization is not None:
        quantization.refuse_int8_save(model, method=method)


class SelfAttnHubMixin:
    """Writes the model card beside the weights on `save_pretrained` and uploads it with `push_to_hub`; refuses to
    save over files of someone's own code (refuse_to_overwrite_foreign_code), and to save or push int8 layers."""

    def save_pretrained(self, save_directory, is_main_process: bool = True, *args, **kwargs):
        refuse_saving_int8(self, "save_pretrained")
        if is_main_process:
            refuse_to_overwrite_foreign_code(self, save_directory, self.config.model_type)
        result = super().save_pretrained(save_directory, is_main_process, *args, **kwargs)
        readme = Path(save_directory) / "README.md"
        if is_main_process and readme.parent.is_dir():
            existing = readme.read_text(encoding="utf-8") if readme.exists() else None
            card = refreshed_card(self, Path(save_directory).resolve().name, existing)
            if card is not None:
                readme.write_text(card, encoding="utf-8")
            elif GENERATED_MARKER in existing:
                logger.warning_once(
                    f"save_pretrained: {readme} was generated by save_pretrained and has been edited since (or its "
                    "metadata cannot be read), so it is kept as it is, not written afresh from the config. Delete it "
                    "to have the card generated again."
                )
        return result

    def push_to_hub(self, *args, **kwargs):
        """transformers' PreTrainedModel.push_to_hub, refusing a model that holds int8 layers first."""
        # Before the repository is created: the int8 layers would fail save_pretrained only after that.
        refuse_saving_int8(self, "push_to_hub")
        return super().push_to_hub(*args, **kwargs)

    def _upload_modified_files(self, working_dir, repo_id, files_timestamps, *args, **kwargs):
        # push_to_hub (and save_pretrained(push_to_hub=True)) has just written the Hub's current card, with the tags
        # of the push added, or transformers' placeholder card, to README.md: publish the card generated from the
        # config instead, keeping that card's metadata; a card whose text its owner edited stays theirs.
        readme = Path(working_dir) / "README.md"
        existing = readme.read_text(encoding="utf-8") if readme.exists() else None
        card = refreshed_card(self, repo_id, existing)
        if card is None:
            card = tagged_card(self, existing)
            logger.warning(
                f"push_to_hub: the model card of {repo_id} was written or edited by hand, so it is kept as it is "
                "(with the tags of this push added), not generated afresh from the config. Delete README.md from the "
                "repository to have the card generated again."
            )
        readme.write_text(card, encoding="utf-8")
        return super()._upload_modified_files(working_dir, repo_id, files_timestamps, *args, **kwargs)


__all__ = ["SelfAttnHubMixin", "card_with_source", "exported_card", "refuse_missing_local_path", "render_model_card"]
