"""The training worker: claims fine-tuning jobs, trains, evaluates, registers the adapter.

Training runs in a thread so the event loop keeps renewing the job's lease. A job whose
worker dies is claimed again once its lease runs out, by any worker on any machine, and
training resumes from its last checkpoint: each checkpoint the trainer writes in the job's
work folder is uploaded to the store (`CheckpointMirror`), and a worker fetches the newest
stored one before it trains, unless its own work folder (a cache) holds a newer one. When the
job ends (succeeded, failed, cancelled) its checkpoints are deleted, here and in the store.
Cancelling, failing or losing the lease leaves no adapter version behind: the version is
registered only at the end, and removed again if the job turned out to be cancelled meanwhile.

What to train comes from the job row as a `TrainingRecipe` (adapters/training/recipe.py). A
failed job's error code is one of a documented few, never a Python class name:
`eval_not_improved` (require_improvement and the adapter did not beat the base model),
`out_of_memory`, a loraplex error's own code (e.g. `invalid_adapter` when registration refuses
the result), and `training_error` for anything else.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import os
import shutil
import socket
import threading
import uuid
from collections.abc import AsyncIterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import ValidationError

from adapters.base_model import BaseModelInfo
from adapters.errors import LoraplexError
from adapters.registration import register_version
from adapters.registry import Registry
from adapters.registry.models import FineTuneJob
from adapters.store import AdapterStore, export_key
from adapters.training.dataset import mix_general, to_messages, validate_jsonl
from adapters.training.evaluation import (
    BASE_KEY,
    PROMPTED_KEY,
    Case,
    EvaluationReport,
    EvaluationSettings,
    ModelScores,
    beats,
    best,
    case_of,
    pick_shots,
    prompted_messages,
)
from adapters.training.evaluator import Evaluator
from adapters.training.jobs import FINAL, JobStatus, JobStore, checkpoints_prefix
from adapters.training.recipe import TrainingRecipe
from adapters.validation import AdapterLimits

if TYPE_CHECKING:
    from adapters.training.trainer import EvalResult, Progress, TrainConfig, TrainResult

log = logging.getLogger(__name__)

CHECKPOINT_EVERY_STEPS = 5
MAX_ERROR_MESSAGE = 2000
PROMPTED_MAX_SEQ_LEN = 8192


def job_error(exc: BaseException) -> dict[str, Any]:
    """The `error` object of a job that failed with `exc`: a stable, documented code and the
    exception's own message (no class names, no traceback)."""
    message = str(exc)[:MAX_ERROR_MESSAGE]
    if isinstance(exc, LoraplexError):
        return {"code": exc.code, "message": exc.message[:MAX_ERROR_MESSAGE], "param": None}
    if _out_of_memory(exc):
        return {"code": "out_of_memory", "param": None,
                "message": "out of memory while training; try a smaller batch_size, "
                           "max_seq_len or r" + (f" ({message})" if message else "")}
    return {"code": "training_error", "message": message or "training failed", "param": None}


def _out_of_memory(exc: BaseException) -> bool:
    if isinstance(exc, MemoryError):
        return True
    import torch  # the trainer has imported it already

    return isinstance(exc, torch.OutOfMemoryError)


def _step(checkpoint: Path) -> int:
    return int(checkpoint.name.removeprefix("step-"))


