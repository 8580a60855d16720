"""generate() and the KV cache of the two generating heads: the encoder-decoder
(SelfAttnForConditionalGeneration) and the decoder-only LM (SelfAttnForCausalLM).

The models here have untied LM heads and larger initial weights (initializer_range=0.2): a tiny random model
with a tied head mostly copies its last input token, so every strategy would produce the same repeated token
and token comparisons would prove little. With these settings the tokens vary along a sequence and between
the rows of a batch.
"""

import pytest
import torch
from conftest import EOS_TOKEN_ID, PAD_TOKEN_ID, TINY_VOCAB_SIZE, make_tiny_config
from generation_helpers import word_tokenizer
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import CompileConfig, PreTrainedTokenizerFast, StaticCache, pipeline
from transformers.cache_utils import DynamicCache, EncoderDecoderCache, StaticLayer

from modeling_selfattn import SelfAttnForCausalLM, SelfAttnForConditionalGeneration

HEADS = {"encoder_decoder": SelfAttnForConditionalGeneration, "decoder": SelfAttnForCausalLM}
SHAPES = list(HEADS)
NEW_TOKENS = 6
TOLERANCE = 1e-5  # fp32 max abs diff between two computations of the same logits


def build_model(shape: str, attn_implementation: str = "sdpa", seed: int = 0, **overrides):
    torch.manual_seed(seed)
    settings = dict(tie_word_embeddings=False, initializer_range=0.2, type_vocab_size=0)
    config = make_tiny_config(shape, **{**settings, **overrides})
    return HEADS[shape]._from_config(config, attn_implementation=attn_implementation).eval()


def padded_batch(shape: str) -> dict:
    """Three prompts of lengths 7, 5 and 3: right-padded for the encoder, left-padded for a decoder-only
    model (the side generation appends to must end with real tokens)."""
    generator = torch.Generator().manual_seed(1)
    input_ids = torch.randint(3, 99, (3, 7), generator=generator)
    attention_mask = torch.ones_like(input_ids)
    for row, length in ((1, 5), (2, 3)):
        padding = slice(length, None) if shape == "encoder_decoder" else slice(None, 7 - length)
        attention_mask[row, padding] = 0
        input_ids[row, padding] = PAD_TOKEN_ID
    return {"input_ids": input_ids, "attention_mask": attention_mask}


def unpadded_row(batch: dict, row: int) -> dict:
    keep = batch["attention_mask"][row].bool()
    return {name: tensor[row, keep].unsqueeze(0) for name, tensor in batch.items()}


def new_tokens(model, sequences: torch.Tensor, prompt_length: int) -> torch.Tensor:
    """The generated part: an encoder-decoder returns only decoder tokens, a decoder-only model the prompt too."""
    return sequences if model.config.is_encoder_decoder else sequences[:, prompt_length:]


def generate(model, batch: dict, **kwargs) -> torch.Tensor:
    kwargs = {"max_new_tokens": NEW_TOKENS, "min_new_tokens": NEW_TOKENS, **kwargs}
    return model.generate(**batch, **kwargs)


# ---------------------------------------------------------------------------------------------------------
# Encoder-decoder training inputs: labels, tying, final_logits_bias


def test_labels_are_shifted_right_and_minus_100_is_ignored():
    model = build_model("encoder_decoder")
    batch = padded_batch("encoder_decoder")
    labels = torch.tensor([[5, 6, 7, 8], [9, 10, -100, -100], [11, -100, -100, -100]])
    decoder_input_ids = model.prepare_decoder_input_ids_from_labels(labels)
    start = model.config.decoder_start_token_id
    expected = torch.tensor([[start, 5, 6, 7], [start, 9, 10, PAD_TOKEN_ID], [start, 11, PAD_TOKEN_ID, PAD_TOKEN_ID]])
    assert torch.equal(decoder_input_ids, expected)

    with torch.no_grad():
        from_labels = model(**batch, labels=labels)
        explicit = model(**batch, decoder_input_ids=decoder_input_ids)
    assert torch.allclose(from_labels.logits, explicit.logits, atol=TOLERANCE)
    reference = torch.nn.functional.cross_entropy(
        explicit.logits.reshape(-1, model.config.vocab_size), labels.reshape(-1), ignore_index=-100
    )
    assert torch.allclose(from_labels.loss, reference, atol=TOLERANCE)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("tie_word_embeddings", [True, False])
