"""`selfattn-convert`: checkpoints into selfattn and back, one command per direction.

    selfattn-convert bert SOURCE OUTPUT [--architecture NAME] [--verify] [--overwrite]
    selfattn-convert seq2seq SOURCE OUTPUT [--architecture NAME] [--verify] [--overwrite]
    selfattn-convert export SELFATTN_DIR OUTPUT [--family NAME] [--verify] [--overwrite]
    selfattn-convert onnx MODEL OUTPUT [--optimize] [--tolerance T] [--overwrite]

Also `python -m modeling_selfattn.convert_cli`. The scripts in conversion/ run the same commands under the
paths the README gave before there was a console script. The conversion itself is modeling_selfattn/checkpoints.py;
how OUTPUT is checked and replaced is modeling_selfattn/output_folder.py.
"""

import argparse
import shutil
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import transformers
from safetensors.torch import save_file
from transformers.dynamic_module_utils import get_relative_import_files
from transformers.utils import CONFIG_NAME, GENERATION_CONFIG_NAME, SAFE_WEIGHTS_INDEX_NAME, SAFE_WEIGHTS_NAME

from .checkpoints import (
    ENCODER_FAMILIES,
    EXPORT_FAMILIES,
    SAMPLE_TEXTS,
    SENTENCE_TRANSFORMERS_MODULES,
    SENTENCE_TRANSFORMERS_TOP_FILES,
    SEQ2SEQ_FAMILIES,
    TOKENIZER_FILES,
    TOKENIZER_FOLDERS,
    ConversionError,
    convert_checkpoint,
    export_checkpoint,
    read_config,
    resolve_folder,
    sentence_transformers_files,
    target_class,
    verify,
    verify_seq2seq,
)
from . import onnx_export
from .config import SelfAttnConfig
from .heads import HEADS_BY_CLASS
from .hub import card_with_source, exported_card, render_model_card
from .model import SelfAttnPreTrainedModel
from .output_folder import Output, OutputFailed, OutputRefused, RunOutputs, check_output, write_output

PROG = "selfattn-convert"


def reflowed(text: str) -> str:
    """`text` with each paragraph wrapped anew: the descriptions are put together from shared sentences, and
    --help prints them as they are (RawDescriptionHelpFormatter keeps the paragraphs apart)."""
    return "\n\n".join(textwrap.fill(" ".join(part.split()), 115) for part in text.strip().split("\n\n")) + "\n"


DESCRIPTION = """\
Convert BERT-family and encoder-decoder (Marian, BART) checkpoints to selfattn folders, and export selfattn folders
back to transformers' layouts: encoders to the BERT family, encoder-decoders to Marian or BART. `selfattn-convert
COMMAND --help` describes a command's arguments.

Every command writes OUTPUT in full beside itself and only then puts it in place, so a failed run leaves an
existing OUTPUT as it was and writes nothing. Exit status: 0 done, 1 the command failed, 2 bad arguments.
"""

SAFE_OUTPUT = """\
OUTPUT is written in full beside itself and only then put in place, so a failed run ({failures}) leaves an
existing OUTPUT as it was and writes nothing; --overwrite replaces an existing OUTPUT folder that way, where it
holds an earlier run's output of this command and nothing else (an entry the command does not write, such as
your own notes, is named in the refusal, to be moved out first). OUTPUT may not be {source}, contain it or lie
inside it, and may not be a file or a symbolic link (modeling_selfattn/output_folder.py says why). Exit status: 0
done, 1 {status_1}, 2 bad arguments.
"""

BERT_DESCRIPTION = reflowed(
    """\
Convert a BERT-family checkpoint (BERT, RoBERTa, XLM-RoBERTa, DistilBERT, ELECTRA, or a BERT-layout model such
as MiniLM) to a selfattn folder ready for `from_pretrained` and the Hub.

SOURCE is a checkpoint folder (safetensors or PyTorch .bin, sharded or not) or, where a network is, a Hub id.
OUTPUT gets model.safetensors, config.json, the model code, the tokenizer files and a model card naming the
source (keeping the source card's metadata and text) and, with --verify, the parity figures. The conversion report
is printed; any tensor that maps nowhere, is missing or has the wrong shape stops the conversion.

"""
    + SAFE_OUTPUT.format(
        failures="a conversion problem, parity beyond --tolerance, a write error",
        source="SOURCE",
        status_1="conversion failed, parity beyond --tolerance or writing failed",
    )
)

SEQ2SEQ_DESCRIPTION = reflowed(
    """\
Convert an encoder-decoder checkpoint (Marian: MarianMTModel or MarianModel; BART: BartForConditionalGeneration
or BartModel) to a selfattn folder ready for `from_pretrained`, `generate()` and the Hub.

SOURCE is a checkpoint folder (safetensors or PyTorch .bin, sharded or not) or, where a network is, a Hub id.
OUTPUT gets model.safetensors, config.json, the source's generation settings (generation_config.json), the model
code, the tokenizer files and a model card naming the source (keeping the source card's metadata and text) and,
with --verify, the parity figures: max abs difference of the logits and of the encoder output, and whether
generate() gives the source's tokens with greedy and 4-beam search. The conversion report is printed; any tensor
that maps nowhere, is missing or has the wrong shape stops the conversion.

"""
    + SAFE_OUTPUT.format(
        failures="a conversion problem, a failed --verify, a write error",
        source="SOURCE",
        status_1="conversion failed, parity beyond --tolerance, tokens that differ or writing failed",
    )
)

