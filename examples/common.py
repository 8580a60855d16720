"""What the example scripts share: argument dataclasses, data loading, tokenizer and model loading, LoRA, and
the train / evaluate / save sequence.

Every script trains through transformers' Trainer, so each runs unchanged on one CPU, on one GPU, or under
`torchrun` / `accelerate launch` (several processes, FSDP): data preparation is done on the main process first
and cached for the others, and only the main process writes the model.
"""

import logging
import math
import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, fields
from pathlib import Path

import datasets
import transformers
from accelerate import PartialState
from accelerate.utils import broadcast_object_list
from transformers import AutoConfig, AutoTokenizer, HfArgumentParser, Trainer, TrainingArguments
from transformers.utils import CONFIG_NAME, GENERATION_CONFIG_NAME

import modeling_selfattn  # also registers model_type "selfattn" with the Auto classes
from modeling_selfattn import SelfAttnConfig, SelfAttnPreTrainedModel
from modeling_selfattn.convert_cli import MODEL_CARD, TOKENIZER_ENTRIES, WEIGHT_FILES, shipped_code
from modeling_selfattn.output_folder import (
    Output,
    RunOutputs,
    check_output_folder,
    refuse_overlap,
    remove,
    swap_in,
    unique_sibling,
)

logger = logging.getLogger("examples")

# File suffix -> (datasets builder, its keyword arguments)
FILE_FORMATS = {
    ".csv": ("csv", {}),
    ".tsv": ("csv", {"delimiter": "\t"}),
    ".json": ("json", {}),
    ".jsonl": ("json", {}),
}
LORA_ADAPTER_FOLDER = "lora_adapter"

# What a run of the Trainer scripts (run_*.py) leaves in --output_dir; run_seq2seq.py --train_tokenizer adds
# tokenizer/, --lora lora_adapter/ (the adapter files, whose checkpoints go to checkpoint-N/ too). What
# save_pretrained writes beside the model (its weights, generation settings, card and code) and the tokenizer's files
# are listed once, in the package (convert_cli, checkpoints); only what Trainer alone writes is listed here.
TRAINING_RUN_OUTPUTS = RunOutputs(
    "training run",
    markers=(
        CONFIG_NAME,
        "trainer_state.json",
        "train_results.json",
        "eval_results.json",
        "all_results.json",
        LORA_ADAPTER_FOLDER,
        "tokenizer",
        "checkpoint-*",
    ),
    beside=(
        *WEIGHT_FILES,
        GENERATION_CONFIG_NAME,
        MODEL_CARD,
        *shipped_code(SelfAttnPreTrainedModel),
        *shipped_code(SelfAttnConfig),
        *TOKENIZER_ENTRIES,
        # Trainer: torch weights (save_safetensors=False, whole or sharded), its arguments, results of other splits,
        # and TensorBoard's logs where --report_to tensorboard writes them there
        "pytorch_model*.bin",
        "pytorch_model.bin.index.json",
        "training_args.bin",
        "*_results.json",
        "runs",
    ),
    non_empty_why="the run would write its model and results over what is there, and with --save_total_limit "
    "Trainer deletes the checkpoint-N folders it finds there, an earlier run's included.",
)


@dataclass
class ModelArguments:
    model_name_or_path: str | None = field(
        default=None,
        metadata={
            "help": "Pretrained weights to start from: a selfattn folder, or a BERT-family checkpoint folder (bert, "
            "roberta, xlm-roberta, distilbert, electra; e.g. all-MiniLM-L6-v2), which selfattn converts while loading."
        },
    )
    config_name: str | None = field(
        default=None,
        metadata={
            "help": "Train from scratch with this config instead: a JSON file (e.g. configuration/tiny.json) or a "
            "folder holding config.json. Its vocab_size and special-token ids are set from the tokenizer."
        },
    )
    tokenizer_name: str | None = field(
        default=None, metadata={"help": "Tokenizer folder (default: --model_name_or_path)."}
    )
    use_transformers_class: bool = field(
        default=False,
        metadata={
            "help": "Load the model with transformers' own class for its model_type (e.g. "
            "BertForSequenceClassification for a BERT checkpoint, MarianMTModel for a marian config) instead of "
            "selfattn's: the reference runs of examples/RESULTS.md."
        },
    )
    lora: bool = field(
        default=False,
        metadata={
            "help": "Fine-tune LoRA adapters (PEFT) instead of all weights; the adapter is saved in "
            f"OUTPUT_DIR/{LORA_ADAPTER_FOLDER}, and the model with the adapter merged in, in OUTPUT_DIR."
        },
    )
    lora_r: int = field(default=8, metadata={"help": "LoRA rank."})
    lora_alpha: int = field(default=16, metadata={"help": "LoRA scaling numerator (the update is scaled by alpha/r)."})
    lora_dropout: float = field(default=0.1, metadata={"help": "Dropout on the LoRA input."})

    def __post_init__(self):
        if (self.model_name_or_path is None) == (self.config_name is None):
            raise ValueError(
                "Give exactly one of --model_name_or_path (start from pretrained weights) and --config_name (train "
                "from scratch from a config file such as configuration/tiny.json)."
            )
        if self.lora and self.model_name_or_path is None:
            raise ValueError("--lora adapts pretrained weights: give --model_name_or_path instead of --config_name.")
        lora_options = [option.name for option in fields(self) if option.name.startswith("lora_")]
        lora_settings = changed_options(self, lora_options)
        if lora_settings and not self.lora:
            raise ValueError(
                f"{', '.join(lora_settings)} configure the LoRA adapters that only --lora trains: add --lora, or leave "
                f"out {', '.join(lora_settings)}."
            )
        require_at_least(self, 1, "lora_r")


