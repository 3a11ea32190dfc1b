"""Audio input pipeline: TFDS folder datasets, synthetic signals, grain loaders.

Modules (imported on demand, so `import codec_jax.data` stays cheap):
  audio_io        file discovery, decoding, soxr resampling, int16 conversion
  folder_builder  TFDS builder: folder of audio files -> array_record dataset
  prepare         `codec-jax prepare-data` command
  synthetic       deterministic synthetic signals (tones, chirps, noise, ...)
  pipeline        grain training / eval iterators (mixing, crops, augmentation)
"""
