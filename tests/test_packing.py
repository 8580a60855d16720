"""Unpadding (modeling_selfattn/packing.py) against the padded path it replaces, on tiny random models (float32,
tolerance 1e-5): a padded batch runs on its real tokens only. The padded path is forced by raising the padding share
unpadding needs above 1 (`never_unpad`)."""

from types import SimpleNamespace

import pytest
import torch
from batch_helpers import LENGTHS, TOLERANCE, assert_same_gradients, build, loss_and_gradients, padded_batch

import modeling_selfattn.packing as packing
from modeling_selfattn import (
    SelfAttnForConditionalGeneration,
    SelfAttnForMaskedLM,
    SelfAttnForSequenceClassification,
    SelfAttnModel,
)
from modeling_selfattn.model import SelfAttnEmbeddings


@pytest.fixture
def never_unpad(monkeypatch):
    """Within the test, call never_unpad() to make every later forward take the padded path."""
    return lambda: monkeypatch.setattr(packing, "MIN_PADDING_SHARE_TO_UNPAD", 2.0)


def real_token_diff(first: torch.Tensor, second: torch.Tensor, attention_mask: torch.Tensor) -> float:
    real = attention_mask.bool()
    return (first[real] - second[real]).abs().max().item()


# --- unpadded encoding -----------------------------------------------------------------------------------------

ENCODER_VARIANTS = {
    "post_ln_sdpa": ({}, "sdpa", "right"),
    "post_ln_eager": ({}, "eager", "right"),
    "pre_ln_sinusoidal": ({"pre_layer_norm": True, "position_embedding_type": "sinusoidal"}, "sdpa", "right"),
    "roberta_positions_left_padding": ({"padding_aware_positions": True, "position_offset": 1}, "sdpa", "left"),
}


# How attention buckets the packed sequences (packing.BUCKET_MIN_LENGTH_RATIO): "one_bucket" puts LENGTHS in one
# bucket, padded and masked; the default makes buckets of mixed lengths and lone ones; "per_length" one bucket per
# distinct length, each a view without mask.
BUCKET_RULES = {"one_bucket": 0.0, "default": packing.BUCKET_MIN_LENGTH_RATIO, "per_length": 1.0}


@pytest.mark.parametrize("bucket_rule", list(BUCKET_RULES))
@pytest.mark.parametrize("variant", list(ENCODER_VARIANTS))
def test_unpadded_encoder_matches_the_padded_path(variant, bucket_rule, never_unpad, count_packings, monkeypatch):
    monkeypatch.setattr(packing, "BUCKET_MIN_LENGTH_RATIO", BUCKET_RULES[bucket_rule])
    overrides, attn_implementation, padding_side = ENCODER_VARIANTS[variant]
    model = build(SelfAttnModel, **overrides)
    model.set_attn_implementation(attn_implementation)
    batch = padded_batch(padding_side=padding_side)
    batch["token_type_ids"] = (torch.arange(16) >= 5).long().expand(len(LENGTHS), -1) * batch["attention_mask"]
    with torch.no_grad():
        unpadded = model(**batch)
        assert len(count_packings) == 1
        never_unpad()
        padded = model(**batch)
    assert len(count_packings) == 1
    assert real_token_diff(unpadded.last_hidden_state, padded.last_hidden_state, batch["attention_mask"]) <= TOLERANCE
    # Tensors of their own on both paths: torch.compile guards an input's view base, so a view would cost compiled
    # decoding one more graph (test_fast_paths).
    assert not unpadded.last_hidden_state._is_view() and not padded.last_hidden_state._is_view()
    padding = batch["attention_mask"] == 0
    with torch.no_grad():  # padding positions keep their embeddings
        embedded = model.get_encoder().embeddings(batch["input_ids"], token_type_ids=batch["token_type_ids"])
    assert torch.equal(unpadded.last_hidden_state[padding], embedded[padding])
    if padding_side == "right":  # the pooler reads the first token, real with right padding
        torch.testing.assert_close(unpadded.pooler_output, padded.pooler_output, rtol=0, atol=TOLERANCE)


