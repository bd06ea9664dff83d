"""The wire contract of recsys.v1 as a committed snapshot, and the check that it only grows.

    python protos/snapshot.py            # (re)write protos/recsys/v1/descriptor_snapshot.json
    python protos/snapshot.py --check    # exit 1, listing every break, when the stubs break it

The snapshot is read from the generated descriptors (`recsys.v1.*_pb2.DESCRIPTOR`, which
tests/test_protos.py keeps equal to the .proto files): every message with its fields by number
(name, type, cardinality), every enum with its values, every service with its RPCs (request and
response types, streaming on either side). tests/test_proto_compat.py runs the check in `make test`.

A v1 client must never break silently, so against the snapshot these are breaks:
  - a message, enum, enum value, service or RPC removed (renaming one is removing it);
  - a field removed, renumbered (its name now has another number), renamed (its number another
    name: wire-compatible, but every client's code breaks) or retyped (type, message/enum type, or
    singular <-> repeated; stricter than the wire needs, e.g. int32 -> int64 is also refused);
  - an enum value renumbered;
  - an RPC's request or response type changed, or its streaming changed.
Additions (messages, fields with new numbers, enum values, RPCs, services) are allowed: after one,
rewrite the snapshot and commit it with the .proto change. A breaking change needs recsys.v2.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Iterable

from google.protobuf import descriptor_pb2

PROTO_ROOT = Path(__file__).resolve().parent
GEN_ROOT = PROTO_ROOT / "gen"
SNAPSHOT = PROTO_ROOT / "recsys" / "v1" / "descriptor_snapshot.json"
PACKAGE = "recsys.v1"
FIELD_TYPES = {v: k[len("TYPE_"):].lower() for k, v in descriptor_pb2.FieldDescriptorProto.Type.items()}


def current_files() -> list[descriptor_pb2.FileDescriptorProto]:
    """The generated recsys.v1 descriptors, as FileDescriptorProtos."""
    if str(GEN_ROOT) not in sys.path:
        sys.path.insert(0, str(GEN_ROOT))
    from recsys.v1 import ranking_pb2, retrieval_pb2

    files = []
    for module in (ranking_pb2, retrieval_pb2):
        proto = descriptor_pb2.FileDescriptorProto()
        module.DESCRIPTOR.CopyToProto(proto)
        files.append(proto)
    return files


def describe(files: Iterable[descriptor_pb2.FileDescriptorProto]) -> dict:
    """The contract of `files` as plain data (what the snapshot file holds)."""
    messages, enums, services = {}, {}, {}

    def add_enum(prefix: str, enum: descriptor_pb2.EnumDescriptorProto) -> None:
        enums[f"{prefix}.{enum.name}"] = {value.name: value.number for value in enum.value}

    def add_message(prefix: str, message: descriptor_pb2.DescriptorProto) -> None:
        name = f"{prefix}.{message.name}"
        messages[name] = {str(f.number): {
            "name": f.name,
            "type": FIELD_TYPES[f.type],
            "type_name": f.type_name.lstrip("."),
            "repeated": f.label == descriptor_pb2.FieldDescriptorProto.LABEL_REPEATED,
        } for f in sorted(message.field, key=lambda f: f.number)}
        for nested in message.nested_type:
            add_message(name, nested)
        for enum in message.enum_type:
            add_enum(name, enum)

    for file in sorted(files, key=lambda f: f.name):
        for message in file.message_type:
            add_message(file.package, message)
        for enum in file.enum_type:
            add_enum(file.package, enum)
        for service in file.service:
            services[f"{file.package}.{service.name}"] = {m.name: {
                "input": m.input_type.lstrip("."), "output": m.output_type.lstrip("."),
                "client_streaming": m.client_streaming, "server_streaming": m.server_streaming,
            } for m in service.method}
    return {"package": PACKAGE, "messages": dict(sorted(messages.items())), "enums": dict(sorted(enums.items())),
            "services": dict(sorted(services.items()))}


def breaks(old: dict, new: dict) -> list[str]:
    """Every way `new` breaks a client of `old`, one line each (empty: compatible)."""
    found = []
    for message, old_fields in old["messages"].items():
        new_fields = new["messages"].get(message)
        if new_fields is None:
            found.append(f"message {message} removed")
            continue
        new_numbers = {f["name"]: int(n) for n, f in new_fields.items()}
        for number, field in old_fields.items():
            where = f"field {message}.{field['name']} = {number}"
            now = new_fields.get(number)
            moved = new_numbers.get(field["name"])
            if moved is not None and moved != int(number):
                found.append(f"{where} renumbered to {moved}")
            if now is None:
                if moved is None:
                    found.append(f"{where} removed")
                continue
            if now["name"] != field["name"]:
                found.append(f"{where} renamed to {now['name']}")
            old_type, new_type = _field_type(field), _field_type(now)
            if old_type != new_type:
                found.append(f"{where} retyped from {old_type} to {new_type}")
    for enum, old_values in old["enums"].items():
        new_values = new["enums"].get(enum)
        if new_values is None:
            found.append(f"enum {enum} removed")
            continue
        for value, number in old_values.items():
            if value not in new_values:
                found.append(f"enum value {enum}.{value} = {number} removed")
            elif new_values[value] != number:
                found.append(f"enum value {enum}.{value} renumbered from {number} to {new_values[value]}")
    for service, old_methods in old["services"].items():
        new_methods = new["services"].get(service)
        if new_methods is None:
            found.append(f"service {service} removed")
            continue
        for method, old_method in old_methods.items():
            now = new_methods.get(method)
            if now is None:
                found.append(f"rpc {service}/{method} removed")
                continue
            for key in ("input", "output", "client_streaming", "server_streaming"):
                if now[key] != old_method[key]:
                    found.append(f"rpc {service}/{method} changed its {key.replace('_', ' ')} from "
                                 f"{old_method[key]} to {now[key]}")
    return found


def _field_type(field: dict) -> str:
    kind = field["type_name"] if field["type"] in ("message", "enum", "group") else field["type"]
    return f"repeated {kind}" if field["repeated"] else kind


def load_snapshot(path: Path = SNAPSHOT) -> dict:
    return json.loads(Path(path).read_text())


def write_snapshot(path: Path = SNAPSHOT) -> dict:
    contract = describe(current_files())
    Path(path).write_text(json.dumps(contract, indent=2) + "\n")
    return contract


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="compare with the snapshot instead of writing it")
    parser.add_argument("--snapshot", type=Path, default=SNAPSHOT, help="snapshot file (default: %(default)s)")
    args = parser.parse_args(argv)
    if not args.check:
        old = load_snapshot(args.snapshot) if args.snapshot.exists() else None
        problems = breaks(old, describe(current_files())) if old else []
        if problems:
            print("refusing to overwrite the snapshot: the stubs break recsys.v1 (a breaking change needs recsys.v2):\n  "
                  + "\n  ".join(problems), file=sys.stderr)
            return 1
        write_snapshot(args.snapshot)
        print(f"wrote {args.snapshot}")
        return 0
    problems = breaks(load_snapshot(args.snapshot), describe(current_files()))
    for problem in problems:
        print(f"BREAKING: {problem}", file=sys.stderr)
    print(f"{len(problems)} breaking change(s) against {args.snapshot}" if problems else "recsys.v1 compatible")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