def test_lm_head_tying_follows_the_config(shape, tie_word_embeddings, tmp_path):
    model = build_model(shape, tie_word_embeddings=tie_word_embeddings)
    embeddings = model.get_input_embeddings().weight
    assert (model.lm_head.weight is embeddings) == tie_word_embeddings
    if shape == "encoder_decoder":  # one token table for both stacks, whatever the head does
        assert model.model.decoder.embeddings.word_embeddings.weight is embeddings
    model.save_pretrained(tmp_path)
    reloaded = HEADS[shape].from_pretrained(tmp_path).eval()
    assert (reloaded.lm_head.weight is reloaded.get_input_embeddings().weight) == tie_word_embeddings
    assert torch.equal(reloaded.lm_head.weight, model.lm_head.weight)


@pytest.mark.parametrize("shape", SHAPES)
def test_final_logits_bias_is_added_and_saved(shape, tmp_path):
    model = build_model(shape, add_final_logits_bias=True)
    with torch.no_grad():
        model.final_logits_bias.normal_()
    batch = padded_batch(shape)
    extra = {"decoder_input_ids": batch["input_ids"][:, :4]} if shape == "encoder_decoder" else {}
    with torch.no_grad():
        outputs = model(**batch, **extra, output_hidden_states=True)
        hidden = outputs.decoder_hidden_states[-1] if shape == "encoder_decoder" else outputs.hidden_states[-1]
    assert torch.allclose(outputs.logits, model.lm_head(hidden) + model.final_logits_bias, atol=TOLERANCE)
    model.save_pretrained(tmp_path)
    assert torch.equal(HEADS[shape].from_pretrained(tmp_path).final_logits_bias, model.final_logits_bias)


# ---------------------------------------------------------------------------------------------------------
# The cache


@pytest.mark.parametrize("shape", SHAPES)
def test_step_by_step_cached_logits_match_the_full_forward(shape):
    """Feeding the target one token at a time through the cache gives the logits of one uncached pass."""
    model = build_model(shape)
    batch = padded_batch(shape)
    targets = torch.randint(3, 99, (3, 5), generator=torch.Generator().manual_seed(2))
    if shape == "encoder_decoder":
        with torch.no_grad():
            full = model(**batch, decoder_input_ids=targets, use_cache=False).logits
            encoder_outputs = model.get_encoder()(**batch)
            cache, steps = EncoderDecoderCache(DynamicCache(), DynamicCache()), []
            for position in range(targets.shape[1]):
                step = model(
                    encoder_outputs=encoder_outputs,
                    attention_mask=batch["attention_mask"],
                    decoder_input_ids=targets[:, position : position + 1],
                    cache=cache,
                    use_cache=True,
                )
                cache = step.cache
                steps.append(step.logits)
        # the cross-attention keys are the source's, computed once; the self-attention cache grows per step
        assert cache.cross_attention_cache.get_seq_length() == batch["input_ids"].shape[1]
        assert cache.self_attention_cache.get_seq_length() == targets.shape[1]
    else:
        # the prompt in one pass, then one target token per step; compared from the prompt's last position on
        prompt_length = batch["input_ids"].shape[1]
        input_ids = torch.cat([batch["input_ids"], targets], dim=1)
        attention_mask = torch.cat([batch["attention_mask"], torch.ones_like(targets)], dim=1)
        position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)  # what generate() passes
        with torch.no_grad():
            full = model(input_ids, attention_mask=attention_mask, position_ids=position_ids).logits
            full = full[:, prompt_length - 1 : -1]
            cache, steps = None, []
            for end in range(prompt_length, input_ids.shape[1]):
                start = 0 if cache is None else end - 1
                step = model(
                    input_ids[:, start:end],
                    attention_mask=attention_mask[:, :end],
                    position_ids=position_ids[:, start:end],
                    cache=cache,
                    use_cache=True,
                )
                cache = step.cache
                steps.append(step.logits[:, -1:])
        assert cache.get_seq_length() == input_ids.shape[1] - 1
    stepped = torch.cat(steps, dim=1)
    assert (stepped - full).abs().max().item() <= TOLERANCE