EXPORT_DESCRIPTION = reflowed(
    """\
Export a selfattn folder to a transformers layout: an encoder-only model to the BERT family (BERT or RoBERTa, or
the other encoder families of the conversion tables), an encoder-decoder to Marian (MarianMTModel, which
CTranslate2 converts) or BART. A shape the family cannot express (pre-LN, learned positions for Marian, ...) is
refused, naming the config field.

The family defaults to the one the model was converted from (config.json's source_model_type) and, for a model
without that record, to the first that can take it of bert, roberta, xlm-roberta, distilbert, electra (an encoder)
or marian, bart (an encoder-decoder). Where the family cannot take the model, the error names the --family values
that can. OUTPUT gets config.json, model.safetensors, the tokenizer files, the generation settings of an
encoder-decoder, the sentence-transformers files of a sentence-transformers model and a README.md keeping the
selfattn card's metadata and text, saying what was exported from what; it is then loaded with transformers' own
class to check that every tensor fits, and with --verify run beside the selfattn model on sample text. Converting
a BERT checkpoint and exporting it back gives bit-identical tensors and the source's config.json fields: those no
selfattn field holds are kept in the selfattn config.json's source_config and written back to that family alone.

"""
    + SAFE_OUTPUT.format(
        failures="a failed export, load check or --verify, a write error",
        source="SELFATTN_DIR",
        status_1="export failed, parity beyond --tolerance, tokens that differ or writing failed",
    )
)


ONNX_DESCRIPTION = reflowed(
    """\
Export a selfattn model folder to ONNX for ONNX Runtime, in the files and with the input and output names of
Hugging Face optimum.

Encoder heads (SelfAttnModel of an encoder-only config, MaskedLM, SequenceClassification, TokenClassification,
QuestionAnswering, MultipleChoice, PreTraining, ReplacedTokenDetection) give model.onnx: inputs input_ids,
attention_mask and, where the model has token types, token_type_ids; outputs named after the head's output fields
(last_hidden_state, logits, start_logits and end_logits, ...). SelfAttnForConditionalGeneration gives
encoder_model.onnx, decoder_model.onnx and decoder_with_past_model.onnx (past_key_values.N.decoder/encoder.key/value
in, present.N.decoder.key/value out); SelfAttnForCausalLM gives model.onnx with position_ids and
past_key_values.N.key/value in (0 tokens long at the first step) and present.N.key/value out. Batch and sequence
axes are dynamic. OUTPUT also gets config.json and the tokenizer files of MODEL.

Each graph is run with ONNX Runtime on inputs of other sizes than traced and compared with PyTorch; a max abs
difference beyond --tolerance stops the export. --optimize adds model_optimized.onnx (encoder heads only): ONNX
Runtime's transformer optimizer with its BERT fusions (attention, LayerNorm, GELU). Needs onnx and onnxruntime
(pip install 'selfattn[onnx]').

"""
    + SAFE_OUTPUT.format(
        failures="a failed export or check, a write error",
        source="MODEL",
        status_1="export, check or writing failed",
    )
)

# ---------------------------------------------------------------------------------------------------------------
# Arguments


def non_negative_tolerance(text: str) -> float:
    # `not >=` also catches nan, with which every comparison is false and --verify would pass anything.
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"{text} is not a number >= 0; pass e.g. --tolerance 1e-4.")
    return value


def add_overwrite(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="replace an existing OUTPUT, an earlier run's output of this command holding nothing else (once the new "
        "folder is complete)",
    )


DEFAULT_TOLERANCE = 1e-4


def add_tolerance(parser: argparse.ArgumentParser, what: str, default: float | None = DEFAULT_TOLERANCE) -> None:
    parser.add_argument(
        "--tolerance",
        type=non_negative_tolerance,
        default=default,
        help=f"largest max abs difference {what} (default {DEFAULT_TOLERANCE:g})",
    )


def add_verify(parser: argparse.ArgumentParser, verify_help: str) -> None:
    parser.add_argument("--verify", action="store_true", help=verify_help)
    # None until parse_args has seen whether --tolerance was given: without --verify it would bound nothing.
    add_tolerance(parser, "--verify accepts", default=None)


def add_conversion_arguments(parser: argparse.ArgumentParser, architecture_help: str, verify_help: str) -> None:
    parser.add_argument("source", help="checkpoint folder, or Hub id where a network is")
    parser.add_argument("output", type=Path, help="selfattn folder to write")
    parser.add_argument("--architecture", help=architecture_help)
    add_verify(parser, verify_help)
    add_overwrite(parser)


def add_onnx_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("source", metavar="MODEL", type=Path, help="selfattn model folder")
    parser.add_argument("output", metavar="OUTPUT", type=Path, help="folder to write the ONNX files to")
    parser.add_argument(
        "--optimize",
        action="store_true",
        help="also write model_optimized.onnx, fused by ONNX Runtime's transformer optimizer (encoder heads)",
    )
    add_tolerance(parser, "between ONNX Runtime and PyTorch accepted")
    add_overwrite(parser)


def add_export_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("source", type=Path, help="selfattn model folder (encoder-only or encoder-decoder)")
    parser.add_argument("output", type=Path, help="transformers checkpoint folder to write")
    parser.add_argument(
        "--family",
        choices=sorted(EXPORT_FAMILIES),
        help="layout to write (default: the family the model was converted from, else the first that takes it)",
    )
    add_verify(
        parser,
        "run transformers' model on OUTPUT and the selfattn model on sample text (encoder-decoders: logits and "
        "generate())",
    )
    add_overwrite(parser)


