"""`sidequest completion bash|zsh|fish`: shell completion scripts generated from the argparse parser.

Why generated: a hand-written script goes stale the day a command or option is added; this one
is read from the very parser that parses the command line. Agent names (the AGENT argument of
`submit` and `schedule`) are asked of `sidequest agents --json` when completed, in the shell's
current project, like any command (it starts the daemon if none runs).

bash and zsh share the data functions (plain `case` statements both shells read); each has its own
driver over its completion variables. fish gets `complete` lines.
"""

from __future__ import annotations

import argparse
import shlex
from dataclasses import dataclass, field

SHELLS = ("bash", "zsh", "fish")
PROG = "sidequest"
AGENT_METAVAR = "AGENT"

_AGENT_NAMES = f'command {PROG} agents --json 2>/dev/null | sed -n \'s/^      "name": "\\(.*\\)",$/\\1/p\''
"""Agent names from `agents --json` (indent=2: an agent's fields sit six spaces deep); no JSON tool
is needed in the shell."""


@dataclass
class Option:
    flags: list[str]
    help: str
    takes_value: bool
    choices: list[str]


@dataclass
class Command:
    """One parser: its options, the words its positionals accept, and its subcommands."""

    path: str
    help: str = ""
    options: list[Option] = field(default_factory=list)
    positionals: list[list[str] | None] = field(default_factory=list)
    """Per positional: fixed choices, None for free text; AGENT is marked by `agent_positional`."""
    agent_positional: int | None = None
    subcommands: dict[str, Command] = field(default_factory=dict)


def describe(parser: argparse.ArgumentParser, path: str = "", help_text: str = "") -> Command:
    """The parser's shape. argparse keeps its actions in `_actions`; there is no public listing."""
    command = Command(path=path, help=help_text)
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            helps = {a.dest: a.help or "" for a in action._choices_actions}
            for name, sub in action.choices.items():
                sub_path = f"{path} {name}".strip()
                command.subcommands[name] = describe(sub, sub_path, helps.get(name, ""))
        elif action.option_strings:
            command.options.append(
                Option(
                    flags=list(action.option_strings),
                    help=action.help if action.help and action.help != argparse.SUPPRESS else "",
                    takes_value=action.nargs != 0,
                    choices=[str(c) for c in action.choices or []],
                )
            )
        else:
            if action.metavar == AGENT_METAVAR:
                command.agent_positional = len(command.positionals)
            command.positionals.append([str(c) for c in action.choices] if action.choices else None)
    return command


def _walk(command: Command) -> list[Command]:
    found = [command]
    for sub in command.subcommands.values():
        found += _walk(sub)
    return found


def script(parser: argparse.ArgumentParser, shell: str) -> str:
    root = describe(parser)
    if shell == "bash":
        return _shared(root) + _BASH_DRIVER
    if shell == "zsh":
        return "#compdef sidequest\n" + _shared(root) + _ZSH_DRIVER
    if shell == "fish":
        return _fish(root)
    raise ValueError(f"unknown shell {shell!r}; choose from {', '.join(SHELLS)}")


# ---- bash and zsh -----------------------------------------------------------------------------


def _words(items: list[str]) -> str:
    return shlex.quote(" ".join(items))


def _case(name: str, arms: list[tuple[str, str]], doc: str) -> str:
    lines = [f"# {doc}", f"_sidequest_{name}() {{", '    case "$1" in']
    for key, body in arms:
        lines.append(f"        {shlex.quote(key)}) {body} ;;")
    lines += ["    esac", "}", ""]
    return "\n".join(lines)