@dataclass
class DataArguments:
    dataset_name: str | None = field(
        default=None, metadata={"help": "A dataset on the Hugging Face Hub (datasets.load_dataset), instead of files."}
    )
    dataset_config_name: str | None = field(default=None, metadata={"help": "The Hub dataset's configuration."})
    train_file: str | None = field(default=None, metadata={"help": "Training data: .csv, .tsv, .json or .jsonl."})
    validation_file: str | None = field(
        default=None, metadata={"help": "Evaluation data: .csv, .tsv, .json or .jsonl."}
    )
    validation_split_percentage: int | None = field(
        default=None,
        metadata={
            "help": "Hold out this percentage of the training examples for evaluation, for data without a validation "
            "split (no --validation_file)."
        },
    )
    validation_split_group_column: str | None = field(
        default=None,
        metadata={
            "help": "With --validation_split_percentage: hold out whole groups of examples sharing this column's "
            "value (e.g. title, so that no QA context is on both sides)."
        },
    )
    max_train_samples: int | None = field(default=None, metadata={"help": "Use only the first N training examples."})
    max_eval_samples: int | None = field(default=None, metadata={"help": "Use only the first N evaluation examples."})
    max_seq_length: int = field(default=128, metadata={"help": "Inputs are truncated to this many tokens."})
    preprocessing_num_workers: int | None = field(
        default=None, metadata={"help": "Processes for tokenizing the data (datasets.map num_proc)."}
    )

    def __post_init__(self):
        require_at_least(
            self, 1, "max_train_samples", "max_eval_samples", "max_seq_length", "preprocessing_num_workers"
        )
        if self.dataset_name is None and self.train_file is None and self.validation_file is None:
            raise ValueError("Give --dataset_name, or local data with --train_file and/or --validation_file.")
        for path in (self.train_file, self.validation_file):
            if path is not None and Path(path).suffix not in FILE_FORMATS:
                raise ValueError(f"{path}: use a file ending in one of {sorted(FILE_FORMATS)}.")
        if self.dataset_name is not None and (self.train_file is not None or self.validation_file is not None):
            raise ValueError(
                "Give either --dataset_name or local files (--train_file / --validation_file), not both: the files "
                "would not be read."
            )
        if self.dataset_config_name is not None and self.dataset_name is None:
            raise ValueError(
                "--dataset_config_name names a configuration of the Hub dataset --dataset_name: give --dataset_name, "
                "or drop --dataset_config_name for local files."
            )
        if self.validation_split_percentage is not None and not 0 < self.validation_split_percentage < 100:
            raise ValueError(
                f"--validation_split_percentage must be between 1 and 99, got {self.validation_split_percentage}."
            )
        if self.validation_split_group_column is not None and self.validation_split_percentage is None:
            raise ValueError(
                "--validation_split_group_column says how --validation_split_percentage holds out training "
                "examples: give --validation_split_percentage too, or drop it."
            )
        if self.validation_split_percentage is not None and self.validation_file is not None:
            raise ValueError(
                "--validation_split_percentage holds out training examples where the data has no validation split, "
                "but --validation_file gives one: drop --validation_split_percentage (and any "
                "--validation_split_group_column), or --validation_file."
            )


@dataclass
class OutputArguments:
    overwrite_output_dir: bool = field(
        default=False,
        metadata={
            "help": "Replace an existing, non-empty --output_dir holding an earlier run's output and nothing else: "
            "this run is written in a hidden folder beside it, which replaces it only once the run has finished (a "
            "failed run leaves it as it was). Without this flag such a folder is refused, unless "
            "--resume_from_checkpoint continues the run saved in it; a folder that also holds other files is refused "
            "either way."
        },
    )


def changed_options(arguments, names: list[str]) -> list[str]:
    """The flags among `names` set away from their dataclass defaults: options that only matter with another one."""
    defaults = {option.name: option.default for option in fields(arguments)}
    return [f"--{name}" for name in names if getattr(arguments, name) != defaults[name]]


def require_at_least(arguments, minimum: int, *names: str) -> None:
    """Refuses a count below `minimum` here, naming its flag, rather than as a library error much later that names
    another variable (or none); None stands for an option not given."""
    for name in names:
        value = getattr(arguments, name)
        if value is not None and value < minimum:
            raise ValueError(f"--{name} must be at least {minimum}, got {value}.")


