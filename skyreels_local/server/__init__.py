"""The HTTP process: the WaveSpeed v3 API (api/), its wire models, webhook delivery, the worker
supervisor and the playground page. Never imports torch."""
