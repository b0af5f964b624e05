"""The data module's position: a restored (epoch, consumed) state resumes the stream exactly."""
import pytest

from training.data.datamodule import ShardDataModule


def _keys(dm: ShardDataModule) -> list[list[str]]:
    return [batch["key"] for batch in dm.train_dataloader()]


@pytest.mark.parametrize("workers", [0, 2])
def test_restored_position_skips_exactly_the_consumed_batches(truth_shards, workers):
    dm = ShardDataModule(str(truth_shards), batch_size=2, samples_per_epoch=8, num_workers=workers, seed=3)
    full = _keys(dm)
    assert len(full) == 4 and len({k for b in full for k in b}) > 1
    assert _keys(dm) == full                                  # the stream is a function of the seed
    resumed = ShardDataModule(str(truth_shards), batch_size=2, samples_per_epoch=8, num_workers=workers, seed=3)
    resumed.load_state_dict({"epoch": 0, "consumed": 3})
    assert _keys(resumed) == full[3:]
    other_epoch = ShardDataModule(str(truth_shards), batch_size=2, samples_per_epoch=8, num_workers=workers, seed=3)
    other_epoch._epoch = 1                                    # what the trainer's epoch sets
    assert _keys(other_epoch) != full
