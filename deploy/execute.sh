#!/usr/bin/env bash
# Run a migrate-job Cloud Run job, wait for it, and exit non-zero if it failed, after printing the
# job's own run.summary (status, exit code, per-database outcome) from Cloud Logging.
# Usage: deploy/execute.sh JOB REGION [PROJECT]   (PROJECT: gcloud's default when left out)
set -euo pipefail
job="${1:?usage: deploy/execute.sh JOB REGION [PROJECT]}"
region="${2:?usage: deploy/execute.sh JOB REGION [PROJECT]}"
where=(--region "$region")
if [ -n "${3:-}" ]; then where+=(--project "$3"); fi

echo "+ gcloud run jobs execute $job ${where[*]} --wait"
if gcloud run jobs execute "$job" "${where[@]}" --wait; then
  exit 0
fi

execution="$(gcloud run jobs executions list --job "$job" "${where[@]}" --limit 1 \
  --format 'value(metadata.name)')"
echo "execution $execution failed; its run.summary (exit_code says what happened, see the README):" >&2
project_flag=()
if [ -n "${3:-}" ]; then project_flag=(--project "$3"); fi
gcloud logging read "${project_flag[@]}" --limit 1 --format json \
  "resource.type=\"cloud_run_job\" AND resource.labels.job_name=\"$job\" AND labels.\"run.googleapis.com/execution_name\"=\"$execution\" AND jsonPayload.event=\"run.summary\"" >&2 || true
echo "every line of this execution: gcloud logging read 'labels.\"run.googleapis.com/execution_name\"=\"$execution\"'" >&2
exit 1
