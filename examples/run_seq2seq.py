"""Train a selfattn encoder-decoder for translation or summarisation with Seq2SeqTrainer; with
--predict_with_generate, evaluation generates text and scores it (translation: sacreBLEU BLEU and chrF;
summarisation: ROUGE-1/2/L/Lsum).

Translation (pairs in a column of {language: text} dicts), a Transformer trained from scratch with a BPE
vocabulary learnt from the training data:

    python examples/run_seq2seq.py --config_name examples/configs/transformer-small.json --train_tokenizer bpe \
        --train_file train.jsonl --validation_file val.jsonl --source_lang en --target_lang de \
        --do_train --do_eval --predict_with_generate --output_dir out/multi30k

Summarisation (a document and a summary column), warm-started from an encoder checkpoint (BERT2BERT: both stacks
start from its weights, the cross-attention is new):

    python examples/run_seq2seq.py --model_name_or_path PATH_TO_all-MiniLM-L6-v2 --train_file train.jsonl \
        --validation_file dev.jsonl --text_column document --summary_column summary --do_train --do_eval \
        --predict_with_generate --output_dir out/scitldr

--model_name_or_path takes an encoder-decoder (selfattn, or with --use_transformers_class any transformers
seq2seq model), which keeps its checkpoint's special ids and generation config (--max_target_length, where given,
sets its generation max_length), or an encoder-only checkpoint, which is warm-started as above.

A model trained from scratch with --train_tokenizer follows CTranslate2's rules for Marian models (README.md,
"CTranslate2"), so that `selfattn-convert export` and CTranslate2 translate with it as generate() does: <pad> is
the last id, decoding starts from <pad>, whose row of the token table stays zero, and <pad> is never generated.
translate_with_ctranslate2.py here converts such a model and compares the two.
"""

from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import numpy as np
from common import (
    ModelArguments,
    capped_length,
    changed_options,
    load_model,
    load_raw_datasets,
    load_tokenizer,
    logger,
    pick_column,
    require_at_least,
    require_columns,
    run_script,
    sequence_length,
    tokenize_splits,
    train_evaluate_save,
)
from task_metrics import rouge_metrics, translation_metrics
from transformers import (
    AutoConfig,
    AutoModelForSeq2SeqLM,
    AutoTokenizer,
    DataCollatorForSeq2Seq,
    EncoderDecoderModel,
    PreTrainedTokenizerFast,
    Seq2SeqTrainer,
    Seq2SeqTrainingArguments,
)

from modeling_selfattn import SelfAttnForConditionalGeneration
from modeling_selfattn.checkpoints import warm_start_encoder_decoder

TOKENIZER_KINDS = ("bpe", "unigram", "wordpiece")
DEFAULT_MAX_TARGET_LENGTH = 128
SPECIAL_IDS = ("decoder_start_token_id", "eos_token_id", "pad_token_id")
PAD, EOS, UNK = "<pad>", "</s>", "<unk>"
NOT_SCORED = -100


