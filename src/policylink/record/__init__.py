"""Session recording (``--record DIR``) and export to LeRobot datasets."""

from .export import ExportSummary, SessionError, export_lerobot, read_session
from .session import RecorderStats, SessionRecorder, frame_path

__all__ = ["SessionRecorder", "RecorderStats", "frame_path", "export_lerobot", "read_session", "ExportSummary", "SessionError"]
