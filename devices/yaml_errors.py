"""A YAML syntax error said so that a person can fix it: the line quoted with a caret under where
the parser stopped, and for the usual slips a plain hint before the parser's words.

The parser says `did not find expected key` for a line indented one space off, `found character
that cannot start any token` for a tab, and names the end of the file for a quote left open. What
the person needs is the line, the column, and what is wrong with it: "line 10 is indented 3 spaces;
the lines before it are indented 2 (line 7) or 4 (line 9)". The parser's words follow in
parentheses. Used for device files and the config file alike (devices.loader.read_documents).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import yaml

# The line breaks YAML counts lines by (its marks' line numbers), not all of str.splitlines()'s.
_LINE_BREAK = re.compile("\r\n|[\r\n\x85\u2028\u2029]")

# A quoted line is cut to this many characters around the caret (a value thousands of brackets deep).
QUOTE_WIDTH = 100


@dataclass(frozen=True, slots=True)
class SyntaxProblem:
    line: int | None  # 1-based; None when the parser gave no position
    message: str  # the hint (or the parser's words); below it the line quoted, and a caret


def explain(exc: yaml.YAMLError, text: str) -> SyntaxProblem:
    """The line a person should look at, and what to tell them about it."""
    problem_mark = getattr(exc, "problem_mark", None)
    problem = getattr(exc, "problem", None) or str(exc)
    if problem_mark is None:
        return SyntaxProblem(None, problem)
    lines = _LINE_BREAK.split(text)
    context = getattr(exc, "context", None) or ""
    context_mark = getattr(exc, "context_mark", None)
    at, column = problem_mark.line, problem_mark.column
    hint = _tab(lines, at)
    if hint is None and context == "while scanning a quoted scalar" and context_mark is not None and (
            "end of stream" in problem or "document" in problem):
        # Where the parser stopped (the file's end, the next `---`) is no place to fix it: the quote's line is.
        at, column = context_mark.line, context_mark.column
        quote = _char(lines, at, column) or "quote"
        ends = "the file ends" if "end of stream" in problem else "the next document (---) begins"
        hint = f"the {quote} that opens this value is never closed ({ends} first): close it with {quote}"
    if hint is None and context in ("while parsing a flow sequence", "while parsing a flow mapping") and (
            context_mark is not None):
        opener = _char(lines, context_mark.line, context_mark.column) or ("[" if "sequence" in context else "{")
        closer = {"[": "]", "{": "}"}.get(opener, "]")
        hint = (f"the {opener} opened on line {context_mark.line + 1} (column {context_mark.column + 1}) is not closed"
                f" before this: end it with {closer} (items inside are separated by commas)"
                if at > context_mark.line else
                f"a comma or {closer} was expected here, inside the {opener} at column {context_mark.column + 1}")
    if hint is None and context == "while parsing a flow node" and (ends := _ended(lines, at, column)) and (
            opened := _unclosed_flow(lines, at + 1)) is not None:
        # (the parser names only where the input ended, not the bracket: that is the line to fix)
        at, column = opened
        closer = {"[": "]", "{": "}"}[lines[at][column]]
        hint = (f"the {lines[at][column]} opened here is never closed ({ends} first): end it with {closer} (items"
                " inside are separated by commas)")
    if hint is None and context == "while scanning a simple key" and context_mark is not None:
        hint, at, column = _no_colon(lines, context_mark.line, context_mark.column, at, column)
    if hint is None and context.startswith("while parsing a block") and (
            problem.startswith(("did not find expected", "expected <block end>"))) and (
            at < len(lines) and column == _indent(lines[at])):  # (stopped at the line's start: its indentation)
        hint = _misindented(lines, at)
    if hint is None and problem.startswith("mapping values are not allowed"):
        hint, column = _continued_or_colon(lines, at, column)
    said = f"{hint} ({problem})" if hint is not None else problem
    return SyntaxProblem(at + 1, f"{said}\n{_quoted(lines, at, column)}")


def _ended(lines: list[str], at: int, column: int) -> str | None:
    """What the parser met at line `at`, `column` when it is the end of the document: "the file
    ends" or "the next document (---) begins"; None for anything else."""
    if not any(text.strip() for text in [lines[at][column:] if at < len(lines) else "", *lines[at + 1:]]):
        return "the file ends"
    if at < len(lines) and column == 0 and lines[at].startswith(("---", "...")):
        return "the next document (---) begins"
    return None