class CheckpointMirror:
    """A job's checkpoints in the store, under `checkpoints/<job-id>/step-N/`: `restore`
    before training, `push` as the trainer writes them. The work folder is a cache."""

    def __init__(self, store: AdapterStore, job_id: str, work_dir: Path) -> None:
        self.store, self.job_id, self.work_dir = store, job_id, work_dir
        self.prefix = checkpoints_prefix(job_id)
        self.stored_step = 0  # the newest step known to be in the store
        self._pushing = asyncio.Lock()
        self._again = False  # a push came in while one was running

    async def stored_steps(self) -> list[int]:
        names = await self.store.list_folders(self.prefix)
        return sorted(int(n[5:]) for n in names if n.startswith("step-") and n[5:].isdigit())

    async def restore(self) -> Path | None:
        """Bring the newest stored checkpoint into the work folder unless it holds a newer
        one; the checkpoint to resume from. A store that fails is not fatal: training goes
        on from what the work folder has (a fresh start at worst, slower but the same run)."""
        from adapters.training.trainer import latest_checkpoint

        local = await asyncio.to_thread(latest_checkpoint, self.work_dir)
        local_step = _step(local) if local else 0
        try:
            stored = await self.stored_steps()
        except LoraplexError as exc:
            log.warning("job %s: cannot list its checkpoints in %s: %s", self.job_id,
                        self.store.description, exc)
            return local
        self.stored_step = max(stored, default=0)
        for step in reversed(stored):
            if step <= local_step:
                break
            dest = self.work_dir / "checkpoints" / f"step-{step}"
            try:
                await self.store.get_folder(f"{self.prefix}/step-{step}", dest)
            except LoraplexError as exc:  # corrupt, vanished, or the store failed: try older
                log.warning("job %s: cannot fetch checkpoint step-%d from %s: %s", self.job_id,
                            step, self.store.description, exc)
                continue
            log.info("job %s: checkpoint step-%d fetched from %s", self.job_id, step,
                     self.store.description)
            break
        return await asyncio.to_thread(latest_checkpoint, self.work_dir)

    async def push(self) -> None:
        """Upload the newest checkpoint of the work folder if the store lacks it. While an
        upload runs, a call only asks the running one to look again when it is done (so
        uploads never queue up behind a slow store); failures are logged, never fatal."""
        self._again = True
        if self._pushing.locked():
            return
        async with self._pushing:
            while self._again:
                self._again = False
                await self._push_latest()

    async def _push_latest(self) -> None:
        from adapters.training.trainer import KEEP_CHECKPOINTS, latest_checkpoint

        latest = await asyncio.to_thread(latest_checkpoint, self.work_dir)
        if latest is None or _step(latest) <= self.stored_step:
            return
        try:
            await self.store.put_folder(f"{self.prefix}/{latest.name}", latest)
            self.stored_step = _step(latest)
            # The store keeps what the work folder keeps: the newest few.
            for old in (await self.stored_steps())[:-KEEP_CHECKPOINTS]:
                await self.store.delete_prefix(f"{self.prefix}/step-{old}")
        except (LoraplexError, OSError) as exc:  # pruned by the trainer meanwhile, S3 down
            log.warning("job %s: checkpoint %s not uploaded to %s: %s", self.job_id,
                        latest.name, self.store.description, exc)


