"""The reference engines of benchmarks/ (engines.py: ONNX Runtime, CTranslate2) against transformers' own models
on the same tiny random weights, and the benchmark's parity measures, skips and argument checks.

float32 engines must match transformers within 1e-5 at real tokens (generation: identical tokens); int8 ones only
approximately (mean-pooled cosine above 0.99). Tests needing an engine skip where it is not installed
(`pip install -e '.[bench]'`).
"""

import importlib.util
import sys
from argparse import Namespace
from pathlib import Path

import pytest
import torch
import transformers

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import bench  # noqa: E402
import engines  # noqa: E402
import pairs  # noqa: E402


@pytest.fixture(autouse=True)
def transformers_verbosity():
    """bench.main quiets transformers' logging for its run, as a script may; the tests that call it in this process
    hand the verbosity back, so that later tests still see transformers' warnings."""
    verbosity = transformers.logging.get_verbosity()
    yield
    transformers.logging.set_verbosity(verbosity)

TOLERANCE = 1e-5
NEW_TOKENS = 8


def has(*names: str) -> bool:
    return all(importlib.util.find_spec(name) is not None for name in names)


needs_ort = pytest.mark.skipif(not has("onnx", "onnxruntime"), reason="onnx and onnxruntime not installed")
needs_ct2 = pytest.mark.skipif(not has("ctranslate2"), reason="ctranslate2 not installed")


def perturbed(model: torch.nn.Module, skip: str = "\0") -> torch.nn.Module:
    """Every parameter moved off its initial value (LayerNorms and biases too), so that no mapping error hides."""
    torch.manual_seed(0)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if skip not in name:
                parameter.add_(torch.randn_like(parameter) * 0.1)
    return model.eval()


@pytest.fixture(scope="module")
def bert():
    config = transformers.BertConfig(
        vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37,
        max_position_embeddings=16, attn_implementation="sdpa",
    )
    return perturbed(transformers.BertModel(config))


@pytest.fixture(scope="module")
def batch():
    """Right-padded, of another shape than the ONNX export's example (2 x 8), with a full row."""
    lengths = [16, 9, 3]
    attention_mask = (torch.arange(16) < torch.tensor(lengths).unsqueeze(1)).long()
    input_ids = torch.randint(1, 99, (3, 16), generator=torch.Generator().manual_seed(1))
    return {"input_ids": input_ids.masked_fill(attention_mask == 0, 0), "attention_mask": attention_mask}


def reference_hidden(bert, batch) -> torch.Tensor:
    with torch.no_grad():
        return bert(**batch).last_hidden_state


@needs_ort
def test_onnx_runtime_matches_bert_model(bert, batch):
    sessions, details = engines.onnx_bert_sessions(bert, ["ort", "ort-int8"])
    assert details["ort_fusions"].get("Attention") == bert.config.num_hidden_layers  # fused from eager attention
    assert not bert.training and bert.config._attn_implementation == "sdpa"  # the reference is left as it was
    expected = reference_hidden(bert, batch)
    for variant, engine in [(variant, engines.ort_encoder(session, batch)) for variant, session in sessions.items()]:
        parity = bench.encoder_parity(expected, engine.last_hidden_state(engine.run()), batch["attention_mask"])
        if variant == "ort":
            assert parity["max_abs_diff_real_tokens"] <= TOLERANCE
        else:
            assert 0 < parity["max_abs_diff_real_tokens"] and parity["min_mean_pooled_cosine"] > 0.99


@needs_ct2
def test_ctranslate2_encoder_matches_bert_model(bert, batch):
    encoders = engines.ct2_bert_encoders(bert, ["ct2", "ct2-int8"])
    expected = reference_hidden(bert, batch)
    for variant, encoder in encoders.items():
        engine = engines.ct2_encoder(encoder, batch)
        parity = bench.encoder_parity(expected, engine.last_hidden_state(engine.run()), batch["attention_mask"])
        if variant == "ct2":
            assert parity["max_abs_diff_real_tokens"] <= TOLERANCE
        else:
            assert 0 < parity["max_abs_diff_real_tokens"] and parity["min_mean_pooled_cosine"] > 0.99
    left_padded = {name: tensor.flip(1) for name, tensor in batch.items()}
    with pytest.raises(ValueError, match="right-padded"):
        engines.ct2_encoder(encoders["ct2"], left_padded)


