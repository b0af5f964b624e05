"""Reader skip counting shared by the training tasks (Lightning glue).

Every sample carries its DataLoader worker's running skip count (``reader_worker``,
``reader_skipped``); :class:`~training.data.shards.SkipTally` keeps the latest per worker.
This mixin sums them over workers and epochs (fresh worker processes start over each pass),
keeps the total in the checkpoint, and logs it summed over ranks as ``data/reader_skipped``.
"""
from __future__ import annotations

from training.data.shards import SkipTally


class ReaderSkipsMixin:
    """Mix into a LightningModule; call :meth:`log_reader_skips` from ``training_step``."""

    def _reset_reader_skips(self, before: int = 0) -> None:
        self._skips = SkipTally()          # this pass's per-worker running counts
        self._skip_base = 0                # the reader's count when this pass's workers started
        self._skipped_before = before      # skips of earlier passes (and of a resumed run)

    def on_train_epoch_start(self) -> None:
        """A new pass: a worker process made for it starts from the main process's reader
        count (0, or the running count of an in-process reader); persistent workers go on."""
        if not hasattr(self, "_skips"):
            self._reset_reader_skips()
        loader = self.trainer.train_dataloader
        if getattr(loader, "persistent_workers", False) and self._skips.by_worker:
            return
        self._skipped_before += self._pass_skips()
        self._skips = SkipTally()
        reader = getattr(getattr(loader, "dataset", None), "skipped", None)
        self._skip_base = int(reader.total) if reader is not None else 0

    def _pass_skips(self) -> int:
        return sum(max(0, n - self._skip_base) for n in self._skips.by_worker.values())

    @property
    def reader_skipped(self) -> int:
        """Shards/members this rank's reader skipped so far, all workers and passes."""
        if not hasattr(self, "_skips"):
            self._reset_reader_skips()
        return self._skipped_before + self._pass_skips()

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["reader_skipped"] = self.reader_skipped

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self._reset_reader_skips(int(checkpoint.get("reader_skipped", 0)))

    def log_reader_skips(self, batch: dict, batch_size: int) -> None:
        """Fold the batch's per-worker counts in and log the total (summed over ranks)."""
        if "reader_skipped" not in batch:
            return
        if not hasattr(self, "_skips"):
            self._reset_reader_skips()
        self._skips.update(batch)
        self.log("data/reader_skipped", float(self.reader_skipped), batch_size=batch_size, reduce_fx="sum",
                 sync_dist=True)