# ---------------------------------------------------------------------------------------------------------------
# What goes into OUTPUT


def copy_tokenizer_files(source_folder: Path, folder: Path) -> list[str]:
    """Copy SOURCE's tokenizer files (checkpoints.TOKENIZER_FILES: vocabulary, settings, chat templates) and folders
    (TOKENIZER_FOLDERS: the additional chat templates) into `folder`, which holds its config.json already, and check
    that the tokenizer loads there as it loads from SOURCE (`check_copied_tokenizer`); the names copied. An entry
    of a tokenizer file's name that is not a file (or of a folder's name that is not a folder) stops the run:
    skipping it would give a model whose tokenizer is silently incomplete."""
    source_folder = Path(source_folder)
    copied = []
    for name in TOKENIZER_FILES + TOKENIZER_FOLDERS:
        path = source_folder / name
        if not path.exists() and not path.is_symlink():
            continue
        wanted = "a folder" if name in TOKENIZER_FOLDERS else "a file"
        if not (path.is_dir() if name in TOKENIZER_FOLDERS else path.is_file()):
            what = (
                "a broken symbolic link" if not path.exists() else "a folder" if path.is_dir() else
                "a file" if path.is_file() else "neither a file nor a folder"
            )  # fmt: skip
            raise ConversionError(
                f"SOURCE's tokenizer entry {path} is {what}, not {wanted}, so the tokenizer cannot be copied. Put the "
                f"tokenizer's {name} there, or remove the entry if the tokenizer does not use it."
            )
        if path.is_dir():
            shutil.copytree(path, folder / name)  # files linked into a Hub cache are copied, not linked
        else:
            shutil.copy2(path, folder / name)
        copied.append(name)
    if not copied:
        print(
            f"note: SOURCE {source_folder} has no tokenizer files ({', '.join(TOKENIZER_FILES[:5])}, ...), so OUTPUT "
            "has none either; copy the tokenizer in by hand before using OUTPUT on text."
        )
        return copied
    check_copied_tokenizer(source_folder, folder, copied)
    return copied


def check_copied_tokenizer(source_folder: Path, folder: Path, copied: list[str]) -> None:
    """Raise ConversionError unless the tokenizer loads from `folder` as it loads from SOURCE: the same class,
    vocabulary, special tokens, chat templates, limits and ids for sample text. Files that load beside SOURCE's
    config.json need not load beside OUTPUT's, whose model_type may name another tokenizer or none; and a file left
    behind can leave a tokenizer that loads but differs (a chat template lost)."""
    output_tokenizer, error = load_tokenizer(folder)
    source_tokenizer, source_error = load_tokenizer(source_folder)
    if error is not None and source_error is not None:
        print(
            f"note: the tokenizer does not load here from SOURCE {source_folder} either ({source_error}), so its files "
            "are copied as they are, unchecked; a package it needs may be missing (Marian's: pip install "
            "sentencepiece)."
        )
        return
    if error is not None:
        raise ConversionError(
            f"The tokenizer files copied from {source_folder} ({', '.join(copied)}) load there but not as a tokenizer "
            f"in OUTPUT ({error}); nothing is written. Name its class in {source_folder / 'tokenizer_config.json'} "
            '("tokenizer_class"), and run again.'
        )
    if source_error is not None:
        print(
            f"note: the tokenizer loads from OUTPUT but not here from SOURCE {source_folder} ({source_error}), so the "
            "two could not be compared; check OUTPUT's tokenizer on your own text."
        )
        return
    expected, actual = tokenizer_summary(source_tokenizer), tokenizer_summary(output_tokenizer)
    differences = [name for name in expected if expected[name] != actual[name]]
    if differences:
        details = "; ".join(
            f"{name}: SOURCE {expected[name]!r:.120} but OUTPUT {actual[name]!r:.120}" for name in differences
        )
        raise ConversionError(
            f"The tokenizer copied from {source_folder} ({', '.join(copied)}) loads differently in OUTPUT ({details}); "
            "nothing is written. A file it reads is not among those copied (modeling_selfattn/checkpoints.py, "
            "TOKENIZER_FILES): please report it, and copy the tokenizer by hand meanwhile."
        )


def load_tokenizer(folder: Path):
    """(AutoTokenizer of `folder`, None), or (None, why it cannot load)."""
    try:
        return transformers.AutoTokenizer.from_pretrained(folder), None
    except Exception as error:  # a tokenizer's errors have no common base: a missing package, file or class
        return None, f"{type(error).__name__}: {' '.join(str(error).split())}"  # some span several lines


def tokenizer_summary(tokenizer) -> dict:
    """What a tokenizer does with text, to compare two copies of it."""
    return {
        "class": type(tokenizer).__name__,
        "vocabulary": tokenizer.get_vocab(),
        "special tokens": tokenizer.special_tokens_map,
        "all special tokens": tokenizer.all_special_tokens,  # with the extra ones, which the map leaves out
        "chat_template": tokenizer.chat_template,
        "model_max_length": tokenizer.model_max_length,
        "padding_side": tokenizer.padding_side,
        "ids of sample text": [tokenizer(text)["input_ids"] for text in SAMPLE_TEXTS],
    }


