"""Workers on other machines (`serve --broker redis://...` + `skyreels-local worker`), through
Celery 5 with Redis as broker and result backend. Opt-in: `pip install skyreels-local[cluster]`;
nothing here is imported by the embedded mode, and celery/redis are imported lazily.

- protocol.py: torch- and celery-free names both sides share (task name, queue per model key,
  Redis key names, the task payload and its outcome, a worker's heartbeat).
- celery_app.py: the Celery app built from the broker URL, every setting that matters explained.
- dispatcher.py: the API side (a thread in `serve`, torch-free): sends the job table's waiting
  jobs to Celery and copies progress, outcomes and lost workers back into the table.
- remote_worker.py: the worker side (`skyreels-local worker`, imports torch): one process per
  GPU or GPU group, the model loaded before it takes any task.

SECURITY: Redis must be private. Anyone who can reach it can read every prediction's input image
and output video, queue work for the GPUs and cancel or fake outcomes. Bind it to a private
network, set a password (`requirepass`; URL `redis://:PASSWORD@host:6379/0`) and use TLS
(`rediss://...`) across untrusted links: the URL is handed to redis-py as it is, so every form
redis-py accepts works. Only predictions the API has accepted (authenticated) are ever sent.
"""
