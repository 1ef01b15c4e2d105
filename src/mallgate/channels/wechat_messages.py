"""Official Account pushes as typed objects, from one declarative registry; and the passive replies.

Each message or event class names its WeChat type in ``@registered(...)`` and its fields as
``xml(tag)`` declarations; `parse` reads any push through that one table. A type the registry
does not know becomes a `GenericMessage` / `GenericEvent` (every field kept in ``fields``),
never an error: WeChat adds types without notice.

XML is read by defusedxml with DTDs and entities forbidden: a DOCTYPE is `ForbiddenXml`
(the route refuses it), anything else that does not parse or lacks a common field is
`MalformedPush` (the route answers ``success`` and logs it, so WeChat does not retry).
"""

from __future__ import annotations

import dataclasses
import re
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Final, TypeVar
from xml.etree.ElementTree import Element, ParseError

import defusedxml
import defusedxml.ElementTree as SafeET

MAX_EVENT_ARTICLES: Final = 8
MAX_MESSAGE_ARTICLES: Final = 1


class ForbiddenXml(ValueError):
    """XML with a DOCTYPE or entities: refused before anything is expanded."""


class MalformedPush(ValueError):
    """XML that does not parse, a root other than <xml>, or a common field missing or wrong."""


# ---------------------------------------------------------------------------------------------
# XML


def read_xml(body: bytes | str) -> dict[str, str]:
    """The fields of ``<xml>...</xml>``: each child's text; a nested one as ``Parent/Child``.

    Repeated names are refused: WeChat never repeats a field, and reading one copy while
    another was meant is how two parsers come to disagree about a message.
    """
    try:
        root = SafeET.fromstring(body, forbid_dtd=True, forbid_entities=True, forbid_external=True)
    except defusedxml.DefusedXmlException as exc:
        raise ForbiddenXml(type(exc).__name__) from None
    except (ParseError, ValueError) as exc:
        raise MalformedPush(f"not XML: {type(exc).__name__}") from None
    if root.tag != "xml":
        raise MalformedPush("the root element is not <xml>")
    fields: dict[str, str] = {}
    for name, text in _flatten(root, ""):
        if name in fields:
            raise MalformedPush(f"repeated element <{name}>")
        fields[name] = text
    return fields


def _flatten(element: Element, prefix: str) -> Iterator[tuple[str, str]]:
    for child in element:
        name = prefix + child.tag
        if len(child):
            yield from _flatten(child, name + "/")
            continue
        value = child.text or ""
        yield name, value.strip() if child.tag in _TRIMMED else value


# Numbers and type names may come with whitespace around them; free text (Content) never trimmed.
_TRIMMED: Final = frozenset(
    {"CreateTime", "MsgType", "Event", "MsgId", "MsgID", "ToUserName", "FromUserName"}
)
_XML_NAME: Final = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def _cdata(value: str) -> str:
    # "]]>" cannot appear inside one CDATA section: it is split across two.
    return "<![CDATA[" + value.replace("]]>", "]]]]><![CDATA[>") + "]]>"


def to_xml(fields: Mapping[str, str | int | Mapping[str, Any] | Sequence[Any]], *, root: str = "xml") -> str:
    """``<xml>`` of `fields`: text in CDATA, ints bare, mappings nested, lists as repeated <item>."""
    return f"<{root}>{_elements(fields)}</{root}>"


def _elements(fields: Mapping[str, Any]) -> str:
    parts: list[str] = []
    for key, value in fields.items():
        if not _XML_NAME.fullmatch(key):
            raise ValueError(f"not an XML element name: {key!r}")
        if isinstance(value, bool):
            raise TypeError(key)
        if isinstance(value, int):
            inner = str(value)
        elif isinstance(value, Mapping):
            inner = _elements(value)
        elif isinstance(value, list | tuple):
            inner = "".join(f"<item>{_elements(item)}</item>" for item in value)
        else:
            inner = _cdata(str(value))
        parts.append(f"<{key}>{inner}</{key}>")
    return "".join(parts)


# ---------------------------------------------------------------------------------------------
# the registry


def _text(value: str) -> str:
    return value


def _integer(value: str) -> int:
    text = value.strip()
    if not text.isascii() or not text.isdigit() or len(text) > 20:
        raise ValueError("not a whole number")
    return int(text)


def _decimal(value: str) -> float:
    number = float(value.strip())
    if number != number or number in (float("inf"), float("-inf")):
        raise ValueError("not a finite number")
    return number


