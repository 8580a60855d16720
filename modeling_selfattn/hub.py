"""What the selfattn models add for the Hub: a model card (README.md) generated from the config, written by
`save_pretrained` and uploaded by `push_to_hub`; and the check that `save_pretrained` (the model's and the config's)
writes its remote code over no one's own files.

A model file imports this one relatively, so `save_pretrained` ships it with the remote code and a model
loaded with `trust_remote_code=True` writes the same card. MODEL_CARD_TEMPLATE below is the template's one copy
(model_card.md at the root of the selfattn repository describes it).
"""

import json
import os
import sys
from pathlib import Path

from huggingface_hub import ModelCard, ModelCardData
from huggingface_hub.errors import HFValidationError
from huggingface_hub.utils import validate_repo_id
from transformers.dynamic_module_utils import get_relative_import_files

from .heads import HEADS_BY_CLASS

# Marks a README.md that save_pretrained may rewrite; a card without it was written by a person and is kept.
GENERATED_MARKER = "<!-- selfattn: generated from config.json by save_pretrained -->"

MODEL_CARD_TEMPLATE = """---
{metadata}
---
<!-- selfattn: generated from config.json by save_pretrained -->

# {name}

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
    """The model card of `model` as it will be published under `repo_id`."""
    config = model.config
    class_name = type(model).__name__
    # A user's subclass of a head is described as that head; the bare stacks as the base model.
    head = HEADS_BY_CLASS[
        next((cls.__name__ for cls in type(model).__mro__ if cls.__name__ in HEADS_BY_CLASS), "SelfAttnModel")
    ]
    if config.encoder_layers and config.decoder_layers:
        shape = "encoder-decoder"
        layers = f"{config.encoder_layers} encoder + {config.decoder_layers} decoder"
    elif config.encoder_layers:
        shape, layers = "encoder-only (BERT-style)", f"{config.encoder_layers} encoder"
    else:
        shape, layers = "decoder-only", f"{config.decoder_layers} decoder"
    num_parameters = model.num_parameters()
    all_tags = ["selfattn", "custom_code"] + [tag for tag in tags or [] if tag not in ("selfattn", "custom_code")]
    metadata = ModelCardData(library_name="transformers", pipeline_tag=head.pipeline_tag, tags=all_tags)
    return MODEL_CARD_TEMPLATE.format(
        metadata=metadata.to_yaml(),
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


class SelfAttnHubMixin:
    """Writes the model card beside the weights on `save_pretrained` and uploads it with `push_to_hub`; refuses to
    save over files of someone's own code (refuse_to_overwrite_foreign_code)."""

    def save_pretrained(self, save_directory, is_main_process: bool = True, *args, **kwargs):
        if is_main_process:
            refuse_to_overwrite_foreign_code(self, save_directory, self.config.model_type)
        result = super().save_pretrained(save_directory, is_main_process, *args, **kwargs)
        readme = Path(save_directory) / "README.md"
        if is_main_process and readme.parent.is_dir():
            if not readme.exists() or GENERATED_MARKER in readme.read_text(encoding="utf-8"):
                readme.write_text(render_model_card(self, Path(save_directory).resolve().name), encoding="utf-8")
        return result

    def _upload_modified_files(self, working_dir, repo_id, files_timestamps, *args, **kwargs):
        # push_to_hub (and save_pretrained(push_to_hub=True)) has just written the Hub's current card, or a
        # generic one, to README.md: publish the card generated from the config instead, keeping its tags.
        readme = Path(working_dir) / "README.md"
        tags = ModelCard.load(readme).data.tags if readme.exists() else None
        readme.write_text(render_model_card(self, repo_id, tags), encoding="utf-8")
        return super()._upload_modified_files(working_dir, repo_id, files_timestamps, *args, **kwargs)


__all__ = ["SelfAttnHubMixin", "refuse_missing_local_path", "render_model_card"]