class Worker:
    def __init__(self, jobs: JobStore, registry: Registry, store: AdapterStore,
                 base_model: Path, base_info: BaseModelInfo, limits: AdapterLimits,
                 model_name: str, work_root: Path, *, lease_s: float = 30.0,
                 poll_s: float = 2.0, worker_id: str | None = None, threads: int = 0,
                 evaluator: Evaluator | None = None) -> None:
        self.jobs, self.registry, self.store = jobs, registry, store
        self.base_model, self.base_info, self.limits = base_model, base_info, limits
        self.model_name = model_name
        self.work_root = work_root
        self.lease_s, self.poll_s = lease_s, poll_s
        self.threads = threads or max(1, (os.cpu_count() or 2) // 2)  # the engine needs CPU too
        self.worker_id = worker_id or f"{socket.gethostname()}-{uuid.uuid4().hex[:6]}"
        # Answers through the serving engine (a gateway); without one, the report has the
        # held-out losses only.
        self.evaluator = evaluator

    async def run_forever(self, stop: asyncio.Event) -> None:
        log.info("training worker %s polling for jobs", self.worker_id)
        while not stop.is_set():
            job = await self.jobs.claim(self.worker_id, self.lease_s)
            if job is None:
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(stop.wait(), self.poll_s)
                continue
            await self.run_job(job)

    async def run_job(self, job: FineTuneJob) -> None:
        from adapters.training.trainer import TrainingStopped

        stop_training = threading.Event()
        heartbeat = asyncio.create_task(self._keep_lease(job.id, stop_training))
        work_dir = self.work_root / job.id
        try:
            if job.kind == "merge":
                await self._merge(job, work_dir)
            elif job.kind == "export":
                await self._export(job, work_dir)
            else:
                await self._train_and_register(job, work_dir, stop_training)
        except TrainingStopped:
            log.info("job %s stopped (cancelled or lease lost)", job.id)
        except Exception as exc:  # any failure fails the job, not the worker
            log.exception("job %s failed", job.id)
            error = job_error(exc)
            await self.jobs.finish(job.id, self.worker_id, JobStatus.FAILED,
                                   f"Job failed: {error['message']}", error=error)
        finally:
            heartbeat.cancel()
            current = await self.jobs.get_job(None, job.id)
            if current.status in FINAL:
                await asyncio.to_thread(shutil.rmtree, work_dir, True)
                await self.jobs.delete_checkpoints(job.id)

    async def _keep_lease(self, job_id: str, stop_training: threading.Event) -> None:
        while True:
            await asyncio.sleep(self.lease_s / 3)
            try:
                mine = await self.jobs.renew(job_id, self.worker_id, self.lease_s)
            except Exception:  # a database hiccup: try again next beat
                log.warning("could not renew the lease of %s", job_id, exc_info=True)
                continue
            if not mine:
                stop_training.set()
                return

    async def _train_and_register(self, job: FineTuneJob, work_dir: Path,
                                  stop_training: threading.Event) -> None:
        from adapters.training.trainer import split_holdout, train

        loop = asyncio.get_running_loop()
        train_data = await self.jobs.read_file(job.tenant_id, job.training_file)
        examples = validate_jsonl(train_data, min_examples=1).examples
        own_examples = examples  # the few-shot pool of the prompted baseline
        if job.validation_file:
            holdout = validate_jsonl(await self.jobs.read_file(job.tenant_id, job.validation_file),
                                     min_examples=1).examples
        else:
            examples, holdout = split_holdout(examples, fraction=0.1, seed=job.seed)
        recipe = TrainingRecipe.of_job(job)
        if recipe.lora.general_data_ratio:
            examples = mix_general(examples, recipe.lora.general_data_ratio, recipe.seed)
        config = recipe.train_config(base_model_name=self.model_name,
                                     checkpoint_every_steps=CHECKPOINT_EVERY_STEPS)

        mirror = CheckpointMirror(self.jobs.store, job.id, work_dir)
        checkpoint = await mirror.restore()
        if checkpoint is not None:
            await self.jobs.add_event(job.id, f"Resuming from step "
                                      f"{checkpoint.name.removeprefix('step-')} ({checkpoint.name})")

        pending: list[concurrent.futures.Future[None]] = []

        def on_progress(p: Progress) -> None:  # called from the training thread
            pending[:] = [f for f in pending if not f.done()]
            pending.append(asyncio.run_coroutine_threadsafe(
                self._progress(job.id, p, config, mirror), loop))

        import torch

        torch.set_num_threads(self.threads)
        try:
            result = await asyncio.to_thread(train, self.base_model, examples, config, work_dir,
                                             on_progress=on_progress,
                                             should_stop=stop_training.is_set)
        finally:
            # Progress reports and uploads still under way end before the job moves on (and
            # before its checkpoints are deleted, so none is uploaded after that).
            await asyncio.gather(*(asyncio.wrap_future(f) for f in pending),
                                 return_exceptions=True)
        run = {"steps": result.steps, "train_loss": result.train_loss,
               "tokens_per_s": result.tokens_per_s, "seconds": result.seconds}
        await self._evaluate_and_register(job, recipe, result, holdout, own_examples, run)

    async def _evaluate_and_register(self, job: FineTuneJob, recipe: TrainingRecipe,
                                     result: TrainResult, holdout: list[dict[str, Any]],
                                     own_examples: list[dict[str, Any]],
                                     run: dict[str, Any]) -> None:
        """Held-out losses here, the version registered, the answers through the serving
        engine (a gateway), then succeeded, or failed under require_improvement."""
        settings = EvaluationSettings.model_validate(job.evaluation_settings or {})
        holdout = holdout[:settings.max_examples]
        cases = [case_of(e) for e in holdout]
        # The gateway draws the shots from this pool the same way (pick_shots is seeded), so
        # the loss and the answers of the prompted baseline see the same turns.
        pool = [_example(c) for c in pick_shots(own_examples, settings.few_shot, job.seed,
                                                avoid=cases)]
        shots = pick_shots(pool, settings.few_shot, job.seed, avoid=cases)
        await self.jobs.add_event(job.id, "Evaluating the adapter against the base model and "
                                  "the prompted baseline")
        losses = await self._losses(holdout, result.adapter_dir, settings, shots,
                                    recipe.lora.max_seq_len)
        figures = losses.figures(len(holdout))
        await self.jobs.add_event(job.id, losses.summary(), type_="metrics", data=figures)
        version = await register_version(
            self.registry, self.store, self.base_info, self.limits, job.tenant_id,
            job.adapter_name, result.adapter_dir, f"fine-tune:{job.id}", self.model_name)
        name = f"{job.adapter_name}@{version.version}"
        report = await self._report(job, name, holdout, pool, settings, losses)
        figures["improved"] = report.improved
        await self.jobs.add_event(job.id, _summary(report), type_="metrics",
                                  data={"evaluation": report.model_dump(exclude={"samples"})})
        fields = {"result": {"eval": figures, "run": run}, "trained_tokens": result.trained_tokens,
                  "evaluation": report.model_dump()}
        if recipe.lora.require_improvement and not report.improved:
            await self._forget(job, version.version)
            missing = any(getattr(m, settings.metric) is None for m in report.models.values())
            error = ({"code": "evaluation_failed", "param": None,
                      "message": f"{settings.metric} could not be measured for every model: "
                                 + "; ".join(report.errors)} if missing else
                     {"code": "eval_not_improved", "param": None,
                      "message": f"the adapter does not beat both the base model and the "
                                 f"prompted baseline on held-out {settings.metric}"})
            await self.jobs.finish(job.id, self.worker_id, JobStatus.FAILED,
                                   "The adapter did not beat the base model and the prompted "
                                   "baseline" if not missing else "The evaluation failed",
                                   error=error, **fields)
            return
        done = await self.jobs.finish(
            job.id, self.worker_id, JobStatus.SUCCEEDED, f"New fine-tuned model created: {name}",
            fine_tuned_model=name, **fields)
        if not done:  # cancelled (or taken over) while registering: leave nothing behind
            await self._forget(job, version.version)

    async def _merge(self, job: FineTuneJob, work_dir: Path) -> None:
        """Skill merging (adapters/training/merging.py): the sources checked at the request,
        merged by PEFT, registered as a new version of the job's adapter."""
        from adapters.training.merging import merge_adapters

        params = job.params or {}
        sources = params["sources"]
        await self.jobs.add_event(job.id, f"Merging {len(sources)} adapters ({params['method']})")
        async with self._checked_out([s["store_key"] for s in sources]) as folders:
            merged = await asyncio.to_thread(
                merge_adapters, self.base_model, folders, [s["weight"] for s in sources],
                params["method"], work_dir / "adapter", base_model_name=self.model_name,
                density=params.get("density"),
                majority_sign_method=params.get("majority_sign_method", "total"))
        version = await register_version(
            self.registry, self.store, self.base_info, self.limits, job.tenant_id,
            job.adapter_name, merged, f"merge:{job.id}", self.model_name)
        name = f"{job.adapter_name}@{version.version}"
        done = await self.jobs.finish(job.id, self.worker_id, JobStatus.SUCCEEDED,
                                      f"New merged model created: {name}",
                                      fine_tuned_model=name)
        if not done:  # cancelled meanwhile: leave nothing behind
            await self._forget(job, version.version)

    async def _export(self, job: FineTuneJob, work_dir: Path) -> None:
        """The base model with a version merged in, as a model folder in the store under
        exports/<tenant>/<adapter>/<version>/<job-id> (checksummed by the folder marker)."""
        from adapters.training.export import export_merged

        params = job.params or {}
        name = f"{job.adapter_name}@{params['version']}"
        await self.jobs.add_event(job.id, f"Merging {name} into the base model")
        info = {"base_model": self.model_name, "adapter": name, "job": job.id,
                "adapter_sha256": params.get("sha256")}
        async with self._checked_out([params["store_key"]]) as (adapter,):
            files = await asyncio.to_thread(export_merged, self.base_model, adapter,
                                            work_dir / "export", info,
                                            params.get("dtype", "auto"))
        key = export_key(job.tenant_id, job.adapter_name, params["version"], job.id)
        await self.store.put_folder(key, work_dir / "export")
        await self.jobs.finish(job.id, self.worker_id, JobStatus.SUCCEEDED,
                               f"Merged model of {name} exported", fine_tuned_model=name,
                               result={"export": {"store_key": key, "files": files}})

    @contextlib.asynccontextmanager
    async def _checked_out(self, keys: list[str]) -> AsyncIterator[list[Path]]:
        """Local folders of stored adapter versions, held for the block."""
        held: list[str] = []
        try:
            folders = []
            for key in keys:
                folders.append(await self.store.checkout(key))
                held.append(key)
            yield folders
        finally:
            for key in held:
                self.store.release(key)

    async def _forget(self, job: FineTuneJob, version: int) -> None:
        """Remove a version this job registered (the job did not succeed after all)."""
        deleted = await self.registry.delete_version(job.tenant_id, job.adapter_name, version)
        for key in deleted.store_keys:
            await self.store.delete(key)

    async def _losses(self, holdout: list[dict[str, Any]], adapter_dir: Path,
                      settings: EvaluationSettings, shots: list[Case],
                      max_seq_len: int) -> Losses:
        """Held-out loss (assistant tokens) of the base model, the adapter and the prompted
        baseline (None if the few-shot turns leave no answer token within its length)."""
        from adapters.training.trainer import TrainingError, evaluate

        base = await asyncio.to_thread(evaluate, self.base_model, holdout, None, max_seq_len)
        tuned = await asyncio.to_thread(evaluate, self.base_model, holdout, adapter_dir,
                                        max_seq_len)
        prompted_examples = [{"messages": prompted_messages(to_messages(e), settings.prompt,
                                                            shots)} for e in holdout]
        try:  # the turns before make it longer: room for them, so the answer is not cut off
            prompted: EvalResult | None = await asyncio.to_thread(
                evaluate, self.base_model, prompted_examples, None,
                min(max_seq_len * (1 + len(shots)), PROMPTED_MAX_SEQ_LEN))
        except TrainingError as exc:
            log.warning("no prompted-baseline loss: %s", exc)
            prompted = None
        return Losses(base, tuned, prompted)

    async def _report(self, job: FineTuneJob, name: str, holdout: list[dict[str, Any]],
                      pool: list[dict[str, Any]], settings: EvaluationSettings,
                      losses: Losses) -> EvaluationReport:
        """The gateway's report for base, prompted baseline and adapter, with the losses
        added; without a gateway, the losses alone (and why)."""
        report: EvaluationReport | None = None
        errors: list[str] = []
        if self.evaluator is None:
            errors.append("no gateway to evaluate through (the worker has no evaluator)")
        else:
            body = {**settings.model_dump(), "models": [BASE_KEY, name], "examples": holdout,
                    "few_shot_examples": pool or None, "few_shot": len(pool),
                    "prompted_baseline": True, "seed": job.seed}
            try:
                report = EvaluationReport.model_validate(
                    await self.evaluator.evaluate(job.tenant_id, body))
            except (LoraplexError, ValidationError) as exc:
                log.warning("job %s: no evaluation through the engine: %s", job.id, exc)
                errors.append(f"answers through the serving engine: {exc}")
        if report is None:
            report = EvaluationReport(examples=len(holdout), metric=settings.metric, models={
                BASE_KEY: ModelScores(model=self.model_name, kind="base"),
                PROMPTED_KEY: ModelScores(model=self.model_name, kind="prompted"),
                name: ModelScores(model=name, kind="adapter")})
        for key, loss in ((BASE_KEY, losses.base), (PROMPTED_KEY, losses.prompted),
                          (name, losses.adapter)):
            report.models[key].loss = loss.loss if loss is not None else None
        report.errors += errors
        report.best = best(report.models, settings.metric)
        report.improved = beats(report.models[name],
                                [report.models[BASE_KEY], report.models[PROMPTED_KEY]],
                                settings.metric)
        return report

    async def _progress(self, job_id: str, p: Progress, config: TrainConfig,
                        mirror: CheckpointMirror) -> None:
        # The trainer writes a checkpoint right after reporting its step: the one of an earlier
        # step is complete by now, and goes to the store.
        await mirror.push()
        data = {k: v for k, v in asdict(p).items() if isinstance(v, (int, float))}
        if p.step % CHECKPOINT_EVERY_STEPS == 0 or p.step == p.total_steps:
            await self.jobs.add_event(
                job_id, f"Step {p.step}/{p.total_steps}: training loss={p.loss:.4f}",
                type_="metrics", data=data)
        # The trainer saves a checkpoint every N steps, except at the end (the adapter is saved).
        if p.step % config.checkpoint_every_steps == 0 and p.step < p.total_steps:
            await self.jobs.add_checkpoint(job_id, p.step, {"train_loss": p.loss})
        await self.jobs.update_job(job_id, result={"progress": p.step / max(p.total_steps, 1)})


@dataclass
class Losses:
    """Held-out losses computed by the worker (the prompted baseline's may be missing)."""

    base: EvalResult
    adapter: EvalResult
    prompted: EvalResult | None

    def figures(self, examples: int) -> dict[str, Any]:
        """The job's `eval` object (kept as before issue 14, plus the prompted loss)."""
        return {"base_loss": self.base.loss, "base_perplexity": self.base.perplexity,
                "adapter_loss": self.adapter.loss, "adapter_perplexity": self.adapter.perplexity,
                "prompted_loss": self.prompted.loss if self.prompted else None,
                "holdout_examples": examples}

    def summary(self) -> str:
        prompted = f"prompted {self.prompted.loss:.4f}, " if self.prompted else ""
        return (f"Held-out loss: base {self.base.loss:.4f}, {prompted}"
                f"adapter {self.adapter.loss:.4f}")


def _example(case: Case) -> dict[str, Any]:
    """A case as a chat example again (the prompt and its reference answer)."""
    return {"messages": [*case.prompt, {"role": "assistant", "content": case.reference}]}


def _summary(report: EvaluationReport) -> str:
    def figure(value: float | None) -> str:
        return "-" if value is None else f"{value:.3f}"

    columns = ", ".join(f"{key} {figure(getattr(m, report.metric))}"
                        for key, m in report.models.items())
    return f"Evaluation on {report.examples} held-out examples, {report.metric}: {columns}"