def test_unpadded_training_gives_the_same_loss_and_gradients(never_unpad, count_packings):
    model = build(SelfAttnForMaskedLM).train()  # dropout is 0 in the tiny configs
    batch = padded_batch()
    batch["labels"] = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)

    unpadded, unpadded_gradients = loss_and_gradients(model, batch)
    never_unpad()
    padded, padded_gradients = loss_and_gradients(model, batch)
    assert len(count_packings) == 1
    assert abs(unpadded.loss.item() - padded.loss.item()) <= TOLERANCE
    assert_same_gradients(padded_gradients, unpadded_gradients, atol=TOLERANCE)


def test_sequence_classification_logits_match_the_padded_path(never_unpad, count_packings):
    model = build(SelfAttnForSequenceClassification, num_labels=3)
    batch = padded_batch()
    with torch.no_grad():
        unpadded = model(**batch).logits
        never_unpad()
        padded = model(**batch).logits
    assert len(count_packings) == 1
    torch.testing.assert_close(unpadded, padded, rtol=0, atol=TOLERANCE)


@pytest.mark.parametrize(
    "case",
    ["output_attentions", "output_hidden_states", "little_padding", "no_mask", "flex_attention"],
)
def test_padded_path_is_kept_where_unpadding_does_not_apply(case, count_packings):
    model = build(SelfAttnModel)
    model.set_attn_implementation("eager")  # the one that returns attention maps
    batch = padded_batch()
    kwargs = {}
    if case in ("output_attentions", "output_hidden_states"):
        kwargs[case] = True
    elif case == "little_padding":  # one padding token in 6 x 16: not worth packing
        batch = padded_batch(lengths=(16, 16, 16, 16, 16, 15))
    elif case == "no_mask":
        batch.pop("attention_mask")
    elif case == "flex_attention":
        model.set_attn_implementation("flex_attention")
    with torch.no_grad():
        output = model(**batch, **kwargs)
    assert count_packings == []
    if case == "output_attentions":  # the maps keep the padded layout
        assert output.attentions[0].shape[-2:] == (16, 16)
    if case == "output_hidden_states":
        assert all(state.shape[:2] == (len(LENGTHS), 16) for state in output.hidden_states)


def test_encoder_decoder_generates_the_same_tokens_from_an_unpadded_encoder(never_unpad, count_packings):
    model = build(
        SelfAttnForConditionalGeneration, "encoder_decoder", tie_word_embeddings=False, initializer_range=0.2,
        type_vocab_size=0,
    )
    batch = padded_batch()
    for num_beams in (1, 3):
        unpadded = model.generate(**batch, max_new_tokens=5, min_new_tokens=5, num_beams=num_beams)
        assert len(count_packings) == 1
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(packing, "MIN_PADDING_SHARE_TO_UNPAD", 2.0)
            padded = model.generate(**batch, max_new_tokens=5, min_new_tokens=5, num_beams=num_beams)
        assert torch.equal(unpadded, padded)
        count_packings.clear()


def test_attention_buckets_group_sequences_of_similar_length(monkeypatch):
    monkeypatch.setattr(packing, "BUCKET_MIN_LENGTH_RATIO", 2 / 3)
    lengths = (200, 30, 90, 150, 40, 150)
    attention_mask = (torch.arange(200) < torch.tensor(lengths)[:, None]).long()
    packed = packing.PackedSequences.from_attention_mask(attention_mask)
    # 200 and 150 (at least 2/3 of 200) share one bucket, 90 does not; 40 (under 2/3 of 90) starts a bucket that also
    # takes 30.
    assert [(bucket.first, bucket.count, bucket.length) for bucket in packed.buckets] == [
        (0, 3, 200), (500, 1, 90), (590, 2, 40)
    ]
    first = packed.buckets[0]
    assert first.gather.shape == (600,) and first.real_slots.tolist() == [*range(350), *range(400, 550)]
    assert first.key_mask[:, 0, 0].sum(1).tolist() == [200, 150, 150]
    assert packed.buckets[1].gather is None  # one length: a view


