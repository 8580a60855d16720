"""Marian and BART checkpoints converted to selfattn (modeling_selfattn/checkpoints.py, conversion/convert_seq2seq.py)
against transformers' own MarianMTModel and BartForConditionalGeneration on identical weights: logits on padded
batches (one pass and step by step through the cache), the loss, and generate() tokens for greedy and 4-beam
search with dynamic and static caches. fp32, max abs diff <= 1e-5.

The random sources have larger weights than the default initialisation (init_std=0.3, for clear gaps between
logits) and a random final_logits_bias. Random models with tied embeddings mostly repeat one token, so each
strategy also runs with no_repeat_ngram_size=1: every step must then pick from further down the ranking, and
identical tokens show the two models rank the whole vocabulary alike.
"""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import (
    BartConfig,
    BartForCausalLM,
    BartForConditionalGeneration,
    BartModel,
    BertConfig,
    BertModel,
    MarianConfig,
    MarianMTModel,
    MarianModel,
)
from transformers.cache_utils import DynamicCache, EncoderDecoderCache

from modeling_selfattn import SelfAttnForConditionalGeneration
from modeling_selfattn.checkpoints import ConversionError, convert_checkpoint, export_family

TOLERANCE = 1e-5
SCRIPT = Path(__file__).resolve().parents[1] / "conversion" / "convert_seq2seq.py"
SHAPE = dict(
    vocab_size=99,
    d_model=32,
    encoder_layers=2,
    decoder_layers=2,
    encoder_attention_heads=4,
    decoder_attention_heads=4,
    encoder_ffn_dim=64,
    decoder_ffn_dim=64,
    max_position_embeddings=64,
    dropout=0.0,
    attention_dropout=0.0,
    init_std=0.3,
)
# Each family's own conventions: Marian pads with the last id and starts decoding from it; BART starts from EOS and
# forces BOS first.
FAMILIES = {
    "marian": (
        MarianConfig,
        {MarianMTModel: "SelfAttnForConditionalGeneration", MarianModel: "SelfAttnModel"},
        dict(pad_token_id=98, decoder_start_token_id=98, eos_token_id=0, forced_eos_token_id=0, scale_embedding=True),
    ),
    "bart": (
        BartConfig,
        {BartForConditionalGeneration: "SelfAttnForConditionalGeneration", BartModel: "SelfAttnModel"},
        dict(pad_token_id=1, bos_token_id=0, eos_token_id=2, decoder_start_token_id=2, forced_bos_token_id=0,
             forced_eos_token_id=2),
    ),
}
STRATEGIES = {
    "greedy": {"num_beams": 1},
    "beam": {"num_beams": 4},
    "greedy-no-repeat": {"num_beams": 1, "no_repeat_ngram_size": 1},
    "beam-no-repeat": {"num_beams": 4, "no_repeat_ngram_size": 1},
}
CACHES = {"dynamic": {}, "static": {"cache_implementation": "static"}}


def source_config(family: str, **overrides):
    config_class, _, conventions = FAMILIES[family]
    return config_class(**{**SHAPE, **conventions, **overrides})


def save_source(model_class, config, folder: Path) -> Path:
    torch.manual_seed(0)
    model = model_class(config).eval()
    if hasattr(model, "final_logits_bias"):
        with torch.no_grad():
            model.final_logits_bias.normal_()
    model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def pairs(tmp_path_factory) -> dict:
    """(family, source class name) -> (source model reloaded from its folder, converted model, folder)."""
    result = {}
    for family, (_, classes, _) in FAMILIES.items():
        for model_class in classes:
            folder = save_source(model_class, source_config(family), tmp_path_factory.mktemp(model_class.__name__))
            converted, report = convert_checkpoint(folder)
            assert not report.problems()
            source = model_class.from_pretrained(folder).eval()
            result[family, model_class.__name__] = (source, converted, folder)
    return result


