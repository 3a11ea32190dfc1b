"""GAN training of SNAC codecs: `train_and_evaluate(config, workdir)`.

The command line (`codec-jax train`, `codec_jax/cli/train.py`) only parses flags and
calls this function; notebooks call it directly:

    from codec_jax.training.loop import train_and_evaluate
    from codec_jax.configs import tiny
    metrics = train_and_evaluate(tiny.get_config(), "/tmp/run")

The run resumes by itself from the newest checkpoint in `workdir` (state and data
position), so the same command restarts a preempted job. SIGTERM makes the loop save a
checkpoint at the current step and raise `codec_jax.errors.Preempted` (the command line
exits with `train.preemption_exit_code`, default 143, so a scheduler restarts the job).
A run already at `train.num_steps` returns at once.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import signal
import threading
import time
from typing import Any, Optional

import jax
import ml_collections
import numpy as np
from jax.experimental import multihost_utils

from codec_jax import checkpoint as ckpt_io
from codec_jax.paths import as_path
from codec_jax.errors import Preempted, UsageError
from codec_jax.training import optim
from codec_jax.training import sharding as shard_lib
from codec_jax.training import metrics as tm
from codec_jax.training import builders
from codec_jax.training import state as ts
from codec_jax.training.checkpoint import TrainCheckpointer
from codec_jax.training.step import (LossSettings, channels_to_batch, make_eval_step, make_train_step,
                                     validate_hyperparameters)

log = logging.getLogger(__name__)


class NonFiniteTrainingError(FloatingPointError):
    """Too many consecutive steps had non-finite losses or gradients."""


class _Preemption:
    """SIGTERM -> `requested`. Multi-process runs use JAX's preemption sync point so
    that every process stops at the same step."""

    def __init__(self):
        self._flag = threading.Event()
        self._previous = None
        if jax.process_count() == 1 and threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._handler)

    def _handler(self, signum, frame):
        log.warning("SIGTERM received: saving a checkpoint and stopping")
        self._flag.set()

    def requested(self, step: int) -> bool:
        if jax.process_count() > 1:
            return multihost_utils.reached_preemption_sync_point(step)
        return self._flag.is_set()

    def restore(self) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
            self._previous = None


def _print(msg: str) -> None:
    if jax.process_index() == 0:
        print(msg, flush=True)


def load_generator_params(path: str, expected: Any) -> Any:
    """Generator parameters (numpy tree) from a SNAC hub directory or a directory written
    by `Codec.save`; the checkpoint's `config.json` must describe the configured model."""
    p = as_path(path)
    if (p / ckpt_io.PARAMS_SUBDIR).exists():
        config, variables, _ = ckpt_io.load_converted(p)
        params = variables["params"]
    else:
        config, params = ckpt_io.load_snac_directory(p)
    if config != expected:
        raise ValueError(
            f"{path}: the checkpoint's config.json describes {config}, but the training config "
            f"builds {expected}; set model.preset / model.overrides to match the checkpoint")
    return jax.tree_util.tree_map(np.asarray, params)


def _crop_samples(config: ml_collections.ConfigDict) -> int:
    return int(round(config.data.crop_seconds * config.data.sample_rate))


def _validate(config: ml_collections.ConfigDict, snac_config) -> None:
    if int(config.data.sample_rate) != snac_config.sampling_rate:
        raise UsageError(
            f"data.sample_rate={config.data.sample_rate} differs from the model's "
            f"sampling_rate={snac_config.sampling_rate}")
    if config.train.num_steps <= 0:
        raise UsageError("train.num_steps must be positive")
    # quantizer.kind and the other quantizer options are checked by QuantizerConfig itself.


class RecompilationError(RuntimeError):
    """The train step was traced again: its input shapes, dtypes or shardings changed."""


