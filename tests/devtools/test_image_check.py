"""``make image-check`` must fail on each way an image or a deploy file can be broken without Docker
noticing until deploy time: a forgotten file, a lint finding, a misspelt field, an undeclared
substitution, a job without the socket of an instance its manifest uses."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from devtools import dockerfile, image_check
from devtools.deploy_schema import Build, substitution_problems

REPO = Path(__file__).resolve().parents[2]
SHIPPED = ["Dockerfile", ".dockerignore", "pyproject.toml", "uv.lock", "README.md", "cloudbuild.yaml"]


@pytest.fixture
def checkout(tmp_path: Path) -> Path:
    """A copy of the files image-check reads, to break one at a time."""
    for name in SHIPPED:
        shutil.copy2(REPO / name, tmp_path / name)
    for folder in ("job", "services", "deploy", "devtools"):
        shutil.copytree(REPO / folder, tmp_path / folder, ignore=shutil.ignore_patterns("__pycache__"))
    return tmp_path


def run_check(repo: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """Run image-check on a checkout as make does; return the finished process."""
    return subprocess.run(
        [sys.executable, "-m", "devtools.image_check", "--repo", str(repo), *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=False,
    )


def edit(path: Path, old: str, new: str) -> None:
    """Replace text that must be there."""
    text = path.read_text()
    assert old in text, f"{old!r} not in {path}"
    path.write_text(text.replace(old, new))


def test_the_shipped_files_pass_the_static_checks() -> None:
    assert image_check.static_checks(REPO) == []


@pytest.mark.long
def test_a_dockerfile_that_forgets_a_folder_fails_the_smoke_run(checkout: Path) -> None:
    # The image would build; only running the job from it shows that the manifests are missing.
    edit(checkout / "Dockerfile", "COPY deploy/environments/ deploy/environments/\n", "")
    result = run_check(checkout)
    assert result.returncode == 1
    assert "/app/deploy/environments is missing from the image" in result.stderr


@pytest.mark.long
def test_a_module_missing_from_the_image_fails_the_real_upgrade(checkout: Path) -> None:
    # Every folder is there, but env.py imports models.py: only running a migration shows it.
    ignore = checkout / ".dockerignore"
    ignore.write_text(ignore.read_text() + "services/*/models.py\n")
    result = run_check(checkout)
    assert result.returncode == 1
    assert "first upgrade from the image exited" in result.stderr
    assert "models" in result.stderr


def test_a_file_kept_out_by_dockerignore_is_reported(checkout: Path) -> None:
    edit(checkout / ".dockerignore", "!services/\n", "")
    result = run_check(checkout, "--static")
    assert result.returncode == 1
    assert "COPY services/: not in the build context" in result.stderr


def test_a_hadolint_finding_fails(checkout: Path) -> None:
    # An unpinned tool: the image would change under the same commit.
    edit(checkout / "Dockerfile", "uv==0.13.9", "uv")
    result = run_check(checkout, "--static")
    assert result.returncode == 1
    assert "DL3013" in result.stderr


def test_shell_form_entrypoint_and_root_user_are_refused(checkout: Path) -> None:
    # Shell form makes /bin/sh PID 1: Cloud Run's SIGTERM would never reach the job.
    edit(checkout / "Dockerfile", 'ENTRYPOINT ["migrate-job"]', "ENTRYPOINT migrate-job")
    edit(checkout / "Dockerfile", "USER 10001:10001\n", "")
    problems = image_check.dockerfile_rules((checkout / "Dockerfile").read_text())
    assert any("exec form" in p for p in problems)
    assert any("non-root" in p for p in problems)


def test_a_misspelt_job_field_names_the_field(checkout: Path) -> None:
    edit(checkout / "deploy/jobs/prod.yaml", "maxRetries: 0", "maxRetry: 0")
    with pytest.raises(image_check.CheckFailed) as err:
        image_check.job_problems(checkout / "deploy/jobs/prod.yaml", checkout / "deploy/environments")
    assert "maxRetry: Extra inputs are not permitted" in str(err.value)
    assert "maxRetries: Field required" in str(err.value)


def test_broken_yaml_names_the_file(checkout: Path) -> None:
    (checkout / "deploy/jobs/dev.yaml").write_text("spec: [unclosed\n")
    with pytest.raises(image_check.CheckFailed, match=r"deploy/jobs/dev\.yaml: not valid YAML"):
        image_check.job_problems(checkout / "deploy/jobs/dev.yaml", checkout / "deploy/environments")


def test_a_job_without_an_instance_socket_of_its_manifest_is_reported(checkout: Path) -> None:
    edit(checkout / "deploy/jobs/dev.yaml", ",fusion-prime-dev:us-central1:fp-risk-db", "")
    problems = image_check.job_problems(checkout / "deploy/jobs/dev.yaml", checkout / "deploy/environments")
    assert problems == [
        "cloudsql-instances lacks ['fusion-prime-dev:us-central1:fp-risk-db'] (their sockets would not exist)"
    ]


def test_a_job_that_retries_or_runs_another_environment_is_reported(checkout: Path) -> None:
    edit(checkout / "deploy/jobs/prod.yaml", "maxRetries: 0", "maxRetries: 3")
    edit(checkout / "deploy/jobs/prod.yaml", "value: prod", "value: dev")
    problems = image_check.job_problems(checkout / "deploy/jobs/prod.yaml", checkout / "deploy/environments")
    assert any("maxRetries must be 0" in p for p in problems)
    assert any("MIGRATE_ENV must be prod" in p for p in problems)


def test_an_undeclared_substitution_is_reported(checkout: Path) -> None:
    edit(checkout / "cloudbuild.yaml", '--region "${_REGION}"', '--region "${_REGON}"')
    problems = image_check.build_problems(checkout / "cloudbuild.yaml", checkout)
    assert "$_REGON is used but is not a declared user substitution" in problems


def test_a_declared_but_unused_substitution_is_reported() -> None:
    build = Build.model_validate(
        {"steps": [{"name": "bash", "args": ["$$HOME", "${_A}"]}], "substitutions": {"_A": "1", "_B": "2"}}
    )
    assert substitution_problems(build) == [
        "substitution _B is declared but never used (Cloud Build rejects that)"
    ]


def test_a_shell_error_in_a_build_step_is_reported(checkout: Path) -> None:
    edit(checkout / "cloudbuild.yaml", 'if [ -z "$$tag" ]; then', 'if [ -z "$$tag" ] then')
    problems = image_check.build_problems(checkout / "cloudbuild.yaml", checkout)
    assert any(p.startswith("step tag: shell syntax") for p in problems)


def test_the_release_config_runs_files_that_exist(checkout: Path) -> None:
    (checkout / "deploy/execute.sh").unlink()
    problems = image_check.build_problems(checkout / "deploy/cloudbuild-release.yaml", checkout)
    assert problems == ["step migrate: runs deploy/execute.sh, which does not exist"]


def test_the_pull_request_build_runs_every_check_and_keeps_the_report(checkout: Path) -> None:
    assert image_check.pr_build_problems(checkout) == []
    assert image_check.build_problems(checkout / image_check.PR_BUILD, checkout) == []
    review = '    ("trace", ["trace", "--scratch", "env://SCRATCH_URL", "--output", "{output}"]),\n'
    edit(checkout / "devtools/review.py", review, "")
    edit(checkout / image_check.PR_BUILD, "cat /workspace/review/exit_code", "cat /workspace/review/status")
    assert image_check.pr_build_problems(checkout) == [
        f"{image_check.PR_BUILD}: devtools.review does not run trace --scratch --output",
        f"{image_check.PR_BUILD}: no step fails the build on the review's exit_code",
    ]


def test_a_build_step_that_runs_a_missing_module_is_reported(checkout: Path) -> None:
    (checkout / "devtools/review.py").unlink()
    problems = image_check.build_problems(checkout / image_check.PR_BUILD, checkout)
    assert problems == ["step review: runs python -m devtools.review, which does not exist"]
    assert f"{image_check.PR_BUILD}: devtools.review does not run lint" in image_check.pr_build_problems(
        checkout
    )


def test_shipped_job_definitions_parse_as_yaml() -> None:
    for path in (REPO / "deploy/jobs").glob("*.yaml"):
        assert yaml.safe_load(path.read_text())["kind"] == "Job"


@pytest.mark.parametrize(
    ("path", "ignored"),
    [
        ("job/cli.py", False),
        ("job/__pycache__/cli.cpython-311.pyc", True),
        ("services/settlement/alembic.ini", False),
        ("deploy/environments/prod.toml", False),
        ("deploy/jobs/prod.yaml", True),
        ("tests/conftest.py", True),
        (".venv/bin/python", True),
        ("devtools/demo.py", True),
    ],
)
def test_dockerignore_admits_exactly_what_the_image_copies(tmp_path: Path, path: str, ignored: bool) -> None:
    shutil.copy2(REPO / ".dockerignore", tmp_path / ".dockerignore")
    (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
    (tmp_path / path).write_text("x")
    assert (path not in dockerfile.context_files(tmp_path)) is ignored


def test_instructions_join_continuations_and_skip_comments() -> None:
    text = "FROM a AS builder\n# note\nRUN one \\\n    # inside\n    && two\nFROM b\nUSER 1\n"
    stages = dockerfile.stages(text)
    assert [s.name for s in stages] == ["builder", None]
    assert stages[0].instructions[0].value == "one && two"
    assert stages[1].all("USER")[0].line == 7