def copy_sentence_transformers_files(source_folder: Path, folder: Path) -> list[str]:
    """Copy SOURCE's sentence-transformers pipeline into `folder` (modules.json, its settings and every module
    folder it names; checkpoints.sentence_transformers_files lists them), so that SentenceTransformer(OUTPUT)
    runs the source's pooling, normalisation, dense layers and sequence length around the converted transformer,
    rather than a default mean pooling of its own. The names copied."""
    source_folder = Path(source_folder)
    names = sentence_transformers_files(source_folder)
    for name in names:
        path = source_folder / name
        if path.is_dir():
            shutil.copytree(path, folder / name)  # files linked into a Hub cache are copied, not linked
        else:
            shutil.copy2(path, folder / name)
    if names:
        print(f"kept the sentence-transformers pipeline: {', '.join(names)}")
    return names


def write_model_card(output: Path, section: str, source: str, source_folder: Path, served_libraries: tuple) -> None:
    """Append the conversion section to the generated card, keep the card from being regenerated (it is now partly
    written by hand), and keep what the card of SOURCE says (hub.card_with_source): its metadata and text, with
    base_model naming SOURCE where it is a Hub id."""
    readme = output / MODEL_CARD
    card = readme.read_text(encoding="utf-8") if readme.exists() else ""
    card = "\n".join(line for line in card.splitlines() if "selfattn: generated from config.json" not in line)
    card = card.rstrip() + "\n\n" + section
    source_card = read_card(source_folder / MODEL_CARD, "SOURCE")
    base_model = None if Path(source).is_dir() else str(source)  # a local path names nothing on the Hub
    readme.write_text(card_with_source(card, source_card, source, base_model, served_libraries), encoding="utf-8")
    if source_card is not None:
        print("kept the model card of SOURCE: its metadata and, below the conversion's, its text")


def read_card(path: Path, name: str) -> str | None:
    """The content of the README.md at `path`, None where there is none."""
    if not path.is_file():
        return None
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise ConversionError(
            f"{name}'s model card {path} is not UTF-8 text ({error}), so it cannot be kept in OUTPUT's; save it as "
            "UTF-8 (as the Hub requires) or move it away, and run again."
        ) from error


def served_libraries(sentence_transformers_files: list[str]) -> tuple:
    """The libraries besides transformers that load the folder written, given the sentence-transformers files it got:
    a card that names one keeps its library_name and pipeline_tag."""
    return ("sentence-transformers",) if sentence_transformers_files else ()


def conversion_header(command: str, source: str, report, seconds: float, extra: str = "") -> list[str]:
    dtype = f" Tensors kept in {report.dtype}." if report.dtype else ""
    return [
        "## Conversion",
        "",
        f"Converted from `{source}` (`{report.architecture}`) to `{report.target}` with `{PROG} {command}` of the "
        f"selfattn package in {seconds:.1f} s: {len(report.mapped)} tensors mapped, {len(report.dropped)} dropped "
        f"(no selfattn counterpart needed).{dtype}{extra}",
        "",
    ]


UNMEASURED = "Parity with the source model was not measured (convert with `--verify` to measure it)."
# How --verify compares (checkpoints.in_float32), whatever dtype the tensors are kept in.
PARITY_DTYPE = "both models run in float32, which holds bfloat16 and float16 weights exactly"


def bert_card_section(source: str, report, diffs: dict | None, seconds: float) -> str:
    lines = conversion_header("bert", source, report, seconds)
    if diffs is None:
        lines.append(UNMEASURED)
    else:
        lines += [
            f"Parity with the source transformers model on a padded batch of sample sentences (max abs diff; "
            f"{PARITY_DTYPE}):",
            "",
            "| output | max abs diff |",
            "|---|---|",
        ]
        lines += [f"| {name} | {value:.2e} |" for name, value in diffs.items()]
    return "\n".join(lines) + "\n"


def seq2seq_card_section(source: str, report, verification: tuple | None, seconds: float) -> str:
    kept = " The source's generation settings are kept in generation_config.json."
    lines = conversion_header("seq2seq", source, report, seconds, kept)
    if verification is None:
        lines.append(UNMEASURED)
        return "\n".join(lines) + "\n"
    diffs, mismatches = verification
    lines += [
        f"Parity with the source transformers model on a padded batch of sample sentences ({PARITY_DTYPE}):",
        "",
        "| check | result |",
        "|---|---|",
    ]
    lines += [f"| {name} max abs diff | {value:.2e} |" for name, value in diffs.items()]
    lines += [f"| generate(), {name}: sequences that differ | {count} |" for name, count in mismatches.items()]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------------------------
# What a run of each command writes into OUTPUT: all that --overwrite may replace. A folder holding anything else
# (the user's notes, an eval/ folder) is refused before any work (output_folder.check_output_folder), naming it.


def shipped_code(cls: type) -> tuple[str, ...]:
    """The code files save_pretrained copies beside a saved `cls` as remote code (transformers'
    custom_object_save): the module that defines it and those that module imports relatively."""
    module_file = Path(sys.modules[cls.__module__].__file__)
    return tuple(sorted({module_file.name, *(Path(path).name for path in get_relative_import_files(module_file))}))


def top_entry(location: str) -> str | None:
    """The entry of a folder that a path relative to it (as a file names another) lies in; None for a path
    outside it."""
    parts = Path(location).parts
    if not parts or Path(location).is_absolute() or ".." in parts:
        return None
    return parts[0]


