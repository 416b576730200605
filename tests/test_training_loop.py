"""The one training loop (fbta/training/loop.py) on a toy method: what every trainer inherits from it."""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Optional

import pytest
import torch

from fbta.training.ema import EMA, frozen_copy
from fbta.training.loop import Epoch, LoopOptions, Method, fit_loop
from fbta.training.resume import Resumable


@dataclass
class Err:
    mse: float

    def as_dict(self, prefix: str = "") -> dict[str, float]:
        return {prefix + k: v for k, v in asdict(self).items()}


class LowestError:
    """Lowest validation error wins; stop after ``patience`` epochs without one."""

    def __init__(self, patience: int) -> None:
        self.patience, self.best, self.state, self.since = patience, None, {}, 0

    def judge(self, record: Epoch, snapshot: Callable[[], dict]) -> bool:
        if self.best is None or record.val.mse < self.best.val.mse:
            self.best, self.state, self.since = record, snapshot(), 0
            return True
        self.since += 1
        return False

    @property
    def stop(self) -> bool:
        return self.since >= self.patience

    def chosen(self):  # noqa: ANN201
        return self.best, self.state

    def state_dict(self) -> dict[str, Any]:
        return {"best": self.best.epoch if self.best else -1, "state": self.state, "since": self.since}

    def load_state_dict(self, state: dict[str, Any], history: list[Epoch]) -> None:
        self.best = next((e for e in history if e.epoch == state["best"]), None)
        self.state, self.since = state["state"], state["since"]


class Regression(Method):
    """y = 3x + noise, one mini-batch per step, drawn from the method's own generator."""

    scores_type = Err

    def __init__(self, lr: float = 0.05, poison_at: Optional[int] = None) -> None:
        torch.manual_seed(0)
        self.net = torch.nn.Linear(1, 1)
        self.optimiser = torch.optim.SGD(self.net.parameters(), lr=lr)
        self.gen = torch.Generator().manual_seed(1)
        self.poison_at = poison_at
        self.x_val = torch.linspace(-1, 1, 16)[:, None]

    def parts(self):  # noqa: ANN201
        return {"net": self.net}, {"sgd": self.optimiser}, {"data": self.gen}

    def batches(self, epoch: int) -> Iterable[Any]:
        for _ in range(4):
            x = torch.randn(8, 1, generator=self.gen)
            yield x, 3 * x + 0.1 * torch.randn(8, 1, generator=self.gen)

    def step(self, batch: Any, epoch: int):  # noqa: ANN201
        x, y = batch
        loss = torch.nn.functional.mse_loss(self.net(x), y)
        return (loss * math.nan if epoch == self.poison_at else loss), {}

    def validate(self) -> Err:
        with torch.no_grad():
            return Err(float(torch.nn.functional.mse_loss(self.net(self.x_val), 3 * self.x_val)))

    def snapshot(self) -> dict:
        return {k: v.clone() for k, v in self.net.state_dict().items()}


def test_the_loop_hands_the_hook_the_weights_only_on_a_new_best_and_stops_on_patience():
    seen: list[tuple[int, bool]] = []
    res = fit_loop(Regression(lr=0.5), LoopOptions(40, progress=False), LowestError(patience=2), None, None,
                   lambda ep, state: seen.append((ep.epoch, state is not None)))
    assert res.stopped_early and len(res.history) < 40
    assert [b for _, b in seen] == [e.best for e in res.history]  # state given exactly on the best epochs
    assert res.best.val.mse == min(e.val.mse for e in res.history) < 0.05
    assert {"train_seconds"} <= set(res.history[0].extra) and res.history[0].train_acc is None


def test_a_non_finite_loss_stops_training_naming_the_epoch():
    with pytest.raises(FloatingPointError, match="toy epoch 3: training loss is nan"):
        fit_loop(Regression(poison_at=2), LoopOptions(5, "toy", False, first_epoch=1), LowestError(5))


def test_the_ema_is_updated_by_the_loop_and_its_count_survives_a_resume(tmp_path: Path):
    def run(resume, stop_at=None):  # noqa: ANN001, ANN202
        m = Regression()
        teacher = frozen_copy(m.net)
        ema = EMA([(teacher, m.net)], 0.9, "step", warmup=True)

        def hook(ep, _):  # noqa: ANN001
            if ep.epoch == stop_at:
                raise KeyboardInterrupt
        res = fit_loop(m, LoopOptions(6, progress=False), LowestError(10), ema, resume, hook)
        return res, ema, teacher

    ref, ema_ref, teacher_ref = run(None)
    assert int(ema_ref.n_updates) == 6 * 4 and [e.extra["ema_decay"] for e in ref.history][0] < 0.9
    path = tmp_path / "resume.pt"
    with pytest.raises(KeyboardInterrupt):
        run(Resumable(path, "fp"), stop_at=3)
    again, ema_again, teacher_again = run(Resumable(path, "fp"))
    assert again.resumed_from == 3 and int(ema_again.n_updates) == 24
    assert [e.train_loss for e in again.history] == [e.train_loss for e in ref.history]
    assert all(torch.equal(a, b) for a, b in zip(teacher_again.state_dict().values(), teacher_ref.state_dict().values()))