def test_attention_buckets_give_keys_whole_runs_of_slots_where_it_pays(monkeypatch):
    monkeypatch.setattr(packing, "BUCKET_MIN_LENGTH_RATIO", 2 / 3)
    lengths = (44, 44, 40, 29, 3)
    attention_mask = (torch.arange(44) < torch.tensor(lengths)[:, None]).long()
    packed = packing.PackedSequences.from_attention_mask(attention_mask, key_multiple=16)
    assert [(bucket.first, bucket.count, bucket.length, bucket.key_length) for bucket in packed.buckets] == [
        (0, 3, 44, 48), (128, 1, 29, 32), (157, 1, 3, 3)  # 3 keys in 16 slots would not pay
    ]
    first, second, third = packed.buckets
    # queries keep their slots; each key slot reads a token of its own sequence, its last for the added slots
    assert first.gather.shape == (3 * 44,) and first.key_gather.shape == (3 * 48,)
    assert first.key_gather.view(3, 48)[:, 44:].tolist() == [[43] * 4, [87] * 4, [127] * 4]
    assert first.key_mask[:, 0, 0].sum(1).tolist() == [44, 44, 40] and first.key_mask.shape == (3, 1, 1, 48)
    assert second.gather is None and second.real_slots is None  # one sequence: its queries are a view
    assert second.key_gather.tolist() == [*range(128, 157), 156, 156, 156]
    assert second.key_mask.flatten().tolist() == [True] * 29 + [False] * 3
    assert third.key_gather is None and third.key_mask is None
    unpadded_keys = packing.PackedSequences.from_attention_mask(attention_mask).buckets
    assert [bucket.key_length for bucket in unpadded_keys] == [44, 29, 3]
    assert all(bucket.key_gather is None for bucket in unpadded_keys)


@pytest.fixture
def attention_key_lengths(monkeypatch):
    """The key length of each attention call of the unpadded encoder's buckets."""
    lengths = []
    original = packing.PackedSequences.attend

    def recording(self, attention_interface, *args, **kwargs):
        def interface(module, query, key, *rest, **more):
            lengths.append(key.shape[-2])
            return attention_interface(module, query, key, *rest, **more)

        return original(self, interface, *args, **kwargs)

    monkeypatch.setattr(packing.PackedSequences, "attend", recording)
    return lengths


# Per case: the padded batch's lengths, and the key slots of its buckets' attention calls in inference with SDPA on
# the CPU, then elsewhere.
KEY_SLOT_CASES = {
    "default_lengths": (LENGTHS, [16, 16, 3, 1], [16, 9, 3, 1]),  # buckets of 16 and 12, 9 and 9, 3, 1 tokens
    "unequal_lengths_and_added_slots": ((44, 44, 40, 29, 3), [48, 32, 3], [44, 29, 3]),
}


