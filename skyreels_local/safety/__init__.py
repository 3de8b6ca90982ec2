"""The optional NSFW safety checker: an image classifier run on frames of every finished video.

`policy` is torch-free (the HTTP process reads it: which folder, on or off, start-up checks of the
folder); `checker` loads the classifier with transformers and is imported only by a worker or
`generate` that has the checker on; `gate` is what those call on each video. The verdicts and the
counts /metrics reports are the worker's to record in the job table (jobs/predictions.py).
README: "Safety checker".
"""
