"""The test suite keeps to itself: no writes into the user's ~/.cache/dpokit."""

import os
import tempfile
from pathlib import Path

from dpokit.config.paths import cache_home


def test_the_session_cache_is_a_temporary_folder_not_the_users():
    cache = cache_home().resolve()
    assert Path(os.environ["DPOKIT_CACHE"]).resolve() == cache
    assert cache.is_relative_to(Path(tempfile.gettempdir()).resolve())
    assert not cache.is_relative_to((Path.home() / ".cache").resolve())
