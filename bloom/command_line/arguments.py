"""What every `bloom` subcommand shares about its arguments: a parser that answers in the subcommand's own
words, value types that check their range, and errors that name the flag or file at fault.

The flags are the library's keyword arguments spelled with dashes (`--max-new-tokens` is generate's
`max_new_tokens`), so an error the library raises about `top_k` is an error about `--top-k`: `in_flags`
rewrites one into the other, and a subcommand calls the library's own checks instead of repeating them.
"""

import argparse
import difflib
import itertools
import os
import re
import sys
import tempfile
from pathlib import Path
from typing import NoReturn

from bloom.checkpoints.hub import network_error
from bloom.checkpoints.loader import check_device

# Raised for what the user typed or pointed at: reported as `bloom CMD: error: ...`, exit status 2, no
# traceback. Anything else is a bug and keeps its traceback.
USER_ERRORS = (ValueError, OSError, MemoryError)  # MemoryError: our estimates, before allocating
DTYPE_CHOICES = ["fp32", "bf16", "fp16"]  # --dtype's names (bloom.checkpoints.loader.DTYPES takes more)


class CommandParser(argparse.ArgumentParser):
    """argparse, answering for the (sub)command that was typed.

    - A flag this command does not have is refused first, by the command, with the closest one it has
      (`bloom generate: error: unrecognized argument --promt (did you mean --prompt?)`), and so is a stray
      argument: parse_known_args leaves nothing unknown. Flags are typed in full: a prefix is a typo, not a
      shortcut (allow_abbrev=False).
    - An invalid choice (a subcommand, a --dtype) names the closest valid one.
    - `args.command_parser` is the parser of the subcommand that ran, for errors found later (`fail`).
    """

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)
        self.set_defaults(command_parser=self)  # a subcommand's own default overrides its parent's
        self.commands: argparse._SubParsersAction | None = None

    def add_subparsers(self, **kwargs) -> argparse._SubParsersAction:
        self.commands = super().add_subparsers(**kwargs)
        return self.commands

    def parse_known_args(self, args=None, namespace=None):
        self.refuse_unknown_flags(list(args) if args is not None else sys.argv[1:])
        namespace, extras = super().parse_known_args(args, namespace)
        if extras and self.commands is None:  # a subcommand reports its own leftovers, with its own usage
            self.error(f"unrecognized arguments: {' '.join(extras)}")
        return namespace, extras

    def refuse_unknown_flags(self, args: list[str]) -> None:
        """Refuse the first token that argparse would take for a flag this parser does not have."""
        known = self._option_string_actions  # argparse's map of every flag of this parser
        for before, arg in itertools.pairwise([None, *args]):  # each token, and the one before it
            if arg == "--" or (self.commands is not None and not arg.startswith("-")):
                return  # what follows belongs to the positionals, or to the subcommand
            name = arg.split("=", 1)[0]
            # as argparse reads a token: a dash and a letter, and no space (-1 and "-a b" are values)
            looks_like_a_flag = re.match(r"--?[^\W\d]", arg) and " " not in arg
            if looks_like_a_flag and name not in known:
                # one dash after a flag that takes a value: meant as that value (a mistyped flag has two)
                if before in known and known[before].nargs is None and not arg.startswith("--"):
                    self.error(f"{before} {arg}: a value that begins with '-' is written {before}={arg}")
                close = closest(name, [flag for flag in known if flag.startswith("--")])
                self.error(f"unrecognized argument {name}" + (f" (did you mean {close}?)" if close else ""))

    def _check_value(self, action: argparse.Action, value) -> None:  # argparse's hook for `choices`
        try:
            super()._check_value(action, value)
        except argparse.ArgumentError as error:
            close = closest(str(value), [str(choice) for choice in action.choices])
            if close is None:
                raise
            raise argparse.ArgumentError(action, f"{error.message} (did you mean {close!r}?)") from None


def closest(typed: str, names: list[str]) -> str | None:
    """The name the user most likely meant: the only one `typed` begins, else the most similar (difflib)."""
    extensions = [name for name in names if name.startswith(typed)]
    if len(extensions) == 1:
        return extensions[0]
    return next(iter(difflib.get_close_matches(typed, names, n=1)), None)


def fail(command: argparse.ArgumentParser, error: Exception) -> NoReturn:
    """Report a user error the way argparse reports a bad argument: the command's usage, then
    `bloom CMD: error: message`, exit status 2."""
    message = in_flags(str(error), command) if isinstance(error, ValueError) else str(error)
    network = network_error(error)
    if network is not None and "unreachable" not in message:
        message += f"; the huggingface hub is unreachable ({type(network).__name__}: {network})"
    command.error(message)