def marian(pad_last: bool = True) -> transformers.MarianMTModel:
    """A tiny Marian model following Marian's conventions as pairs.marian_reference does (pad the last id, its
    embedding row zero, the decoder start), with weights large enough that the logits are far from ties."""
    vocab_size = 99
    pad = vocab_size - 1 if pad_last else 1
    config = transformers.MarianConfig(
        vocab_size=vocab_size, d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
        decoder_attention_heads=4, encoder_ffn_dim=37, decoder_ffn_dim=37, max_position_embeddings=32,
        activation_function="swish", scale_embedding=True, pad_token_id=pad, eos_token_id=0,
        decoder_start_token_id=pad, forced_eos_token_id=None, attn_implementation="sdpa",
    )
    model = perturbed(transformers.MarianMTModel(config), skip="embed_positions")
    with torch.no_grad():
        model.final_logits_bias.normal_(0, 0.5)
        model.get_input_embeddings().weight[pad].zero_()
    return model


@needs_ct2
@pytest.mark.parametrize("beams", [1, 3])
def test_ctranslate2_translator_generates_the_tokens_of_marian(beams):
    model = marian()
    pad = model.config.pad_token_id
    translators, vocabulary = engines.ct2_marian_translators(model, ["ct2"])
    source = torch.randint(2, pad, (3, 10), generator=torch.Generator().manual_seed(2))
    generation_config = transformers.GenerationConfig(
        max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, num_beams=beams, do_sample=False, eos_token_id=0,
        pad_token_id=pad, decoder_start_token_id=pad, suppress_tokens=[pad],
    )
    expected = model.generate(input_ids=source, generation_config=generation_config)[:, 1:].tolist()
    run, token_ids = engines.ct2_generate(translators["ct2"], vocabulary, source, beams, NEW_TOKENS)
    assert token_ids(run()) == expected
    assert bench.token_agreement(expected, token_ids(run())) == 1.0


@needs_ct2
def test_ctranslate2_marian_refuses_a_pad_that_is_not_the_last_id():
    with pytest.raises(ValueError, match="pad as the last id"):
        engines.ct2_marian_translators(marian(pad_last=False), ["ct2"])


def test_a_missing_engine_skips_its_variants_with_a_printed_line(monkeypatch, capsys):
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None if name == "ctranslate2" else find_spec(name))
    args = Namespace(device="cpu", dtype=torch.float32)
    runnable = bench.runnable_engines(engines.GENERATION_ENGINES, ["selfattn", "ct2", "ct2-int8"], args)
    assert runnable == []
    assert "skipped ct2: ctranslate2 not installed (pip install -e '.[bench]')" in capsys.readouterr().out
    assert "CPU in float32 only" in engines.unavailable("ort", "cuda", torch.float32)


DEVICES_AND_DTYPES = [("cpu", torch.float32), ("cpu", torch.bfloat16), ("cuda", torch.float32), ("cuda", torch.float16)]


@pytest.mark.parametrize("device, dtype", DEVICES_AND_DTYPES)
def test_the_benchmark_and_the_engines_rule_out_the_same_settings_alike(device, dtype, monkeypatch):
    """bench.ruled_out and engines.unavailable give an engine variant the same reason for the same device and dtype
    (one clause serves both), and neither rules out CPU float32."""
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: object())  # every engine installed
    ruled = bench.ruled_out(bench.ENGINE_VARIANTS, device, dtype)
    for variant in bench.ENGINE_VARIANTS:
        reason = engines.unavailable(variant, device, dtype)
        if device == "cpu" and dtype == torch.float32:
            assert variant not in ruled and reason is None
        else:
            assert ruled[variant] == "runs on CPU in float32 only"
            assert reason is not None and ruled[variant] in reason


