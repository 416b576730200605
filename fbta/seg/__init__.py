"""IKD-MIL weakly-supervised segmentation (METHODS.md B): patch caches, side-output net, teacher, distillation."""
from fbta.seg.model import Segmenter, SegmenterError, load_segmenter

__all__ = ["Segmenter", "SegmenterError", "load_segmenter"]