def count_calls(modules) -> list:
    calls = []
    for module in modules:
        module.register_forward_hook(lambda *_: calls.append(1))
    return calls


@pytest.mark.parametrize("use_cache,expected_projections", [(True, 1), (False, NEW_TOKENS)])
def test_cross_attention_keys_are_projected_once_per_generation(use_cache, expected_projections):
    model = build_model("encoder_decoder")
    calls = count_calls(layer.cross_attn.k_proj for layer in model.model.decoder.layers)
    generate(model, padded_batch("encoder_decoder"), use_cache=use_cache)
    assert len(calls) == expected_projections * model.config.decoder_layers


STRATEGIES = {
    "greedy": {},
    "beam": {"num_beams": 3, "num_return_sequences": 2, "length_penalty": 0.7},
}
CACHES = {"none": {"use_cache": False}, "dynamic": {}, "static": {"cache_implementation": "static"}}


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_cached_uncached_and_static_decoding_give_the_same_tokens(shape, strategy):
    model = build_model(shape)
    batch = padded_batch(shape)
    results = {name: generate(model, batch, **STRATEGIES[strategy], **cache) for name, cache in CACHES.items()}
    assert torch.equal(results["dynamic"], results["none"])
    assert torch.equal(results["static"], results["none"])


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("strategy", ["greedy", "beam"])
def test_generating_from_inputs_embeds_gives_the_tokens_of_the_ids(shape, strategy):
    """generate() hands inputs_embeds on only to a model whose prepare_inputs_for_generation names them; the decoder-
    only model's did not, and generate() refused them (Llama takes them). A decoder-only model returns the new tokens
    alone then, as transformers' models do."""
    model = build_model(shape)
    batch = padded_batch(shape)
    from_ids = new_tokens(model, generate(model, batch, **STRATEGIES[strategy]), batch["input_ids"].shape[1])
    embeds = model.get_input_embeddings()(batch["input_ids"])
    from_embeds = generate(
        model, {"inputs_embeds": embeds, "attention_mask": batch["attention_mask"]}, **STRATEGIES[strategy]
    )
    assert torch.equal(from_embeds, from_ids)


@pytest.mark.parametrize("shape", SHAPES)
def test_static_cache_is_used_and_sized_for_the_generation(shape):
    model = build_model(shape)
    batch = padded_batch(shape)
    outputs = generate(model, batch, cache_implementation="static", return_dict_in_generate=True)
    cache = outputs.cache.self_attention_cache if shape == "encoder_decoder" else outputs.cache
    assert isinstance(cache, StaticCache)
    fed_tokens = outputs.sequences.shape[1] - 1  # every token but the last went through the decoder
    assert int(cache.get_seq_length()) == fed_tokens <= cache.get_max_length()


@pytest.mark.parametrize("shape", SHAPES)
def test_eager_and_sdpa_agree(shape):
    batch = padded_batch(shape)
    eager, sdpa = build_model(shape, "eager"), build_model(shape, "sdpa")
    extra = {"decoder_input_ids": batch["input_ids"][:, :4]} if shape == "encoder_decoder" else {}
    with torch.no_grad():
        difference = (eager(**batch, **extra).logits - sdpa(**batch, **extra).logits)
    rows = batch["attention_mask"].bool() if shape == "decoder" else slice(None)  # pad positions see nothing
    assert difference[rows].abs().max().item() <= TOLERANCE
    for strategy in STRATEGIES.values():
        assert torch.equal(generate(eager, batch, **strategy), generate(sdpa, batch, **strategy))


