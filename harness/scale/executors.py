"""Where the jobs of a grid run: one after another in this process (`local`), or as Ray tasks (`ray`).

A job is a module-level function and its arguments: `harness.training.runner.run(spec, options)` for a
training run, the `eval` command's own function with one target for an evaluation. Both executors
call that same function with the same arguments, so neither the runner nor a defense knows which
executor called it, and a record does not depend on it. The one thing an executor sets is the
number of torch threads, which changes results in the last digit: the record says it
(`environment.device.torch_threads`), and executors are compared at equal thread counts.

Ray (the optional extra `harness[ray]`) gives each job a task with its resource share
(`--cpus-per-run`, which is also its thread count, and `--gpus-per-run`, fractions allowed). A task
whose worker died (killed, out of memory, node lost) is submitted again with the job's
`retry_args` (`--resume`, never `--force`), so it continues from its last checkpoint. What a job
prints reaches the driver line by line through a Ray queue, prefixed with the job's label.
"""

from __future__ import annotations

import io
import os
import socket
import time
import traceback
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager, redirect_stdout
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from harness.core.errors import HarnessError
from harness.storage.locks import LockedError

Say = Callable[[str], None]
RAY_HINT = "pip install 'harness[ray]'"


@dataclass(frozen=True)
class Job:
    label: str  # names the job in progress lines and errors, e.g. "pgd-at/cifar10/seed1"
    fn: Callable[..., Any]  # module-level, so Ray sends it by reference
    args: tuple
    retry_args: tuple | None = None  # the arguments of a retry after the worker died: resume, never force


@dataclass(frozen=True)
class Outcome:
    job: Job
    value: Any = None
    error: str | None = None  # set when the job failed; `value` is then None
    attempts: int = 1
    in_use: bool = False  # it failed because another live process holds it: still running there


def failure(
    job: Job, reason: str, say: Say, trace: str | None = None, attempts: int = 1, in_use: bool = False
) -> Outcome:
    """The outcome of a failed job. Its reason is kept for the summary (printed once, there); the
    traceback of an unexpected exception (a bug) is shown now, labelled, so it can still be found."""
    if trace:
        say("\n".join(f"[{job.label}] {line}" for line in trace.rstrip().splitlines()))
    say(f"[{job.label}] {'in use elsewhere' if in_use else 'failed'} (reason in the summary at the end)")
    return Outcome(job, error=reason, attempts=attempts, in_use=in_use)


def reason_of(exc: BaseException) -> str:
    return str(exc) if isinstance(exc, HarnessError) else f"{type(exc).__name__}: {exc}"


def raise_failures(outcomes: list[Outcome], noun: str = "job") -> None:
    """One line naming every failed job with its reason, for callers without a summary; nothing when all passed."""
    failed = [o for o in outcomes if o.error is not None]
    if failed:
        raise HarnessError(
            f"{len(failed)} of {len(outcomes)} {noun}s failed: "
            + "; ".join(f"{o.job.label}: {o.error}" for o in failed)
        )


def execute_all(
    executor: Executor,
    jobs: list[Job],
    say: Say,
    noun: str = "job",
    skipped: frozenset[str] = frozenset(),
    on_outcome: Callable[[Outcome], None] = lambda _: None,
) -> list[Outcome]:
    """Every job through `executor`, then `summarise`; an interrupted command still prints its summary."""
    outcomes: list[Outcome] = []
    try:
        for outcome in executor.execute(jobs, say):
            outcomes.append(outcome)
            on_outcome(outcome)
    except KeyboardInterrupt:
        summarise(outcomes, jobs, say, noun, skipped, interrupted=True)
        raise
    summarise(outcomes, jobs, say, noun, skipped)
    return outcomes