def _unclosed_flow(lines: list[str], end: int) -> tuple[int, int] | None:
    """The innermost `[` or `{` still open before line `end` (0-based), as (line, column); None when
    there is none, or when a quoted text runs over a line's end (not followed here). A bracket counts
    where a flow collection may begin (a line's first character, or after `:`, `-`, `?`, `,` or
    another bracket), not inside a plain text (`a[1]`); comments are skipped."""
    opened: list[tuple[int, int]] = []
    for number in range(min(end, len(lines))):
        text, i, before = lines[number], 0, None
        while i < len(text):
            char = text[i]
            if char in " \t":
                i += 1
                continue
            if char == "#" and (i == 0 or text[i - 1] in " \t"):
                break
            starts = before is None or before in ":-?,[{"
            if char in "'\"" and starts:
                i = _after_quoted(text, i)
                if i < 0:
                    return None
                before = char
                continue
            if char in "[{" and starts:
                opened.append((number, i))
            elif char in "]}" and opened:
                opened.pop()
            before = char
            i += 1
    return opened[-1] if opened else None


def _after_quoted(text: str, start: int) -> int:
    """The index after the quoted text that starts at `start` (`''` and `\\"` escape a quote), or -1
    when it does not end on this line."""
    quote, i = text[start], start + 1
    while i < len(text):
        if quote == '"' and text[i] == "\\":
            i += 2
            continue
        if text[i] == quote:
            if quote == "'" and text[i + 1:i + 2] == "'":
                i += 2
                continue
            return i + 1
        i += 1
    return -1


def _char(lines: list[str], line: int, column: int) -> str | None:
    return lines[line][column] if line < len(lines) and column < len(lines[line]) else None


def _indent(text: str) -> int:
    return len(text) - len(text.lstrip(" "))


def _significant(text: str) -> bool:
    """Not blank and not a comment only: a line that takes part in the indentation."""
    stripped = text.strip()
    return bool(stripped) and not stripped.startswith("#")


def _tab(lines: list[str], at: int) -> str | None:
    if at >= len(lines):
        return None
    text = lines[at]
    leading = text[:len(text) - len(text.lstrip(" \t"))]
    if "\t" not in leading:
        return None
    return f"line {at + 1} is indented with a tab: YAML indents with spaces only; replace the tab with spaces"


def _levels(lines: list[str], at: int) -> list[tuple[int, int]]:
    """The indentations open at line `at` (0-based), innermost first, each with the line (1-based)
    that opened it: each line before it indented less than every line between them. A `- ` item
    opens two: its dash's column and its content's (`- name: a`: 4 and 6)."""
    levels: list[tuple[int, int]] = []
    bound = None
    for number in range(min(at, len(lines)) - 1, -1, -1):
        text = lines[number]
        if not _significant(text):
            continue
        indent = _indent(text)
        if bound is not None and indent >= bound:
            continue
        content, rest = indent, text[indent:]
        while rest.startswith("- ") or rest == "-":
            stripped = rest[1:].lstrip(" ")
            content += len(rest) - len(stripped)
            rest = stripped
        if content != indent and (bound is None or content < bound) and rest:
            levels.append((content, number + 1))
        levels.append((indent, number + 1))
        bound = indent
        if indent == 0:
            break
    return levels


