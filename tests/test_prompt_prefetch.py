"""Prompt prefetch (worker/prefetch.py): while a worker runs job N, job N+1's prompt embeddings
are encoded, so that its own encode is a cache hit. The worker's real `run_job` on the tiny model,
with the text encoder's calls counted and the queue in a real job table."""

from __future__ import annotations

import argparse
import sqlite3
import threading
import uuid
from types import SimpleNamespace

import pytest
import torch

from skyreels_local.cli.settings_flags import add_settings_flags, settings_from_args
from skyreels_local.config import Settings
from skyreels_local.engine.engine import Engine
from skyreels_local.engine.prompts import OffloadedTextEncoders
from skyreels_local.jobs import Database, JobStatus
from skyreels_local.params import GenerationParams
from skyreels_local.paths import DataPaths
from skyreels_local.worker.main import GpuWorker
from skyreels_local.worker.prefetch import BETWEEN_JOBS, DURING_DENOISE, OFF, PromptPrefetcher, prefetch_mode
from tests.api_server import data_uri, running_server

STEPS = 3


class Recorder:
    """Counts the Llama text encoder's forwards and records, in order, each encode and each
    transformer forward (`encode`, `denoise`). With `hold_until_prefetched`, every transformer
    forward after the first step's waits until a prefetch has happened (at most 30 s), so that
    the test does not race a fast CPU denoise against the prefetch thread."""

    def __init__(
        self, engine: Engine, monkeypatch: pytest.MonkeyPatch, *, hold_until_prefetched: bool
    ) -> None:
        self.events: list[str] = []
        self.hold = hold_until_prefetched
        self.encodes = 0
        self.forwards = 0
        self.prefetched = threading.Event()
        pipe = engine.pipe
        llama_forward = pipe.text_encoder.forward
        transformer_forward = pipe.transformer.forward
        prepare = engine.prepare_prompts

        def counted_encode(*args, **kwargs):
            self.encodes += 1
            self.events.append("encode")
            return llama_forward(*args, **kwargs)

        def recorded_forward(*args, **kwargs):
            self.forwards += 1
            if self.hold and self.forwards > 2:  # step 1 is two forwards (true CFG)
                assert self.prefetched.wait(30), "no prefetch happened during the denoise"
            self.events.append("denoise")
            return transformer_forward(*args, **kwargs)

        def signalled_prepare(*args, **kwargs):
            prepare(*args, **kwargs)
            self.prefetched.set()

        monkeypatch.setattr(pipe.text_encoder, "forward", counted_encode)
        monkeypatch.setattr(pipe.transformer, "forward", recorded_forward)
        monkeypatch.setattr(engine, "prepare_prompts", signalled_prepare)


@pytest.fixture
def engine(tiny_engine):
    # The session's engine: every test starts with an empty cache and zero counts.
    tiny_engine.prompts.clear()
    tiny_engine.prompts.hits = tiny_engine.prompts.misses = 0
    yield tiny_engine
    tiny_engine.prompts.clear()


def make_worker(tmp_path, *, prefetch: bool) -> GpuWorker:
    settings = Settings(
        model="tiny-random", data_dir=tmp_path, safety_checker="off", prefetch_prompts=prefetch
    )
    db = Database(DataPaths(tmp_path).create().database)
    return GpuWorker(settings, worker_id="w0", device="cpu", db=db)


def queue_job(worker: GpuWorker, prompt: str) -> str:
    params = GenerationParams(
        prompt=prompt, image=data_uri(), seed=1, num_inference_steps=STEPS, num_frames=5
    )
    job = worker.db.predictions.create(
        id=uuid.uuid4().hex, model="m", input={}, params=params.model_dump(mode="json"), seed=1, base_url="x"
    )
    return job.id


def run_next(worker: GpuWorker, engine) -> str:
    """Claim the oldest waiting job and run it to its end, as the worker's loop does."""
    job = worker.db.predictions.claim_next(worker.worker_id, uuid.uuid4().hex, profile="cpu")
    assert job is not None
    worker.run_job(engine, job)
    assert worker.db.predictions.get(job.id).status == JobStatus.COMPLETED
    return job.id


