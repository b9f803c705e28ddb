"""What every test module shares: the kernel build and the drawn faces go to a temporary cache."""

import pytest


@pytest.fixture(autouse=True, scope="session")
def private_cache(tmp_path_factory):
    """FACERWKV_CACHE points into pytest's temporary folder, not ~/.cache."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FACERWKV_CACHE", str(tmp_path_factory.mktemp("cache")))
        yield