def generator_pair(pairs, family: str):
    return pairs[family, next(iter(FAMILIES[family][1])).__name__]


def right_padded(lengths: tuple, pad_token_id: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Random ids (3..89, clear of every family's special tokens) of the given lengths, and their mask."""
    ids = torch.randint(3, 90, (len(lengths), max(lengths)), generator=torch.Generator().manual_seed(seed))
    mask = (torch.arange(max(lengths)) < torch.tensor(lengths).unsqueeze(1)).long()
    return ids.masked_fill(mask == 0, pad_token_id), mask


def padded_sources(config, lengths=(9, 6, 3)) -> dict:
    input_ids, attention_mask = right_padded(lengths, config.pad_token_id, seed=1)
    return {"input_ids": input_ids, "attention_mask": attention_mask}


def padded_targets(config, lengths=(5, 3, 4)) -> dict:
    """Teacher-forced decoder inputs: the start token, then ids, right-padded."""
    decoder_input_ids, decoder_attention_mask = right_padded(lengths, config.pad_token_id, seed=2)
    decoder_input_ids[:, 0] = config.decoder_start_token_id
    return {"decoder_input_ids": decoder_input_ids, "decoder_attention_mask": decoder_attention_mask}


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


def case_name(case) -> str:
    return "-".join(case)


@pytest.mark.parametrize("case", [(family, cls.__name__) for family in FAMILIES for cls in FAMILIES[family][1]],
                         ids=case_name)
def test_converted_model_matches_source_on_padded_batches(case, pairs):
    source, converted, _ = pairs[case]
    assert type(converted).__name__ == FAMILIES[case[0]][1][type(source)]
    batch = {**padded_sources(source.config), **padded_targets(source.config)}
    with torch.no_grad():
        expected, actual = source(**batch, use_cache=False), converted(**batch, use_cache=False)
    real_source, real_target = batch["attention_mask"].bool(), batch["decoder_attention_mask"].bool()
    # padding positions are read by nothing (selfattn's encoder gives the embedding output there): compare real tokens
    assert max_diff(expected.encoder_last_hidden_state[real_source], actual.encoder_last_hidden_state[real_source]) \
        <= TOLERANCE
    assert max_diff(expected[0][real_target], actual[0][real_target]) <= TOLERANCE  # logits, or the decoder output


@pytest.mark.parametrize("family", FAMILIES)
def test_step_by_step_cached_logits_match_source(family, pairs):
    source, converted, _ = generator_pair(pairs, family)
    sources = padded_sources(source.config)
    targets = padded_targets(source.config, lengths=(5, 5, 5))["decoder_input_ids"]
    with torch.no_grad():
        full = source(**sources, decoder_input_ids=targets, use_cache=False).logits
        caches = {model: EncoderDecoderCache(DynamicCache(), DynamicCache()) for model in (source, converted)}
        encoded = {model: model.get_encoder()(**sources) for model in (source, converted)}
        for position in range(targets.shape[1]):
            step = {
                model: model(
                    encoder_outputs=encoded[model],
                    attention_mask=sources["attention_mask"],
                    decoder_input_ids=targets[:, position : position + 1],
                    cache=caches[model],
                    use_cache=True,
                ).logits[:, 0]
                for model in (source, converted)
            }
            assert max_diff(step[converted], step[source]) <= TOLERANCE, f"step {position}"
            assert max_diff(step[converted], full[:, position]) <= TOLERANCE, f"step {position} vs one pass"


@pytest.mark.parametrize("family", FAMILIES)
def test_loss_matches_source(family, pairs):
    source, converted, _ = generator_pair(pairs, family)
    labels = torch.randint(3, 90, (3, 6), generator=torch.Generator().manual_seed(3))
    labels[1, 4:], labels[2, 2:] = -100, -100
    batch = dict(padded_sources(source.config), labels=labels)
    with torch.no_grad():
        expected, actual = source(**batch), converted(**batch)
    assert max_diff(expected.loss, actual.loss) <= TOLERANCE
    assert max_diff(expected.logits, actual.logits) <= TOLERANCE


@pytest.mark.parametrize("family", FAMILIES)
def test_all_padding_source_row_gives_the_source_sdpa_result_with_either_attention(family, pairs):
    """A source that is all padding leaves the cross-attention no key. transformers' models then differ between their
    own attention implementations (MarianMTModel eager against SDPA: 5.8 apart in the audit's case); selfattn gives
    SDPA's result, that of the source model as loaded, with eager attention too (where its eager had spread the
    attention over the padding positions, 11 apart from its SDPA)."""
    source, converted, _ = generator_pair(pairs, family)
    batch = padded_sources(source.config)
    batch["attention_mask"][1] = 0
    batch["input_ids"][1] = source.config.pad_token_id
    targets = padded_targets(source.config, lengths=(5, 5, 5))
    assert source.config._attn_implementation == converted.config._attn_implementation == "sdpa"  # as loaded
    options = dict(max_new_tokens=8, num_beams=1, do_sample=False)
    with torch.no_grad():
        expected = source(**batch, **targets, use_cache=False).logits
        expected_tokens = source.generate(**batch, **options)
        try:
            for implementation in ("sdpa", "eager"):
                converted.set_attn_implementation(implementation)
                logits = converted(**batch, **targets, use_cache=False).logits
                assert max_diff(logits, expected) <= TOLERANCE, implementation
                assert torch.equal(converted.generate(**batch, **options), expected_tokens), implementation
        finally:
            converted.set_attn_implementation("sdpa")


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("cache", CACHES)
def test_generate_gives_the_source_tokens(family, strategy, cache, pairs):
    source, converted, _ = generator_pair(pairs, family)
    batch = padded_sources(source.config)
    options = dict(max_new_tokens=12, return_dict_in_generate=True, output_scores=True, **STRATEGIES[strategy],
                   **CACHES[cache])
    expected, actual = source.generate(**batch, **options), converted.generate(**batch, **options)
    assert torch.equal(actual.sequences, expected.sequences)
    if "no_repeat_ngram_size" in options:
        # every token differs, but for the start and the forced final EOS (which may repeat a start of EOS)
        assert len(set(expected.sequences[0, 1:-1].tolist())) == expected.sequences.shape[1] - 2
    for expected_scores, actual_scores in zip(expected.scores, actual.scores):
        torch.testing.assert_close(actual_scores, expected_scores, atol=TOLERANCE, rtol=0)
    if options["num_beams"] > 1:
        torch.testing.assert_close(actual.sequences_scores, expected.sequences_scores, atol=TOLERANCE, rtol=0)


@pytest.mark.parametrize("family", FAMILIES)
def test_generation_settings_come_from_the_source(family, pairs, tmp_path):
    source, converted, _ = generator_pair(pairs, family)
    for name in ("decoder_start_token_id", "forced_bos_token_id", "forced_eos_token_id", "pad_token_id"):
        assert getattr(converted.generation_config, name) == getattr(source.generation_config, name), name
    converted.save_pretrained(tmp_path)
    reloaded = SelfAttnForConditionalGeneration.from_pretrained(tmp_path)
    assert reloaded.generation_config.forced_eos_token_id == source.generation_config.forced_eos_token_id


@pytest.mark.parametrize("family", FAMILIES)
def test_loads_without_conversion_step(family, pairs):
    source, converted, folder = generator_pair(pairs, family)
    loaded = SelfAttnForConditionalGeneration.from_pretrained(folder).eval()
    expected_weights, loaded_weights = converted.state_dict(), loaded.state_dict()
    assert loaded_weights.keys() == expected_weights.keys()
    for name, tensor in expected_weights.items():
        assert torch.equal(loaded_weights[name], tensor), name
    batch = {**padded_sources(source.config), **padded_targets(source.config)}
    with torch.no_grad():
        # the same weights in other allocations: MKL's fp32 GEMM need not round them alike on every CPU
        torch.testing.assert_close(loaded(**batch).logits, converted(**batch).logits, rtol=0, atol=TOLERANCE)


REFUSED_CONFIGS = {
    "decoder heads differ": ("bart", {"decoder_attention_heads": 2}, "decoder_attention_heads=2"),
    "decoder FFN differs": ("marian", {"decoder_ffn_dim": 32}, "decoder_ffn_dim=32"),
    "separate decoder vocabulary": ("marian", {"share_encoder_decoder_embeddings": False, "decoder_vocab_size": 120},
                                    "share_encoder_decoder_embeddings"),
}


@pytest.mark.parametrize("case", REFUSED_CONFIGS)
def test_configs_selfattn_cannot_express_are_refused(case, tmp_path):
    family, overrides, message = REFUSED_CONFIGS[case]
    model_class = next(iter(FAMILIES[family][1]))
    folder = save_source(model_class, source_config(family, **overrides), tmp_path)
    with pytest.raises(ConversionError, match=message):
        convert_checkpoint(folder)


def test_unsupported_architecture_names_the_supported_ones(tmp_path):
    folder = save_source(BartForCausalLM, source_config("bart", is_decoder=False), tmp_path)
    with pytest.raises(ConversionError, match="BartForConditionalGeneration"):
        convert_checkpoint(folder)


@pytest.mark.parametrize("family", FAMILIES)
def test_export_refuses_a_family_of_another_shape(family, tiny_encoder_config):
    with pytest.raises(ConversionError, match=f"encoder-only, and {family} is not"):
        export_family(tiny_encoder_config, family)


# ---------------------------------------------------------------------------------------------------------
# conversion/convert_seq2seq.py as a user runs it


def load_script():
    spec = importlib.util.spec_from_file_location("convert_seq2seq", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_script_help():
    result = subprocess.run([sys.executable, str(SCRIPT), "--help"], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr
    assert "usage:" in result.stdout and "--verify" in result.stdout and "--overwrite" in result.stdout


@pytest.mark.parametrize("family", FAMILIES)
def test_script_converts_and_verifies(family, pairs, tmp_path, capsys):
    source, _, folder = generator_pair(pairs, family)
    output = tmp_path / "converted"
    assert load_script().main([str(folder), str(output), "--verify"]) == 0
    printed = capsys.readouterr().out
    assert "tensors mapped" in printed and "max abs diff logits" in printed
    assert "greedy: 0 sequence(s) differ" in printed and "beam: 0 sequence(s) differ" in printed
    generation = json.loads((output / "generation_config.json").read_text())
    assert generation["forced_eos_token_id"] == source.generation_config.forced_eos_token_id
    card = (output / "README.md").read_text()
    assert str(folder) in card and "sequences that differ | 0" in card
    reloaded = SelfAttnForConditionalGeneration.from_pretrained(output).eval()
    batch = padded_sources(source.config)
    assert torch.equal(reloaded.generate(**batch, max_new_tokens=8), source.generate(**batch, max_new_tokens=8))


def test_script_refuses_to_overwrite(pairs, tmp_path, capsys):
    _, _, folder = generator_pair(pairs, "marian")
    (tmp_path / "existing.txt").write_text("keep me")
    assert load_script().main([str(folder), str(tmp_path)]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert (tmp_path / "existing.txt").read_text() == "keep me"


def test_script_refuses_an_encoder_checkpoint(tmp_path, capsys):
    config = BertConfig(vocab_size=99, hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=37)
    BertModel(config).save_pretrained(tmp_path / "bert")
    assert load_script().main([str(tmp_path / "bert"), str(tmp_path / "out")]) == 1
    assert "convert_bert.py" in capsys.readouterr().err