@pytest.mark.parametrize("lengths_case", list(KEY_SLOT_CASES))
@pytest.mark.parametrize("case", ["inference", "gradients", "eager"])
def test_keys_take_whole_runs_of_slots_in_cpu_sdpa_inference_alone(
    case, lengths_case, attention_key_lengths, never_unpad, monkeypatch
):
    monkeypatch.setattr(packing, "BUCKET_MIN_LENGTH_RATIO", 2 / 3)  # the buckets KEY_SLOT_CASES lists
    lengths, slots_there, slots_elsewhere = KEY_SLOT_CASES[lengths_case]
    model = build(SelfAttnModel, max_position_embeddings=max(lengths))
    model.set_attn_implementation("eager" if case == "eager" else "sdpa")
    batch = padded_batch(lengths)
    with torch.set_grad_enabled(case == "gradients"):
        unpadded = model(**batch).last_hidden_state
        never_unpad()
        padded = model(**batch).last_hidden_state
    per_layer = attention_key_lengths[: len(attention_key_lengths) // model.config.encoder_layers]
    assert per_layer == (slots_there if case == "inference" else slots_elsewhere)
    assert real_token_diff(unpadded, padded, batch["attention_mask"]) <= TOLERANCE


def test_packed_sequences_pack_and_unpack_are_inverse(monkeypatch):
    monkeypatch.setattr(packing, "BUCKET_MIN_LENGTH_RATIO", 2 / 3)
    batch = padded_batch(padding_side="left")
    packed = packing.PackedSequences.from_attention_mask(batch["attention_mask"])
    assert packed.cu_seq_lens.tolist() == [0, 16, 28, 37, 46, 49, 50]  # longest first
    # 16 and 12 share a bucket; 9, 9 (under 2/3 of 16) another; 3 and 1 are alone.
    assert [(bucket.first, bucket.count, bucket.length) for bucket in packed.buckets] == [
        (0, 2, 16), (28, 2, 9), (46, 1, 3), (49, 1, 1)
    ]
    values, padding = torch.randn(len(LENGTHS), 16, 4), torch.randn(len(LENGTHS), 16, 4)
    restored = packed.unpack(packed.pack(values), padding)
    real = batch["attention_mask"].bool()
    assert torch.equal(restored[real], values[real]) and torch.equal(restored[~real], padding[~real])
    own = padding.clone()
    assert packed.unpack(packed.pack(values), own, padding_is_own=True).data_ptr() == own.data_ptr()
    assert torch.equal(own, restored)


# --- embedding the real tokens alone ------------------------------------------------------------------------------


@pytest.fixture
def embedding_calls(monkeypatch):
    """A list of the token_indices each call of the embeddings got (None for the whole batch)."""
    calls = []
    original = SelfAttnEmbeddings.forward

    def recording(self, *args, token_indices=None, **kwargs):
        calls.append(token_indices)
        return original(self, *args, token_indices=token_indices, **kwargs)

    monkeypatch.setattr(SelfAttnEmbeddings, "forward", recording)
    return calls


def whole_batch_embedded(monkeypatch):
    """From here on the unpadded encoder embeds the whole padded batch, then packs it (the path before
    PackedSequences.embed)."""
    monkeypatch.setattr(packing.PackedSequences, "embeds_tokens_alone", lambda *args: False)


@pytest.mark.parametrize("variant", list(ENCODER_VARIANTS))
def test_real_tokens_and_distinct_padding_are_embedded_alone_with_identical_outputs(
    variant, embedding_calls, monkeypatch
):
    overrides, attn_implementation, padding_side = ENCODER_VARIANTS[variant]
    model = build(SelfAttnModel, **overrides)
    model.set_attn_implementation(attn_implementation)
    batch = padded_batch(padding_side=padding_side)
    # Padding positions of two token types, and some that hold other ids than the pad token, twice each: each
    # distinct (id, position, type) embeds apart.
    batch["token_type_ids"] = (torch.arange(16) >= 5).long().repeat(len(LENGTHS), 1)
    batch["token_type_ids"][1::2] *= batch["attention_mask"][1::2]
    batch["input_ids"][-1, -2:] = batch["input_ids"][-2, -2:] = torch.tensor([7, 8])
    with torch.no_grad():
        alone = model(**batch)
        real, padding = embedding_calls
        expected = packing.PackedSequences.from_attention_mask(batch["attention_mask"]).token_indices
        assert real.tolist() == expected.tolist()
        # one padding position per distinct (id, position, type): at most two per position for the pad token, plus
        # the two other ids
        assert len(padding) < (batch["attention_mask"] == 0).sum() and len(padding) <= 2 * 16 + 2
        whole_batch_embedded(monkeypatch)
        whole = model(**batch)
    assert embedding_calls[2:] == [None]
    assert torch.equal(alone.last_hidden_state, whole.last_hidden_state)
    assert torch.equal(alone.pooler_output, whole.pooler_output)


# position ids for each token, or shared by the batch as (1, length) or (length,)
POSITION_IDS = {
    "per_token": torch.arange(16).flip(0).expand(len(LENGTHS), -1),
    "shared_row": torch.arange(16).flip(0)[None],
    "shared_vector": torch.arange(16).flip(0),
}


@pytest.mark.parametrize("layout", list(POSITION_IDS))
def test_explicit_position_ids_key_the_padding_rows(layout, embedding_calls, monkeypatch):
    model = build(SelfAttnModel)
    batch = padded_batch()
    batch["position_ids"] = POSITION_IDS[layout]
    with torch.no_grad():
        alone = model(**batch).last_hidden_state
        whole_batch_embedded(monkeypatch)
        whole = model(**batch).last_hidden_state
    assert len(embedding_calls) == 3 and embedding_calls[1] is not None
    assert torch.equal(alone, whole)


def test_padding_keys_do_not_overflow_with_32_bit_ids(embedding_calls, monkeypatch):
    """Two ids at one position whose keys, id * positions + position, would meet in 32 bits embed apart."""
    model = build(SelfAttnModel, vocab_size=2**18 + 10, max_position_embeddings=2**14)
    batch = padded_batch()
    batch["input_ids"][-2:, -1] = torch.tensor([5, 5 + 2**18])  # padding positions of the two shortest
    batch["input_ids"] = batch["input_ids"].int()
    with torch.no_grad():
        alone = model(**batch).last_hidden_state
        whole_batch_embedded(monkeypatch)
        whole = model(**batch).last_hidden_state
    assert embedding_calls[0] is not None and torch.equal(alone, whole)


EMBEDS_WHOLE_BATCH = {
    "inputs_embeds": lambda model, batch: batch.update(
        inputs_embeds=model.get_input_embeddings()(batch.pop("input_ids"))
    ),
    "gradients": lambda model, batch: torch.set_grad_enabled(True),
    "dropout": lambda model, batch: model.train().encoder.embeddings.dropout.__setattr__("p", 0.1),
    "hook": lambda model, batch: model.encoder.embeddings.layer_norm.register_forward_hook(lambda *args: None),
}


@pytest.mark.parametrize("case", list(EMBEDS_WHOLE_BATCH))
def test_the_whole_batch_is_embedded_where_embedding_alone_could_differ(case, embedding_calls):
    model = build(SelfAttnModel, add_pooling_layer=False)
    batch = padded_batch()
    with torch.no_grad():
        EMBEDS_WHOLE_BATCH[case](model, batch)
        model(**batch)
    assert embedding_calls == [None]


def test_embeddings_laid_out_otherwise_keep_their_padding_rows(never_unpad, count_packings):
    """A hook may give the embeddings in another memory layout (same values); unpack writes the real tokens into a
    contiguous copy of them, not into a temporary one that flattening a strided tensor would make."""
    model = build(SelfAttnModel, add_pooling_layer=False)
    model.encoder.embeddings.register_forward_hook(
        lambda module, args, output: output.transpose(0, 1).contiguous().transpose(0, 1)
    )
    batch = padded_batch()
    with torch.no_grad():
        unpadded = model(**batch).last_hidden_state
        assert len(count_packings) == 1
        never_unpad()
        padded = model(**batch).last_hidden_state
    assert real_token_diff(unpadded, padded, batch["attention_mask"]) <= TOLERANCE
    padding = batch["attention_mask"] == 0
    assert torch.equal(unpadded[padding], padded[padding])


def test_a_projected_embedding_embeds_the_whole_batch(embedding_calls):
    model = build(SelfAttnModel, embedding_size=8)
    with torch.no_grad():
        model(**padded_batch())
    assert embedding_calls == [None]


# --- masked-LM loss over the scored tokens ---------------------------------------------------------------------


# --- torch's varlen kernel, with an exact stand-in (the kernel itself runs on CUDA only) ---------------------------


def stand_in_varlen(takes_scale: bool, calls: list):
    """In place of torch.nn.attention.varlen.varlen_attn, with its layout (tokens, heads, head_dim) and, as its
    releases do, with or without a `scale` argument (without, the scale is 1/sqrt(head_dim)): SDPA per sequence."""

    def attend(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, scale=None):
        calls.append({"max_q": max_q, "max_k": max_k, "scale": scale, "offsets": cu_seq_q.tolist()})
        assert torch.equal(cu_seq_q, cu_seq_k) and cu_seq_q.dtype == torch.int32
        outputs = []
        for start, end in zip(cu_seq_q[:-1].tolist(), cu_seq_q[1:].tolist(), strict=True):
            q, k, v = (states[start:end].transpose(0, 1) for states in (query, key, value))
            outputs.append(torch.nn.functional.scaled_dot_product_attention(q, k, v, scale=scale).transpose(0, 1))
        return torch.cat(outputs)

    if takes_scale:

        def varlen_attn(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, return_aux=None, scale=None):
            return attend(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, scale)

    else:

        def varlen_attn(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, is_causal=False, return_aux=None):
            return attend(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k)

    return varlen_attn


@pytest.mark.parametrize("takes_scale", [True, False], ids=["with_scale", "first_releases"])
def test_varlen_kernel_gets_the_packed_sequences(takes_scale, never_unpad, monkeypatch):
    import torch.nn.attention.varlen as varlen

    calls = []
    monkeypatch.setattr(varlen, "varlen_attn", stand_in_varlen(takes_scale, calls))
    monkeypatch.setattr(packing, "varlen_takes_scale", lambda: takes_scale)
    model = build(SelfAttnForMaskedLM).train()
    batch = padded_batch()
    batch["labels"] = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    # The kernel's conditions, on a stand-in for a CUDA query: dropout rules it out; a scale other than
    # 1/sqrt(head_dim) does where the kernel takes none.
    attention = model.get_encoder().layers[0].self_attn
    query = SimpleNamespace(is_cuda=True, dtype=torch.bfloat16, shape=(1, 4, 3, 8))
    assert packing.uses_torch_varlen_kernel(attention, query, 0.0, 8**-0.5)
    assert not packing.uses_torch_varlen_kernel(attention, query, 0.1, 8**-0.5)
    assert packing.uses_torch_varlen_kernel(attention, query, 0.0, 0.5) == takes_scale
    on_cpu = SimpleNamespace(**{**vars(query), "is_cuda": False})
    assert not packing.uses_torch_varlen_kernel(attention, on_cpu, 0.0, None)
    # The model's calls, on CPU in float32 through the stand-in.
    monkeypatch.setattr(packing, "uses_torch_varlen_kernel", lambda module, query, dropout, scaling: True)
    unpadded, unpadded_gradients = loss_and_gradients(model, batch)
    assert len(calls) == model.config.encoder_layers
    head_dim = model.config.hidden_size // model.config.num_attention_heads
    lengths = sorted(LENGTHS, reverse=True)
    assert calls[0] == {
        "max_q": 16, "max_k": 16, "scale": head_dim**-0.5 if takes_scale else None,
        "offsets": torch.tensor([0, *lengths]).cumsum(0).tolist(),
    }
    never_unpad()
    padded, padded_gradients = loss_and_gradients(model, batch)
    assert len(calls) == model.config.encoder_layers
    assert abs(unpadded.loss.item() - padded.loss.item()) <= TOLERANCE
    assert_same_gradients(padded_gradients, unpadded_gradients, atol=TOLERANCE)


# --- CUDA (skipped without a GPU) ------------------------------------------------------------------------------

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def cuda_implementations() -> list[str]:
    from transformers.utils import is_flash_attn_2_available

    return ["sdpa", "eager"] + (["flash_attention_2"] if is_flash_attn_2_available() else [])


@needs_cuda
@pytest.mark.parametrize("dtype, tolerance", [(torch.float32, TOLERANCE), (torch.bfloat16, 3e-2)])
@pytest.mark.parametrize("implementation", cuda_implementations())
def test_unpadded_encoder_on_cuda_matches_the_padded_path(
    implementation, dtype, tolerance, never_unpad, count_packings
):
    if implementation.startswith("flash") and dtype == torch.float32:
        pytest.skip("flash attention kernels take half precision only")
    model = build(SelfAttnModel, hidden_size=64, intermediate_size=128).to("cuda", dtype)
    model.set_attn_implementation(implementation)
    batch = {name: tensor.cuda() for name, tensor in padded_batch().items()}
    with torch.no_grad():
        unpadded = model(**batch).last_hidden_state
        never_unpad()
        padded = model(**batch).last_hidden_state
    assert len(count_packings) == 1
    assert real_token_diff(unpadded.float(), padded.float(), batch["attention_mask"]) <= tolerance
