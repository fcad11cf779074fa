"""The page tests' tiny libraries; they live in `library_store.testing` (re-exported here for old imports).

Usage::

    from library_store.testing import make_tiny_library
    path = make_tiny_library(tmp_path / "lib", n_experts=5)
"""
from library_store.testing import TASKS, TINY, make_tiny_library, make_tiny_mbc_library, random_expert

__all__ = ["TASKS", "TINY", "make_tiny_library", "make_tiny_mbc_library", "random_expert"]
