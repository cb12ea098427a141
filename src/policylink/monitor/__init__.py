"""The live monitor web page (``--monitor``): a loop listener with a small web server."""

from .server import DEFAULT_PORT, TOKEN_HEADER, Monitor
from .state import MAX_CAMERA_NAME, MonitorState, camera_name_problem

__all__ = ["Monitor", "MonitorState", "DEFAULT_PORT", "TOKEN_HEADER", "MAX_CAMERA_NAME", "camera_name_problem"]