@pytest.mark.parametrize("shape", SHAPES)
def test_compiled_static_cache_decode_matches_eager(shape):
    """generate() compiles the one-token decoding step when the cache is static; fullgraph=True also proves the
    step has no graph break. About 10-20 s of inductor compilation per shape on a CPU."""
    model = build_model(shape)
    batch = padded_batch(shape)
    eager = generate(model, batch, cache_implementation="static")
    compile_config = CompileConfig(fullgraph=True, mode="default")
    compile_config._compile_all_devices = True  # generate() compiles only on accelerators unless told otherwise
    compiled = generate(model, batch, cache_implementation="static", compile_config=compile_config)
    assert hasattr(model, "_compiled_call"), "generate() did not take the compiled path"
    assert torch.equal(compiled, eager)


# ---------------------------------------------------------------------------------------------------------
# Strategies and generation options


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("cache", ["dynamic", "static"])
def test_each_row_of_a_padded_batch_generates_as_if_alone(shape, cache):
    model = build_model(shape)
    batch = padded_batch(shape)
    together = generate(model, batch, **CACHES[cache])
    for row in range(3):
        alone = unpadded_row(batch, row)
        expected = new_tokens(model, generate(model, alone, **CACHES[cache]), alone["input_ids"].shape[1])
        got = new_tokens(model, together[row : row + 1], batch["input_ids"].shape[1])
        assert torch.equal(got, expected), f"row {row}"


@pytest.mark.parametrize("shape", SHAPES)
def test_beam_search_returns_ranked_sequences(shape):
    model = build_model(shape)
    batch = padded_batch(shape)
    outputs = generate(
        model, batch, num_beams=4, num_return_sequences=3, length_penalty=0.5, return_dict_in_generate=True,
        output_scores=True,
    )
    assert outputs.sequences.shape[0] == 3 * 3
    scores = outputs.sequences_scores.view(3, 3)
    assert torch.all(scores[:, :-1] >= scores[:, 1:])  # best first within each input
    best = generate(model, batch, num_beams=4, length_penalty=0.5)
    assert torch.equal(best, outputs.sequences[::3])


@pytest.mark.parametrize("cache", ["dynamic", "static"])
def test_beam_search_leaves_the_cross_attention_cache_in_place(cache, monkeypatch):
    model = build_model("encoder_decoder")
    batch = padded_batch("encoder_decoder")
    options = dict(num_beams=4, num_return_sequences=2, return_dict_in_generate=True, output_scores=True)
    reordered = []  # calls of transformers' reordering of both caches
    original = EncoderDecoderCache.reorder_cache
    monkeypatch.setattr(EncoderDecoderCache, "reorder_cache", lambda *args: reordered.append(original(*args)))
    ours = generate(model, batch, **options, **CACHES[cache])
    assert reordered == []
    cross = ours.cache.cross_attention_cache.layers[0].keys
    # What the hook skips would be a no-op: the cross-attention rows of the four beams of each input are equal
    # (computed ones: to the fp32 tolerance, as rows of one GEMM need not round alike).
    torch.testing.assert_close(cross, cross[::4].repeat_interleave(4, dim=0), rtol=0, atol=TOLERANCE)
    monkeypatch.delattr(SelfAttnForConditionalGeneration, "_reorder_cache")
    full = generate(model, batch, **options, **CACHES[cache])
    assert len(reordered) == NEW_TOKENS  # once a step
    assert torch.equal(ours.sequences, full.sequences)
    torch.testing.assert_close(ours.sequences_scores, full.sequences_scores, rtol=0, atol=TOLERANCE)


