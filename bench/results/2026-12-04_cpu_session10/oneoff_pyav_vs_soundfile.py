import glob, time, numpy as np, soundfile as sf, av
files = sorted(glob.glob("/work/main/.gpu_audio/speech/**/*.ogg", recursive=True))[:400]
music = sorted(glob.glob("/work/main/.gpu_audio/music/*.ogg"))
def sf_read(f):
    with sf.SoundFile(f) as h: return h.read(dtype="float32", always_2d=True), h.samplerate
def av_read(f):
    with av.open(f) as c:
        s = c.streams.audio[0]
        s.thread_type = "NONE"
        chunks = [fr.to_ndarray() for fr in c.decode(s)]
        return np.concatenate(chunks, axis=1).T, s.rate
bad = set()
for f in files:
    try: av_read(f)
    except Exception: bad.add(f)
print('av cannot read', len(bad))
for name, fs in (("speech", files), ("music", music)):
    for rnd in range(2):
        for fn in (sf_read, av_read):
            t = time.process_time(); tot = 0
            for f in fs:
                if f in bad: continue
                try:
                    d, r = fn(f); tot += d.shape[0] / r
                except Exception:
                    bad.add(f)
            print(f"{name} {fn.__name__}: {(time.process_time()-t)/(tot/3600):.2f} CPU-s per audio hour ({tot/60:.1f} min)")
d1, _ = sf_read(music[0]); d2, _ = av_read(music[0])
n = min(len(d1), len(d2)); print("shapes", d1.shape, d2.shape, "max diff", np.abs(d1[:n]-d2[:n]).max())
