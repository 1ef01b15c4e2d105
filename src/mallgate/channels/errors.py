"""The exceptions every channel raises, so services can tell forgery from outage."""


class ChannelError(Exception):
    """A third party answered something we cannot use (network, error code, bad shape)."""


class NotAuthentic(ChannelError):
    """A message failed verification: bad or missing signature, wrong key, stale timestamp."""


class MalformedNotification(ChannelError, ValueError):
    """The message cannot be read at all: not XML/form, DOCTYPE or entity, repeated keys, bad amount."""


class ForeignNotification(ChannelError):
    """Authentic, but addressed to another app, merchant or seller: never applied to our orders."""
