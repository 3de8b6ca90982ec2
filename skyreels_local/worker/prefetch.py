"""Prompt prefetch: the next queued job's prompt embeddings are encoded before that job is claimed.

With the real model the 8B Llama text encoder costs a noticeable time per new prompt; encoded
ahead, a claimed job finds its embeddings in the engine's prompt cache (engine/prompts.py) and
starts denoising at once. The worker tells the prefetcher where it is in a job; the prefetcher
looks at the oldest waiting job (`PredictionsTable.peek_next`: read only, the job is not claimed
or changed) and calls `engine.prepare_prompts(params)`, which needs the prompt, the negative
prompt and the guidance scale only: no image is fetched.

When it may run (the engine says, `Engine.prompt_prefetch_overlaps_denoise`):

- `during-denoise`: the text encoders live on the engine's device (80gb, cpu profiles). An encode
  moves no weights and adds ~0.2 GB of activations at full size (the Llama hidden states), so it
  runs in a thread while the current job denoises: from its first step (its own encode is done
  by then, so a prefetch never delays it) to its last (after which the VAE decode sizes its
  tiles from the free memory; no encode starts then, one in flight finishes). On CUDA the thread
  uses the default stream: its kernels queue between the denoiser's (no side stream, so no
  cross-stream lifetime to manage; an encode is ~10 ms of GPU time, which moves into the current
  job's denoise), while tokenising and Python launch overhead overlap. The engine is otherwise
  untouched: `encode_prompt` sets no pipeline state, the transformer's compiled blocks and hooks
  are not on this path, and the prompt encoder's lock keeps encodes (and the tokenizers, which
  are not thread-safe) one at a time.
- `between-jobs`: the profile moves text encoders onto the GPU for an encode (48gb `offload`,
  `free`), or streams them block by block (24gb `group-offload`, `sequential-offload`). Such an
  encode must not meet a denoise the profile did not plan memory for, so it starts once the job's
  GPU work (denoise, decode, safety check) is over, overlaps writing the MP4, and the next job's
  generation waits until it is done.
- `off`: `--no-prefetch-prompts`, or an engine without `prepare_prompts` (a `--gpus-per-video`
  group, worker/group.py: rank 0 encodes and broadcasts inside the collective `generate`; a
  prefetch there is left for later), or a test engine.

A job prefetched but cancelled, deleted or claimed by another worker first costs only the encode
(and, between jobs, the next generation waits for it: at most one encode). The cache is the
engine's LRU of 32 entries; a prefetch adds at most two (prompt and negative prompt) one job
ahead, so it cannot evict what the job it prefetched for needs. A failed prefetch is logged and
forgotten: the job then encodes its prompts itself, as without prefetch.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from ..jobs import Job
from ..params import GenerationParams

log = logging.getLogger("skyreels_local.worker.prefetch")

OFF = "off"
DURING_DENOISE = "during-denoise"
BETWEEN_JOBS = "between-jobs"
PEEK_EVERY_S = 0.5  # during a denoise, how often the queue is looked at until a job is found
REMEMBERED_JOBS = 16  # ids already prefetched (each job once, even if it stays at the head)


def prefetch_mode(engine: Any, *, enabled: bool) -> str:
    """Which of OFF, DURING_DENOISE, BETWEEN_JOBS applies to `engine` (see the module docstring)."""
    if not enabled or not callable(getattr(engine, "prepare_prompts", None)):
        return OFF
    return DURING_DENOISE if getattr(engine, "prompt_prefetch_overlaps_denoise", False) else BETWEEN_JOBS


class PromptPrefetcher:
    """Encodes the next waiting job's prompts in a background thread, at the points the worker
    reports: `denoise_step` (each step of the current job), `gpu_idle` (the job's GPU work is
    over) and `before_generate` (the next job is about to run)."""

    def __init__(
        self,
        engine: Any,
        peek: Callable[[], Job | None],
        *,
        enabled: bool = True,
        peek_every_s: float = PEEK_EVERY_S,
    ) -> None:
        self.engine = engine
        self.peek = peek
        self.mode = prefetch_mode(engine, enabled=enabled)
        self.peek_every_s = peek_every_s
        self.prefetched = 0  # jobs whose prompts were prepared (tests, logs)
        self._done: deque[str] = deque(maxlen=REMEMBERED_JOBS)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # --- what the worker reports -------------------------------------------------------------

    def denoise_step(self, step: int, total: int) -> None:
        """After each denoising step of the running job (from its progress callback)."""
        if self.mode != DURING_DENOISE:
            return
        if step >= total:
            self._stop.set()  # the decode comes next: no new encode starts
        elif self._thread is None:
            self._start(self._watch_queue)

    def gpu_idle(self) -> None:
        """The running job's GPU work is over (denoise, decode, safety check)."""
        if self.mode == BETWEEN_JOBS and self._thread is None:
            self._start(self._prefetch_once)

    def before_generate(self) -> None:
        """The next job is about to run: stop looking and wait for an encode in flight. Between
        jobs this is required (the encoders must be off the GPU before the next denoise); during
        a denoise it only keeps one prefetch thread at a time (the job's own encode would wait
        for the same encode on the prompt encoder's lock anyway)."""
        thread = self._thread
        if thread is None:
            return
        self._stop.set()
        thread.join()
        self._thread = None

    def close(self) -> None:
        self.before_generate()

    # --- the thread --------------------------------------------------------------------------

    def _start(self, target: Callable[[], None]) -> None:
        self._stop = threading.Event()
        self._thread = threading.Thread(target=target, name="prompt-prefetch", daemon=True)
        self._thread.start()

    def _watch_queue(self) -> None:
        # A job submitted mid-denoise is still prefetched: the queue is looked at until then.
        while not self._stop.is_set():
            self._prefetch_once()
            self._stop.wait(self.peek_every_s)

    def _prefetch_once(self) -> None:
        try:
            job = self.peek()
        except Exception as exc:  # a locked or full job table: prefetch is a courtesy
            log.warning("prompt prefetch: cannot read the queue: %s", exc)
            return
        if job is None or job.id in self._done:
            return
        self._done.append(job.id)
        started = time.perf_counter()
        try:
            params = GenerationParams.model_validate({"seed": job.seed, **job.params})
            self.engine.prepare_prompts(params)
        except Exception as exc:
            log.warning("prediction %s: prompt prefetch failed (%s: %s)", job.id, type(exc).__name__, exc)
            return
        self.prefetched += 1
        log.info(
            "prediction %s: prompts prefetched in %.2fs (%s)",
            job.id,
            time.perf_counter() - started,
            self.mode,
        )
