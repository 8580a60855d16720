"""CUDA paths: run where a GPU exists, skipped on CPU-only machines (CI)."""

import pytest
import torch

from modeling_selfattn import SelfAttnConfig, SelfAttnForConditionalGeneration, SelfAttnModel

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

ATTENTION_BACKENDS = ["sdpa", "flex_attention"]


def encoder_config(**overrides):
    settings = dict(
        vocab_size=99, hidden_size=64, num_attention_heads=4, encoder_layers=2, intermediate_size=128,
        max_position_embeddings=64, hidden_dropout_prob=0.0, attention_dropout=0.0,
    )
    return SelfAttnConfig(**{**settings, **overrides})


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
    config = encoder_config(
        decoder_layers=2, pad_token_id=0, bos_token_id=1, eos_token_id=2, decoder_start_token_id=1,
        position_embedding_type="sinusoidal", scale_embedding=True, embedding_layer_norm=False, type_vocab_size=0,
    )
    model = SelfAttnForConditionalGeneration(config).eval()
    input_ids, attention_mask = padded_batch("cpu")
    settings = dict(max_new_tokens=8, do_sample=False, cache_implementation=cache_implementation)
    on_cpu = model.generate(input_ids, attention_mask=attention_mask, **settings)
    on_cuda = model.to("cuda").generate(input_ids.cuda(), attention_mask=attention_mask.cuda(), **settings)
    assert torch.equal(on_cpu, on_cuda.cpu())
