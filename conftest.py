"""What every test module shares: the kernel build and the drawn faces go to a temporary cache, the
system temp folder is left as the suite found it, and one POSTER V2 at 224 is built and saved once."""

import tempfile
from pathlib import Path

import pytest


@pytest.fixture(autouse=True, scope="package")
def private_cache(tmp_path_factory):
    """FACERWKV_CACHE points into pytest's temporary folder, not ~/.cache; after the suite, the
    facerwkv-* entries of the system temp folder (the cache's fallback) are those it had before."""
    before = sorted(Path(tempfile.gettempdir()).glob("facerwkv-*"))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FACERWKV_CACHE", str(tmp_path_factory.mktemp("cache")))
        yield
    changed = sorted(set(before) ^ set(Path(tempfile.gettempdir()).glob("facerwkv-*")))
    assert not changed, f"the suite changed {len(changed)} facerwkv-* entries of {tempfile.gettempdir()}: {changed[:3]}"


@pytest.fixture(scope="package")
def poster_v2():
    """POSTER V2 at 224 (43.6 M parameters), every tensor at order one (test_facerwkv.order_one_), in eval
    mode: the source of the 224 shapes, the checkpoint files and the predictions both test files check."""
    import torch
    from poster import PosterConfig, PosterRWKV
    from test_facerwkv import order_one_
    torch.manual_seed(1)
    return order_one_(PosterRWKV(PosterConfig.preset("poster-v2")), seed=1).eval()


@pytest.fixture(scope="package")
def posterv2_7(poster_v2, tmp_path_factory):
    """poster_v2 saved as POSTER V2's main.py saves its RAF-DB checkpoint (test_facerwkv.write_posterv2_checkpoint):
    (source, path); the file both test files read."""
    from test_facerwkv import write_posterv2_checkpoint
    folder = tmp_path_factory.mktemp("posterv2")
    with pytest.MonkeyPatch.context() as mp:
        write_posterv2_checkpoint(folder / "posterv2-7.pth", folder, poster_v2.state_dict(), mp)
    return poster_v2, folder / "posterv2-7.pth"
