"""Training against a bucket: the whole train / resume / eval / export cycle on `gs://`.

The bucket is a local Google Cloud Storage emulator (pip `gcp-storage-emulator`, in
memory, offline). Every layer reaches it through its real `gs://` code path:
etils.epath through gcsfs (`STORAGE_EMULATOR_HOST`), orbax through tensorstore's `gcs`
driver (`TENSORSTORE_GCS_HTTP_URL`), JAX's compilation cache through etils.epath and
tensorboardX through `codec_jax.training.metrics`' epath event files. Not covered: real
GCS authentication, and TFDS data dirs on `gs://` (array_record's C++ reader does not
use the emulator endpoint; see docs/cloud_tpu.md).

The full cycle is slow (two tiny runs with compilation) and is marked `slow`.
"""

from __future__ import annotations

import json
import logging
import os
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
