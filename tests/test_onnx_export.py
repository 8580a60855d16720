"""`selfattn-convert onnx` (modeling_selfattn/onnx_export.py): every encoder head exported and run with ONNX Runtime
on padded batches of other sizes than traced, against the PyTorch model loaded as users load it (SDPA attention, so
the unpadded path too) within 1e-4; the padding rule kept in the graph; ONNX Runtime's BERT fusions on the exported
graph; greedy decoding through the encoder-decoder's and the causal LM's graphs token-identical to generate(); and
the refusals of the command. Skipped without onnx and onnxruntime (`pip install 'selfattn[onnx]'`)."""

import errno
import json
import os
from pathlib import Path

import pytest
import torch
import transformers

pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

import modeling_selfattn  # noqa: E402
from conftest import (  # noqa: E402
    EOS_TOKEN_ID,
    PAD_TOKEN_ID,
    WORD_PIECE_VOCAB_SIZE,
    make_tiny_config,
    save_word_piece_tokenizer,
)
from modeling_selfattn import convert_cli, onnx_export, output_folder  # noqa: E402
from modeling_selfattn.heads import HEADS  # noqa: E402
from modeling_selfattn.model import SelfAttnEncoderHeadModel  # noqa: E402

TOLERANCE = 1e-4  # ONNX Runtime against PyTorch, fp32


def session(path: Path):
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def run(onnx_session, **inputs) -> dict[str, torch.Tensor]:
    names = [output.name for output in onnx_session.get_outputs()]
    values = onnx_session.run(None, {name: tensor.numpy() for name, tensor in inputs.items()})
    return {name: torch.from_numpy(value) for name, value in zip(names, values)}


