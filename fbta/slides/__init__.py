"""Slide I/O: one interface over OpenSlide formats and plain TIFF/PNG/JPEG."""
from fbta.slides.reader import Slide, SlideError, open_slide, SLIDE_EXTENSIONS

__all__ = ["Slide", "SlideError", "open_slide", "SLIDE_EXTENSIONS"]
