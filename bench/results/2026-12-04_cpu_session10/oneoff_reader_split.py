import time, glob, soundfile as sf, soxr
files = sorted(glob.glob("/work/main/.gpu_audio/speech/**/*.ogg", recursive=True))[:400]
def cpu(): return time.process_time()
dec = rs = {}; 
t_dec = 0; datas = []
for f in files:
    t = cpu(); 
    with sf.SoundFile(f) as h: d = h.read(dtype="float32", always_2d=True)
    t_dec += cpu() - t
    if d.shape[1] > 1: d = d.mean(axis=1, keepdims=True)
    datas.append((d, sf.info(f).samplerate))
audio_h = sum(d.shape[0] / r for d, r in datas) / 3600
print(f"{len(files)} files {audio_h*60:.1f} min; channels {set(sf.info(f).channels for f in files[:50])} rates {set(r for _, r in datas)}")
print(f"decode: {t_dec/audio_h:.2f} CPU-s per audio hour")
for q in ("VHQ", "HQ", "MQ", "LQ", "QQ"):
    t = cpu()
    for d, r in datas: soxr.resample(d, r, 24000, quality=q)
    print(f"soxr {q}: {(cpu()-t)/audio_h:.2f} CPU-s per audio hour")