class TraceCounter:
    """Wraps the step function and counts how often JAX traces it.

    A second trace means a silent recompilation of the whole GAN step (minutes on a
    large model), e.g. from a batch of another shape; it is an error. Unlike
    `chex.assert_max_traces`, whose count is global per source location, the count
    belongs to this wrapper, so every `TrainingSetup` gets its own budget.
    """

    def __init__(self, fn, limit: int = 1):
        self.fn, self.limit, self.count = fn, limit, 0
        functools.update_wrapper(self, fn)

    def __call__(self, *args, **kwargs):
        self.count += 1
        if self.count > self.limit:
            raise RecompilationError(
                f"{self.fn.__name__} traced {self.count} times (limit {self.limit}); inputs "
                "changed shape, dtype or sharding. Keep batches at a fixed shape.")
        return self.fn(*args, **kwargs)


WORKDIR_PLACEHOLDER = "{workdir}"


def resolve_cache_dir(cache_dir: str, workdir: Optional[str]) -> str:
    """`train.compilation_cache_dir` with `{workdir}` replaced by the run's workdir (the
    default, `{workdir}/compilation_cache`, keeps a run's compiled programs beside its
    checkpoints, so a preempted or resumed run loads them instead of compiling again).
    Without a workdir (a notebook building a `TrainingSetup` by hand) such a value means
    no cache: ""."""
    cache_dir = str(cache_dir or "")
    if WORKDIR_PLACEHOLDER not in cache_dir:
        return cache_dir
    if not workdir:
        return ""
    return cache_dir.replace(WORKDIR_PLACEHOLDER, str(workdir).rstrip("/"))


@contextlib.contextmanager
def _compilation_cache_for_run(cache_dir: str):
    """The persistent compilation cache in `cache_dir` for the block; the process's
    previous cache setting is put back afterwards (a notebook's later programs are not
    written into this run's workdir)."""
    previous = jax.config.jax_compilation_cache_dir
    enable_compilation_cache(cache_dir)
    try:
        yield
    finally:
        if cache_dir and jax.config.jax_compilation_cache_dir != previous:
            from jax.experimental.compilation_cache import compilation_cache

            jax.config.update("jax_compilation_cache_dir", previous)
            compilation_cache.reset_cache()


def enable_compilation_cache(cache_dir: str) -> None:
    """Use a persistent XLA compilation cache in `cache_dir` (no-op when empty; local or
    `gs://`, JAX reads it through etils.epath).

    Restarted jobs (after preemption, or resume tests) then load the compiled train step
    instead of recompiling it. JAX decides whether to use the cache at the process's
    first compilation, so the cache state is reset when the directory changes.
    """
    if not cache_dir:
        return
    from jax.experimental.compilation_cache import compilation_cache

    cache_dir = str(as_path(cache_dir))
    if jax.config.jax_compilation_cache_dir != cache_dir:
        jax.config.update("jax_compilation_cache_dir", cache_dir)
        compilation_cache.reset_cache()
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)


