"""Local and cloud paths: every file the training run reads or writes goes through here.

`as_path("gs://bucket/run")` is an `etils.epath.Path` that reads and writes the bucket
(through gcsfs, or `tf.io.gfile` when TensorFlow is installed); `as_path("~/run")` is the
absolute local directory. orbax, TFDS and JAX's compilation cache accept the same paths,
so a workdir, a data dir or a cache dir can be local or remote without any `if`.

`os.path.abspath` must never see a URL: it turns `gs://bucket/run` into
`$PWD/gs:/bucket/run`, a local directory that is lost with the VM.
"""

from __future__ import annotations

import os

from etils import epath


def is_remote(path: str | os.PathLike) -> bool:
    """True for URLs such as `gs://bucket/x`, `s3://...`, `memory://...`."""
    return "://" in os.fspath(path)


def as_path(path: str | os.PathLike) -> epath.Path:
    """`path` as an `epath.Path`: URLs kept as they are, local paths `~`-expanded and
    made absolute (relative to the current directory, which may change later)."""
    if isinstance(path, epath.Path) and is_remote(path):
        return path
    text = os.fspath(path)
    if is_remote(text):
        return epath.Path(text)
    return epath.Path(os.path.abspath(os.path.expanduser(text)))