def parse_arguments(dataclass_types: tuple, argv: list[str] | None = None) -> tuple:
    """Command-line options of the given dataclasses (ModelArguments, DataArguments, the task's, TrainingArguments,
    OutputArguments), or a single JSON file holding them, checked together before any work starts."""
    parser = HfArgumentParser(dataclass_types)
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) == 1 and argv[0].endswith(".json"):
        parsed = parser.parse_json_file(json_file=os.path.abspath(argv[0]))
    else:
        parsed = parser.parse_args_into_dataclasses(args=argv)
    model_args, data_args, training_args, output_args = (
        next(arguments for arguments in parsed if isinstance(arguments, kind))
        for kind in (ModelArguments, DataArguments, TrainingArguments, OutputArguments)
    )
    check_what_to_do(training_args)
    check_output_dir(training_args, output_args, model_args, data_args)
    return parsed


def check_what_to_do(training_args: TrainingArguments) -> None:
    """TrainingArguments accepts --do_predict, but the scripts read no test split: a run that asked for
    predictions would end without them. Trainer reads --resume_from_checkpoint only when it trains, and only once
    the data and the model are ready."""
    if training_args.do_predict:
        raise ValueError(
            "--do_predict is not supported: these scripts train (--do_train) and evaluate on the validation split "
            "(--do_eval). To score a test set, drop --do_predict and give the test file as --validation_file with "
            "--do_eval (and --model_name_or_path the trained model)."
        )
    if not (training_args.do_train or training_args.do_eval):
        raise ValueError("Nothing to do: give --do_train (train and save the model), --do_eval, or both.")
    resume = training_args.resume_from_checkpoint
    if resume is not None and not training_args.do_train:
        raise ValueError(
            "--resume_from_checkpoint continues a training run, but there is no --do_train: add --do_train, or drop "
            "--resume_from_checkpoint (to evaluate a checkpoint, give it as --model_name_or_path)."
        )
    if resume is not None and not Path(resume).is_dir():
        raise ValueError(
            f"--resume_from_checkpoint {resume} is not a folder: give the checkpoint-N folder of the run to continue."
        )


def check_output_dir(
    training_args: TrainingArguments, output_args: OutputArguments, model_args: ModelArguments, data_args: DataArguments
) -> None:
    """Refuses an --output_dir whose use would lose something. The run writes its model, tokenizer and results
    there, and Trainer's --save_total_limit deletes the checkpoint-N folders it finds there, an earlier run's
    included; so the run's inputs must lie outside it (and it outside them), and an existing, non-empty folder is
    used only to continue the run saved in it (--resume_from_checkpoint inside it) or to replace it as a whole
    (--overwrite_output_dir, then only an earlier run's output folder that holds nothing else)."""
    given = training_args.output_dir
    resume = training_args.resume_from_checkpoint
    continue_hint = f"; or, to continue the run saved there, --resume_from_checkpoint {Path(given) / 'checkpoint-N'}"
    check_output_path(
        given,
        TRAINING_RUN_OUTPUTS,
        output_args.overwrite_output_dir,
        inputs={
            "--model_name_or_path": model_args.model_name_or_path,
            "--config_name": model_args.config_name,
            "--tokenizer_name": model_args.tokenizer_name,
            "--dataset_name": data_args.dataset_name,  # a local dataset folder; a Hub id does not exist here
            "--train_file": data_args.train_file,
            "--validation_file": data_args.validation_file,
        },
        continuing=resume is not None and Path(given).resolve() in Path(resume).resolve().parents,
        non_empty_hint=continue_hint,
    )


def check_output_path(
    given,
    outputs: RunOutputs,
    overwrite: bool,
    inputs: dict,
    name: str = "--output_dir",
    overwrite_flag: str = "--overwrite_output_dir",
    continuing: bool = False,
    non_empty_hint: str = "",
) -> None:
    """The output folder check every example script makes before any work (ValueError naming the problem and the
    fix): `given` (option `name`) may not be, contain or lie inside one of the `inputs` ({option: path or None});
    it is a new folder, an empty one, one the run continues (`continuing`), or, with `overwrite_flag`, an earlier
    run's output (`outputs`) holding nothing else, which the run then replaces as a whole (written_beside). The
    folder checks are selfattn-convert's (modeling_selfattn.output_folder.check_output_folder)."""
    path = Path(given).resolve()
    for option, source in inputs.items():
        if source is None or not Path(source).exists():
            continue
        refuse_overlap(given, path, source, Path(source).resolve(), name, option, ValueError, "Give")
    option = outputs.option(name, overwrite_flag, error=ValueError, verb="Give", always_replaced=False)
    check_output_folder(Path(given), option, overwrite, continuing=continuing, non_empty_hint=non_empty_hint)


