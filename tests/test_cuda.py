"""CUDA paths: run where a GPU exists, skipped on CPU-only machines (CI)."""

import copy
import functools

import pytest
import torch
from torch._dynamo.utils import counters
from transformers import GenerationConfig

import modeling_selfattn.packing as packing
from modeling_selfattn import SelfAttnConfig, SelfAttnForConditionalGeneration, SelfAttnForMaskedLM, SelfAttnModel
from modeling_selfattn.fast_paths import enable_compiled_decoding

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

ATTENTION_BACKENDS = ["sdpa", "flex_attention"]


def encoder_config(**overrides):
    settings = dict(
        vocab_size=99, hidden_size=64, num_attention_heads=4, encoder_layers=2, intermediate_size=128,
        max_position_embeddings=64, hidden_dropout_prob=0.0, attention_dropout=0.0,
    )
    return SelfAttnConfig(**{**settings, **overrides})


def encoder_decoder_config(**overrides):
    settings = dict(
        decoder_layers=2, pad_token_id=0, bos_token_id=1, eos_token_id=2, decoder_start_token_id=1,
        position_embedding_type="sinusoidal", scale_embedding=True, embedding_layer_norm=False, type_vocab_size=0,
    )
    return encoder_config(**{**settings, **overrides})


def padded_batch(device, batch=3, length=12, vocab=99):
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(3, vocab, (batch, length), generator=generator)
    attention_mask = torch.ones(batch, length, dtype=torch.long)
    attention_mask[1, 7:] = 0
    attention_mask[2, 3:] = 0
    return input_ids.to(device), attention_mask.to(device)


@pytest.mark.parametrize("implementation", ATTENTION_BACKENDS)
@pytest.mark.parametrize("dtype,tolerance", [(torch.float32, 1e-5), (torch.bfloat16, 3e-2)])
def test_backends_match_eager_on_real_tokens(implementation, dtype, tolerance):
    torch.manual_seed(0)
    eager = SelfAttnModel._from_config(encoder_config(), attn_implementation="eager").to("cuda", dtype).eval()
    other = SelfAttnModel._from_config(encoder_config(), attn_implementation=implementation).to("cuda", dtype).eval()
    other.load_state_dict(eager.state_dict())
    input_ids, attention_mask = padded_batch("cuda")
    with torch.no_grad():
        reference = eager(input_ids, attention_mask=attention_mask).last_hidden_state
        candidate = other(input_ids, attention_mask=attention_mask).last_hidden_state
    real = attention_mask.bool()
    assert (reference[real].float() - candidate[real].float()).abs().max().item() <= tolerance


@pytest.mark.parametrize("cache_implementation", [None, "static"])
def test_generate_on_cuda_matches_cpu(cache_implementation):
    torch.manual_seed(0)
    model = SelfAttnForConditionalGeneration(encoder_decoder_config()).eval()
    input_ids, attention_mask = padded_batch("cpu")
    settings = dict(max_new_tokens=8, do_sample=False, cache_implementation=cache_implementation)
    on_cpu = model.generate(input_ids, attention_mask=attention_mask, **settings)
    on_cuda = model.to("cuda").generate(input_ids.cuda(), attention_mask=attention_mask.cuda(), **settings)
    assert torch.equal(on_cpu, on_cuda.cpu())


@pytest.mark.parametrize("num_beams", [1, 3], ids=["greedy", "beam3"])
def test_compiled_decoding_runs_under_cuda_graphs_with_the_same_tokens(num_beams):
    torch._dynamo.reset()
    counters.clear()
    torch.manual_seed(0)
    config = encoder_decoder_config(tie_word_embeddings=False, initializer_range=0.2)
    model = SelfAttnForConditionalGeneration(config).to("cuda").eval()
    input_ids, attention_mask = padded_batch("cuda")
    generation_config = GenerationConfig(max_new_tokens=8, min_new_tokens=8, num_beams=num_beams, do_sample=False)
    expected = model.generate(input_ids, attention_mask=attention_mask, generation_config=generation_config)
    fast = enable_compiled_decoding(copy.deepcopy(model))
    for _ in range(3):  # CUDA graphs record on the first steps, then replay
        tokens = fast.generate(input_ids, attention_mask=attention_mask, generation_config=generation_config)
        assert torch.equal(tokens, expected)
    assert fast.forward.compiled_step is not None
    assert fast.forward.step_compile_options()["mode"] == "reduce-overhead"
    assert not counters["inductor"]["cudagraph_skips"], dict(counters["inductor"])


def test_unpadded_training_runs_the_varlen_kernel_with_the_gradients_of_the_padded_path(monkeypatch):
    import torch.nn.attention.varlen as varlen

    calls = []
    kernel = varlen.varlen_attn

    @functools.wraps(kernel)  # its signature too, which packing reads (varlen_takes_scale, cached: cleared below)
    def counted(*args, **kwargs):
        calls.append(args[0].shape)
        return kernel(*args, **kwargs)

    packing.varlen_takes_scale.cache_clear()
    monkeypatch.setattr(varlen, "varlen_attn", counted)
    torch.manual_seed(0)
    model = SelfAttnForMaskedLM(encoder_config()).to("cuda").train()
    input_ids, attention_mask = padded_batch("cuda", batch=4, length=16)
    attention_mask[3, 2:] = 0  # 56% of the batch is padding: it runs unpadded
    labels = input_ids.masked_fill(attention_mask == 0, -100)

    def loss_and_gradients():
        model.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(input_ids, attention_mask=attention_mask, labels=labels).loss
        loss.backward()
        return loss.item(), {name: parameter.grad.clone() for name, parameter in model.named_parameters()}

    unpadded_loss, unpadded = loss_and_gradients()
    assert len(calls) == model.config.encoder_layers  # every layer attended through the varlen kernel
    monkeypatch.setattr(packing, "MIN_PADDING_SHARE_TO_UNPAD", 2.0)
    padded_loss, padded = loss_and_gradients()
    assert len(calls) == model.config.encoder_layers
    # bfloat16 products on both sides (8 significant bits): within 2% of the loss, 3% of each gradient's largest.
    assert abs(unpadded_loss - padded_loss) <= 0.02 * abs(padded_loss)
    for name, gradient in padded.items():
        assert (unpadded[name] - gradient).abs().max() <= 0.03 * gradient.abs().max() + 1e-6, name
