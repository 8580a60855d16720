import json
import math
import re
from pathlib import Path

import numpy
import pytest
import torch
from transformers import BertTokenizerFast

from modeling_selfattn import SelfAttnConfig, SelfAttnForConditionalGeneration, SelfAttnForSequenceClassification
from modeling_selfattn import visualize as viz

WORDS = "the a cat dog sat on mat movie was good bad not very and".split()


@pytest.fixture
def tokenizer():
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]
    return BertTokenizerFast(vocab={word: index for index, word in enumerate(vocab)})


def tiny_config(tokenizer, **overrides):
    settings = dict(
        vocab_size=len(tokenizer), hidden_size=32, num_attention_heads=4, encoder_layers=2, intermediate_size=64,
        max_position_embeddings=64, pad_token_id=0,
    )
    return SelfAttnConfig(**{**settings, **overrides})


@pytest.fixture
def classifier(tokenizer):
    torch.manual_seed(0)
    return SelfAttnForSequenceClassification(tiny_config(tokenizer)).eval()


@pytest.fixture
def translator(tokenizer):
    torch.manual_seed(0)
    config = tiny_config(
        tokenizer, decoder_layers=2, bos_token_id=2, eos_token_id=3, decoder_start_token_id=2, type_vocab_size=0
    )
    return SelfAttnForConditionalGeneration(config).eval()


def test_rows_are_probabilities_over_real_tokens(classifier, tokenizer):
    record = viz.record_attention(classifier, tokenizer, "the cat sat on the mat")
    layers, heads, queries, keys = record.attentions.shape
    assert (layers, heads) == (2, 4) and queries == keys == len(record.tokens) == 8
    torch.testing.assert_close(record.attentions.sum(-1), torch.ones(layers, heads, queries), atol=1e-5, rtol=0)
    assert record.special_mask == [True] + [False] * 6 + [True]


def test_rollout_of_identity_attention_is_identity():
    identity = torch.eye(5).expand(3, 2, 5, 5)
    torch.testing.assert_close(viz.attention_rollout(identity), torch.eye(5))


def test_rollout_composes_layers_with_the_residual():
    torch.manual_seed(0)
    attentions = torch.softmax(torch.randn(2, 3, 4, 4), dim=-1)
    expected = torch.eye(4)
    for layer in attentions:
        mixed = 0.5 * torch.eye(4) + 0.5 * layer.mean(0)
        expected = (mixed / mixed.sum(-1, keepdim=True)) @ expected
    rollout = viz.attention_rollout(attentions)
    torch.testing.assert_close(rollout, expected)
    torch.testing.assert_close(rollout.sum(-1), torch.ones(4))


def test_rank_tokens_orders_by_relevance():
    rollout = torch.tensor([[0.1, 0.6, 0.3], [0.3, 0.3, 0.4], [0.2, 0.2, 0.6]])
    assert [token for token, _ in viz.rank_tokens(rollout, ["[CLS]", "good", "movie"])] == ["good", "movie", "[CLS]"]


def test_alignment_recovers_a_hand_built_cross_attention():
    permutation = torch.tensor([3, 0, 4, 1, 2])
    torch.manual_seed(0)
    cross = torch.rand(2, 4, 5, 5) * 0.1
    cross[:, :, torch.arange(5), permutation] += 1.0
    cross = cross / cross.sum(-1, keepdim=True)
    assert torch.equal(viz.alignment(cross).argmax(-1), permutation)
    assert torch.equal(viz.alignment(cross, layer=1).argmax(-1), permutation)


def test_alignment_takes_a_layer_as_python_indexing_does_and_refuses_one_out_of_range():
    torch.manual_seed(0)
    cross = torch.rand(2, 4, 3, 5).softmax(-1)
    torch.testing.assert_close(viz.alignment(cross, layer=-1), viz.alignment(cross, layer=1))
    torch.testing.assert_close(viz.alignment(cross, layer=-2), cross[0].mean(0))
    for layer in (2, -3):
        with pytest.raises(ValueError, match=rf"^layer={layer} is out of range: this model has layers 0\.\.1"):
            viz.alignment(cross, layer=layer)


@pytest.mark.parametrize("residual_weight", [-0.1, 1.5, 2.0, float("nan"), True])
def test_rollout_refuses_a_residual_weight_outside_0_to_1(residual_weight):
    attentions = torch.rand(2, 4, 5, 5).softmax(-1)
    with pytest.raises(ValueError, match=r"residual_weight must be a number from 0 to 1"):
        viz.attention_rollout(attentions, residual_weight)


