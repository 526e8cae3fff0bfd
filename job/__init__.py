"""migrate-job: run every service's Alembic migrations as one Cloud Run job."""
