"""Local copies of TFDS datasets kept in a bucket (`gs://`, `s3://`, any fsspec URL).

TFDS's array_record reader opens its shards with C++ file I/O, which cannot read
`gs://` (google/array_record#120; tensorflow/datasets#10981), so `open_tfds_source`
reads a remote `data_dir` from a local copy made here:

    gs://BUCKET/tfds/NAME/VERSION/*  ->  CACHE/gs/BUCKET/tfds/NAME/VERSION/*

CACHE is `data.cache_dir`, else `$CODEC_JAX_DATA_CACHE`, else
`~/.cache/codec_jax/tfds` (`$XDG_CACHE_HOME` is honoured); the remote path is mirrored
below it, so two buckets never share a copy. It costs local disk equal to the dataset.

* The whole version directory is copied (every split and the metadata): each process
  reads records `process_index::process_count` of a split, which lie in every shard.
* Files are copied through etils.epath (gcsfs for `gs://`), each to a `.part` file that
  is renamed when complete, inside a hidden `.VERSION.partial-*` directory that is
  renamed to `VERSION` only when every file is there: an interrupted copy never looks
  like a dataset. The next start moves the finished files of an interrupted copy over
  and downloads only the rest.
* `VERSION/.codec_jax_staged.json` records the remote listing (size and mtime of every
  file) the copy was made from. A copy is reused, without downloading anything, when
  that listing equals the remote one and every local file has its size; otherwise it
  is replaced (files that still match are kept, by hard link).
* Processes on one host share the copy: staging holds a lock file (`fcntl.flock`), so
  the second process waits and then reuses the first one's copy.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import errno
import json
import logging
import os
import re
import shutil
import tempfile
import threading

from etils import epath

log = logging.getLogger(__name__)

CACHE_ENV = "CODEC_JAX_DATA_CACHE"
MANIFEST = ".codec_jax_staged.json"
_PROGRESS_MIN_BYTES = 64 << 20   # show a progress bar for copies at least this large
_CHUNK = 8 << 20
_COPY_THREADS = 8
_VERSION_RE = re.compile(r"^(\d+)\.(\d+)\.(\d+)$")


def default_cache_dir() -> str:
    """`$CODEC_JAX_DATA_CACHE`, else `$XDG_CACHE_HOME/codec_jax/tfds` (`~/.cache/...`)."""
    if os.environ.get(CACHE_ENV):
        return os.environ[CACHE_ENV]
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "codec_jax", "tfds")


def local_mirror(remote: str | os.PathLike, cache_dir: str | None = None) -> str:
    """The local directory that mirrors `remote`: `gs://b/tfds` -> `CACHE/gs/b/tfds`."""
    cache_dir = cache_dir or default_cache_dir()
    if "://" in os.fspath(cache_dir):
        raise ValueError(f"data.cache_dir must be a local directory, got {cache_dir}")
    scheme, _, rest = os.fspath(remote).partition("://")
    parts = [p for p in rest.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise ValueError(f"remote data_dir {remote} must not contain '..'")
    root = os.path.abspath(os.path.expanduser(os.fspath(cache_dir)))
    return os.path.join(root, scheme or "remote", *parts)


def latest_version(names) -> str | None:
    """The highest `MAJOR.MINOR.PATCH` among `names` (what TFDS loads by default)."""
    valid = [n for n in names if _VERSION_RE.match(n)]
    return max(valid, key=lambda n: tuple(int(x) for x in n.split("."))) if valid else None


def _remote_listing(version_dir: epath.Path) -> dict[str, list[int]]:
    """{relative path: [size, mtime]} of every file below `version_dir`."""
    files: dict[str, list[int]] = {}

    def visit(d: epath.Path, prefix: str) -> None:
        for p in d.iterdir():  # one listing per directory; gcsfs answers stat from it
            if p.is_dir():
                visit(p, f"{prefix}{p.name}/")
            elif p.name != MANIFEST:
                st = p.stat()
                files[prefix + p.name] = [int(st.length or 0), int(st.mtime or 0)]

    visit(version_dir, "")
    return files


def _read_manifest(local_dir: str) -> dict:
    try:
        with open(os.path.join(local_dir, MANIFEST)) as f:
            return json.load(f).get("files", {})
    except (OSError, ValueError, AttributeError):
        return {}


def _matching(local_dir: str, listing: dict) -> set[str]:
    """Files of `local_dir` that are copies of the remote ones: recorded from the same
    remote file (size, mtime) and of the right size."""
    recorded = _read_manifest(local_dir)
    out = set()
    for rel, entry in listing.items():
        if recorded.get(rel) != entry:
            continue
        try:
            if os.path.getsize(os.path.join(local_dir, rel)) == entry[0]:
                out.add(rel)
        except OSError:  # not there (yet): to be copied
            continue
    return out


@contextlib.contextmanager
def _lock(path: str):
    try:
        import fcntl
    except ImportError:  # not POSIX: no lock (one process per host)
        yield
        return
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _copy_file(src: epath.Path, dst: str, progress, stop: threading.Event) -> None:
    """Copies one remote file to `dst` through a `.part` file renamed when complete."""
    os.makedirs(os.path.dirname(dst), exist_ok=True)
    part = dst + ".part"
    with src.open("rb") as fin, open(part, "wb") as fout:
        while not stop.is_set():
            chunk = fin.read(_CHUNK)
            if not chunk:
                break
            fout.write(chunk)
            progress.update(len(chunk))
    if stop.is_set():
        raise InterruptedError(f"copy of {src} stopped")
    os.replace(part, dst)


def _mb(n: int) -> str:
    return f"{n / 1e6:.1f} MB"


def stage_version_dir(remote: epath.Path, local: str) -> str:
    """Makes `local` a complete copy of the remote directory `remote`; returns `local`.

    Raises:
      OSError (ENOSPC): the files to copy do not fit in the free space of `local`'s disk.
    """
    listing = _remote_listing(remote)
    if len(_matching(local, listing)) == len(listing):
        log.info("TFDS data %s: using the local copy in %s", remote, local)
        return local
    parent, version = os.path.split(local)
    os.makedirs(parent, exist_ok=True)
    with _lock(os.path.join(parent, f".{version}.lock")):
        if len(_matching(local, listing)) == len(listing):  # another process made it
            log.info("TFDS data %s: using the local copy in %s", remote, local)
            return local
        # Under the lock, the hidden siblings are left over from interrupted copies
        # (.partial-*) or swaps (.stale-*): their complete files are reused.
        leftovers = [os.path.join(parent, d) for d in sorted(os.listdir(parent))
                     if d.startswith(f".{version}.") and os.path.isdir(os.path.join(parent, d))]
        reuse: dict[str, str] = {}
        for d in [local] + leftovers:
            for rel in _matching(d, listing) - reuse.keys():
                reuse[rel] = os.path.join(d, rel)
        todo = sorted(rel for rel in listing if rel not in reuse)
        need = sum(listing[rel][0] for rel in todo)
        free = shutil.disk_usage(parent).free
        if need > free:
            raise OSError(
                errno.ENOSPC,
                f"not enough local disk to stage {remote}: it needs {need} bytes ({_mb(need)}), "
                f"{free} bytes ({_mb(free)}) are free in {parent}; set data.cache_dir (or "
                f"${CACHE_ENV}) to a larger disk, or mount the bucket with Cloud Storage FUSE "
                "and use the mount as data_dir")
        log.info("TFDS data %s: copying %d files (%s) to %s%s", remote, len(todo), _mb(need),
                 local, f" ({len(reuse)} files already there)" if reuse else "")
        tmp = tempfile.mkdtemp(prefix=f".{version}.partial-", dir=parent)
        with open(os.path.join(tmp, MANIFEST), "w") as f:  # the listing this copy is of
            json.dump({"remote": str(remote), "files": listing}, f)
        for rel, path in reuse.items():
            dst = os.path.join(tmp, rel)
            os.makedirs(os.path.dirname(dst), exist_ok=True)
            if path.startswith(local + os.sep):
                try:  # the current copy stays whole until it is swapped out
                    os.link(path, dst)
                except OSError:
                    shutil.copy2(path, dst)
            else:
                os.replace(path, dst)
        _copy_all(remote, tmp, todo, need)
        missing = set(listing) - _matching(tmp, listing)
        if missing:
            raise OSError(f"staging {remote} to {local}: {sorted(missing)} did not copy completely")
        os.chmod(tmp, 0o755)  # mkdtemp's 0o700 would hide the copy from other users
        stale = None
        if os.path.lexists(local):
            stale = os.path.join(parent, f".{version}.stale-{os.path.basename(tmp).rsplit('-', 1)[-1]}")
            os.rename(local, stale)
        os.rename(tmp, local)
        for d in leftovers + ([stale] if stale else []):
            shutil.rmtree(d, ignore_errors=True)
    return local


def _copy_all(remote: epath.Path, tmp: str, todo: list[str], total: int) -> None:
    from tqdm.auto import tqdm

    stop = threading.Event()
    with tqdm(total=total, unit="B", unit_scale=True, desc=f"copying {remote.parent.name}/{remote.name}",
              disable=total < _PROGRESS_MIN_BYTES) as bar:
        pool = concurrent.futures.ThreadPoolExecutor(max_workers=max(min(_COPY_THREADS, len(todo)), 1))
        try:
            futures = [pool.submit(_copy_file, remote / rel, os.path.join(tmp, rel), bar, stop)
                       for rel in todo]
            for fut in concurrent.futures.as_completed(futures):
                fut.result()
        except BaseException:
            stop.set()  # the other copies stop at their next chunk
            raise
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
