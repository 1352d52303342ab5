"""Every file format gcm-tal reads or writes, behind one import.

The internal model is in seconds: :class:`Video` (with its :class:`Instance` list and
``ambiguous`` segments), :class:`Proposals` per video, and :class:`Detections`. Readers raise
:class:`FormatError` naming the file, the video and the line or field at fault.
"""
from gcm_core.data.annotations import (
    add_ambiguous, read_ambiguous, read_annotations, read_avoid_list, read_video_info, write_annotations_json,
)
from gcm_core.data.atomic import atomic_save_npy, atomic_write_text
from gcm_core.data.detections import read_detections, result_json, write_result_json, write_thumos_text
from gcm_core.data.features import align_streams, check_features, load_features, split_streams
from gcm_core.data.model import Detections, FormatError, Instance, Proposals, Video
from gcm_core.data.proposals import (
    ProposalSource, SsnBlock, holds_many_videos, read_proposals, read_ssn_blocks, read_video_proposals,
    write_ssn_list,
)

__all__ = [
    "Detections", "FormatError", "Instance", "ProposalSource", "Proposals", "SsnBlock", "Video", "add_ambiguous",
    "align_streams", "atomic_save_npy", "atomic_write_text", "check_features", "holds_many_videos", "load_features",
    "read_ambiguous", "read_annotations",
    "read_avoid_list", "read_detections", "read_proposals", "read_ssn_blocks", "read_video_info",
    "read_video_proposals", "result_json", "split_streams", "write_annotations_json", "write_result_json",
    "write_ssn_list", "write_thumos_text",
]