@pytest.mark.parametrize("shape", SHAPES)
def test_sampling_is_reproducible_with_a_seed(shape):
    model = build_model(shape)
    batch = padded_batch(shape)
    options = {"do_sample": True, "top_k": 20, "top_p": 0.9, "temperature": 1.5}
    torch.manual_seed(3)
    first = generate(model, batch, **options)
    torch.manual_seed(3)
    assert torch.equal(generate(model, batch, **options), first)
    assert not torch.equal(generate(model, batch, **options), first)  # the generator advanced
    torch.manual_seed(3)
    assert torch.equal(generate(model, batch, do_sample=True, top_k=1), generate(model, batch))  # top-1 is greedy


@pytest.mark.parametrize("shape", SHAPES)
def test_min_and_max_new_tokens(shape):
    model = build_model(shape, add_final_logits_bias=True)
    with torch.no_grad():
        model.final_logits_bias[0, EOS_TOKEN_ID] = 1e4  # EOS at every step unless suppressed
    batch = padded_batch(shape)
    prompt_length = batch["input_ids"].shape[1]
    start_length = 1 if shape == "encoder_decoder" else 0
    eager_to_stop = new_tokens(model, model.generate(**batch, max_new_tokens=5), prompt_length)
    assert eager_to_stop.shape[1] == start_length + 1 and torch.all(eager_to_stop[:, -1] == EOS_TOKEN_ID)
    held_back = new_tokens(model, model.generate(**batch, min_new_tokens=4, max_new_tokens=8), prompt_length)
    assert held_back.shape[1] == start_length + 5
    assert not torch.any(held_back[:, start_length : start_length + 4] == EOS_TOKEN_ID)
    assert torch.all(held_back[:, -1] == EOS_TOKEN_ID)


def test_forced_bos_and_eos_tokens():
    model = build_model("encoder_decoder")
    batch = padded_batch("encoder_decoder")
    forced = model.generate(**batch, max_new_tokens=5, forced_bos_token_id=7, forced_eos_token_id=EOS_TOKEN_ID)
    assert torch.all(forced[:, 1] == 7)
    assert torch.all(forced[:, -1] == EOS_TOKEN_ID) and forced.shape[1] == 1 + 5


def repeated_ngrams(sequence: list, size: int) -> int:
    ngrams = [tuple(sequence[i : i + size]) for i in range(len(sequence) - size + 1)]
    return len(ngrams) - len(set(ngrams))


@pytest.mark.parametrize("shape", SHAPES)
def test_no_repeat_ngram_size(shape):
    # the tied head copies its input: greedy decoding repeats one token, the constraint must break that
    model = build_model(shape, tie_word_embeddings=True)
    batch = padded_batch(shape)
    prompt_length = batch["input_ids"].shape[1]
    plain = new_tokens(model, generate(model, batch, max_new_tokens=8, min_new_tokens=8), prompt_length)
    assert any(repeated_ngrams(row, 2) for row in plain.tolist()), "the test needs a model that repeats itself"
    constrained = generate(model, batch, max_new_tokens=8, min_new_tokens=8, no_repeat_ngram_size=2)
    for row in constrained.tolist():
        assert repeated_ngrams([token for token in row if token != PAD_TOKEN_ID], 2) == 0


