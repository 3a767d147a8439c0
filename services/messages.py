"""Dataclasses ⇄ protobuf messages, field by field by name, so that no hop copies fields by hand.

`from_message(cls, msg)` builds a dataclass from the message's fields of the same names (an unset
optional field takes the dataclass's default, a repeated one becomes a tuple); `to_message(obj,
cls)` fills every field of a message from the attributes of the same names (None leaves an
optional field unset). Both take `**given` for the fields whose wire form differs (packed bytes,
values computed at the hop). A field that one side lacks is a TypeError, never a silent zero.
"""
from __future__ import annotations

import dataclasses
from typing import Any, TypeVar

from google.protobuf.message import Message

T = TypeVar("T")
M = TypeVar("M", bound=Message)


def from_message(cls: type[T], msg: Message, **given: Any) -> T:
    """A `cls` dataclass from `msg`'s fields of the same names; `given` supplies or overrides some."""
    by_name = msg.DESCRIPTOR.fields_by_name
    values = dict(given)
    for f in dataclasses.fields(cls):  # type: ignore[arg-type]
        if not f.init or f.name in given:
            continue
        fd = by_name.get(f.name)
        if fd is None:
            raise TypeError(f"{msg.DESCRIPTOR.full_name} has no field {f.name!r} for {cls.__name__}")
        if fd.is_repeated:
            values[f.name] = tuple(getattr(msg, f.name))
        elif not fd.has_presence or msg.HasField(f.name):
            values[f.name] = getattr(msg, f.name)
        # else: unset optional field, so the dataclass's default
    return cls(**values)


def to_message(obj: object, cls: type[M], **given: Any) -> M:
    """A `cls` message whose every field comes from `given` or from `obj`'s attribute of that name."""
    msg = cls()
    for fd in cls.DESCRIPTOR.fields:
        name = fd.name
        if name in given:
            value = given[name]
        elif hasattr(obj, name):
            value = getattr(obj, name)
        else:
            raise TypeError(f"{type(obj).__name__} has no {name!r} for {cls.DESCRIPTOR.full_name}")
        if value is None:
            if not fd.has_presence:
                raise TypeError(f"{cls.DESCRIPTOR.full_name}.{name} cannot be unset")
            continue
        if fd.is_repeated:
            getattr(msg, name).extend(value)
        elif fd.message_type is not None:
            getattr(msg, name).CopyFrom(value)
        else:
            setattr(msg, name, value)
    return msg
