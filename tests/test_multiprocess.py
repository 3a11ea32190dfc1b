"""Multi-host training, proven with CPU processes on localhost.

Each worker is this file run as a script: `jax.distributed.initialize` with a local
coordinator, one CPU device per process, gloo collectives (JAX's CPU default), then the
tiny config through `train_and_evaluate`, exactly as `codec-jax train --distributed`
runs on a pod slice. The single-process reference runs the same global batch on two
fake CPU devices (`--xla_force_host_platform_device_count=2`), so the device count
and the mesh are the same and only the process boundary differs.

Workers report, in a JSON file, the batches their data iterator handed to the loop
(a hash per example) and the steps they saved checkpoints at.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

HERE = Path(__file__).resolve()
REPO = HERE.parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _env(devices: int) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = f"{REPO}{os.pathsep}{env.get('PYTHONPATH', '')}"
    env["JAX_PLATFORMS"] = "cpu"
    flags = [f for f in env.get("XLA_FLAGS", "").split() if "device_count" not in f]
    env["XLA_FLAGS"] = " ".join(flags + [f"--xla_force_host_platform_device_count={devices}"])
    return env


def launch(mode: str, workdir: Path, report: Path, *, processes: int, devices: int = 1,
           steps: int = 3, cache: Path | None = None) -> list[subprocess.Popen]:
    """Start `processes` workers (`devices` CPU devices each) of one job."""
    port = _free_port()
    procs = []
    for pid in range(processes):
        args = [sys.executable, str(HERE), mode, str(workdir), f"{report}.{pid}",
                str(pid), str(processes), str(port), str(steps), str(cache or "")]
        log = open(f"{report}.{pid}.log", "w")
        proc = subprocess.Popen(args, env=_env(devices), cwd=REPO, stdout=log,
                                stderr=subprocess.STDOUT)
        proc.log_path = log.name
        procs.append(proc)
    return procs


def wait(procs, timeout: float = 1800, ok=(0,)) -> list[str]:
    """Wait for every worker; their outputs. The timeout is generous because each
    worker compiles the GAN step on a shared CPU."""
    deadline = time.monotonic() + timeout
    try:
        for p in procs:
            p.wait(timeout=max(deadline - time.monotonic(), 1))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    outs = [Path(p.log_path).read_text() for p in procs]
    for p, out in zip(procs, outs):
        assert p.returncode in ok, f"worker exited {p.returncode}:\n{out[-4000:]}"
    return outs


def reports(report: Path, n: int) -> list[dict]:
    return [json.loads(Path(f"{report}.{i}").read_text()) for i in range(n)]


def read_metrics(workdir: Path) -> list[dict]:
    return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


def export_params(workdir: Path) -> dict:
    import jax

    import codec_jax

    codec = codec_jax.load_pretrained(str(workdir / "export"))
    flat, _ = jax.tree_util.tree_flatten_with_path(codec.variables)
    return {jax.tree_util.keystr(k): np.asarray(v) for k, v in flat}


# --------------------------------------------------------------------------- worker


def _hash(x: np.ndarray) -> str:
    return hashlib.sha1(np.ascontiguousarray(x).tobytes()).hexdigest()[:16]


def worker(mode, workdir, report, pid, nproc, port, steps, cache) -> None:
    import jax

    nproc, pid, steps = int(nproc), int(pid), int(steps)
    if nproc > 1:
        # A long heartbeat timeout: a worker compiling on a busy CPU can go silent for
        # minutes, and the coordination service would declare it dead (seen at 100 s).
        jax.distributed.initialize(f"localhost:{port}", num_processes=nproc, process_id=pid,
                                   heartbeat_timeout_seconds=1200)
    from codec_jax.configs import tiny
    from codec_jax.data import pipeline
    from codec_jax.training import checkpoint as ckpt_lib
    from codec_jax.training import loop

    seen: list[list[str]] = []
    saved: list[int] = []

    class Recording(pipeline.PipelineIterator):
        """The loop's data iterator, recording each example it hands over."""

        def __next__(self):
            batch = super().__next__()
            seen.append([_hash(x) for x in batch["audio"]])
            return batch

    class ShardsOfTwo(pipeline.PipelineIterator):
        """One process feeding the global batch that processes 0 and 1 of 2 would."""

        def __init__(self, shards):
            self.shards = shards
            super().__init__(shards[0])

        def __next__(self):
            parts = [next(s) for s in self.shards]
            return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}

        def get_state(self):
            return {"shards": [s.get_state() for s in self.shards]}

        def set_state(self, state):
            for s, st in zip(self.shards, state["shards"]):
                s.set_state(st)

        def close(self):
            self._closed = True
            for s in self.shards:
                s.close()

    make_iterator = pipeline.create_train_iterator

    def create_train_iterator(cfg, *, global_batch_size, seed, process_index=0, process_count=1):
        if mode == "reference":
            return Recording(ShardsOfTwo([
                make_iterator(cfg, global_batch_size=global_batch_size, seed=seed,
                              process_index=i, process_count=2) for i in range(2)]))
        return Recording(make_iterator(cfg, global_batch_size=global_batch_size, seed=seed,
                                       process_index=process_index, process_count=process_count))

    pipeline.create_train_iterator = create_train_iterator
    original_save = ckpt_lib.TrainCheckpointer.save

    def save(self, step, *args, **kwargs):
        saved.append(int(step))
        return original_save(self, step, *args, **kwargs)

    ckpt_lib.TrainCheckpointer.save = save
    loop.TrainCheckpointer = ckpt_lib.TrainCheckpointer

    c = tiny.get_config()
    c.train.num_steps = steps
    c.train.compilation_cache_dir = cache
    c.logging.every_steps = 1
    c.logging.eval_every_steps = 0
    c.checkpoint.every_steps = 2
    c.checkpoint.keep = 5
    c.data.prefetch = 0
    from codec_jax.errors import Preempted

    try:
        loop.train_and_evaluate(c, workdir)
    except Preempted as e:  # as `codec-jax train` does: the status asks for a restart
        print(f"worker: {e}", flush=True)
        sys.exit(e.exit_code)
    finally:
        Path(report).write_text(json.dumps({
            "process_index": jax.process_index(), "process_count": jax.process_count(),
            "devices": jax.device_count(), "seen": seen, "saved": saved}))


