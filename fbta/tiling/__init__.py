"""Tissue detection and the patch grid (``fbta tile``)."""