_CONVERT: Final[dict[type, Callable[[str], Any]]] = {str: _text, int: _integer, float: _decimal}


def xml(tag: str, kind: type = str, *, required: bool = True) -> Any:
    """A field read from the element `tag`, converted to `kind`; missing and `required`: malformed."""
    default = "" if kind is str else None
    return dataclasses.field(default=default, metadata={"xml": tag, "kind": kind, "required": required})


PushT = TypeVar("PushT", bound="Push")
REGISTRY: Final[dict[str, type[Push]]] = {}


def registered(key: str) -> Callable[[type[PushT]], type[PushT]]:
    """Enters a class under its MsgType, or ``event:<Event>`` for an event."""

    def enter(cls: type[PushT]) -> type[PushT]:
        if key in REGISTRY:
            raise ValueError(f"{key} is registered twice")
        REGISTRY[key] = cls
        cls.type_key = key
        return cls

    return enter


@dataclass(frozen=True)
class Push:
    """What every push carries; ``fields`` keeps everything WeChat sent, known or not."""

    type_key: ClassVar[str] = ""

    to_user: str = xml("ToUserName")
    from_user: str = xml("FromUserName")
    create_time: int = xml("CreateTime", int)
    msg_type: str = xml("MsgType")
    fields: Mapping[str, str] = dataclasses.field(default_factory=dict, repr=False, compare=False)

    @property
    def is_event(self) -> bool:
        return False

    def dedupe_key(self) -> str:
        """Retries of one push share this: MsgId for messages; for events WeChat's FromUserName +
        CreateTime, with the event and its key so two events of one second stay apart."""
        return "|".join((self.to_user, self.from_user, str(self.create_time), self.msg_type))


@dataclass(frozen=True)
class Message(Push):
    msg_id: int | None = xml("MsgId", int)

    def dedupe_key(self) -> str:
        if self.msg_id is None:
            return super().dedupe_key()
        return f"{self.to_user}|msg|{self.msg_id}"


@dataclass(frozen=True)
class Event(Push):
    event: str = xml("Event")
    event_key: str = xml("EventKey", required=False)

    @property
    def is_event(self) -> bool:
        return True

    def dedupe_key(self) -> str:
        return "|".join((self.to_user, self.from_user, str(self.create_time), self.event, self.event_key))


@registered("text")
@dataclass(frozen=True)
class TextMessage(Message):
    content: str = xml("Content")


@registered("image")
@dataclass(frozen=True)
class ImageMessage(Message):
    pic_url: str = xml("PicUrl")
    media_id: str = xml("MediaId")


@registered("voice")
@dataclass(frozen=True)
class VoiceMessage(Message):
    media_id: str = xml("MediaId")
    format: str = xml("Format")
    recognition: str = xml("Recognition", required=False)


@registered("video")
@dataclass(frozen=True)
class VideoMessage(Message):
    media_id: str = xml("MediaId")
    thumb_media_id: str = xml("ThumbMediaId")


@registered("shortvideo")
@dataclass(frozen=True)
class ShortVideoMessage(Message):
    media_id: str = xml("MediaId")
    thumb_media_id: str = xml("ThumbMediaId")


@registered("location")
@dataclass(frozen=True)
class LocationMessage(Message):
    latitude: float | None = xml("Location_X", float)
    longitude: float | None = xml("Location_Y", float)
    scale: int | None = xml("Scale", int)
    label: str = xml("Label", required=False)


@registered("link")
@dataclass(frozen=True)
class LinkMessage(Message):
    title: str = xml("Title")
    description: str = xml("Description", required=False)
    url: str = xml("Url")


@dataclass(frozen=True)
class GenericMessage(Message):
    """A MsgType the registry does not know; its fields are in ``fields``."""


QR_PREFIX: Final = "qrscene_"


@registered("event:subscribe")
@dataclass(frozen=True)
class SubscribeEvent(Event):
    ticket: str = xml("Ticket", required=False)

    @property
    def scene(self) -> str:
        """The parametric QR's scene of a follow through one, else ""."""
        return self.event_key.removeprefix(QR_PREFIX) if self.event_key.startswith(QR_PREFIX) else ""


@registered("event:unsubscribe")
@dataclass(frozen=True)
class UnsubscribeEvent(Event):
    pass


