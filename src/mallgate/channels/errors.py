"""The exceptions every channel raises, so services can tell forgery from outage."""


class ChannelError(Exception):
    """A third party answered something we cannot use (network, error code, bad shape)."""


class NotAuthentic(ChannelError):
    """A message failed verification: bad or missing signature, wrong key, stale timestamp."""
