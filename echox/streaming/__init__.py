"""Streaming inference: the trigger, the three stages of a turn, and the in-process responder.

Only the trigger is re-exported here: the stages import the models, which import this package.
"""

from echox.streaming.segmenter import CosinePeakSegmenter, Segment, SegmenterConfig, cosine_scores, segment_offline

__all__ = ["CosinePeakSegmenter", "Segment", "SegmenterConfig", "cosine_scores", "segment_offline"]
