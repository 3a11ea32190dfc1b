"""Training against a bucket: the whole train / resume / eval / export cycle on `gs://`.

The bucket is a local Google Cloud Storage emulator (pip `gcp-storage-emulator`, in
memory, offline). Every layer reaches it through its real `gs://` code path:
etils.epath through gcsfs (`STORAGE_EMULATOR_HOST`), orbax through tensorstore's `gcs`
driver (`TENSORSTORE_GCS_HTTP_URL`), JAX's compilation cache through etils.epath and
tensorboardX through `codec_jax.training.metrics`' epath event files. TFDS data dirs on
`gs://` are read from a local copy staged through etils.epath (`codec_jax/data/staging.py`:
array_record's C++ reader cannot read `gs://`). Not covered: real GCS authentication.

The full cycle is slow (two tiny runs with compilation) and is marked `long`; the TFDS
staging tests use a dataset of six 1 s tones and are fast.
"""

from __future__ import annotations

import faulthandler
import json
import logging
import os
import signal
import socket

import numpy as np
import pytest

from test_metrics import read_events

pytest.importorskip("gcsfs", reason="gs:// paths need gcsfs (pip install gcsfs)")
emulator_server = pytest.importorskip(
    "gcp_storage_emulator.server", reason="the GCS emulator is a test dependency")

BUCKET = "codec-jax-test"


def _send_generation_headers():
    """Real GCS answers every media download with `x-goog-generation` (and
    `x-goog-metageneration`) headers; gcp-storage-emulator 2026.7.19 sends neither.
    tensorstore's gcs driver takes an object's generation from that header and makes
    conditional writes (`ifGenerationMatch`) with it, so without it orbax's OCDBT writer
    fails on its second manifest write ("Malformed StorageGeneration"). Add the headers
    to the emulator's download handler, as GCS sends them:
    https://cloud.google.com/storage/docs/xml-api/reference-headers#xgooggeneration"""
    from gcp_storage_emulator.handlers import objects

    original = objects.download
    if getattr(original, "sends_generation", False):
        return

    def download(request, response, storage, *args, **kwargs):
        try:
            obj = storage.get_file_obj(request.params["bucket_name"], request.params["object_id"])
        except Exception:  # not found: the original handler answers 404
            obj = None
        if obj is not None:
            response["x-goog-generation"] = str(obj["generation"])
            response["x-goog-metageneration"] = str(obj.get("metageneration", "1"))
        return original(request, response, storage, *args, **kwargs)

    download.sends_generation = True
    objects.download = download  # `objects.get(alt=media)` calls it by name
    for _, table in emulator_server.HANDLERS:  # routes that hold the function itself
        for method, handler in list(table.items()):
            if handler is original:
                table[method] = download


@pytest.fixture(scope="module")
def bucket():
    """`gs://BUCKET` served by an in-memory emulator on a free local port."""
    _send_generation_headers()
    with socket.socket() as s:
        s.bind(("localhost", 0))
        port = s.getsockname()[1]
    server = emulator_server.create_server("localhost", port, in_memory=True,
                                           default_bucket=BUCKET)
    server.start()
    url = f"http://localhost:{port}"
    logging.getLogger("gcsfs").setLevel(logging.ERROR)  # "could not determine bucket type"
    logging.getLogger("gcp_storage_emulator").setLevel(logging.CRITICAL)  # 404s of probes
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("STORAGE_EMULATOR_HOST", url)           # gcsfs / google-cloud-storage
        mp.setenv("TENSORSTORE_GCS_HTTP_URL", url)        # orbax's tensorstore
        mp.setenv("GOOGLE_AUTH_TOKEN_FOR_TESTING", "x")   # tensorstore: no credential lookup
        yield f"gs://{BUCKET}"
    server.stop()


@pytest.fixture
def restore_compilation_cache():
    import jax
    from jax.experimental.compilation_cache import compilation_cache

    previous = jax.config.jax_compilation_cache_dir
    yield
    jax.config.update("jax_compilation_cache_dir", previous)
    compilation_cache.reset_cache()


def test_as_path_keeps_urls_and_makes_local_paths_absolute(tmp_path, monkeypatch):
    from codec_jax.paths import as_path

    monkeypatch.chdir(tmp_path)
    assert str(as_path("gs://b/run") / "checkpoints") == "gs://b/run/checkpoints"
    assert str(as_path("run")) == str(tmp_path / "run")
    assert str(as_path("~/x")) == os.path.expanduser("~/x")


