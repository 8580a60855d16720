"""OUTPUT of `selfattn-convert` (modeling_selfattn/convert_cli.py), in one place: checked before any work
starts, written beside, and put in place only once every step has succeeded. The example scripts' --output_dir
goes through the same checks (check_output_folder) and, with --overwrite_output_dir, the same swap.

The rules, and why:

- SOURCE is never written to. An OUTPUT that is SOURCE or a folder containing it is refused, since replacing
  it would delete the checkpoint being converted. An OUTPUT inside SOURCE is refused too: it would lose no
  data, but it would change the checkpoint folder (a copy or Hub upload of SOURCE would carry the converted
  model along, and for a Hub id the source is a snapshot in the Hub cache). Paths are compared after
  resolving symbolic links and `..`.
- OUTPUT is a new path or an existing folder. A file is refused, and so is a symbolic link: the folder is
  replaced as a whole, which would replace the link rather than the folder it names. So is a place that
  cannot be written: the new folder needs a writable parent, and an existing one must be writable for its
  old contents to be deleted.
- --overwrite replaces an earlier run's output, and only where OUTPUT holds nothing else: the folder goes as a
  whole, so a user's own files kept in it (notes, an eval/ folder) would go with it. What a run of each command
  writes is described once (RunOutputs, which the command's OutputOption carries); an entry outside it is named
  in the refusal, to be moved out first.
- The new folder is built in a hidden sibling of OUTPUT. Being in the same parent keeps it on the same
  filesystem, so both renames are atomic. It replaces OUTPUT only after weights, config, code, tokenizer, model
  card and checks have all been written: the old OUTPUT is renamed aside, the new one renamed in, and then the
  old one is deleted. On any failure the sibling is deleted, and OUTPUT is as it was, or absent if it was new.
"""

import os
import secrets
import shutil
import sys
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace
from fnmatch import fnmatchcase
from pathlib import Path

from .checkpoints import ConversionError
from .argument_values import shown


class OutputRefused(Exception):
    """OUTPUT cannot be used, found before anything was read or written (exit status 2)."""


class OutputFailed(Exception):
    """Writing OUTPUT failed; it is as it was (exit status 1)."""


@dataclass(frozen=True)
class Output:
    given: Path  # as the user wrote it, for messages
    path: Path  # absolute, with symbolic links and `..` resolved

    def untouched(self) -> str:
        """What a failed run left of OUTPUT, for the last line of its error message."""
        if self.path.exists():
            return f"OUTPUT {self.given} is unchanged."
        return f"OUTPUT {self.given} was not created."


def writable(folder: Path) -> bool:
    # Creating and removing entries needs search (X) as well as write permission.
    return os.access(folder, os.W_OK | os.X_OK)


def refuse_overlap(
    given: Path,
    path: Path,
    source,
    source_path: Path,
    output_name: str = "OUTPUT",
    source_name: str = "SOURCE",
    error: type[Exception] = OutputRefused,
    verb: str = "Pass",
) -> None:
    """Refuse an output folder that is the source, holds it or lies inside it: writing it, or replacing it as a whole,
    would change or delete what is being read. `output_name` and `source_name` are the arguments as the user gave
    them (selfattn-convert's OUTPUT and SOURCE, the example scripts' options), `verb` the one its other messages ask
    with."""
    if path == source_path:
        relation, problem, fix = "is", "writing it would replace what is being read", f"another {output_name}"
    elif path in source_path.parents:
        relation, problem = "contains", "replacing it would delete the source"
        fix = f"an {output_name} outside it, e.g. a new folder beside it"
    elif source_path in path.parents:
        relation, problem = "lies inside", "the source is to be left as it is"
        fix = f"an {output_name} outside it, e.g. a new folder beside it"
    else:
        return
    raise error(f"{output_name} {given} {relation} {source_name} {source}: {problem}. {verb} {fix}.")