def test_next_jobs_prompts_are_encoded_during_the_denoise_and_hit(engine, tmp_path, monkeypatch):
    worker = make_worker(tmp_path, prefetch=True)
    recorder = Recorder(engine, monkeypatch, hold_until_prefetched=True)
    queue_job(worker, "a kite over a beach")
    queue_job(worker, "a boat on a lake")

    run_next(worker, engine)
    # Job 1's prompt and the default negative prompt, then job 2's prompt (prefetched).
    assert recorder.encodes == 3
    # The prefetch found the negative prompt (job 1's too) cached: one hit.
    assert (engine.prompts.misses, engine.prompts.hits) == (3, 1)
    assert worker.prefetcher.mode == DURING_DENOISE
    assert worker.prefetcher.prefetched == 1
    # The prefetch ran after job 1's first step (two forwards: true CFG), before its second.
    assert recorder.events[:6] == ["encode", "encode", "denoise", "denoise", "encode", "denoise"]
    assert recorder.events.count("encode") == 3

    run_next(worker, engine)
    # Job 2 encodes nothing: both its prompt and the negative prompt are cache hits.
    assert recorder.encodes == 3
    assert (engine.prompts.misses, engine.prompts.hits) == (3, 3)
    worker.prefetcher.close()


def test_prefetch_off_encodes_at_the_jobs_own_turn(engine, tmp_path, monkeypatch):
    worker = make_worker(tmp_path, prefetch=False)
    recorder = Recorder(engine, monkeypatch, hold_until_prefetched=False)
    queue_job(worker, "a kite over a beach")
    queue_job(worker, "a boat on a lake")

    run_next(worker, engine)
    assert worker.prefetcher.mode == OFF
    assert recorder.encodes == 2  # job 1's prompt and the negative prompt only
    run_next(worker, engine)
    assert recorder.encodes == 3  # job 2's prompt: a miss at its own turn
    assert (engine.prompts.misses, engine.prompts.hits) == (3, 1)  # the negative prompt hit
    assert worker.prefetcher.prefetched == 0


def test_prefetch_neither_claims_nor_changes_the_queued_job(engine, tmp_path, monkeypatch):
    worker = make_worker(tmp_path, prefetch=True)
    Recorder(engine, monkeypatch, hold_until_prefetched=True)
    queue_job(worker, "a kite over a beach")
    waiting = queue_job(worker, "a boat on a lake")
    before = worker.db.predictions.get_full(waiting)

    run_next(worker, engine)
    worker.prefetcher.close()
    after = worker.db.predictions.get_full(waiting)
    assert worker.prefetcher.prefetched == 1
    assert after == before
    assert (after.status, after.attempts, after.claim, after.worker_id) == (JobStatus.CREATED, 0, None, None)
    assert worker.db.predictions.queue_position(after) == 1


def test_a_prefetched_job_cancelled_before_its_turn_breaks_nothing(engine, tmp_path, monkeypatch):
    worker = make_worker(tmp_path, prefetch=True)
    recorder = Recorder(engine, monkeypatch, hold_until_prefetched=True)
    queue_job(worker, "a kite over a beach")
    cancelled = queue_job(worker, "a boat on a lake")
    last = queue_job(worker, "a fox in the snow")

    run_next(worker, engine)  # prefetches the job that is then cancelled
    assert worker.prefetcher.prefetched == 1
    worker.db.predictions.request_cancel(cancelled)
    recorder.hold = False  # the last job: nothing waits behind it, no prefetch to hold for

    assert run_next(worker, engine) == last
    assert recorder.encodes == 4  # the cancelled job's prompt was wasted work; the last one's a miss
    assert worker.db.predictions.get(cancelled).status == JobStatus.CANCELLED
    assert worker.db.predictions.get(cancelled).outputs == []
    worker.prefetcher.close()


