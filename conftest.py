"""What every test module shares: the kernel build and the drawn faces go to a temporary cache, the
system temp folder is left as the suite found it, and one POSTER V2 at 224 is built once."""

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


@pytest.fixture(scope="session")
def poster_v2():
    """POSTER V2 at 224 (43.6 M parameters), every tensor at order one (test_facerwkv.order_one_), in eval
    mode: the source of the 224 shapes, the checkpoint files and the predictions both test files check."""
    import torch
    from poster import PosterConfig, PosterRWKV
    from test_facerwkv import order_one_
    torch.manual_seed(1)
    return order_one_(PosterRWKV(PosterConfig.preset("poster-v2")), seed=1).eval()