@dataclasses.dataclass
class TrainingSetup:
    """Everything a run builds from its config before the first step.

    `p_train_step(state, batch) -> (state, metrics)` and
    `p_eval_step(state, batch) -> (metrics, reconstruction)` are jitted with the state's
    shardings (`state_shardings`) and the batch split over the mesh; the train step
    donates its input state. A notebook can drive them by hand:

        setup = create_training_setup(config)
        state = setup.init_state()
        batch = shard_lib.make_global_batch({"audio": audio_np}, setup.mesh)
        state, metrics = setup.p_train_step(state, batch)
    """

    config: ml_collections.ConfigDict
    mesh: Any
    generator: builders.GeneratorAdapter
    discriminator: Any
    loss_settings: LossSettings
    init_fn: Any
    abstract_state: ts.TrainState
    state_shardings: ts.TrainState
    p_train_step: Any
    p_eval_step: Any
    num_samples: int
    train_step_traces: "TraceCounter"

    def init_state(self, gen_params: Optional[Any] = None) -> ts.TrainState:
        """A fresh sharded state (generator from `gen_params` host arrays if given)."""
        with self.init_lowering():
            state, _ = ts.create_sharded_state(
                self.init_fn, int(self.config.train.seed), self.mesh,
                int(self.config.mesh.fsdp_min_size), gen_params=gen_params,
                compiler_options=self.init_compiler_options())
        return state

    def init_compiler_options(self) -> dict[str, Any]:
        """XLA options for the state initialiser's compile on this mesh's backend.

        With `train.fast_init_compile`, on the CPU: LLVM optimisation level 0. The
        initialiser runs once, so optimising its machine code only costs compile time
        (tiny config, 2-core VM: 9.3-10.4 s of compile instead of 13.9-16.4 s,
        BENCHMARKS §5). The code generator's level changes how fast XLA's program runs,
        not what it computes, though a reduction in it (the weight-norm magnitudes) may
        be summed in another order. Other backends get no options: not measured there.
        """
        platform = self.mesh.devices.flat[0].platform
        if bool(self.config.train.get("fast_init_compile", True)) and platform == "cpu":
            return {"xla_backend_optimization_level": 0}
        return {}

    def init_lowering(self):
        """Context in which the state initialiser is traced and compiled: with
        `train.threefry_gpu_kernel_init`, threefry lowers to JAX's CUDA kernel on GPUs."""
        return threefry_kernel_lowering(
            bool(self.config.train.get("threefry_gpu_kernel_init", True)))

    def restore_target(self) -> ts.TrainState:
        """Abstract state with this mesh's shardings: what checkpoints restore into."""
        return ts.abstract_with_shardings(self.abstract_state, self.state_shardings)


@contextlib.contextmanager
def threefry_kernel_lowering(enabled: bool):
    """Within the block, jitted functions lower the threefry PRNG on GPUs to JAX's CUDA
    kernel (`jax_threefry_gpu_kernel_lowering`) when `enabled`, to unrolled XLA ops
    otherwise; the previous setting is put back afterwards. Same random bits either way.

    Why: the state initialiser draws every parameter with its own threefry hash; unrolled,
    each is a separate set of fusions to compile (snac_24khz on an H200: 129 s), as one
    kernel call 4-7 s. The flag is part of the jit cache key, so programs traced outside
    the block (the train step) are unaffected. Other backends ignore it.
    """
    previous = bool(jax.config.jax_threefry_gpu_kernel_lowering)
    jax.config.update("jax_threefry_gpu_kernel_lowering", bool(enabled))
    try:
        yield
    finally:
        jax.config.update("jax_threefry_gpu_kernel_lowering", previous)


