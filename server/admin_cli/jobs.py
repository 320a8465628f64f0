"""`loraplex jobs list|show|events|follow|cancel`: every tenant's fine-tuning jobs (admin view)."""

from __future__ import annotations

import argparse
from typing import Any

from rich.text import Text

from adapters.training.jobs import STATUSES
from server.admin_cli.client import AdminClient, path
from server.admin_cli.command import Subparsers, action, confirm, group, positive
from server.admin_cli.follow import follow, held_out
from server.admin_cli.output import Output, status, when

SHOWN_EVENTS = 10


def add(sub: Subparsers, common: argparse.ArgumentParser) -> None:
    jobs = group(sub, "jobs", "admin: fine-tuning jobs of every tenant (list, show, events, "
                              "follow, cancel)")
    p = action(jobs, "list", "list jobs, newest first", list_, common)
    p.add_argument("--tenant", help="only this tenant's")
    p.add_argument("--status", choices=[str(s) for s in STATUSES])
    p.add_argument("--limit", type=int, default=20, help="jobs per page, 1-100 (default 20)")
    p.add_argument("--after", metavar="JOB_ID", help="the page after this job")
    p = action(jobs, "show", "a job's details and latest events", show, common)
    p.add_argument("job_id")
    p = action(jobs, "events", "a job's events, newest first", events, common)
    p.add_argument("job_id")
    p.add_argument("--limit", type=int, default=50, help="events, 1-1000 (default 50)")
    p = action(jobs, "follow", "follow a job live until it ends (step/total, loss); exit "
                               "code 0 if it succeeded, 4 if it failed or was cancelled",
               follow, common)
    p.add_argument("job_id")
    p.add_argument("--interval", type=positive, default=1.0, metavar="S",
                   help="seconds between polls (default 1)")
    p = action(jobs, "cancel", "cancel a queued or running job (fine-tuning, merge or export); "
                               "it registers nothing", cancel, common)
    p.add_argument("job_id")
    p.add_argument("--yes", action="store_true", help="do not ask for confirmation")


def job_url(job_id: str, *rest: str) -> str:
    return path("admin", "fine_tuning", "jobs", job_id, *rest)


def _model(job: dict[str, Any]) -> str | None:
    return job.get("fine_tuned_model") or job.get("suffix")


def list_(args: argparse.Namespace, client: AdminClient, out: Output) -> None:
    page = client.get("/admin/fine_tuning/jobs", params={
        "tenant": args.tenant, "status": args.status, "limit": args.limit, "after": args.after})
    if out.as_json:
        out.data(page)
        return
    out.table(["job", "tenant", "status", "adapter", "created", "finished", "error"], (
        [j["id"], j["organization_id"], status(j["status"]), _model(j), when(j["created_at"]),
         when(j["finished_at"]), (j.get("error") or {}).get("code")] for j in page["data"]),
        empty="no jobs")
    if page["has_more"]:
        out.note(f"more: loraplex jobs list --after {page['data'][-1]['id']}")


def show(args: argparse.Namespace, client: AdminClient, out: Output) -> None:
    job = client.get(job_url(args.job_id))
    if out.as_json:
        out.data(job)
        return
    hp, lora = job["hyperparameters"], job.get("lora") or {}
    error = job.get("error")
    evaluation = job.get("eval") or {}
    out.fields([
        ("job", job["id"]), ("tenant", job["organization_id"]), ("status", status(job["status"])),
        ("fine-tuned model", job.get("fine_tuned_model")), ("suffix", job.get("suffix")),
        ("base model", job["model"]), ("training file", job["training_file"]),
        ("validation file", job.get("validation_file")),
        ("hyperparameters", f"epochs {hp.get('n_epochs')}, batch {hp.get('batch_size')}, "
                            f"lr x{hp.get('learning_rate_multiplier')}"),
        ("lora", f"r {lora.get('r')}, alpha {lora.get('alpha')}"),
        ("trained tokens", job.get("trained_tokens")),
        ("created", when(job["created_at"])), ("finished", when(job.get("finished_at"))),
        *([("error", f"{error.get('code')}: {error.get('message')}")] if error else []),
        *([("held-out loss", held_out(evaluation))] if evaluation else []),
    ])
    recent = client.get(job_url(args.job_id, "events"), params={"limit": SHOWN_EVENTS})
    _events_table(out, recent["data"], f"latest {SHOWN_EVENTS} events" if recent["has_more"]
                  else "events (newest first)")


def events(args: argparse.Namespace, client: AdminClient, out: Output) -> None:
    page = client.get(job_url(args.job_id, "events"), params={"limit": args.limit})
    if out.as_json:
        out.data(page)
        return
    _events_table(out, page["data"], "events (newest first)")


def _events_table(out: Output, data: list[dict[str, Any]], title: str) -> None:
    out.table(["time", "level", "message"],
              ([when(e["created_at"]), e["level"], e["message"]] for e in data),
              title=title, empty="no events")


def cancel(args: argparse.Namespace, client: AdminClient, out: Output) -> None:
    confirm(f"Cancel job {args.job_id}?", args.yes)
    job = client.post(job_url(args.job_id, "cancel"))
    if out.as_json:
        out.data(job)
        return
    line = Text(f"Job {job['id']} of {job['organization_id']} ")
    line.append_text(status(job["status"]))
    out.out.print(line, soft_wrap=True)