@contextmanager
def output_dir_replaced_at_the_end(training_args: TrainingArguments, output_args: OutputArguments) -> Iterator[None]:
    """The run inside this context writes to --output_dir; with --overwrite_output_dir and an --output_dir that
    holds an earlier run (check_output_dir has allowed it), to a hidden sibling that replaces --output_dir only once
    the run has finished (written_beside). All processes write to the main process's sibling."""
    final = training_args.output_dir
    with written_beside(
        Path(final),
        output_args.overwrite_output_dir,
        "--output_dir",
        process_index=training_args.process_index,
        should_save=training_args.should_save,
    ) as folder:
        training_args.output_dir = str(folder)
        try:
            yield
        finally:
            training_args.output_dir = final


@contextmanager
def written_beside(
    final: Path, overwrite: bool, name: str, process_index: int = 0, should_save: bool = True
) -> Iterator[Path]:
    """The folder to write the output to: `final` itself, or, when `overwrite` replaces an existing, non-empty
    `final` (check_output_path has allowed it), a hidden sibling that replaces `final` only once the block has
    finished, so that a run that fails or is stopped leaves the earlier one as it was. The sibling is on the same
    filesystem, so the swap is two renames (modeling_selfattn.output_folder, as selfattn-convert does). Under
    several processes the main one (`process_index` 0) names the sibling, and those that save (`should_save`)
    make and swap it."""
    if not (overwrite and final.is_dir() and any(final.iterdir())):
        yield final
        return
    target = Output(final, final.resolve())
    sibling = [unique_sibling(target.path, "partial").name if process_index == 0 else None]
    staging = target.path.with_name(broadcast_object_list(sibling)[0])
    if should_save:
        staging.mkdir(exist_ok=True)
    logger.info("%s: the run is written in %s, which replaces %s when it ends.", name, staging, final)
    try:
        yield staging
    except BaseException:
        if should_save:
            remove(staging)
            logger.error("The run failed: %s %s is as it was; its partial output is deleted.", name, final)
        raise
    PartialState().wait_for_everyone()  # the others may still be writing into the sibling
    if should_save:
        swap_in(target, staging)
        logger.info("%s %s now holds this run.", name, final)


def set_up(training_args: TrainingArguments) -> None:
    """Logging (full on the main process, warnings only elsewhere) and the seed."""
    logging.basicConfig(
        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S", handlers=[logging.StreamHandler()]
    )
    level = training_args.get_process_log_level()
    logger.setLevel(level)
    datasets.utils.logging.set_verbosity(level)
    transformers.utils.logging.set_verbosity(level)
    transformers.set_seed(training_args.seed)


def run_script(
    run: Callable,
    task_arguments: type,
    argv: list[str] | None = None,
    training_arguments: type = TrainingArguments,
    data_arguments: type = DataArguments,
) -> dict:
    """A script's main(): its options parsed and checked, logging and the seed set up, then
    `run(model_args, data_args, task_args, training_args)` writing to --output_dir (or to the sibling that replaces
    it, with --overwrite_output_dir). `data_arguments` is DataArguments or a subclass with the task's defaults."""
    model_args, data_args, task_args, training_args, output_args = parse_arguments(
        (ModelArguments, data_arguments, task_arguments, training_arguments, OutputArguments), argv
    )
    set_up(training_args)
    with output_dir_replaced_at_the_end(training_args, output_args):
        return run(model_args, data_args, task_args, training_args)


# ----------------------------------------------------------------------------------------------------------------
# Data


def load_raw_datasets(data_args: DataArguments, training_args: TrainingArguments) -> datasets.DatasetDict:
    """The "train" and "validation" splits the run needs, sized by --max_train_samples / --max_eval_samples."""
    return sized_splits(load_whole_splits(data_args, training_args), data_args)


def sized_splits(whole: datasets.DatasetDict, data_args: DataArguments) -> datasets.DatasetDict:
    """The first --max_train_samples / --max_eval_samples examples of the splits of load_whole_splits."""
    limits = {"train": data_args.max_train_samples, "validation": data_args.max_eval_samples}
    return datasets.DatasetDict({split: first(dataset, limits[split]) for split, dataset in whole.items()})


def load_whole_splits(data_args: DataArguments, training_args: TrainingArguments) -> datasets.DatasetDict:
    """The "train" and "validation" splits the run needs, whole: --max_train_samples / --max_eval_samples size
    what the run trains and evaluates on (sized_splits), not the label set, which is read from these (LabelEncoder),
    so that a model trained on a sample still has a class for every label of the data."""
    if data_args.dataset_name is not None:
        raw = datasets.load_dataset(data_args.dataset_name, data_args.dataset_config_name)
    else:
        raw = datasets.DatasetDict()
        for split, path in (("train", data_args.train_file), ("validation", data_args.validation_file)):
            if path is not None:
                builder, options = FILE_FORMATS[Path(path).suffix]
                raw[split] = datasets.load_dataset(builder, data_files={split: path}, **options)[split]
    if data_args.validation_split_percentage is not None:
        if "validation" in raw:
            raise ValueError(
                "--validation_split_percentage holds out training examples where the data has no validation split, "
                f"but {data_args.dataset_name} has one: drop --validation_split_percentage (and any "
                "--validation_split_group_column)."
            )
        if "train" not in raw:
            raise ValueError("--validation_split_percentage splits the training data: give --train_file.")
        raw["train"], raw["validation"] = split_off_validation(
            raw["train"],
            data_args.validation_split_percentage,
            data_args.validation_split_group_column,
            training_args.seed,
        )
    needed = [
        name for name, wanted in (("train", training_args.do_train), ("validation", training_args.do_eval)) if wanted
    ]
    missing = [name for name in needed if name not in raw]
    if missing:
        raise ValueError(
            f"--do_train / --do_eval need the splits {needed}, but the data has no {missing} (it has "
            f"{sorted(raw)}). Give --train_file / --validation_file, or --validation_split_percentage to hold out "
            "part of the training data."
        )
    return datasets.DatasetDict({split: raw[split] for split in needed})