@dataclass(frozen=True)
class RunOutputs:
    """What a command's run leaves in its output folder, as glob patterns of the folder's entries: `markers`,
    written only by such a run (a folder holding one is an earlier run's output), and what it writes `beside` them;
    `named_inside`, where given, lists the entries an earlier run's own files name (sentence-transformers module
    folders in modules.json, the external data files of ONNX graphs). The overwrite switch replaces the folder as a
    whole, so it takes an earlier run's output only, and only where the folder holds nothing else: a user's own
    files kept there would go with it (check_output_folder refuses, naming them)."""

    run: str  # whose output it is, for messages: "training run"
    markers: tuple[str, ...]
    beside: tuple[str, ...] = ()
    non_empty_why: str = "the run would write its results over what is there."
    named_inside: Callable[[Path], Iterable[str]] | None = None

    def holds_a_run(self, folder: Path) -> bool:
        return any(matches(entry.name, self.markers) for entry in folder.iterdir())

    def foreign_entries(self, folder: Path) -> list[str]:
        """The entries of `folder` that no such run writes (folders with a trailing /), sorted."""
        others = [entry for entry in folder.iterdir() if not matches(entry.name, self.markers + self.beside)]
        if others and self.named_inside is not None:  # read only where the patterns leave entries unexplained
            named = set(self.named_inside(folder))
            others = [entry for entry in others if entry.name not in named]
        return sorted(entry.name + ("/" if entry.is_dir() else "") for entry in others)

    def option(self, name: str, overwrite_flag: str, **settings) -> "OutputOption":
        """An OutputOption whose overwrite switch replaces such a run's output: `settings` are its other fields."""
        return OutputOption(
            name,
            overwrite_flag,
            self.holds_a_run,
            f"{self.run}'s output ({', '.join(self.markers)})",
            f"an earlier {self.run}'s output folder",
            non_empty_why=self.non_empty_why,
            writes=self,
            **settings,
        )


def matches(name: str, patterns: tuple[str, ...]) -> bool:
    return any(fnmatchcase(name, pattern) for pattern in patterns)


@dataclass(frozen=True)
class OutputOption:
    """How a command names its output folder and the switch that lets an existing one be replaced, and what that
    switch may replace: selfattn-convert's OUTPUT and --overwrite (a model folder), or the example scripts'
    --output_dir and --overwrite_output_dir (an earlier run's output). A folder of other things (a project, the
    current folder) would go with the replaced folder, so only the command's own kind of output is replaced; and
    where `writes` describes what a run of the command writes, only a folder that holds nothing else."""

    name: str
    overwrite_flag: str
    is_replaceable: Callable[[Path], bool]
    replaceable: str  # what is_replaceable looks for, for the refusal
    kind: str  # what it makes of a folder that holds it
    error: type[Exception] = OutputRefused
    verb: str = "Pass"
    always_replaced: bool = True  # False: an existing folder is written into unless overwrite_flag is given
    non_empty_why: str = "the new output would be mixed with what is there."
    writes: RunOutputs | None = None


CONVERT_OUTPUT = OutputOption(
    "OUTPUT", "--overwrite", lambda path: (path / "config.json").is_file(), "config.json", "a model folder"
)


