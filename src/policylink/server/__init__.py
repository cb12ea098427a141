"""The policy server: one engine, several wire protocols."""

from .engine import ClientSession, Engine, ServedModel
from .websocket import WebSocketServer

__all__ = ["Engine", "ServedModel", "ClientSession", "WebSocketServer"]