@pytest.mark.parametrize("shape", SHAPES)
def test_return_dict_with_scores_and_attentions(shape):
    model = build_model(shape, "eager")
    batch = padded_batch(shape)
    outputs = generate(
        model, batch, return_dict_in_generate=True, output_scores=True, output_attentions=True, output_logits=True
    )
    generated = new_tokens(model, outputs.sequences, batch["input_ids"].shape[1])[:, -NEW_TOKENS:]
    assert len(outputs.scores) == NEW_TOKENS
    assert torch.equal(torch.stack(outputs.scores, dim=1).argmax(-1), generated)  # greedy picks the best score
    heads, layers, source_length = model.config.num_attention_heads, model.config.decoder_layers, 7
    if shape == "encoder_decoder":
        assert len(outputs.encoder_attentions) == model.config.encoder_layers
        assert outputs.encoder_attentions[0].shape == (3, heads, source_length, source_length)
        self_attentions, cross_attentions = outputs.decoder_attentions, outputs.cross_attentions
        assert len(cross_attentions) == NEW_TOKENS and len(cross_attentions[-1]) == layers
        assert cross_attentions[-1][0].shape == (3, heads, 1, source_length)
        # attention to source padding is zero
        assert torch.all(cross_attentions[-1][0][2, :, :, 3:] == 0)
        last_key_length = NEW_TOKENS
    else:
        self_attentions = outputs.attentions
        last_key_length = source_length + NEW_TOKENS - 1
    assert len(self_attentions) == NEW_TOKENS and len(self_attentions[0]) == layers
    assert self_attentions[-1][0].shape == (3, heads, 1, last_key_length)
    # each row of attention probabilities sums to 1
    assert torch.allclose(self_attentions[-1][0].sum(-1), torch.ones(3, heads, 1), atol=TOLERANCE)


# ---------------------------------------------------------------------------------------------------------
# Clear errors


def cache_of(model, batch: dict):
    return model(**batch, decoder_input_ids=batch["input_ids"][:, :1], use_cache=True).cache


ERROR_CASES = {
    "decoder-only without inputs": (
        lambda: build_model("decoder")(attention_mask=torch.ones(1, 3, dtype=torch.long)),
        "needs input_ids or inputs_embeds",
    ),
    "encoder-decoder without decoder inputs or labels": (
        lambda: build_model("encoder_decoder")(**padded_batch("encoder_decoder")),
        "needs decoder inputs",
    ),
    "cache from a model with other heads": (
        lambda: build_model("encoder_decoder")(
            **padded_batch("encoder_decoder"),
            decoder_input_ids=torch.tensor([[2]] * 3),
            cache=cache_of(build_model("encoder_decoder", num_attention_heads=2), padded_batch("encoder_decoder")),
        ),
        "cache was built for another model",
    ),
    "cache from a deeper model": (
        lambda: build_model("encoder_decoder")(
            **padded_batch("encoder_decoder"),
            decoder_input_ids=torch.tensor([[2]] * 3),
            cache=cache_of(build_model("encoder_decoder", decoder_layers=3), padded_batch("encoder_decoder")),
        ),
        "built for another model",
    ),
    "decoder-only cache for an encoder-decoder": (
        lambda: build_model("encoder_decoder")(
            **padded_batch("encoder_decoder"), decoder_input_ids=torch.tensor([[2]] * 3), cache=DynamicCache()
        ),
        "EncoderDecoderCache",
    ),
}


@pytest.mark.parametrize("case", ERROR_CASES)
def test_bad_calls_raise_clear_errors(case):
    call, message = ERROR_CASES[case]
    with torch.no_grad(), pytest.raises(ValueError, match=message):
        call()


# ---------------------------------------------------------------------------------------------------------
# Pipelines


def test_text_generation_pipeline_matches_generate():
    model = build_model("decoder")
    tokenizer = word_tokenizer()
    prompts = ["w10 w11 w12 w13 w14", "w40 w41"]
    generator = pipeline("text-generation", model=model, tokenizer=tokenizer)
    options = {"max_new_tokens": 4, "min_new_tokens": 4, "do_sample": False}
    results = generator(prompts, return_full_text=False, batch_size=2, **options)
    encoded = tokenizer(prompts, return_tensors="pt", padding=True)
    sequences = model.generate(**encoded, **options)[:, encoded["input_ids"].shape[1] :]
    texts = tokenizer.batch_decode(sequences, skip_special_tokens=True)
    assert [result[0]["generated_text"] for result in results] == texts
    assert all(len(text.split()) == 4 for text in texts)


