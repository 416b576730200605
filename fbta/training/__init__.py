"""One training loop for every trainer (vanilla MIL, FBTA, the IKD-MIL teacher and student).

``loop`` owns epochs, progress, selection/early stopping, the EMA, resume after a
kill, history and the per-epoch hook; a trainer supplies a :class:`~fbta.training.loop.Method`.
"""
