"""Embedded synthetic H&E demo cohort (``fbta synth``).

Slides whose class signal is sparse nuclear morphology (not colour, not tissue
amount), written as Aperio-style pyramidal TIFFs with ground-truth masks, so
the whole pipeline can run and be tested offline.
"""
from fbta.synth.cohort import assign_labels, assign_splits, make_cohort, mask_image, write_aperio_tiff
from fbta.synth.slide import make_slide

__all__ = ["assign_labels", "assign_splits", "make_cohort", "make_slide", "mask_image", "write_aperio_tiff"]