# --------------------------------------------------------------------------- tests


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("xla_cache")


@pytest.mark.long
def test_two_processes_equal_one_and_checkpoints_move_between_group_sizes(tmp_path, cache):
    multi, ref = tmp_path / "multi", tmp_path / "reference"
    procs = launch("train", multi, tmp_path / "multi.json", processes=2, cache=cache)
    procs += launch("reference", ref, tmp_path / "ref.json", processes=1, devices=2, cache=cache)
    wait(procs)
    (r0, r1), (rr,) = reports(tmp_path / "multi.json", 2), reports(tmp_path / "ref.json", 1)
    assert (r0["process_count"], r0["devices"], rr["process_count"], rr["devices"]) == (2, 2, 1, 2)

    # (a) disjoint shares of the data, which together are the reference's global batch.
    assert len(r0["seen"]) == len(r1["seen"]) == 3
    assert not set(sum(r0["seen"], [])) & set(sum(r1["seen"], []))
    assert [a + b for a, b in zip(r0["seen"], r1["seen"])] == rr["seen"]

    # (b) the same losses at every step, and the same final parameters.
    rows, ref_rows = read_metrics(multi), read_metrics(ref)
    assert [r["step"] for r in rows] == [1, 2, 3]  # (e) one writer: no duplicate rows
    for row, ref_row in zip(rows, ref_rows):
        for key in ("train/loss/mel", "train/loss/generator", "train/loss/discriminator"):
            np.testing.assert_allclose(row[key], ref_row[key], rtol=1e-5, err_msg=key)
    params, ref_params = export_params(multi), export_params(ref)
    assert params.keys() == ref_params.keys()
    for key in params:
        np.testing.assert_allclose(params[key], ref_params[key], rtol=1e-4, atol=1e-6,
                                   err_msg=key)
    # (e) only process 0 wrote the metrics, TensorBoard and config files.
    assert len(list((multi / "tensorboard").glob("events.out.tfevents.*"))) == 1
    assert r0["saved"] == r1["saved"] == [2, 3]

    # (c) the 2-process checkpoint resumes in a group of one process and one device.
    procs = launch("train", multi, tmp_path / "resumed.json", processes=1, steps=5, cache=cache)
    (out,) = wait(procs)
    assert "resumed from" in out and "(step 3)" in out, out[-2000:]
    assert "data iterators start afresh" in out
    (resumed,) = reports(tmp_path / "resumed.json", 1)
    assert resumed["devices"] == 1 and resumed["saved"] == [4, 5]
    assert [r["step"] for r in read_metrics(multi)] == [1, 2, 3, 4, 5]


