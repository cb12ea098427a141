"""The robot-side client: numpy + msgpack + websockets, no torch."""

from .policy_client import ActionChunk, PolicyClient

__all__ = ["PolicyClient", "ActionChunk"]
