"""Validation of the caller-chosen strings both servers accept, shared so they agree.

`user_id` is a key into the bundle's users and goes into both servers' logs and into the request
the ranking tier sends the retrieval tier, so it is held to what an id is: at most
`MAX_USER_ID_CHARS` characters, each printable (`str.isprintable`: no control characters, NUL,
line or paragraph separators, surrogates, private-use or unassigned code points, which covers
the non-characters U+FFFE, U+FFFF, U+FDD0..U+FDEF). Empty is allowed: it means an anonymous caller
(with an explicit `history`, or a cold start). A refused id is INVALID_ARGUMENT naming the field,
and never repeated (the message gives its length only).
"""

from __future__ import annotations

from palr.serving.errors import invalid_argument

MAX_USER_ID_CHARS = 256


def user_id_problem(value: str) -> str | None:
    """Why `value` is not an acceptable user id, or None when it is."""
    if len(value) > MAX_USER_ID_CHARS:
        return f"is {len(value)} characters long; at most {MAX_USER_ID_CHARS}"
    if not value.isprintable():
        bad = next(i for i, c in enumerate(value) if not c.isprintable())
        return (f"has a character that is not printable (control, NUL, separator or non-character, "
                f"U+{ord(value[bad]):04X} at position {bad})")
    return None


def check_user_id(value: str) -> None:
    """INVALID_ARGUMENT naming `user_id` when the id is not acceptable (empty is: anonymous)."""
    problem = user_id_problem(value)
    if problem:
        raise invalid_argument(f"user_id {problem}; use 0 to {MAX_USER_ID_CHARS} printable characters "
                               f"(empty = anonymous, cold start unless history is given)")
