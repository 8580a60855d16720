"""`selfattn-convert` (modeling_selfattn/convert_cli.py) and its wrappers conversion/convert_bert.py,
convert_seq2seq.py and export_bert.py as a user runs them: --help, a conversion with --verify into a folder with
tokenizer and model card, refusal to overwrite, a non-zero exit on failure, and the export back to BERT with
bit-identical tensors.

Nothing lost, nothing silent: an OUTPUT that is SOURCE, contains it or lies inside it, a file, a symbolic link
or a place that cannot be written is refused before anything is read or written; and a run that fails anywhere
(a tokenizer file that cannot be read, a full disk, a failed --verify, a failed final rename) leaves SOURCE and
an existing OUTPUT byte-identical (sha256 of every file) and no partial folder behind."""

import dataclasses
import errno
import hashlib
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers
from conftest import WORD_PIECE_VOCAB_SIZE, save_word_piece_tokenizer
from safetensors.torch import load_file

from modeling_selfattn import SelfAttnForSequenceClassification, checkpoints, convert_cli
from modeling_selfattn.checkpoints import convert_checkpoint

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = {name: ROOT / "conversion" / f"{name}.py" for name in ("convert_bert", "convert_seq2seq", "export_bert")}


def load_script(name: str):
    spec = importlib.util.spec_from_file_location(name, SCRIPTS[name])
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("name", ["convert_bert", "export_bert"])  # test_seq2seq_parity.py runs convert_seq2seq's
def test_help(name):
    result = subprocess.run([sys.executable, str(SCRIPTS[name]), "--help"], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr
    assert "usage:" in result.stdout and "--overwrite" in result.stdout


def test_cli_help_lists_the_commands():
    command = [sys.executable, "-m", "modeling_selfattn.convert_cli"]
    result = subprocess.run([*command, "--help"], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr
    assert "usage: selfattn-convert" in result.stdout
    for name in ("bert", "seq2seq", "export"):
        assert re.search(rf"^\s+{name}\s", result.stdout, re.MULTILINE), result.stdout
    result = subprocess.run([*command, "bert", "--help"], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr
    assert "usage: selfattn-convert bert" in result.stdout
    assert all(option in result.stdout for option in ("--architecture", "--verify", "--tolerance", "--overwrite"))


def test_installed_console_script_help():
    executable = Path(sys.executable).with_name("selfattn-convert")
    if not executable.exists():
        pytest.skip("selfattn-convert is not installed in this environment (pip install -e . installs it)")
    result = subprocess.run([str(executable), "--help"], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr
    assert all(name in result.stdout for name in ("bert", "seq2seq", "export"))


def test_wrapper_usage_leaves_out_the_command():
    """The wrapper supplies the command itself, so its usage line must not tell the user to type it."""
    result = subprocess.run(
        [sys.executable, str(SCRIPTS["convert_bert"]), "--help"], capture_output=True, text=True, check=False
    )
    assert result.stdout.startswith("usage: convert_bert.py [-h]"), result.stdout


@pytest.fixture(scope="module")
def bert_folder(tmp_path_factory) -> Path:
    """A tiny random BertForSequenceClassification with a WordPiece tokenizer of its own vocabulary."""
    folder = tmp_path_factory.mktemp("bert")
    save_word_piece_tokenizer(folder)
    config = transformers.BertConfig(
        vocab_size=WORD_PIECE_VOCAB_SIZE, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37,
        max_position_embeddings=32, num_labels=3,
    )
    torch.manual_seed(0)
    transformers.BertForSequenceClassification(config).save_pretrained(folder)
    return folder


def test_convert_verify_and_export_back(bert_folder, tmp_path, capsys):
    converted, exported = tmp_path / "selfattn", tmp_path / "bert"
    assert load_script("convert_bert").main([str(bert_folder), str(converted), "--verify"]) == 0
    printed = capsys.readouterr().out
    assert "BertForSequenceClassification -> SelfAttnForSequenceClassification" in printed
    assert "max abs diff last_hidden_state" in printed and "max abs diff logits" in printed
    assert {"vocab.txt", "tokenizer_config.json", "README.md", "model.safetensors"} <= {p.name for p in converted.iterdir()}
    card = (converted / "README.md").read_text()
    assert "| logits |" in card
    assert "\n# selfattn\n" in card and ".partial-" not in card  # named for OUTPUT, not the folder written first
    assert SelfAttnForSequenceClassification.from_pretrained(converted).config.num_labels == 3

    assert load_script("export_bert").main([str(converted), str(exported)]) == 0
    original, back = load_file(bert_folder / "model.safetensors"), load_file(exported / "model.safetensors")
    assert sorted(original) == sorted(back)
    assert all(torch.equal(original[name], back[name]) for name in original)
    assert json.loads((exported / "config.json").read_text())["architectures"] == ["BertForSequenceClassification"]
    assert (exported / "vocab.txt").read_text() == (bert_folder / "vocab.txt").read_text()


def test_cli_and_wrapper_write_the_same_folder(bert_folder, tmp_path):
    from_cli, from_wrapper = tmp_path / "cli" / "model", tmp_path / "wrapper" / "model"
    assert convert_cli.main(["bert", str(bert_folder), str(from_cli), "--verify"]) == 0
    assert load_script("convert_bert").main([str(bert_folder), str(from_wrapper), "--verify"]) == 0
    names = sorted(path.name for path in from_cli.iterdir())
    assert names == sorted(path.name for path in from_wrapper.iterdir())
    for name in names:
        if name == "model.safetensors":
            ours, theirs = load_file(from_cli / name), load_file(from_wrapper / name)
            assert sorted(ours) == sorted(theirs)
            assert all(torch.equal(ours[key], theirs[key]) for key in ours)
        elif name == "README.md":  # the card records how long the run took
            seconds = re.compile(r"in \d+\.\d s")
            card = [seconds.sub("in _ s", (folder / name).read_text()) for folder in (from_cli, from_wrapper)]
            assert card[0] == card[1]
        else:
            assert (from_cli / name).read_bytes() == (from_wrapper / name).read_bytes(), name


def test_existing_output_needs_overwrite(bert_folder, tmp_path, capsys):
    output = tmp_path / "out"
    output.mkdir()
    (output / "config.json").write_text("{}")  # a model folder from an earlier run
    (output / "model.safetensors").write_bytes(b"the previous weights")
    convert = load_script("convert_bert")
    assert convert.main([str(bert_folder), str(output)]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert (output / "model.safetensors").read_bytes() == b"the previous weights"
    assert convert.main([str(bert_folder), str(output), "--overwrite"]) == 0
    assert (output / "model.safetensors").read_bytes() != b"the previous weights"
    assert sorted(path.name for path in tmp_path.iterdir()) == ["out"]  # no partial or old folder left beside it
    assert load_script("export_bert").main([str(output), str(output)]) == 2


def test_failures_exit_non_zero(bert_folder, tmp_path, capsys):
    convert = load_script("convert_bert")
    assert convert.main([str(bert_folder), str(tmp_path / "a"), "--architecture", "BertForMaskedLM"]) == 1
    error = capsys.readouterr().err
    assert "classifier.weight" in error and "BertForSequenceClassification" in error
    assert convert.main([str(tmp_path / "missing"), str(tmp_path / "b")]) == 1
    assert "not a local folder" in capsys.readouterr().err
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


# ---------------------------------------------------------------------------------------------------------------
# Nothing lost: SOURCE and an existing OUTPUT survive every refusal and every failure byte for byte


def tree_hashes(folder: Path) -> dict[str, str]:
    """sha256 of every file under `folder` by relative path, with folders and symbolic links (not followed)
    listed too, so that a file or folder added, removed or changed shows."""
    hashes = {}
    for root, folders, files in os.walk(folder):
        for name in folders + files:
            path = Path(root, name)
            key = str(path.relative_to(folder))
            if path.is_symlink():
                hashes[key] = f"link to {os.readlink(path)}"
            elif path.is_dir():
                hashes[key] = "folder"
            else:
                hashes[key] = hashlib.sha256(path.read_bytes()).hexdigest()
    return hashes


@pytest.fixture(scope="module")
def selfattn_folder(bert_folder, tmp_path_factory) -> Path:
    """bert_folder converted: export_bert.py's SOURCE."""
    folder = tmp_path_factory.mktemp("selfattn")
    model, _ = convert_checkpoint(bert_folder)
    model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def bart_folder(tmp_path_factory) -> Path:
    """A tiny random BartForConditionalGeneration (no tokenizer): convert_seq2seq.py's SOURCE."""
    folder = tmp_path_factory.mktemp("bart")
    config = transformers.BartConfig(
        vocab_size=99, d_model=16, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
        decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32, max_position_embeddings=32,
    )
    torch.manual_seed(0)
    transformers.BartForConditionalGeneration(config).save_pretrained(folder)
    return folder


SOURCE_OF = {"convert_bert": "bert_folder", "convert_seq2seq": "bart_folder", "export_bert": "selfattn_folder"}


def source_copy(request, script: str, folder: Path) -> Path:
    """A private copy of the script's source checkpoint: the code under test must not be able to damage the
    module's shared one for the next test."""
    shutil.copytree(request.getfixturevalue(SOURCE_OF[script]), folder)
    return folder


def overlap_case(case: str, tmp_path: Path, source: Path) -> tuple[str, str]:
    """(SOURCE argument, OUTPUT argument) of one way to point OUTPUT at SOURCE or at a folder that holds it."""
    parent = source.parent
    if case == "same":
        return str(source), str(source)
    if case == "parent":
        return str(source), str(parent)
    if case == "parent via ..":
        return str(source), f"{source}/.."
    if case == "parent via symlinked SOURCE":
        (tmp_path / "link").symlink_to(source, target_is_directory=True)
        return str(tmp_path / "link"), str(parent)
    if case == "SOURCE via symlinked parent and ..":
        (tmp_path / "alias").symlink_to(parent, target_is_directory=True)
        return str(source), f"{tmp_path / 'alias' / source.name / 'sub'}/.."
    if case == "inside":
        return str(source), str(source / "selfattn")
    raise ValueError(case)


OVERLAPS = [
    ("convert_bert", "same"),
    ("convert_bert", "parent"),
    ("convert_bert", "parent via .."),
    ("convert_bert", "parent via symlinked SOURCE"),
    ("convert_bert", "SOURCE via symlinked parent and .."),
    ("convert_bert", "inside"),
    ("convert_seq2seq", "same"),
    ("convert_seq2seq", "parent"),
    ("export_bert", "same"),
    ("export_bert", "parent via .."),
]


@pytest.mark.parametrize("script, case", OVERLAPS, ids=[f"{script}-{case}" for script, case in OVERLAPS])
def test_output_over_source_is_refused(script, case, request, tmp_path, capsys):
    source = source_copy(request, script, tmp_path / "models" / "source")
    (tmp_path / "models" / "notes.txt").write_text("unrelated, kept")
    source_arg, output_arg = overlap_case(case, tmp_path, source)
    before = tree_hashes(tmp_path)
    assert load_script(script).main([source_arg, output_arg, "--overwrite"]) == 2
    error = capsys.readouterr().err
    assert f"OUTPUT {Path(output_arg)}" in error and "SOURCE" in error and "Pass" in error, error
    assert tree_hashes(tmp_path) == before


def test_output_inside_source_names_the_rule(bert_folder, tmp_path, capsys):
    source = shutil.copytree(bert_folder, tmp_path / "source")
    assert load_script("convert_bert").main([str(source), str(source / "selfattn")]) == 2
    assert "lies inside SOURCE" in capsys.readouterr().err and not (source / "selfattn").exists()


def test_output_containing_a_downloaded_source_is_refused(bert_folder, tmp_path, monkeypatch, capsys):
    """A Hub id becomes a folder only once downloaded: OUTPUT is checked against that folder too (here a
    cache folder that OUTPUT contains), before anything is replaced."""
    import modeling_selfattn.checkpoints as conversion

    cache = tmp_path / "cache"
    snapshot = shutil.copytree(bert_folder, cache / "models--org--bert" / "snapshot")
    (cache / "config.json").write_text("{}")  # passes the up-front check of a model folder to replace
    # The up-front check refuses models--org--bert/ already, as no conversion writes it: with that check out of the
    # way, the one after the download is what must refuse.
    monkeypatch.setitem(convert_cli.COMMANDS, "bert", dataclasses.replace(convert_cli.COMMANDS["bert"], writes=None))
    convert = load_script("convert_bert")
    hub = lambda source, **kwargs: snapshot if source == "org/bert" else Path(source)  # noqa: E731
    monkeypatch.setattr(conversion, "resolve_folder", hub)
    monkeypatch.setattr(convert_cli, "resolve_folder", hub)
    before = tree_hashes(tmp_path)
    assert convert.main(["org/bert", str(cache), "--overwrite"]) == 2
    assert "contains SOURCE" in capsys.readouterr().err
    assert tree_hashes(tmp_path) == before


@pytest.fixture
def existing_output(tmp_path) -> Path:
    """An OUTPUT folder from an earlier run, to be replaced with --overwrite: only what a conversion or export
    writes, a folder among it (a sentence-transformers module)."""
    output = tmp_path / "out" / "model"
    output.mkdir(parents=True)
    (output / "config.json").write_text('{"model_type": "selfattn"}')
    (output / "model.safetensors").write_bytes(b"the previous model")
    write_modules(output, "1_Pooling")
    (output / "1_Pooling").mkdir()
    (output / "1_Pooling" / "config.json").write_text("kept until the new model is complete")
    return output


def write_modules(folder: Path, *module_folders: str) -> None:
    """A sentence-transformers modules.json: the transformer at the top, and a module in each of `module_folders`."""
    modules = [{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"}]
    modules += [
        {"idx": index, "name": str(index), "path": path, "type": "sentence_transformers.models.Pooling"}
        for index, path in enumerate(module_folders, 1)
    ]
    (folder / "modules.json").write_text(json.dumps(modules))


def deny_writing(monkeypatch, folder: Path) -> None:
    """Make `folder` not writable: by its permissions for a normal user, and, as root ignores those, by what
    os.access answers."""
    folder.chmod(0o555)

    def access(path, mode, *args, _access=os.access, **kwargs):
        if Path(path).resolve() == folder.resolve() and mode & os.W_OK:
            return False
        return _access(path, mode, *args, **kwargs)

    monkeypatch.setattr(os, "access", access)


def refused_output(kind: str, tmp_path: Path, existing: Path, monkeypatch) -> Path:
    if kind == "file":
        (tmp_path / "out" / "model.safetensors").write_bytes(b"weights, not a folder")
        return tmp_path / "out" / "model.safetensors"
    if kind == "symlink":
        (tmp_path / "out" / "link").symlink_to(existing, target_is_directory=True)
        return tmp_path / "out" / "link"
    if kind == "read-only folder":
        deny_writing(monkeypatch, existing)
        return existing
    if kind == "read-only parent":
        deny_writing(monkeypatch, existing.parent)
        return existing
    if kind == "new, read-only parent":
        deny_writing(monkeypatch, existing.parent)
        return existing.parent / "new"
    if kind == "new, beneath a file":
        (tmp_path / "out" / "config.json").write_text("{}")
        return tmp_path / "out" / "config.json" / "model"
    raise ValueError(kind)


REFUSED = {
    "file": "is a file, not a folder",
    "symlink": "is a symbolic link",
    "read-only folder": "is not writable",
    "read-only parent": "is not writable",
    "new, read-only parent": "is not writable",
    "new, beneath a file": "is a file, not a folder",
}


@pytest.mark.parametrize("kind", REFUSED)
def test_unusable_output_is_refused(kind, bert_folder, existing_output, tmp_path, monkeypatch, capsys):
    source = shutil.copytree(bert_folder, tmp_path / "source")
    output = refused_output(kind, tmp_path, existing_output, monkeypatch)
    before = tree_hashes(tmp_path)
    try:
        assert load_script("convert_bert").main([str(source), str(output), "--overwrite"]) == 2
        assert tree_hashes(tmp_path) == before
    finally:
        for folder in (existing_output, existing_output.parent):
            folder.chmod(0o755)
    error = capsys.readouterr().err
    assert f"OUTPUT {output}" in error and REFUSED[kind] in error and "pass" in error.lower(), error


def fail_copying(name: str, error: OSError):
    """shutil.copy2 that fails for the file `name`: a tokenizer file that cannot be read (tests run as root,
    where chmod 000 does not stop reading)."""

    def copy2(source, destination, *args, _copy2=shutil.copy2, **kwargs):
        if Path(source).name == name:
            raise error
        return _copy2(source, destination, *args, **kwargs)

    return copy2


def fail_renaming_in(source, destination, _rename=os.rename):
    if ".partial-" in Path(source).name:  # the new folder moving into OUTPUT's place
        raise OSError(errno.EXDEV, "Invalid cross-device link", str(source))
    return _rename(source, destination)


FAILURES = [
    "unreadable tokenizer file",
    "tokenizer file is a folder",
    "tokenizer that does not load",
    "disk full",
    "failed --verify",
    "final rename",
]


def break_run(failure: str, source: Path, monkeypatch) -> list[str]:
    """Make the run fail as `failure` says; extra arguments for it."""
    if failure == "unreadable tokenizer file":
        unreadable = PermissionError(errno.EACCES, "Permission denied")
        monkeypatch.setattr(shutil, "copy2", fail_copying("vocab.txt", unreadable))
    elif failure == "tokenizer file is a folder":
        (source / "vocab.txt").unlink()
        (source / "vocab.txt").mkdir()
    elif failure == "tokenizer that does not load":
        # An older Hub layout (vocab.txt and settings), for which AutoTokenizer goes by SOURCE's model_type, and a
        # conversion that did not record the class: OUTPUT's model_type, selfattn, names no tokenizer.
        (source / "tokenizer.json").unlink()
        settings = json.loads((source / "tokenizer_config.json").read_text())
        del settings["tokenizer_class"]
        (source / "tokenizer_config.json").write_text(json.dumps(settings))
        monkeypatch.setattr(checkpoints, "model_type_tokenizer_class", lambda folder, config_dict: {})
    elif failure == "disk full":
        def full(folder, *card):
            raise OSError(errno.ENOSPC, "No space left on device", str(folder / "README.md"))

        monkeypatch.setattr(convert_cli, "write_model_card", full)
    elif failure == "failed --verify":
        diffs = {"last_hidden_state": 2e-6, "logits": 0.25}
        monkeypatch.setattr(convert_cli, "verify", lambda source, model: diffs)
        return ["--verify"]
    elif failure == "final rename":
        monkeypatch.setattr(os, "rename", fail_renaming_in)
    return []


FAILURE_MESSAGES = {
    "unreadable tokenizer file": "Permission denied",
    "tokenizer file is a folder": "vocab.txt is a folder",
    "tokenizer that does not load": "load there but not as a tokenizer in OUTPUT",
    "disk full": "No space left on device",
    "failed --verify": "logits 2.500e-01",
    "final rename": "Cannot move the new folder into OUTPUT",
}


@pytest.mark.parametrize("failure", FAILURES)
def test_failed_run_leaves_existing_output_as_it_was(
    failure, bert_folder, existing_output, tmp_path, monkeypatch, capsys
):
    source = shutil.copytree(bert_folder, tmp_path / "source")
    convert = load_script("convert_bert")
    extra = break_run(failure, source, monkeypatch)
    before_source, before_output = tree_hashes(source), tree_hashes(tmp_path / "out")
    assert convert.main([str(source), str(existing_output), "--overwrite", *extra]) == 1
    error = capsys.readouterr().err
    assert FAILURE_MESSAGES[failure] in error and f"OUTPUT {existing_output} is unchanged." in error, error
    assert tree_hashes(source) == before_source
    assert tree_hashes(tmp_path / "out") == before_output  # the old model, and nothing partial beside it


@pytest.mark.parametrize(
    "failure",
    ["unreadable tokenizer file", "tokenizer file is a folder", "tokenizer that does not load", "failed --verify"],
)
def test_failed_run_leaves_no_new_output(failure, bert_folder, tmp_path, monkeypatch, capsys):
    """Nothing that looks like a model, and no parent folder made for it."""
    source = shutil.copytree(bert_folder, tmp_path / "source")
    convert = load_script("convert_bert")
    extra = break_run(failure, source, monkeypatch)
    output = tmp_path / "new" / "deeper" / "model"
    assert convert.main([str(source), str(output), *extra]) == 1
    assert f"OUTPUT {output} was not created." in capsys.readouterr().err
    assert sorted(path.name for path in tmp_path.iterdir()) == ["source"]


def test_seq2seq_failed_verify_leaves_existing_output(bart_folder, existing_output, tmp_path, monkeypatch, capsys):
    source = shutil.copytree(bart_folder, tmp_path / "source")
    convert = load_script("convert_seq2seq")
    verification = ({"logits": 1e-6, "encoder_last_hidden_state": 1e-6}, {"greedy": 0, "beam": 2})
    monkeypatch.setattr(convert_cli, "verify_seq2seq", lambda source, model: verification)
    before = tree_hashes(tmp_path)
    assert convert.main([str(source), str(existing_output), "--overwrite", "--verify"]) == 1
    error = capsys.readouterr().err
    assert "generate() gives other tokens" in error and "'beam': 2" in error and "nothing is written" in error
    assert tree_hashes(tmp_path) == before


@pytest.mark.parametrize("script, verifier", [("convert_bert", "verify"), ("convert_seq2seq", "verify_seq2seq")])
def test_verify_that_cannot_run_the_models_is_an_error(script, verifier, request, tmp_path, monkeypatch, capsys):
    """An exception of either model's forward is the run's error, with what became of OUTPUT, not a traceback."""
    source = source_copy(request, script, tmp_path / "source")

    def refuse(source, model):
        raise ValueError("The dimension to be chunked 22 has to be a multiple of the chunk size 4")

    monkeypatch.setattr(convert_cli, verifier, refuse)
    output = tmp_path / "out"
    assert load_script(script).main([str(source), str(output), "--verify"]) == 1
    error = capsys.readouterr().err
    assert "--verify could not run the two models" in error and "the chunk size 4" in error, error
    assert f"OUTPUT {output} was not created." in error and not output.exists()


def test_verify_pads_to_the_feed_forward_chunks(bert_folder, tmp_path, capsys):
    """transformers' BERT refuses a length its feed-forward chunks (chunk_size_feed_forward, which the conversion
    carries over) do not divide, so --verify pads its sample batch (22 tokens) to a multiple of them; return_dict
    False in the config leaves it outputs by name."""
    source = shutil.copytree(bert_folder, tmp_path / "source")
    config = json.loads((source / "config.json").read_text())
    (source / "config.json").write_text(json.dumps({**config, "chunk_size_feed_forward": 4, "return_dict": False}))
    output = tmp_path / "out"
    assert load_script("convert_bert").main([str(source), str(output), "--verify"]) == 0
    assert "max abs diff logits: 0.000e+00" in capsys.readouterr().out
    converted = json.loads((output / "config.json").read_text())
    assert (converted["chunk_size_feed_forward"], converted["return_dict"]) == (4, False)



# (chunk_size_feed_forward, positions an input can take): chunks that do not divide the 64 tokens --verify samples,
# in a position table that holds a chunk-padded sample, and in one shorter than the longest sample text, where the
# sample is cut to whole chunks that fit (RoBERTa's table also holds the rows up to its padding row).
FITTING_CHUNKS = [(3, 160), (128, 160), (3, 17)]


def chunked_source(folder: Path, model_type: str, chunk: int, positions: int) -> Path:
    """A tiny random transformers model of `model_type` whose feed-forward takes `chunk` positions at a time."""
    folder.mkdir()
    save_word_piece_tokenizer(folder)
    config = transformers.AutoConfig.for_model(
        model_type, vocab_size=WORD_PIECE_VOCAB_SIZE, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=37, pad_token_id=0, chunk_size_feed_forward=chunk,
        max_position_embeddings=positions + (1 if model_type == "roberta" else 0),
    )
    torch.manual_seed(0)
    transformers.AutoModel.from_config(config).save_pretrained(folder)
    return folder


@pytest.mark.parametrize("model_type", ["bert", "roberta"])
@pytest.mark.parametrize("chunk, positions", FITTING_CHUNKS)
def test_verify_takes_any_feed_forward_chunk(model_type, chunk, positions, tmp_path, capsys):
    source = chunked_source(tmp_path / "source", model_type, chunk, positions)
    converted, exported = tmp_path / "selfattn", tmp_path / "exported"
    assert convert_cli.main(["bert", str(source), str(converted), "--verify"]) == 0, capsys.readouterr().err
    assert convert_cli.main(["export", str(converted), str(exported), "--verify"]) == 0, capsys.readouterr().err
    printed = capsys.readouterr().out
    assert printed.count("max abs diff last_hidden_state") == 2, printed
    assert json.loads((exported / "config.json").read_text())["chunk_size_feed_forward"] == chunk


@pytest.mark.parametrize("model_type", ["bert", "roberta"])
def test_verify_names_a_chunk_longer_than_the_position_table(model_type, tmp_path, capsys):
    """No input is both a whole number of 128-position chunks and at most 100 positions long: transformers' model
    refuses every input, which --verify says, naming the fields, before running either model."""
    source = chunked_source(tmp_path / "source", model_type, 128, 100)
    converted = tmp_path / "selfattn"
    assert convert_cli.main(["bert", str(source), str(converted), "--verify"]) == 1
    error = capsys.readouterr().err
    assert "chunk_size_feed_forward=128" in error and "max_position_embeddings" in error, error
    assert "takes only 100 tokens" in error and "Leave out --verify" in error, error
    assert convert_cli.main(["bert", str(source), str(converted)]) == 0
    assert convert_cli.main(["export", str(converted), str(tmp_path / "exported"), "--verify"]) == 1
    assert "chunk_size_feed_forward=128" in capsys.readouterr().err


# bert-base-uncased's layout: vocab.txt and a tokenizer_config.json of settings, with the class named in config.json
# or nowhere (AutoTokenizer then goes by model_type, which OUTPUT's config no longer has).
OLDER_HUB_TOKENIZER = {"class in config.json": {"tokenizer_class": "BertTokenizer"}, "class named nowhere": {}}


@pytest.mark.parametrize("case", OLDER_HUB_TOKENIZER)
def test_tokenizer_of_an_older_hub_layout_loads_from_output(case, bert_folder, tmp_path, capsys):
    source, output = shutil.copytree(bert_folder, tmp_path / "source"), tmp_path / "out"
    (source / "tokenizer.json").unlink()
    (source / "tokenizer_config.json").write_text(json.dumps({"do_lower_case": True}))
    config = json.loads((source / "config.json").read_text())
    (source / "config.json").write_text(json.dumps({**config, **OLDER_HUB_TOKENIZER[case]}))
    assert load_script("convert_bert").main([str(source), str(output)]) == 0
    added = "config fields added (the source's model_type implied them): {'tokenizer_class'"
    assert (added in capsys.readouterr().out) == (case == "class named nowhere")
    assert json.loads((output / "config.json").read_text())["tokenizer_class"] == "BertTokenizer"
    tokenizers = [transformers.AutoTokenizer.from_pretrained(folder) for folder in (output, source)]
    assert type(tokenizers[0]).__name__ == "BertTokenizer"
    assert tokenizers[0]("The cat sat")["input_ids"] == tokenizers[1]("The cat sat")["input_ids"]


def test_tokenizer_that_does_not_load_from_source_either_is_copied_with_a_note(bert_folder, tmp_path, capsys):
    # e.g. a package the tokenizer needs is missing here (Marian's sentencepiece); here, a download cut short
    source = shutil.copytree(bert_folder, tmp_path / "source")
    (source / "tokenizer.json").write_text('{"version": "1.0", "trunc')
    output = tmp_path / "out"
    assert load_script("convert_bert").main([str(source), str(output)]) == 0
    printed = capsys.readouterr().out
    assert f"note: the tokenizer does not load here from SOURCE {source} either" in printed
    assert (output / "tokenizer.json").read_bytes() == (source / "tokenizer.json").read_bytes()


def test_marian_tokenizer_files_are_all_copied(tmp_path, monkeypatch):
    # MarianTokenizer's vocab_files_names; target_vocab.json where the two languages have vocabularies of their own
    # (separate_vocabs=True).
    names = ["source.spm", "target.spm", "vocab.json", "target_vocab.json", "tokenizer_config.json"]
    source, output = tmp_path / "source", tmp_path / "out"
    source.mkdir()
    output.mkdir()
    for name in names:
        (source / name).write_text(name)
    # The check that they load would need sentencepiece, which MarianTokenizer imports; this test is about copying.
    monkeypatch.setattr(convert_cli, "check_copied_tokenizer", lambda *args: None)
    assert sorted(convert_cli.copy_tokenizer_files(source, output)) == sorted(names)
    assert all((output / name).read_text() == name for name in names)


def test_export_failed_write_leaves_existing_output(selfattn_folder, existing_output, tmp_path, monkeypatch, capsys):
    source = shutil.copytree(selfattn_folder, tmp_path / "source")
    export = load_script("export_bert")

    def full(tensors, path, metadata=None):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(convert_cli, "save_file", full)
    before = tree_hashes(tmp_path)
    assert export.main([str(source), str(existing_output), "--overwrite"]) == 1
    error = capsys.readouterr().err
    assert "No space left on device" in error and f"OUTPUT {existing_output} is unchanged." in error
    assert tree_hashes(tmp_path) == before


def test_overwrite_keeps_the_folder_permissions(bert_folder, existing_output, tmp_path):
    existing_output.chmod(0o750)
    assert load_script("convert_bert").main([str(bert_folder), str(existing_output), "--overwrite"]) == 0
    assert existing_output.stat().st_mode & 0o777 == 0o750
    assert (existing_output / "model.safetensors").read_bytes() != b"the previous model"
    assert sorted(path.name for path in existing_output.parent.iterdir()) == ["model"]


def test_corrupt_weights_are_named(bert_folder, tmp_path, capsys):
    source = shutil.copytree(bert_folder, tmp_path / "source")
    (source / "model.safetensors").write_bytes((source / "model.safetensors").read_bytes()[:100])
    assert load_script("convert_bert").main([str(source), str(tmp_path / "out")]) == 1
    error = capsys.readouterr().err
    assert str(source / "model.safetensors") in error and "re-download or re-save it" in error, error
    assert not (tmp_path / "out").exists()


def test_verify_that_gives_nan_fails(bert_folder, tmp_path, monkeypatch, capsys):
    """nan compares false with everything: a check written as `diff > tolerance` would let it through."""
    convert = load_script("convert_bert")
    monkeypatch.setattr(convert_cli, "verify", lambda source, model: {"logits": float("nan")})
    assert convert.main([str(bert_folder), str(tmp_path / "out"), "--verify"]) == 1
    assert "logits nan" in capsys.readouterr().err and not (tmp_path / "out").exists()


@pytest.mark.parametrize("command", ["bert", "seq2seq", "export"])
def test_tolerance_needs_verify(command, capsys):
    """--tolerance bounds what --verify measures; without --verify it would be accepted and do nothing."""
    with pytest.raises(SystemExit) as exit_status:
        convert_cli.parse_args([command, "source", "output", "--tolerance", "1e-3"])
    assert exit_status.value.code == 2
    error = capsys.readouterr().err
    assert f"usage: selfattn-convert {command}" in error
    assert "argument --tolerance: applies only with --verify" in error, error
    assert convert_cli.parse_args([command, "source", "output", "--verify", "--tolerance", "1e-3"]).tolerance == 1e-3
    assert convert_cli.parse_args([command, "source", "output", "--verify"]).tolerance == 1e-4


@pytest.mark.parametrize("value", ["nan", "-1e-4"])
def test_tolerance_must_be_a_non_negative_number(value, capsys):
    with pytest.raises(SystemExit) as exit_status:
        convert_cli.parse_args(["bert", "source", "output", f"--tolerance={value}"])
    assert exit_status.value.code == 2
    assert "argument --tolerance" in capsys.readouterr().err


def test_converted_electra_discriminator_ships_its_code(tmp_path):
    # The ELECTRA discriminator becomes SelfAttnForReplacedTokenDetection, which has no Auto class slot of its own in
    # the package: its folder must still carry the model code its auto_map points at.
    source, converted = tmp_path / "electra", tmp_path / "selfattn"
    config = transformers.ElectraConfig(
        vocab_size=40, embedding_size=16, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=37, max_position_embeddings=32,
    )
    torch.manual_seed(0)
    transformers.ElectraForPreTraining(config).save_pretrained(source)
    assert load_script("convert_bert").main([str(source), str(converted), "--verify"]) == 0
    auto_map = json.loads((converted / "config.json").read_text())["auto_map"]
    assert auto_map["AutoModelForPreTraining"] == "model.SelfAttnForReplacedTokenDetection"
    for target in auto_map.values():
        module, class_name = target.split(".")
        assert f"class {class_name}(" in (converted / f"{module}.py").read_text(), target


def test_overwrite_refuses_a_folder_that_holds_no_model(bert_folder, tmp_path, capsys):
    project = tmp_path / "project"
    project.mkdir()
    (project / "notes.txt").write_text("mine")
    before = tree_hashes(project)
    assert load_script("convert_bert").main([str(bert_folder), str(project), "--overwrite"]) == 2
    assert "not a model folder" in capsys.readouterr().err
    assert tree_hashes(project) == before


def test_distilbert_model_without_a_classifier_dropout_exports(tmp_path, capsys):
    """selfattn's classifier_dropout=None means hidden_dropout_prob; DistilBertConfig's seq_classif_dropout takes a
    number only, so export writes that one: the exported model gives the selfattn model's logits and, training, drops
    out as much before its classifier."""
    source, selfattn, exported = tmp_path / "distilbert", tmp_path / "selfattn", tmp_path / "exported"
    config = transformers.DistilBertConfig(
        vocab_size=40, dim=32, n_layers=2, n_heads=4, hidden_dim=37, max_position_embeddings=32, num_labels=3,
    )
    torch.manual_seed(0)
    transformers.DistilBertForSequenceClassification(config).save_pretrained(source)
    model, _ = convert_checkpoint(source)
    model.config.classifier_dropout, model.config.hidden_dropout_prob = None, 0.15
    model.save_pretrained(selfattn)
    model = SelfAttnForSequenceClassification.from_pretrained(selfattn).eval()
    assert model.config.classifier_dropout is None

    assert load_script("export_bert").main([str(selfattn), str(exported), "--verify", "--tolerance", "1e-5"]) == 0
    assert "max abs diff logits" in capsys.readouterr().out
    assert json.loads((exported / "config.json").read_text())["seq_classif_dropout"] == 0.15
    reference = transformers.DistilBertForSequenceClassification.from_pretrained(exported).eval()
    assert reference.dropout.p == model.dropout.p == 0.15
    generator = torch.Generator().manual_seed(1)
    attention_mask = (torch.arange(9) < torch.tensor([[9], [5], [7]])).long()
    input_ids = torch.randint(1, 40, (3, 9), generator=generator).masked_fill(attention_mask == 0, 0)
    with torch.no_grad():
        expected = reference(input_ids=input_ids, attention_mask=attention_mask).logits
        actual = model(input_ids=input_ids, attention_mask=attention_mask).logits
    assert (expected - actual).abs().max().item() <= 1e-5


def test_config_json_comes_back_from_convert_and_export(tmp_path, capsys):
    """The DistilBERT fields no selfattn field holds (qa_dropout, sinusoidal_pos_embds, a field a user added) are kept
    in the selfattn config.json's source_config and written back by the export: the exported config.json is the
    source's, less transformers' record of its version."""
    source, selfattn, exported = tmp_path / "distilbert", tmp_path / "selfattn", tmp_path / "exported"
    source.mkdir()
    save_word_piece_tokenizer(source)
    config = transformers.DistilBertConfig(
        vocab_size=WORD_PIECE_VOCAB_SIZE, dim=32, n_layers=2, n_heads=4, hidden_dim=37, max_position_embeddings=32,
        num_labels=3, qa_dropout=0.25, seq_classif_dropout=0.3, sinusoidal_pos_embds=True, users_field=[1, "kept"],
    )
    torch.manual_seed(0)
    transformers.DistilBertForSequenceClassification(config).save_pretrained(source)
    kept = {"qa_dropout": 0.25, "sinusoidal_pos_embds": True, "users_field": [1, "kept"]}

    assert convert_cli.main(["bert", str(source), str(selfattn)]) == 0
    printed = capsys.readouterr().out
    kept_note = "config fields kept for export in source_config (no selfattn code uses them; export to this family"
    assert f"{kept_note} writes them back): {sorted(kept)}" in printed
    assert "not carried over" not in printed
    assert json.loads((selfattn / "config.json").read_text())["source_config"] == kept

    assert convert_cli.main(["export", str(selfattn), str(exported)]) == 0
    printed = capsys.readouterr().out
    assert f"config fields written back as the conversion recorded them (source_config): {sorted(kept)}" in printed
    assert "defaults" not in printed

    def config_json(folder: Path) -> dict:
        config_dict = json.loads((folder / "config.json").read_text())
        del config_dict["transformers_version"]
        return config_dict

    assert config_json(exported) == config_json(source)
    assert transformers.DistilBertForSequenceClassification.from_pretrained(exported).config.qa_dropout == 0.25


# --- a checkpoint's dtype is kept -----------------------------------------------------------------------------------


def half_precision_source(model_type: str, dtype: torch.dtype, folder: Path) -> Path:
    """A tiny random BertForMaskedLM (with its tokenizer) or MarianMTModel (without: --verify then runs on random ids)
    saved in `dtype`, as checkpoints published in bfloat16 or float16 are."""
    torch.manual_seed(0)
    folder.mkdir()
    if model_type == "bert":
        save_word_piece_tokenizer(folder)
        config = transformers.BertConfig(
            vocab_size=WORD_PIECE_VOCAB_SIZE, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
            intermediate_size=37, max_position_embeddings=32,
        )
        model = transformers.BertForMaskedLM(config)
    else:
        config = transformers.MarianConfig(
            vocab_size=99, d_model=16, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
            decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32, max_position_embeddings=32,
            pad_token_id=98, eos_token_id=0, decoder_start_token_id=98, forced_eos_token_id=0,
        )
        model = transformers.MarianMTModel(config)
    model.to(dtype).save_pretrained(folder)
    return folder


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("model_type", ["bert", "marian"])
def test_half_precision_checkpoint_keeps_its_dtype_through_conversion_and_export(model_type, dtype, tmp_path, capsys):
    """Converted with --verify and exported back, a bfloat16 or float16 checkpoint stays one: the same tensors bit for
    bit (not float32 copies of twice the size), config.json saying so. --verify runs both models in float32, which
    holds the half-precision weights exactly, so its tolerance is the float32 one."""
    source = half_precision_source(model_type, dtype, tmp_path / "source")
    converted, exported = tmp_path / "selfattn", tmp_path / "exported"
    command = "bert" if model_type == "bert" else "seq2seq"
    assert convert_cli.main([command, str(source), str(converted), "--verify", "--tolerance", "1e-5"]) == 0
    name = str(dtype).removeprefix("torch.")
    assert json.loads((converted / "config.json").read_text())["dtype"] == name
    original, selfattn = load_file(source / "model.safetensors"), load_file(converted / "model.safetensors")
    _, report = convert_checkpoint(source)
    for source_name, target_name in report.mapped.items():
        assert selfattn[target_name].dtype == dtype and torch.equal(selfattn[target_name], original[source_name])
    assert f"dtype: {name} (the source tensors' own)" in capsys.readouterr().out
    assert f"Tensors kept in {name}" in (converted / "README.md").read_text()

    assert convert_cli.main(["export", str(converted), str(exported), "--verify", "--tolerance", "1e-5"]) == 0
    assert json.loads((exported / "config.json").read_text())["dtype"] == name
    back = load_file(exported / "model.safetensors")
    assert set(original) <= set(back)
    for tensor_name, tensor in original.items():
        assert back[tensor_name].dtype == tensor.dtype and torch.equal(back[tensor_name], tensor), tensor_name
    reloaded = getattr(transformers, json.loads((exported / "config.json").read_text())["architectures"][0])
    assert reloaded.from_pretrained(exported).dtype == dtype


def test_tensors_decide_the_dtype_where_config_json_says_another(bert_folder, tmp_path, capsys):
    """A config.json that names another dtype than its tensors' (an edited file, an older tool) does not round the
    tensors: they are kept, the converted config states their dtype, and the report says why."""
    source = shutil.copytree(bert_folder, tmp_path / "source")
    tensors = load_file(source / "model.safetensors")
    from safetensors.torch import save_file

    save_file({name: tensor.to(torch.bfloat16) for name, tensor in tensors.items()}, source / "model.safetensors")
    config = json.loads((source / "config.json").read_text())
    (source / "config.json").write_text(json.dumps({**config, "dtype": "float32"}))
    assert convert_cli.main(["bert", str(source), str(tmp_path / "out"), "--verify"]) == 0
    printed = capsys.readouterr().out
    assert "dtype: bfloat16 (the source tensors' own; config.json says float32, which they are not in)" in printed
    assert json.loads((tmp_path / "out" / "config.json").read_text())["dtype"] == "bfloat16"
    assert all(t.dtype == torch.bfloat16 for t in load_file(tmp_path / "out" / "model.safetensors").values())


# --- chat templates and the tokenizer check -------------------------------------------------------------------------

CHAT_TEMPLATES = {
    "default": "{% for message in messages %}{{ message['role'] }}: {{ message['content'] }}\n{% endfor %}",
    "tool_use": "{% for message in messages %}[{{ message['role'] }}] {{ message['content'] }}{% endfor %}",
}


@pytest.fixture(scope="module")
def chat_folder(bert_folder, tmp_path_factory) -> Path:
    """bert_folder with chat templates, saved as transformers 5 saves them: chat_template.jinja (the default) and
    additional_chat_templates/tool_use.jinja; plus a processor's legacy chat_template.json."""
    folder = tmp_path_factory.mktemp("chat") / "bert"
    shutil.copytree(bert_folder, folder)
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    tokenizer.chat_template = dict(CHAT_TEMPLATES)
    tokenizer.save_pretrained(folder)
    (folder / "chat_template.json").write_text(json.dumps({"chat_template": CHAT_TEMPLATES["default"]}))
    assert (folder / "chat_template.jinja").is_file()
    assert (folder / "additional_chat_templates" / "tool_use.jinja").is_file()
    return folder


def chat_files(folder: Path) -> dict[str, bytes]:
    return {
        str(path.relative_to(folder)): path.read_bytes()
        for path in sorted(folder.rglob("*"))
        if path.is_file() and "chat_template" in str(path.relative_to(folder))
    }


def test_chat_templates_survive_conversion_and_export(chat_folder, tmp_path):
    converted, exported = tmp_path / "selfattn", tmp_path / "bert"
    assert convert_cli.main(["bert", str(chat_folder), str(converted)]) == 0
    assert convert_cli.main(["export", str(converted), str(exported)]) == 0
    expected = chat_files(chat_folder)
    assert set(expected) == {"chat_template.jinja", "chat_template.json", "additional_chat_templates/tool_use.jinja"}
    messages = [{"role": "user", "content": "the cat sat"}]
    source_tokenizer = transformers.AutoTokenizer.from_pretrained(chat_folder)
    for folder in (converted, exported):
        assert chat_files(folder) == expected, folder
        tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
        assert tokenizer.chat_template == source_tokenizer.chat_template == CHAT_TEMPLATES
        for name in CHAT_TEMPLATES:
            rendered = tokenizer.apply_chat_template(messages, chat_template=name, tokenize=False)
            assert rendered == source_tokenizer.apply_chat_template(messages, chat_template=name, tokenize=False)


def test_onnx_export_keeps_the_chat_templates(chat_folder, tmp_path):
    pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    converted, exported = tmp_path / "selfattn", tmp_path / "onnx"
    assert convert_cli.main(["bert", str(chat_folder), str(converted)]) == 0
    assert convert_cli.main(["onnx", str(converted), str(exported)]) == 0
    assert chat_files(exported) == chat_files(chat_folder)
    assert transformers.AutoTokenizer.from_pretrained(exported).chat_template == CHAT_TEMPLATES


def test_tokenizer_that_loads_differently_in_output_stops_the_run(chat_folder, tmp_path, monkeypatch, capsys):
    """The check after copying compares what the tokenizer loads, not only that it loads: with a file left behind
    (here the chat templates, as the list once lacked them) the tokenizer still loads, but differs."""
    without_templates = tuple(
        name for name in checkpoints.TOKENIZER_FILES if name not in ("chat_template.jinja", "chat_template.json")
    )
    monkeypatch.setattr(convert_cli, "TOKENIZER_FILES", without_templates)
    monkeypatch.setattr(convert_cli, "TOKENIZER_FOLDERS", ())
    output = tmp_path / "out"
    assert convert_cli.main(["bert", str(chat_folder), str(output)]) == 1
    error = capsys.readouterr().err
    assert f"The tokenizer copied from {chat_folder}" in error
    assert "loads differently in OUTPUT (chat_template:" in error
    assert not output.exists()


def test_tokenizer_summary_sees_vocabulary_and_special_tokens(bert_folder, tmp_path):
    tokenizer = transformers.AutoTokenizer.from_pretrained(bert_folder)
    summary = convert_cli.tokenizer_summary(tokenizer)
    tokenizer.add_special_tokens({"additional_special_tokens": ["[NEW]"]})
    changed = convert_cli.tokenizer_summary(tokenizer)
    assert [name for name in summary if summary[name] != changed[name]] == ["vocabulary", "all special tokens"]
    tokenizer.add_special_tokens({"pad_token": "cat"})
    assert convert_cli.tokenizer_summary(tokenizer)["special tokens"]["pad_token"] == "cat"


def test_every_file_a_tokenizer_saves_is_copied(tmp_path):
    """The names transformers' tokenizers of the conversion families save (their vocab_files_names and the files
    save_pretrained writes beside them) are all in TOKENIZER_FILES, or in TOKENIZER_FOLDERS."""
    from transformers.tokenization_utils_base import ADDED_TOKENS_FILE, SPECIAL_TOKENS_MAP_FILE, TOKENIZER_CONFIG_FILE
    from transformers.utils import CHAT_TEMPLATE_DIR, CHAT_TEMPLATE_FILE, LEGACY_PROCESSOR_CHAT_TEMPLATE_FILE

    names = {ADDED_TOKENS_FILE, SPECIAL_TOKENS_MAP_FILE, TOKENIZER_CONFIG_FILE, CHAT_TEMPLATE_FILE}
    names |= {LEGACY_PROCESSOR_CHAT_TEMPLATE_FILE}
    for class_name in ("BertTokenizer", "RobertaTokenizer", "XLMRobertaTokenizer", "TokenizersBackend"):
        names |= set(getattr(transformers, class_name).vocab_files_names.values())
    # MarianTokenizer's, which cannot be imported without sentencepiece
    names |= {"source.spm", "target.spm", "vocab.json", "target_vocab.json"}
    assert names <= set(checkpoints.TOKENIZER_FILES)
    assert CHAT_TEMPLATE_DIR in checkpoints.TOKENIZER_FOLDERS


# --- each conversion command takes its own families -----------------------------------------------------------------


@pytest.mark.parametrize("verify", [False, True], ids=["plain", "verify"])
def test_bert_command_refuses_an_encoder_decoder_naming_seq2seq(verify, bart_folder, tmp_path, monkeypatch, capsys):
    def no_conversion(*args, **kwargs):
        raise AssertionError("the checkpoint was converted before its model_type was checked")

    monkeypatch.setattr(convert_cli, "convert_checkpoint", no_conversion)
    output = tmp_path / "out"
    assert load_script("convert_bert").main([str(bart_folder), str(output), *(["--verify"] if verify else [])]) == 1
    error = capsys.readouterr().err
    assert f"SOURCE {bart_folder} holds a 'bart' checkpoint, an encoder-decoder" in error
    assert "`selfattn-convert seq2seq SOURCE OUTPUT` (or conversion/convert_seq2seq.py)" in error
    assert not output.exists()


def test_a_model_type_no_command_converts_names_both_commands(tmp_path, capsys):
    source = tmp_path / "gpt2"
    source.mkdir()
    (source / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    for command in ("bert", "seq2seq"):
        assert convert_cli.main([command, str(source), str(tmp_path / "out")]) == 1
        error = capsys.readouterr().err
        assert "model_type='gpt2' checkpoint, which no selfattn-convert command converts" in error
        assert "`bert` takes ['bert', 'distilbert', 'electra', 'roberta', 'xlm-roberta']" in error
        assert "`seq2seq` takes ['bart', 'marian']" in error


def test_a_chat_template_folder_that_is_a_file_stops_the_run(bert_folder, tmp_path, capsys):
    source = shutil.copytree(bert_folder, tmp_path / "source")
    (source / "additional_chat_templates").write_text("not a folder")
    assert convert_cli.main(["bert", str(source), str(tmp_path / "out")]) == 1
    error = capsys.readouterr().err
    assert f"tokenizer entry {source / 'additional_chat_templates'} is a file, not a folder" in error
    assert not (tmp_path / "out").exists()


def test_top_level_help_describes_every_export_layout():
    result = subprocess.run(
        [sys.executable, "-m", "modeling_selfattn.convert_cli", "--help"], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr
    text = " ".join(result.stdout.split())
    assert "encoder-only selfattn folder" not in text and "export selfattn encoders" not in text
    export_line = re.search(r"^\s+export\s+(.*(?:\n\s{6,}.*)*)", result.stdout, re.MULTILINE)[1]
    assert "BERT family" in export_line and "Marian or BART" in " ".join(export_line.split())


@pytest.mark.parametrize("same", [("shared",), ()], ids=["decoder-table-differs", "all-tables-differ"])
def test_seq2seq_with_a_decoder_table_of_its_own_is_refused(same, tmp_path, capsys):
    """BART with tie_word_embeddings=False keeps one token table per stack; selfattn has one for both, so a
    checkpoint whose two differ cannot be converted, and the error says which tensors and why."""
    config = transformers.BartConfig(
        vocab_size=99, d_model=16, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
        decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32, max_position_embeddings=32,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    model = transformers.BartForConditionalGeneration(config)
    with torch.no_grad():
        for table in (model.model.shared, model.model.encoder.embed_tokens, model.model.decoder.embed_tokens):
            table.weight.normal_()  # as after training: each its own
        if same:
            model.model.shared.weight.copy_(model.model.encoder.embed_tokens.weight)
    model.save_pretrained(tmp_path / "bart")
    assert convert_cli.main(["seq2seq", str(tmp_path / "bart"), str(tmp_path / "out")]) == 1
    error = " ".join(capsys.readouterr().err.split())
    assert "conflicting tensors" in error and "model.decoder.embed_tokens.weight" in error
    assert "as one tensor" in error and "cannot be converted" in error
    assert "model.shared.weight is left out" in error and "do not read" in error  # and why it is no third table
    assert not (tmp_path / "out").exists()


def card_metadata(folder: Path) -> dict:
    from huggingface_hub import ModelCard

    return ModelCard((folder / "README.md").read_text()).data.to_dict()


SOURCE_CARD = """---
license: mit
language: de
datasets:
- my/corpus
tags:
- german
base_model: someone/pretrained-bert
---
# My classifier

Trained on my corpus; this text is mine.
"""


@pytest.mark.parametrize("given_as", ["hub id", "local folder"])
def test_conversion_keeps_the_source_card(given_as, bert_folder, tmp_path, monkeypatch):
    """The source's metadata and text stay in OUTPUT's card; base_model names a Hub id as given, a local folder
    never (its card's own base_model stays)."""
    source = shutil.copytree(bert_folder, tmp_path / "source")
    (source / "README.md").write_text(SOURCE_CARD)
    argument = str(source)
    if given_as == "hub id":
        argument = "org/my-classifier"
        hub = lambda name, **kwargs: source if name == argument else Path(name)  # noqa: E731
        monkeypatch.setattr(checkpoints, "resolve_folder", hub)
        monkeypatch.setattr(convert_cli, "resolve_folder", hub)
    assert convert_cli.main(["bert", argument, str(tmp_path / "out")]) == 0
    metadata = card_metadata(tmp_path / "out")
    assert {name: metadata[name] for name in ("license", "language", "datasets")} == {
        "license": "mit", "language": "de", "datasets": ["my/corpus"],
    }
    assert metadata["tags"][:2] == ["selfattn", "custom_code"] and "german" in metadata["tags"]
    assert metadata["library_name"] == "transformers"  # the source card names none
    assert metadata["pipeline_tag"] == "text-classification"
    assert metadata["base_model"] == ("org/my-classifier" if given_as == "hub id" else "someone/pretrained-bert")
    card = (tmp_path / "out" / "README.md").read_text()
    assert card.index("## Conversion") < card.index("## Source model card") < card.index("this text is mine")


def test_export_writes_a_card_from_the_selfattn_one(bert_folder, tmp_path):
    source = shutil.copytree(bert_folder, tmp_path / "source")
    (source / "README.md").write_text(SOURCE_CARD)
    assert convert_cli.main(["bert", str(source), str(tmp_path / "selfattn")]) == 0
    assert convert_cli.main(["export", str(tmp_path / "selfattn"), str(tmp_path / "bert")]) == 0
    metadata = card_metadata(tmp_path / "bert")
    assert metadata["license"] == "mit" and metadata["base_model"] == "someone/pretrained-bert"
    assert metadata["library_name"] == "transformers" and not {"selfattn", "custom_code"} & set(metadata["tags"])
    card = (tmp_path / "bert" / "README.md").read_text()
    assert "## Export" in card and f"from the selfattn model `{tmp_path / 'selfattn'}`" in card
    assert "`BertForSequenceClassification`" in card and "this text is mine" in card


# ---------------------------------------------------------------------------------------------------------------
# --overwrite replaces an earlier run's own output, and nothing a user keeps in it

SOURCE_OF_COMMAND = {"bert": "bert_folder", "seq2seq": "bart_folder", "export": "selfattn_folder"}


def add_users_entries(folder: Path) -> None:
    """What a user keeps in a model folder: notes, and a folder of their evaluation."""
    (folder / "notes.txt").write_text("my notes")
    (folder / "eval").mkdir()
    (folder / "eval" / "scores.json").write_text('{"accuracy": 0.9}')


def never_prepared(args, start):
    raise AssertionError("the command started reading SOURCE for a refused OUTPUT")


@pytest.mark.parametrize("command", list(SOURCE_OF_COMMAND))
def test_overwrite_refuses_an_earlier_output_that_also_holds_the_users_entries(
    command, request, tmp_path, monkeypatch, capsys
):
    """--overwrite replaced a folder holding an earlier conversion's config.json whole, the user's notes and eval/
    folder in it included: such a folder is refused before anything is read or written, naming them and the fix.
    Moved out, the earlier output alone is replaced."""
    source = request.getfixturevalue(SOURCE_OF_COMMAND[command])
    output = tmp_path / "out"
    assert convert_cli.main([command, str(source), str(output)]) == 0
    add_users_entries(output)
    before = tree_hashes(tmp_path)
    capsys.readouterr()
    refused = dataclasses.replace(convert_cli.COMMANDS[command], prepare=never_prepared)
    with monkeypatch.context() as patch:
        patch.setitem(convert_cli.COMMANDS, command, refused)
        assert convert_cli.main([command, str(source), str(output), "--overwrite"]) == 2
    run = f"selfattn-convert {command} run"
    assert capsys.readouterr().err == (
        f"error: OUTPUT {output} holds an earlier {run}'s output, but also entries no {run} writes: eval/, notes.txt. "
        f"--overwrite replaces the folder as a whole, which would delete them. Move them out of {output} first, or "
        "pass a new OUTPUT.\n"
    )
    assert tree_hashes(tmp_path) == before

    for name in ("notes.txt", "eval"):
        shutil.move(output / name, tmp_path / name)
    earlier = sorted(path.name for path in output.iterdir())
    assert convert_cli.main([command, str(source), str(output), "--overwrite"]) == 0
    assert sorted(path.name for path in output.iterdir()) == earlier
    assert sorted(path.name for path in tmp_path.iterdir()) == ["eval", "notes.txt", "out"]  # nothing left beside


def test_refusal_names_the_first_ten_entries_and_counts_the_rest(bert_folder, tmp_path, capsys):
    output = tmp_path / "out"
    output.mkdir()
    (output / "config.json").write_text('{"model_type": "selfattn"}')
    for index in range(12):
        (output / f"plot_{index:02}.png").write_bytes(b"mine")
    before = tree_hashes(output)
    assert convert_cli.main(["bert", str(bert_folder), str(output), "--overwrite"]) == 2
    listed = ", ".join(f"plot_{index:02}.png" for index in range(10))
    assert f"entries no selfattn-convert bert run writes: {listed} and 2 more. --overwrite" in capsys.readouterr().err
    assert tree_hashes(output) == before


def test_the_model_card_is_the_conversions_own(bert_folder, tmp_path):
    """README.md is the card a conversion writes: an earlier one, edited or not, is replaced with the model."""
    output = tmp_path / "out"
    assert convert_cli.main(["bert", str(bert_folder), str(output)]) == 0
    (output / "README.md").write_text("# my edited card\n")
    assert convert_cli.main(["bert", str(bert_folder), str(output), "--overwrite"]) == 0
    assert "## Conversion" in (output / "README.md").read_text()


def sentence_transformers_source(folder: Path, chat_folder: Path) -> Path:
    """chat_folder (a tokenizer with chat templates, one of them in additional_chat_templates/) as the transformer of a
    sentence-transformers pipeline: pooling in 1_Pooling/, normalisation in 2_Normalize/."""
    shutil.copytree(chat_folder, folder)
    write_modules(folder, "1_Pooling", "2_Normalize")
    for module in ("1_Pooling", "2_Normalize"):
        (folder / module).mkdir()
    pooling = {"word_embedding_dimension": 32, "pooling_mode_mean_tokens": True}
    (folder / "1_Pooling" / "config.json").write_text(json.dumps(pooling))
    (folder / "config_sentence_transformers.json").write_text('{"similarity_fn_name": "cosine"}')
    (folder / "sentence_bert_config.json").write_text('{"max_seq_length": 16, "do_lower_case": false}')
    return folder


def test_overwrite_replaces_an_earlier_output_with_everything_a_run_writes(chat_folder, tmp_path, monkeypatch):
    """All that a conversion or export writes is its own, to be replaced: weights in shards with their index, the
    model code, the card, the tokenizer with its chat templates, and the sentence-transformers pipeline with the
    module folders its modules.json names."""
    source = sentence_transformers_source(tmp_path / "source", chat_folder)
    converted, exported = tmp_path / "selfattn", tmp_path / "bert"
    save_pretrained = SelfAttnForSequenceClassification.save_pretrained
    with monkeypatch.context() as patch:  # a model too large for one file: the earlier output is sharded
        patch.setattr(
            SelfAttnForSequenceClassification,
            "save_pretrained",
            lambda self, folder, **kwargs: save_pretrained(self, folder, max_shard_size="20KB", **kwargs),
        )
        assert convert_cli.main(["bert", str(source), str(converted)]) == 0
    earlier = {path.name for path in converted.iterdir()}
    assert {"model.safetensors.index.json", "additional_chat_templates", "1_Pooling", "2_Normalize", "modules.json",
            "sentence_bert_config.json", "model.py", "README.md"} <= earlier  # fmt: skip
    assert any(re.fullmatch(r"model-00001-of-0000[2-9]\.safetensors", name) for name in earlier), earlier
    assert convert_cli.main(["bert", str(source), str(converted), "--overwrite"]) == 0
    replaced = {path.name for path in converted.iterdir()}
    assert "model.safetensors" in replaced and not any(name.startswith("model-0") for name in replaced)
    assert earlier - replaced == {"model.safetensors.index.json"} | {name for name in earlier if "-of-" in name}

    assert convert_cli.main(["export", str(converted), str(exported)]) == 0
    pipeline = {"1_Pooling", "2_Normalize", "modules.json", "additional_chat_templates"}
    assert pipeline <= {path.name for path in exported.iterdir()}
    earlier = tree_hashes(exported)
    assert convert_cli.main(["export", str(converted), str(exported), "--overwrite"]) == 0
    assert tree_hashes(exported).keys() == earlier.keys()
    assert sorted(path.name for path in tmp_path.iterdir()) == ["bert", "selfattn", "source"]


def test_module_folders_of_an_unreadable_modules_json_are_named(bert_folder, tmp_path, capsys):
    """Which folders are a sentence-transformers pipeline's is read from the earlier output's modules.json: one that
    cannot be read explains none, and they are refused as the user's."""
    output = tmp_path / "out"
    assert convert_cli.main(["bert", str(bert_folder), str(output)]) == 0
    (output / "modules.json").write_text("[{")
    (output / "1_Pooling").mkdir()
    assert convert_cli.main(["bert", str(bert_folder), str(output), "--overwrite"]) == 2
    assert "entries no selfattn-convert bert run writes: 1_Pooling/. --overwrite" in capsys.readouterr().err
    assert (output / "1_Pooling").is_dir()


def test_each_command_describes_what_it_writes():
    """The one list of tokenizer files, the code save_pretrained ships, and each command's own entries."""
    writes = {name: command.writes for name, command in convert_cli.COMMANDS.items()}
    for name, outputs in writes.items():
        assert outputs.markers == ("config.json",) and outputs.run == f"selfattn-convert {name} run"
        assert set(checkpoints.TOKENIZER_FILES + checkpoints.TOKENIZER_FOLDERS) <= set(outputs.beside), name
    assert {"model.py", "config.py", "heads.py", "hub.py"} <= set(writes["bert"].beside)
    assert "model.py" not in writes["onnx"].beside and "config.py" in writes["onnx"].beside
    assert not any(name.endswith(".py") for name in writes["export"].beside)
    assert "README.md" in writes["export"].beside and "README.md" not in writes["onnx"].beside
    assert "model.onnx" in writes["onnx"].beside and "model.onnx" not in writes["bert"].beside
