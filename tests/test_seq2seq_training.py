"""The encoder-decoder learns: Seq2SeqTrainer trains a small model on a deterministic transduction (reverse or
sort a short token sequence) and evaluates it with predict_with_generate (greedy decoding) to exact match.

Sized to take a few CPU-seconds per task (300 steps of batch 32 on a 2+2-layer, 32-wide model) with a fixed
seed; the same recipe reached 98-100% exact match over several seeds when it was tuned.
"""

import pytest
import torch
from conftest import BOS_TOKEN_ID, EOS_TOKEN_ID, PAD_TOKEN_ID, make_tiny_config
from generation_helpers import word_tokenizer
from transformers import DataCollatorForSeq2Seq, Seq2SeqTrainer, Seq2SeqTrainingArguments

from modeling_selfattn import SelfAttnForConditionalGeneration

FIRST_SYMBOL, NUM_SYMBOLS = 3, 10  # token ids 3..12 are the symbols to transduce
MIN_LENGTH, MAX_LENGTH = 3, 6
TRAIN_STEPS, BATCH_SIZE = 300, 32
TASKS = {
    "reverse": lambda symbols: symbols.flip(0),
    "sort": lambda symbols: symbols.sort().values,
}
REQUIRED_EXACT_MATCH = 0.95


def transduction_examples(task: str, count: int, seed: int) -> list[dict]:
    generator = torch.Generator().manual_seed(seed)
    examples = []
    for _ in range(count):
        length = int(torch.randint(MIN_LENGTH, MAX_LENGTH + 1, (), generator=generator))
        symbols = torch.randint(FIRST_SYMBOL, FIRST_SYMBOL + NUM_SYMBOLS, (length,), generator=generator)
        target = TASKS[task](symbols).tolist() + [EOS_TOKEN_ID]
        examples.append({"input_ids": symbols.tolist(), "attention_mask": [1] * length, "labels": target})
    return examples


def up_to_eos(tokens: list[int]) -> tuple[int, ...]:
    return tuple(tokens[: tokens.index(EOS_TOKEN_ID) + 1] if EOS_TOKEN_ID in tokens else tokens)


def exact_match(predictions, labels) -> float:
    """predictions: generated ids (decoder start first, then padding); labels: targets padded with -100."""
    matches = [
        up_to_eos([token for token in prediction[1:].tolist() if token >= 0])
        == up_to_eos([token for token in label.tolist() if token != -100])
        for prediction, label in zip(predictions, labels)
    ]
    return sum(matches) / len(matches)


@pytest.mark.parametrize("task", TASKS)
def test_seq2seq_trainer_learns_a_transduction(task, tmp_path):
    config = make_tiny_config(
        "encoder_decoder",
        vocab_size=FIRST_SYMBOL + NUM_SYMBOLS,
        intermediate_size=64,
        type_vocab_size=0,
        layer_norm_eps=1e-5,
        decoder_start_token_id=BOS_TOKEN_ID,
    )
    torch.manual_seed(0)
    model = SelfAttnForConditionalGeneration(config)
    tokenizer = word_tokenizer(FIRST_SYMBOL + NUM_SYMBOLS, padding_side="right")
    arguments = Seq2SeqTrainingArguments(
        output_dir=str(tmp_path),
        max_steps=TRAIN_STEPS,
        per_device_train_batch_size=BATCH_SIZE,
        per_device_eval_batch_size=100,
        learning_rate=5e-3,
        warmup_steps=50,
        max_grad_norm=1.0,
        weight_decay=0.0,
        predict_with_generate=True,
        generation_max_length=MAX_LENGTH + 2,  # decoder start, the symbols, EOS
        generation_num_beams=1,
        save_strategy="no",
        eval_strategy="no",
        logging_steps=50,
        report_to="none",
        disable_tqdm=True,
        use_cpu=True,
        seed=0,
        data_seed=0,
    )
    trainer = Seq2SeqTrainer(
        model=model,
        args=arguments,
        train_dataset=transduction_examples(task, TRAIN_STEPS * BATCH_SIZE, seed=1),
        data_collator=DataCollatorForSeq2Seq(tokenizer, model=model, label_pad_token_id=-100),
        processing_class=tokenizer,
        compute_metrics=lambda prediction: {"exact_match": exact_match(prediction.predictions, prediction.label_ids)},
    )
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert losses and losses[-1] < 0.1

    held_out = transduction_examples(task, 200, seed=2)
    result = trainer.predict(held_out)
    assert result.metrics["test_exact_match"] >= REQUIRED_EXACT_MATCH, result.metrics

    # predict_with_generate is greedy generate(): the same tokens for the same sources
    batch = tokenizer.pad([{key: example[key] for key in ("input_ids", "attention_mask")} for example in held_out[:8]],
                          return_tensors="pt")
    model.eval()
    generated = model.generate(**batch, max_length=MAX_LENGTH + 2)
    assert torch.equal(torch.as_tensor(result.predictions[:8, : generated.shape[1]]), generated)
    assert torch.all(torch.as_tensor(result.predictions[:8, generated.shape[1] :]) == PAD_TOKEN_ID)
