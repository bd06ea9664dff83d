"""Validation of the caller-chosen strings both servers accept, shared so they agree.

Request ids (`REQUEST_ID`: 1 to 128 printable ASCII characters) go into logs and metadata as they are.
`user_id` is a key into the bundle's users and goes into both servers' logs and into the request
the ranking tier sends the retrieval tier, so it is held to what an id is: at most
`MAX_USER_ID_CHARS` characters, each printable (`str.isprintable`: no control characters, NUL,
line or paragraph separators, surrogates, private-use or unassigned code points, which covers
the non-characters U+FFFE, U+FFFF, U+FDD0..U+FDEF). Empty is allowed: it means an anonymous caller
(with an explicit `history`, or a cold start). A refused id is INVALID_ARGUMENT naming the field,
and never repeated (the message gives its length only).
"""

from __future__ import annotations

import re
import uuid

from palr.serving.errors import invalid_argument

MAX_USER_ID_CHARS = 256
# Item-id lists a caller sends (history, exclude): far more than any model reads (SASRec the newest 50, the
# prompt 10), small enough that checking them never stalls a server's event loop.
MAX_ITEM_IDS = 10_000
# Request ids go into logs and into `x-request-id` metadata (printable ASCII only).
REQUEST_ID = re.compile(r"[\x21-\x7e]{1,128}")
REQUEST_ID_RULE = "request_id (or x-request-id metadata) must be 1 to 128 printable ASCII characters without spaces"


def valid_request_id(value: str) -> bool:
    return bool(REQUEST_ID.fullmatch(value))


def loggable_request_id(rid: str) -> tuple[str, bool]:
    """(the id the logs use, whether the caller's id was valid): an invalid one is never logged, a fresh
    "invalid-..." id stands for it, and the request is refused with INVALID_ARGUMENT (`REQUEST_ID_RULE`)."""
    if valid_request_id(rid):
        return rid, True
    return "invalid-" + uuid.uuid4().hex[:16], False


def user_id_problem(value: str) -> str | None:
    """Why `value` is not an acceptable user id, or None when it is."""
    if len(value) > MAX_USER_ID_CHARS:
        return f"is {len(value)} characters long; at most {MAX_USER_ID_CHARS}"
    if not value.isprintable():
        bad = next(i for i, c in enumerate(value) if not c.isprintable())
        return (f"has a character that is not printable (control, NUL, separator or non-character, "
                f"U+{ord(value[bad]):04X} at position {bad})")
    return None


def check_item_id_count(field_name: str, item_ids) -> None:
    """INVALID_ARGUMENT naming the field when a caller sends more than `MAX_ITEM_IDS` item ids in it."""
    if len(item_ids) > MAX_ITEM_IDS:
        raise invalid_argument(f"{field_name} has {len(item_ids)} item ids; at most {MAX_ITEM_IDS} (send the newest: "
                               f"the models read the most recent ones)")


def check_user_id(value: str) -> None:
    """INVALID_ARGUMENT naming `user_id` when the id is not acceptable (empty is: anonymous)."""
    problem = user_id_problem(value)
    if problem:
        raise invalid_argument(f"user_id {problem}; use 0 to {MAX_USER_ID_CHARS} printable characters "
                               f"(empty = anonymous, cold start unless history is given)")