def test_offloaded_text_encoders_prefetch_between_jobs_never_during_a_denoise(
    tiny_engine, tmp_path, monkeypatch
):
    # The same tiny pipeline under a residency that moves whole text encoders (as the 48gb
    # profile's `offload`): an encode must not meet a denoise.
    cpu = torch.device("cpu")
    engine = Engine(tiny_engine.pipe, tiny_engine.spec, text_encoders=OffloadedTextEncoders(cpu, cpu))
    assert engine.prompt_prefetch_overlaps_denoise is False
    worker = make_worker(tmp_path, prefetch=True)
    recorder = Recorder(engine, monkeypatch, hold_until_prefetched=False)
    queue_job(worker, "a kite over a beach")
    queue_job(worker, "a boat on a lake")

    run_next(worker, engine)
    assert worker.prefetcher.mode == BETWEEN_JOBS
    run_next(worker, engine)
    worker.prefetcher.close()
    forwards_per_job = recorder.events.count("denoise") // 2
    # Job 1's two encodes, its denoise, job 2's prompt (after job 1's GPU work), job 2's denoise.
    assert (
        recorder.events
        == ["encode"] * 2 + ["denoise"] * forwards_per_job + ["encode"] + ["denoise"] * forwards_per_job
    )
    assert worker.prefetcher.prefetched == 1
    assert (engine.prompts.misses, engine.prompts.hits) == (3, 3)


def test_prefetch_mode_follows_the_engine_and_the_setting(tiny_engine):
    assert prefetch_mode(tiny_engine, enabled=True) == DURING_DENOISE  # cpu profile: resident
    assert prefetch_mode(tiny_engine, enabled=False) == OFF
    # An engine without prepare_prompts (a --gpus-per-video group, test engines): off.
    assert prefetch_mode(object(), enabled=True) == OFF
    # Text encoders not on the engine's device (offload hooks keep them on the host): between jobs.
    assert tiny_engine.prompts.resident_on(torch.device("cpu")) is True
    assert tiny_engine.prompts.resident_on(torch.device("meta")) is False


def test_prefetch_prompts_setting_flag_and_env_twin(monkeypatch):
    parser = argparse.ArgumentParser()
    add_settings_flags(parser, ["prefetch_prompts"])
    assert Settings().prefetch_prompts is True
    assert settings_from_args(parser.parse_args([]), ["prefetch_prompts"]).prefetch_prompts is True
    off = parser.parse_args(["--no-prefetch-prompts"])
    assert settings_from_args(off, ["prefetch_prompts"]).prefetch_prompts is False
    monkeypatch.setenv("SKYREELS_PREFETCH_PROMPTS", "false")
    assert settings_from_args(parser.parse_args([]), ["prefetch_prompts"]).prefetch_prompts is False
    on = parser.parse_args(["--prefetch-prompts"])
    assert settings_from_args(on, ["prefetch_prompts"]).prefetch_prompts is True


# --- the prefetcher's own rules, with a stand-in engine and queue ------------------------------


class StandInEngine:
    def __init__(self, *, overlaps: bool) -> None:
        self.prompt_prefetch_overlaps_denoise = overlaps
        self.prepared: list[str] = []
        self.release = threading.Event()
        self.release.set()
        self.fail_with: Exception | None = None

    def prepare_prompts(self, params: GenerationParams) -> None:
        assert self.release.wait(30)
        if self.fail_with is not None:
            raise self.fail_with
        self.prepared.append(params.prompt)


def waiting_job(prompt: str, job_id: str = "j1") -> SimpleNamespace:
    return SimpleNamespace(id=job_id, seed=1, params={"prompt": prompt, "image": "x"})


