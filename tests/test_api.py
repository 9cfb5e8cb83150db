"""The v1 API: generated stubs import, every message round-trips with every field set, and the
.proto sources keep the conventions (every field documented, enums start at *_UNSPECIFIED = 0)."""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

import pytest
from google.protobuf import descriptor_pb2
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message
from grpc_tools import protoc

ROOT = Path(__file__).resolve().parent.parent
PROTO_DIR = ROOT / "proto"
PROTO_FILES = sorted((PROTO_DIR / "swarmserve" / "v1").glob("*.proto"))
MODULES = [path.stem for path in PROTO_FILES]
SERVICES = {
    "router": ["Router"],
    "relay": ["Relay"],
    "inference": ["Inference"],
    "verifier": ["Verifier"],
    "overlay": ["Overlay"],
    "chain": ["Chain"],
}


def test_every_proto_file_has_generated_stubs() -> None:
    assert set(MODULES) == {"common", *SERVICES}
    for name in MODULES:
        importlib.import_module(f"swarmserve.v1.{name}_pb2")
        importlib.import_module(f"swarmserve.v1.{name}_pb2_grpc")


@pytest.mark.parametrize("module", sorted(SERVICES))
def test_services_have_stub_servicer_and_registration(module: str) -> None:
    grpc_module = importlib.import_module(f"swarmserve.v1.{module}_pb2_grpc")
    for service in SERVICES[module]:
        assert hasattr(grpc_module, f"{service}Stub")
        assert hasattr(grpc_module, f"{service}Servicer")
        assert hasattr(grpc_module, f"add_{service}Servicer_to_server")


def _sample(field: FieldDescriptor, depth: int) -> Any:
    kinds = {
        FieldDescriptor.TYPE_STRING: "sample-text-é",
        FieldDescriptor.TYPE_BYTES: b"\x00\x01\xffbytes",
        FieldDescriptor.TYPE_BOOL: True,
        FieldDescriptor.TYPE_FLOAT: 0.5,
        FieldDescriptor.TYPE_DOUBLE: 0.25,
        FieldDescriptor.TYPE_INT32: -7,
        FieldDescriptor.TYPE_INT64: -(2**40),
        FieldDescriptor.TYPE_UINT32: 2**31 + 5,
        FieldDescriptor.TYPE_UINT64: 2**63 + 9,
    }
    if field.type == FieldDescriptor.TYPE_ENUM:
        return field.enum_type.values[-1].number
    return kinds[field.type]


def _populate(message: Message, depth: int = 0) -> None:
    """Sets every field (the last member of each oneof, so each oneof is set once)."""
    descriptor: Descriptor = message.DESCRIPTOR
    for field in descriptor.fields:
        repeated = field.is_repeated
        if field.type == FieldDescriptor.TYPE_MESSAGE:
            if depth > 3:
                continue
            if repeated:
                _populate(getattr(message, field.name).add(), depth + 1)
                _populate(getattr(message, field.name).add(), depth + 1)
            else:
                _populate(getattr(message, field.name), depth + 1)
                getattr(message, field.name).SetInParent()
        elif repeated:
            getattr(message, field.name).extend([_sample(field, depth)] * 2)
        else:
            setattr(message, field.name, _sample(field, depth))


def _all_message_classes() -> list[type[Message]]:
    classes: list[type[Message]] = []
    for name in MODULES:
        module = importlib.import_module(f"swarmserve.v1.{name}_pb2")
        for message_name in module.DESCRIPTOR.message_types_by_name:
            classes.append(getattr(module, message_name))
    return classes


@pytest.mark.parametrize("cls", _all_message_classes(), ids=lambda c: c.DESCRIPTOR.full_name)
def test_every_message_round_trips(cls: type[Message]) -> None:
    original = cls()
    _populate(original)
    wire = original.SerializeToString(deterministic=True)
    decoded = cls()
    decoded.ParseFromString(wire)
    assert decoded == original
    assert decoded.SerializeToString(deterministic=True) == wire
    # Every field survived; no oneof member lost to another.
    assert len(decoded.ListFields()) == len(original.ListFields())


@pytest.fixture(scope="module")
def descriptor_set(tmp_path_factory: pytest.TempPathFactory) -> descriptor_pb2.FileDescriptorSet:
    out = tmp_path_factory.mktemp("descriptors") / "v1.pb"
    args = [
        "protoc",
        f"-I{PROTO_DIR}",
        f"-I{Path(protoc.__file__).parent / '_proto'}",
        "--include_source_info",
        f"--descriptor_set_out={out}",
        *[str(path.relative_to(PROTO_DIR)) for path in PROTO_FILES],
    ]
    assert protoc.main(args) == 0
    return descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes())


def _commented_paths(proto: descriptor_pb2.FileDescriptorProto) -> set[tuple[int, ...]]:
    return {
        tuple(location.path)
        for location in proto.source_code_info.location
        if location.leading_comments.strip() or location.trailing_comments.strip()
    }


def test_every_field_and_rpc_is_documented(
    descriptor_set: descriptor_pb2.FileDescriptorSet,
) -> None:
    undocumented: list[str] = []
    message_tag, field_tag, service_tag, method_tag = 4, 2, 6, 2
    for proto in descriptor_set.file:
        commented = _commented_paths(proto)
        for m, message in enumerate(proto.message_type):
            for f, field in enumerate(message.field):
                if (message_tag, m, field_tag, f) not in commented:
                    undocumented.append(f"{proto.name}: {message.name}.{field.name}")
        for s, service in enumerate(proto.service):
            for r, method in enumerate(service.method):
                if (service_tag, s, method_tag, r) not in commented:
                    undocumented.append(f"{proto.name}: {service.name}.{method.name}")
    assert undocumented == []


def test_enums_start_with_unspecified_zero(
    descriptor_set: descriptor_pb2.FileDescriptorSet,
) -> None:
    enums = [enum for proto in descriptor_set.file for enum in proto.enum_type]
    assert enums, "the API defines enums"
    for enum in enums:
        first = enum.value[0]
        assert first.number == 0 and first.name.endswith("_UNSPECIFIED"), enum.name


def test_package_is_versioned(descriptor_set: descriptor_pb2.FileDescriptorSet) -> None:
    assert {proto.package for proto in descriptor_set.file} == {"swarmserve.v1"}
