"""Builds the corpus-job benchmark's input folder from the Debian demo recordings.

    python bench/make_corpus.py OUT --speech /usr/share/klettres --speech-files 800 \
        --music /usr/share/games/wesnoth/1.16/data/core/music --music-pieces 200

The folder bench/device_corpus.sh carries to the GPU machine (25 MB):

    python bench/make_corpus.py .corpus_src --speech-files 700 \
        --copy-music elvish-theme.ogg love_theme.ogg loyalists.ogg

Speech: the klettres .ogg files (spoken letters and syllables, 0.3-3 s), copied as they are.
Music: the Wesnoth tracks cut with soundfile into pieces of 5-60 s (uniformly drawn, seeded),
written as Ogg Vorbis at the tracks' own rate and channel count, so the job decodes,
mixes and resamples real compressed files of mixed lengths. Files are chosen by sorted
path with a seeded shuffle, so the same arguments give the same corpus.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil

import soundfile as sf


def _audio_files(root: str) -> list[str]:
    out = []
    for dirpath, _, names in os.walk(root):
        out += [os.path.join(dirpath, n) for n in names if n.lower().endswith((".ogg", ".wav", ".flac"))]
    return sorted(out)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("out")
    p.add_argument("--speech", default="/usr/share/klettres")
    p.add_argument("--speech-files", type=int, default=800)
    p.add_argument("--music", default="/usr/share/games/wesnoth/1.16/data/core/music")
    p.add_argument("--music-pieces", type=int, default=200)
    p.add_argument("--min-seconds", type=float, default=5.0)
    p.add_argument("--max-seconds", type=float, default=60.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--copy-music", nargs="*", default=None, metavar="TRACK",
                   help="copy these music tracks uncut instead of cutting pieces (to make the "
                        "small source folder bench/device_corpus.sh carries)")
    args = p.parse_args(argv)
    rng = random.Random(args.seed)

    speech = _audio_files(args.speech) if args.speech_files else []
    rng.shuffle(speech)
    os.makedirs(os.path.join(args.out, "speech"), exist_ok=True)
    for i, path in enumerate(speech[: args.speech_files]):
        rel = os.path.relpath(path, args.speech).replace(os.sep, "_")
        shutil.copyfile(path, os.path.join(args.out, "speech", f"{i:05d}_{rel}"))

    tracks = _audio_files(args.music) if args.music_pieces else []
    pieces = 0
    os.makedirs(os.path.join(args.out, "music"), exist_ok=True)
    if args.copy_music is not None:
        for name in args.copy_music:
            shutil.copyfile(os.path.join(args.music, name), os.path.join(args.out, "music", name))
        tracks = []
    while pieces < args.music_pieces and tracks:
        for track in tracks:
            if pieces >= args.music_pieces:
                break
            info = sf.info(track)
            seconds = rng.uniform(args.min_seconds, args.max_seconds)
            frames = min(int(seconds * info.samplerate), info.frames)
            start = rng.randrange(0, max(1, info.frames - frames))
            data, sr = sf.read(track, start=start, frames=frames, dtype="float32", always_2d=True)
            name = os.path.splitext(os.path.basename(track))[0]
            target = os.path.join(args.out, "music", f"{pieces:05d}_{name}.ogg")
            # libsndfile's Vorbis encoder crashes on one large write; feed it blocks.
            with sf.SoundFile(target, "w", sr, data.shape[1], format="OGG", subtype="VORBIS") as f:
                for i in range(0, len(data), 8192):
                    f.write(data[i:i + 8192])
            pieces += 1
    n = len(os.listdir(os.path.join(args.out, "speech"))) + pieces
    print(f"{args.out}: {min(len(speech), args.speech_files)} speech files, {pieces} music pieces "
          f"({n} files)")


if __name__ == "__main__":
    main()