def summarise(
    outcomes: list[Outcome],
    jobs: list[Job],
    say: Say,
    noun: str = "job",
    skipped: frozenset[str] = frozenset(),
    interrupted: bool = False,
) -> None:
    """The end-of-grid summary, and a HarnessError unless every job is done (or was skipped).

    Counts done / skipped (labels in `skipped`: complete before the command) / failed / still
    running (in use by another process) / not finished (the command was interrupted first); one line
    per job that is not done, with its reason. Each failure's reason is printed here only. A single
    job has no summary: its error is the command's one line. `interrupted`: print, raise nothing.
    """
    if len(jobs) == 1 and not interrupted:
        if outcomes and outcomes[0].error is not None:
            raise (LockedError if outcomes[0].in_use else HarnessError)(outcomes[0].error)
        return
    position = {job.label: i for i, job in enumerate(jobs)}  # job order, not completion order (Ray)
    outcomes = sorted(outcomes, key=lambda o: position.get(o.job.label, len(jobs)))
    finished = {o.job.label: o for o in outcomes}
    failed = [o for o in outcomes if o.error is not None and not o.in_use]
    busy = [o for o in outcomes if o.in_use]
    unfinished = [j for j in jobs if j.label not in finished]
    ok = [o for o in outcomes if o.error is None]
    n_skipped = sum(o.job.label in skipped for o in ok)
    counts = {
        "done": len(ok) - n_skipped,
        "skipped (already complete)": n_skipped,
        "failed": len(failed),
        "still running in another process": len(busy),
        "not finished": len(unfinished),
    }
    _say_summary(say, f"{len(jobs)} {noun}s", counts, failed, busy, unfinished)
    if interrupted:
        return
    if failed:
        raise HarnessError(
            f"{len(failed)} of {len(jobs)} {noun}s failed (reasons in the summary above): "
            + ", ".join(o.job.label for o in failed)
        )
    if busy:
        raise LockedError(
            f"{len(busy)} of {len(jobs)} {noun}s are still running in another process; "
            f"rerun this command once they finish (complete {noun}s are skipped)"
        )


def _say_summary(
    say: Say, total: str, counts: dict[str, int], failed: list[Outcome], busy: list[Outcome], unfinished: list[Job]
) -> None:
    """The summary line (done and failed always, other kinds when present), then one line per job not done."""
    say(
        f"summary: {total}: "
        + ", ".join(f"{n} {what}" for what, n in counts.items() if n or what in ("done", "failed"))
    )
    for o in failed:
        say(f"  failed   {o.job.label}: {o.error}")
    for o in busy:
        say(f"  running  {o.job.label}: {o.error}")
    for job in unfinished:
        say(f"  not run  {job.label}")


@contextmanager
def torch_threads(threads: int | None) -> Iterator[None]:
    import torch  # not at import time: `harness --help` stays fast

    previous = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


# --------------------------------------------------------------------------- local


@dataclass(frozen=True)
class LocalExecutor:
    """Jobs one after another in this process, as `harness run` always did."""

    threads: int | None = None  # torch threads; None: torch's default (every core)
    catch_all: bool = True  # False under torchrun: a rank's unexpected error must end every rank, not desync them

    def execute(self, jobs: list[Job], say: Say) -> Iterator[Outcome]:
        """Outcomes in job order; a job that raises (a HarnessError, or a bug) fails alone and the next runs."""
        caught = Exception if self.catch_all else HarnessError
        with torch_threads(self.threads):
            for i, job in enumerate(jobs, 1):
                say(f"[{i}/{len(jobs)}] {job.label}")
                try:
                    value = job.fn(*job.args)
                except caught as exc:
                    trace = None if isinstance(exc, HarnessError) else traceback.format_exc()
                    yield failure(job, reason_of(exc), say, trace, in_use=isinstance(exc, LockedError))
                else:
                    yield Outcome(job, value)


# --------------------------------------------------------------------------- ray


def import_ray():
    try:
        import ray
    except ImportError:
        raise HarnessError(f"--executor ray needs Ray, an optional extra: {RAY_HINT}") from None
    return ray


def code_identity() -> dict[str, Any]:
    """What must match between the driver and every worker for their records to be comparable."""
    from harness.core.environment import git_state, package_versions

    versions = package_versions()
    return {"commit": git_state()["commit"], "harness": versions["harness"], "torch": versions["torch"]}


@dataclass(frozen=True)
class WorkerContext:
    """What a Ray task checks and sets before it calls its job."""

    threads: int
    code: dict[str, Any]  # the driver's code_identity()
    marker: Path | None  # a file the driver wrote in the shared results directory

    def prepare(self) -> None:
        import torch

        node = socket.gethostname()
        mine = code_identity()
        if mine != self.code:
            raise HarnessError(
                f"node {node} runs {mine} but the driver runs {self.code}: install the same "
                f"harness commit and torch on every Ray node"
            )
        if self.marker is not None and not self.marker.exists():
            raise HarnessError(
                f"node {node} does not see {self.marker.parent} as the driver does: --results "
                f"must be a directory every Ray node shares (NFS or similar), or runs cannot "
                f"resume on another node"
            )
        torch.set_num_threads(self.threads)


