"""Every file format gcm-tal reads or writes, behind one import.

The internal model is in seconds: :class:`Video` (with its :class:`Instance` list and
``ambiguous`` segments), :class:`Proposals` per video, and :class:`Detections`. Readers raise
:class:`FormatError` naming the file, the video and the line or field at fault.
"""
from gcm_core.data.annotations import read_annotations
from gcm_core.data.detections import (
    atomic_write_text, read_detections, write_result_json, write_thumos_text,
)
from gcm_core.data.model import Detections, FormatError, Instance, Proposals, Video

__all__ = [
    "Detections", "FormatError", "Instance", "Proposals", "Video", "atomic_write_text",
    "read_annotations", "read_detections", "write_result_json", "write_thumos_text",
]
