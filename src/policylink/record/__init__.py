"""Session recording (``--record DIR``) and export to LeRobot datasets."""

from .export import ExportSummary, SessionError, VideoUnavailable, export_lerobot, read_session, video_decoder
from .session import RecorderStats, SessionRecorder, frame_path

__all__ = [
    "SessionRecorder",
    "RecorderStats",
    "frame_path",
    "export_lerobot",
    "read_session",
    "video_decoder",
    "ExportSummary",
    "SessionError",
    "VideoUnavailable",
]