def sentence_transformers_entries(folder: Path) -> list[str]:
    """The module folders an earlier output's modules.json names, copied from its SOURCE with it; none where
    modules.json cannot be followed, which leaves them to be named in the refusal."""
    try:
        return [entry for entry in map(top_entry, sentence_transformers_files(folder)) if entry is not None]
    except ConversionError:
        return []


def graph_tensors(graph) -> Iterator:
    """Every tensor an ONNX graph holds: its initializers and the tensors of its nodes' attributes, subgraphs
    included."""
    yield from graph.initializer
    for sparse in graph.sparse_initializer:
        yield from (sparse.values, sparse.indices)
    for node in graph.node:
        for attribute in node.attribute:
            if attribute.HasField("t"):
                yield attribute.t
            yield from attribute.tensors
            for subgraph in [*([attribute.g] if attribute.HasField("g") else []), *attribute.graphs]:
                yield from graph_tensors(subgraph)


def onnx_external_data(folder: Path) -> list[str]:
    """The entries of `folder` that hold the external data of the ONNX graphs an earlier `onnx` run wrote there
    (a graph over 2 GB keeps its tensors in files beside it, which the exporter names after the tensors); none
    where onnx is not installed or a graph cannot be read, which leaves the files to be named in the refusal."""
    try:
        import onnx
    except ImportError:
        return []
    entries = []
    for name in ONNX_GRAPH_FILES:
        if not (folder / name).is_file():
            continue
        try:
            model = onnx.load_model(folder / name, load_external_data=False)
        except Exception:  # noqa: BLE001 -- not a graph onnx reads: its data stays unexplained
            continue
        for tensor in graph_tensors(model.graph):
            if tensor.data_location == onnx.TensorProto.EXTERNAL:
                entries += [top_entry(entry.value) for entry in tensor.external_data if entry.key == "location"]
    return [entry for entry in entries if entry is not None]


MODEL_CARD = "README.md"
# save_pretrained's weights, whole or in shards with their index (model-00001-of-00002.safetensors).
WEIGHT_FILES = (
    SAFE_WEIGHTS_NAME,
    SAFE_WEIGHTS_NAME.replace(".safetensors", "-*-of-*.safetensors"),
    SAFE_WEIGHTS_INDEX_NAME,
)
# copy_tokenizer_files and copy_sentence_transformers_files; the sentence-transformers module folders are those
# modules.json names (sentence_transformers_entries).
TOKENIZER_ENTRIES = TOKENIZER_FILES + TOKENIZER_FOLDERS
SENTENCE_TRANSFORMERS_ENTRIES = (SENTENCE_TRANSFORMERS_MODULES, *SENTENCE_TRANSFORMERS_TOP_FILES)
# onnx_export's graphs (GraphSpec.file_name of each kind of model) and --optimize's fused one.
ONNX_GRAPH_FILES = onnx_export.GRAPH_FILES


def conversion_outputs(command: str) -> RunOutputs:
    """What converted_model writes: save_pretrained's config, weights, generation settings (of a model that
    generates) and model code, the card, the tokenizer and the sentence-transformers pipeline."""
    return RunOutputs(
        f"{PROG} {command} run",
        markers=(CONFIG_NAME,),
        beside=(
            *WEIGHT_FILES,
            GENERATION_CONFIG_NAME,
            *shipped_code(SelfAttnPreTrainedModel),
            *shipped_code(SelfAttnConfig),
            MODEL_CARD,
            *TOKENIZER_ENTRIES,
            *SENTENCE_TRANSFORMERS_ENTRIES,
        ),
        named_inside=sentence_transformers_entries,
    )


# What export's `write` writes: transformers' config (no code), the weights, an encoder-decoder's generation
# settings, the tokenizer, the sentence-transformers pipeline and the card.
EXPORT_OUTPUTS = RunOutputs(
    f"{PROG} export run",
    markers=(CONFIG_NAME,),
    beside=(SAFE_WEIGHTS_NAME, GENERATION_CONFIG_NAME, *TOKENIZER_ENTRIES, *SENTENCE_TRANSFORMERS_ENTRIES, MODEL_CARD),
    named_inside=sentence_transformers_entries,
)

# What export_onnx's `write` writes: the graphs (with any external data), the selfattn config with its code, the
# generation settings of a model that generates, and the tokenizer. No card.
ONNX_OUTPUTS = RunOutputs(
    f"{PROG} onnx run",
    markers=(CONFIG_NAME,),
    beside=(*ONNX_GRAPH_FILES, *shipped_code(SelfAttnConfig), GENERATION_CONFIG_NAME, *TOKENIZER_ENTRIES),
    named_inside=onnx_external_data,
)


# ---------------------------------------------------------------------------------------------------------------
# The commands: each does its work and hands back how to write OUTPUT; `run` does the rest


@dataclass(frozen=True)
class Prepared:
    write: Callable[[Path], None]  # fills the new folder that then replaces OUTPUT
    source_folder: Path | None  # SOURCE as read, checked against OUTPUT once more before writing
    written: str  # what OUTPUT holds, for the last line printed


@contextmanager
def running_both_models(verb: str):
    """Where --verify runs the two models on sample text: an error of either (a config its forward refuses, a
    tokenizer that does not load) stops the run as a ConversionError, which `run` prints with what became of
    OUTPUT, rather than as a traceback. `verb` ("Convert", "Export") starts the advice."""
    try:
        yield
    except ConversionError:
        raise
    except Exception as error:  # from either model's forward or generate()
        raise ConversionError(
            f"--verify could not run the two models on sample text ({type(error).__name__}: {error}); nothing is "
            f"written. {verb} without --verify and compare them on your own inputs."
        ) from error