def in_flags(message: str, command: argparse.ArgumentParser) -> str:
    """A library error message, with the argument names that are this command's flags written as flags.

    `top_k must be >= 1` becomes `--top-k must be >= 1`, `pass do_sample=True` becomes `pass --do-sample`,
    `context=1024` becomes `--context 1024`. A name that is also a plain word (temperature, model, out) is
    rewritten only where it opens the message or carries a value, so prose stays prose.
    """
    flags = {
        action.dest: action
        for action in command._actions
        if any(option.startswith("--") for option in action.option_strings)
    }
    if not flags:
        return message
    names = "|".join(sorted(map(re.escape, flags), key=len, reverse=True))
    # not inside a word or a path: `out/acts`, `x/context`, `context.txt` stay as they are
    pattern = re.compile(rf"(?<![\w./\\-])(?P<name>{names})(?:=(?P<value>[^\s,;)\]]+))?(?![\w/\\-]|\.\w)")

    def as_flag(match: re.Match) -> str:
        action, value = flags[match["name"]], match["value"]
        flag = next(option for option in action.option_strings if option.startswith("--"))
        if value is None:
            plain_word = "_" not in match["name"] and match.start() > 0
            return match[0] if plain_word else flag
        if action.nargs == 0:  # an on/off flag: `do_sample=True` is `--do-sample`
            return flag if value == "True" else f"without {flag}"
        return f"{flag} {value}"

    return pattern.sub(as_flag, message)


# Value types: argparse reports their errors as `argument --flag: ...`.


def int_at_least(minimum: int):
    def check(text: str) -> int:
        value = int(text)
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be {minimum} or more, got {value}")
        return value

    check.__name__ = "int"  # argparse's word for an unparsable value: "invalid int value: 'x'"
    return check


positive_int = int_at_least(1)
non_negative_int = int_at_least(0)


def seed(text: str) -> int:
    """A seed torch.Generator.manual_seed accepts: 0 to 2**64 - 1."""
    value = int(text)
    if not 0 <= value < 2**64:
        raise argparse.ArgumentTypeError(f"must be between 0 and 2**64 - 1, got {value}")
    return value


seed.__name__ = "int"


def checkpoint(text: str) -> str:
    """A checkpoint folder or hub repo id: not empty (an empty path would be the current folder)."""
    if not text.strip():
        raise argparse.ArgumentTypeError("is empty: name a checkpoint folder or a hub repo id")
    return text


checkpoint.__name__ = "checkpoint"


def device(text: str) -> str:
    """cpu, cuda or cuda:N, where this machine has it."""
    try:
        check_device(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None
    return text


# Files the user names: errors say which flag and which file.


def check_prompts(prompts: list[str], flag: str = "--prompt") -> list[str]:
    """Refuse an empty prompt, and one that is not UTF-8 (the shell hands undecodable bytes over as
    lone surrogates, which no tokenizer takes)."""
    for number, prompt in enumerate(prompts, 1):
        which = f"{flag} number {number}" if len(prompts) > 1 else flag
        if not prompt:
            raise ValueError(f"{which} is empty")
        try:
            prompt.encode("utf-8")
        except UnicodeEncodeError as error:
            raise ValueError(
                f"{which} is not UTF-8 text (an undecodable byte at character {error.start + 1})"
            ) from None
    return prompts


def read_text(path: Path, flag: str) -> str:
    """The UTF-8 text of the file given with `flag`."""
    try:
        return path.read_text(encoding="utf-8-sig")  # a byte-order mark, as some editors write, is not text
    except UnicodeDecodeError as error:
        raise ValueError(
            f"{flag} {path}: not UTF-8 text (byte {error.object[error.start]:#04x} at offset {error.start})"
        ) from None
    except OSError as error:
        raise OSError(f"{flag} {path}: {error.strerror or error}") from None


def output_file(path: Path, flag: str) -> Path:
    """Check, before any slow work, that the file given with `flag` can be written (its folder exists and is
    writable, and it is not itself a folder)."""
    if path.is_dir():
        raise IsADirectoryError(f"{flag} {path}: a folder, not a file")
    if not path.parent.is_dir():
        raise FileNotFoundError(f"{flag} {path}: no folder {path.parent}")
    if not os.access(path.parent, os.W_OK) or (path.exists() and not os.access(path, os.W_OK)):
        raise PermissionError(f"{flag} {path}: cannot write there")
    return path


def output_folder(path: Path, flag: str) -> Path:
    """Check, before any slow work, that the folder given with `flag` can be written in (the folder itself, or
    where it would be made): so that the work is not lost at the end, and nothing is made for a run that fails
    before it writes. The caller makes the folder when it writes."""
    if path.exists() and not path.is_dir():
        raise NotADirectoryError(f"{flag} {path}: a file, not a folder")
    existing = next(folder for folder in [path, *path.parents] if folder.exists())
    try:
        if not existing.is_dir():
            raise NotADirectoryError(f"{existing} is a file")
        tempfile.TemporaryFile(dir=existing).close()
    except OSError as error:
        raise OSError(f"{flag} {path}: cannot write there ({error.strerror or error})") from None
    return path
