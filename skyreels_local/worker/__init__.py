"""The GPU side: a worker process claims jobs from the job table, runs the engine, writes the MP4
and reports the outcome. It imports torch; the HTTP process never imports this package."""
