"""Hypothesis strategies for protobuf messages, built from their descriptors (in the style of
hypothesis-protobuf): every field of a message, to a bounded depth, filled with hostile values.

- Scalars: the type's boundaries (0, -1, the largest and smallest values, 2^63 for uint64...),
  NaN, infinities, -0.0 and subnormals for floats, unknown numbers for enums (proto3 enums are
  open), and random values in between.
- Strings and bytes: empty, short random, just over common limits (64, 1024 characters...),
  large (about a megabyte, rarely), NUL and control characters, wrong-length keys (31, 33, 64
  bytes), and values the caller knows are meaningful to the server (``Hints``: a model name, a
  node's identity key, the chain id), so that requests get past the first checks.
- Repeated fields: empty, a few elements, or a list at and just past its known limit
  (``Hints.limits``, by field name), built cheaply by repeating a few drawn elements.
- Oneofs: none, or exactly one member (proto3 ``optional`` fields: present or absent).
- Nested messages: down to ``max_depth`` levels, then left unset (recursive types end there).

``Hints.overrides`` adds strategies for whole message types (signed envelopes whose signature
must verify for the server to look further): each is mixed in with the generic strategy.
"""

from __future__ import annotations

import math
import string
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from google.protobuf import message_factory
from google.protobuf.descriptor import Descriptor, FieldDescriptor, OneofDescriptor
from google.protobuf.message import Message
from hypothesis import strategies as st

__all__ = ["ABSENT", "Hints", "MessageFuzzer", "is_repeated", "real_oneofs"]

ABSENT: Any = object()  # a field left unset

_INT_RANGES = {
    FieldDescriptor.TYPE_INT32: (-(2**31), 2**31 - 1),
    FieldDescriptor.TYPE_SINT32: (-(2**31), 2**31 - 1),
    FieldDescriptor.TYPE_SFIXED32: (-(2**31), 2**31 - 1),
    FieldDescriptor.TYPE_UINT32: (0, 2**32 - 1),
    FieldDescriptor.TYPE_FIXED32: (0, 2**32 - 1),
    FieldDescriptor.TYPE_INT64: (-(2**63), 2**63 - 1),
    FieldDescriptor.TYPE_SINT64: (-(2**63), 2**63 - 1),
    FieldDescriptor.TYPE_SFIXED64: (-(2**63), 2**63 - 1),
    FieldDescriptor.TYPE_UINT64: (0, 2**64 - 1),
    FieldDescriptor.TYPE_FIXED64: (0, 2**64 - 1),
}

_HOSTILE_STRINGS = [
    "",
    " ",
    "\x00",
    "a\x00b",
    "\n\r\t",
    "\u202e\u200b\ufeff",
    "😀" * 3,
    "%s%n%x",
    "../../etc/passwd",
    "unix:/tmp/socket",
    "127.0.0.1:0",
    "[::1]:1",
    "host:99999",
    ":",
    "a" * 64,
    "a" * 65,
    "é" * 33,
]

_HOSTILE_FLOATS = [math.nan, -math.nan, math.inf, -math.inf, -0.0, 1e-45, -1.0, 1.0, 3.4028234e38, 2.0**24 + 1]
_HOSTILE_DOUBLES = [math.nan, math.inf, -math.inf, -0.0, 5e-324, -1.0, 1.0, 1.7976931348623157e308]


def is_repeated(field_descriptor: FieldDescriptor) -> bool:
    repeated = getattr(field_descriptor, "is_repeated", None)
    if isinstance(repeated, bool):
        return repeated
    return bool(field_descriptor.label == FieldDescriptor.LABEL_REPEATED)


def _synthetic(oneof: OneofDescriptor) -> bool:
    """A proto3 ``optional`` field's oneof (one member, named after it with a leading _)."""
    return len(oneof.fields) == 1 and oneof.name == f"_{oneof.fields[0].name}"


def real_oneofs(descriptor: Descriptor) -> list[OneofDescriptor]:
    return [o for o in descriptor.oneofs if not _synthetic(o)]


@dataclass
class Hints:
    """What the fuzzer knows about the server under test, to reach past its first checks."""

    strings: Sequence[str] = ()  # meaningful strings (a served model's name, member addresses)
    blobs: Sequence[bytes] = ()  # meaningful bytes (identity keys, the chain id, a weights digest)
    integers: Sequence[int] = ()  # meaningful numbers (the vocabulary size and its neighbours)
    limits: Mapping[str, int] = field(default_factory=dict)  # repeated field name -> its documented limit
    # Field name -> values that are valid for it (a model name for ``model``, a member's key for
    # ``payee_key``...), drawn about half the time, and the field set more often: a request is
    # then often valid but for one or two hostile fields, so the fuzz reaches past the first check.
    fields: Mapping[str, Sequence[Any]] = field(default_factory=dict)
    # Message full name -> valid examples: mixed in, with one or two fields replaced by hostile ones.
    valid: Mapping[str, Sequence[Message]] = field(default_factory=dict)
    overrides: dict[str, Callable[[MessageFuzzer, int], st.SearchStrategy[Message]]] = field(default_factory=dict)