@pytest.mark.parametrize("residual_weight", [0, 1.0])
def test_rollout_takes_the_ends_of_the_residual_weight_range(residual_weight):
    attentions = torch.rand(2, 4, 5, 5).softmax(-1)
    rollout = viz.attention_rollout(attentions, residual_weight)
    assert (rollout >= 0).all()
    torch.testing.assert_close(rollout.sum(-1), torch.ones(5))


def test_head_statistics_of_uniform_attention():
    length = 6
    record = viz.AttentionRecord(
        tokens=[str(i) for i in range(length)],
        attentions=torch.full((2, 3, length, length), 1.0 / length),
        special_mask=[True] + [False] * (length - 2) + [True],
    )
    statistics = viz.head_statistics([record])
    mean_distance = sum(abs(i - j) for i in range(length) for j in range(length)) / length**2
    torch.testing.assert_close(statistics["entropy"], torch.full((2, 3), math.log(length)))
    torch.testing.assert_close(statistics["distance"], torch.full((2, 3), mean_distance))
    torch.testing.assert_close(statistics["special_share"], torch.full((2, 3), 2 / length))


def png_size(path):
    import matplotlib.image

    height, width = matplotlib.image.imread(path).shape[:2]
    return width, height


def test_visualize_writes_plots_and_numbers(classifier, tokenizer, tmp_path):
    written = viz.visualize(classifier, tokenizer, "the movie was not bad", tmp_path, layer=None)
    assert set(written) == {"heads_layer0", "heads_layer1", "rollout", "numbers"}
    assert png_size(written["heads_layer0"]) == (1280, 320)  # 4 heads in a row, 3.2 x 3.2 inches at 100 dpi
    assert png_size(written["rollout"]) == (600, 600)
    numbers = json.loads(written["numbers"].read_text())
    assert numbers["tokens"][0] == "[CLS]" and len(numbers["attentions"]) == 2
    assert len(numbers["relevance_to_first_token"]) == len(numbers["tokens"])


def test_encoder_decoder_alignment(translator, tokenizer, tmp_path):
    written = viz.visualize(translator, tokenizer, "the cat sat", tmp_path, target="a dog sat")
    numbers = json.loads(written["numbers"].read_text())
    alignment = torch.tensor(numbers["alignment"])
    assert alignment.shape == (len(numbers["target_tokens"]), len(numbers["tokens"]))
    torch.testing.assert_close(alignment.sum(-1), torch.ones(alignment.shape[0]), atol=1e-5, rtol=0)
    assert png_size(written["alignment"]) == (600, 600)


def test_statistics_plot_and_table(classifier, tokenizer, tmp_path):
    statistics = viz.visualize_statistics(classifier, tokenizer, ["the cat sat", "a dog was very good", ""], tmp_path)
    assert statistics["entropy"].shape == (2, 4)
    assert (tmp_path / "head_statistics.png").exists() and (tmp_path / "head_statistics.json").exists()
    assert len(viz.format_statistics(statistics).splitlines()) == 1 + 2 * 4


@pytest.mark.parametrize(
    "text,layer,message", [("   ", -1, "text is empty"), ("the cat", 2, "out of range"), ("the cat", -3, "out of range")]
)
def test_bad_input_is_named(classifier, tokenizer, tmp_path, text, layer, message):
    with pytest.raises(ValueError, match=message):
        viz.visualize(classifier, tokenizer, text, tmp_path, layer=layer)


def test_a_target_is_refused_for_a_model_without_a_decoder(classifier, tokenizer, tmp_path, capsys):
    with pytest.raises(ValueError, match=r"target \(--target\).*SelfAttnForSequenceClassification is not one"):
        viz.visualize(classifier, tokenizer, "the cat sat", tmp_path / "out", target="a dog sat")
    model_dir = tmp_path / "model"
    classifier.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    assert viz.main([str(model_dir), "--text", "the cat sat", "--target", "a dog", "--out", str(tmp_path / "out")]) == 2
    assert "error: A target (--target)" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def star_ratings_config(tokenizer):
    """A classifier whose classes are named by digits that are also other classes' ids: "1" to "5" as ids 0 to 4."""
    names = {index: str(index + 1) for index in range(5)}
    return tiny_config(tokenizer, num_labels=5, id2label=names, label2id={name: index for index, name in names.items()})


def test_labels_named_by_digits_are_read_as_names(tokenizer, tmp_path):
    data = tmp_path / "ratings.tsv"
    data.write_text("sentence\tlabel\nthe movie was good\t5\nthe movie was not bad\t3\nthe movie was bad\t1\n")
    labels = [label for _, label in viz.read_labelled_texts(data, star_ratings_config(tokenizer))]
    assert labels == [4, 2, 0]


