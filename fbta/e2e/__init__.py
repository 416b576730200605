"""FBTA: end-to-end MIL on gigapixel slides on one GPU (METHODS.md A).

Where things are:
- ``pseudobags.py`` — per-epoch KMeans-stratified subsets, read ahead in workers;
- ``fbta/features/augment.py`` (not here: the extractor's package) — the end-to-end view's augmentation;
- ``translator.py`` — the K-head residual translator f_T;
- ``step.py`` — **the FBTA step**: three views, three losses, one backward;
- ``trainer.py`` — epochs, EMA teachers, validation on the deployed path;
- ``diagnostics.py`` — per-epoch gap_ratio / tfe_drift on validation patches, tumour share of pseudo-bags;
- ``states.py`` — the model-folder files beside best.pt: the translator and TFE* (``extractor.pt``);
- ``timing.py`` — where a step's time goes (extractor, translator, MIL);
- ``fbta/stages/fbta_setup.py`` (the stage door, not here) — params.yaml → models, data and options;
- ``classifier.py`` — the deployable (translator →) MIL classifier;
- ``reextract.py`` — the expensive comparison: re-encode every patch with TFE*.
"""
