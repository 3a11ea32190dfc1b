"""The command-line tools, end to end on generated audio (the library is tests/test_corpus.py)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import soundfile as sf

import codec_jax
from codec_jax import cli, get_preset

from snac_reference import build_reference, make_signals, save_hub_directory

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FAST = ["--window-seconds", "2.25", "--buckets", "2", "--batch-size", "2", "--no-progress"]


def _run(*args):
    return cli.main([str(a) for a in args])


def _env():
    return {**os.environ, "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", ""),
            "JAX_PLATFORMS": "cpu"}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    config = get_preset("tiny").to_dict()
    return save_hub_directory(build_reference(config, seed=1), config,
                              str(tmp_path_factory.mktemp("snac")))


def _tone(path, seconds, sr, channels=1, seed=0):
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(path, 0.5 * make_signals("speech", channels, int(seconds * sr), sr, seed).T, sr)


@pytest.mark.slow
def test_encode_decode_directory_round_trip_with_a_bad_file(tmp_path, model_dir):
    _tone(tmp_path / "in/a/x.wav", 1.3, 22050, channels=2)  # resampled and mixed on read
    _tone(tmp_path / "in/b/x.wav", 0.5, 16000, seed=1)       # same stem, other folder
    (tmp_path / "in/b/broken.wav").write_bytes(b"RIFF0000WAVEjunk")
    codes = tmp_path / "codes"
    rc = _run("encode", model_dir, tmp_path / "in", "-o", codes, "--workers", "2", *FAST)
    assert rc == 1  # one file failed, the others are all coded
    report = json.loads((codes / "encode_report.json").read_text())
    assert [f["path"].endswith("broken.wav") for f in report["failed"]] == [True]
    a = codec_jax.load_codes(codes / "a/x.wav.snac")
    assert a.original_sample_rate == 22050 and a.channels == 1
    assert abs(a.length - 1.3 * 16000) <= 1 and a.codes[0].dtype == np.uint8
    assert (codes / "b/x.wav.snac").exists()
    mode = (codes / "b/x.wav.snac").stat().st_mode & 0o777
    assert mode == 0o666 & ~_umask()
    out = tmp_path / "out"
    assert _run("decode", model_dir, codes, "-o", out, "--audio-format", "flac", *FAST) == 0
    audio, sr = sf.read(out / "a/x.flac")
    assert sr == 16000 and audio.shape == (a.length,)
    # An existing output is kept: the rerun does nothing and succeeds.
    before = (out / "a/x.flac").read_bytes()
    assert _run("decode", model_dir, codes, "-o", out, "--audio-format", "flac", *FAST) == 0
    assert (out / "a/x.flac").read_bytes() == before
    assert not [n for _, _, ns in os.walk(tmp_path) for n in ns if n.endswith(".tmp")]


def _umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_usage_errors_come_before_any_work(tmp_path, capsys):
    # The output format is checked before the (nonexistent) model would be loaded.
    assert _run("decode", "no-such-model", tmp_path, "-o", tmp_path / "o",
                "--audio-format", "xyz") == 2
    assert "cannot write audio as '.xyz'" in capsys.readouterr().err
    assert _run("encode", "tiny", tmp_path / "missing.wav", "-o", tmp_path / "o") == 2
    assert "no such file" in capsys.readouterr().err
    assert _run("no-such-command") == 2


def test_help_does_not_import_jax():
    code = ("import sys, contextlib, io\n"
            "from codec_jax import cli\n"
            "for cmd in ('encode', 'decode'):\n"
            "    with contextlib.redirect_stdout(io.StringIO()) as out:\n"
            "        try: cli.main([cmd, '--help'])\n"
            "        except SystemExit: pass\n"
            "    assert '--batch-size' in out.getvalue(), out.getvalue()\n"
            "print('jax' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env=_env(), cwd=REPO)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"
    out = subprocess.run([sys.executable, "-m", "codec_jax", "--help"], capture_output=True,
                         text=True, env=_env(), cwd=REPO)
    assert out.returncode == 0 and "encode" in out.stdout and "train" in out.stdout


def test_roundtrip_command(tmp_path, model_dir, capsys):
    _tone(tmp_path / "in.wav", 0.7, 16000)
    assert _run("roundtrip", model_dir, tmp_path / "in.wav", "-o", tmp_path / "rt.wav") == 0
    assert "SNR" in capsys.readouterr().out
    audio, sr = sf.read(tmp_path / "rt.wav")
    assert sr == 16000 and len(audio) == int(0.7 * 16000)
    assert _run("roundtrip", model_dir, tmp_path / "in.wav", "-o", tmp_path / "rt.wav") == 2


@pytest.mark.long
def test_sigterm_leaves_no_partial_files_and_the_rerun_finishes(tmp_path, model_dir):
    for i in range(40):
        _tone(tmp_path / f"in/{i:02d}.wav", 0.3 + 0.05 * i, 16000, seed=i)
    cmd = [sys.executable, "-m", "codec_jax", "encode", model_dir, str(tmp_path / "in"),
           "-o", str(tmp_path / "codes"), "--format", "shards", "--shard-size", "4",
           "--workers", "1", "--batch-size", "1", "--window-seconds", "2.25", "--buckets", "2",
           "--no-progress"]
    proc = subprocess.Popen(cmd, env=_env(), cwd=REPO, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 600
    while time.time() < deadline and proc.poll() is None:
        names = os.listdir(tmp_path / "codes") if (tmp_path / "codes").exists() else []
        if any(n.endswith(".tmp") for n in names):  # mid-shard: the worst moment to die
            break
        time.sleep(0.05)
    assert proc.poll() is None, proc.stderr.read()
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130 and "interrupted" in err
    names = os.listdir(tmp_path / "codes")
    assert not [n for n in names if n.endswith(".tmp")]
    # Every shard left is finished (has its index) and readable.
    shards = [n for n in names if n.endswith(".array_record")]
    assert all(n + ".index.json" in names for n in shards)
    rerun = subprocess.run(cmd, env=_env(), cwd=REPO, capture_output=True, text=True)
    assert rerun.returncode == 0, rerun.stderr
    from codec_jax import corpus

    got = [corpus.read_shard_record(r).source for r in corpus.open_shards(str(tmp_path / "codes"))]
    assert sorted(got) == [f"{i:02d}.wav" for i in range(40)]  # every file exactly once


@pytest.mark.long
def test_two_processes_split_the_corpus_and_match_one_process(tmp_path, model_dir):
    """jax.distributed on CPU: each process codes a disjoint share into the same OUTDIR."""
    import socket

    for i in range(7):
        _tone(tmp_path / f"in/{i}.wav", 0.2 + 0.3 * i, 16000, seed=i)
    with socket.socket() as s:
        s.bind(("localhost", 0))
        port = s.getsockname()[1]
    base = [sys.executable, "-m", "codec_jax", "encode", model_dir, str(tmp_path / "in"),
            "--format", "shards", "--workers", "0", *FAST]
    procs = [subprocess.Popen(base + ["-o", str(tmp_path / "multi"),
                                      "--coordinator-address", f"localhost:{port}",
                                      "--num-processes", "2", "--process-id", str(i)],
                              env=_env(), cwd=REPO, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True)
             for i in range(2)]
    outs = [p.communicate(timeout=900)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    single = subprocess.run(base + ["-o", str(tmp_path / "single")], env=_env(), cwd=REPO,
                            capture_output=True, text=True)
    assert single.returncode == 0, single.stderr
    from codec_jax import corpus

    def records(d):
        out = {}
        for r in corpus.open_shards(str(d)):
            rec = corpus.read_shard_record(r)
            assert rec.source not in out  # coded exactly once
            out[rec.source] = rec
        return out

    multi, one = records(tmp_path / "multi"), records(tmp_path / "single")
    assert sorted(multi) == sorted(one) == [f"{i}.wav" for i in range(7)]
    for name in one:
        for a, b in zip(multi[name].codes, one[name].codes):
            np.testing.assert_array_equal(a, b)
    names = os.listdir(tmp_path / "multi")
    assert any(n.startswith("shard-p000-") for n in names)
    assert any(n.startswith("shard-p001-") for n in names)
    reports = [json.loads((tmp_path / "multi" / f"encode_report.process-00{i}.json").read_text())
               for i in range(2)]
    assert sum(r["done"] for r in reports) == 7 and all(r["process_count"] == 2 for r in reports)
