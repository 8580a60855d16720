"""PEFT LoRA on selfattn models with PEFT's defaults for model_type selfattn (no target_modules given)."""

import pytest
import torch
from peft import LoraConfig, PeftModel, TaskType, get_peft_model
from safetensors.torch import load_file

from conftest import make_tiny_config
from modeling_selfattn import (
    SelfAttnForCausalLM,
    SelfAttnForConditionalGeneration,
    SelfAttnForMaskedLM,
    SelfAttnForQuestionAnswering,
    SelfAttnForSequenceClassification,
    SelfAttnForTokenClassification,
)
from modeling_selfattn.model import SelfAttnAttention

# task type -> (head class, the head PEFT trains in full and saves with the adapter, labels for a batch of 4 x 6)
ENCODER_TASKS = {
    TaskType.SEQ_CLS: (SelfAttnForSequenceClassification, "classifier", lambda: {"labels": torch.tensor([0, 1, 2, 1])}),
    TaskType.TOKEN_CLS: (SelfAttnForTokenClassification, "classifier", lambda: {"labels": torch.randint(0, 3, (4, 6))}),
    TaskType.QUESTION_ANS: (
        SelfAttnForQuestionAnswering,
        "qa_outputs",
        lambda: {"start_positions": torch.tensor([1, 2, 0, 3]), "end_positions": torch.tensor([2, 4, 1, 5])},
    ),
}


def train_a_few_steps(model, inputs, labels, steps=3):
    """Moves the LoRA matrices (B starts at zero) and the saved head away from their initial values."""
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(steps):
        loss = model(**inputs, **labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()


def outputs_of(model, inputs):
    with torch.no_grad():
        output = model(**inputs)
    return output.logits if "logits" in output else torch.stack([output.start_logits, output.end_logits])


@pytest.mark.parametrize("task_type", list(ENCODER_TASKS), ids=lambda task: task.value)
def test_lora_with_default_targets_trains_saves_reloads_and_merges(task_type, tmp_path):
    head_class, head_name, make_labels = ENCODER_TASKS[task_type]
    torch.manual_seed(0)
    base = head_class(make_tiny_config("encoder", num_labels=3))
    base.save_pretrained(tmp_path / "base")
    base_head = {name: tensor.clone() for name, tensor in getattr(base, head_name).state_dict().items()}
    inputs = {"input_ids": torch.randint(3, 99, (4, 6)), "attention_mask": torch.ones(4, 6, dtype=torch.long)}
    base.eval()
    base_outputs = outputs_of(base, inputs)

    model = get_peft_model(base, LoraConfig(task_type=task_type))
    trainable = [name for name, parameter in model.named_parameters() if parameter.requires_grad]
    assert any(".q_proj.lora_A" in name for name in trainable) and any(".v_proj.lora_B" in name for name in trainable)
    assert any(f".{head_name}." in name for name in trainable), f"{head_name} is not trained: {trainable}"
    train_a_few_steps(model, inputs, make_labels())
    adapter_outputs = outputs_of(model, inputs)
    assert not torch.allclose(adapter_outputs, base_outputs), "training changed nothing; the test could not fail"

    model.save_pretrained(tmp_path / "adapter")
    saved = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    saved_head = {name.rsplit(".", 1)[-1]: tensor for name, tensor in saved.items() if f".{head_name}." in name}
    assert set(saved_head) == set(base_head), f"{head_name} missing from the adapter: {sorted(saved)}"
    assert not torch.equal(saved_head["weight"], base_head["weight"]), f"the saved {head_name} is the untrained one"
    assert all("lora_" in name or f".{head_name}." in name for name in saved), sorted(saved)

    fresh_base = head_class.from_pretrained(tmp_path / "base")
    reloaded = PeftModel.from_pretrained(fresh_base, tmp_path / "adapter")
    reloaded.eval()
    torch.testing.assert_close(outputs_of(reloaded, inputs), adapter_outputs, rtol=0, atol=1e-5)

    merged = reloaded.merge_and_unload()
    assert isinstance(merged, head_class) and not any("lora_" in name for name, _ in merged.named_parameters())
    torch.testing.assert_close(outputs_of(merged, inputs), adapter_outputs, rtol=0, atol=1e-5)


@pytest.mark.parametrize(
    "task_type, model_class, shape",
    [
        (TaskType.SEQ_2_SEQ_LM, SelfAttnForConditionalGeneration, "encoder_decoder"),
        (TaskType.CAUSAL_LM, SelfAttnForCausalLM, "decoder"),
    ],
    ids=["seq2seq_lm", "causal_lm"],
)
def test_lora_default_targets_cover_every_attention_of_generating_models(task_type, model_class, shape):
    torch.manual_seed(0)
    model = get_peft_model(model_class(make_tiny_config(shape)), LoraConfig(task_type=task_type))
    wrapped = {name.split(".lora_A.")[0] for name, _ in model.named_parameters() if ".lora_A." in name}
    attentions = [name for name, module in model.named_modules() if isinstance(module, SelfAttnAttention)]
    assert attentions and wrapped == {f"{name}.{proj}" for name in attentions for proj in ("q_proj", "v_proj")}
    input_ids = torch.randint(3, 99, (2, 5))
    assert model(input_ids=input_ids, labels=input_ids).loss.isfinite()


@pytest.mark.parametrize("scale_embedding", [False, True], ids=["unscaled", "scaled"])
@pytest.mark.parametrize(
    "model_class, shape", [(SelfAttnForMaskedLM, "encoder"), (SelfAttnForCausalLM, "decoder")], ids=["mlm", "causal"]
)
def test_adapters_on_the_token_embeddings(model_class, shape, scale_embedding):
    # PEFT's wrappers of an embedding pass on neither its sizes (read by the embeddings' input checks) nor anything
    # but `embed_scale`, the name under which they find the factor of a scaled embedding to apply to what they add.
    torch.manual_seed(0)
    config = make_tiny_config(shape, scale_embedding=scale_embedding, tie_word_embeddings=False)
    base = model_class(config).eval()
    ids = torch.cat([torch.tensor([[5, 6], [6, 5]]), torch.randint(7, 99, (2, 4))], dim=1)  # the trained tokens too
    with torch.no_grad():
        expected = base(ids).logits
    tokens = get_peft_model(base, LoraConfig(target_modules=["q_proj"], trainable_token_indices=[5, 6])).eval()
    with torch.no_grad():  # the tokens' rows start as the base model's
        torch.testing.assert_close(tokens(ids).logits, expected, rtol=0, atol=0)
    tokens.train()
    tokens(ids, labels=ids).loss.backward()
    assert tokens.base_model.model.get_input_embeddings().token_adapter.trainable_tokens_delta["default"].grad.any()
    torch.manual_seed(0)
    base = model_class(config).eval()
    lora = get_peft_model(base, LoraConfig(target_modules=["word_embeddings"], init_lora_weights=False)).eval()
    with torch.no_grad():
        unmerged = lora(ids).logits
        assert not torch.allclose(unmerged, expected)  # init_lora_weights=False: the adapter adds something
        merged = lora.merge_and_unload()(ids).logits
    torch.testing.assert_close(merged, unmerged, rtol=0, atol=1e-5)