class QueueLines(io.TextIOBase):
    """A text stream that sends each complete line, labelled, to a Ray queue the driver reads."""

    def __init__(self, queue, label: str):
        self.queue, self.label, self.pending = queue, label, ""

    def writable(self) -> bool:
        return True

    def write(self, text: str) -> int:
        *lines, self.pending = (self.pending + text).split("\n")
        for line in lines:
            self.queue.put((self.label, line.rstrip("\r")))
        return len(text)

    def flush(self) -> None:
        if self.pending:
            self.queue.put((self.label, self.pending))
            self.pending = ""


def run_job(fn: Callable[..., Any], args: tuple, label: str, lines, context: WorkerContext) -> Any:
    """The body of every Ray task: check the node, set the threads, call the job with its output relayed."""
    import torch

    context.prepare()
    out = QueueLines(lines, label)
    out.write(f"started on {socket.gethostname()} (pid {os.getpid()}, {torch.get_num_threads()} torch thread(s))\n")
    try:
        with redirect_stdout(out):
            return fn(*args)
    finally:
        out.flush()


def task_error(exc: Exception) -> tuple[str, str | None]:
    """(one-line message, traceback to show or None) for an exception a job raised in a Ray worker."""
    cause = getattr(exc, "cause", None)
    if isinstance(cause, HarnessError):
        return str(cause), None
    name = type(cause).__name__ if cause is not None else type(exc).__name__
    return f"{name}: {cause if cause is not None else exc}", str(exc)


def cluster_line(ray) -> str:
    """What the cluster has free now, for the message of jobs that wait."""
    free, have = ray.available_resources(), ray.cluster_resources()
    return ", ".join(f"{free.get(kind, 0):g} of {have.get(kind, 0):g} {kind}(s) free" for kind in ("CPU", "GPU"))


