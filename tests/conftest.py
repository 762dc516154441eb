import pytest
import torch


@pytest.fixture(autouse=True)
def _seed_and_dtype():
    """Every test starts from the same seed and the float32 default dtype, and leaves them so."""
    torch.manual_seed(0)
    default_dtype = torch.get_default_dtype()
    yield
    torch.set_default_dtype(default_dtype)


@pytest.fixture
def cache_only(monkeypatch):
    """Fail the test if the hub is asked for anything the local cache should have answered."""
    import bloom.hub

    real_snapshot_download = bloom.hub.snapshot_download

    def snapshot_download(*args, **kwargs):
        assert kwargs.get("local_files_only"), "the cached snapshot should have been enough"
        return real_snapshot_download(*args, **kwargs)

    monkeypatch.setattr(bloom.hub, "snapshot_download", snapshot_download)