def test_event_files_roll_over_on_a_bucket(bucket, monkeypatch):
    """Remote event files are rewritten whole at each flush, so they are split into
    parts; TensorBoard reads the parts in name order and sees every step."""
    from etils import epath

    from codec_jax.training import metrics as tm

    logdir = epath.Path(bucket) / "rollover"
    monkeypatch.setattr(tm, "REMOTE_EVENT_PART_BYTES", 2000)  # 16 MiB in real runs
    writer = tm.TensorBoardWriter(logdir)
    for step in range(60):
        writer.write_scalars(step, {"loss": float(step)})
    writer.close()
    files = sorted(p for p in logdir.iterdir() if "tfevents" in p.name)
    assert len(files) > 1, files
    steps = [e.step for e in read_events(files) if e.summary.value]
    assert steps == list(range(60))


@pytest.mark.long
def test_train_resume_eval_export_on_a_bucket(bucket, tmp_path, monkeypatch,
                                              restore_compilation_cache, capsys):
    from etils import epath

    import codec_jax
    from codec_jax.configs import tiny
    from codec_jax.training import loop
    from codec_jax.training.checkpoint import TrainCheckpointer

    monkeypatch.chdir(tmp_path)  # anything written "locally by mistake" would land here
    workdir = f"{bucket}/runs/tiny"

    def config(steps):
        c = tiny.get_config()
        c.train.num_steps = steps
        c.train.compilation_cache_dir = f"{bucket}/xla_cache"
        c.logging.every_steps = 2
        c.logging.eval_every_steps = 4
        c.logging.eval_batches = 1
        c.checkpoint.every_steps = 2
        return c

    loop.train_and_evaluate(config(2), workdir)
    final = loop.train_and_evaluate(config(4), workdir)  # resumes from the bucket
    out = capsys.readouterr().out
    assert f"resumed from {workdir}/checkpoints/2 (step 2)" in out

    assert not os.listdir(tmp_path), os.listdir(tmp_path)  # nothing went to ./gs:/...
    run = epath.Path(workdir)
    checkpointer = TrainCheckpointer(run / "checkpoints")
    assert checkpointer.all_steps() == [2, 4]
    checkpointer.close()

    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    train_steps = [r["step"] for r in rows if "train/loss/mel" in r]
    assert train_steps == [2, 4]  # the first run's rows survived the rewrite on resume
    eval_rows = [r for r in rows if "eval/mel" in r]
    # Each run evaluates at its last step (2, then 4: also eval_every_steps).
    assert [r["step"] for r in eval_rows] == [2, 4]
    assert all(np.isfinite(r["eval/mel"]) for r in eval_rows)
    assert final["eval/mel"] == pytest.approx(eval_rows[-1]["eval/mel"])

    events = read_events(sorted(p for p in (run / "tensorboard").iterdir()
                                if "tfevents" in p.name))
    tags = {v.tag for e in events for v in e.summary.value}
    assert {"train/loss/mel", "eval/mel", "eval/0/reconstruction",
            "eval/0/spectrogram_original"} <= tags
    assert json.loads((run / "config.json").read_text())["model"]["preset"] == "tiny"
    assert any((epath.Path(bucket) / "xla_cache").iterdir())  # compilation cache entries

    codec = codec_jax.load_pretrained(f"{workdir}/export")
    audio = np.random.default_rng(0).uniform(-0.1, 0.1, (1, 4000)).astype(np.float32)
    codes = codec.encode(audio)
    assert codec.decode(codes, length=4000).shape == (1, 4000)


# --------------------------------------------------------------------------- TFDS data on gs://

NAME = "cloud_tones"


@pytest.fixture
def deadline():
    """A test that talks to the emulator fails instead of hanging: SIGALRM raises in
    Python code after 60 s; if the process is stuck in C++ (array_record's reader given a
    `gs://` path blocks there), faulthandler prints every thread's stack and ends it."""

    def expire(signum, frame):
        raise TimeoutError("the test ran for more than 60 s against the GCS emulator")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(60)
    faulthandler.dump_traceback_later(120, exit=True)
    yield
    faulthandler.cancel_dump_traceback_later()
    signal.alarm(0)
    signal.signal(signal.SIGALRM, previous)