@registered("event:SCAN")
@dataclass(frozen=True)
class ScanEvent(Event):
    ticket: str = xml("Ticket", required=False)

    @property
    def scene(self) -> str:
        # WeChat sends the scene bare for a follower's scan; a prefixed one is read the same.
        return self.event_key.removeprefix(QR_PREFIX)


@registered("event:LOCATION")
@dataclass(frozen=True)
class LocationEvent(Event):
    latitude: float | None = xml("Latitude", float)
    longitude: float | None = xml("Longitude", float)
    precision: float | None = xml("Precision", float, required=False)


@registered("event:CLICK")
@dataclass(frozen=True)
class ClickEvent(Event):
    event_key: str = xml("EventKey")


@registered("event:VIEW")
@dataclass(frozen=True)
class ViewEvent(Event):
    event_key: str = xml("EventKey")
    menu_id: str = xml("MenuId", required=False)


@registered("event:TEMPLATESENDJOBFINISH")
@dataclass(frozen=True)
class TemplateSendJobFinishEvent(Event):
    msg_id: int | None = xml("MsgID", int)  # sic: MsgID, not MsgId
    status: str = xml("Status")

    def dedupe_key(self) -> str:
        return f"{self.to_user}|tmpl|{self.msg_id}|{self.from_user}"


@dataclass(frozen=True)
class GenericEvent(Event):
    """An event the registry does not know; its fields are in ``fields``."""


def _fields_of(cls: type[Push]) -> Iterator[dataclasses.Field[Any]]:
    return (f for f in dataclasses.fields(cls) if "xml" in f.metadata)


def parse(body: bytes | str) -> Push:
    """The typed push of an XML body (`ForbiddenXml`, `MalformedPush`)."""
    return from_fields(read_xml(body))


def from_fields(fields: Mapping[str, str]) -> Push:
    msg_type = fields.get("MsgType", "").strip()
    if msg_type == "event":
        key = "event:" + fields.get("Event", "").strip()
        cls: type[Push] = REGISTRY.get(key, GenericEvent)
    else:
        cls = REGISTRY.get(msg_type, GenericMessage)
    values: dict[str, Any] = {"fields": dict(fields)}
    for spec in _fields_of(cls):
        tag: str = spec.metadata["xml"]
        raw = fields.get(tag)
        if raw is None or (raw.strip() == "" and spec.metadata["kind"] is not str):
            # A generic push needs only the common fields: what else it has is unknown.
            generic = cls in (GenericMessage, GenericEvent)
            if spec.metadata["required"] and (not generic or tag in _COMMON):
                raise MalformedPush(f"{cls.type_key or msg_type or 'push'}: <{tag}> missing")
            continue
        try:
            values[spec.name] = _CONVERT[spec.metadata["kind"]](raw)
        except ValueError:
            raise MalformedPush(f"<{tag}> is not a {spec.metadata['kind'].__name__}") from None
    return cls(**values)


_COMMON: Final = frozenset({"ToUserName", "FromUserName", "CreateTime", "MsgType"})


# ---------------------------------------------------------------------------------------------
# passive replies


def reply_xml(push: Push, reply_type: str, content: Mapping[str, Any], *, now: float | None = None) -> str:
    """The passive reply to `push`: ids swapped, ``text`` / ``image`` / ``news`` of `content`.

    `content`: ``{"text"}``, ``{"media_id"}`` or ``{"articles": [{title, description, pic_url,
    url}]}``. News to a user's message carries 1 article, to an event up to 8 (WeChat drops more).
    """
    head: dict[str, Any] = {
        "ToUserName": push.from_user,
        "FromUserName": push.to_user,
        "CreateTime": int(time.time() if now is None else now),
        "MsgType": reply_type,
    }
    if reply_type == "text":
        head["Content"] = str(content["text"])
    elif reply_type == "image":
        head["Image"] = {"MediaId": str(content["media_id"])}
    elif reply_type == "news":
        limit = MAX_EVENT_ARTICLES if push.is_event else MAX_MESSAGE_ARTICLES
        articles = list(content["articles"])[:limit]
        head["ArticleCount"] = len(articles)
        head["Articles"] = [
            {
                "Title": str(a.get("title", "")),
                "Description": str(a.get("description", "")),
                "PicUrl": str(a.get("pic_url", "")),
                "Url": str(a.get("url", "")),
            }
            for a in articles
        ]
    else:
        raise ValueError(f"no reply of type {reply_type!r}")
    return to_xml(head)