def check_parity(diffs: dict[str, float], tolerance: float) -> None:
    """Raise ConversionError when a --verify difference exceeds --tolerance."""
    beyond = {name: value for name, value in diffs.items() if not value <= tolerance}  # nan is beyond too
    if beyond:
        figures = ", ".join(f"{name} {value:.3e}" for name, value in beyond.items())
        raise ConversionError(
            f"--verify: the converted model differs from the source beyond --tolerance {tolerance:g} (max abs "
            f"diff {figures}), so nothing is written. Check that --architecture fits the checkpoint, or pass a "
            "larger --tolerance if this difference is acceptable."
        )


def converted_model(args: argparse.Namespace, model, report, card_section: Callable[[float], str], start: float):
    source_folder = resolve_folder(args.source)

    def write(folder: Path) -> None:
        model.save_pretrained(folder)  # a seq2seq model's generation_config.json holds the source's settings
        # save_pretrained names the card after the folder it writes, the hidden sibling that becomes OUTPUT.
        card = render_model_card(model, Path(args.output).resolve().name)
        (folder / MODEL_CARD).write_text(card, encoding="utf-8")
        copy_tokenizer_files(source_folder, folder)
        served = served_libraries(copy_sentence_transformers_files(source_folder, folder))
        write_model_card(folder, card_section(time.perf_counter() - start), args.source, source_folder, served)

    return Prepared(write, source_folder, report.target)


# Which families each conversion command takes (with the script in conversion/ that runs it): the engine converts
# every family, but each command checks (--verify) and describes its own.
CONVERSION_COMMANDS = {
    "bert": (ENCODER_FAMILIES, "convert_bert.py", "an encoder-only (BERT-family) model"),
    "seq2seq": (SEQ2SEQ_FAMILIES, "convert_seq2seq.py", "an encoder-decoder"),
}


def check_command_takes(source, command: str) -> None:
    """Refuse, before any tensor is read, a checkpoint whose model_type the conversion `command` does not take,
    naming the command that does."""
    model_type = read_config(resolve_folder(source)).get("model_type")
    families = CONVERSION_COMMANDS[command][0]
    if model_type in families:
        return
    for other, (other_families, script, kind) in CONVERSION_COMMANDS.items():
        if model_type in other_families:
            raise ConversionError(
                f"SOURCE {source} holds a {model_type!r} checkpoint, {kind}, which `{PROG} {command}` does not "
                f"convert (it takes {sorted(families)}); convert it with `{PROG} {other} SOURCE OUTPUT` (or "
                f"conversion/{script}) instead."
            )
    taken = ", ".join(f"`{name}` takes {sorted(entry[0])}" for name, entry in CONVERSION_COMMANDS.items())
    raise ConversionError(
        f"SOURCE {source} holds a model_type={model_type!r} checkpoint, which no {PROG} command converts: {taken} "
        "(BERT-layout models such as MiniLM have model_type bert)."
    )


def convert_bert(args: argparse.Namespace, start: float) -> Prepared:
    check_command_takes(args.source, "bert")
    model, report = convert_checkpoint(args.source, args.architecture, progress=True)
    print(report.summary())
    diffs = None
    if args.verify:
        with running_both_models("Convert"):
            diffs = verify(args.source, model)
        for name, value in diffs.items():
            print(f"max abs diff {name}: {value:.3e}")
        check_parity(diffs, args.tolerance)
    section = partial(bert_card_section, args.source, report, diffs)
    return converted_model(args, model, report, section, start)


def convert_seq2seq(args: argparse.Namespace, start: float) -> Prepared:
    check_command_takes(args.source, "seq2seq")
    model, report = convert_checkpoint(args.source, args.architecture, progress=True)
    print(report.summary())
    verification = None
    if args.verify:
        if not model.can_generate():
            raise ConversionError(
                f"--verify runs generate(), which {report.target}, the bare model, cannot; leave out --verify, or "
                "convert a checkpoint with the generation head (MarianMTModel, BartForConditionalGeneration)."
            )
        with running_both_models("Convert"):
            diffs, mismatches = verify_seq2seq(args.source, model)
        for name, value in diffs.items():
            print(f"max abs diff {name}: {value:.3e}")
        for name, count in mismatches.items():
            print(f"generate() {name}: {count} sequence(s) differ from the source's")
        check_parity(diffs, args.tolerance)
        if any(mismatches.values()):
            raise ConversionError(
                f"--verify: generate() gives other tokens than the source model (sequences that differ: "
                f"{mismatches}), so nothing is written. Check that --architecture fits the checkpoint."
            )
        verification = (diffs, mismatches)
    section = partial(seq2seq_card_section, args.source, report, verification)
    return converted_model(args, model, report, section, start)


def check_loads(config, folder: Path) -> None:
    """Load `folder` with transformers' own class; raise ConversionError unless every tensor fits."""
    architecture = config.architectures[0]
    _, loading_info = getattr(transformers, architecture).from_pretrained(folder, output_loading_info=True)
    problems = {kind: sorted(keys) for kind, keys in loading_info.items() if kind != "error_msgs" and keys}
    if problems:
        raise ConversionError(
            f"{architecture} does not load the exported tensors cleanly: {problems}; nothing is written. This is "
            "a gap in the conversion tables of modeling_selfattn/checkpoints.py: please report it."
        )


