"""Progress of a long data step that a log file can follow: a bar on a terminal, and without one
(a Prefect worker, ``nohup``, CI) a line every ``every_s`` seconds with images/s and the ETA."""

from __future__ import annotations

import sys
import time

from tqdm import tqdm


class Progress:
    def __init__(self, total: int, done: int, what: str, every_s: float = 15.0) -> None:
        self.total, self.done, self.what, self.every_s = total, done, what, every_s
        self._start_done = done
        self._bar = tqdm(total=total, initial=done, desc=what, unit="img", disable=None)
        self._start = self._last = time.monotonic()

    def update(self, n: int) -> None:
        self.done += n
        self._bar.update(n)
        now = time.monotonic()
        if self._bar.disable and (now - self._last >= self.every_s or self.done >= self.total):
            self._last = now
            print(self.line(now), file=sys.stderr, flush=True)  # shown whatever logging is set

    def line(self, now: float | None = None) -> str:
        elapsed = max((now or time.monotonic()) - self._start, 1e-9)
        rate = (self.done - self._start_done) / elapsed
        eta = (self.total - self.done) / rate if rate > 0 else float("inf")
        return (f"{self.what}: {self.done:,}/{self.total:,} ({self.done / max(self.total, 1):.0%}),"
                f" {rate:,.0f} img/s, ETA {eta:,.0f} s")

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self._bar.close()


class EpochLines:
    """One line per epoch (loss, val top-1, img/s, ETA) where no terminal shows the epoch bar:
    a fine-tune in a log file or a Prefect worker's log is otherwise silent for its whole run."""

    def __init__(self, what: str, epochs: int, images_per_epoch: int) -> None:
        self.what, self.epochs, self.images = what, epochs, images_per_epoch
        self.on = not sys.stderr.isatty()
        self._start = time.monotonic()

    def done(self, epoch: int, metrics: dict[str, float]) -> None:
        """After epoch ``epoch`` (0-based); ``metrics`` keyed as logged (``<stage>/<name>``)."""
        if not self.on:
            return
        elapsed = max(time.monotonic() - self._start, 1e-9)
        finished = epoch + 1
        shown = ", ".join(f"{key.split('/')[-1]} {value:.4f}" for key, value in metrics.items()
                          if key.endswith(("train_loss", "val_top1")))
        eta = elapsed / finished * (self.epochs - finished)
        print(f"{self.what} epoch {finished}/{self.epochs}: {shown}, "
              f"{self.images * finished / elapsed:,.0f} img/s, ETA {eta:,.0f} s",
              file=sys.stderr, flush=True)
