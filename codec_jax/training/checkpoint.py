"""Resumable training checkpoints: orbax `CheckpointManager` over the train state and
the data iterator position.

Each checkpoint `workdir/checkpoints/<step>/` holds two items:

* `state`: the whole `TrainState` (both models, both optimizer states, codebook
  statistics, balancer, rng, step, skip counters), written by every process for its
  own shards (`StandardSave`) and read back against an *abstract* target that carries
  the shardings of the current mesh, so a run can resume on a different mesh;
* `data`: the grain iterator state of every process (`process_<i>-of-<n>.json`).

Saving is asynchronous (the step loop continues while the arrays are written); a
checkpoint only appears in `all_steps()` once finalised, so a run killed mid-save
resumes from the previous one.
"""

from __future__ import annotations

import logging
import os
from typing import Any, Optional

import grain
import orbax.checkpoint as ocp

from codec_jax.paths import as_path

log = logging.getLogger(__name__)


class TrainCheckpointer:
    """Save/restore `(state, data iterator)` pairs under `directory`."""

    def __init__(self, directory: str, *, keep: int = 3, async_save: bool = True):
        self.directory = as_path(directory)  # local, or a bucket: gs://bucket/run/checkpoints
        options = ocp.CheckpointManagerOptions(
            max_to_keep=int(keep) if keep and keep > 0 else None,
            enable_async_checkpointing=bool(async_save),
            create=True,
        )
        self.manager = ocp.CheckpointManager(self.directory, options=options)

    def latest_step(self) -> Optional[int]:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self.manager.all_steps())

    def save(self, step: int, state: Any, data_iterator: Any, *, force: bool = False) -> bool:
        """Start writing checkpoint `step`; returns False if it already exists.

        The iterator state is captured now, synchronously, so it matches `state` even
        though the arrays are written in the background.
        """
        if step in self.manager.all_steps():
            return False
        args = ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            data=grain.checkpoint.CheckpointSave(data_iterator),
        )
        return self.manager.save(step, args=args, force=force)

    def restore(self, step: int, abstract_state: Any, data_iterator: Any) -> Any:
        """Restore checkpoint `step` into `abstract_state`'s shapes, dtypes and shardings
        (leaves: `jax.ShapeDtypeStruct(..., sharding=...)`), and move `data_iterator` to
        the saved position. Returns the state."""
        import jax

        data_file = (self.directory / str(step) / "data"
                     / f"process_{jax.process_index()}-of-{jax.process_count()}.json")
        if not data_file.exists():
            # Written by a group of another size: every process's data shard changed, so
            # there is no position to resume; the model state still restores exactly.
            log.warning("checkpoint %d in %s holds no data position for %d process(es); "
                        "the model state is restored, the data iterators start afresh",
                        step, self.directory, jax.process_count())
            args = ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state))
            return self.manager.restore(step, args=args).state
        args = ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state),
            data=grain.checkpoint.CheckpointRestore(data_iterator),
        )
        return self.manager.restore(step, args=args).state

    def restore_latest(self, abstract_state: Any, data_iterator: Any
                       ) -> tuple[Optional[Any], Optional[int]]:
        """Restore the newest checkpoint that reads back, newest first.

        A checkpoint that fails to restore (files lost from a bucket, a half-copied
        directory) is reported and the previous one is tried. Returns `(None, None)`
        when there are no checkpoints. If there are some but none restores (typically:
        the config now describes another model), raises instead of letting the run start
        from scratch and rotate the old checkpoints away.
        """
        errors = []
        for step in sorted(self.manager.all_steps(), reverse=True):
            try:
                return self.restore(step, abstract_state, data_iterator), step
            except Exception as e:  # noqa: BLE001 - orbax/tensorstore raise many types
                errors.append(f"  step {step}: {type(e).__name__}: {e}")
                log.warning("checkpoint %d in %s could not be restored (%s: %s); "
                            "trying an older one", step, self.directory, type(e).__name__, e)
        if errors:
            raise RuntimeError(
                f"none of the checkpoints in {self.directory} could be restored into the "
                "configured train state (was the model, optimizer or data config changed?):\n"
                + "\n".join(errors))
        return None, None

    def wait(self) -> None:
        """Block until pending asynchronous saves are on disk."""
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()