@dataclass
class Seq2SeqArguments:
    source_lang: str | None = field(
        default=None, metadata={"help": "Translation: the source language, a key of the --translation_column dicts."}
    )
    target_lang: str | None = field(default=None, metadata={"help": "Translation: the target language."})
    translation_column: str = field(
        default="translation", metadata={"help": "Translation: column of {language: text} dicts."}
    )
    text_column: str | None = field(
        default=None, metadata={"help": "Summarisation: document column (default: document or text)."}
    )
    summary_column: str | None = field(
        default=None, metadata={"help": "Summarisation: summary column (default: summary or target)."}
    )
    references_column: str | None = field(
        default=None,
        metadata={
            "help": "Column of reference lists to score against (each output against its best-matching reference), "
            "instead of the single target."
        },
    )
    max_target_length: int | None = field(
        default=None,
        metadata={
            "help": f"Targets are truncated to this many tokens (default {DEFAULT_MAX_TARGET_LENGTH}). It is also the "
            "generation max_length of a model built here (--config_name, or an encoder checkpoint warm-started); a "
            "pretrained encoder-decoder keeps the max_length of its generation config unless this is given."
        },
    )
    train_tokenizer: str | None = field(
        default=None,
        metadata={
            "help": "With --config_name: learn a shared source/target vocabulary of this kind from the training data "
            "(saved in OUTPUT_DIR/tokenizer and with the model) instead of loading --tokenizer_name.",
            "choices": TOKENIZER_KINDS,
        },
    )
    tokenizer_vocab_size: int = field(
        default=8000, metadata={"help": "Vocabulary size of --train_tokenizer, special tokens included."}
    )

    def __post_init__(self):
        if (self.source_lang is None) != (self.target_lang is None):
            raise ValueError("Translation needs both --source_lang and --target_lang.")
        require_at_least(self, 1, "max_target_length", "tokenizer_vocab_size")
        if self.train_tokenizer is None and changed_options(self, ["tokenizer_vocab_size"]):
            raise ValueError(
                "--tokenizer_vocab_size sizes the vocabulary that --train_tokenizer learns: add --train_tokenizer, or "
                "leave out --tokenizer_vocab_size."
            )
        summarisation_columns = changed_options(self, ["text_column", "summary_column"])
        if self.is_translation and summarisation_columns:
            raise ValueError(
                f"{', '.join(summarisation_columns)} name summarisation columns, but --source_lang / --target_lang "
                "make this a translation run, which reads --translation_column: leave out "
                f"{', '.join(summarisation_columns)}, or --source_lang / --target_lang to summarise."
            )
        if not self.is_translation and changed_options(self, ["translation_column"]):
            raise ValueError(
                "--translation_column names the translation pairs, read only with --source_lang and --target_lang: "
                "add them, or leave out --translation_column to summarise."
            )

    @property
    def is_translation(self) -> bool:
        return self.source_lang is not None