def test_tokenizer_generate_decode_round_trip_for_the_encoder_decoder():
    """Text in, text out over a right-padded batch gives each sentence's own output (the seq2seq-* pipelines
    built on this are tested in test_task_pipelines.py)."""
    model = build_model("encoder_decoder")
    tokenizer = word_tokenizer(padding_side="right")
    sources = ["w10 w11 w12 w13 w14", "w40 w41"]
    encoded = tokenizer(sources, return_tensors="pt", padding=True)
    texts = tokenizer.batch_decode(model.generate(**encoded, max_new_tokens=4), skip_special_tokens=True)
    alone = [
        tokenizer.decode(model.generate(**tokenizer(source, return_tensors="pt"), max_new_tokens=4)[0],
                         skip_special_tokens=True)
        for source in sources
    ]
    assert texts == alone and all(texts)


@pytest.mark.parametrize("shape", SHAPES)
def test_beam_search_on_a_static_cache_keeps_its_tensors_where_they_are(shape, monkeypatch):
    # On CUDA (reorder_cache_layers), so that CUDA graphs of compiled steps replay on the same memory: run here
    # on CPU by counting CPU tensors as CUDA ones.
    import modeling_selfattn.lean_generation as lean_generation

    addresses = {}

    def keeps_addresses(layer):
        static = type(layer) is StaticLayer and layer.is_initialized
        if static:
            addresses.setdefault(id(layer), set()).update({layer.keys.data_ptr(), layer.values.data_ptr()})
        return static

    model = build_model(shape)
    batch = padded_batch(shape)
    options = {**STRATEGIES["beam"], "cache_implementation": "static"}
    expected = generate(model, batch, **options)
    monkeypatch.setattr(lean_generation, "keeps_addresses", keeps_addresses)
    assert torch.equal(generate(model, batch, **options), expected)
    layers = model.config.decoder_layers
    assert len(addresses) == layers and all(len(pointers) == 2 for pointers in addresses.values())


def stop_string_tokenizer() -> PreTrainedTokenizerFast:
    """Words "w<id>" for every id, decoded without spaces, and the word "abcdef" (after the model's vocabulary) that
    transformers' StopStringCriteria prefixes each token with to learn the text it decodes to."""
    vocab = {f"w{index}": index for index in range(TINY_VOCAB_SIZE)}
    vocab["abcdef"] = TINY_VOCAB_SIZE
    backend = Tokenizer(models.WordLevel(vocab, unk_token="w3"))
    backend.pre_tokenizer, backend.decoder = pre_tokenizers.WhitespaceSplit(), decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token=f"w{PAD_TOKEN_ID}", eos_token=f"w{EOS_TOKEN_ID}")


@pytest.mark.parametrize("num_beams", [1, 3], ids=["greedy", "beam3"])
@pytest.mark.parametrize("shape", SHAPES)
def test_stop_strings_end_generation_where_the_string_appears(shape, num_beams):
    # generate() hands the tokenizer given for stop_strings to its decoding loop among the model's keywords; the
    # model must not take it for one of its own (forward() refuses unknown keywords).
    model = build_model(shape)
    input_ids = torch.randint(3, 99, (1, 5), generator=torch.Generator().manual_seed(2))
    options = dict(max_new_tokens=NEW_TOKENS, num_beams=num_beams, do_sample=False)
    full = model.generate(input_ids, **options)[0].tolist()
    start = 1 if shape == "encoder_decoder" else input_ids.shape[1]  # the decoder start token, or the prompt
    new = full[start:]
    stop_at = next(index for index in range(1, len(new)) if new[index] not in new[:index])  # a token not seen before
    tokenizer = stop_string_tokenizer()
    stopped = model.generate(input_ids, stop_strings=[f"w{new[stop_at]}"], tokenizer=tokenizer, **options)
    assert stopped[0].tolist() == full[: start + stop_at + 1]