def first(dataset: datasets.Dataset, count: int | None) -> datasets.Dataset:
    return dataset if count is None else dataset.select(range(min(count, len(dataset))))


def split_off_validation(
    dataset: datasets.Dataset, percentage: int, group_column: str | None, seed: int
) -> tuple[datasets.Dataset, datasets.Dataset]:
    """(train, validation), the validation part holding about `percentage` % of the examples: whole groups of
    `group_column` when it is given, so that related examples (questions on one text) never straddle the split."""
    if group_column is None:
        parts = dataset.train_test_split(test_size=percentage / 100, seed=seed)
        return parts["train"], parts["test"]
    require_columns(dataset, [group_column], "--validation_split_group_column")
    groups = sorted(set(dataset[group_column]))
    if len(groups) < 2:
        raise ValueError(f"--validation_split_group_column {group_column} has a single value: nothing to split.")
    held_out = set(
        datasets.Dataset.from_dict({"group": groups}).train_test_split(
            test_size=max(1, round(len(groups) * percentage / 100)), seed=seed
        )["test"]["group"]
    )
    is_held_out = [value in held_out for value in dataset[group_column]]
    train = dataset.select([index for index, out in enumerate(is_held_out) if not out])
    validation = dataset.select([index for index, out in enumerate(is_held_out) if out])
    return train, validation


def require_columns(dataset: datasets.Dataset, columns: list[str], option: str) -> None:
    missing = [column for column in columns if column not in dataset.column_names]
    if missing:
        raise ValueError(
            f"The data has no column {missing} (it has {dataset.column_names}); name the right one with {option}."
        )


def pick_column(dataset: datasets.Dataset, given: str | None, candidates: tuple[str, ...], option: str) -> str:
    """`given`, or the first of `candidates` the data has."""
    if given is not None:
        require_columns(dataset, [given], option)
        return given
    for candidate in candidates:
        if candidate in dataset.column_names:
            return candidate
    raise ValueError(
        f"Found none of the columns {list(candidates)} (the data has {dataset.column_names}); name one with {option}."
    )