@pytest.fixture(scope="module")
def remote_tfds(bucket, tmp_path_factory):
    """(local data_dir, `gs://BUCKET/tfds`): a prepared dataset of six 1 s tones (4 train,
    2 validation records) on disk, and the same files uploaded to the bucket."""
    import soundfile as sf
    from etils import epath

    from codec_jax.data import prepare

    audio = tmp_path_factory.mktemp("tones")
    t = np.arange(24000) / 24000
    for i in range(6):
        sf.write(audio / f"t{i}.wav", (0.3 * np.sin(2 * np.pi * (200 + 50 * i) * t)).astype(np.float32),
                 24000, subtype="PCM_16")
    local = tmp_path_factory.mktemp("tfds")
    prepare.prepare_folder(str(audio), name=NAME, data_dir=str(local), validation_fraction=0.34)
    remote = epath.Path(bucket) / "tfds"
    for f in sorted(local.rglob("*")):
        if f.is_file():
            dst = remote / f.relative_to(local).as_posix()
            dst.parent.mkdir(parents=True, exist_ok=True)
            dst.write_bytes(f.read_bytes())
    return str(local), str(remote)


@pytest.fixture
def copies(monkeypatch):
    """Names of the files the staging downloads (its per-file copy function, counted)."""
    from codec_jax.data import staging

    copied = []
    original = staging._copy_file

    def counting(src, dst, *args, **kwargs):
        copied.append(os.path.basename(dst))
        return original(src, dst, *args, **kwargs)

    monkeypatch.setattr(staging, "_copy_file", counting)
    return copied


def _version_files(local):
    return sorted(os.listdir(os.path.join(local, NAME, "1.0.0")))


def _copy_dir(cache):
    return os.path.join(str(cache), "gs", BUCKET, "tfds", NAME, "1.0.0")


def _assert_same_records(got, want):
    assert len(got) == len(want) > 0
    for i in range(len(want)):
        g, w = got[i], want[i]
        assert g["path"] == w["path"]
        assert g["audio"].shape == w["audio"].shape  # the record's length
        np.testing.assert_array_equal(g["audio"], w["audio"])


def test_tfds_data_dir_on_a_bucket_is_read_from_a_local_copy(remote_tfds, tmp_path, monkeypatch,
                                                             copies, caplog, deadline):
    from codec_jax.data import pipeline, staging

    local, remote = remote_tfds
    monkeypatch.setenv(staging.CACHE_ENV, str(tmp_path / "cache"))  # the default cache_dir
    with caplog.at_level(logging.INFO, logger="codec_jax.data.staging"):
        for split in ("train", "validation"):
            _assert_same_records(pipeline.open_tfds_source(NAME, remote, split),
                                 pipeline.open_tfds_source(NAME, local, split))
    files = _version_files(local)
    # Every file once, into a directory that mirrors the bucket path; the second split
    # was read from the same copy.
    assert sorted(copies) == files
    copy_dir = _copy_dir(tmp_path / "cache")
    assert sorted(os.listdir(copy_dir)) == sorted(files + [staging.MANIFEST])
    size = sum(os.path.getsize(os.path.join(local, NAME, "1.0.0", f)) for f in files)
    assert f"copying {len(files)} files ({size / 1e6:.1f} MB) to {copy_dir}" in caplog.text
    assert f"using the local copy in {copy_dir}" in caplog.text


def test_a_complete_local_copy_is_reused(remote_tfds, tmp_path, copies, deadline):
    from codec_jax.data import pipeline

    local, remote = remote_tfds
    pipeline.open_tfds_source(NAME, remote, "train", cache_dir=str(tmp_path))
    assert sorted(copies) == _version_files(local)
    copy_dir = _copy_dir(tmp_path)

    def stats():
        return {f: (os.stat(os.path.join(copy_dir, f)).st_ino, os.stat(os.path.join(copy_dir, f)).st_mtime_ns)
                for f in os.listdir(copy_dir)}

    before = stats()
    copies.clear()
    src = pipeline.open_tfds_source(NAME, remote, "train", cache_dir=str(tmp_path))
    assert copies == []             # nothing downloaded again
    assert stats() == before        # nor rewritten
    _assert_same_records(src, pipeline.open_tfds_source(NAME, local, "train"))
    assert sorted(os.listdir(os.path.dirname(copy_dir))) == [".1.0.0.lock", "1.0.0"]