def test_between_jobs_the_next_generation_waits_for_the_encode_in_flight():
    engine = StandInEngine(overlaps=False)
    prefetcher = PromptPrefetcher(engine, lambda: waiting_job("a boat"))
    assert prefetcher.mode == BETWEEN_JOBS
    prefetcher.denoise_step(1, 3)  # nothing may start during a denoise
    assert prefetcher._thread is None
    engine.release.clear()  # the encode is slow (e.g. 16 GB moving onto the GPU)
    prefetcher.gpu_idle()
    waiter = threading.Thread(target=prefetcher.before_generate)
    waiter.start()
    waiter.join(0.3)
    assert waiter.is_alive()  # the next generation has not started
    engine.release.set()
    waiter.join(30)
    assert not waiter.is_alive()
    assert engine.prepared == ["a boat"]


def test_during_denoise_each_job_once_nothing_after_the_last_step(monkeypatch):
    engine = StandInEngine(overlaps=True)
    queue = [waiting_job("a boat", "j1")]
    peeks = threading.Semaphore(0)

    def peek():
        peeks.release()
        return queue[0] if queue else None

    prefetcher = PromptPrefetcher(engine, peek, peek_every_s=0.01)
    assert prefetcher.mode == DURING_DENOISE
    prefetcher.denoise_step(1, 3)
    for _ in range(5):  # the queue is looked at again and again: the job is prepared once
        assert peeks.acquire(timeout=30)
    prefetcher.denoise_step(2, 3)  # a thread is already watching: no second one
    prefetcher.denoise_step(3, 3)  # the last step: the watch ends
    prefetcher._thread.join(30)
    queue[0] = waiting_job("a fox", "j2")  # submitted during the decode: not prefetched now
    prefetcher.before_generate()
    assert engine.prepared == ["a boat"]
    assert prefetcher.prefetched == 1


def test_failed_peek_or_prepare_is_logged_and_forgotten(caplog):
    engine = StandInEngine(overlaps=False)
    engine.fail_with = RuntimeError("CUDA error: out of memory")
    prefetcher = PromptPrefetcher(engine, lambda: waiting_job("a boat"))
    prefetcher.gpu_idle()
    prefetcher.before_generate()  # no exception reaches the worker

    def broken_peek():
        raise sqlite3.OperationalError("database is locked")

    broken = PromptPrefetcher(StandInEngine(overlaps=False), broken_peek)
    broken.gpu_idle()
    broken.before_generate()
    assert (prefetcher.prefetched, broken.prefetched) == (0, 0)
    messages = [record.getMessage() for record in caplog.records]
    assert "prediction j1: prompt prefetch failed (RuntimeError: CUDA error: out of memory)" in messages
    assert "prompt prefetch: cannot read the queue: database is locked" in messages


def test_peek_next_is_the_job_claim_next_would_take(tmp_path):
    worker = make_worker(tmp_path, prefetch=True)
    predictions = worker.db.predictions
    assert predictions.peek_next() is None
    first = queue_job(worker, "a kite over a beach")
    second = queue_job(worker, "a boat on a lake")
    peeked = predictions.peek_next()
    assert (peeked.id, peeked.params["prompt"]) == (first, "a kite over a beach")
    assert predictions.claim_next("w0", "c1").id == first
    assert predictions.peek_next().id == second
    predictions.request_cancel(second)
    assert predictions.peek_next() is None


# --- through a real server ----------------------------------------------------------------------


@pytest.mark.integration
def test_served_queued_job_finds_its_prompts_prefetched(tmp_path):
    env = {"SKYREELS_ENGINE_FACTORY": "prefetch_engine:build_engine", "SKYREELS_TEST_FORWARD_DELAY_S": "0.2"}
    with running_server(tmp_path / "data", env=env) as server:
        body = {"image": data_uri(), "seed": 3, "num_inference_steps": 4, "num_frames": 5}
        first = server.submit({**body, "prompt": "a kite over a beach"})["id"]
        second = server.submit({**body, "prompt": "a boat on a lake"})["id"]
        assert server.wait(first)["status"] == "completed"
        assert server.wait(second)["status"] == "completed"
    log = server.log_path.read_text(errors="replace")
    assert "prompt prefetch during-denoise" in log  # the worker's ready line
    assert f"prediction {second}: prompts prefetched in" in log
    assert f"prediction {first}: prompts prefetched" not in log  # nothing was waiting before it