def ctranslate2_notes(config, state_dict: dict) -> list[str]:
    """What keeps a Marian export from translating exactly as the selfattn model with CTranslate2, whose Marian
    converter drops the last vocabulary entry as <pad> and starts the decoder from a zero vector instead of the
    embedding of a start token."""
    if config.model_type != "marian":
        return []
    notes = []
    pad = config.pad_token_id
    if pad != config.vocab_size - 1:
        notes.append(
            f"pad_token_id is {pad}, not the last id ({config.vocab_size - 1}): CTranslate2's Marian converter removes "
            "the last token as <pad>, so its vocabulary and weights would no longer match"
        )
    if config.decoder_start_token_id != pad:
        notes.append(
            f"decoder_start_token_id is {config.decoder_start_token_id}, not pad_token_id ({pad}): CTranslate2 starts "
            "Marian decoders from a zero vector, which only the padding row can be"
        )
    table = state_dict.get("model.shared.weight", state_dict.get("shared.weight"))
    if table is not None and pad is not None and 0 <= pad < len(table) and table[pad].any():
        notes.append(
            f"the padding row (id {pad}) of the token table is not zero (training moves it when the output layer "
            "shares the table), while CTranslate2 starts the decoder from a zero vector"
        )
    return notes


def export(args: argparse.Namespace, start: float) -> Prepared:
    config, state_dict, report = export_checkpoint(args.source, args.family, progress=True)
    print(report.summary())
    for note in ctranslate2_notes(config, state_dict):
        print(f"note: {note}; CTranslate2's translations would differ (README, CTranslate2).")

    def write(folder: Path) -> None:
        config.save_pretrained(folder)
        tensors = {name: tensor.contiguous() for name, tensor in state_dict.items()}
        save_file(tensors, folder / SAFE_WEIGHTS_NAME, metadata={"format": "pt"})
        generation_config = Path(args.source) / GENERATION_CONFIG_NAME
        if config.is_encoder_decoder and generation_config.is_file():
            # The decoding settings (start, end and padding tokens, lengths, beams) mean the same in every family.
            shutil.copy2(generation_config, folder / generation_config.name)
        copy_tokenizer_files(args.source, folder)
        served = served_libraries(copy_sentence_transformers_files(args.source, folder))
        check_loads(config, folder)
        if args.verify:
            verify_export(args, folder)
        write_export_card(args, folder, config, report, served)

    return Prepared(write, args.source, config.architectures[0])


def write_export_card(args: argparse.Namespace, folder: Path, config, report, served: tuple) -> None:
    """OUTPUT's README.md: the selfattn folder's card metadata and text (hub.exported_card), with a section saying
    what was exported from what."""
    selfattn_class = report.architecture
    section = (
        f"# {Path(args.output).resolve().name}\n\n## Export\n\nExported with `{PROG} export` of the selfattn package "
        f"from the selfattn model `{args.source}` (`{selfattn_class}`) to transformers' `{config.architectures[0]}` "
        f"({config.model_type}), which loads without custom code: {len(report.mapped)} tensors written as they "
        f"are, {len(report.computed)} computed from them.\n"
    )
    pipeline_tag = HEADS_BY_CLASS[selfattn_class].pipeline_tag if selfattn_class in HEADS_BY_CLASS else None
    selfattn_card = read_card(Path(args.source) / MODEL_CARD, "SELFATTN_DIR")
    (folder / MODEL_CARD).write_text(exported_card(selfattn_card, section, pipeline_tag, served), encoding="utf-8")


def verify_export(args: argparse.Namespace, folder: Path) -> None:
    """Run transformers' model on the exported `folder` and the selfattn model of SELFATTN_DIR on sample text;
    raise ConversionError beyond --tolerance or on other tokens."""
    selfattn_config = read_config(args.source)
    model = target_class((selfattn_config.get("architectures") or ["SelfAttnModel"])[0]).from_pretrained(args.source)
    if model.config.is_encoder_decoder and not model.can_generate():
        raise ConversionError(
            "--verify runs generate(), which the bare encoder-decoder (SelfAttnModel) cannot; leave out --verify, or "
            "export a model with the generation head (SelfAttnForConditionalGeneration)."
        )
    with running_both_models("Export"):
        if model.config.is_encoder_decoder:
            # The start token takes a position too.
            max_new_tokens = min(16, model.config.max_position_embeddings - 1)
            diffs, mismatches = verify_seq2seq(folder, model, max_new_tokens=max_new_tokens)
        else:
            diffs, mismatches = verify(folder, model), {}
    for name, value in diffs.items():
        print(f"max abs diff {name}: {value:.3e}")
    for name, count in mismatches.items():
        print(f"generate() {name}: {count} sequence(s) differ from the selfattn model's")
    beyond = {name: value for name, value in diffs.items() if not value <= args.tolerance}  # nan is beyond too
    if beyond or any(mismatches.values()):
        figures = ", ".join(f"{name} {value:.3e}" for name, value in beyond.items())
        raise ConversionError(
            f"--verify: the exported model differs from the selfattn model (max abs diff beyond --tolerance "
            f"{args.tolerance:g}: {figures or 'none'}; sequences generated differently: {mismatches or 'none'}), so "
            "nothing is written. For a difference, pass a larger --tolerance if it is acceptable; other tokens are a "
            "gap in the conversion tables of modeling_selfattn/checkpoints.py: please report them."
        )


