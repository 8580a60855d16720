"""conversion/convert_bert.py and conversion/export_bert.py as a user runs them: --help, a conversion with
--verify into a folder with tokenizer and model card, refusal to overwrite, a non-zero exit on failure, and the
export back to BERT with bit-identical tensors."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers
from safetensors.torch import load_file

from modeling_selfattn import SelfAttnForSequenceClassification

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = {name: ROOT / "conversion" / f"{name}.py" for name in ("convert_bert", "export_bert")}
WORDS = ["the", "a", "cat", "dog", "sat", "on", "mat", "and", "ran", "far", "away", "quick", "brown", "fox"]


def load_script(name: str):
    spec = importlib.util.spec_from_file_location(name, SCRIPTS[name])
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("name", sorted(SCRIPTS))
def test_help(name):
    result = subprocess.run([sys.executable, str(SCRIPTS[name]), "--help"], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr
    assert "usage:" in result.stdout and "--overwrite" in result.stdout


@pytest.fixture(scope="module")
def bert_folder(tmp_path_factory) -> Path:
    """A tiny random BertForSequenceClassification with a WordPiece tokenizer of its own vocabulary."""
    folder = tmp_path_factory.mktemp("bert")
    vocab = folder / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]) + "\n")
    transformers.BertTokenizer(str(vocab)).save_pretrained(folder)
    config = transformers.BertConfig(
        vocab_size=len(WORDS) + 5, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37,
        max_position_embeddings=32, num_labels=3,
    )
    torch.manual_seed(0)
    transformers.BertForSequenceClassification(config).save_pretrained(folder)
    return folder


def test_convert_verify_and_export_back(bert_folder, tmp_path, capsys):
    converted, exported = tmp_path / "selfattn", tmp_path / "bert"
    assert load_script("convert_bert").main([str(bert_folder), str(converted), "--verify"]) == 0
    printed = capsys.readouterr().out
    assert "BertForSequenceClassification -> SelfAttnForSequenceClassification" in printed
    assert "max abs diff last_hidden_state" in printed and "max abs diff logits" in printed
    assert {"vocab.txt", "tokenizer_config.json", "README.md", "model.safetensors"} <= {p.name for p in converted.iterdir()}
    assert "| logits |" in (converted / "README.md").read_text()
    assert SelfAttnForSequenceClassification.from_pretrained(converted).config.num_labels == 3

    assert load_script("export_bert").main([str(converted), str(exported)]) == 0
    original, back = load_file(bert_folder / "model.safetensors"), load_file(exported / "model.safetensors")
    assert sorted(original) == sorted(back)
    assert all(torch.equal(original[name], back[name]) for name in original)
    assert json.loads((exported / "config.json").read_text())["architectures"] == ["BertForSequenceClassification"]
    assert (exported / "vocab.txt").read_text() == (bert_folder / "vocab.txt").read_text()


def test_existing_output_needs_overwrite(bert_folder, tmp_path, capsys):
    output = tmp_path / "out"
    output.mkdir()
    (output / "keep.txt").write_text("not a model")
    convert = load_script("convert_bert")
    assert convert.main([str(bert_folder), str(output)]) == 2
    assert "--overwrite" in capsys.readouterr().err and (output / "keep.txt").exists()
    assert convert.main([str(bert_folder), str(output), "--overwrite"]) == 0
    assert not (output / "keep.txt").exists()
    assert load_script("export_bert").main([str(output), str(output)]) == 2


def test_failures_exit_non_zero(bert_folder, tmp_path, capsys):
    convert = load_script("convert_bert")
    assert convert.main([str(bert_folder), str(tmp_path / "a"), "--architecture", "BertForMaskedLM"]) == 1
    error = capsys.readouterr().err
    assert "classifier.weight" in error and "BertForSequenceClassification" in error
    assert convert.main([str(tmp_path / "missing"), str(tmp_path / "b")]) == 1
    assert "not a local folder" in capsys.readouterr().err
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