def padded_batch(
    config, batch_size: int, length: int, seed: int, choices: int | None = None, left: bool = False
) -> dict:
    """Random ids with rows of different lengths (row 0 full, the last a third as long), padding at the end (at the
    start with `left`)."""
    generator = torch.Generator().manual_seed(seed)
    lengths = torch.linspace(length, max(1, length // 3), batch_size).round().long()
    mask = (torch.arange(length) < lengths.unsqueeze(1)).long()
    if left:
        mask = mask.flip(-1)
    shape = (batch_size, length) if choices is None else (batch_size, choices, length)
    if choices is not None:
        mask = mask.unsqueeze(1).expand(shape).contiguous()
    ids = torch.randint(3, config.vocab_size, shape, generator=generator).masked_fill(mask == 0, PAD_TOKEN_ID)
    batch = {"input_ids": ids, "attention_mask": mask}
    if config.type_vocab_size > 0:
        batch["token_type_ids"] = torch.randint(0, config.type_vocab_size, shape, generator=generator) * mask
    return batch


def saved_model(class_name: str, shape: str, folder: Path, heads_to_prune: dict | None = None, **overrides) -> Path:
    torch.manual_seed(0)
    config = make_tiny_config(shape, num_labels=3, **overrides)
    model = getattr(modeling_selfattn, class_name)(config)
    if heads_to_prune:
        model.prune_heads(heads_to_prune)
    model.save_pretrained(folder)
    return folder


def encoder_head_names() -> set[str]:
    return {
        head.class_name
        for head in HEADS
        if issubclass(getattr(modeling_selfattn, head.class_name), SelfAttnEncoderHeadModel)
    } | {"SelfAttnModel"}


def test_every_head_is_exported():
    """A head added to heads.HEADS must get its ONNX outputs here, or this fails."""
    assert set(onnx_export.ENCODER_HEAD_OUTPUTS) == encoder_head_names()
    assert set(onnx_export.SUPPORTED_CLASSES) == {head.class_name for head in HEADS}


@pytest.mark.parametrize("class_name", sorted(onnx_export.ENCODER_HEAD_OUTPUTS))
def test_encoder_head_matches_pytorch_on_other_shapes(class_name, tmp_path):
    # Dropout on in the config: the graph must be of the model in eval mode, and export must leave it so.
    folder = saved_model(class_name, "encoder", tmp_path / "model", hidden_dropout_prob=0.1, attention_dropout=0.1)
    model = onnx_export.load_for_export(folder)
    assert model.config._attn_implementation == "eager"
    onnx_export.export_onnx(model, tmp_path)
    assert not model.training
    reference = getattr(modeling_selfattn, class_name).from_pretrained(folder).eval()  # SDPA, as users load it
    assert reference.config._attn_implementation == "sdpa"
    onnx_session = session(tmp_path / "model.onnx")
    names = [entry.name for entry in onnx_session.get_inputs()]
    assert names == ["input_ids", "attention_mask", "token_type_ids"]
    expected_outputs = set(onnx_export.ENCODER_HEAD_OUTPUTS[class_name])
    assert {entry.name for entry in onnx_session.get_outputs()} == expected_outputs
    choices = 3 if class_name == "SelfAttnForMultipleChoice" else None
    for batch_size, length, seed in ((3, 9, 1), (1, 4, 2)):  # traced: batch 2, length 6
        inputs = padded_batch(model.config, batch_size, length, seed, choices)
        produced = run(onnx_session, **inputs)
        with torch.no_grad():
            expected = reference(**inputs)
        for name, value in produced.items():
            assert value.shape == expected[name].shape, name
            assert (value - expected[name]).abs().max().item() <= TOLERANCE, name


def test_graph_keeps_padding_rule_and_needs_no_token_types(tmp_path):
    """Where attention_mask is 0, last_hidden_state is the embedding output; a model without token types has no
    token_type_ids input."""
    folder = saved_model("SelfAttnModel", "encoder", tmp_path / "model", type_vocab_size=0)
    model = modeling_selfattn.SelfAttnModel.from_pretrained(folder).eval()  # SDPA: the export traces eager attention
    report = onnx_export.export_onnx(model, tmp_path, optimize=True)
    assert report.fused_operators["Attention"] == model.config.encoder_layers
    assert model.config._attn_implementation == "sdpa"  # as it was
    inputs = padded_batch(model.config, 4, 10, seed=3)
    for name in ("model.onnx", "model_optimized.onnx"):
        onnx_session = session(tmp_path / name)
        assert [entry.name for entry in onnx_session.get_inputs()] == ["input_ids", "attention_mask"]
        hidden = run(onnx_session, **inputs)["last_hidden_state"]
        with torch.no_grad():
            embeddings = model.encoder.embeddings(inputs["input_ids"])
        padding = inputs["attention_mask"] == 0
        assert padding.sum() > 0
        assert (hidden[padding] - embeddings[padding]).abs().max().item() <= 1e-5, name
        assert not torch.allclose(hidden[~padding], embeddings[~padding], atol=1e-2), name


def test_optimized_graph_of_a_pruned_model_matches(tmp_path):
    """Layers with pruned heads hold fewer heads than the config's count, which the attention fusion must not assume:
    fused with it, the graph gave outputs 0.76 off; read from the graph, attention stays unfused and correct."""
    folder = saved_model("SelfAttnModel", "encoder", tmp_path / "model", initializer_range=0.2)
    model = modeling_selfattn.SelfAttnModel.from_pretrained(folder).eval()
    model.prune_heads({0: [1], 1: [0, 2]})
    report = onnx_export.export_onnx(model, tmp_path, optimize=True)
    assert "Attention" not in report.fused_operators and report.fused_operators["SkipLayerNormalization"]
    inputs = padded_batch(model.config, 3, 9, seed=4)
    with torch.no_grad():
        expected = model(**inputs).last_hidden_state
    hidden = run(session(tmp_path / "model_optimized.onnx"), **inputs)["last_hidden_state"]
    assert (hidden - expected).abs().max().item() <= TOLERANCE


def test_optimized_graph_matches_on_left_padding(tmp_path):
    """ONNX Runtime's BERT optimizer by default hands the fused Attention the mask's row sums, which assumes right
    padding: on left-padded rows model_optimized.onnx was 2.50 off on these logits at real tokens. With the raw mask
    the fusions are the same and the outputs right on both sides."""
    folder = saved_model("SelfAttnForTokenClassification", "encoder", tmp_path / "model", initializer_range=0.2)
    model = modeling_selfattn.SelfAttnForTokenClassification.from_pretrained(folder).eval()  # SDPA, as users load it
    report = onnx_export.export_onnx(model, tmp_path, optimize=True)
    layers = model.config.encoder_layers
    assert report.fused_operators["Attention"] == layers and report.fused_operators["BiasGelu"] == layers
    assert report.fused_operators["SkipLayerNormalization"] == 2 * layers
    for left in (True, False):
        inputs = padded_batch(model.config, 4, 10, seed=5, left=left)
        assert (inputs["attention_mask"][:, 0] == 0).any() == left
        with torch.no_grad():
            expected = model(**inputs).logits
        for name in ("model.onnx", "model_optimized.onnx"):
            logits = run(session(tmp_path / name), **inputs)["logits"]
            assert (logits - expected).abs().max().item() <= TOLERANCE, (name, left)


def test_export_check_catches_a_graph_that_assumes_right_padding(tmp_path, monkeypatch):
    """The export's own check runs a left-padded row too: optimized with BERT's default mask (lengths, right padding
    only), model_optimized.onnx is refused rather than written."""
    from onnxruntime.transformers import optimizer
    from onnxruntime.transformers.fusion_options import FusionOptions

    optimize_model = optimizer.optimize_model

    def right_padding_only(*args, optimization_options=None, **kwargs):
        return optimize_model(*args, optimization_options=FusionOptions("bert"), **kwargs)

    monkeypatch.setattr(optimizer, "optimize_model", right_padding_only)
    model = onnx_export.load_for_export(
        saved_model("SelfAttnModel", "encoder", tmp_path / "model", initializer_range=0.2)
    )
    folder = tmp_path / "onnx"
    folder.mkdir()
    with pytest.raises(onnx_export.ConversionError, match=r"beyond --tolerance .*model_optimized\.onnx "):
        onnx_export.export_onnx(model, folder, optimize=True)
    assert not list(folder.iterdir())


@pytest.fixture(scope="module")
def classifier_folder(tmp_path_factory) -> Path:
    """A tiny SelfAttnForSequenceClassification with a WordPiece tokenizer of its own vocabulary."""
    folder = tmp_path_factory.mktemp("classifier")
    save_word_piece_tokenizer(folder)
    return saved_model("SelfAttnForSequenceClassification", "encoder", folder, vocab_size=WORD_PIECE_VOCAB_SIZE)


def test_cli_optimize_fuses_and_matches(classifier_folder, tmp_path, capsys):
    output = tmp_path / "onnx"
    assert convert_cli.main(["onnx", str(classifier_folder), str(output), "--optimize"]) == 0
    printed = capsys.readouterr().out
    assert "model.onnx, ONNX Runtime vs PyTorch, max abs diff: logits " in printed
    assert "model_optimized.onnx, ONNX Runtime vs PyTorch, max abs diff: logits " in printed
    assert "fused by ONNX Runtime's optimizer: " in printed
    written = {path.name for path in output.iterdir()}
    assert {"model.onnx", "model_optimized.onnx", "config.json", "vocab.txt", "tokenizer_config.json"} <= written
    assert json.loads((output / "config.json").read_text())["architectures"] == ["SelfAttnForSequenceClassification"]

    import onnx
    from onnxruntime.transformers.onnx_model import OnnxModel

    operators = {node.op_type for node in OnnxModel(onnx.load(output / "model_optimized.onnx")).nodes()}
    config = transformers.AutoConfig.from_pretrained(output)
    assert {"Attention", "SkipLayerNormalization", "LayerNormalization"} <= operators
    assert operators & {"Gelu", "BiasGelu", "FastGelu"}
    # The classifier reads the first token alone, so its last layer attends from that one query, which ORT's
    # optimizer leaves unfused; every other layer's attention is one Attention node.
    assert sum(node.op_type == "Attention" for node in onnx.load(output / "model_optimized.onnx").graph.node) == (
        config.encoder_layers - 1
    )

    # What an ONNX Runtime user does: tokenize with OUTPUT's tokenizer, run the graphs.
    tokenizer = transformers.AutoTokenizer.from_pretrained(output)
    texts = ["the quick brown fox ran far away and the dog sat on the mat", "a cat", "the dog ran"]
    inputs = tokenizer(texts, padding=True, return_tensors="pt")
    reference = modeling_selfattn.SelfAttnForSequenceClassification.from_pretrained(classifier_folder).eval()
    with torch.no_grad():
        expected = reference(**inputs).logits
    for name in ("model.onnx", "model_optimized.onnx"):
        logits = run(session(output / name), **inputs)["logits"]
        assert (logits - expected).abs().max().item() <= TOLERANCE, name


def test_cli_overwrite_refuses_an_earlier_export_that_holds_other_entries(classifier_folder, tmp_path, capsys):
    """--overwrite replaced an earlier export's folder whole: entries `onnx` does not write (the user's notes, an
    eval/ folder, a README.md, which `onnx` writes none of) are refused before any work, named; moved out, the
    earlier export is replaced."""
    output = tmp_path / "onnx"
    assert convert_cli.main(["onnx", str(classifier_folder), str(output)]) == 0
    (output / "notes.txt").write_text("my notes")
    (output / "README.md").write_text("# my ONNX model\n")
    (output / "eval").mkdir()
    (output / "eval" / "latency.csv").write_text("batch,ms\n1,2\n")
    before = {path: path.read_bytes() for path in tmp_path.rglob("*") if path.is_file()}
    capsys.readouterr()
    assert convert_cli.main(["onnx", str(classifier_folder), str(output), "--overwrite"]) == 2
    error = capsys.readouterr()
    assert error.out == "" and error.err == (
        f"error: OUTPUT {output} holds an earlier selfattn-convert onnx run's output, but also entries no "
        "selfattn-convert onnx run writes: README.md, eval/, notes.txt. --overwrite replaces the folder as a whole, "
        f"which would delete them. Move them out of {output} first, or pass a new OUTPUT.\n"
    )
    assert {path: path.read_bytes() for path in tmp_path.rglob("*") if path.is_file()} == before
    for name in ("notes.txt", "README.md", "eval"):
        (output / name).rename(tmp_path / name)
    assert convert_cli.main(["onnx", str(classifier_folder), str(output), "--overwrite"]) == 0
    assert sorted(path.name for path in tmp_path.iterdir()) == ["README.md", "eval", "notes.txt", "onnx"]


def test_cli_overwrite_replaces_an_earlier_export_with_its_external_data(classifier_folder, tmp_path, capsys):
    """A graph over 2 GB keeps its tensors in files beside it, named after the tensors: an earlier export's are its
    own (read from its graphs), so --overwrite replaces them with it; a file no graph names is not."""
    import onnx

    output = tmp_path / "onnx"
    assert convert_cli.main(["onnx", str(classifier_folder), str(output), "--optimize"]) == 0
    graph = onnx.load(output / "model.onnx")
    onnx.save_model(graph, output / "model.onnx", save_as_external_data=True, all_tensors_to_one_file=False,
                    size_threshold=0)  # fmt: skip
    data_files = {path.name for path in output.iterdir()} - {path.name for path in classifier_folder.iterdir()}
    data_files -= {"model.onnx", "model_optimized.onnx"}
    assert len(data_files) > 5, data_files
    (output / "stray.bin").write_bytes(b"not named by any graph")
    capsys.readouterr()
    assert convert_cli.main(["onnx", str(classifier_folder), str(output), "--overwrite"]) == 2
    assert "entries no selfattn-convert onnx run writes: stray.bin. --overwrite" in capsys.readouterr().err
    (output / "stray.bin").unlink()
    assert convert_cli.main(["onnx", str(classifier_folder), str(output), "--overwrite"]) == 0
    assert not data_files & {path.name for path in output.iterdir()}
    assert "model_optimized.onnx" not in {path.name for path in output.iterdir()}


def test_cli_overwrite_replaces_an_earlier_encoder_decoder_export(tmp_path):
    """The encoder-decoder's three graphs and generation settings are the command's own."""
    model = saved_model("SelfAttnForConditionalGeneration", "encoder_decoder", tmp_path / "model")
    output = tmp_path / "onnx"
    assert convert_cli.main(["onnx", str(model), str(output)]) == 0
    written = sorted(path.name for path in output.iterdir())
    graphs = {"encoder_model.onnx", "decoder_model.onnx", "decoder_with_past_model.onnx"}
    assert graphs | {"generation_config.json"} <= set(written)
    assert convert_cli.main(["onnx", str(model), str(output), "--overwrite"]) == 0
    assert sorted(path.name for path in output.iterdir()) == written


def as_past(output_name: str) -> str:
    """A cache output's name as the next step's input (present.0.decoder.key -> past_key_values.0.decoder.key)."""
    return output_name.replace("present.", "past_key_values.", 1)


def greedy_seq2seq(folder: Path, input_ids, attention_mask, max_new_tokens: int, config):
    """Greedy decoding the way an ONNX Runtime user runs the three graphs: the encoder once, decoder_model.onnx for
    the first step, decoder_with_past_model.onnx with the cache after it; finished rows get padding. Returns the
    tokens and each step's next-token logits."""
    encoder, decoder, with_past = (
        session(folder / name) for name in ("encoder_model.onnx", "decoder_model.onnx", "decoder_with_past_model.onnx")
    )
    hidden = run(encoder, input_ids=input_ids, attention_mask=attention_mask)["last_hidden_state"]
    tokens = torch.full((input_ids.shape[0], 1), config.decoder_start_token_id)
    outputs = run(decoder, input_ids=tokens, encoder_attention_mask=attention_mask, encoder_hidden_states=hidden)
    cross = {as_past(name): value for name, value in outputs.items() if ".encoder." in name}
    finished = torch.zeros(input_ids.shape[0], dtype=torch.bool)
    step_logits = []
    for step in range(max_new_tokens):
        step_logits.append(outputs["logits"][:, -1])
        next_tokens = step_logits[-1].argmax(-1).masked_fill(finished, config.pad_token_id)
        tokens = torch.cat([tokens, next_tokens[:, None]], dim=1)
        finished |= next_tokens == config.eos_token_id
        if finished.all() or step == max_new_tokens - 1:
            return tokens, step_logits
        past = {as_past(name): value for name, value in outputs.items() if ".decoder." in name}
        outputs = run(with_past, input_ids=next_tokens[:, None], encoder_attention_mask=attention_mask, **past, **cross)
    return tokens, step_logits


def greedy_generate(model, max_new_tokens: int, **inputs) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
    """generate()'s greedy tokens and each step's next-token logits (before any logits processor)."""
    with torch.no_grad():
        generated = model.generate(
            **inputs, do_sample=False, num_beams=1, max_new_tokens=max_new_tokens, output_logits=True,
            return_dict_in_generate=True,
        )
    return generated.sequences, generated.logits


def assert_same_greedy_decoding(produced, produced_logits, expected, expected_logits):
    """Token-identical, and every step's logits within TOLERANCE."""
    assert torch.equal(produced, expected)
    assert len(produced_logits) == len(expected_logits)
    for step, (value, reference) in enumerate(zip(produced_logits, expected_logits)):
        assert (value - reference).abs().max().item() <= TOLERANCE, step


# Attentions left different numbers of heads (self- and cross-attention, and per layer), none without heads (those are
# refused, test_refuses_a_model_with_an_attention_without_heads). The export traced the empty first-step cache with
# config.num_attention_heads heads for every layer (RuntimeError "Sizes of tensors must match"), and gave the decoder
# with past encoder states as wide as layer 0's cross-attention keys (refused as "24 wide but this model is 32 wide").
SEQ2SEQ_PRUNING = {
    "encoder.0": [1], "decoder.0": [0, 2], "decoder.1": [3], "decoder.0.cross_attn": [3], "decoder.1.cross_attn": [0, 1]
}
CAUSAL_LM_PRUNING = {0: [1], 1: [0, 2, 3]}


@pytest.mark.parametrize("heads_to_prune", [None, SEQ2SEQ_PRUNING], ids=["all_heads", "pruned"])
def test_seq2seq_greedy_through_onnx_runtime_equals_generate(heads_to_prune, tmp_path):
    # Larger weights than the default: logits far apart, so that float rounding cannot flip a greedy choice.
    folder = saved_model(
        "SelfAttnForConditionalGeneration", "encoder_decoder", tmp_path / "model", heads_to_prune,
        initializer_range=0.2,
    )
    model = onnx_export.load_for_export(folder)
    assert (model.config.pruned_heads or None) == heads_to_prune
    report = onnx_export.export_onnx(model, tmp_path)
    assert report.files == ["encoder_model.onnx", "decoder_model.onnx", "decoder_with_past_model.onnx"]
    assert max(report.differences.values()) <= TOLERANCE
    with_past = session(tmp_path / "decoder_with_past_model.onnx")
    layers = range(model.config.decoder_layers)
    assert [entry.name for entry in with_past.get_outputs()] == ["logits"] + [
        f"present.{layer}.decoder.{part}" for layer in layers for part in ("key", "value")
    ]
    reference = modeling_selfattn.SelfAttnForConditionalGeneration.from_pretrained(folder).eval()
    batch = padded_batch(model.config, 3, 11, seed=4)
    expected, expected_logits = greedy_generate(
        reference, 10, input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
    )
    produced, produced_logits = greedy_seq2seq(
        tmp_path, batch["input_ids"], batch["attention_mask"], 10, model.config
    )
    assert expected.shape[1] > 3
    assert_same_greedy_decoding(produced, produced_logits, expected, expected_logits)


@pytest.mark.parametrize("heads_to_prune", [None, CAUSAL_LM_PRUNING], ids=["all_heads", "pruned"])
def test_causal_lm_greedy_through_onnx_runtime_equals_generate(heads_to_prune, tmp_path):
    folder = saved_model("SelfAttnForCausalLM", "decoder", tmp_path / "model", heads_to_prune, initializer_range=0.2)
    model = onnx_export.load_for_export(folder)
    report = onnx_export.export_onnx(model, tmp_path)
    assert max(report.differences.values()) <= TOLERANCE
    onnx_session = session(tmp_path / "model.onnx")
    # Left-padded prompts, as generate() wants them for decoder-only models.
    prompts = torch.tensor([[5, 6, 7, 8, 9], [PAD_TOKEN_ID, PAD_TOKEN_ID, 10, 11, 12]])
    mask = (prompts != PAD_TOKEN_ID).long()
    reference = modeling_selfattn.SelfAttnForCausalLM.from_pretrained(folder).eval()
    expected, expected_logits = greedy_generate(reference, 8, input_ids=prompts, attention_mask=mask)

    tokens, new = prompts, prompts
    past = {  # empty at the first step, with each layer's own head count
        f"past_key_values.{layer}.{part}": torch.zeros(
            2, len(model.config.kept_heads(f"decoder.{layer}")), 0, model.config.head_dim
        )
        for layer in range(model.config.decoder_layers)
        for part in ("key", "value")
    }
    finished = torch.zeros(2, dtype=torch.bool)
    produced_logits = []
    for _ in range(8):
        positions = (mask.cumsum(-1) - 1).clamp(min=0)[:, -new.shape[1] :]
        outputs = run(onnx_session, input_ids=new, attention_mask=mask, position_ids=positions, **past)
        produced_logits.append(outputs["logits"][:, -1])
        new = produced_logits[-1].argmax(-1).masked_fill(finished, PAD_TOKEN_ID)[:, None]
        finished |= new[:, 0] == EOS_TOKEN_ID
        tokens, mask = torch.cat([tokens, new], dim=1), torch.cat([mask, torch.ones_like(new)], dim=1)
        past = {as_past(name): value for name, value in outputs.items() if name != "logits"}
        if finished.all():
            break
    assert_same_greedy_decoding(tokens, produced_logits, expected, expected_logits)


def test_api_replaces_files_only_when_told_and_only_after_the_check(tmp_path, monkeypatch):
    model = onnx_export.load_for_export(saved_model("SelfAttnForSequenceClassification", "encoder", tmp_path / "model"))
    folder = tmp_path / "onnx"
    folder.mkdir()
    (folder / "model.onnx").write_bytes(b"the user's own graph")
    (folder / "notes.txt").write_text("the user's")
    with pytest.raises(FileExistsError, match=r"onnx.* holds model.onnx already. Pass overwrite=True"):
        onnx_export.export_onnx(model, folder)
    with pytest.raises(NotADirectoryError, match="missing' is not an existing folder"):
        onnx_export.export_onnx(model, tmp_path / "missing")

    checked = onnx_export.max_differences
    monkeypatch.setattr(  # a difference beyond any tolerance, found once every graph is written
        onnx_export, "max_differences", lambda spec, path: dict.fromkeys(checked(spec, path), 1.0)
    )
    with pytest.raises(onnx_export.ConversionError, match="nothing is written"):
        onnx_export.export_onnx(model, folder, optimize=True, overwrite=True)
    assert sorted(path.name for path in folder.iterdir()) == ["model.onnx", "notes.txt"]  # no file left behind
    assert (folder / "model.onnx").read_bytes() == b"the user's own graph"

    monkeypatch.setattr(onnx_export, "max_differences", checked)
    report = onnx_export.export_onnx(model, folder, optimize=True, overwrite=True)
    assert sorted(path.name for path in folder.iterdir()) == ["model.onnx", "model_optimized.onnx", "notes.txt"]
    assert report.files == ["model.onnx", "model_optimized.onnx"]
    assert [entry.name for entry in session(folder / "model.onnx").get_outputs()] == ["logits"]
    assert (folder / "notes.txt").read_text() == "the user's"

    (folder / "model.onnx").unlink()
    (folder / "model.onnx").mkdir()
    with pytest.raises(FileExistsError, match="model.onnx, not as plain files"):
        onnx_export.export_onnx(model, folder, overwrite=True)


@pytest.mark.parametrize(
    "options,error,message",
    [({"overwrite": "no"}, TypeError, r"overwrite='no'\): overwrite must be True or False"),
     ({"overwrite": 1}, TypeError, r"overwrite=1\): overwrite must be True or False"),
     ({"optimize": "no"}, TypeError, r"optimize='no'\): optimize must be True or False"),
     ({"tolerance": "1e-4"}, TypeError, r"tolerance='1e-4'\): tolerance must be a number, .* e\.g\. tolerance=1e-4"),
     ({"tolerance": True}, TypeError, r"tolerance=True\): tolerance must be a number"),
     ({"tolerance": -1.0}, ValueError, r"tolerance=-1\.0\): tolerance must be a number >= 0"),
     ({"tolerance": float("nan")}, ValueError, r"tolerance=nan\): tolerance must be a number >= 0")],
    ids=["overwrite_str", "overwrite_int", "optimize_str", "tolerance_str", "tolerance_bool", "tolerance_negative",
         "tolerance_nan"],
)
def test_api_refuses_bad_options_before_exporting(tmp_path, options, error, message):
    model = onnx_export.load_for_export(saved_model("SelfAttnForSequenceClassification", "encoder", tmp_path / "model"))
    folder = tmp_path / "onnx"
    folder.mkdir()
    (folder / "model.onnx").write_bytes(b"the user's own graph")
    with pytest.raises(error, match=rf"^export_onnx\({message}"):
        onnx_export.export_onnx(model, folder, **options)
    assert sorted(path.name for path in folder.iterdir()) == ["model.onnx"]
    assert (folder / "model.onnx").read_bytes() == b"the user's own graph"


def test_failure_while_moving_in_leaves_the_previous_export_whole(tmp_path, monkeypatch):
    """overwrite=True over an earlier export: a move that fails after another has succeeded (disk full, permissions)
    puts everything back, so the folder holds the earlier export whole, not the new model.onnx beside the old
    model_optimized.onnx."""
    model = onnx_export.load_for_export(saved_model("SelfAttnForSequenceClassification", "encoder", tmp_path / "model"))
    folder = tmp_path / "onnx"
    folder.mkdir()
    previous = {
        "model.onnx": b"the earlier graph", "model_optimized.onnx": b"its optimized graph", "notes.txt": b"mine"
    }
    for name, content in previous.items():
        (folder / name).write_bytes(content)

    replace = os.replace

    def full_disk_on_the_second_file(source, destination):
        moving_in = Path(source).parent.name.startswith(".onnx.partial")
        if moving_in and Path(destination) == folder / "model_optimized.onnx":
            raise OSError(errno.ENOSPC, "No space left on device", str(destination))
        replace(source, destination)

    monkeypatch.setattr(os, "replace", full_disk_on_the_second_file)
    with pytest.raises(OSError, match="No space left on device"):
        onnx_export.export_onnx(model, folder, optimize=True, overwrite=True)
    assert {path.name: path.read_bytes() for path in folder.iterdir()} == previous  # and no hidden folder left

    monkeypatch.setattr(os, "replace", replace)
    onnx_export.export_onnx(model, folder, optimize=True, overwrite=True)
    assert sorted(path.name for path in folder.iterdir()) == sorted(previous)
    assert (folder / "notes.txt").read_bytes() == b"mine"
    assert [entry.name for entry in session(folder / "model_optimized.onnx").get_outputs()] == ["logits"]


def test_failure_to_put_the_previous_export_back_says_where_it_is(tmp_path, monkeypatch):
    folder, staging = tmp_path / "onnx", tmp_path / "onnx" / ".staging"
    staging.mkdir(parents=True)
    for name in ("a.onnx", "b.onnx"):
        (folder / name).write_text(f"old {name}")
        (staging / name).write_text(f"new {name}")
    replace, calls = os.replace, []

    def failing(source, destination):
        calls.append(Path(destination))
        if len(calls) == 4 or len(calls) > 5:  # b.onnx moving in, and the old a.onnx moving back
            raise OSError(errno.EIO, "Input/output error")
        replace(source, destination)

    monkeypatch.setattr(os, "replace", failing)
    with pytest.raises(OSError, match=r"the previous files are in .*\.onnx\.old-.*: move them back .* by hand"):
        output_folder.swap_files_in(staging, folder, ["a.onnx", "b.onnx"])
    aside = next(folder.glob(".onnx.old-*"))
    assert sorted(path.read_text() for path in aside.iterdir()) == ["old a.onnx", "old b.onnx"]


# ---------------------------------------------------------------------------------------------------------------
# Refusals: a clear error, exit status 1, nothing written


def refused(argv: list[str], capsys) -> str:
    assert convert_cli.main(argv) == 1
    return capsys.readouterr().err


def test_refuses_a_folder_without_a_model(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    error = refused(["onnx", str(tmp_path / "empty"), str(tmp_path / "out")], capsys)
    assert "has no config.json" in error and "selfattn model folder" in error
    error = refused(["onnx", str(tmp_path / "missing"), str(tmp_path / "out")], capsys)
    assert "is not a folder" in error
    assert not (tmp_path / "out").exists()


def test_refuses_other_checkpoints_and_classes(tmp_path, capsys):
    bert = tmp_path / "bert"
    bert_config = transformers.BertConfig(vocab_size=20, hidden_size=32, num_hidden_layers=1, num_attention_heads=4)
    bert_config.save_pretrained(bert)
    error = refused(["onnx", str(bert), str(tmp_path / "out")], capsys)
    assert "'bert' checkpoint" in error and "selfattn-convert bert" in error

    bare_seq2seq = saved_model("SelfAttnModel", "encoder_decoder", tmp_path / "bare")
    error = refused(["onnx", str(bare_seq2seq), str(tmp_path / "out")], capsys)
    assert "without an LM head" in error and "SelfAttnForConditionalGeneration" in error

    config = json.loads((bare_seq2seq / "config.json").read_text())
    config["architectures"] = ["SelfAttnForSomethingElse"]
    (bare_seq2seq / "config.json").write_text(json.dumps(config))
    error = refused(["onnx", str(bare_seq2seq), str(tmp_path / "out")], capsys)
    assert "SelfAttnForSomethingElse, which is not a selfattn head" in error and "SelfAttnForMaskedLM" in error

    causal = saved_model("SelfAttnForCausalLM", "decoder", tmp_path / "causal")
    error = refused(["onnx", str(causal), str(tmp_path / "out"), "--optimize"], capsys)
    assert "--optimize" in error and "SelfAttnForCausalLM" in error
    assert not (tmp_path / "out").exists()
    assert not list(tmp_path.glob(".out.*"))  # no partial folder left behind


def test_refuses_a_model_with_an_attention_without_heads(tmp_path, capsys):
    """torch's TorchScript exporter crashes the process (floating point exception) on an attention whose heads were all
    pruned, leaving the staging folders behind: such a model is refused before anything is traced or written."""
    torch.manual_seed(0)
    translator = modeling_selfattn.SelfAttnForConditionalGeneration(
        make_tiny_config("encoder_decoder", type_vocab_size=0)
    )
    translator.prune_heads({"encoder.0": [1], "decoder.1.cross_attn": [0, 1, 2, 3]})
    with pytest.raises(onnx_export.ConversionError, match=r"lost all their heads, and decoder\.1\.cross_attn did"):
        onnx_export.check_exportable(translator)
    folder = tmp_path / "onnx"
    folder.mkdir()
    with pytest.raises(onnx_export.ConversionError, match="Keep at least one head in each attention"):
        onnx_export.export_onnx(translator, folder)
    assert not list(folder.iterdir())

    classifier = saved_model("SelfAttnForSequenceClassification", "encoder", tmp_path / "model")
    model = modeling_selfattn.SelfAttnForSequenceClassification.from_pretrained(classifier)
    model.prune_heads({0: [1], 1: [0, 1, 2, 3]})
    model.save_pretrained(tmp_path / "pruned")
    error = refused(["onnx", str(tmp_path / "pruned"), str(tmp_path / "out"), "--optimize"], capsys)
    assert "encoder.1 did (config.pruned_heads)" in error and "floating point exception" in error
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.*"))


@pytest.mark.parametrize("quantized", ["int8", "int8_encoder_only", "bf16"])
def test_refuses_quantized_models_before_tracing(quantized, tmp_path, capsys, monkeypatch):
    """torch's exporter has no ONNX operator for int8 layers (the trace failed, reported as a gap in the export), and
    ONNX Runtime's CPU provider no bfloat16 kernels (the check failed with its NOT_IMPLEMENTED): both refused before
    anything is traced, with the fix."""
    monkeypatch.setattr(onnx_export, "export_graph", lambda spec, folder: pytest.fail("traced"))
    torch.manual_seed(0)
    model = modeling_selfattn.SelfAttnForTokenClassification(make_tiny_config("encoder", num_labels=3)).eval()
    if quantized == "int8_encoder_only":
        model.model.encoder.quantize("int8")
    else:
        model.quantize(quantized)
    if quantized == "bf16":
        message = r"does not take bfloat16 models, .* quantized with model\.quantize\('bf16'\) .* Export the float32"
    else:
        message = r"does not take int8 models, .* holds int8 layers \(.*\) .*quantize_dynamic\("
    with pytest.raises(onnx_export.ConversionError, match=message):
        onnx_export.check_exportable(model)
    folder = tmp_path / "onnx"
    folder.mkdir()
    with pytest.raises(onnx_export.ConversionError, match=message):
        onnx_export.export_onnx(model, folder)
    assert not list(folder.iterdir())
    if quantized == "bf16":  # a folder saved in bfloat16 loads as bfloat16
        model.save_pretrained(tmp_path / "model")
        error = refused(["onnx", str(tmp_path / "model"), str(tmp_path / "out")], capsys)
        assert "is bfloat16" in error and "from_pretrained(folder, dtype=torch.float32)" in error
        assert not (tmp_path / "out").exists()


def test_missing_onnx_runtime_names_the_extra(monkeypatch):
    monkeypatch.setattr(onnx_export, "REQUIRED_MODULES", ("onnx", "no_such_module_selfattn"))
    with pytest.raises(onnx_export.ConversionError, match=r"no_such_module_selfattn.*selfattn\[onnx\]"):
        onnx_export.require_onnx_runtime()
