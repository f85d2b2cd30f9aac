"""The REST front end (FastAPI): uploads, jobs, tasks, neighbours, recommendations."""
