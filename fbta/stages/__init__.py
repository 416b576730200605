"""One module per pipeline stage; each exposes ``run(cfg) -> exit code``.

The CLI (``fbta <stage>``), ``dvc.yaml`` and the Prefect flows all call these.
"""
