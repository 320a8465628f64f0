"""`loraplex jobs follow`: poll a job and its events until it ends, with a live progress bar
(status, step/total, training loss) and each event as a line above it.

The job is read before its events on every poll: a job's move to a final status and its
last event are written together, so once the job reads final every event is there to read.
A server that stops answering for a while (a restart) is retried, not given up on at once.
"""

from __future__ import annotations

import argparse
import signal
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from types import FrameType
from typing import Any, TypeVar

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn, TimeElapsedColumn
from rich.text import Text

from adapters.training.jobs import FINAL, JobStatus
from server.admin_cli.client import AdminClient, path
from server.admin_cli.errors import INTERRUPTED, JOB_NOT_SUCCEEDED, OK, Unreachable
from server.admin_cli.output import Output, status, when

EVENT_PAGE = 100
UNREACHABLE_RETRIES = 10
FINAL_VALUES = {s.value for s in FINAL}
T = TypeVar("T")
LEVEL_STYLES = {"error": "red", "warn": "yellow"}


class EventFeed:
    """The events not seen yet, oldest first (the API pages newest first)."""

    def __init__(self, client: AdminClient, url: str) -> None:
        self.client, self.url = client, url
        self.seen: set[str] = set()
        self.started = False

    def new(self) -> list[dict[str, Any]]:
        fresh: list[dict[str, Any]] = []
        after: str | None = None
        while True:
            page = self.client.get(self.url, params={"limit": EVENT_PAGE, "after": after})
            unseen = [e for e in page["data"] if e["id"] not in self.seen]
            fresh += unseen
            # Stop at the first page that reaches known events; the first poll shows one page.
            if len(unseen) < len(page["data"]) or not page["has_more"] or not self.started:
                break
            after = page["data"][-1]["id"]
        self.started = True
        self.seen.update(e["id"] for e in fresh)
        return list(reversed(fresh))


class FollowView:
    """The live bar and event lines for a person (nothing of it with --json)."""

    def __init__(self, console: Console, job_id: str) -> None:
        self.progress = Progress(TextColumn("{task.description}"), BarColumn(),
                                 MofNCompleteColumn(), TextColumn("{task.fields[loss]}"),
                                 TimeElapsedColumn(), console=console)
        self.task: TaskID = self.progress.add_task(job_id, total=None, loss="")

    def event(self, e: dict[str, Any]) -> None:
        line = Text(f"{when(e['created_at'])}  ", style="dim")
        line.append(e["message"], style=LEVEL_STYLES.get(e["level"], ""))
        self.progress.console.print(line, soft_wrap=True)
        data = e.get("data") or {}
        if isinstance(data.get("step"), int) and isinstance(data.get("total_steps"), int):
            loss = data.get("loss")
            self.progress.update(self.task, completed=data["step"], total=data["total_steps"],
                                 loss=f"loss {loss:.4f}" if isinstance(loss, (int, float)) else "")

    def job(self, job: dict[str, Any]) -> None:
        self.progress.update(self.task, description=f"{job['id']} {job['status']}")


def follow(args: argparse.Namespace, client: AdminClient, out: Output) -> int:
    job_url = path("admin", "fine_tuning", "jobs", args.job_id)
    feed = EventFeed(client, f"{job_url}/events")
    job = client.get(job_url)  # a wrong id, token or URL fails here, at once, not retried
    view = None if out.as_json else FollowView(out.out, args.job_id)
    try:
        with _ctrl_c() as stop:
            if view is not None:
                view.progress.start()
            while not stop.is_set():
                for event in _retrying(feed.new, out, args.interval):
                    if view is None:
                        out.json_line(event)
                    else:
                        view.event(event)
                if view is not None:
                    view.job(job)
                if job["status"] in FINAL_VALUES or stop.wait(args.interval):
                    break
                job = _retrying(lambda: client.get(job_url), out, args.interval)
    except KeyboardInterrupt:  # a second Ctrl-C, while a call hung
        stop.set()
    finally:
        if view is not None:
            view.progress.stop()  # before the note, which would otherwise print above the bar
    if stop.is_set():
        out.note(f"Stopped following {args.job_id}; the job goes on.")
        return INTERRUPTED
    return _ended(job, out)


@contextmanager
def _ctrl_c() -> Iterator[threading.Event]:
    """An event Ctrl-C sets, checked between polls. A KeyboardInterrupt raised wherever the
    signal lands (inside httpx's or rich's locks) could leave a lock held and the command
    hung; only a second Ctrl-C raises one. Off the main thread (signals cannot be handled
    there) the event is never set."""
    stop = threading.Event()
    if threading.current_thread() is not threading.main_thread():
        yield stop
        return

    def on_sigint(signum: int, frame: FrameType | None) -> None:
        if stop.is_set():
            raise KeyboardInterrupt
        stop.set()

    previous = signal.signal(signal.SIGINT, on_sigint)
    try:
        yield stop
    finally:
        signal.signal(signal.SIGINT, previous)


def held_out(evaluation: dict[str, Any]) -> str:
    """The final evaluation: the adapter's held-out loss next to the base model's."""
    base, tuned = evaluation.get("base_loss"), evaluation.get("adapter_loss")
    if isinstance(base, (int, float)) and isinstance(tuned, (int, float)):
        verdict = "better than" if tuned < base else "not better than"
        return f"adapter {tuned:.4f}, base model {base:.4f} ({verdict} the base model)"
    return str(evaluation)


def _retrying(call: Callable[[], T], out: Output, interval: float) -> T:
    """`call()`, retried while the server is unreachable (a restart), at most so many times."""
    failures = 0
    while True:
        try:
            return call()
        except Unreachable as exc:
            failures += 1
            if failures > UNREACHABLE_RETRIES:
                raise
            out.note(f"{exc.message}; retrying", "yellow")
            time.sleep(max(interval, 1.0))


def _ended(job: dict[str, Any], out: Output) -> int:
    if out.as_json:
        out.json_line(job)
    else:
        line = Text(f"Job {job['id']} ")
        line.append_text(status(job["status"]))
        if job.get("fine_tuned_model"):
            line.append(f": {job['organization_id']} can call model {job['fine_tuned_model']}")
        error = job.get("error")
        if error:
            line.append(f": {error.get('code')}: {error.get('message')}", style="red")
        out.out.print(line, soft_wrap=True)
        evaluation = job.get("eval") or {}
        if evaluation:
            out.line(f"Held-out loss: {held_out(evaluation)}")
    return OK if job["status"] == JobStatus.SUCCEEDED.value else JOB_NOT_SUCCEEDED