def create_training_setup(config: ml_collections.ConfigDict,
                          devices: Optional[list] = None) -> TrainingSetup:
    """Models, optimizers, mesh (over `devices`, default all) and the jitted steps."""
    enable_compilation_cache(resolve_cache_dir(config.train.get("compilation_cache_dir", ""), None))
    validate_hyperparameters(config)
    generator = builders.build_generator(config)
    discriminator = builders.build_discriminator(config)
    _validate(config, generator.config)
    gen_tx = optim.build_optimizer(config.optimizer.generator)
    disc_tx = optim.build_optimizer(config.optimizer.discriminator)
    loss_settings = LossSettings.from_config(config.losses, generator.config.sampling_rate)
    mesh = shard_lib.create_mesh(config.mesh.data, config.mesh.fsdp, devices=devices)
    shard_lib.local_batch_size(int(config.train.batch_size), mesh)  # validates divisibility
    num_samples = _crop_samples(config)
    balancer = loss_settings.make_balancer()
    init_fn = ts.make_init_fn(
        init_generator=lambda k: generator.init(k, num_samples),
        init_discriminator=lambda k: builders.init_discriminator(discriminator, k, num_samples),
        gen_tx=gen_tx, disc_tx=disc_tx,
        init_balancer=None if balancer is None else balancer.init)
    abstract = jax.eval_shape(init_fn, ts.rng_from_seed(config.train.seed))
    shardings = ts.state_shardings(abstract, mesh, int(config.mesh.fsdp_min_size))

    batch_sharding = shard_lib.batch_sharding(mesh)
    replicated = shard_lib.replicated(mesh)
    trace_counter = TraceCounter(
        make_train_step(generator=generator, discriminator=discriminator, gen_tx=gen_tx,
                        disc_tx=disc_tx, loss_settings=loss_settings), limit=1)
    p_train_step = jax.jit(trace_counter, in_shardings=(shardings, {"audio": batch_sharding}),
                           out_shardings=(shardings, replicated), donate_argnums=(0,))
    p_eval_step = jax.jit(make_eval_step(generator=generator, loss_settings=loss_settings),
                          in_shardings=(shardings, {"audio": batch_sharding}),
                          out_shardings=(replicated, batch_sharding))
    return TrainingSetup(config=config, mesh=mesh, generator=generator,
                         discriminator=discriminator, loss_settings=loss_settings,
                         init_fn=init_fn, abstract_state=abstract, state_shardings=shardings,
                         p_train_step=p_train_step, p_eval_step=p_eval_step,
                         num_samples=num_samples, train_step_traces=trace_counter)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, float]:
    """Train (or resume) to `config.train.num_steps`; returns the last logged metrics.

    Writes `workdir/checkpoints/<step>/`, `workdir/tensorboard/`, `workdir/metrics.jsonl`,
    `workdir/config.json` and, at the last step, `workdir/export/`. `workdir` may be local
    or a bucket (`gs://bucket/run`, any etils.epath URL).

    Raises:
      NonFiniteTrainingError: `train.max_consecutive_skips` steps in a row had
        non-finite losses or gradients (the parameters were left untouched).
    """
    workdir = as_path(workdir)
    config = ml_collections.ConfigDict(config.to_dict())  # private, unlocked copy
    config.train.compilation_cache_dir = resolve_cache_dir(
        config.train.get("compilation_cache_dir", ""), str(workdir))
    with _compilation_cache_for_run(config.train.compilation_cache_dir):
        return _train(config, workdir)