def new_tokenizer(texts, kind: str, vocab_size: int) -> PreTrainedTokenizerFast:
    """A tokenizer of at most `vocab_size` tokens learnt from `texts`: BPE or Unigram over words marked with a
    leading "▁" (SentencePiece style, so decoding restores the spacing), or WordPiece over words and punctuation;
    NFKC-normalised, case kept, </s> appended to every sequence; </s> and <unk> are ids 0 and 1, and <pad> the
    last id. No <s>: the decoder starts from <pad>, as Marian's does (CTranslate2's rules, README.md)."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

    special_tokens = [EOS, UNK]
    vocab_size -= 1  # the room for <pad>, added after training
    if kind == "bpe":
        tokenizer = Tokenizer(models.BPE(unk_token=UNK))
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=special_tokens)
    elif kind == "unigram":
        tokenizer = Tokenizer(models.Unigram())
        trainer = trainers.UnigramTrainer(vocab_size=vocab_size, special_tokens=special_tokens, unk_token=UNK)
    else:
        tokenizer = Tokenizer(models.WordPiece(unk_token=UNK))
        trainer = trainers.WordPieceTrainer(vocab_size=vocab_size, special_tokens=special_tokens)
    tokenizer.normalizer = normalizers.NFKC()
    if kind == "wordpiece":
        tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        tokenizer.decoder = decoders.WordPiece()
    else:
        tokenizer.pre_tokenizer = pre_tokenizers.Metaspace()
        tokenizer.decoder = decoders.Metaspace()
    tokenizer.train_from_iterator(texts, trainer=trainer)
    # CTranslate2's Marian converter drops the last vocabulary entry (and that row of the weights) as <pad>; a token
    # added after training takes the next id, the last.
    tokenizer.add_special_tokens([PAD])
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"$A {EOS}", pair=f"$A {EOS} $B {EOS}", special_tokens=[(EOS, tokenizer.token_to_id(EOS))]
    )
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token=PAD, eos_token=EOS, unk_token=UNK)


def main(argv: list[str] | None = None) -> dict:
    return run_script(run, Seq2SeqArguments, argv, training_arguments=Seq2SeqTrainingArguments)


def run(model_args, data_args, task_args, training_args) -> dict:
    # Checked before any work: a pretrained decoder must say which token it starts from.
    pretrained_ids = pretrained_decoder_ids(model_args)
    raw = load_raw_datasets(data_args, training_args)
    reference_split = raw["train"] if "train" in raw else raw["validation"]
    if task_args.is_translation:
        text_column = summary_column = None
        for split in raw.values():
            require_columns(split, [task_args.translation_column], "--translation_column")
    else:
        text_column = pick_column(reference_split, task_args.text_column, ("document", "text"), "--text_column")
        summary_column = pick_column(
            reference_split, task_args.summary_column, ("summary", "target"), "--summary_column"
        )
        for split in raw.values():
            require_columns(split, [text_column, summary_column], "--text_column / --summary_column")

    def sources_and_targets(batch) -> tuple[list[str], list[str]]:
        if task_args.is_translation:
            try:
                pairs = [
                    (pair[task_args.source_lang], pair[task_args.target_lang])
                    for pair in batch[task_args.translation_column]
                ]
            except KeyError as error:
                raise ValueError(
                    f"A {task_args.translation_column} entry has no language {error}; it has "
                    f"{sorted(batch[task_args.translation_column][0])}. Check --source_lang / --target_lang."
                ) from None
            return [source for source, _ in pairs], [target for _, target in pairs]
        return batch[text_column], batch[summary_column]

    tokenizer = seq2seq_tokenizer(model_args, task_args, training_args, raw, sources_and_targets)
    special_ids = pretrained_ids or tokenizer_decoder_ids(tokenizer)
    max_source_length = sequence_length(data_args, tokenizer, model_args)
    # The decoder reads the targets (and generates up to this length) on the same position table.
    max_target_length = capped_length(
        "--max_target_length", task_args.max_target_length or DEFAULT_MAX_TARGET_LENGTH, tokenizer, model_args
    )
    # A pretrained model generates as its checkpoint says unless told otherwise; a new one has only the default 20.
    generation_max_length = None if pretrained_ids and task_args.max_target_length is None else max_target_length
    if pretrained_ids:
        kept = "its generation config"
        if generation_max_length is not None:
            kept += f" but max_length, set to {generation_max_length} by --max_target_length"
        logger.info(
            "%s is a pretrained encoder-decoder: it keeps its special ids (%s) and %s.",
            model_args.model_name_or_path, described(special_ids), kept,
        )  # fmt: skip
    else:
        logger.info(
            "The model's special ids come from the tokenizer (%s); generation max_length = %d (--max_target_length).",
            described(special_ids), generation_max_length,
        )  # fmt: skip

    def tokenize(batch):
        sources, targets = sources_and_targets(batch)
        encoded = tokenizer(sources, max_length=max_source_length, truncation=True)
        labels = tokenizer(text_target=targets, max_length=max_target_length, truncation=True)["input_ids"]
        # The decoder is fed the start token itself; a tokenizer that adds it (BERT's [CLS]) must not make it a target.
        start = special_ids["decoder_start_token_id"]
        encoded["labels"] = [ids[1:] if ids and ids[0] == start else ids for ids in labels]
        return encoded

    tokenized = tokenize_splits(raw, training_args, data_args, tokenize)

    def build_model():
        model = load_seq2seq_model(model_args, tokenizer, None if pretrained_ids else special_ids)
        if generation_max_length is not None:
            model.generation_config.max_length = generation_max_length
        keep_zero_start_row(model)
        return model

    def compute_metrics(prediction):
        predicted = np.where(prediction.predictions != NOT_SCORED, prediction.predictions, tokenizer.pad_token_id)
        hypotheses = [text.strip() for text in tokenizer.batch_decode(predicted, skip_special_tokens=True)]
        validation = raw["validation"]
        if task_args.references_column is not None:
            references = [list(texts) for texts in validation[task_args.references_column]]
        else:
            references = [[target] for target in sources_and_targets(validation[:])[1]]
        scores = (translation_metrics if task_args.is_translation else rouge_metrics)(hypotheses, references)
        scores["generated_length"] = float(np.mean(generated_lengths(predicted, special_ids, tokenizer)))
        return scores

    if task_args.references_column is not None and "validation" in raw:
        require_columns(raw["validation"], [task_args.references_column], "--references_column")
    if training_args.do_eval and not training_args.predict_with_generate:
        logger.warning("Without --predict_with_generate the evaluation reports the loss only, no BLEU or ROUGE.")
    model = build_model()
    return train_evaluate_save(
        model_args=model_args,
        training_args=training_args,
        model=model,
        build_model=build_model,
        lora_task_type="SEQ_2_SEQ_LM",
        data=tokenized,
        tokenizer=tokenizer,
        # Given the model, the collator makes the decoder inputs (needed when the Trainer smooths the labels itself).
        data_collator=DataCollatorForSeq2Seq(tokenizer, model=model, label_pad_token_id=NOT_SCORED),
        compute_metrics=compute_metrics if training_args.predict_with_generate else None,
        trainer_class=Seq2SeqTrainer,
    )


def seq2seq_tokenizer(model_args, task_args, training_args, raw, sources_and_targets):
    """--tokenizer_name's (or the model's) tokenizer, or with --train_tokenizer one learnt from the training
    sources and targets, on the main process, which saves it for the other processes to load."""
    if task_args.train_tokenizer is None:
        return load_tokenizer(model_args)
    if model_args.config_name is None or model_args.tokenizer_name is not None:
        raise ValueError(
            "--train_tokenizer makes the vocabulary of a model trained from scratch: use it with --config_name "
            "and without --tokenizer_name."
        )
    if "train" not in raw:
        raise ValueError("--train_tokenizer learns from the training data: give --train_file and --do_train.")
    tokenizer_dir = Path(training_args.output_dir) / "tokenizer"
    with training_args.main_process_first(desc="training the tokenizer"):
        if training_args.local_process_index != 0:
            return AutoTokenizer.from_pretrained(tokenizer_dir)
        sources, targets = sources_and_targets(raw["train"][:])
        tokenizer = new_tokenizer(sources + targets, task_args.train_tokenizer, task_args.tokenizer_vocab_size)
        tokenizer.save_pretrained(tokenizer_dir)
        logger.info(
            "Learnt a %s tokenizer of %d tokens, saved in %s", task_args.train_tokenizer, len(tokenizer), tokenizer_dir
        )
        return tokenizer


def pretrained_decoder_ids(model_args: ModelArguments) -> dict | None:
    """The special ids of a pretrained encoder-decoder (--model_name_or_path), which the run keeps as they are: its
    tokenizer's tokens may start its decoder differently (BART's <s> is not its start token, </s> is). None for a
    model built here, from --config_name or warm-started from an encoder checkpoint."""
    source = model_args.model_name_or_path
    if source is None:
        return None
    config = AutoConfig.from_pretrained(source)
    if not config.is_encoder_decoder:
        return None
    ids = {name: getattr(config, name, None) for name in SPECIAL_IDS}
    if ids["decoder_start_token_id"] is None:
        # As transformers' run_summarization: the start token of a trained decoder is not the script's to guess.
        raise ValueError(
            f"--model_name_or_path {source} sets no decoder_start_token_id in its config.json: its decoder has no "
            "token to start from. Set the one it was trained with there."
        )
    return ids


def tokenizer_decoder_ids(tokenizer) -> dict:
    """The special ids of a model built here, from its tokenizer."""
    ids = {
        # <s> or [CLS]; with neither (Marian's, T5's and the learnt tokenizers), <pad>, as those models start from.
        "decoder_start_token_id": first_defined(tokenizer.bos_token_id, tokenizer.cls_token_id, tokenizer.pad_token_id),
        "eos_token_id": first_defined(tokenizer.eos_token_id, tokenizer.sep_token_id),
        "pad_token_id": tokenizer.pad_token_id,
    }
    missing = [name for name, value in ids.items() if value is None]
    if missing:
        raise ValueError(
            f"The tokenizer defines no token for {missing}: a seq2seq model needs a start, end and pad token."
        )
    return ids


def generated_lengths(sequences: np.ndarray, special_ids: dict, tokenizer) -> np.ndarray:
    """The tokens of each generated sequence that its text is made of: without the special ones around them, the
    model's decoder start, end (eos_token_id, one id or several) and padding, nor any other special token of the
    tokenizer (a forced <s>), which batch_decode(skip_special_tokens=True) leaves out of the scored text too."""
    eos = special_ids["eos_token_id"]
    special = {special_ids["decoder_start_token_id"], special_ids["pad_token_id"], *tokenizer.all_special_ids}
    special.update(eos if isinstance(eos, (list, tuple)) else [eos])
    return np.isin(sequences, [token for token in special if token is not None], invert=True).sum(axis=-1)


def described(ids: dict) -> str:
    return ", ".join(f"{name} {value}" for name, value in ids.items())


def first_defined(*values):
    return next((value for value in values if value is not None), None)


def keep_zero_start_row(model) -> None:
    """For a model that decodes from <pad> whose row of the token table is zero (a new model: nn.Embedding's padding
    row; Marian checkpoints), keep that row exactly zero through training and never generate <pad>: CTranslate2
    starts Marian decoders from a zero vector and drops <pad> from the vocabulary (README.md, "CTranslate2"). The
    row gets no gradient as an input, but an output layer tied to the table gives it one; with a zero gradient,
    AdamW (decay included) and SGD leave it zero. The decoder's own table is the one that matters where it is not the
    encoder's (Marian with share_encoder_decoder_embeddings=False). The hook lives on the parameter: a copy of the
    model (copy.deepcopy) does not carry it. Other models are left as they are."""
    pad = model.config.pad_token_id
    table = model.get_decoder().get_input_embeddings().weight
    if model.config.decoder_start_token_id != pad or table[pad].any():
        return
    if table.requires_grad:
        table.register_hook(partial(without_row, pad))
    bad_words = list(model.generation_config.bad_words_ids or [])
    model.generation_config.bad_words_ids = bad_words if [pad] in bad_words else [*bad_words, [pad]]
    logger.info(
        "Decoding starts from <pad> (id %d): its zero row of the token table stays zero, and it is never generated, "
        "as CTranslate2 requires.",
        pad,
    )


def without_row(row: int, gradient):
    gradient = gradient.clone()
    gradient[row] = 0
    return gradient


def load_seq2seq_model(model_args: ModelArguments, tokenizer, special_ids: dict | None):
    """An encoder-decoder from --config_name or --model_name_or_path; an encoder-only checkpoint (BERT family or
    selfattn) is warm-started into one: selfattn's warm_start_encoder_decoder, or with
    --use_transformers_class transformers' EncoderDecoderModel. `special_ids` are set on a model built here; None
    for a pretrained encoder-decoder, which keeps its checkpoint's ids and generation config."""
    source = model_args.model_name_or_path
    if special_ids is None:
        return load_model(model_args, SelfAttnForConditionalGeneration, AutoModelForSeq2SeqLM, tokenizer)
    if source is None:
        return load_model(model_args, SelfAttnForConditionalGeneration, AutoModelForSeq2SeqLM, tokenizer, **special_ids)
    if not model_args.use_transformers_class:
        return warm_start_encoder_decoder(source, **special_ids)
    model = EncoderDecoderModel.from_encoder_decoder_pretrained(source, source)
    for name, value in {**special_ids, "vocab_size": model.config.decoder.vocab_size}.items():
        setattr(model.config, name, value)
    for name, value in special_ids.items():
        setattr(model.generation_config, name, value)
    return model


if __name__ == "__main__":
    main()
