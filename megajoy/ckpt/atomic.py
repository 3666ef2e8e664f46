"""Directories that appear complete or not at all: write under a temporary name, fsync, rename."""

import contextlib
import os
import shutil
import uuid


def fsync_tree(path: str) -> None:
    for root, _, files in os.walk(path):
        for name in files:
            fd = os.open(os.path.join(root, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(root)


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_directory(final_path: str):
    """Yield a temporary sibling directory; on success it replaces `final_path` in one rename.

    An exception (or a kill) leaves `final_path` as it was; the temporary directory is removed on
    exceptions and, after a kill, is recognisable by its `.tmp-` infix.
    """
    final_path = os.path.abspath(final_path)
    os.makedirs(os.path.dirname(final_path), exist_ok=True)
    tmp = temporary_sibling(final_path)
    os.makedirs(tmp)
    try:
        yield tmp
        replace_directory(tmp, final_path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def temporary_sibling(final_path: str) -> str:
    return f"{os.path.abspath(final_path)}.tmp-{uuid.uuid4().hex[:8]}"


def replace_directory(tmp: str, final_path: str) -> None:
    """fsync `tmp`, then make it `final_path` in one rename (moving an existing one aside first)."""
    fsync_tree(tmp)
    if os.path.lexists(final_path):
        old = f"{final_path}.old-{uuid.uuid4().hex[:8]}"
        os.rename(final_path, old)
        os.rename(tmp, final_path)
        if os.path.islink(old):  # the link is replaced; what it pointed to stays
            os.unlink(old)
        else:
            shutil.rmtree(old)
    else:
        os.rename(tmp, final_path)
    _fsync_dir(os.path.dirname(os.path.abspath(final_path)))
