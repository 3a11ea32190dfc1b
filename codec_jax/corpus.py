"""Corpus jobs: many audio files -> codes (`encode_corpus`), many codes files -> audio
(`decode_corpus`), and the reader of the sharded corpus output (`open_shards`).

The encode pipeline, per process:

    files --(worker processes: decode + mix + resample, soundfile/soxr)--> clips
          --(segmenter: short clips whole, long ones as aligned overlapping windows)-->
          --(one batch per bucket length, across files; padded to the device count)-->
          --(device_put with a batch-axis NamedSharding, jitted encode, async dispatch;
             a bounded queue keeps the next batch in flight while this one runs)-->
          --(frames each segment keeps, assembled per file)--> .snac files or shards

Only `len(plan.lengths)` batch shapes ever reach the jitted function, so the number of
compiled programs is bounded by the bucket count (and reported). Under `jax.distributed`
every process takes a disjoint, deterministic share of the files (`process_share`) and
uses its own local devices; outputs are per file or per process shard, so processes never
write the same file.

Bad files never stop a job: each is named in the report with its reason and the job
carries on. Outputs are written atomically (temporary file + rename), so an interrupted
job leaves finished outputs and nothing partial; rerunning it skips finished outputs.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import functools
import json
import math
import multiprocessing
import os
import signal
import sys
import time
from typing import Any, Callable, Iterator, Optional, Sequence

import numpy as np

from codec_jax.audio import codes_file as cf
from codec_jax.audio import io as audio_io
from codec_jax.errors import UsageError

SHARD_SUFFIX = ".array_record"
INDEX_SUFFIX = ".index.json"
MANIFEST = "manifest.json"


# ---------------------------------------------------------------------------- inputs
@dataclasses.dataclass(frozen=True)
class InputFile:
    """One input: `path` to open, `relpath` its name under the output directory."""

    path: str
    relpath: str


def collect_inputs(inputs: Sequence[str], extensions: Sequence[str]) -> list[InputFile]:
    """Files, directories (recursive, by extension) and `@list.txt` files -> inputs.

    A directory's files are named relative to the directory; a file given directly (or in
    a list) relative to the current directory (the list's directory), or by its absolute
    path without the leading "/" when it lies outside. The same file given twice is kept
    once; two different files with one name are a UsageError before any work.
    """
    found: list[InputFile] = []
    for arg in inputs:
        if arg.startswith("@"):
            list_path = arg[1:]
            try:
                with open(list_path) as f:
                    lines = [ln.strip() for ln in f]
            except OSError as e:
                raise UsageError(f"cannot read file list {list_path}: {e.strerror or e}") from None
            base = os.path.dirname(os.path.abspath(list_path))
            for line in lines:
                if line and not line.startswith("#"):
                    path = line if os.path.isabs(line) else os.path.join(base, line)
                    found.append(InputFile(path, _relname(path, base)))
        elif os.path.isdir(arg):
            for rel in audio_io.find_audio_files(arg, extensions):
                found.append(InputFile(os.path.join(arg, rel), rel))
        elif os.path.lexists(arg):
            found.append(InputFile(arg, _relname(arg, os.getcwd())))
        else:
            raise UsageError(f"{arg}: no such file or directory")
    unique: dict[str, InputFile] = {}
    seen_real: set[str] = set()
    for item in found:
        real = os.path.realpath(item.path)
        if real in seen_real:
            continue
        if item.relpath in unique:
            raise UsageError(f"two inputs map to the output name {item.relpath!r}: "
                             f"{unique[item.relpath].path} and {item.path}")
        seen_real.add(real)
        unique[item.relpath] = item
    return sorted(unique.values(), key=lambda f: f.relpath)


def _relname(path: str, base: str) -> str:
    rel = os.path.relpath(os.path.abspath(path), base)
    if rel.startswith(".."):
        rel = os.path.abspath(path).lstrip(os.sep)
    return os.path.normpath(rel)


def process_share(items: Sequence[Any], process_index: int, process_count: int) -> list[Any]:
    """The disjoint, deterministic part of `items` that process `process_index` works on
    (every `process_count`-th item of the sorted list; the union over processes is all)."""
    return list(items[process_index::process_count])


# ---------------------------------------------------------------------------- plan
@dataclasses.dataclass(frozen=True)
class Segment:
    """A piece of one stream that is coded as one batch item.

    `start`/`length`: samples of the stream it covers (the row's valid length, at most its
    bucket length). Encode: `keep[l]` is the `(first, end)` frames of level l of this
    piece's codes that the stream keeps and `offset[l]` where they go in the stream's codes.
    Decode: `keep[0]` is the `(first, end)` samples of this piece's audio that the stream
    keeps and `offset[0]` where they go.
    """

    start: int
    length: int
    keep: tuple[tuple[int, int], ...]
    offset: tuple[int, ...]


class BucketPlan:
    """The fixed set of padded clip lengths and each one's batch size.

    Lengths halve from the window (`window_seconds` rounded down to the model's alignment
    grid; `n_buckets` of them, multiples of the padding unit); each bucket's batch holds
    the same amount of audio as `batch_size` clips of the longest one, rounded up to a
    multiple of the device count. Streams longer than the window are cut by
    `codec_jax.chunking` into overlapping windows on the stride/attention grid whose kept
    parts equal whole-file coding; those all go to the longest bucket.
    """

    def __init__(self, config, *, window_seconds: float, n_buckets: int, batch_size: int,
                 n_devices: int = 1, kind: str = "encode"):
        from codec_jax import chunking

        if window_seconds <= 0 or n_buckets < 1 or batch_size < 1:
            raise UsageError("--window-seconds, --buckets and --batch-size must be positive")
        self.config, self.kind, self.window_seconds = config, kind, window_seconds
        unit = config.pad_multiple
        try:
            if kind == "encode":
                window = chunking.window_samples(config, window_seconds)
            else:
                window = chunking.window_frames(config, window_seconds) * config.hop_length
        except UsageError as e:
            raise UsageError(f"--window-seconds: {e}") from None
        lengths = sorted({max(unit, math.ceil(window / 2 ** k / unit) * unit)
                          for k in range(n_buckets)})
        self.lengths: list[int] = lengths
        self.window = window
        self.batch_sizes: dict[int, int] = {}
        for length in lengths:
            b = math.ceil(batch_size * window / length)
            self.batch_sizes[length] = math.ceil(b / n_devices) * n_devices

    def bucket(self, length: int) -> int:
        """The smallest bucket length that holds a segment of `length` samples."""
        for b in self.lengths:
            if length <= b:
                return b
        raise ValueError(f"segment of {length} samples exceeds the window {self.window}")

    def segments(self, length: int) -> list[Segment]:
        """How a stream of `length` samples (at the model rate) is cut into batch items."""
        from codec_jax import chunking

        config = self.config
        strides = config.vq_strides
        if self.kind == "encode":
            frames = config.num_frames(length)
            if length <= self.window:
                return [Segment(0, length, tuple((0, f) for f in frames), (0,) * len(frames))]
            return [Segment(w.start, w.length,
                            tuple((w.keep[0] // s, w.keep[1] // s) for s in strides),
                            tuple(w.offset // s for s in strides))
                    for w in chunking.encode_windows(config, length, self.window_seconds)]
        # decode: rows are whole latent frames (the codes' padded length); kept samples
        # are trimmed to the clip's length when stored.
        hop = config.hop_length
        latent = config.padded_length(length) // hop
        if latent * hop <= self.window:
            return [Segment(0, latent * hop, ((0, latent * hop),), (0,))]
        return [Segment(w.start * hop, w.length * hop, (w.keep,), (w.offset,))
                for w in chunking.decode_windows(config, latent, self.window_seconds)]

    def describe(self) -> str:
        sr = self.config.sampling_rate
        return ", ".join(f"{b / sr:.2f} s x {self.batch_sizes[b]}" for b in self.lengths)


# ---------------------------------------------------------------------------- reading
@dataclasses.dataclass
class _Decoded:
    index: int
    audio: Optional[np.ndarray]  # float32 [channels, samples] at the model rate
    original_sample_rate: int = 0
    error: str = ""
    read_seconds: float = 0.0


def _read_one(index: int, path: str, sample_rate: int, mix: bool, quality: str) -> _Decoded:
    t0 = time.perf_counter()
    try:
        d = audio_io.read_audio(path, target_sample_rate=sample_rate, dtype="float32", mix=mix,
                                resample_quality=quality)
    except audio_io.AudioReadError as e:
        return _Decoded(index, None, error=e.reason, read_seconds=time.perf_counter() - t0)
    except MemoryError:
        return _Decoded(index, None, error="too large to decode in memory")
    audio = np.ascontiguousarray(d.pcm.T)
    if not np.all(np.isfinite(audio)):  # resampling finite input stays finite; be sure
        return _Decoded(index, None, error="corrupt (NaN or infinite samples)")
    return _Decoded(index, audio, d.original_sample_rate, read_seconds=time.perf_counter() - t0)


def _worker_init():
    # Ctrl-C reaches the whole process group; only the parent decides what to do with it.
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _decoded_stream(files: Sequence[InputFile], *, sample_rate: int, mix: bool, workers: int,
                    quality: str) -> Iterator[_Decoded]:
    """Decoded files, in completion order, at most ~4 per worker held in memory."""
    if workers <= 0:
        for i, f in enumerate(files):
            yield _read_one(i, f.path, sample_rate, mix, quality)
        return
    # spawn: the parent has JAX's threads running, which fork would copy half-initialised.
    ctx = multiprocessing.get_context("spawn")
    pool = concurrent.futures.ProcessPoolExecutor(workers, mp_context=ctx, initializer=_worker_init)
    try:
        pending: set = set()
        it = iter(enumerate(files))
        exhausted = False
        while pending or not exhausted:
            while not exhausted and len(pending) < 4 * workers:
                try:
                    i, f = next(it)
                except StopIteration:
                    exhausted = True
                    break
                pending.add(pool.submit(_read_one, i, f.path, sample_rate, mix, quality))
            if not pending:
                break
            done, pending = concurrent.futures.wait(
                pending, return_when=concurrent.futures.FIRST_COMPLETED)
            for fut in done:
                try:
                    yield fut.result()
                except concurrent.futures.process.BrokenProcessPool:
                    raise
    finally:
        pool.shutdown(wait=False, cancel_futures=True)


# ---------------------------------------------------------------------------- device
class _DeviceRunner:
    """Runs one jitted function on batches sharded over the local devices.

    `submit` transfers a batch (device_put, asynchronous) and dispatches the computation
    without waiting; results are fetched `depth` batches later, so the host prepares and
    transfers the next batch while the device computes this one.
    """

    def __init__(self, fn: Callable, variables, *, devices: Sequence[Any], depth: int = 2):
        import jax
        from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

        self.mesh = Mesh(np.asarray(devices), ("batch",))
        self.batch_sharding = NamedSharding(self.mesh, P("batch"))
        self.variables = jax.device_put(variables, NamedSharding(self.mesh, P()))
        # Outputs follow the batch-sharded inputs (GSPMD propagates the input sharding).
        self.fn = fn
        self._programs_before = self._cache_size()
        self.depth = depth
        self.queue: collections.deque = collections.deque()
        self.wait_seconds = 0.0
        self.shapes: collections.Counter = collections.Counter()  # input shapes -> batches

    def submit(self, meta, *arrays) -> list:
        """Queues one batch; returns the `(meta, numpy outputs)` of batches now finished."""
        import jax

        self.shapes[str(jax.tree_util.tree_map(lambda x: tuple(x.shape), list(arrays)))] += 1
        on_device = [jax.device_put(a, self.batch_sharding) for a in arrays]
        self.queue.append((meta, self.fn(self.variables, *on_device)))
        out = []
        while len(self.queue) > self.depth:
            out.append(self._fetch())
        return out

    def drain(self) -> list:
        return [self._fetch() for _ in range(len(self.queue))]

    def _fetch(self):
        import jax

        meta, result = self.queue.popleft()
        t0 = time.perf_counter()
        result = jax.device_get(result)
        self.wait_seconds += time.perf_counter() - t0
        return meta, result

    def _cache_size(self) -> int:
        size = getattr(self.fn, "_cache_size", None)
        return int(size()) if size is not None else 0

    @property
    def compiled_programs(self) -> int:
        """Programs this job compiled (shapes reused from an earlier job cost nothing)."""
        size = getattr(self.fn, "_cache_size", None)
        return self._cache_size() - self._programs_before if size else len(self.shapes)


@functools.lru_cache(maxsize=None)
def _jitted(kind: str, config, dtype: str, quantizer) -> Callable:
    """One jitted encode or decode per model architecture and dtype, kept for the process,
    so a second job (or a test) reuses the programs the first compiled.

    encode: (variables, audio `[batch, samples]`, lengths `[batch]`) -> int32 codes per level
    `[batch, frames]`; decode: (variables, codes per level, lengths) -> float32 audio
    `[batch, samples]`.
    """
    import jax

    from codec_jax import api

    target = api.encode if kind == "encode" else api.decode
    kw = dict(config=config, dtype=dtype, quantizer=quantizer)

    def fn(variables, x, lengths):
        return target(variables, x, lengths=lengths, **kw)

    return jax.jit(fn)


def local_devices(max_devices: Optional[int] = None) -> list:
    import jax

    devices = jax.local_devices()
    return devices[:max_devices] if max_devices else devices


# ---------------------------------------------------------------------------- report
@dataclasses.dataclass
class JobReport:
    """What a job did; `to_json` is the report written beside the outputs."""

    command: str
    model: str
    model_id: str
    process_index: int = 0
    process_count: int = 1
    files: int = 0
    done: int = 0
    skipped_existing: int = 0
    failed: list[dict] = dataclasses.field(default_factory=list)
    audio_seconds: float = 0.0
    wall_seconds: float = 0.0
    programs: int = 0            # distinct batch shapes run (<= the bucket count)
    batches: dict[str, int] = dataclasses.field(default_factory=dict)  # shapes -> batches
    compiled_programs: int = 0   # of those, compiled by this job (not cached before)
    buckets: str = ""
    devices: int = 0
    timings: dict[str, float] = dataclasses.field(default_factory=dict)
    interrupted: bool = False

    @property
    def x_real_time(self) -> float:
        return self.audio_seconds / self.wall_seconds if self.wall_seconds else 0.0

    def fail(self, path: str, reason: str) -> None:
        self.failed.append({"path": path, "reason": reason})

    def to_json(self) -> dict:
        out = dataclasses.asdict(self)
        out["x_real_time"] = round(self.x_real_time, 2)
        out["audio_hours"] = self.audio_seconds / 3600
        return out

    def write(self, output_dir: str) -> str:
        name = (f"{self.command}_report.json" if self.process_count == 1
                else f"{self.command}_report.process-{self.process_index:03d}.json")
        path = os.path.join(output_dir, name)
        with audio_io.atomic_output(path) as tmp:
            with open(tmp, "w") as f:
                json.dump(self.to_json(), f, indent=2)
        return path

    def summary(self) -> str:
        hours = self.audio_seconds / 3600
        lines = [f"{self.done} of {self.files} files {self.command}d "
                 f"({self.skipped_existing} already done), {hours:.3f} h of audio in "
                 f"{self.wall_seconds:.1f} s ({self.x_real_time:.1f}x real time) on "
                 f"{self.devices} device(s); {self.programs} program(s) "
                 f"({self.compiled_programs} compiled now) for buckets {self.buckets}"]
        if self.failed:
            lines.append(f"{len(self.failed)} file(s) failed:")
            lines += [f"  {f['path']}: {f['reason']}" for f in self.failed]
        return "\n".join(lines)


class _Progress:
    """tqdm bar over files: audio hours, x real time; tqdm gives the ETA."""

    def __init__(self, total: int, enabled: bool, desc: str):
        from tqdm import tqdm

        self.bar = tqdm(total=total, unit="file", desc=desc, disable=not enabled,
                        dynamic_ncols=True, smoothing=0.1, file=sys.stderr)
        self.t0 = time.perf_counter()
        self.seconds = 0.0

    def update(self, files: int, audio_seconds: float) -> None:
        self.seconds += audio_seconds
        elapsed = max(time.perf_counter() - self.t0, 1e-9)
        self.bar.set_postfix_str(f"{self.seconds / 3600:.3f} h audio, "
                                 f"{self.seconds / elapsed:.1f}x RT", refresh=False)
        self.bar.update(files)

    def close(self):
        self.bar.close()


# ---------------------------------------------------------------------------- outputs
def codes_path(output_dir: str, relpath: str) -> str:
    """`a/b.wav` -> `OUTDIR/a/b.wav.snac` (the source extension stays: no collisions)."""
    return os.path.join(output_dir, relpath + cf.SUFFIX)


class _FileSink:
    """One `.snac` file per input, mirroring the input's relative path."""

    def __init__(self, output_dir: str, entropy_model=None):
        self.output_dir = output_dir
        self.entropy_model = entropy_model  # to verify context-coded outputs of an earlier run

    def done(self, relpath: str, model_id: str, overwrite: bool) -> Optional[str]:
        """None: to do; "done": a valid output exists; else why the input is refused."""
        path = codes_path(self.output_dir, relpath)
        if overwrite or not os.path.exists(path):
            return None
        try:
            cf.load_codes(path, expect_model_id=model_id, entropy_model=self.entropy_model)
        except cf.ModelMismatchError:
            return f"{path} exists, made by another model (pass --overwrite to replace it)"
        except cf.CodesFileError:
            return None  # unusable output (e.g. damaged since): code it again
        return "done"

    def write(self, relpath: str, blob: bytes) -> None:
        with audio_io.atomic_output(codes_path(self.output_dir, relpath)) as tmp:
            with open(tmp, "wb") as f:
                f.write(blob)

    def close(self) -> None:
        pass

    def abort(self) -> None:
        pass


class _ShardSink:
    """array_record shards of `.snac` records, a JSON index per shard, a manifest.

    A shard is finished once its index exists; shards are written under a temporary name
    and renamed, then the index is written, so a killed job leaves finished shards only
    (a shard without an index is removed and its files coded again on the next run).
    """

    def __init__(self, output_dir: str, *, process_index: int, shard_size: int,
                 overwrite: bool):
        self.output_dir = output_dir
        self.prefix = f"shard-p{process_index:03d}-"
        self.shard_size = shard_size
        os.makedirs(output_dir, exist_ok=True)
        if overwrite:
            for name in os.listdir(output_dir):
                if name.startswith(self.prefix):
                    os.unlink(os.path.join(output_dir, name))
        finished = _finished_shards(output_dir)
        for name in os.listdir(output_dir):
            # This process's leftovers of a killed run: a shard renamed before its index was
            # written, or a temporary shard (SIGKILL leaves no chance to clean up). Other
            # processes' files are theirs to judge: they may be writing them right now.
            ours = name.startswith(self.prefix) or name.startswith("." + self.prefix)
            if ours and ((name.endswith(SHARD_SUFFIX) and name not in finished)
                         or audio_io.is_temporary_output(name)):
                os.unlink(os.path.join(output_dir, name))
        self.finished_files = {e["path"] for idx in finished.values() for e in idx["records"]}
        numbers = [int(n[len(self.prefix):-len(SHARD_SUFFIX)]) for n in finished
                   if n.startswith(self.prefix)]
        self.next_number = max(numbers, default=-1) + 1
        self.writer = None
        self.records: list[dict] = []
        self.tmp = ""

    def done(self, relpath: str, model_id: str, overwrite: bool) -> Optional[str]:
        return "done" if relpath in self.finished_files else None

    def write(self, relpath: str, blob: bytes, info: dict) -> None:
        from array_record.python.array_record_module import ArrayRecordWriter

        if self.writer is None:
            name = f"{self.prefix}{self.next_number:05d}{SHARD_SUFFIX}"
            self.tmp = os.path.join(self.output_dir, f".{name}.tmp")
            # group_size:1 makes every record its own chunk: random access reads one record.
            self.writer = ArrayRecordWriter(self.tmp, "group_size:1")
        self.writer.write(blob)
        self.records.append({"path": relpath, **info})
        if len(self.records) >= self.shard_size:
            self._finish()

    def _finish(self) -> None:
        if self.writer is None:
            return
        self.writer.close()
        self.writer = None
        name = f"{self.prefix}{self.next_number:05d}{SHARD_SUFFIX}"
        final = os.path.join(self.output_dir, name)
        os.chmod(self.tmp, 0o666 & ~audio_io._process_umask())
        os.replace(self.tmp, final)
        index = {"shard": name, "records": self.records}
        with audio_io.atomic_output(final + INDEX_SUFFIX) as tmp:
            with open(tmp, "w") as f:
                json.dump(index, f)
        self.next_number += 1
        self.records = []

    def close(self) -> None:
        self._finish()

    def abort(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None
        if self.tmp and os.path.exists(self.tmp):
            os.unlink(self.tmp)


def _finished_shards(output_dir: str) -> dict[str, dict]:
    """Shard name -> its index, for every shard whose index was written."""
    out = {}
    for name in sorted(os.listdir(output_dir)):
        if name.endswith(SHARD_SUFFIX + INDEX_SUFFIX):
            shard = name[: -len(INDEX_SUFFIX)]
            if os.path.exists(os.path.join(output_dir, shard)):
                with open(os.path.join(output_dir, name)) as f:
                    out[shard] = json.load(f)
    return out


def write_manifest(output_dir: str, model: dict) -> str:
    """manifest.json: every finished shard, its records, and totals."""
    shards = _finished_shards(output_dir)
    manifest = {
        "format": "codec_jax codes shards",
        "record_format": f"snac codes file version {cf.VERSION} (docs/codes_format.md)",
        "model": model,
        "shards": [{"file": name, "records": len(idx["records"])} for name, idx in shards.items()],
        "records": sum(len(idx["records"]) for idx in shards.values()),
        "audio_seconds": sum(r["length"] for idx in shards.values() for r in idx["records"])
        / model["sample_rate"],
    }
    path = os.path.join(output_dir, MANIFEST)
    with audio_io.atomic_output(path) as tmp:
        with open(tmp, "w") as f:
            json.dump(manifest, f, indent=1)
    return path


def open_shards(output_dir: str):
    """A grain `ArrayRecordDataSource` over every finished shard: record i -> bytes.

    Parse a record with `codec_jax.audio.codes_file.parse_codes` (`read_shard_record`).
    The record order is the shard order, then the order inside each shard (the
    `records` lists of manifest.json).
    """
    import grain.python as grain

    shards = _finished_shards(output_dir)
    if not shards:
        raise UsageError(f"{output_dir}: no finished shards")
    return grain.ArrayRecordDataSource([os.path.join(output_dir, n) for n in shards])


def read_shard_record(record: bytes, entropy_model=None) -> cf.CodesFile:
    """One shard record -> `CodesFile` (relative path in `.source`); `entropy_model`: the
    ContextModel of a corpus encoded with `--entropy MODEL.npz`."""
    return cf.parse_codes(record, name="shard record", entropy_model=entropy_model)


# ---------------------------------------------------------------------------- encode
@dataclasses.dataclass(frozen=True)
class EncodeOptions:
    output_dir: str
    format: str = "files"          # "files" | "shards"
    channels: str = "mix"          # "mix" | "separate"
    batch_size: int = 16           # clips per batch at the longest bucket
    window_seconds: float = 20.0   # longest bucket; longer streams are windowed
    buckets: int = 5
    workers: int = 2
    overwrite: bool = False
    shard_size: int = 1024         # records per shard
    resample_quality: str = "HQ"
    progress: bool = True
    max_devices: Optional[int] = None
    # None: fixed-width codes; "adaptive" or a `codec_jax.audio.entropy.ContextModel`:
    # entropy-coded payloads (codes format version 2, docs/codes_format.md).
    entropy: Any = None


def _context_model(entropy):
    """The ContextModel inside an `entropy` option, or None."""
    return None if entropy is None or isinstance(entropy, str) else entropy


@dataclasses.dataclass
class _FileState:
    item: InputFile
    original_sample_rate: int
    channels: int
    length: int
    codes: list[np.ndarray]   # int32 [channels, frames] per level
    remaining: int            # segments not coded yet
    audio: Optional[np.ndarray]  # float32 [channels, samples]; dropped once coded


def encode_corpus(codec, model_name: str, files: Sequence[InputFile], options: EncodeOptions,
                  *, model_id: Optional[str] = None,
                  log: Callable[[str], None] = lambda s: print(s, file=sys.stderr)) -> JobReport:
    """Codes every file of this process's share; see the module docstring."""
    import jax

    if options.format not in ("files", "shards"):
        raise UsageError(f"--format must be 'files' or 'shards', got {options.format!r}")
    if options.channels not in ("mix", "separate"):
        raise UsageError(f"--channels must be 'mix' or 'separate', got {options.channels!r}")
    t_start = time.perf_counter()
    config = codec.config
    model_id = model_id or cf.model_identity(config, codec.variables)
    pindex, pcount = jax.process_index(), jax.process_count()
    devices = local_devices(options.max_devices)
    plan = BucketPlan(config, window_seconds=options.window_seconds, n_buckets=options.buckets,
                      batch_size=options.batch_size, n_devices=len(devices))
    report = JobReport("encode", model_name, model_id, pindex, pcount, buckets=plan.describe(),
                       devices=len(devices))
    share = process_share(list(files), pindex, pcount)
    report.files = len(share)
    os.makedirs(options.output_dir, exist_ok=True)
    sink = (_ShardSink(options.output_dir, process_index=pindex, shard_size=options.shard_size,
                       overwrite=options.overwrite)
            if options.format == "shards" else _FileSink(options.output_dir, _context_model(options.entropy)))
    todo = []
    for item in share:
        state = sink.done(item.relpath, model_id, options.overwrite)
        if state == "done":
            report.skipped_existing += 1
        elif state is not None:
            report.fail(item.path, state)
        else:
            todo.append(item)
    sizes = cf_sizes(codec)
    header = dict(sample_rate=config.sampling_rate, model_id=model_id, model_name=model_name,
                  config=config.to_dict(), codebook_sizes=sizes, entropy=options.entropy)
    runner = _DeviceRunner(_jitted("encode", config, codec.dtype, codec.quantizer),
                           codec.variables, devices=devices)
    timings = collections.Counter()
    progress = _Progress(len(share), options.progress, "encode")
    progress.update(report.skipped_existing + len(report.failed), 0.0)
    log(f"encode: {len(todo)} file(s) to code ({report.skipped_existing} done before, "
        f"{len(share)} in this process's share of {len(files)}) on {len(devices)} device(s); "
        f"buckets (length x batch): {plan.describe()}")
    states: dict[int, _FileState] = {}
    pending: dict[int, list] = {b: [] for b in plan.lengths}
    n_levels = config.n_levels

    def finish_file(idx: int) -> None:
        st = states.pop(idx)
        codes = [c[0] if st.channels == 1 else c for c in st.codes]
        t0 = time.perf_counter()
        blob = cf.encode_codes(codes, length=st.length,
                               original_sample_rate=st.original_sample_rate,
                               source=st.item.relpath, **header)
        if options.format == "shards":
            sink.write(st.item.relpath, blob, {"length": st.length, "channels": st.channels,
                                               "frames": [int(c.shape[-1]) for c in st.codes]})
        else:
            sink.write(st.item.relpath, blob)
        timings["write"] += time.perf_counter() - t0
        report.done += 1
        seconds = st.length / config.sampling_rate
        report.audio_seconds += seconds
        progress.update(1, seconds)

    def collect(results) -> None:
        t0 = time.perf_counter()
        for meta, codes in results:
            for row, (idx, ch, seg) in enumerate(meta):
                st = states[idx]
                for level in range(n_levels):
                    a, b = seg.keep[level]
                    o = seg.offset[level]
                    st.codes[level][ch, o:o + b - a] = codes[level][row, a:b]
                st.remaining -= 1
                if st.remaining == 0:
                    finish_file(idx)
        timings["assemble"] += time.perf_counter() - t0

    def run_bucket(bucket: int, force: bool = False) -> None:
        items = pending[bucket]
        size = plan.batch_sizes[bucket]
        while len(items) >= size or (force and items):
            batch, items = items[:size], items[size:]
            t0 = time.perf_counter()
            audio = np.zeros((size, bucket), np.float32)
            lengths = np.full((size,), bucket, np.int32)  # padding rows: zeros, ignored
            for row, (idx, ch, seg) in enumerate(batch):
                audio[row, :seg.length] = states[idx].audio[ch, seg.start:seg.start + seg.length]
                lengths[row] = seg.length
            timings["batch"] += time.perf_counter() - t0
            collect(runner.submit(batch, audio, lengths))
        pending[bucket] = items

    interrupted = True
    try:
        stream = _decoded_stream(todo, sample_rate=config.sampling_rate,
                                 mix=options.channels == "mix", workers=options.workers,
                                 quality=options.resample_quality)
        t_wait = time.perf_counter()
        for dec in stream:
            timings["wait_for_reader"] += time.perf_counter() - t_wait
            timings["read_in_workers"] += dec.read_seconds
            item = todo[dec.index]
            if dec.audio is None:
                report.fail(item.path, dec.error)
                progress.update(1, 0.0)
                t_wait = time.perf_counter()
                continue
            channels, length = dec.audio.shape
            frames = config.num_frames(length)
            segs = plan.segments(length)
            st = _FileState(item, dec.original_sample_rate, channels, length,
                            [np.zeros((channels, f), np.int32) for f in frames],
                            remaining=channels * len(segs), audio=dec.audio)
            states[dec.index] = st
            for ch in range(channels):
                for seg in segs:
                    pending[plan.bucket(seg.length)].append((dec.index, ch, seg))
            for bucket in plan.lengths:
                run_bucket(bucket)
            t_wait = time.perf_counter()
        for bucket in plan.lengths:
            run_bucket(bucket, force=True)
        collect(runner.drain())
        sink.close()
        interrupted = False
    finally:
        progress.close()
        if interrupted:
            sink.abort()
            report.interrupted = True
    if options.format == "shards":
        _sync_processes("codec_jax encode shards written")
        if pindex == 0:
            write_manifest(options.output_dir, {"id": model_id, "name": model_name,
                                                "sample_rate": config.sampling_rate,
                                                "config": config.to_dict()})
    return _finish_report(report, runner, timings, t_start, options.output_dir)


def _finish_report(report, runner, timings: dict, t_start: float, output_dir):
    """Fill in the job's wall time, programs, batch shapes and timings, write it, return it
    (the end of both the encode and the decode job)."""
    report.wall_seconds = time.perf_counter() - t_start
    report.programs = len(runner.shapes)
    report.batches = dict(runner.shapes)
    report.compiled_programs = runner.compiled_programs
    timings["wait_for_device"] = runner.wait_seconds
    report.timings = {k: round(v, 4) for k, v in timings.items()}
    report.write(output_dir)
    return report


def cf_sizes(codec) -> list[int]:
    """Codebook size of every level of `codec`."""
    return list(codec.quantizer.level_codebook_sizes(codec.config.n_levels,
                                                     codec.config.codebook_size))


def _sync_processes(name: str) -> None:
    import jax

    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


# ---------------------------------------------------------------------------- decode
@dataclasses.dataclass(frozen=True)
class DecodeOptions:
    output_dir: str
    audio_format: Optional[str] = None  # None: the source's extension when writable, else wav
    batch_size: int = 16
    window_seconds: float = 20.0
    buckets: int = 5
    overwrite: bool = False
    force: bool = False
    progress: bool = True
    max_devices: Optional[int] = None
    entropy_model: Any = None  # the ContextModel of context-coded codes files


WRITABLE_EXTENSIONS = {".wav": "WAV", ".flac": "FLAC", ".ogg": "OGG", ".oga": "OGG",
                       ".mp3": "MP3", ".aif": "AIFF", ".aiff": "AIFF"}


def check_audio_format(ext: Optional[str]) -> Optional[str]:
    """Validates `--audio-format` before any work; returns the extension with its dot."""
    if ext is None:
        return None
    ext = ext if ext.startswith(".") else "." + ext
    if ext.lower() not in WRITABLE_EXTENSIONS:
        raise UsageError(f"cannot write audio as {ext!r}; choose one of "
                         f"{sorted(e.lstrip('.') for e in WRITABLE_EXTENSIONS)}")
    return ext.lower()


def audio_path(output_dir: str, relpath: str, audio_format: Optional[str]) -> str:
    """`a/b.wav.snac` -> `OUTDIR/a/b.wav` (or `b.<audio_format>`)."""
    base = relpath[: -len(cf.SUFFIX)] if relpath.endswith(cf.SUFFIX) else relpath
    stem, ext = os.path.splitext(base)
    if audio_format is not None:
        ext = audio_format
    elif ext.lower() not in WRITABLE_EXTENSIONS:
        stem, ext = base, ".wav"
    return os.path.join(output_dir, stem + ext)


def decode_corpus(codec, files: Sequence[InputFile], options: DecodeOptions, *,
                  model_id: Optional[str] = None,
                  log: Callable[[str], None] = lambda s: print(s, file=sys.stderr)) -> JobReport:
    """Decodes every codes file of this process's share to audio at the model's rate."""
    import jax
    import soundfile as sf

    from codec_jax.config import SNACConfig

    audio_format = check_audio_format(options.audio_format)
    t_start = time.perf_counter()
    config = codec.config
    model_id = model_id or cf.model_identity(config, codec.variables)
    pindex, pcount = jax.process_index(), jax.process_count()
    devices = local_devices(options.max_devices)
    plan = BucketPlan(config, window_seconds=options.window_seconds, n_buckets=options.buckets,
                      batch_size=options.batch_size, n_devices=len(devices), kind="decode")
    report = JobReport("decode", "", model_id, pindex, pcount, buckets=plan.describe(),
                       devices=len(devices))
    share = process_share(list(files), pindex, pcount)
    report.files = len(share)
    runner = _DeviceRunner(_jitted("decode", config, codec.dtype, codec.quantizer),
                           codec.variables, devices=devices)
    timings = collections.Counter()
    progress = _Progress(len(share), options.progress, "decode")
    frame_samples = [config.hop_length * s for s in config.vq_strides]
    states: dict[int, dict] = {}
    pending: dict[int, list] = {b: [] for b in plan.lengths}

    def finish(idx: int) -> None:
        st = states.pop(idx)
        t0 = time.perf_counter()
        target = st["target"]
        with audio_io.atomic_output(target) as tmp:
            ext = os.path.splitext(target)[1].lower()
            sf.write(tmp, st["audio"].T, config.sampling_rate, format=WRITABLE_EXTENSIONS[ext])
        timings["write"] += time.perf_counter() - t0
        report.done += 1
        report.audio_seconds += st["length"] / config.sampling_rate
        progress.update(1, st["length"] / config.sampling_rate)

    def collect(results) -> None:
        for meta, audio in results:
            for row, (idx, ch, seg) in enumerate(meta):
                st = states[idx]
                lo, hi = seg.keep[0]  # samples of this row the clip keeps
                start = seg.offset[0]
                n = min(hi - lo, st["length"] - start)  # the codes' padding is trimmed
                if n > 0:
                    st["audio"][ch, start:start + n] = audio[row, lo:lo + n]
                st["remaining"] -= 1
                if st["remaining"] == 0:
                    finish(idx)

    def run_bucket(bucket: int, force: bool = False) -> None:
        items = pending[bucket]
        size = plan.batch_sizes[bucket]
        while len(items) >= size or (force and items):
            batch, items = items[:size], items[size:]
            frames = [bucket // fs for fs in frame_samples]
            codes = [np.zeros((size, f), np.int32) for f in frames]
            lengths = np.full((size,), bucket, np.int32)
            for row, (idx, ch, seg) in enumerate(batch):
                src = states[idx]["codes"]
                for level, fs in enumerate(frame_samples):
                    first = seg.start // fs  # rows are whole frames of every level
                    codes[level][row, :seg.length // fs] = src[level][ch, first:first + seg.length // fs]
                lengths[row] = seg.length
            collect(runner.submit(batch, codes, lengths))
        pending[bucket] = items

    try:
        for i, item in enumerate(share):
            target = audio_path(options.output_dir, item.relpath, audio_format)
            if os.path.exists(target) and not options.overwrite:
                report.skipped_existing += 1
                progress.update(1, 0.0)
                continue
            try:
                c = cf.load_codes(item.path,
                                  expect_model_id=None if options.force else model_id,
                                  entropy_model=options.entropy_model)
                if SNACConfig.from_dict(c.config) != config:
                    raise cf.ModelMismatchError(
                        f"{item.path}: made by a model of another architecture "
                        f"({c.model_name!r}); it cannot be decoded with this one")
                if c.frames != list(config.num_frames(c.length)):
                    raise cf.CorruptCodesError(
                        f"{item.path}: {c.frames} frames do not match length {c.length}")
            except cf.CodesFileError as e:
                report.fail(item.path, str(e).removeprefix(f"{item.path}: "))
                progress.update(1, 0.0)
                continue
            segs = plan.segments(c.length)
            states[i] = dict(target=target, length=c.length, codes=c.codes_2d(),
                             audio=np.zeros((c.channels, c.length), np.float32),
                             remaining=c.channels * len(segs))
            for ch in range(c.channels):
                for seg in segs:
                    pending[plan.bucket(seg.length)].append((i, ch, seg))
            for bucket in plan.lengths:
                run_bucket(bucket)
        for bucket in plan.lengths:
            run_bucket(bucket, force=True)
        collect(runner.drain())
    except BaseException:
        report.interrupted = True
        raise
    finally:
        progress.close()
    return _finish_report(report, runner, timings, t_start, options.output_dir)
