"""Whether and from where a run that ended can be resumed: its newest checkpoint that verifies, and the same data,
model and settings as when that checkpoint was written (unless the user forces it)."""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict

from ..errors import ConfigError, RunConflict
from .checkpoints import checkpoints_dir, config_hash, data_hash, newest_verified
from .jobs import Job, JobState


class ResumePlan(BaseModel):
    model_config = ConfigDict(frozen=True)

    run_id: str
    step: int  # steps already trained, kept; 0 when the run saved no checkpoint
    checkpoint: str | None
    changed: list[str]  # what differs from the checkpoint (resumed anyway: `force`)

    def describe(self) -> str:
        where = f"from checkpoint {self.checkpoint} (step {self.step})" if self.checkpoint else "from step 0"
        forced = f"; forced despite a change in {' and '.join(self.changed)}" if self.changed else ""
        return f"run {self.run_id} resumes {where}{forced}"


def plan_resume(job: Job, force: bool = False) -> ResumePlan:
    """Raise RunConflict when the run cannot be resumed in its state, ConfigError when its data or model changed
    since its newest checkpoint (without `force`); reads the dataset once to hash it."""
    if not job.state.terminal:
        raise RunConflict(f"run {job.id} is {job.state.value}; only a run that ended (failed or cancelled) resumes")
    if job.state is JobState.SUCCEEDED:
        raise RunConflict(
            f"run {job.id} already succeeded ({job.iters} iterations); start a new run (its adapter_dir can be "
            "another folder) to train further"
        )
    data = Path(job.config.data)
    if not (data / "train.jsonl").is_file():
        raise ConfigError(f"cannot resume run {job.id}: its dataset {data / 'train.jsonl'} is gone; put it back")
    newest = newest_verified(checkpoints_dir(Path(job.run_dir)))
    if newest is None:
        return ResumePlan(run_id=job.id, step=0, checkpoint=None, changed=[])
    changed = []
    if data_hash(data) != newest.manifest.data_hash:
        changed.append(f"the dataset ({data})")
    if config_hash(job.config) != newest.manifest.config_hash:
        changed.append(f"the base model ({job.config.model})")
    if changed and not force:
        raise ConfigError(
            f"cannot resume run {job.id} from its checkpoint at step {newest.step}: {' and '.join(changed)} changed "
            "since it was saved, so the continued run would not be the same run; pass force=true (--force) to "
            "resume anyway, or start a new run"
        )
    return ResumePlan(run_id=job.id, step=newest.step, checkpoint=str(newest.path), changed=changed)