def _train(config: ml_collections.ConfigDict, workdir) -> dict[str, float]:
    """`train_and_evaluate`'s body, with the config private and the cache set up."""
    _print("building the models, optimizers and mesh...")
    setup = create_training_setup(config)
    mesh, generator = setup.mesh, setup.generator
    batch_size = int(config.train.batch_size)
    num_samples = setup.num_samples

    from codec_jax.data import pipeline

    train_iter = pipeline.create_train_iterator(
        config.data, global_batch_size=batch_size, seed=int(config.train.seed),
        process_index=jax.process_index(), process_count=jax.process_count())

    # ---- state: resume, or create (from an imported generator when configured) ----
    checkpointer = TrainCheckpointer(workdir / "checkpoints",
                                     keep=config.checkpoint.keep,
                                     async_save=config.checkpoint.async_save)
    state, restored_step = checkpointer.restore_latest(setup.restore_target(), train_iter)
    if state is None:
        pretrained = None
        if config.init.generator_checkpoint:
            pretrained = load_generator_params(config.init.generator_checkpoint, generator.config)
            _print(f"generator initialised from {config.init.generator_checkpoint}")
        _print("building the train state (compiling its initialiser)...")
        state = setup.init_state(pretrained)
        start_step = 0
    else:
        start_step = int(jax.device_get(state.step))
        _print(f"resumed from {checkpointer.directory}/{restored_step} (step {start_step})")
    num_steps = int(config.train.num_steps)
    if start_step >= num_steps:
        _print(f"already at step {start_step} of {num_steps}; nothing to do")
        checkpointer.close()
        train_iter.close()
        return {}

    if jax.process_index() == 0:
        workdir.mkdir(parents=True, exist_ok=True)
        (workdir / "config.json").write_text(config.to_json_best_effort(indent=2))
    _print(f"mesh {dict(mesh.shape)} on {jax.device_count()} {jax.devices()[0].platform} "
           f"device(s), {jax.process_count()} process(es); generator "
           f"{ts.param_count(state.gen_params):,} params, discriminator "
           f"{ts.param_count(state.disc_params):,} params; batch {batch_size} x "
           f"{num_samples} samples")
    log.info("parameter layout: %s",
             shard_lib.describe_shardings(setup.abstract_state, setup.state_shardings))

    p_train_step, p_eval_step = setup.p_train_step, setup.p_eval_step
    writer = tm.create_writer(workdir, enabled=jax.process_index() == 0,
                              jsonl=bool(config.logging.jsonl))
    log_every = max(int(config.logging.every_steps), 1)
    eval_every = int(config.logging.eval_every_steps)
    ckpt_every = int(config.checkpoint.every_steps)
    max_skips = int(config.train.max_consecutive_skips)
    audio_seconds = batch_size * num_samples / generator.config.sampling_rate
    throughput = tm.Throughput(audio_seconds)
    preemption = _Preemption()

    evaluations = 0

    def evaluate(step: int) -> dict[str, float]:
        nonlocal evaluations
        if evaluations == 0:
            _print("evaluating (the first evaluation compiles the eval step)...")
        evaluations += 1
        return _evaluate(config, state, p_eval_step, mesh, writer, step)

    step = start_step
    history: list[dict[str, Any]] = []
    last_logged: dict[str, float] = {}
    pending: Optional[dict[str, jax.Array]] = None  # previous step's metrics, on device
    cache_dir = config.train.get("compilation_cache_dir", "")
    _print("compiling the train step (generator, discriminators, losses, both updates); "
           + (f"compiled programs are cached in {cache_dir}, so the next start loads them"
              if cache_dir else "set --config.train.compilation_cache_dir=DIR to make the "
              "next start skip this") + "...")
    try:
        while step < num_steps:
            batch = shard_lib.make_global_batch(next(train_iter), mesh)
            t_dispatch = time.perf_counter()
            state, metrics = p_train_step(state, batch)
            step += 1
            if step == start_step + 1:
                jax.block_until_ready(metrics)
                _print(f"first step (compilation included) took "
                       f"{time.perf_counter() - t_dispatch:.1f}s")
                throughput.reset(step)
            # Read the previous step's skip counter while this step runs: checking
            # every step without stalling the dispatch pipeline.
            if pending is not None:
                _check_skips(pending, step - 1, max_skips, checkpointer)
            pending = metrics
            history.append(metrics)

            if step % log_every == 0 or step == num_steps:
                _check_skips(metrics, step, max_skips, checkpointer)
                values = tm.aggregate(tm.fetch_history(history))
                history = []
                values.update(throughput.rates(step))
                values.update(tm.device_memory())
                writer.write_scalars(step, {f"train/{k}": v for k, v in values.items()})
                _print(tm.progress_line(step, num_steps, values))
                last_logged = values
                throughput.reset(step)
            if eval_every > 0 and (step % eval_every == 0 or step == num_steps):
                eval_values = evaluate(step)
                last_logged.update({f"eval/{k}": v for k, v in eval_values.items()})
                throughput.reset(step)
            if preemption.requested(step):
                saved = checkpointer.save(step, state, train_iter, force=True)
                checkpointer.wait()
                good = checkpointer.good_steps()
                resume = step if saved or step in good else (good[-1] if good else 0)
                raise Preempted(step, int(config.train.get("preemption_exit_code", 143)), resume)
            if (ckpt_every > 0 and step % ckpt_every == 0) or step == num_steps:
                checkpointer.save(step, state, train_iter)
                writer.flush()  # metrics up to a checkpoint survive a lost VM
            if step == num_steps:
                export_codec(workdir / "export", setup, state)
    finally:
        preemption.restore()
        checkpointer.close()
        writer.close()
        train_iter.close()
    return last_logged


def export_codec(path: str, setup: TrainingSetup, state: ts.TrainState) -> None:
    """Write the generator as an inference codec: `codec_jax.load_pretrained(path)` reads
    it back (`config.json`, `quantizer.json`, parameters and EMA codebooks)."""
    variables = {"params": state.gen_params}
    if state.codebook:
        variables["codebook"] = state.codebook
    ckpt_io.save_converted(path, setup.generator.config, variables,
                           quantizer=setup.generator.module.quantizer)
    _print(f"exported the codec to {path}")


