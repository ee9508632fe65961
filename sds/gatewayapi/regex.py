"""Would Envoy accept this regular expression as a ``safe_regex`` (the google_re2 engine)?

Gateway API leaves ``RegularExpression`` path, header and query matches to the implementation;
ours become Envoy ``safe_regex`` matchers. Envoy refuses a route configuration whose regex RE2
cannot compile, and also one whose compiled RE2 program is bigger than the runtime value
``re2.max_program_size.error_level`` (100 unless the runtime says otherwise). One bad pattern in
a route table makes Envoy refuse the whole update, so routes are checked here first.
"""

from __future__ import annotations

import re2

#: Envoy's default for the runtime key ``re2.max_program_size.error_level``.
MAX_PROGRAM_SIZE = 100
#: Patterns longer than this (UTF-8 bytes) are refused before RE2 sees them: RE2 would refuse
#: most of them for program size anyway, and compiling huge untrusted input costs memory.
MAX_PATTERN_BYTES = 1024

_OPTIONS = re2.Options()
# Without this RE2 writes every refused pattern, untrusted text, to stderr.
_OPTIONS.log_errors = False
_REASON_CHARS = 80


def check(pattern: str) -> str | None:
    """``None`` when Envoy would accept ``pattern`` as a google_re2 regex, else a short reason."""
    if not pattern:
        return "is empty"  # the RegexMatcher proto requires at least one character
    if "\x00" in pattern:
        return "contains a NUL character"
    try:
        size = len(pattern.encode("utf-8"))
    except UnicodeEncodeError:
        return "is not valid UTF-8 text"
    if size > MAX_PATTERN_BYTES:
        return f"is {size} bytes long; the limit is {MAX_PATTERN_BYTES}"
    try:
        compiled = re2.compile(pattern, _OPTIONS)
    except re2.error as exc:
        return f"is not a valid RE2 pattern: {_error_text(exc)}"
    program_size = int(compiled.programsize)
    if program_size > MAX_PROGRAM_SIZE:
        return (
            f"is too complex for Envoy: its RE2 program size is {program_size}, "
            f"the limit is {MAX_PROGRAM_SIZE}"
        )
    return None


def _error_text(exc: Exception) -> str:
    """RE2's error message (which quotes the pattern), cut short and made printable."""
    raw = exc.args[0] if exc.args else ""
    text = raw.decode("utf-8", "replace") if isinstance(raw, bytes) else str(raw)
    if len(text) > _REASON_CHARS:
        text = text[:_REASON_CHARS] + "…"
    return text.encode("unicode_escape").decode("ascii")