def _shared(root: Command) -> str:
    commands = _walk(root)
    subcommands = [(c.path, f"echo {_words(list(c.subcommands))}") for c in commands if c.subcommands]
    options = [(c.path, f"echo {_words([f for o in c.options for f in o.flags])}") for c in commands]
    valued = [
        (c.path, f"echo {_words([f for o in c.options if o.takes_value for f in o.flags])}")
        for c in commands
        if any(o.takes_value for o in c.options)
    ]
    choices = [
        (f"{c.path}|{flag}", f"echo {_words(o.choices)}")
        for c in commands
        for o in c.options
        if o.choices
        for flag in o.flags
    ]
    positional: list[tuple[str, str]] = []
    for c in commands:
        for i, fixed in enumerate(c.positionals):
            if i == c.agent_positional:
                positional.append((f"{c.path}|{i}", "_sidequest_agents"))
            elif fixed:
                positional.append((f"{c.path}|{i}", f"echo {_words(fixed)}"))
    return "\n".join(
        [
            f"# {PROG} completion, generated from its argument parser by `{PROG} completion`.",
            "",
            _case("subcommands", subcommands, "the subcommands of a command path ('' is the top level)"),
            _case("options", options, "every option of a command path"),
            _case("valued", valued, "the options that take a value (their value is not a command word)"),
            _case("choices", choices, "the values an option accepts, keyed 'path|option'"),
            _case("positional", positional, "the words a positional accepts, keyed 'path|index'"),
            "# the agents this project may launch (asks the daemon, as `sidequest agents` does)",
            "_sidequest_agents() {",
            f"    {_AGENT_NAMES}",
            "}",
            "",
            "# Sets _sq_path (the command path), _sq_npos (positionals so far) and _sq_prev_valued",
            "# (the previous word is an option waiting for its value) from the words before the cursor.",
            "_sidequest_scan() {",
            '    _sq_path="" _sq_npos=0 _sq_prev_valued=""',
            "    local w skip=0",
            '    for w in "$@"; do',
            '        if [ "$skip" = 1 ]; then skip=0; _sq_prev_valued=""; continue; fi',
            '        case "$w" in',
            "            --*=*) ;;",
            "            -*)",
            '                case " $(_sidequest_valued "$_sq_path") " in',
            '                    *" $w "*) skip=1; _sq_prev_valued="$w" ;;',
            "                esac ;;",
            "            *)",
            '                case " $(_sidequest_subcommands "$_sq_path") " in',
            '                    *" $w "*) _sq_path="${_sq_path:+$_sq_path }$w"; _sq_npos=0 ;;',
            "                    *) _sq_npos=$((_sq_npos + 1)) ;;",
            "                esac ;;",
            "        esac",
            "    done",
            "}",
            "",
            "# The candidates for the word under the cursor, one line of words.",
            "_sidequest_candidates() {",
            '    local cur="$1"',
            '    if [ -n "$_sq_prev_valued" ]; then',
            '        _sidequest_choices "$_sq_path|$_sq_prev_valued"',
            "        return",
            "    fi",
            '    case "$cur" in',
            '        -*) _sidequest_options "$_sq_path" ;;',
            "        *)",
            '            local subs="$(_sidequest_subcommands "$_sq_path")"',
            '            if [ -n "$subs" ]; then echo "$subs"',
            '            else _sidequest_positional "$_sq_path|$_sq_npos"; fi ;;',
            "    esac",
            "}",
            "",
        ]
    )


_BASH_DRIVER = """\
_sidequest() {
    local cur="${COMP_WORDS[COMP_CWORD]}" _sq_path _sq_npos _sq_prev_valued
    _sidequest_scan "${COMP_WORDS[@]:1:COMP_CWORD-1}"
    COMPREPLY=($(compgen -W "$(_sidequest_candidates "$cur")" -- "$cur"))
    if [ ${#COMPREPLY[@]} -eq 0 ] && [ -z "$(_sidequest_subcommands "$_sq_path")" ]; then
        COMPREPLY=($(compgen -f -- "$cur"))  # a file: --config, an agent file, a prompt file
    fi
}
complete -o filenames -F _sidequest sidequest
"""