def export_onnx(args: argparse.Namespace, start: float) -> Prepared:
    onnx_export.require_onnx_runtime()
    model = onnx_export.load_for_export(args.source)

    def write(folder: Path) -> None:
        report = onnx_export.export_onnx(model, folder, optimize=args.optimize, tolerance=args.tolerance)
        for file_name, figures in onnx_export.summarized_differences(report.differences).items():
            print(f"{file_name}, ONNX Runtime vs PyTorch, max abs diff: {figures}")
        if report.fused_operators is not None:
            fused = ", ".join(f"{name} {count}" for name, count in report.fused_operators.items()) or "none"
            print(f"fused by ONNX Runtime's optimizer: {fused}")
        model.config.save_pretrained(folder)
        if model.can_generate():
            model.generation_config.save_pretrained(folder)
        copy_tokenizer_files(args.source, folder)

    return Prepared(write, args.source, f"{type(model).__name__} as ONNX")


@dataclass(frozen=True)
class Command:
    summary: str  # its line in `selfattn-convert --help`
    description: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    prepare: Callable[[argparse.Namespace, float], Prepared]
    writes: RunOutputs  # all that --overwrite may replace in OUTPUT
    source_name: str = "SOURCE"  # in messages, as the description calls it


COMMANDS = {
    "bert": Command(
        "BERT, RoBERTa, XLM-RoBERTa, DistilBERT, ELECTRA or MiniLM checkpoint -> selfattn folder",
        BERT_DESCRIPTION,
        partial(
            add_conversion_arguments,
            architecture_help="source architecture to convert (default: config.json's), e.g. BertForPreTraining for "
            "a checkpoint that holds both pre-training heads",
            verify_help="run the source transformers model and the converted one on sample text",
        ),
        convert_bert,
        conversion_outputs("bert"),
    ),
    "seq2seq": Command(
        "Marian or BART encoder-decoder checkpoint -> selfattn folder",
        SEQ2SEQ_DESCRIPTION,
        partial(
            add_conversion_arguments,
            architecture_help="source architecture to convert (default: config.json's), e.g. MarianModel",
            verify_help="run the source transformers model and the converted one on sample text: logits and "
            "generate()",
        ),
        convert_seq2seq,
        conversion_outputs("seq2seq"),
    ),
    "export": Command(
        "selfattn folder -> transformers checkpoint (BERT family for an encoder, Marian or BART for an "
        "encoder-decoder)",
        EXPORT_DESCRIPTION,
        add_export_arguments,
        export,
        EXPORT_OUTPUTS,
        source_name="SELFATTN_DIR",
    ),
    "onnx": Command(
        "selfattn model folder -> ONNX graphs for ONNX Runtime (optimum's layout and names)",
        ONNX_DESCRIPTION,
        add_onnx_arguments,
        export_onnx,
        ONNX_OUTPUTS,
        source_name="MODEL",
    ),
}


def failed(error: BaseException | str, status: int, target: Output | None = None) -> int:
    """Print the error (and, once OUTPUT has been checked, what became of it); the exit status."""
    print(f"error: {error}", file=sys.stderr)
    if target is not None and not isinstance(error, OutputFailed):  # OutputFailed says it already
        print(target.untouched(), file=sys.stderr)
    return status


def run(command: Command, args: argparse.Namespace) -> int:
    try:
        target = check_output(args.output, args.source, args.overwrite, command.writes)
    except OutputRefused as error:
        return failed(error, 2)
    start = time.perf_counter()
    try:
        prepared = command.prepare(args, start)
        write_output(target, prepared.write, prepared.source_folder)
    except OutputRefused as error:
        return failed(error, 2)
    except (ConversionError, OutputFailed) as error:
        return failed(error, 1, target)
    except OSError as error:  # reading SOURCE: writing errors arrive as OutputFailed
        return failed(
            f"Cannot read {command.source_name} {args.source} ({error}); make its files readable and run again.",
            1,
            target,
        )
    print(f"wrote {args.output} ({prepared.written}) in {time.perf_counter() - start:.1f} s")
    return 0


def build_parser(script_name: str | None = None) -> argparse.ArgumentParser:
    """`script_name`, for the scripts in conversion/ that each run one command, stands in usage and error
    messages for `selfattn-convert COMMAND`, since their users leave out the command."""
    parser = argparse.ArgumentParser(
        prog=PROG, description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    commands = parser.add_subparsers(title="commands", metavar="COMMAND", required=True)
    for name, command in COMMANDS.items():
        subparser = commands.add_parser(
            name,
            prog=script_name,
            help=command.summary,
            description=command.description,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        command.add_arguments(subparser)
        subparser.set_defaults(command=command, command_parser=subparser)
    return parser


def parse_args(argv=None, script_name: str | None = None) -> argparse.Namespace:
    args = build_parser(script_name).parse_args(argv)
    if "verify" in args:
        if args.tolerance is None:
            args.tolerance = DEFAULT_TOLERANCE
        elif not args.verify:
            args.command_parser.error(
                "argument --tolerance: applies only with --verify, the check whose differences it bounds; add "
                "--verify, or leave out --tolerance."
            )
    return args


def main(argv=None, script_name: str | None = None) -> int:
    args = parse_args(argv, script_name)
    return run(args.command, args)


if __name__ == "__main__":
    sys.exit(main())