def _misindented(lines: list[str], at: int) -> str | None:
    """For a line whose indentation matches no block open before it: how it is indented, and how
    the lines it may belong with are."""
    if at >= len(lines):
        return None
    indent = _indent(lines[at])
    levels = _levels(lines, at)
    if any(level == indent for level, _ in levels):
        return None  # (indented as a block before it: something else is wrong)
    below = max(((level, line) for level, line in levels if level < indent), default=None)
    above = min(((level, line) for level, line in levels if level > indent), default=None)
    spaces = "space" if indent == 1 else "spaces"
    if below is not None and above is not None and below[1] == above[1]:  # `- name: x`: the dash, then the key
        around = (f"line {below[1]} has its '-' at {below[0]} and its first key at {above[0]}: indent it {above[0]}"
                  f" for a key of that item, or {below[0]} for a new item")
    elif below is not None and above is not None:
        around = (f"the lines before it are indented {below[0]} (line {below[1]}) or {above[0]} (line {above[1]}):"
                  " indent it as the ones it belongs with")
    elif below is not None or above is not None:
        level, line = below or above  # type: ignore[misc]
        around = f"the lines it belongs with are indented {level} (line {line}): indent it as they are"
    else:
        return None
    return f"line {at + 1} is indented {indent} {spaces}; {around}"


def _no_colon(lines: list[str], line: int, column: int, at: int, stopped: int) -> tuple[str | None, int, int]:
    """`could not find expected ':'`: a key written without its colon (`spec` for `spec:`), which YAML
    reads, with the lines after it, as one text. Said at that key's line, the caret after it."""
    if line >= len(lines):
        return None, at, stopped
    word = lines[line][column:].rstrip()
    if not word or ":" in word:
        return None, at, stopped
    return (f"no ':' after {word!r} on line {line + 1}, so YAML reads it and the lines after it as one text: write"
            f" {word + ':'!r} (or quote a text that goes on over several lines)"), line, column + len(word)


def _continued_or_colon(lines: list[str], at: int, column: int) -> tuple[str | None, int]:
    """`mapping values are not allowed`: a line indented deeper than the `key: value` line before it
    (YAML reads it as the rest of that value; the caret then goes under its indentation), or a
    second `: ` in one value."""
    if at >= len(lines):
        return None, column
    previous = next((n for n in range(at - 1, -1, -1) if _significant(lines[n])), None)
    text = lines[at]
    if previous is not None:
        before = lines[previous]
        key_at = _levels(lines, previous + 1)[0][0]  # (its key's column: after the dash of a `- key: value`)
        value = before.split(": ", 1)[1].strip() if ": " in before else ""
        if _indent(text) > key_at and value and not value.startswith("#"):
            key = before[key_at:].split(":", 1)[0]
            return (f"line {at + 1} is indented deeper than line {previous + 1} ({_indent(text)} spaces, not {key_at}),"
                    f" so YAML reads it as the rest of line {previous + 1}'s value: indent it {key_at} spaces, as"
                    f" {key!r} on line {previous + 1}, if it is a key beside it"), _indent(text)
    if 0 <= text.find(": ") < column:
        return "a value with ': ' in it must be quoted: put the whole value in quotes", column
    return None, column


def _quoted(lines: list[str], at: int, column: int) -> str:
    """`  10 | the line` and a caret under `column` below it; a tab shown as \\t."""
    if at >= len(lines) or (at == len(lines) - 1 and not lines[at]):  # (after the file's last line break)
        return f"  {at + 1} | (the end of the file)"
    text = lines[at]
    start = max(0, min(column - QUOTE_WIDTH // 2, len(text) - QUOTE_WIDTH))
    shown = text[start:start + QUOTE_WIDTH]
    prefix, suffix = ("..." if start else ""), ("..." if start + QUOTE_WIDTH < len(text) else "")
    caret = len(prefix) + len(shown[:max(0, column - start)].replace("\t", "\\t"))
    number = f"{at + 1}"
    return f"  {number} | {prefix}{shown.replace(chr(9), chr(92) + 't')}{suffix}\n  {' ' * len(number)} | {' ' * caret}^"