def check_output_folder(
    given: Path, option: OutputOption, overwrite: bool, continuing: bool = False, non_empty_hint: str = ""
) -> Path:
    """The output folder `given`, resolved, once it is known to be a usable new or existing folder: not the
    filesystem root, a file or below one, nor a place that cannot be written; an existing folder that holds files
    only with the overwrite switch (and then only the command's own kind of output, holding nothing that
    option.writes leaves out, and not through a symbolic link) or when `continuing` an earlier run saved there.
    Nothing is written, and of the folder only its listing (and the files option.writes.named_inside reads) is read.
    Raises option.error naming the problem and the fix; the refusal of a non-empty folder ends with
    `non_empty_hint`."""
    name, flag, verb = option.name, option.overwrite_flag, option.verb
    path = given.resolve()
    if path.parent == path:
        raise option.error(f"{name} {given} is the filesystem root; {verb.lower()} a folder to write to.")
    if path.exists() and not path.is_dir():
        raise option.error(f"{name} {given} is a file, not a folder; {verb.lower()} the path of a new folder.")
    if not path.exists():
        existing = next(folder for folder in path.parents if folder.exists())
        if not existing.is_dir():
            raise option.error(
                f"{name} {given} cannot be created: {existing} is a file, not a folder. {verb} another {name}."
            )
        if not writable(existing):
            raise option.error(
                f"{name} {given} cannot be created: {existing} is not writable. Change its permissions or "
                f"{verb.lower()} another {name}."
            )
        return path
    holds_files = any(path.iterdir())
    replaced = overwrite or option.always_replaced
    if replaced and given.is_symlink():
        raise option.error(
            f"{name} {given} is a symbolic link (to {os.readlink(given)}); the folder is replaced as a whole, "
            f"which would replace the link, not what it points to. {verb} the folder itself ({path}) or a new path."
        )
    if holds_files and not overwrite and not continuing:
        raise option.error(
            f"{name} {given} exists and is not empty: {option.non_empty_why} {verb} a new {name}; or add {flag} to "
            f"replace it (the new output is written beside it and replaces it only once it is complete)"
            f"{non_empty_hint}."
        )
    if holds_files and overwrite and not option.is_replaceable(path):
        raise option.error(
            f"{name} {given} holds files but no {option.replaceable}, so it is not {option.kind}: {flag} replaces "
            f"{option.kind} as a whole, and would delete these files. {verb} a new {name}."
        )
    foreign = option.writes.foreign_entries(path) if holds_files and overwrite and option.writes is not None else []
    if foreign:
        run = option.writes.run
        raise option.error(
            f"{name} {given} holds an earlier {run}'s output, but also entries no {run} writes: {shown(foreign)}. "
            f"{flag} replaces the folder as a whole, which would delete them. Move them out of {given} first, or "
            f"{verb.lower()} a new {name}."
        )
    for folder in (path.parent, path) if replaced else (path,):
        if not writable(folder):
            raise option.error(
                f"{name} {given} cannot be {'replaced' if replaced else 'written'}: {folder} is not writable. Change "
                f"its permissions or {verb.lower()} another {name}."
            )
    return path


def check_output(output, source, overwrite: bool, writes: RunOutputs | None = None) -> Output:
    """selfattn-convert's OUTPUT argument, checked against SOURCE (a local folder; a Hub id is checked once
    downloaded, by write_output); `writes`, what a run of the command writes, is all --overwrite may replace.
    Raises OutputRefused naming the problem and the fix."""
    given = Path(output)
    if Path(source).exists():
        refuse_overlap(given, given.resolve(), source, Path(source).resolve())
    return Output(given, check_output_folder(given, replace(CONVERT_OUTPUT, writes=writes), overwrite))


def unique_sibling(path: Path, label: str) -> Path:
    # Hidden, and named for what it is, so that one left by a killed run is not taken for a model.
    while True:
        sibling = path.with_name(f".{path.name}.{label}-{secrets.token_hex(4)}")
        if not sibling.exists() and not sibling.is_symlink():
            return sibling


def remove(folder: Path) -> None:
    if not folder.exists():
        return
    try:
        shutil.rmtree(folder)
    except OSError as error:
        print(f"warning: could not delete the temporary folder {folder} ({error}); delete it by hand.", file=sys.stderr)