@pytest.mark.long
def test_sigterm_to_one_process_stops_every_process_at_the_same_step(tmp_path, cache):
    workdir = tmp_path / "run"
    procs = launch("train", workdir, tmp_path / "r.json", processes=2, steps=1000, cache=cache)
    deadline = time.monotonic() + 600
    metrics = workdir / "metrics.jsonl"
    while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 2):
        assert time.monotonic() < deadline and all(p.poll() is None for p in procs)
        time.sleep(1)
    procs[1].send_signal(signal.SIGTERM)
    # 143 = 128 + SIGTERM: the preempted job asks its scheduler for a restart.
    outs = wait(procs, ok=(0, 143))
    r0, r1 = reports(tmp_path / "r.json", 2)
    assert r0["saved"] and r0["saved"] == r1["saved"], (r0["saved"], r1["saved"])
    stop = r0["saved"][-1]
    assert stop < 1000 and len(r0["seen"]) == len(r1["seen"]) == stop
    assert f"checkpoint {stop} saved" in outs[0]


def test_global_batch_is_assembled_from_disjoint_process_shards(tmp_path):
    """Fast check without the GAN step: two processes build `[4, samples]` global
    batches from their own pipeline shards; a jitted reduction over the global array
    sees both shards."""
    procs = launch("batch", tmp_path, tmp_path / "b.json", processes=2)
    wait(procs, timeout=600)
    r0, r1 = reports(tmp_path / "b.json", 2)
    assert r0["process_count"] == 2 and r0["devices"] == 2
    assert not set(r0["seen"]) & set(r1["seen"])
    total = r0["local_sum"] + r1["local_sum"]
    assert r0["global_sum"] == pytest.approx(total, rel=1e-5)
    assert r1["global_sum"] == pytest.approx(total, rel=1e-5)


def batch_worker(workdir, report, pid, nproc, port) -> None:
    import jax
    import jax.numpy as jnp

    jax.distributed.initialize(f"localhost:{port}", num_processes=int(nproc),
                               process_id=int(pid), heartbeat_timeout_seconds=1200)
    from codec_jax.configs import tiny
    from codec_jax.data import pipeline
    from codec_jax.training import sharding

    cfg = tiny.get_config()
    it = pipeline.create_train_iterator(cfg.data, global_batch_size=4, seed=0,
                                        process_index=jax.process_index(),
                                        process_count=jax.process_count())
    seen, local_sum, global_sum = [], 0.0, 0.0
    mesh = sharding.create_mesh(-1, 1)
    for _ in range(3):
        local = next(it)
        seen += [_hash(x) for x in local["audio"]]
        local_sum += float(np.abs(local["audio"]).astype(np.float64).sum())
        batch = sharding.make_global_batch(local, mesh)
        assert batch["audio"].shape[0] == 4
        global_sum += float(jax.jit(lambda a: jnp.abs(a).sum())(batch["audio"]))
    it.close()
    Path(report).write_text(json.dumps({
        "process_count": jax.process_count(), "devices": jax.device_count(), "seen": seen,
        "local_sum": local_sum, "global_sum": global_sum}))


if __name__ == "__main__":
    mode = sys.argv[1]
    if mode == "batch":
        batch_worker(*sys.argv[2:7])
    else:
        worker(mode, *sys.argv[2:9])
