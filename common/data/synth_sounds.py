"""Procedural sounds of the synthetic dataset's classes: one recipe per class, seeded per clip.

Why procedural: no machine here can download ESC-50, yet the pipeline must learn something real. Each
class has its own recipe (pitch contour, rhythm, noise colour, envelope, harmonic structure); every clip
draws its own parameters (pitch, tempo, event count and timing, timbre, level) and gets background noise
of random colour and SNR, so classes are separable but a model has to look at more than loudness. All
randomness comes from a generator seeded with ``(seed, class name, clip index)``: a clip does not change
when other classes are added, and the same seed gives identical samples. :mod:`common.data.synth` writes
them in the dataset layouts.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable

import numpy as np

from .clips import DatasetError

__all__ = ["DEFAULT_NUM_CLASSES", "SYNTH_CLASSES", "clip_rng", "synth_classes", "synthesize_clip"]

Signal = np.ndarray  # float64, shape (n,)


# ----------------------------------------------------------------------------------------------- signal helpers
def _t(n: int, sr: int) -> np.ndarray:
    return np.arange(n) / sr


def _norm(x: Signal) -> Signal:
    return x / (np.sqrt(np.mean(x * x)) + 1e-12)


def _noise(rng: np.random.Generator, n: int, sr: int, lo: float = 0.0, hi: float | None = None,
           alpha: float = 0.0) -> Signal:
    """Unit-RMS noise, band-limited to [lo, hi] Hz with smooth skirts and power slope 1/f**alpha."""
    spec = np.fft.rfft(rng.standard_normal(n))
    f = np.maximum(np.fft.rfftfreq(n, 1.0 / sr), 1.0)
    gain = f ** (-alpha / 2.0)
    if lo > 0:
        gain = gain / (1.0 + (lo / f) ** 4)
    if hi is not None:
        gain = gain / (1.0 + (f / min(hi, 0.45 * sr)) ** 4)
    return _norm(np.fft.irfft(spec * gain, n))


def _smooth_random(rng: np.random.Generator, n: int, sr: int, rate_hz: float, lo: float, hi: float) -> Signal:
    """A slowly wandering curve in [lo, hi] (random knots every 1/rate_hz s, cosine-interpolated)."""
    knots = max(2, int(np.ceil(n / sr * rate_hz)) + 2)
    values = rng.uniform(lo, hi, knots)
    pos = np.arange(n) / (n - 1 if n > 1 else 1) * (knots - 1)
    i = np.minimum(pos.astype(np.int64), knots - 2)
    w = 0.5 - 0.5 * np.cos(np.pi * (pos - i))
    return values[i] * (1 - w) + values[i + 1] * w


def _table(amps: np.ndarray, phases: np.ndarray, size: int = 2048) -> np.ndarray:
    """One period of a waveform with the given harmonic amplitudes (last sample repeats the first for interp)."""
    k = np.arange(1, len(amps) + 1)[:, None]
    ph = 2 * np.pi * np.arange(size)[None, :] / size
    table = (amps[:, None] * np.sin(k * ph + phases[:, None])).sum(axis=0)
    return np.append(table, table[0])


def _harmonics(rng: np.random.Generator, fmax: float, sr: int, tilt: float, limit: int = 40,
               jitter: float = 0.3, odd_only: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Harmonic amplitudes ~ k**-tilt (randomly perturbed), truncated below Nyquist for the highest f0."""
    count = int(max(1, min(limit, 0.45 * sr // max(fmax, 1.0))))
    k = np.arange(1, count + 1)
    amps = k ** (-tilt) * (1 + jitter * rng.uniform(-1, 1, count))
    if odd_only:
        amps[k % 2 == 0] *= 0.05
    return amps, rng.uniform(0, 2 * np.pi, count)


def _osc(freq: Signal | float, n: int, sr: int, table: np.ndarray, phase0: float = 0.0) -> Signal:
    """Wavetable oscillator: cost is O(n) whatever the number of harmonics, which keeps generation fast."""
    freq = np.broadcast_to(np.asarray(freq, dtype=np.float64), (n,))
    cycles = phase0 + np.cumsum(freq) / sr
    pos = (cycles % 1.0) * (len(table) - 1)
    i = pos.astype(np.int64)
    frac = pos - i
    return table[i] * (1 - frac) + table[i + 1] * frac


def _tone(rng: np.random.Generator, freq: Signal | float, n: int, sr: int, tilt: float, limit: int = 40,
          odd_only: bool = False) -> Signal:
    fmax = float(np.max(freq))
    amps, phases = _harmonics(rng, fmax, sr, tilt, limit, odd_only=odd_only)
    return _osc(freq, n, sr, _table(amps, phases), rng.uniform())


def _ring(sr: int, freq: float, decay_s: float, length_s: float, phase: float = 0.0) -> Signal:
    """Exponentially decaying sinusoid (a struck resonance)."""
    t = _t(max(1, int(length_s * sr)), sr)
    return np.exp(-t / decay_s) * np.sin(2 * np.pi * min(freq, 0.45 * sr) * t + phase)


def _ad_env(m: int, sr: int, attack_s: float, release_s: float) -> Signal:
    """Attack/sustain/release envelope over m samples."""
    env = np.ones(m)
    a = min(m, max(1, int(attack_s * sr)))
    r = min(m - a, max(1, int(release_s * sr)))
    env[:a] = np.linspace(0, 1, a)
    if r > 0:
        env[m - r:] = np.linspace(1, 0, r)
    return env


def _onsets(rng: np.random.Generator, count: int, dur: float, length: float, min_gap: float) -> np.ndarray:
    """Sorted random start times (s) of `count` events of `length` s, at least `min_gap` s apart, inside the clip."""
    span = dur - length
    if span <= 0:
        return np.zeros(1)
    count = max(1, min(count, int(span / min_gap) + 1))
    free = span - (count - 1) * min_gap
    return np.sort(rng.uniform(0, free, count)) + np.arange(count) * min_gap


def _add(out: Signal, start_s: float, seg: Signal, sr: int) -> None:
    start = int(start_s * sr)
    if start >= len(out):
        return
    seg = seg[: len(out) - start]
    out[start:start + len(seg)] += seg


def _events(n: int, positions: np.ndarray, amps: np.ndarray, kernel: Signal) -> Signal:
    """Place many scaled copies of one kernel at sample positions (a sparse convolution, via bincount)."""
    keep = (positions >= 0) & (positions < n)
    positions, amps = positions[keep].astype(np.int64), amps[keep]
    if len(positions) * len(kernel) > 20_000_000:  # dense: FFT convolution of the impulse train is cheaper
        train = np.bincount(positions, weights=amps, minlength=n)
        nfft = 1 << int(np.ceil(np.log2(n + len(kernel) - 1)))
        return np.fft.irfft(np.fft.rfft(train, nfft) * np.fft.rfft(kernel, nfft), nfft)[:n]
    index = (positions[:, None] + np.arange(len(kernel))[None, :]).ravel()
    weights = (amps[:, None] * kernel[None, :]).ravel()
    return np.bincount(index, weights=weights, minlength=n + len(kernel))[:n]


def _poisson_positions(rng: np.random.Generator, n: int, sr: int, rate_hz: float,
                       density: Signal | None = None) -> np.ndarray:
    """Event positions (samples) of a Poisson process; `density` in [0, 1] thins it over time (clustering)."""
    count = rng.poisson(rate_hz * n / sr)
    pos = rng.integers(0, n, count)
    if density is not None and count:
        pos = pos[rng.uniform(size=count) < density[pos]]
    return pos


# ----------------------------------------------------------------------------------------------------- recipes
def _dog(rng: np.random.Generator, n: int, sr: int) -> Signal:
    """Short harmonic barks: random count/timing, f0 300-700 Hz with a rise-fall contour, a noisy formant."""
    out, dur = np.zeros(n), n / sr
    f0_base = rng.uniform(300, 700)
    tilt = rng.uniform(0.8, 1.4)
    for start in _onsets(rng, int(rng.integers(1, 7)), dur, 0.3, rng.uniform(0.25, 0.6)):
        length = min(rng.uniform(0.12, 0.3), dur)
        m = int(length * sr)
        tau = np.linspace(0, 1, m)
        f0 = f0_base * rng.uniform(0.9, 1.1) * (1 + 0.3 * np.sin(np.pi * tau * 0.7) - 0.25 * tau)
        body = _tone(rng, f0, m, sr, tilt, limit=25) + 0.35 * _noise(rng, m, sr, 600, 2500)
        env = _ad_env(m, sr, 0.008, 0.0) * np.exp(-tau * rng.uniform(1.5, 4))
        _add(out, start, body * env * rng.uniform(0.6, 1.0), sr)
    return out


def _rooster(rng: np.random.Generator, n: int, sr: int) -> Signal:
    """Cock-a-doodle-doo: 1-2 long calls of four syllables with a fixed pitch pattern, harsh harmonics, vibrato."""
    out, dur = np.zeros(n), n / sr
    f0_base = rng.uniform(450, 800)
    for start in _onsets(rng, int(rng.integers(1, 3)), dur, min(1.6, 0.9 * dur), 1.8):
        length = min(rng.uniform(1.0, 1.6), 0.9 * dur)
        pattern = np.array([1.0, 1.2, 1.3, 1.1]) * rng.uniform(0.95, 1.05, 4)
        shares = np.array([0.13, 0.15, 0.2, 0.52]) * rng.uniform(0.8, 1.2, 4)
        shares = shares / shares.sum()
        for syllable, (p, share, t0) in enumerate(zip(pattern, shares, np.cumsum(np.r_[0, shares])[:-1])):
            m = max(1, int(share * length * sr * 0.92))
            tau = np.linspace(0, 1, m)
            f0 = f0_base * p * (1 + 0.02 * np.sin(2 * np.pi * rng.uniform(6, 9) * tau * m / sr))
            if syllable == len(pattern) - 1:
                f0 = f0 * (1 - 0.25 * tau**2)  # the long falling "doo"
            body = _tone(rng, f0, m, sr, rng.uniform(0.5, 0.9), limit=20)
            body *= 1 + 0.3 * _noise(rng, m, sr, 50, 400)  # throat roughness
            _add(out, start + t0 * length, body * _ad_env(m, sr, 0.02, 0.04), sr)
    return out


def _siren(rng: np.random.Generator, n: int, sr: int) -> Signal:
    """Continuous tone sweeping between two pitches: slow 'wail' or fast 'yelp'."""
    t = _t(n, sr)
    f_lo = rng.uniform(500, 900)
    f_hi = f_lo * rng.uniform(1.6, 2.2)
    if rng.uniform() < 0.5:
        sweep = 0.5 - 0.5 * np.cos(2 * np.pi * rng.uniform(0.15, 0.45) * t + rng.uniform(0, 2 * np.pi))
    else:
        sweep = (rng.uniform(1.5, 4.0) * t + rng.uniform()) % 1.0  # saw-tooth yelp
    f0 = f_lo + (f_hi - f_lo) * sweep
    level = np.linspace(rng.uniform(0.4, 1), rng.uniform(0.4, 1), n)  # approaching / receding
    return _tone(rng, f0, n, sr, rng.uniform(1.2, 2.0), limit=6) * level


def _engine(rng: np.random.Generator, n: int, sr: int) -> Signal:
    """Low harmonic drone (25-70 Hz firing rate) with cylinder AM, rpm drift and low rumble."""
    f0 = rng.uniform(25, 70) * _smooth_random(rng, n, sr, 0.5, 0.94, 1.06)
    drone = _tone(rng, f0, n, sr, rng.uniform(0.5, 1.0), limit=40)
    am = 1 + rng.uniform(0.2, 0.5) * np.sin(2 * np.pi * np.cumsum(f0 / 2) / sr)
    rumble = _noise(rng, n, sr, 20, rng.uniform(300, 700), alpha=1.0)
    return drone * am + rng.uniform(0.2, 0.6) * rumble


def _rain(rng: np.random.Generator, n: int, sr: int) -> Signal:
    """Broadband hiss (slowly fluctuating) plus many droplet 'pings' at random pitches."""
    hiss = _noise(rng, n, sr, rng.uniform(300, 1000), None, alpha=rng.uniform(0.0, 0.8))
    hiss *= _smooth_random(rng, n, sr, 1.0, 0.7, 1.0)
    drops = np.zeros(n)
    for _ in range(3):
        kernel = _ring(sr, rng.uniform(1500, 5000), rng.uniform(0.002, 0.008), 0.03)
        pos = _poisson_positions(rng, n, sr, rng.uniform(10, 50))
        drops += _events(n, pos, rng.exponential(1.0, len(pos)), kernel)
    return rng.uniform(0.3, 0.7) * hiss + _norm(drops) * rng.uniform(0.3, 0.8)


def _clock_tick(rng: np.random.Generator, n: int, sr: int) -> Signal:
    """Regular clicks at a random rate (1-4 per second), alternating 'tick' and 'tock' resonances."""
    out, dur = np.zeros(n), n / sr
    period = 1.0 / rng.uniform(1.0, 4.0)
    f_tick = rng.uniform(2000, 4500)
    tock_ratio = rng.uniform(0.7, 0.9)
    times = np.arange(rng.uniform(0, period), dur, period)
    for i, start in enumerate(times + rng.normal(0, 0.002, len(times))):
        f = f_tick * (1.0 if i % 2 == 0 else tock_ratio)
        click = _ring(sr, f, rng.uniform(0.002, 0.006), 0.03)
        overtone = _ring(sr, 2.7 * f, 0.0015, 0.01)
        click[: len(overtone)] += 0.5 * overtone
        _add(out, max(0.0, start), click * rng.uniform(0.8, 1.0), sr)
    return out


def _chirping_birds(rng: np.random.Generator, n: int, sr: int) -> Signal:
    """1-3 birds, each singing trains of fast FM chirps (2.5-7 kHz sweeps or trills)."""
    out, dur = np.zeros(n), n / sr
    for _ in range(int(rng.integers(1, 4))):
        f_center = rng.uniform(2500, 6000)
        style = rng.integers(0, 3)  # 0 up-sweep, 1 down-sweep, 2 trill
        start = rng.uniform(0, 0.3 * dur)
        while start < dur:
            length = rng.uniform(0.04, 0.15)
            m = int(length * sr)
            tau = np.linspace(0, 1, m)
            if style == 0:
                f = f_center * (0.7 + 0.6 * tau**1.5)
            elif style == 1:
                f = f_center * (1.3 - 0.6 * tau)
            else:
                f = f_center * (1 + 0.15 * np.sin(2 * np.pi * rng.uniform(20, 40) * tau * length))
            f = np.minimum(f * rng.uniform(0.93, 1.07), 0.45 * sr)
            chirp = np.sin(2 * np.pi * np.cumsum(f) / sr) * np.sin(np.pi * tau) ** 2
            _add(out, start, chirp * rng.uniform(0.3, 1.0), sr)
            start += length + rng.uniform(0.03, 0.35) + (rng.uniform(0.3, 1.0) if rng.uniform() < 0.15 else 0)
    return out


def _church_bells(rng: np.random.Generator, n: int, sr: int) -> Signal:
    """Repeated strikes of one bell: inharmonic partials (hum, prime, tierce, ...) with long, unequal decays."""
    dur = n / sr
    base = rng.uniform(180, 500)
    ratios = np.array([0.5, 1.0, 1.19, 1.5, 2.0, 2.51, 2.66, 3.01, 4.1]) * rng.uniform(0.99, 1.01, 9)
    length = min(dur, 3.0)
    kernel = np.zeros(int(length * sr))
    for i, r in enumerate(ratios):
        decay = rng.uniform(1.0, 2.5) / (1 + 0.35 * i)
        kernel += rng.uniform(0.3, 1.0) / (1 + 0.2 * i) * _ring(sr, base * r, decay, length, rng.uniform(0, 6.28))
    period = rng.uniform(0.7, 1.8)
    times = np.arange(rng.uniform(0, 0.5), dur, period)
    pos = (times * sr).astype(np.int64)
    return _events(n, pos, rng.uniform(0.6, 1.0, len(pos)), kernel)


def _crackling_fire(rng: np.random.Generator, n: int, sr: int) -> Signal:
    """Sparse, clustered broadband crackles with heavy-tailed loudness over a brown-noise roar."""
    roar = _noise(rng, n, sr, 30, rng.uniform(300, 800), alpha=2.0)
    density = _smooth_random(rng, n, sr, 3.0, 0.0, 1.0) ** 2
    crackle = np.zeros(n)
    for _ in range(3):
        m = max(2, int(rng.uniform(0.0005, 0.003) * sr))
        kernel = rng.standard_normal(m) * np.exp(-np.linspace(0, 5, m))
        pos = _poisson_positions(rng, n, sr, rng.uniform(10, 40), density)
        crackle += _events(n, pos, rng.pareto(2.0, len(pos)) + 0.2, kernel)
    return rng.uniform(0.2, 0.5) * roar + _norm(crackle + 1e-9)


def _car_horn(rng: np.random.Generator, n: int, sr: int) -> Signal:
    """1-3 sustained honks of two simultaneous square-ish tones (about a minor/major third apart)."""
    out, dur = np.zeros(n), n / sr
    f1 = rng.uniform(350, 480)
    f2 = f1 * rng.uniform(1.18, 1.3)
    for start in _onsets(rng, int(rng.integers(1, 4)), dur, 0.5, 0.7):
        length = min(rng.uniform(0.3, 1.5), dur - start)
        m = max(1, int(length * sr))
        bend = 1 - 0.03 * np.exp(-np.arange(m) / (0.02 * sr))
        honk = _tone(rng, f1 * bend, m, sr, 1.0, limit=30, odd_only=True)
        honk += _tone(rng, f2 * bend, m, sr, 1.0, limit=30, odd_only=True)
        _add(out, start, honk * _ad_env(m, sr, 0.01, 0.03), sr)
    return out


def _helicopter(rng: np.random.Generator, n: int, sr: int) -> Signal:
    """Periodic blade slap (4-8 Hz) of low noise bursts, rotor hum and a faint turbine whine; fly-by swell."""
    t = _t(n, sr)
    rate = rng.uniform(4, 8)
    m = int(0.04 * sr)
    kernel = _noise(rng, m, sr, 60, 900, alpha=1.0) * np.exp(-np.linspace(0, 6, m))
    times = np.arange(rng.uniform(0, 1 / rate), n / sr, 1 / rate)
    times = np.clip(times + rng.normal(0, 0.003, len(times)), 0, None)
    slap = _events(n, (times * sr).astype(np.int64), np.ones(len(times)), kernel)
    hum = _tone(rng, rate * rng.integers(3, 6), n, sr, 1.0, limit=10)
    whine = np.sin(2 * np.pi * rng.uniform(1200, 3000) * t)
    swell = 0.5 + 0.5 * np.exp(-((t - rng.uniform(0, n / sr)) / rng.uniform(1.0, 4.0)) ** 2)
    return (_norm(slap) + 0.3 * _norm(hum) + rng.uniform(0.02, 0.1) * whine) * swell


def _door_wood_knock(rng: np.random.Generator, n: int, sr: int) -> Signal:
    """1-2 groups of 2-5 knocks: damped low wood resonances plus a short click."""
    out, dur = np.zeros(n), n / sr
    f_body, f_panel = rng.uniform(120, 300), rng.uniform(600, 1200)
    for group_start in _onsets(rng, int(rng.integers(1, 3)), dur, 1.2, 1.4):
        start = group_start
        for _ in range(int(rng.integers(2, 6))):
            knock = _ring(sr, f_body, rng.uniform(0.02, 0.05), 0.15)
            knock[: int(0.05 * sr)] += 0.6 * _ring(sr, f_panel, 0.012, 0.05)
            m = int(0.002 * sr)
            knock[:m] += 0.5 * rng.standard_normal(m)
            _add(out, start, knock * rng.uniform(0.6, 1.0), sr)
            start += rng.uniform(0.12, 0.3)
    return out


def _crickets(rng: np.random.Generator, n: int, sr: int) -> Signal:
    """1-3 crickets: a 3.5-5.5 kHz carrier pulsed at 15-40 Hz, in chirps repeating every 0.3-1 s."""
    t = _t(n, sr)
    out = np.zeros(n)
    for _ in range(int(rng.integers(1, 4))):
        carrier = np.sin(2 * np.pi * min(rng.uniform(3500, 5500), 0.45 * sr) * t + rng.uniform(0, 6.28))
        pulses = np.clip(np.sin(2 * np.pi * rng.uniform(15, 40) * t), 0, None) ** 2
        period = rng.uniform(0.3, 1.0)
        gate = ((t + rng.uniform(0, period)) % period) < rng.uniform(0.1, 0.6) * period
        out += carrier * pulses * gate * rng.uniform(0.4, 1.0)
    return out


def _wind(rng: np.random.Generator, n: int, sr: int) -> Signal:
    """Gusts: low noise bands with independent slow envelopes (moving spectral centre), sometimes a whistle."""
    out = np.zeros(n)
    for lo, hi in ((60, 250), (250, 700), (700, 1800)):
        out += _noise(rng, n, sr, lo, hi, alpha=1.0) * _smooth_random(rng, n, sr, rng.uniform(0.3, 1.0), 0.0, 1.0)
    if rng.uniform() < 0.5:
        f = rng.uniform(400, 1200) * _smooth_random(rng, n, sr, 0.5, 0.85, 1.15)
        out += 0.3 * np.sin(2 * np.pi * np.cumsum(f) / sr) * _smooth_random(rng, n, sr, 0.7, 0.0, 1.0)
    return out


def _sea_waves(rng: np.random.Generator, n: int, sr: int) -> Signal:
    """Surf: pink noise swelling and breaking every 2.5-6 s, brighter at each crest."""
    t = _t(n, sr)
    period = rng.uniform(2.5, 6.0)
    phase = ((t / period) + rng.uniform()) % 1.0
    swell = np.where(phase < 0.6, phase / 0.6, np.exp(-(phase - 0.6) * 8)) ** 1.5
    low = _noise(rng, n, sr, 50, 1500, alpha=1.0)
    high = _noise(rng, n, sr, 1500, 8000, alpha=0.5)
    return (low + rng.uniform(0.3, 0.8) * high * swell) * (0.15 + swell)


def _clock_alarm(rng: np.random.Generator, n: int, sr: int) -> Signal:
    """Electronic alarm: groups of 2-5 short square-ish beeps at 2-4 kHz, repeated after a pause."""
    out, dur = np.zeros(n), n / sr
    freq = rng.uniform(2000, 4000)
    beep_len, beep_gap = rng.uniform(0.04, 0.1), rng.uniform(0.04, 0.1)
    beeps = int(rng.integers(2, 6))
    pause = rng.uniform(0.2, 0.6)
    m = int(beep_len * sr)
    beep = _tone(rng, freq, m, sr, 1.0, limit=5, odd_only=True) * _ad_env(m, sr, 0.003, 0.003)
    start = rng.uniform(0, 0.3)
    while start < dur:
        for _ in range(beeps):
            _add(out, start, beep, sr)
            start += beep_len + beep_gap
        start += pause
    return out


_RECIPES: dict[str, Callable[[np.random.Generator, int, int], Signal]] = {
    "dog": _dog,
    "rooster": _rooster,
    "siren": _siren,
    "engine": _engine,
    "rain": _rain,
    "clock_tick": _clock_tick,
    "chirping_birds": _chirping_birds,
    "church_bells": _church_bells,
    "crackling_fire": _crackling_fire,
    "car_horn": _car_horn,
    "helicopter": _helicopter,
    "door_wood_knock": _door_wood_knock,
    "crickets": _crickets,
    "wind": _wind,
    "sea_waves": _sea_waves,
    "clock_alarm": _clock_alarm,
}
SYNTH_CLASSES: tuple[str, ...] = tuple(_RECIPES)  # the first 10 are the default selection
DEFAULT_NUM_CLASSES = 10


def synth_classes(num_classes: int = DEFAULT_NUM_CLASSES) -> list[str]:
    """The first `num_classes` synthetic classes (what ``data.num-classes`` selects when no names are given)."""
    if not 1 <= num_classes <= len(SYNTH_CLASSES):
        raise DatasetError(f"num_classes must be between 1 and {len(SYNTH_CLASSES)} for the synthetic dataset, "
                           f"got {num_classes}")
    return list(SYNTH_CLASSES[:num_classes])


# --------------------------------------------------------------------------------------------------- generation
def clip_rng(seed: int, category: str, index: int) -> np.random.Generator:
    # crc32 of the name (not Python's salted hash) keeps clips identical across processes and class selections.
    return np.random.default_rng([seed, zlib.crc32(category.encode()), index])


def synthesize_clip(category: str, index: int, seed: int = 0, clip_seconds: float = 5.0,
                    sample_rate: int = 44100) -> np.ndarray:
    """One clip as float64 in [-1, 1]: class recipe + random-colour background noise at a random SNR + random gain."""
    if category not in _RECIPES:
        raise DatasetError(f"no synthetic recipe for class {category!r}; available: {', '.join(SYNTH_CLASSES)}")
    rng = clip_rng(seed, category, index)
    n = max(1, int(round(clip_seconds * sample_rate)))
    signal = _RECIPES[category](rng, n, sample_rate)
    signal_rms = np.sqrt(np.mean(signal**2)) + 1e-9
    snr_db = rng.uniform(5.0, 30.0)
    background = _noise(rng, n, sample_rate, 20, None, alpha=rng.uniform(0.0, 2.0))
    x = signal + background * signal_rms * 10 ** (-snr_db / 20)
    peak_db = rng.uniform(-12.0, -1.0)
    return x * (10 ** (peak_db / 20) / (np.max(np.abs(x)) + 1e-12))


