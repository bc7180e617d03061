"""Case names that are safe to turn into file names inside the output folder.

A case name comes from a CSV's `case` column or from a file name, and becomes the stem of
every output file (`<case>.seg.nrrd`, `<case>_summary.json`, ...). A hostile or careless
name could climb out of the output folder (`../../x`), hide (`.x`), or break a terminal or
a later script (control characters). Such names are refused, never silently rewritten: a
renamed case would no longer match the participant id a study joins on.
"""

from __future__ import annotations

import unicodedata
from pathlib import Path

# Longest name kept: the longest suffix we add (`_preview.png`, `_summary.json`: 13 characters)
# plus the staging folder's prefix must stay under the usual 255-byte limit of a file name.
MAX_NAME_BYTES = 200


def unsafe_name_reason(name: str) -> str | None:
    """Why `name` cannot be a case name (a sentence), or None when it is safe."""
    if not name or not name.strip():
        return "the case name is empty"
    if name != name.strip():
        return "the case name starts or ends with white space"
    if any(sep in name for sep in ("/", "\\")):
        return "the case name holds a path separator (/ or \\)"
    if ".." in name:
        return "the case name holds '..'"
    if name.startswith("."):
        return "the case name starts with a dot (hidden file)"
    # Cc: control characters (NUL, newline, escape, DEL ...); Cf/Zl/Zp: invisible format and line marks.
    bad = [c for c in name if unicodedata.category(c) in ("Cc", "Cf", "Zl", "Zp")]
    if bad:
        shown = ", ".join(sorted({f"U+{ord(c):04X}" for c in bad}))
        return f"the case name holds control characters ({shown})"
    if ":" in name:
        return "the case name holds ':' (a drive or stream separator on Windows)"
    if len(name.encode("utf-8", "surrogateescape")) > MAX_NAME_BYTES:
        return f"the case name is longer than {MAX_NAME_BYTES} bytes"
    return None


def printable(name: str) -> str:
    """The name as it can be shown in a message or a table: control characters escaped."""
    return name if name.isprintable() else name.encode("unicode_escape").decode("ascii")


def refuse_unsafe_and_duplicates(names: list[str]) -> dict[int, str]:
    """For each refused position in `names`, the reason; checked before any case runs.

    Duplicates are compared case-insensitively (`A` and `a` are one file on macOS and
    Windows); every entry of a duplicated name is refused, since neither can be told apart.
    """
    refused: dict[int, str] = {}
    for i, name in enumerate(names):
        reason = unsafe_name_reason(name)
        if reason:
            refused[i] = reason
    positions: dict[str, list[int]] = {}
    for i, name in enumerate(names):
        if i not in refused:
            positions.setdefault(unicodedata.normalize("NFC", name).casefold(), []).append(i)
    for same in positions.values():
        if len(same) > 1:
            for i in same:
                refused[i] = f"the case name is used by {len(same)} entries of this batch; outputs would collide"
    return refused


def inside(out_dir: Path, case: str) -> bool:
    """True when the outputs of `case` land directly inside `out_dir` (the last line of defence)."""
    root = Path(out_dir).resolve()
    return (root / f"{case}_summary.json").resolve().parent == root
