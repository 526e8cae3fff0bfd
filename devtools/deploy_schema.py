"""The deploy files' shapes, for ``make image-check``: Cloud Run v1 Job and Cloud Build config.

Both are pydantic models that forbid unknown fields, so a misspelt field name (``maxRetry``,
``timeout_seconds``, ``serviceAccount`` in the wrong place) fails here instead of at deploy time.
Field names follow the Cloud Run Admin API v1 ``Job`` resource (what ``gcloud run jobs replace``
reads) and the Cloud Build ``Build`` resource.
"""

from __future__ import annotations

import re
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)


# ---- Cloud Run Admin API v1: Job -------------------------------------------------------------


class ObjectMeta(_Strict):
    name: str | None = None
    namespace: str | None = None
    labels: dict[str, str] = Field(default_factory=dict)
    annotations: dict[str, str] = Field(default_factory=dict)


class SecretKeySelector(_Strict):
    name: str
    key: str


class EnvVarSource(_Strict):
    secret_key_ref: SecretKeySelector = Field(alias="secretKeyRef")


class EnvVar(_Strict):
    name: str = Field(pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")
    value: str | None = None
    value_from: EnvVarSource | None = Field(default=None, alias="valueFrom")


class ResourceRequirements(_Strict):
    limits: dict[Literal["cpu", "memory", "nvidia.com/gpu"], str] = Field(default_factory=dict)


class VolumeMount(_Strict):
    name: str
    mount_path: str = Field(alias="mountPath")
    read_only: bool | None = Field(default=None, alias="readOnly")


class Container(_Strict):
    name: str | None = None
    image: str
    command: list[str] | None = None
    args: list[str] | None = None
    env: list[EnvVar] = Field(default_factory=list)
    resources: ResourceRequirements | None = None
    volume_mounts: list[VolumeMount] = Field(default_factory=list, alias="volumeMounts")
    working_dir: str | None = Field(default=None, alias="workingDir")


class SecretVolumeItem(_Strict):
    key: str
    path: str


class SecretVolumeSource(_Strict):
    secret_name: str = Field(alias="secretName")
    items: list[SecretVolumeItem] = Field(default_factory=list)
    default_mode: int | None = Field(default=None, alias="defaultMode")


class Volume(_Strict):
    name: str
    secret: SecretVolumeSource | None = None
    empty_dir: dict[str, str] | None = Field(default=None, alias="emptyDir")


class TaskSpec(_Strict):
    containers: list[Container] = Field(min_length=1)
    max_retries: int = Field(alias="maxRetries", ge=0, le=10)
    timeout_seconds: int = Field(alias="timeoutSeconds", gt=0, le=7 * 24 * 3600)
    service_account_name: str = Field(alias="serviceAccountName")
    volumes: list[Volume] = Field(default_factory=list)


class TaskTemplateSpec(_Strict):
    spec: TaskSpec


class ExecutionSpec(_Strict):
    parallelism: int | None = Field(default=None, ge=0)
    task_count: int = Field(default=1, alias="taskCount", ge=1, le=10000)
    template: TaskTemplateSpec


class ExecutionTemplateSpec(_Strict):
    metadata: ObjectMeta = Field(default_factory=ObjectMeta)
    spec: ExecutionSpec


class JobSpec(_Strict):
    template: ExecutionTemplateSpec


class Job(_Strict):
    api_version: Literal["run.googleapis.com/v1"] = Field(alias="apiVersion")
    kind: Literal["Job"]
    metadata: ObjectMeta
    spec: JobSpec

    def container(self) -> Container:
        """Return the job's (single) container."""
        return self.spec.template.spec.template.spec.containers[0]

    def env(self) -> dict[str, EnvVar]:
        """Return the container's environment variables by name."""
        return {e.name: e for e in self.container().env}

    def cloudsql_instances(self) -> list[str]:
        """Return the Cloud SQL instances whose sockets the job gets."""
        raw = self.spec.template.metadata.annotations.get("run.googleapis.com/cloudsql-instances", "")
        return [i.strip() for i in raw.split(",") if i.strip()]


# ---- Cloud Build: Build config ---------------------------------------------------------------


class BuildStep(_Strict):
    name: str
    args: list[str] = Field(default_factory=list)
    entrypoint: str | None = None
    env: list[str] = Field(default_factory=list)
    dir: str | None = None
    id: str | None = None
    wait_for: list[str] = Field(default_factory=list, alias="waitFor")
    secret_env: list[str] = Field(default_factory=list, alias="secretEnv")
    timeout: str | None = Field(default=None, pattern=r"^\d+(\.\d+)?s$")
    script: str | None = None
    allow_failure: bool | None = Field(default=None, alias="allowFailure")
    allow_exit_codes: list[int] = Field(default_factory=list, alias="allowExitCodes")
    automap_substitutions: bool | None = Field(default=None, alias="automapSubstitutions")


class BuildOptions(_Strict):
    logging: Literal["LOGGING_UNSPECIFIED", "LEGACY", "GCS_ONLY", "CLOUD_LOGGING_ONLY", "NONE"] | None = None
    substitution_option: Literal["MUST_MATCH", "ALLOW_LOOSE"] | None = Field(
        default=None, alias="substitutionOption"
    )
    dynamic_substitutions: bool | None = Field(default=None, alias="dynamicSubstitutions")
    machine_type: str | None = Field(default=None, alias="machineType")
    env: list[str] = Field(default_factory=list)
    automap_substitutions: bool | None = Field(default=None, alias="automapSubstitutions")


class Build(_Strict):
    steps: list[BuildStep] = Field(min_length=1)
    substitutions: dict[str, str] = Field(default_factory=dict)
    options: BuildOptions = Field(default_factory=BuildOptions)
    timeout: str | None = Field(default=None, pattern=r"^\d+(\.\d+)?s$")
    images: list[str] = Field(default_factory=list)
    tags: list[str] = Field(default_factory=list)
    service_account: str | None = Field(default=None, alias="serviceAccount")


# What Cloud Build substitutes itself (it rejects any other name that does not start with "_").
BUILTIN_SUBSTITUTIONS = frozenset(
    {
        "PROJECT_ID",
        "PROJECT_NUMBER",
        "BUILD_ID",
        "LOCATION",
        "TRIGGER_NAME",
        "COMMIT_SHA",
        "REVISION_ID",
        "SHORT_SHA",
        "REPO_NAME",
        "REPO_FULL_NAME",
        "BRANCH_NAME",
        "TAG_NAME",
        "REF_NAME",
        "TRIGGER_BUILD_CONFIG_PATH",
        "SERVICE_ACCOUNT_EMAIL",
        "SERVICE_ACCOUNT",
        "_HEAD_BRANCH",
        "_BASE_BRANCH",
        "_HEAD_REPO_URL",
        "_PR_NUMBER",
    }
)
_REFERENCE = re.compile(r"\$\$|\$\{([A-Za-z_][A-Za-z0-9_]*)\}|\$([A-Za-z_][A-Za-z0-9_]*)")


def substitutions_used(text: str) -> set[str]:
    """Return the names a string refers to as $NAME or ${NAME}; ``$$`` is an escaped dollar."""
    return {m.group(1) or m.group(2) for m in _REFERENCE.finditer(text) if m.group(0) != "$$"}


def substitute(text: str, values: dict[str, str]) -> str:
    """Return text as Cloud Build would pass it to a step (sample values for the built-ins used)."""
    table = {"PROJECT_ID": "project", "BUILD_ID": "0000", "SHORT_SHA": "", "COMMIT_SHA": "", **values}
    return _REFERENCE.sub(
        lambda m: "$" if m.group(0) == "$$" else table.get(m.group(1) or m.group(2), "x"), text
    )


def build_strings(build: Build) -> list[str]:
    """Return every string of a build that Cloud Build substitutes into."""
    strings = [*build.images, *build.tags]
    for step in build.steps:
        strings += [step.name, *step.args, *step.env, step.entrypoint or "", step.dir or ""]
        strings += [step.script or ""]
    return strings + list(build.options.env)


def substitution_problems(build: Build) -> list[str]:
    """Return what Cloud Build would reject: undeclared names used, declared names never used."""
    used = set().union(*(substitutions_used(s) for s in build_strings(build)))
    problems = []
    for name in sorted(used - BUILTIN_SUBSTITUTIONS - set(build.substitutions)):
        kind = "user substitution" if name.startswith("_") else "substitution (user ones start with _)"
        problems.append(f"${name} is used but is not a declared {kind}")
    loose = build.options.substitution_option == "ALLOW_LOOSE"
    for name in sorted(set(build.substitutions) - used):
        if not loose:
            problems.append(f"substitution {name} is declared but never used (Cloud Build rejects that)")
    for name in build.substitutions:
        if not name.startswith("_"):
            problems.append(f"substitution {name} must start with an underscore")
    ids = [s.id for s in build.steps if s.id]
    if len(ids) != len(set(ids)):
        problems.append("two steps share an id")
    for step in build.steps:
        for wanted in step.wait_for:
            if wanted != "-" and wanted not in ids:
                problems.append(f"step {step.id or step.name} waits for unknown step {wanted!r}")
    return problems


# ---- Cloud Logging: LogMetric (gcloud logging metrics create --config-from-file) -------------


class LabelDescriptor(_Strict):
    key: str = Field(pattern=r"^[a-z][a-z0-9_]{0,99}$")
    value_type: Literal["STRING", "BOOL", "INT64"] = Field(default="STRING", alias="valueType")
    description: str | None = None


class MetricDescriptor(_Strict):
    metric_kind: Literal["DELTA", "GAUGE", "CUMULATIVE"] = Field(alias="metricKind")
    value_type: Literal["INT64", "DOUBLE", "DISTRIBUTION", "BOOL", "STRING"] = Field(alias="valueType")
    unit: str | None = None
    display_name: str | None = Field(default=None, alias="displayName")
    description: str | None = None
    labels: list[LabelDescriptor] = Field(default_factory=list)


class LogMetric(_Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9_./-]{1,100}$")
    description: str | None = None
    filter: str = Field(min_length=1)
    disabled: bool | None = None
    metric_descriptor: MetricDescriptor = Field(alias="metricDescriptor")
    value_extractor: str | None = Field(default=None, alias="valueExtractor")
    label_extractors: dict[str, str] = Field(default_factory=dict, alias="labelExtractors")


# ---- Cloud Monitoring: AlertPolicy (gcloud monitoring policies create --policy-from-file) -----

_DURATION = r"^\d+(\.\d+)?s$"


class Documentation(_Strict):
    content: str
    mime_type: Literal["text/markdown"] = Field(default="text/markdown", alias="mimeType")
    subject: str | None = Field(default=None, max_length=255)


class Aggregation(_Strict):
    alignment_period: str = Field(alias="alignmentPeriod", pattern=_DURATION)
    per_series_aligner: str = Field(alias="perSeriesAligner", pattern=r"^ALIGN_[A-Z_0-9]+$")
    cross_series_reducer: str | None = Field(
        default=None, alias="crossSeriesReducer", pattern=r"^REDUCE_[A-Z_0-9]+$"
    )
    group_by_fields: list[str] = Field(default_factory=list, alias="groupByFields")


class Trigger(_Strict):
    count: int | None = Field(default=None, ge=1)
    percent: float | None = Field(default=None, ge=0, le=100)


class MetricThreshold(_Strict):
    filter: str
    comparison: Literal[
        "COMPARISON_GT", "COMPARISON_GE", "COMPARISON_LT", "COMPARISON_LE", "COMPARISON_EQ", "COMPARISON_NE"
    ]
    threshold_value: float = Field(alias="thresholdValue")
    duration: str = Field(pattern=_DURATION)
    aggregations: list[Aggregation] = Field(default_factory=list)
    trigger: Trigger | None = None
    evaluation_missing_data: (
        Literal[
            "EVALUATION_MISSING_DATA_INACTIVE",
            "EVALUATION_MISSING_DATA_ACTIVE",
            "EVALUATION_MISSING_DATA_NO_OP",
        ]
        | None
    ) = Field(default=None, alias="evaluationMissingData")


class Condition(_Strict):
    display_name: str = Field(alias="displayName")
    condition_threshold: MetricThreshold = Field(alias="conditionThreshold")


class AlertStrategy(_Strict):
    auto_close: str | None = Field(default=None, alias="autoClose", pattern=_DURATION)


class AlertPolicy(_Strict):
    display_name: str = Field(alias="displayName")
    documentation: Documentation | None = None
    combiner: Literal["AND", "OR", "AND_WITH_MATCHING_RESOURCE"]
    conditions: list[Condition] = Field(min_length=1, max_length=6)
    alert_strategy: AlertStrategy | None = Field(default=None, alias="alertStrategy")
    severity: Literal["CRITICAL", "ERROR", "WARNING"] | None = None
    enabled: bool = True
    notification_channels: list[str] = Field(default_factory=list, alias="notificationChannels")
    user_labels: dict[str, str] = Field(default_factory=dict, alias="userLabels")
