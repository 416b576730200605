"""MLflow model registry (⚑): pyfunc models ``fbta-classifier`` / ``fbta-segmenter`` and ``@champion`` promotion.

- ``pyfunc``: a trained model folder ↔ a servable MLflow model (weights as artefacts, loaded weights_only).
- ``publish``: log a folder as pyfunc in a run and register a version carrying its validation metrics.
- ``promote``: move ``@champion`` only to a better version (old one → ``@previous``), under a file lock.
"""
from __future__ import annotations

from fbta.registry.promote import CHAMPION, PREVIOUS, RULES, beats, decision_line, promote

__all__ = ["CHAMPION", "PREVIOUS", "RULES", "beats", "decision_line", "promote"]