@dataclass(frozen=True)
class RayExecutor:
    """Each job a Ray task; a local Ray instance unless `address` names a cluster."""

    address: str | None = None  # None: start a local instance ("auto": the cluster this machine is in)
    cpus_per_run: int = 1
    gpus_per_run: float = 0.0
    max_retries: int = 3
    shared_dir: Path | None = None  # the results directory every worker must see as the driver does
    num_cpus: int | None = None  # size of a local instance; None: every core
    poll_seconds: float = 0.5
    start_warning_seconds: float = 60.0  # say so once when no job has started for this long

    def execute(self, jobs: list[Job], say: Say) -> Iterator[Outcome]:
        """Outcomes in completion order, each after every line its job printed."""
        ray = import_ray()
        owned = self._connect(ray, say)
        lines = None
        pending: dict[Any, tuple[Job, int]] = {}
        try:
            self._check_resources(ray, say, local=owned and self.address is None)
            from ray.util.queue import Queue

            lines = Queue(actor_options={"num_cpus": 0})
            with self._marker() as marker:
                context = WorkerContext(self.cpus_per_run, code_identity(), marker)
                submit = self._submitter(ray, pending, lines, context)
                for job in jobs:
                    submit(job, 1)
                yield from self._collect(ray, pending, submit, lines, say)
        finally:
            for ref in pending:  # interrupted: a connection this process does not own keeps no orphan tasks
                ray.cancel(ref)
            if lines is not None:
                lines.shutdown()
            if owned:
                ray.shutdown()

    def _submitter(
        self, ray, pending: dict[Any, tuple[Job, int]], lines, context: WorkerContext
    ) -> Callable[[Job, int], None]:
        """submit(job, attempt): one Ray task; a retry (attempt > 1) takes the job's retry arguments."""
        task = ray.remote(run_job).options(
            num_cpus=self.cpus_per_run, num_gpus=self.gpus_per_run, max_retries=0, name="harness-job"
        )

        def submit(job: Job, attempt: int) -> None:
            args = job.args if attempt == 1 else (job.retry_args or job.args)
            pending[task.remote(job.fn, args, job.label, lines, context)] = (job, attempt)

        return submit

    def _collect(self, ray, pending: dict[Any, tuple[Job, int]], submit, lines, say: Say) -> Iterator[Outcome]:
        """Wait for the tasks, relaying their lines first and warning about jobs that cannot start."""
        waiting = StartWatch(self.start_warning_seconds, self.cpus_per_run, self.gpus_per_run)
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1, timeout=self.poll_seconds)
            waiting.started |= _relay(lines, say)  # a finished task's lines are all queued: they come first
            waiting.check(ray, say, len(pending))
            for ref in ready:
                job, attempt = pending.pop(ref)
                waiting.started.add(job.label)
                outcome = self._outcome(ray, ref, job, attempt, submit, say)
                if outcome is not None:
                    yield outcome

    def _outcome(self, ray, ref, job: Job, attempt: int, submit, say: Say) -> Outcome | None:
        """A finished task's outcome; None when a lost worker's job was resubmitted (it resumes)."""
        lost = (
            ray.exceptions.WorkerCrashedError,
            ray.exceptions.NodeDiedError,
            ray.exceptions.OutOfMemoryError,
            ray.exceptions.ObjectLostError,
        )
        try:
            value = ray.get(ref)
        except lost as exc:
            if attempt <= self.max_retries:
                say(
                    f"[{job.label}] worker lost ({type(exc).__name__}); attempt {attempt + 1} "
                    f"of {self.max_retries + 1} resumes from the last checkpoint"
                )
                submit(job, attempt + 1)
                return None
            return failure(
                job, f"worker lost on each of {attempt} attempts ({type(exc).__name__})", say, attempts=attempt
            )
        except ray.exceptions.RayTaskError as exc:
            message, trace = task_error(exc)
            return failure(
                job, message, say, trace, attempt, in_use=isinstance(getattr(exc, "cause", None), LockedError)
            )
        return Outcome(job, value, attempts=attempt)

    def _connect(self, ray, say: Say) -> bool:
        """Join `address`, or start a local instance; False when this process was already connected."""
        if ray.is_initialized():
            say("ray: using this process's Ray connection")
            return False
        try:
            if self.address is None:
                ray.init(address="local", num_cpus=self.num_cpus, include_dashboard=False, logging_level="WARNING")
            else:
                ray.init(address=self.address, logging_level="WARNING")
        except ConnectionError as exc:
            raise HarnessError(f"cannot reach the Ray cluster at --address {self.address}: {exc}") from None
        return True

    def _check_resources(self, ray, say: Say, local: bool) -> None:
        have = ray.cluster_resources()
        cpus, gpus = have.get("CPU", 0), have.get("GPU", 0)
        where = "a local instance" if local else f"the cluster at {self.address or 'this connection'}"
        say(
            f"ray: {where} with {cpus:g} CPU(s) and {gpus:g} GPU(s); each job takes {self.cpus_per_run} "
            f"CPU(s) (= torch threads) and {self.gpus_per_run:g} GPU(s)"
        )
        short = [
            f"{need:g} {kind} per job but {'it has' if local else 'the cluster has now'} {got:g}"
            for kind, need, got in (("CPU(s)", self.cpus_per_run, cpus), ("GPU(s)", self.gpus_per_run, gpus))
            if need > got
        ]
        if short and local:
            raise HarnessError(f"--executor ray asks for {'; '.join(short)}: lower --cpus-per-run/--gpus-per-run")
        for line in short:  # a cluster may still grow (autoscaler): wait, but say so
            say(f"ray: {line}; jobs wait until a node that has them joins")
        if gpus and not self.gpus_per_run:
            say(
                f"ray: warning: {where} has {gpus:g} GPU(s) but --gpus-per-run is 0, so every run trains on a "
                f"CPU; pass --gpus-per-run 1 (or a fraction such as 0.5) to train on the GPUs"
            )

    @contextmanager
    def _marker(self) -> Iterator[Path | None]:
        if self.shared_dir is None:
            yield None
            return
        from harness.storage.atomic import ensure_writable_dir

        ensure_writable_dir(Path(self.shared_dir), "--results")
        marker = Path(self.shared_dir).resolve() / f".harness-driver-{uuid.uuid4().hex[:12]}"
        marker.write_text(f"{socket.gethostname()} pid {os.getpid()}\n")
        try:
            yield marker
        finally:
            marker.unlink(missing_ok=True)


@dataclass
class StartWatch:
    """Says once, in one line, when no job has started for a while: a busy or GPU-less cluster is not a hang."""

    seconds: float
    cpus: int
    gpus: float
    started: set[str] = field(default_factory=set)
    since: float = field(default_factory=time.monotonic)
    warned: bool = False

    def check(self, ray, say: Say, waiting: int) -> None:
        if self.started or self.warned or time.monotonic() - self.since < self.seconds:
            return
        self.warned = True
        say(
            f"ray: no job has started after {self.seconds:g} s: each needs {self.cpus} CPU(s) and {self.gpus:g} "
            f"GPU(s) and the cluster has {cluster_line(ray)}; {waiting} job(s) wait for them (Ctrl-C stops)"
        )


def _relay(lines, say: Say) -> set[str]:
    """Print what the jobs sent; the labels of the jobs that sent something (so they have started)."""
    count = lines.qsize()
    labels = set()
    if count:
        for label, text in lines.get_nowait_batch(count):
            say(f"[{label}] {text}")
            labels.add(label)
    return labels


Executor = LocalExecutor | RayExecutor
