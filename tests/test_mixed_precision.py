"""Mixed precision on CPU: bf16 training with Trainer(bf16=True) and bf16 inference stay finite and close to fp32;
fully padded rows (an attention_mask row of zeros) give no NaN in fp32, bf16 or fp16, with eager and SDPA
attention, in encoder, decoder and encoder-decoder models, forward and backward.

Tolerances: bf16 keeps 8 significant bits (relative rounding 2**-9 per operation), which a 2-layer model
accumulates to about 1%. Logits: max |bf16 - fp32| <= 3% of max |fp32 logit|; losses: 1% relative.
"""

import sys
from pathlib import Path

import pytest
import torch
from transformers import TrainerCallback

from modeling_selfattn import SelfAttnForCausalLM, SelfAttnForConditionalGeneration, SelfAttnForMaskedLM

from conftest import make_tiny_config

SCRIPTS = Path(__file__).parent / "scripts"
sys.path.insert(0, str(SCRIPTS))
import train_tiny  # noqa: E402

LOGITS_TOLERANCE = 0.03  # times the largest fp32 logit
LOSS_RTOL = 0.01


def batch_of(head: str, num_examples: int = 8) -> dict[str, torch.Tensor]:
    examples = train_tiny.tiny_dataset(head, num_examples)
    return {key: torch.stack([example[key] for example in examples]) for key in examples[0]}


class RecordProjectionDtype(TrainerCallback):
    """The dtype in which the first attention's query projection computes during training."""

    def __init__(self):
        self.dtypes = set()

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        projection = next(module for name, module in model.named_modules() if name.endswith("q_proj"))
        projection.register_forward_hook(lambda module, inputs, output: self.dtypes.add(output.dtype))


@pytest.mark.parametrize("head", ["sequence-classification", "seq2seq"])
def test_bf16_training_with_trainer_follows_fp32(head, tmp_path):
    fp32_dtype, bf16_dtype = RecordProjectionDtype(), RecordProjectionDtype()
    fp32 = train_tiny.train(head, tmp_path / "fp32", 4, max_steps=3, callbacks=(fp32_dtype,))
    bf16 = train_tiny.train(head, tmp_path / "bf16", 4, max_steps=3, callbacks=(bf16_dtype,), bf16=True)
    assert fp32_dtype.dtypes == {torch.float32}
    assert bf16_dtype.dtypes == {torch.bfloat16}, "Trainer(bf16=True) did not autocast the model"
    assert bf16["trainer"].model.dtype == torch.float32, "the weights (and optimizer) stay in fp32"
    losses, reference = torch.tensor(bf16["losses"]), torch.tensor(fp32["losses"])
    assert torch.isfinite(losses).all()
    torch.testing.assert_close(losses, reference, rtol=LOSS_RTOL, atol=0)


@pytest.mark.parametrize("mode", ["bf16 weights", "autocast"])
@pytest.mark.parametrize("head", ["sequence-classification", "masked-lm", "causal-lm", "seq2seq"])
def test_bf16_inference_is_close_to_fp32(head, mode):
    model = train_tiny.tiny_model(head, seed=0).eval()
    batch = batch_of(head)
    with torch.no_grad():
        reference = model(**batch)
        if mode == "bf16 weights":
            outputs = model.to(torch.bfloat16)(**batch)
        else:
            with torch.autocast("cpu", dtype=torch.bfloat16):
                outputs = model(**batch)
    assert outputs.logits.dtype == torch.bfloat16
    logits = outputs.logits.float()
    assert torch.isfinite(logits).all() and torch.isfinite(outputs.loss)
    limit = LOGITS_TOLERANCE * reference.logits.abs().max()
    assert (logits - reference.logits).abs().max() <= limit
    torch.testing.assert_close(outputs.loss.float(), reference.loss, rtol=LOSS_RTOL, atol=0)


PADDED_ROW_MODELS = {
    "encoder": SelfAttnForMaskedLM,
    "decoder": SelfAttnForCausalLM,
    "encoder_decoder": SelfAttnForConditionalGeneration,
}
# weights dtype, autocast dtype, whether to run backward. (bf16 autocast: the Trainer test.)
PRECISIONS = {
    "fp32": (torch.float32, None, True),
    "bf16": (torch.bfloat16, None, True),
    "fp16": (torch.float16, None, True),
    "fp16 autocast": (torch.float32, torch.float16, True),
}
# Rows of the attention mask (length 6). The encoder removes padding from batches with much of it and keeps the
# padded layout for batches with little, so both layouts are tried; a batch of padding only, too.
PADDING_LAYOUTS = {
    "one padded row of six": [6, 6, 6, 6, 6, 0],
    "half padding": [6, 3, 0],
    "padding only": [0, 0],
}


def batch_with_padded_rows(shape: str, lengths: list[int]) -> dict[str, torch.Tensor]:
    """Rows of the given real lengths, then padding. In an encoder-decoder the decoder rows get the lengths in
    reverse order, so that a whole target reads a fully padded source and a fully padded target a whole source."""
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(3, 99, (len(lengths), 6), generator=generator)
    attention_mask = (torch.arange(6) < torch.tensor(lengths).unsqueeze(1)).long()
    batch = {"input_ids": input_ids.masked_fill(attention_mask == 0, 0), "attention_mask": attention_mask}
    target_mask = attention_mask
    if shape == "encoder_decoder":
        target_mask = attention_mask.flip(0)
        batch["decoder_attention_mask"] = target_mask
    labels = torch.randint(3, 99, input_ids.shape, generator=generator).masked_fill(target_mask == 0, -100)
    labels[:, 1] = 5  # a scored token in every row (the causal LM scores from position 1 on): a defined loss
    batch["labels"] = labels
    return batch


# GPU attention kernels treat fully masked rows their own way: check them too where a GPU exists.
DEVICES = ["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"]


@pytest.mark.parametrize("layout", PADDING_LAYOUTS)
@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("attn_implementation", ["eager", "sdpa"])
@pytest.mark.parametrize("shape", PADDED_ROW_MODELS)
@pytest.mark.parametrize("device", DEVICES)
def test_fully_padded_rows_stay_finite(device, shape, attn_implementation, precision, layout):
    dtype, autocast_dtype, backward = PRECISIONS[precision]
    config = make_tiny_config(shape)
    model = PADDED_ROW_MODELS[shape]._from_config(config, attn_implementation=attn_implementation).to(device, dtype)
    assert model.config._attn_implementation == attn_implementation
    model.train()
    batch = {key: value.to(device) for key, value in batch_with_padded_rows(shape, PADDING_LAYOUTS[layout]).items()}
    with torch.autocast(device, dtype=autocast_dtype or torch.bfloat16, enabled=autocast_dtype is not None):
        outputs = model(**batch)
    assert outputs.logits.dtype == (autocast_dtype or dtype)
    assert torch.isfinite(outputs.logits).all(), f"non-finite logits in rows {non_finite_rows(outputs.logits)}"
    assert torch.isfinite(outputs.loss)
    if backward:
        outputs.loss.backward()
        gradients = {name: p.grad for name, p in model.named_parameters() if p.grad is not None}
        not_finite = [name for name, gradient in gradients.items() if not gradient.isfinite().all()]
        assert not not_finite, f"non-finite gradients in {not_finite[:5]}"


def non_finite_rows(tensor: torch.Tensor) -> list[int]:
    return [row for row in range(tensor.shape[0]) if not torch.isfinite(tensor[row]).all()]