def test_encoder_parity_reads_real_tokens_only():
    expected = torch.randn(2, 4, 3)
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])
    actual = expected.clone()
    actual[1, 2:] += 100.0  # padding: not compared
    assert bench.encoder_parity(expected, actual, mask) == {
        "max_abs_diff_real_tokens": 0.0, "min_mean_pooled_cosine": pytest.approx(1.0)
    }
    actual[0, 1, 0] += 0.5
    assert bench.encoder_parity(expected, actual, mask)["max_abs_diff_real_tokens"] == pytest.approx(0.5)
    actual[1, :2] = -expected[1, :2]
    assert bench.encoder_parity(expected, actual, mask)["min_mean_pooled_cosine"] == pytest.approx(-1.0)
    with pytest.raises(ValueError, match="shape"):
        bench.encoder_parity(expected, actual[:, :3], mask)


# Wider than the benchmarks' random token ids (from 1000) and [CLS]/[MASK] (101, 103).
TINY_BERT_SHAPE = dict(
    vocab_size=1100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37,
    max_position_embeddings=16,
)


@pytest.mark.parametrize(
    "architecture, make_inputs, head_shape",
    [
        ("BertForMaskedLM", bench.mlm_batch, bench.mlm_head_shape),
        ("BertForSequenceClassification", bench.classification_batch, bench.classifier_head_shape),
    ],
)
def test_training_workloads_pair_the_same_weights_heads_included(architecture, make_inputs, head_shape):
    args = Namespace(device="cpu", dtype=torch.float32)
    workload = bench.training_workload(
        "tiny", "", architecture, TINY_BERT_SHAPE, lambda config: make_inputs(config, 3, 16), head_shape, args
    )
    assert workload.parity["loss_diff_eval"] <= TOLERANCE
    assert workload.parity["logits_max_abs_diff_eval"] <= TOLERANCE
    assert workload.tokens == 3 * 16 and workload.flops > 0
    assert list(workload.runners) == ["reference", "selfattn"]
    for run in workload.runners.values():
        loss = run()
        assert loss.requires_grad and torch.isfinite(loss)


def test_config_overrides_reach_both_sides_of_a_pair():
    # classify_train_padded_64 turns attention dropout off on both sides.
    reference, ours = pairs.bert_pair("BertForSequenceClassification", TINY_BERT_SHAPE, attention_probs_dropout_prob=0.0)
    assert reference.config.attention_probs_dropout_prob == 0.0 and ours.config.attention_dropout == 0.0
    assert reference.config.hidden_dropout_prob == ours.config.hidden_dropout_prob == 0.1
    default_reference, default_ours = pairs.bert_pair("BertForSequenceClassification", TINY_BERT_SHAPE)
    assert default_reference.config.attention_probs_dropout_prob == default_ours.config.attention_dropout == 0.1


def test_the_skewed_classification_batch_is_padded_and_labelled():
    config = transformers.BertConfig(**TINY_BERT_SHAPE)
    batch = bench.skewed_classification_batch(config)
    lengths = batch["attention_mask"].sum(dim=1)
    assert lengths.tolist() == pairs.skewed_lengths() and batch["input_ids"].shape == (64, 512)
    assert batch["labels"].shape == (64,) and set(batch["labels"].tolist()) <= {0, 1}


def test_a_training_step_updates_every_parameter_with_dropout_active():
    model = pairs.bert_reference("BertForSequenceClassification", TINY_BERT_SHAPE)
    inputs = bench.classification_batch(model.config, 3, 16)
    before = {name: parameter.detach().clone() for name, parameter in model.named_parameters()}
    run = bench.training_step(model, inputs)
    run()
    assert model.training
    for name, parameter in model.named_parameters():
        assert parameter.grad is None, name  # cleared for the next step
        assert not torch.equal(parameter, before[name]), name


def test_token_agreement_is_the_share_of_identical_sequences():
    assert bench.token_agreement([[1, 2], [3, 4], [5, 6], [7, 8]], [[1, 2], [3, 5], [5, 6], [8, 7]]) == 0.5


def test_sst2_sentences_and_the_skipped_workload(tmp_path):
    args = Namespace(data_dir=str(tmp_path), random_minilm=False)
    with pytest.raises(bench.SkipWorkload, match="no SST-2 data"):
        bench.sst2_workload(args, ["selfattn"])
    (tmp_path / "sst2").mkdir()
    (tmp_path / "sst2" / "dev.tsv").write_text("sentence\tlabel\nit 's good . \t1\nbad \t0\nfine \t1\n")
    assert pairs.sst2_sentences(tmp_path, 2) == ["it 's good . ", "bad "]
    (tmp_path / "sst2" / "dev.tsv").write_text("text\tlabel\nbad \t0\n")
    with pytest.raises(ValueError, match="header"):
        pairs.sst2_sentences(tmp_path)