_ZSH_DRIVER = """\
_sidequest() {
    local cur="${words[CURRENT]}" _sq_path _sq_npos _sq_prev_valued
    _sidequest_scan "${(@)words[2,CURRENT-1]}"
    local -a candidates
    candidates=(${=$(_sidequest_candidates "$cur")})
    if (( ${#candidates} )); then
        compadd -- "${candidates[@]}"
    elif [[ -z "$(_sidequest_subcommands "$_sq_path")" ]]; then
        _files
    fi
}
if [[ "${zsh_eval_context[-1]}" == loadautofunc ]]; then
    _sidequest "$@"
else
    compdef _sidequest sidequest
fi
"""


# ---- fish -------------------------------------------------------------------------------------


def _fish(root: Command) -> str:
    lines = [
        f"# {PROG} completion for fish, generated from its argument parser by `{PROG} completion fish`.",
        "",
        "# true when the command line so far is exactly this command path (options aside)",
        "function __sidequest_path",
        "    set -l words (commandline -opc)",
        "    set -e words[1]",
        "    set -l path",
        "    for w in $words",
        "        string match -q -- '-*' $w; and continue",
        "        set -a path $w",
        "    end",
        '    test "$path" = "$argv"',
        "end",
        "",
        "# true when the command path starts with these words and the next positional is number N",
        "function __sidequest_positional",
        "    set -l n $argv[1]",
        "    set -e argv[1]",
        "    set -l words (commandline -opc)",
        "    set -e words[1]",
        "    set -l plain",
        "    for w in $words",
        "        string match -q -- '-*' $w; and continue",
        "        set -a plain $w",
        "    end",
        "    set -l k (count $argv)",
        '    test (count $plain) -eq (math $k + $n); and test "$plain[1..$k]" = "$argv"',
        "end",
        "",
        f"complete -c {PROG} -f",
    ]
    for command in _walk(root):
        here = f"__sidequest_path {command.path}".strip()
        for name, sub in command.subcommands.items():
            lines.append(
                f"complete -c {PROG} -n {shlex.quote(here)} -a {shlex.quote(name)} -d {shlex.quote(sub.help)}"
            )
        for option in command.options:
            parts = [f"complete -c {PROG}"]
            if command.path:
                parts.append(f"-n {shlex.quote('__fish_seen_subcommand_from ' + command.path.split()[-1])}")
            for flag in option.flags:
                if flag.startswith("--"):
                    parts.append(f"-l {flag[2:]}")
                else:
                    parts.append(f"-s {flag[1:]}")
            if option.choices:
                parts.append(f"-x -a {shlex.quote(' '.join(option.choices))}")
            elif option.takes_value:
                parts.append("-r -F")
            if option.help:
                parts.append(f"-d {shlex.quote(option.help)}")
            lines.append(" ".join(parts))
        for i, fixed in enumerate(command.positionals):
            condition = shlex.quote(f"__sidequest_positional {i} {command.path}")
            if i == command.agent_positional:
                agents = f"({_AGENT_NAMES})"
                lines.append(f"complete -c {PROG} -n {condition} -a {shlex.quote(agents)}")
            elif fixed:
                lines.append(f"complete -c {PROG} -n {condition} -a {shlex.quote(' '.join(fixed))}")
    return "\n".join(lines) + "\n"


def add_completion_command(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    completion = sub.add_parser(
        "completion",
        help="print a shell completion script (bash, zsh or fish)",
        description="print a shell completion script for commands, options and agent names",
        epilog=(
            'bash: eval "$(sidequest completion bash)" in ~/.bashrc; zsh: sidequest completion zsh > '
            "~/.zfunc/_sidequest (a folder on $fpath); fish: sidequest completion fish > "
            "~/.config/fish/completions/sidequest.fish"
        ),
    )
    completion.add_argument("shell", choices=SHELLS, help="the shell to complete in")


__all__ = ["SHELLS", "add_completion_command", "describe", "script"]