class MessageFuzzer:
    def __init__(self, hints: Hints, max_depth: int = 3, big: bool = True) -> None:
        self.hints = hints
        self.max_depth = max_depth
        self.big = big  # whether strings and bytes may be large (about a megabyte)
        self._cache: dict[tuple[str, int, bool], st.SearchStrategy[Message]] = {}

    # --- scalars ---------------------------------------------------------------------------------

    def integers(self, kind: int) -> st.SearchStrategy[int]:
        low, high = _INT_RANGES[kind]
        # The type's extremes and the signed/unsigned boundaries (where a uint64 meets SQLite's
        # int64, a uint32 a C int), then other interesting numbers, then anything.
        extremes = {low, high, 0, -1, 2**31 - 1, 2**31, 2**32 - 1, 2**63 - 1, 2**63, -(2**31)}
        edges = {1, 2, 64, 255, 256, 65_535, 65_536, 2**53 + 1, *self.hints.integers}
        return st.one_of(
            st.sampled_from(sorted(v for v in extremes if low <= v <= high)),
            st.sampled_from(sorted(v for v in edges if low <= v <= high)),
            st.integers(low, high),
            st.integers(0, 300),
        )

    def floats(self, double: bool) -> st.SearchStrategy[float]:
        if double:
            return st.one_of(st.sampled_from(_HOSTILE_DOUBLES), st.floats(), st.floats(0, 1))
        return st.one_of(st.sampled_from(_HOSTILE_FLOATS), st.floats(width=32), st.floats(0, 5, width=32))

    def strings(self, small: bool = False) -> st.SearchStrategy[str]:
        options: list[st.SearchStrategy[str]] = [
            st.sampled_from(_HOSTILE_STRINGS),
            st.text(max_size=24),
            st.text(alphabet=string.printable, max_size=80),
        ]
        if self.hints.strings:
            options.append(st.sampled_from(list(self.hints.strings)))
        if not small:
            sizes = [1025, 4097, 70_000] + ([1_100_000] if self.big else [])
            options.append(
                st.builds(lambda c, n: c * n, st.sampled_from(["a", "é", "\x00", "word "]), st.sampled_from(sizes))
            )
        return st.one_of(*options)

    def blobs(self, small: bool = False) -> st.SearchStrategy[bytes]:
        options: list[st.SearchStrategy[bytes]] = [
            st.binary(max_size=40),
            st.builds(
                lambda n, b: bytes([b]) * n,
                st.sampled_from([0, 1, 16, 31, 32, 33, 63, 64, 65, 2048]),
                st.integers(0, 255),
            ),
        ]
        if self.hints.blobs:
            options.append(st.sampled_from(list(self.hints.blobs)))
            # A meaningful value one byte short or long.
            options.append(
                st.sampled_from([b[:-1] for b in self.hints.blobs if b] + [b + b"\x00" for b in self.hints.blobs])
            )
        if not small:
            sizes = [4097, 70_000] + ([1_100_000] if self.big else [])
            options.append(st.builds(lambda n: b"\xff" * n, st.sampled_from(sizes)))
        return st.one_of(*options)

    def scalar(self, fd: FieldDescriptor, small: bool) -> st.SearchStrategy[Any]:
        kind = fd.type
        if kind in _INT_RANGES:
            return self.integers(kind)
        if kind == FieldDescriptor.TYPE_FLOAT:
            return self.floats(double=False)
        if kind == FieldDescriptor.TYPE_DOUBLE:
            return self.floats(double=True)
        if kind == FieldDescriptor.TYPE_BOOL:
            return st.booleans()
        if kind == FieldDescriptor.TYPE_STRING:
            return self.strings(small)
        if kind == FieldDescriptor.TYPE_BYTES:
            return self.blobs(small)
        if kind == FieldDescriptor.TYPE_ENUM:
            numbers = [v.number for v in fd.enum_type.values]
            return st.one_of(
                st.sampled_from(numbers), st.integers(-(2**31), 2**31 - 1), st.sampled_from([max(numbers) + 1, -1])
            )
        raise AssertionError(f"unhandled field type {kind} of {fd.full_name}")

    # --- fields and messages ---------------------------------------------------------------------

    def _single(self, fd: FieldDescriptor, depth: int, small: bool) -> st.SearchStrategy[Any] | None:
        """One value of ``fd`` (one element, if repeated); None where the depth bound leaves it unset."""
        if fd.type in (FieldDescriptor.TYPE_MESSAGE, FieldDescriptor.TYPE_GROUP):
            if depth + 1 > self.max_depth:
                return None
            return self.messages(fd.message_type, depth + 1, small)
        generic = self.scalar(fd, small)
        valid = self.hints.fields.get(fd.name)
        if not valid:
            return generic
        return st.one_of(st.sampled_from(list(valid)), generic)

    def value(self, fd: FieldDescriptor, depth: int, small: bool = False) -> st.SearchStrategy[Any]:
        """A value for the field, or ABSENT."""
        if fd.message_type is not None and fd.message_type.GetOptions().map_entry:
            raise AssertionError(f"map fields are not supported yet: {fd.full_name}")
        if not is_repeated(fd):
            single = self._single(fd, depth, small)
            if single is None:
                return st.just(ABSENT)
            if fd.name in self.hints.fields:
                return st.one_of(single, single, st.just(ABSENT))
            return st.one_of(st.just(ABSENT), single)
        element = self._single(fd, depth, small=True)
        if element is None:
            return st.just(ABSENT)
        options = [st.lists(element, max_size=1 if small else 4)]
        limit = self.hints.limits.get(fd.name)
        if limit is not None and not small:
            # At the limit and just past it: a few drawn elements, repeated.
            options.append(
                st.builds(
                    lambda seed, n: (seed * n)[:n],
                    st.lists(element, min_size=1, max_size=3),
                    st.sampled_from([limit, limit + 1]),
                )
            )
        return st.one_of(st.just(ABSENT), *options)

    def messages(self, descriptor: Descriptor, depth: int = 0, small: bool = False) -> st.SearchStrategy[Message]:
        """The generic strategy, mixed with the type's near-valid ones and its override."""
        override = self.hints.overrides.get(descriptor.full_name)
        if override is None:
            return self.unsigned(descriptor, depth, small)
        key = (f"{descriptor.full_name}+override", depth, small)
        if key not in self._cache:
            # Twice as often as the rest: what is signed right reaches furthest.
            unsigned, signed = self.unsigned(descriptor, depth, small), st.deferred(lambda: override(self, depth))
            self._cache[key] = st.sampled_from([False, True, True]).flatmap(lambda sign: signed if sign else unsigned)
        return self._cache[key]

    def unsigned(self, descriptor: Descriptor, depth: int = 0, small: bool = False) -> st.SearchStrategy[Message]:
        """Generic messages, and valid examples with one or two fields replaced by generic ones
        (without the type's override: what an override signs)."""
        generic = self.generic(descriptor, depth, small)
        examples = self.hints.valid.get(descriptor.full_name)
        if not examples:
            return generic
        names = [f.name for f in descriptor.fields]

        def replace(example: Message, hostile: Message, chosen: list[str]) -> Message:
            message = type(example)()
            message.CopyFrom(example)
            for name in chosen:
                fd = descriptor.fields_by_name[name]
                message.ClearField(name)
                if is_repeated(fd):
                    getattr(message, name).extend(getattr(hostile, name))
                elif fd.message_type is not None:
                    if hostile.HasField(name):
                        getattr(message, name).CopyFrom(getattr(hostile, name))
                elif not fd.has_presence or hostile.HasField(name):
                    setattr(message, name, getattr(hostile, name))
            return message

        near = st.builds(
            replace, st.sampled_from(list(examples)), generic, st.lists(st.sampled_from(names), min_size=1, max_size=2)
        )
        return st.sampled_from([False, True, True]).flatmap(lambda valid: near if valid else generic)

    def generic(self, descriptor: Descriptor, depth: int = 0, small: bool = False) -> st.SearchStrategy[Message]:
        """Every field drawn as described above, without the type's override."""
        key = (descriptor.full_name, depth, small)
        if key not in self._cache:
            # Deferred: recursive types (a verdict's votes are verdicts) refer to themselves.
            self._cache[key] = st.deferred(lambda: self._build(descriptor, depth, small))
        return self._cache[key]

    def _build(self, descriptor: Descriptor, depth: int, small: bool) -> st.SearchStrategy[Message]:
        cls = message_factory.GetMessageClass(descriptor)
        oneofs = real_oneofs(descriptor)
        in_oneof = {f.name for o in oneofs for f in o.fields}
        plain = {f.name: self.value(f, depth, small) for f in descriptor.fields if f.name not in in_oneof}

        def choose(oneof: OneofDescriptor) -> st.SearchStrategy[tuple[str, Any] | None]:
            members = [
                st.tuples(st.just(f.name), single)
                for f in oneof.fields
                if (single := self._single(f, depth, small)) is not None
            ]
            return st.one_of(st.none(), *members)

        def assemble(values: dict[str, Any], chosen: list[tuple[str, Any] | None]) -> Message:
            message = cls()
            for name, value in [*values.items(), *(c for c in chosen if c is not None)]:
                if value is ABSENT:
                    continue
                fd = descriptor.fields_by_name[name]
                target = getattr(message, name) if is_repeated(fd) or fd.message_type is not None else None
                if is_repeated(fd):
                    target.extend(value)
                elif fd.message_type is not None:
                    target.CopyFrom(value)
                else:
                    setattr(message, name, value)
            return message

        return st.builds(assemble, st.fixed_dictionaries(plain), st.tuples(*(choose(o) for o in oneofs)).map(list))