def test_a_file_of_ids_whose_digits_are_also_names_is_refused(tokenizer, tmp_path):
    # "0" can only be an id, so "3" may be id 3 as well as the class named "3" (id 2): the file does not say which.
    data = tmp_path / "ratings.tsv"
    data.write_text("sentence\tlabel\nthe movie was bad\t0\nthe movie was not bad\t3\n")
    message = (
        r"label '3' \(line 3\) is the name of class 2 but also the id of class 3, and label '0' \(line 2\) is an id.*"
        r"Write every label as a name of the model's label2id"
    )
    with pytest.raises(ValueError, match=message):
        viz.read_labelled_texts(data, star_ratings_config(tokenizer))


def test_missing_attentions_are_explained():
    with pytest.raises(ValueError, match="eager"):
        viz._stack((None, None))


def test_command_line(classifier, tokenizer, tmp_path, capsys):
    model_dir = tmp_path / "model"
    classifier.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    texts = tmp_path / "texts.txt"
    texts.write_text("the cat sat\nthe movie was good\n")
    out = tmp_path / "out"
    assert viz.main([str(model_dir), "--text", "the dog sat", "--layer", "all", "--stats", str(texts), "--out", str(out)]) == 0
    assert {p.name for p in out.iterdir()} >= {"heads_layer0.png", "heads_layer1.png", "rollout.png", "attention.json"}
    assert "special_share" in capsys.readouterr().out
    assert viz.main([str(model_dir), "--layer", "7", "--out", str(out)]) == 2


@pytest.fixture
def hub_unreachable(monkeypatch):
    """Any attempt to resolve a model name, locally or on the Hub, fails the test at once."""
    import transformers

    def refuse(name, *args, **kwargs):
        raise AssertionError(f"{name!r} was looked up instead of being refused as a missing local path")

    monkeypatch.setattr(transformers.AutoConfig, "from_pretrained", refuse)


@pytest.mark.parametrize("written", ["./no_such_model", "../no_such_model", "~/no_such_model", "{tmp}/x/y/model"])
def test_a_missing_local_model_folder_is_named_at_once(hub_unreachable, tmp_path, monkeypatch, capsys, written):
    monkeypatch.chdir(tmp_path)
    written = written.format(tmp=tmp_path)
    assert viz.main([written, "--out", str(tmp_path / "out")]) == 2
    error = capsys.readouterr().err
    assert f"MODEL={written!r}" in error  # the argument, as the user wrote it
    assert f"{Path(written).expanduser().absolute()} does not exist" in error
    assert "config.json" in error and "Hub repo id" in error  # what to give instead
    assert not (tmp_path / "out").exists()


def test_a_local_folder_is_read_from_disk_even_when_the_name_could_be_a_hub_repo(
    classifier, tokenizer, tmp_path, monkeypatch
):
    folder = tmp_path / "model"
    classifier.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    monkeypatch.chdir(tmp_path)
    model, _ = viz.load_model("model")  # also a valid repo id
    assert type(model) is SelfAttnForSequenceClassification


@pytest.fixture
def saved_models(classifier, tokenizer, tmp_path):
    """{"classifier": folder, "mlm": folder} of two tiny models with their tokenizer."""
    from modeling_selfattn import SelfAttnForMaskedLM

    torch.manual_seed(0)
    models = {"classifier": classifier, "mlm": SelfAttnForMaskedLM(tiny_config(tokenizer)).eval()}
    folders = {}
    for name, model in models.items():
        folders[name] = tmp_path / name
        model.save_pretrained(folders[name])
        tokenizer.save_pretrained(folders[name])
    return folders


# What the command line refuses, and why: each is checked before the first plot is written.
COMMAND_LINE_REFUSALS = {
    "importance_of_a_masked_lm": (
        "mlm", "--importance", "the movie was good\t1\n",
        "error: --importance scores a sequence classifier from labelled texts; this model is SelfAttnForMaskedLM.",
    ),
    "importance_with_an_unknown_label": (
        "classifier", "--importance", "the movie was good\tmaybe\n",
        "line 1: label 'maybe' is neither a class id below num_labels=2 nor a name in the model's label2id "
        "['LABEL_0', 'LABEL_1']; write one of those for each label.",
    ),
    "importance_of_an_empty_file": ("classifier", "--importance", "", "holds no labelled texts"),
    "empty_stats": ("classifier", "--stats", "", "holds no text (it is empty or blank); write one text per line."),
    "blank_stats": ("classifier", "--stats", "\n  \n", "holds no text (it is empty or blank)"),
}  # fmt: skip


