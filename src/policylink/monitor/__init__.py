"""The live monitor web page (``--monitor``): a loop listener with a small web server."""

from .server import DEFAULT_PORT, Monitor
from .state import MonitorState

__all__ = ["Monitor", "MonitorState", "DEFAULT_PORT"]