def write_output(target: Output, write: Callable[[Path], None], source_folder: Path | None = None) -> None:
    """Call `write(folder)` on a new sibling of OUTPUT, then put that folder in OUTPUT's place. `source_folder`,
    SOURCE as read, is checked again here: a Hub id becomes a folder only once downloaded. An exception from
    `write` propagates (as OutputFailed unless it is a ConversionError) with OUTPUT as it was."""
    if source_folder is not None:
        refuse_overlap(target.given, target.path, source_folder, Path(source_folder).resolve())
    created = [folder for folder in (target.path.parent, *target.path.parent.parents) if not folder.exists()]
    try:
        for folder in reversed(created):
            folder.mkdir()
        staging = unique_sibling(target.path, "partial")
        staging.mkdir()
    except OSError as error:
        remove_empty(created)
        raise OutputFailed(
            f"Cannot create a folder beside OUTPUT {target.given} ({error}); check the permissions of its "
            f"parent folder or pass another OUTPUT. {target.untouched()}"
        ) from error
    try:
        if target.path.is_dir():
            shutil.copymode(target.path, staging)  # a replaced folder keeps its permissions
        write(staging)
    except BaseException as error:
        remove(staging)
        remove_empty(created)
        if isinstance(error, ConversionError) or not isinstance(error, Exception):
            raise  # a ConversionError says what is wrong already; Ctrl-C stays Ctrl-C
        # Anything else here is the writing itself failing: disk full, permissions, an unreadable source file;
        # safetensors reports a failed write as its own error type, not as OSError.
        raise OutputFailed(
            f"Writing OUTPUT {target.given} failed ({type(error).__name__}: {error}); fix the cause (disk space, "
            f"permissions, an unreadable source file) and run again. {target.untouched()}"
        ) from error
    swap_in(target, staging)


def remove_empty(created: list[Path]) -> None:
    """Remove the parent folders write_output made for OUTPUT, deepest first, as far as they are empty."""
    for folder in created:
        try:
            folder.rmdir()
        except OSError:
            return


def swap_in(target: Output, staging: Path) -> None:
    aside = unique_sibling(target.path, "old") if target.path.exists() else None
    try:
        if aside is not None:
            os.rename(target.path, aside)
        os.rename(staging, target.path)
    except BaseException as error:
        remove(staging)
        if aside is not None and aside.exists() and not target.path.exists():
            try:
                os.rename(aside, target.path)  # put the old folder back where it was
            except OSError as restoring:
                raise OutputFailed(
                    f"Cannot move the new folder into OUTPUT {target.given} ({error}), nor the previous one back "
                    f"({restoring}); the previous contents of OUTPUT are in {aside}: move them back by hand."
                ) from error
        if isinstance(error, OSError):
            raise OutputFailed(
                f"Cannot move the new folder into OUTPUT {target.given} ({error}); check that "
                f"{target.path.parent} is writable and OUTPUT is not a mount point, or pass another OUTPUT. "
                f"{target.untouched()}"
            ) from error
        raise
    if aside is not None:
        try:
            shutil.rmtree(aside)
        except OSError as error:
            print(
                f"warning: OUTPUT {target.given} holds the new model, but its previous contents, moved to {aside}, "
                f"could not be deleted ({error}); delete that folder by hand.",
                file=sys.stderr,
            )


def swap_files_in(staging: Path, folder: Path, names: Sequence[str]) -> None:
    """swap_in for files among others of a user's folder (an ONNX export's graphs): move `names` from `staging` into
    `folder` as one change. The files they replace go aside first, and any failure moves the new files back out and
    the old ones back in, so that `folder` holds the old set whole or the new one whole, never a mix (a graph of one
    export with a graph of the other would load as a broken export); the folder's other files stay."""
    aside = unique_sibling(folder / "onnx", "old")
    aside.mkdir()
    moved_aside, moved_in = [], []
    try:
        for name in names:
            if (folder / name).exists():
                os.replace(folder / name, aside / name)
                moved_aside.append(name)
        for name in names:
            os.replace(staging / name, folder / name)
            moved_in.append(name)
    except BaseException as error:
        try:
            for name in reversed(moved_in):
                os.replace(folder / name, staging / name)
            for name in reversed(moved_aside):
                os.replace(aside / name, folder / name)
        except OSError as restoring:
            raise OSError(
                f"Moving the new ONNX files into {folder} failed ({error}), and so did putting the previous ones back "
                f"({restoring}); the previous files are in {aside}: move them back into {folder} by hand."
            ) from error
        remove(aside)
        raise
    remove(aside)