class LabelEncoder:
    """The labels of a label column as the model is trained on them, and the config fields that say so.

    Labels of a float type are scores (transformers' run_glue decides the same way): a sequence head regresses them
    (num_labels 1, problem_type "regression"); a token head refuses them. Other labels are classes, numbered as a
    ClassLabel orders its names, integer ids in numeric order (labels 0..n-1 are classes 0..n-1, as run_glue sorts
    them), and names in sorted order. A pretrained model that names its classes (other than transformers' LABEL_0,
    LABEL_1, ...) keeps its names and ids where they include all the data's labels, so that a fine-tuned model goes
    on with its own ids (a name wins over the id its digits spell); otherwise, when `fine_tuning`, a warning says the
    data's labels replace them. Without `fine_tuning` (evaluation only) the model is scored as it is, so its classes
    are never replaced: labels it has no class for are refused. `values` are the labels of every split, whole
    (load_whole_splits), so that each has an id before any is encoded, whatever part of the data the run uses."""

    def __init__(
        self, feature, values: list, model_args: ModelArguments, option: str, sequence_head: bool, fine_tuning: bool
    ):
        empty = sum(value is None or (isinstance(value, float) and math.isnan(value)) for value in values)
        if empty:
            raise ValueError(
                f"{empty} of the {len(values)} labels of {option} are empty: give every example a label, or leave out "
                "the examples without one."
            )
        # A pretrained regression model's problem_type must not survive classification (nor the other way round);
        # token classifiers have no problem_type.
        self.sequence_head = sequence_head
        self.class_label_names = list(feature.names) if isinstance(feature, datasets.ClassLabel) else None
        kind = label_type(feature, values)
        self.is_regression = kind == "float"
        model = model_args.model_name_or_path
        config = None if model is None else AutoConfig.from_pretrained(model)
        model_names = named_classes(config)
        # Evaluated as it is (no --do_train), a pretrained model keeps the classes it was trained on.
        as_it_is = config is not None and not fine_tuning
        if self.is_regression:
            if not sequence_head:
                raise ValueError(
                    f"{option} holds fractional numbers (e.g. {values[0]}), but token classification needs a class "
                    "per token: tag names or integer ids."
                )
            if as_it_is and config.num_labels != 1:
                raise ValueError(
                    f"Without --do_train, {model} is evaluated as it is: it classifies into {config.num_labels} "
                    f"classes {list(config.id2label.values())[:20]}, but {option} holds scores (fractional numbers, "
                    f"e.g. {values[0]}). Evaluate a model that regresses scores (num_labels 1), or add --do_train to "
                    "fine-tune this one on them."
                )
            if model_names and not as_it_is:
                logger.warning(
                    "The pretrained model %s names its classes %s, but %s holds scores (fractional numbers): the "
                    "fine-tuned model regresses them with a single output instead (num_labels 1, problem_type "
                    "regression).",
                    model, list(model_names), option,
                )  # fmt: skip
            self.names = []
            return
        if self.class_label_names is not None:
            found = self.class_label_names
        elif kind == "int":
            found = [str(value) for value in sorted(set(values))]
        else:
            found = sorted({str(value) for value in values})
        if model_names and set(found) <= set(model_names):
            self.names = sorted(model_names, key=model_names.get)
        elif as_it_is:
            self.names = unnamed_classes_as_labels(
                config, found, kind, self.class_label_names is not None, model, option, model_names
            )
        else:
            if model_names:
                logger.warning(
                    "The pretrained model %s names its classes %s, but %s holds labels it does not name (%s): the "
                    "fine-tuned model takes the data's labels %s as its classes instead (class i is the data's i-th "
                    "label, whatever the model's class i meant). To keep the model's classes, write the labels as "
                    "the model names them.",
                    model, list(model_names), option, sorted(set(found) - set(model_names))[:10], found[:20],
                )  # fmt: skip
            self.names = found
        self.ids = {name: index for index, name in enumerate(self.names)}

    def encode(self, values: list) -> list:
        if self.is_regression:
            return [float(value) for value in values]
        if self.class_label_names is not None:
            names = [self.class_label_names[value] for value in values]
        else:
            names = [str(value) for value in values]
        unknown = set(names) - set(self.ids)
        if unknown:
            raise ValueError(f"Labels {sorted(unknown)} do not occur in the training data (its labels: {self.names}).")
        return [self.ids[name] for name in names]

    def config_fields(self) -> dict:
        if self.is_regression:
            # transformers' placeholder name for the one output, given so that no named class outlives the head
            return {"num_labels": 1, "id2label": {0: "LABEL_0"}, "label2id": {"LABEL_0": 0},
                    "problem_type": "regression"}  # fmt: skip
        labels = {"num_labels": len(self.names), "id2label": dict(enumerate(self.names)), "label2id": dict(self.ids)}
        if self.sequence_head:
            labels["problem_type"] = "single_label_classification"
        return labels


def label_type(feature, values: list) -> str:
    """"float" (scores), "int" (class ids) or "name", by the column's type where it has one (JSON and CSV columns
    do), else by the values."""
    dtype = feature.dtype if isinstance(feature, datasets.Value) else None
    if dtype is None and not isinstance(feature, datasets.ClassLabel):
        if all(isinstance(value, int) and not isinstance(value, bool) for value in values):
            dtype = "int64"
        elif all(isinstance(value, (int, float)) and not isinstance(value, bool) for value in values):
            dtype = "float64"
    if dtype is not None and dtype.startswith("float"):
        return "float"
    if dtype is not None and dtype.startswith(("int", "uint")):
        return "int"
    return "name"


def named_classes(config) -> dict[str, int]:
    """A pretrained model's label2id where it names its classes; {} for a new model (None), and for transformers'
    placeholder names LABEL_0, LABEL_1, ... (a model never trained on named labels)."""
    if config is None:
        return {}
    label2id = {str(name): int(index) for name, index in (config.label2id or {}).items()}
    if label2id == {f"LABEL_{index}": index for index in range(len(label2id))}:
        return {}
    return label2id


def unnamed_classes_as_labels(
    config, found: list[str], kind: str, class_label: bool, model: str, option: str, model_names: dict
) -> list[str]:
    """The class names of a pretrained model evaluated as it is, for data whose labels `found` it does not all name:
    refused where it names its classes (it has none for some labels); where it does not (LABEL_0, LABEL_1, ...), the
    data's class ids are its classes, so they must be integers 0..num_labels-1, or the ids of a ClassLabel of
    num_labels names."""
    if model_names:
        missing = sorted(set(found) - set(model_names))
        raise ValueError(
            f"Without --do_train, {model} is evaluated as it is, with its classes {list(model_names)[:20]}; {option} "
            f"holds labels it has no class for: {missing[:10]}. Evaluate on data labelled with the model's classes "
            "(leave out the examples with other labels), or add --do_train to fine-tune it on these labels."
        )
    count = config.num_labels
    if class_label and len(found) == count:
        return found  # a ClassLabel's ids are its positions
    ids = [str(index) for index in range(count)]
    if kind == "int" and set(found) <= set(ids):
        return ids
    raise ValueError(
        f"Without --do_train, {model} is evaluated as it is, but it does not name its {count} classes (LABEL_0 .. "
        f"LABEL_{count - 1}), so {option}'s labels {found[:10]} cannot be matched to them. Give the labels as its "
        f"class ids 0..{count - 1}, or add --do_train to fine-tune it on these labels."
    )


