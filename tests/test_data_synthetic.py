"""Synthetic signals (codec_jax.data.synthetic): reproducible, well-formed, band-limited."""

from __future__ import annotations

import hashlib
import subprocess
import sys

import numpy as np
import pytest

from codec_jax.data import synthetic


def _digest(arrays) -> str:
    h = hashlib.sha256()
    for a in arrays:
        h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()


def test_same_seed_same_signals_different_seed_different():
    a = [synthetic.signal_at(7, i, sample_rate=24000, num_samples=4000) for i in range(40)]
    b = [synthetic.signal_at(7, i, sample_rate=24000, num_samples=4000) for i in range(40)]
    c = [synthetic.signal_at(8, i, sample_rate=24000, num_samples=4000) for i in range(40)]
    for (ka, xa), (kb, xb) in zip(a, b):
        assert ka == kb
        np.testing.assert_array_equal(xa, xb)
    assert sum(np.array_equal(xa, xc) for (_, xa), (_, xc) in zip(a, c)) <= 2  # silence may repeat
    # Random access equals the stream, in any order.
    stream = synthetic.synthetic_stream(7, sample_rate=24000, seconds=4000 / 24000)
    for i in range(10):
        np.testing.assert_array_equal(next(stream), a[i][1])
    src = synthetic.SyntheticAudioSource(sample_rate=24000, seconds=4000 / 24000, seed=7)
    for i in (31, 3, 17):
        rec = src[i]
        assert rec["kind"] == a[i][0] and rec["sample_rate"] == 24000
        np.testing.assert_array_equal(rec["audio"][:, 0], a[i][1])
        assert rec["audio"].shape == (4000, 1)
    assert len(src) == sys.maxsize


def test_reproducible_across_processes():
    code = (
        "import numpy as np, hashlib\n"
        "from codec_jax.data import synthetic\n"
        "h = hashlib.sha256()\n"
        "for i in range(30):\n"
        "    h.update(np.ascontiguousarray(synthetic.signal_at(3, i, sample_rate=16000, num_samples=2000)[1]).tobytes())\n"
        "print(h.hexdigest())\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    here = _digest(synthetic.signal_at(3, i, sample_rate=16000, num_samples=2000)[1] for i in range(30))
    assert out.stdout.strip() == here


@pytest.mark.parametrize("sample_rate", [8000, 24000, 44100])
@pytest.mark.parametrize("kind", synthetic.KINDS)
def test_every_kind_is_well_formed(kind, sample_rate):
    n = sample_rate // 2
    for i in range(4):
        x = synthetic.generate(kind, np.random.default_rng(i), sample_rate, n)
        assert x.shape == (n,) and x.dtype == np.float32
        assert np.all(np.isfinite(x))
        peak = float(np.max(np.abs(x)))
        if kind == "silence":  # digital zero or a noise floor of -100..-70 dBFS RMS
            assert np.sqrt(np.mean(np.square(x, dtype=np.float64))) <= 10 ** (-69.5 / 20)
        else:
            # Peak drawn in [-30, -1] dBFS.
            assert 10 ** (-30.5 / 20) <= peak <= 10 ** (-0.9 / 20), (kind, peak)


@pytest.mark.parametrize("kind", ["tone", "harmonic", "chirp", "am", "fm"])
@pytest.mark.parametrize("sample_rate", [8000, 24000])
def test_tonal_kinds_do_not_alias(kind, sample_rate):
    """Partials stay below 0.45 * rate: nothing lands near Nyquist by folding."""
    n = sample_rate
    for i in range(6):
        x = synthetic.generate(kind, np.random.default_rng(100 + i), sample_rate, n).astype(np.float64)
        spec = np.abs(np.fft.rfft(x * np.hanning(n))) ** 2
        freqs = np.fft.rfftfreq(n, 1 / sample_rate)
        high = spec[freqs > 0.47 * sample_rate].sum() / spec.sum()
        assert high < 1e-4, (kind, i, high)


def test_kinds_are_all_reachable_and_validated():
    kinds = {synthetic.signal_at(0, i, sample_rate=8000, num_samples=800)[0] for i in range(200)}
    assert kinds == set(synthetic.KINDS)
    restricted = {synthetic.signal_at(0, i, sample_rate=8000, num_samples=800, kinds=("tone", "clicks"))[0]
                  for i in range(50)}
    assert restricted == {"tone", "clicks"}
    with pytest.raises(ValueError, match="unknown synthetic kind"):
        synthetic.generate("sawtooth", np.random.default_rng(0), 8000, 100)
    with pytest.raises(ValueError, match="subset"):
        synthetic.SyntheticAudioSource(sample_rate=8000, seconds=1.0, kinds=("tone", "nope"))