def _check_skips(metrics: dict[str, jax.Array], step: int, max_skips: int,
                 checkpointer: Optional[TrainCheckpointer] = None) -> None:
    consecutive = int(jax.device_get(metrics["consecutive_skips"]))
    if max_skips > 0 and consecutive >= max_skips:
        good = checkpointer.good_steps() if checkpointer is not None else []
        newest = (f"the newest checkpoint is step {good[-1]}" if good
                  else "no checkpoint was written")
        raise NonFiniteTrainingError(
            f"stopping at step {step}: {consecutive} consecutive steps had non-finite losses, "
            f"gradients or updates, and their updates were skipped (parameters are those of "
            f"step {step - consecutive}; {newest}). Check the data for NaN/inf audio, lower "
            f"the learning rate or raise the clipping, or restart from an earlier checkpoint; "
            f"train.max_consecutive_skips={max_skips} sets this limit.")


def _evaluate(config, state, p_eval_step, mesh, writer, step: int) -> dict[str, float]:
    """Mean eval metrics over the held-out batches; audio + spectrograms of the first."""
    from codec_jax.data import pipeline

    per_process = int(config.logging.eval_batch_size) // jax.process_count()
    it = pipeline.create_eval_iterator(
        config.data, batch_size=per_process, num_batches=int(config.logging.eval_batches),
        seed=int(config.train.seed), process_index=jax.process_index(),
        process_count=jax.process_count())
    results, first = [], None
    perceptual = bool(config.logging.get("eval_perceptual", False))
    pairs = []  # (audio, reconstruction) of every batch, for the perceptual metrics
    try:
        for host_batch in it:
            batch = shard_lib.make_global_batch(host_batch, mesh)
            metrics, recon = p_eval_step(state, batch)
            results.append(metrics)
            audio = channels_to_batch(batch["audio"])  # the layout of `recon`: [B (x channels), T]
            if first is None:
                first = (audio, recon)
            if perceptual:
                pairs.append([np.asarray(multihost_utils.process_allgather(x, tiled=True))
                              for x in (audio, recon)])
    finally:
        it.close()
    values = tm.aggregate(jax.device_get(results))
    if perceptual and jax.process_index() == 0 and pairs:
        # PESQ-wb / STOI / ViSQOL of every eval clip (CPU worker processes), the same
        # definitions as `codec-jax eval` (codec_jax/evaluation.py).
        from codec_jax import evaluation

        values.update(evaluation.reconstruction_metrics(
            np.concatenate([a for a, _ in pairs]), np.concatenate([r for _, r in pairs]),
            sample_rate=int(config.data.sample_rate), spectral=False, perceptual=True))
    writer.write_scalars(step, {f"eval/{k}": v for k, v in values.items()})
    n = int(config.logging.num_audio_samples)
    if first is not None and n > 0:
        audio, recon = (multihost_utils.process_allgather(x, tiled=True) for x in first)
        rate = int(config.data.sample_rate)
        for i in range(min(n, audio.shape[0])):
            for kind, clip in (("original", audio[i]), ("reconstruction", recon[i])):
                problem = tm.finite_or_none(clip)
                if problem is not None:  # a diverged model: no audio or picture of it
                    log.warning("eval @ %d: %s clip %d not written to TensorBoard: %s",
                                step, kind, i, problem)
                    continue
                writer.write_audios(step, {f"eval/{i}/{kind}": clip[None, :, None]},
                                    sample_rate=rate)
                writer.write_images(step, {f"eval/{i}/spectrogram_{kind}":
                                           tm.spectrogram_image(clip)})
    writer.flush()
    _print("eval @ {}: {}".format(step, ", ".join(
        f"{k} {v:.4g}" for k, v in values.items() if not k.startswith("codes/"))))
    return values
