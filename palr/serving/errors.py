"""Per-RPC refusals: a `RequestError` carries the gRPC status code, its message names the field."""

from __future__ import annotations

import uuid
from typing import Sequence

import grpc


# Trailing metadata of a RESOURCE_EXHAUSTED that means "this replica's queue is full, another may serve it", as
# opposed to one about the request itself (a message over the size limit), which no other replica would take
QUEUE_FULL = ("x-refused", "queue-full")


class RequestError(Exception):
    """A request the server refuses: carries the gRPC status code; the message names the field;
    `trailing_metadata` goes with the status (e.g. `QUEUE_FULL`)."""

    def __init__(self, code: grpc.StatusCode, message: str, trailing_metadata: tuple[tuple[str, str], ...] = ()):
        super().__init__(message)
        self.code = code
        self.trailing_metadata = trailing_metadata


def invalid_argument(message: str) -> RequestError:
    return RequestError(grpc.StatusCode.INVALID_ARGUMENT, message)


MAX_IDS_IN_MESSAGE = 10


def check_known_ids(field_name: str, item_ids: Sequence[str], catalog) -> None:
    """INVALID_ARGUMENT naming the field and its unknown item ids (the first few, each cut to 40
    characters) when `catalog` does not know some of `item_ids`."""
    unknown = list(dict.fromkeys(catalog.unknown(item_ids)))
    if unknown:
        shown = ", ".join(repr(i[:40]) for i in unknown[:MAX_IDS_IN_MESSAGE])
        more = f" and {len(unknown) - MAX_IDS_IN_MESSAGE} more" if len(unknown) > MAX_IDS_IN_MESSAGE else ""
        raise invalid_argument(f"{field_name}: unknown item ids {shown}{more}: not in this server's catalog (items "
                               f"newer than its bundle, or ids of another catalog); leave them out")


REQUEST_ID_KEY = "x-request-id"  # metadata: a caller may send its request id in it; every answer carries it back


def request_id(from_request: str, context: grpc.aio.ServicerContext) -> str:
    """The request's id for logs: its own field, else `x-request-id` metadata, else a new one."""
    if from_request:
        return from_request
    for key, value in context.invocation_metadata() or ():
        if key == REQUEST_ID_KEY and value:
            return value
    return uuid.uuid4().hex[:16]