@pytest.mark.parametrize("case", COMMAND_LINE_REFUSALS)
def test_command_line_refuses_bad_inputs_before_writing_anything(saved_models, tmp_path, capsys, case):
    model, option, content, message = COMMAND_LINE_REFUSALS[case]
    data = tmp_path / "data.txt"
    data.write_text(content)
    out = tmp_path / "out"
    assert viz.main([str(saved_models[model]), "--layer", "all", option, str(data), "--out", str(out)]) == 2
    error = capsys.readouterr().err
    assert message in error
    if option == "--importance" and model == "classifier":
        assert f"error: --importance: {data}" in error
    assert not out.exists()  # no attention.json, heads_layer*.png or rollout.png


def test_a_layer_out_of_range_creates_no_folder(classifier, tokenizer, tmp_path):
    with pytest.raises(ValueError, match="out of range"):
        viz.visualize(classifier, tokenizer, "the cat", tmp_path / "out", layer=5)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("layer", [2.5, 1.0, True, False, "1"])
def test_a_layer_that_is_no_int_is_refused_before_the_model_runs(classifier, tokenizer, tmp_path, layer, monkeypatch):
    """layer=2.5 passed the range check and failed with an IndexError once the folder was made; layer=True drew
    layer 1."""
    monkeypatch.setattr(viz, "record_attention", lambda *args, **kwargs: pytest.fail("the model ran"))
    message = rf"^layer={re.escape(repr(layer))}: pass a layer index as an int .* got a {type(layer).__name__}\.$"
    with pytest.raises(TypeError, match=message):
        viz.visualize(classifier, tokenizer, "the cat", tmp_path / "out", layer=layer)
    assert not (tmp_path / "out").exists()
    with pytest.raises(TypeError, match=message):
        viz.alignment(torch.rand(2, 4, 3, 5).softmax(-1), layer=layer)


def test_a_layer_index_of_another_integer_type_is_taken(classifier, tokenizer, tmp_path):
    written = viz.visualize(classifier, tokenizer, "the cat", tmp_path, layer=numpy.int64(-2))
    assert "heads_layer0" in written


def record_attention_of(model, tokenizer, out_dir):
    return viz.record_attention(model, tokenizer, "the cat sat")


def visualize_of(model, tokenizer, out_dir):
    return viz.visualize(model, tokenizer, "the cat sat", out_dir)


def visualize_statistics_of(model, tokenizer, out_dir):
    return viz.visualize_statistics(model, tokenizer, ["the cat sat", "a dog"], out_dir)


@pytest.mark.parametrize("model_name", ["classifier", "translator"])
@pytest.mark.parametrize("api", [record_attention_of, visualize_of, visualize_statistics_of])
def test_the_callers_attention_implementation_is_put_back(api, model_name, tokenizer, tmp_path, request, monkeypatch):
    """The maps need eager attention; the model was left with it for good (SDPA before), also after an error."""
    model = request.getfixturevalue(model_name)
    assert model.config._attn_implementation == "sdpa"
    seen = []
    stack = viz._stack

    def recording_stack(*args, **kwargs):
        seen.append(model.config._attn_implementation)
        return stack(*args, **kwargs)

    monkeypatch.setattr(viz, "_stack", recording_stack)
    api(model, tokenizer, tmp_path)
    assert seen and set(seen) == {"eager"}  # the maps were made with eager attention
    assert model.config._attn_implementation == "sdpa"

    def failing_stack(*args, **kwargs):
        raise RuntimeError("failed while eager")

    monkeypatch.setattr(viz, "_stack", failing_stack)
    with pytest.raises(RuntimeError, match="failed while eager"):
        api(model, tokenizer, tmp_path)
    assert model.config._attn_implementation == "sdpa"


def test_command_line_lists_every_plot_it_writes(saved_models, tmp_path, capsys):
    texts, labelled = tmp_path / "texts.txt", tmp_path / "labelled.tsv"
    texts.write_text("the cat sat\nthe movie was good\n")
    labelled.write_text("the movie was good\t1\nthe movie was bad\t0\n")
    out = tmp_path / "out"
    model = str(saved_models["classifier"])
    assert viz.main([model, "--stats", str(texts), "--importance", str(labelled), "--out", str(out)]) == 0
    listed = {Path(line.split(": ", 1)[1]).name for line in capsys.readouterr().out.splitlines() if ": " in line}
    written_plots = {path.name for path in out.iterdir() if path.suffix == ".png"}
    assert written_plots == {"heads_layer1.png", "rollout.png", "head_statistics.png", "head_importance.png"}
    assert written_plots <= listed
