"""The command policy: a guardrail against accidents, NOT a security boundary.

It matches program names and arguments after shlex-splitting, and says which rule matched so that
the model can do something else. Anything it checks can be written another way (`bash -c`, python,
base64 piped to sh, `find -delete`, ...). What contains a command is the bwrap sandbox mode; in mode
`none` a command can do whatever the runner's user can.
"""

from __future__ import annotations

import os
import shlex
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from .paths import ToolError

SHELL_OPERATORS = frozenset("();<>|&")
INTERACTIVE = frozenset({"vi", "vim", "nvim", "nano", "emacs", "less", "more", "most", "top", "htop", "man",
                         "watch", "ssh", "telnet", "ftp", "sftp", "screen", "tmux"})  # fmt: skip
DISK = ("mkfs", "fdisk", "sfdisk", "parted", "wipefs", "mkswap", "swapon", "losetup")
POWER = frozenset({"shutdown", "reboot", "halt", "poweroff", "init", "telinit", "kexec"})


def split_command(command: str, *, allow_shell: bool) -> list[str]:
    """The argv to execute. Without a shell, shell syntax (pipes, redirections, `;`, `&&`) is an
    error rather than an argument passed on by accident."""
    if not isinstance(command, str) or not command.strip():
        raise ToolError("INVALID_ARGUMENT", "command must be a non-empty string")
    if "\x00" in command:
        raise ToolError("INVALID_ARGUMENT", "command must not contain NUL characters")
    if allow_shell:
        return ["bash", "-c", command]
    try:
        argv = shlex.split(command)
    except ValueError as e:
        raise ToolError("INVALID_ARGUMENT", f"cannot parse the command: {e}") from None
    ops = [t for t in _shell_words(command) if _is_operator(t)]
    if ops:
        raise ToolError("SHELL_NOT_ALLOWED", f"shell syntax {ops[0]!r} is not available: commands run without a "
                        "shell in this task. Run one program per run_command call (no pipes, redirections, "
                        "';' or '&&'), and write files with write_file.")  # fmt: skip
    if not argv:
        raise ToolError("INVALID_ARGUMENT", "command is empty")
    return argv


@dataclass(frozen=True)
class CommandPolicy:
    """allow: program names that may run (empty: any). deny: more program names to refuse."""

    allow: tuple[str, ...] = ()
    deny: tuple[str, ...] = ()

    def check(self, argv: Sequence[str], *, work_path: Path, shell_text: str | None = None) -> None:
        """Raise POLICY_BLOCKED naming the rule. With a shell, the words of `shell_text` are checked
        as a best effort (a shell can always hide a program name)."""
        words = list(argv)
        programs = [os.path.basename(words[0])]
        if shell_text is not None:
            words = _shell_words(shell_text)
            # A program name is the first word and any word after an operator (|, ;, &&, ...).
            programs = [os.path.basename(w) for i, w in enumerate(words)
                        if not _is_operator(w) and (i == 0 or _is_operator(words[i - 1]))]  # fmt: skip
        squeezed = "".join(words)
        if ":(){" in squeezed or ":|:&" in squeezed:
            _block("fork-bomb", "this looks like a fork bomb")
        for prog in programs:
            if self.allow and shell_text is None and prog not in self.allow:
                _block("allow-list", f"{prog!r} is not in the allowed commands ({', '.join(self.allow)})")
            if prog in self.deny:
                _block("deny-list", f"{prog!r} is in the configured deny list")
            if prog in INTERACTIVE:
                _block("interactive", f"{prog!r} waits for a terminal and would hang; read files with read_file")
            if prog.startswith(DISK) or (prog == "dd" and any(w.startswith("of=/dev/") for w in words)):
                _block("disk", f"{prog!r} writes to disks or devices")
            if prog in POWER:
                _block("power", f"{prog!r} stops or restarts the machine")
        if os.path.basename(words[0]) == "tail" and ("-f" in words or "--follow" in words):
            _block("interactive", "tail -f never ends; read the file with read_file")
        recursive = any(w == "--recursive" or (w[:1] == "-" and w[1:2] != "-" and "r" in w.lower()) for w in words)
        if "rm" in programs and recursive:
            for w in words[1:]:
                if w.startswith("-") or _is_operator(w) or os.path.basename(w) == "rm":
                    continue
                if w in ("/", "~", "*", "$HOME") or not _inside(work_path, w):
                    _block("recursive-rm", f"recursive rm of {w!r}, which is not a path inside the work path")


def _is_operator(word: str) -> bool:
    return bool(word) and set(word) <= SHELL_OPERATORS


def _shell_words(text: str) -> list[str]:
    try:
        lex = shlex.shlex(text, posix=True, punctuation_chars=True)
        lex.whitespace_split = True
        return list(lex)
    except ValueError:
        return text.split()


def _inside(root: Path, word: str) -> bool:
    p = Path(os.path.expanduser(word))
    real = (p if p.is_absolute() else root / p).resolve(strict=False)
    return real != root and real.is_relative_to(root)


def _block(rule: str, reason: str) -> None:
    raise ToolError("POLICY_BLOCKED", f"blocked by rule {rule}: {reason}. (The command policy is a guardrail; "
                    "run something else or report the obstacle in finish.)")  # fmt: skip
