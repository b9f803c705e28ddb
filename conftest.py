"""What every test module shares: the kernel build and the drawn faces go to a temporary cache, and
the system temp folder is left as the suite found it."""

import tempfile
from pathlib import Path

import pytest


@pytest.fixture(autouse=True, scope="session")
def private_cache(tmp_path_factory):
    """FACERWKV_CACHE points into pytest's temporary folder, not ~/.cache; after the suite, the
    facerwkv-* entries of the system temp folder (the cache's fallback) are those it had before."""
    before = sorted(Path(tempfile.gettempdir()).glob("facerwkv-*"))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FACERWKV_CACHE", str(tmp_path_factory.mktemp("cache")))
        yield
    changed = sorted(set(before) ^ set(Path(tempfile.gettempdir()).glob("facerwkv-*")))
    assert not changed, f"the suite changed {len(changed)} facerwkv-* entries of {tempfile.gettempdir()}: {changed[:3]}"
