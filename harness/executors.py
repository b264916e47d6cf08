"""Where the jobs of a grid run: one after another in this process (`local`), or as Ray tasks (`ray`).

A job is a module-level function and its arguments: `harness.runner.run(spec, options)` for a
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
import uuid
from contextlib import contextmanager, redirect_stdout
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

from harness.errors import HarnessError

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


def raise_failures(outcomes: list[Outcome], noun: str = "job") -> None:
    """One line naming every failed job (each was reported when it failed); nothing when all passed."""
    failed = [o for o in outcomes if o.error is not None]
    if len(outcomes) == 1 and failed:  # one job: its own error is the command's one line
        raise HarnessError(failed[0].error)
    if failed:
        raise HarnessError(f"{len(failed)} of {len(outcomes)} {noun}s failed (errors above): "
                           + ", ".join(o.job.label for o in failed))


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

    def execute(self, jobs: list[Job], say: Say) -> Iterator[Outcome]:
        """Outcomes in job order; a job's HarnessError is reported and the next job runs."""
        with torch_threads(self.threads):
            for i, job in enumerate(jobs, 1):
                say(f"[{i}/{len(jobs)}] {job.label}")
                try:
                    value = job.fn(*job.args)
                except HarnessError as exc:
                    say(f"[{job.label}] failed: {exc}")
                    yield Outcome(job, error=str(exc))
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
    from harness.environment import git_state, package_versions

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
            raise HarnessError(f"node {node} runs {mine} but the driver runs {self.code}: install the same "
                               f"harness commit and torch on every Ray node")
        if self.marker is not None and not self.marker.exists():
            raise HarnessError(f"node {node} does not see {self.marker.parent} as the driver does: --results "
                               f"must be a directory every Ray node shares (NFS or similar), or runs cannot "
                               f"resume on another node")
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
    out.write(f"started on {socket.gethostname()} (pid {os.getpid()}, {torch.get_num_threads()} "
              f"torch thread(s))\n")
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

    def execute(self, jobs: list[Job], say: Say) -> Iterator[Outcome]:
        """Outcomes in completion order, each after every line its job printed."""
        ray = import_ray()
        lost = (ray.exceptions.WorkerCrashedError, ray.exceptions.NodeDiedError,
                ray.exceptions.OutOfMemoryError, ray.exceptions.ObjectLostError)
        owned = self._connect(ray, say)
        lines = None
        try:
            self._check_resources(ray, say, local=owned and self.address is None)
            from ray.util.queue import Queue

            lines = Queue(actor_options={"num_cpus": 0})
            task = ray.remote(run_job).options(num_cpus=self.cpus_per_run, num_gpus=self.gpus_per_run,
                                               max_retries=0, name="harness-job")
            with self._marker() as marker:
                context = WorkerContext(self.cpus_per_run, code_identity(), marker)
                pending: dict[Any, tuple[Job, int]] = {}

                def submit(job: Job, attempt: int) -> None:
                    args = job.args if attempt == 1 else (job.retry_args or job.args)
                    pending[task.remote(job.fn, args, job.label, lines, context)] = (job, attempt)

                for job in jobs:
                    submit(job, 1)
                while pending:
                    ready, _ = ray.wait(list(pending), num_returns=1, timeout=self.poll_seconds)
                    _relay(lines, say)  # a finished task's lines are all queued (put blocks): they come first
                    for ref in ready:
                        job, attempt = pending.pop(ref)
                        try:
                            value = ray.get(ref)
                        except lost as exc:
                            if attempt <= self.max_retries:
                                say(f"[{job.label}] worker lost ({type(exc).__name__}); attempt {attempt + 1} "
                                    f"of {self.max_retries + 1} resumes from the last checkpoint")
                                submit(job, attempt + 1)
                                continue
                            message = f"worker lost on each of {attempt} attempts ({type(exc).__name__})"
                            say(f"[{job.label}] failed: {message}")
                            yield Outcome(job, error=message, attempts=attempt)
                        except ray.exceptions.RayTaskError as exc:
                            message, trace = task_error(exc)
                            if trace:
                                say(trace)
                            say(f"[{job.label}] failed: {message}")
                            yield Outcome(job, error=message, attempts=attempt)
                        else:
                            yield Outcome(job, value, attempts=attempt)
        finally:
            if lines is not None:
                lines.shutdown()
            if owned:
                ray.shutdown()

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
        say(f"ray: {where} with {cpus:g} CPU(s) and {gpus:g} GPU(s); each job takes {self.cpus_per_run} "
            f"CPU(s) (= torch threads) and {self.gpus_per_run:g} GPU(s)")
        short = [f"{need:g} {kind} per job but {'it has' if local else 'the cluster has now'} {got:g}"
                 for kind, need, got in (("CPU(s)", self.cpus_per_run, cpus), ("GPU(s)", self.gpus_per_run, gpus))
                 if need > got]
        if short and local:
            raise HarnessError(f"--executor ray asks for {'; '.join(short)}: lower --cpus-per-run/--gpus-per-run")
        for line in short:  # a cluster may still grow (autoscaler): wait, but say so
            say(f"ray: {line}; jobs wait until a node that has them joins")

    @contextmanager
    def _marker(self) -> Iterator[Path | None]:
        if self.shared_dir is None:
            yield None
            return
        from harness.storage import ensure_writable_dir

        ensure_writable_dir(Path(self.shared_dir), "--results")
        marker = Path(self.shared_dir).resolve() / f".harness-driver-{uuid.uuid4().hex[:12]}"
        marker.write_text(f"{socket.gethostname()} pid {os.getpid()}\n")
        try:
            yield marker
        finally:
            marker.unlink(missing_ok=True)


def _relay(lines, say: Say) -> None:
    count = lines.qsize()
    if count:
        for label, text in lines.get_nowait_batch(count):
            say(f"[{label}] {text}")


Executor = LocalExecutor | RayExecutor
