import pytest
import torch


@pytest.fixture(autouse=True)
def _seed_and_dtype():
    """Every test starts from the same seed and the float32 default dtype, and leaves them so."""
    torch.manual_seed(0)
    default_dtype = torch.get_default_dtype()
    yield
    torch.set_default_dtype(default_dtype)