def tokenize_splits(
    raw: datasets.DatasetDict, training_args: TrainingArguments, data_args: DataArguments, function: Callable
) -> datasets.DatasetDict:
    """`raw[split].map(function, batched=True)` for each split, replacing the raw columns; on the main process
    first, the others then read the cache."""
    with training_args.main_process_first(desc="tokenizing the data"):
        return datasets.DatasetDict(
            {
                split: dataset.map(
                    function,
                    batched=True,
                    num_proc=data_args.preprocessing_num_workers,
                    remove_columns=dataset.column_names,
                    desc=f"tokenizing {split}",
                )
                for split, dataset in raw.items()
            }
        )


# ----------------------------------------------------------------------------------------------------------------
# Tokenizer and model


def load_tokenizer(model_args: ModelArguments):
    source = model_args.tokenizer_name or model_args.model_name_or_path
    if source is None:
        raise ValueError("Training from --config_name needs a tokenizer: give --tokenizer_name.")
    return AutoTokenizer.from_pretrained(source)


def position_limit(model_args: ModelArguments) -> int | None:
    """How many token positions the model the run trains has, from its config (the data is tokenized before
    the model is built). A checkpoint selfattn converts is read as the selfattn config it becomes, whose
    max_position_embeddings leaves out the rows RoBERTa reserves; that count holds for transformers' own class
    too. Other configs are read as they are; None where they set no limit (relative positions)."""
    source = model_args.config_name or model_args.model_name_or_path
    try:
        config = modeling_selfattn.SelfAttnConfig.from_pretrained(source)
    except ValueError:  # a model_type selfattn does not convert, trained with --use_transformers_class
        config = AutoConfig.from_pretrained(source)
    return getattr(config, "max_position_embeddings", None)


def length_limit(tokenizer, model_args: ModelArguments) -> tuple[int, str]:
    """The most tokens the tokenizer and the model support, and which of them sets it: longer inputs would fail
    at the first step, on the model's position table."""
    limits = [
        (tokenizer.model_max_length, "the tokenizer's model_max_length"),
        (position_limit(model_args), "the model's max_position_embeddings"),
    ]
    return min((limit, source) for limit, source in limits if limit is not None)


def capped_length(option: str, requested: int, tokenizer, model_args: ModelArguments) -> int:
    """The token count `option` asks for, capped at length_limit. Like transformers' run_glue, the cap is taken
    with a warning rather than refused."""
    limit, source = length_limit(tokenizer, model_args)
    if requested > limit:
        logger.warning("%s %d is more than %s (%d); using %d.", option, requested, source, limit, limit)
        return limit
    return requested


def sequence_length(data_args: DataArguments, tokenizer, model_args: ModelArguments) -> int:
    """--max_seq_length, capped at what the tokenizer and the model support."""
    return capped_length("--max_seq_length", data_args.max_seq_length, tokenizer, model_args)


def load_model(model_args: ModelArguments, selfattn_class: type, auto_class: type, tokenizer, **config_fields):
    """The model to train: pretrained weights through selfattn's class (which also reads BERT-family checkpoints)
    or, with --use_transformers_class, through transformers' Auto class; or a new model from --config_name, whose
    vocabulary and special tokens are the tokenizer's. `config_fields` (labels, generation ids) override the
    config either way."""
    check_transformers_class(model_args)
    if model_args.model_name_or_path is not None:
        model_class = auto_class if model_args.use_transformers_class else selfattn_class
        return model_class.from_pretrained(model_args.model_name_or_path, **config_fields)
    special_tokens = {f"{name}_token_id": getattr(tokenizer, f"{name}_token_id") for name in ("pad", "bos", "eos")}
    config = AutoConfig.from_pretrained(
        model_args.config_name, **{"vocab_size": len(tokenizer), **special_tokens, **config_fields}
    )
    if getattr(config, "decoder_vocab_size", None) is not None:
        # Marian sizes its output layer separately from the (shared) input vocabulary.
        config.decoder_vocab_size = len(tokenizer)
    return auto_class.from_config(config)


def check_transformers_class(model_args: ModelArguments) -> None:
    """A selfattn model has no class of transformers' own: the Auto classes give selfattn's, so
    --use_transformers_class would go unused and the run train selfattn's class all the same."""
    if model_args.model_name_or_path is not None:
        option, source, example = "--model_name_or_path", model_args.model_name_or_path, "a BERT checkpoint"
    else:
        option, source, example = "--config_name", model_args.config_name, "configs/marian-transformer-small.json"
    model_type = modeling_selfattn.SelfAttnConfig.model_type
    if model_args.use_transformers_class and AutoConfig.from_pretrained(source).model_type == model_type:
        raise ValueError(
            f"--use_transformers_class trains transformers' own class for the model_type, but {option} {source} is "
            f"a {model_type} model, which has none: leave out --use_transformers_class, or give {option} a model of "
            f"another model_type (e.g. {example})."
        )