@pytest.fixture
def stubbed_bench(monkeypatch, tmp_path):
    """bench.main with nothing built or timed: each workload records the variants it is given and is skipped.
    Returns (a runner giving the exit status, or 0, and the printed text; the variants each workload got)."""
    received = {}

    def stub(name):
        def make(args, variants):
            received[name] = list(variants)
            raise bench.SkipWorkload("stub")

        return make

    monkeypatch.setattr(bench, "gemm_peaks", lambda device, dtype: {"float32": {"F.linear": 1.0}})
    for name in bench.WORKLOADS:
        monkeypatch.setitem(bench.WORKLOADS, name, stub(name))

    def run(*options: str) -> int:
        try:
            bench.main(["--workloads", "greedy_b1", *options, "--output", str(tmp_path / "results.json")])
        except SystemExit as exit_info:
            return exit_info.code
        return 0

    return run, received


@pytest.mark.parametrize(
    "options, message",
    [(["--variants", ","], "--variants names nothing"), (["--workloads", ","], "--workloads names nothing"),
     (["--repeats", "0"], "--repeats must be at least 1, got 0"), (["--repeats", "-3"], "--repeats must be at least 1"),
     (["--warmup", "-1"], "--warmup must be 0 or more, got -1"),
     (["--dtype", "bfloat16", "--variants", "selfattn-int8,selfattn-aten"],
      "--variants: none of them can run with --device cpu --dtype bfloat16 (selfattn-int8 runs on CPU in float32")],
    ids=["no_variants", "no_workloads", "no_repeats", "negative_repeats", "negative_warmup", "every_variant_ruled_out"],
)  # fmt: skip
def test_arguments_that_would_time_nothing_are_refused_before_any_work(stubbed_bench, capsys, options, message):
    run, received = stubbed_bench
    assert run(*options) == 2
    assert message in capsys.readouterr().err
    assert received == {}  # no workload was built


def test_cuda_without_a_cuda_torch_is_refused_by_the_parser(stubbed_bench, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    run, received = stubbed_bench
    assert run("--device", "cuda", "--dtype", "bfloat16", "--variants", "selfattn") == 2
    assert "--device cuda: torch " in capsys.readouterr().err
    assert received == {}


@pytest.mark.parametrize(
    "options, message",
    [(["--random-minilm"], "--random-minilm applies to the workloads encoder_minilm_32x128, encoder_padded_64, "),
     (["--data-dir", "data"], "--data-dir applies to the workloads encoder_sst2_64, and --workloads names none of them: "
                              "add one, or leave out --data-dir.")],
    ids=["random_minilm", "data_dir"],
)  # fmt: skip
def test_options_no_named_workload_reads_are_refused(stubbed_bench, capsys, options, message):
    run, received = stubbed_bench  # its runs name greedy_b1, which reads neither
    assert run(*options) == 2
    assert message in capsys.readouterr().err
    assert received == {}


def test_options_a_named_workload_reads_are_taken(stubbed_bench, tmp_path):
    run, received = stubbed_bench
    assert run("--random-minilm", "--data-dir", str(tmp_path), "--workloads", "greedy_b1,encoder_sst2_64") == 0
    assert set(received) == {"greedy_b1", "encoder_sst2_64"}


def test_variants_the_dtype_rules_out_are_named(stubbed_bench, capsys):
    run, received = stubbed_bench
    assert run("--dtype", "bfloat16", "--variants", "selfattn,selfattn-int8-compiled,selfattn-bf16,ct2") == 0
    assert received == {"greedy_b1": ["selfattn"]}
    printed = capsys.readouterr().out
    reasons = {
        "selfattn-int8-compiled": "runs on CPU in float32 only",
        "ct2": "runs on CPU in float32 only",
        "selfattn-bf16": "is made from float32 weights",
    }
    for variant, reason in reasons.items():
        assert f"skipped {variant}: it {reason}, and this run is --device cpu --dtype bfloat16" in printed
