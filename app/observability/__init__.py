"""What the service tells its operators: Prometheus metrics, structured logs, and the ids
(request, job) that tie a log line to what it was about.

Pure pieces only: the standard library, prometheus_client and the database models. The API,
the workers and the command line wire them in. ``context`` and ``logs`` never import
prometheus_client, so a worker can choose multiprocess mode before anything does.
"""