def test_an_interrupted_or_damaged_copy_is_repaired(remote_tfds, tmp_path, monkeypatch, copies, deadline):
    import json as json_

    from codec_jax.data import pipeline, staging

    local, remote = remote_tfds
    files = _version_files(local)
    train_shard = next(f for f in files if "-train.array_record" in f)
    copy_dir = _copy_dir(tmp_path)
    parent = os.path.dirname(copy_dir)
    want = pipeline.open_tfds_source(NAME, local, "train")

    # 1. The connection drops while the validation shard is copied (one file at a time,
    # in name order: the train shard is done, the .json files have not started).
    monkeypatch.setattr(staging, "_COPY_THREADS", 1)
    counting = staging._copy_file
    validation_shard = next(f for f in files if "-validation.array_record" in f)

    def failing(src, dst, *args, **kwargs):
        if os.path.basename(dst) == validation_shard:
            with open(dst + ".part", "wb") as f:
                f.write(b"half a shard")
            raise ConnectionError("connection reset")
        return counting(src, dst, *args, **kwargs)

    monkeypatch.setattr(staging, "_copy_file", failing)
    with pytest.raises(ConnectionError):
        pipeline.open_tfds_source(NAME, remote, "train", cache_dir=str(tmp_path))
    assert not os.path.exists(copy_dir)  # no half dataset that looks like one
    (partial,) = [d for d in os.listdir(parent) if d.startswith(".1.0.0.partial-")]
    done = sorted(f for f in os.listdir(os.path.join(parent, partial)) if f in files)
    assert done == [train_shard]

    # The next start downloads only what is missing and cleans up.
    monkeypatch.setattr(staging, "_copy_file", counting)
    copies.clear()
    _assert_same_records(pipeline.open_tfds_source(NAME, remote, "train", cache_dir=str(tmp_path)), want)
    assert sorted(copies) == sorted(set(files) - set(done))
    assert sorted(os.listdir(parent)) == [".1.0.0.lock", "1.0.0"]

    # 2. A local file of the wrong size (truncated on disk) is copied again, alone.
    with open(os.path.join(copy_dir, train_shard), "r+b") as f:
        f.truncate(1000)
    copies.clear()
    _assert_same_records(pipeline.open_tfds_source(NAME, remote, "train", cache_dir=str(tmp_path)), want)
    assert copies == [train_shard]

    # 3. A copy made from another upload of the same file (the remote mtime differs
    # from the one recorded at copy time) is stale and replaced.
    manifest = os.path.join(copy_dir, staging.MANIFEST)
    with open(manifest) as f:
        recorded = json_.load(f)
    recorded["files"]["metadata.json"][1] -= 100
    with open(manifest, "w") as f:
        json_.dump(recorded, f)
    copies.clear()
    _assert_same_records(pipeline.open_tfds_source(NAME, remote, "train", cache_dir=str(tmp_path)), want)
    assert copies == ["metadata.json"]
    assert sorted(os.listdir(parent)) == [".1.0.0.lock", "1.0.0"]


def test_staging_errors_say_what_to_do(remote_tfds, tmp_path, monkeypatch, deadline):
    import collections

    from codec_jax.data import pipeline, staging

    local, remote = remote_tfds
    with pytest.raises(FileNotFoundError, match=f"not found in data_dir {remote}.*'{NAME}'"):
        pipeline.open_tfds_source("no_such_dataset", remote, cache_dir=str(tmp_path))
    usage = collections.namedtuple("usage", "total used free")
    monkeypatch.setattr(staging.shutil, "disk_usage", lambda path: usage(10**6, 10**6 - 1000, 1000))
    size = sum(os.path.getsize(os.path.join(local, NAME, "1.0.0", f)) for f in _version_files(local))
    with pytest.raises(OSError, match=f"needs {size} bytes .* 1000 bytes .* free in .*data.cache_dir"):
        pipeline.open_tfds_source(NAME, remote, cache_dir=str(tmp_path))
    assert not os.path.exists(_copy_dir(tmp_path))
    assert [d for d in os.listdir(os.path.dirname(_copy_dir(tmp_path))) if "partial" in d] == []


def test_input_pipeline_reads_tfds_sources_on_a_bucket(remote_tfds, tmp_path, deadline):
    from codec_jax.data import pipeline

    _, remote = remote_tfds
    cfg = pipeline.default_data_config()
    cfg.cache_dir = str(tmp_path)
    cfg.sources = [{"kind": "tfds", "name": NAME, "data_dir": remote, "weight": 1.0}]
    cfg.eval_sources = list(cfg.sources)  # the validation split
    cfg.with_metadata = True
    it = pipeline.create_train_iterator(cfg, global_batch_size=4, seed=0)
    try:
        batch = next(it)
    finally:
        it.close()
    assert batch["audio"].shape == (4, 24000)
    assert np.all(np.isfinite(batch["audio"])) and np.all(np.abs(batch["audio"]).max(axis=1) > 0.01)
    assert set(batch["record_index"]) <= set(range(4))
    (ev,) = list(pipeline.create_eval_iterator(cfg, batch_size=2, num_batches=1))
    assert ev["audio"].shape == (2, 24000) and set(ev["record_index"]) <= {0, 1}
    assert os.path.isfile(os.path.join(_copy_dir(tmp_path), "dataset_info.json"))