def add_lora(model, model_args: ModelArguments, task_type: str | None):
    """Wraps the model in LoRA adapters when --lora is set. PEFT picks the target modules for the model_type
    (selfattn: q_proj and v_proj), and for classification and QA task types also trains the head in full."""
    if not model_args.lora:
        return model
    from peft import LoraConfig, get_peft_model

    lora_config = LoraConfig(
        task_type=task_type, r=model_args.lora_r, lora_alpha=model_args.lora_alpha, lora_dropout=model_args.lora_dropout
    )
    peft_model = get_peft_model(model, lora_config)
    trainable, total = peft_model.get_nb_trainable_parameters()
    logger.info("LoRA: training %s of %s parameters (%.2f%%)", f"{trainable:,}", f"{total:,}", 100 * trainable / total)
    return peft_model


# ----------------------------------------------------------------------------------------------------------------
# Train, evaluate, save


def train_evaluate_save(
    *,
    model_args: ModelArguments,
    training_args: TrainingArguments,
    model,
    build_model: Callable,
    lora_task_type: str | None,
    data: datasets.DatasetDict,
    tokenizer,
    data_collator,
    compute_metrics: Callable | None = None,
    derived_eval_metrics: Callable[[dict], dict] | None = None,
    trainer_class: type = Trainer,
    examples: datasets.DatasetDict | None = None,
    rows_are: str | None = None,
) -> dict:
    """Trains `model` (in LoRA adapters with --lora) on data["train"] (resuming from --resume_from_checkpoint if
    given), saves it in --output_dir, evaluates it on data["validation"], and writes train_results.json /
    eval_results.json / all_results.json there. Returns the metrics of both; `derived_eval_metrics(eval_metrics)`
    adds metrics computed from the evaluation's (e.g. perplexity). train_samples / eval_samples count the examples:
    the rows of `data` where each is one, else those of `examples` (the raw splits), with the rows of `data` counted
    as train_<rows_are> / eval_<rows_are> (run_qa's windows, run_mlm's blocks).

    With --lora the adapter goes to OUTPUT_DIR/lora_adapter and the merged model to OUTPUT_DIR: the merge is
    done on a freshly built base model (`build_model()`) with the saved adapter, which works however the
    training was distributed."""
    trainer = trainer_class(
        model=add_lora(model, model_args, lora_task_type),
        args=training_args,
        train_dataset=data.get("train"),
        eval_dataset=data.get("validation"),
        processing_class=tokenizer,
        data_collator=data_collator,
        compute_metrics=compute_metrics,
    )
    metrics = {}
    if training_args.do_train:
        result = trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
        train_metrics = {**result.metrics, **sample_counts("train", data, examples, rows_are)}
        trainer.log_metrics("train", train_metrics)
        trainer.save_metrics("train", train_metrics)
        trainer.save_state()
        metrics.update(train_metrics)
        if model_args.lora:
            save_merged_lora_model(trainer, build_model, tokenizer)
        else:
            trainer.save_model()
    if training_args.do_eval:
        eval_metrics = {**trainer.evaluate(), **sample_counts("validation", data, examples, rows_are)}
        if derived_eval_metrics is not None:
            eval_metrics.update(derived_eval_metrics(eval_metrics))
        trainer.log_metrics("eval", eval_metrics)
        trainer.save_metrics("eval", eval_metrics)
        metrics.update(eval_metrics)
    return metrics


def sample_counts(
    split: str, data: datasets.DatasetDict, examples: datasets.DatasetDict | None, rows_are: str | None
) -> dict[str, int]:
    """<prefix>_samples, the examples of `split`, and where the model's rows are something else, their count."""
    prefix = "train" if split == "train" else "eval"
    if rows_are is None:
        return {f"{prefix}_samples": len(data[split])}
    return {f"{prefix}_samples": len(examples[split]), f"{prefix}_{rows_are}": len(data[split])}


def save_merged_lora_model(trainer, build_model: Callable, tokenizer) -> None:
    from peft import PeftModel

    output_dir = Path(trainer.args.output_dir)
    adapter_dir = output_dir / LORA_ADAPTER_FOLDER
    trainer.save_model(str(adapter_dir))
    trainer.accelerator.wait_for_everyone()
    if trainer.args.should_save:
        merged = PeftModel.from_pretrained(build_model(), adapter_dir).merge_and_unload()
        merged.save_pretrained(output_dir)
        if tokenizer is not None:
            tokenizer.save_pretrained(output_dir)
        logger.info("LoRA adapter saved in %s, the merged model in %s", adapter_dir, output_dir)
