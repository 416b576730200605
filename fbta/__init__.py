"""fbta: whole-slide images to registered MIL models (FBTA, IKD-MIL) with MLOps around them."""
__version__ = "0.1.0"
