"""The gap between two queued jobs' denoising, with and without prompt prefetch (worker/prefetch.py).

    PYTHONPATH=. python scripts/prefetch_gap.py                       # tiny model, CPU, slowed encoder
    PYTHONPATH=. python scripts/prefetch_gap.py --encode-delay-s 0    # the tiny encoder as it is
    PYTHONPATH=. python scripts/prefetch_gap.py --between-jobs --mp4-delay-s 1  # offloaded encoders

N jobs with distinct prompts are queued in a fresh job table and run back to back by a real
`GpuWorker` loop (claim, image fetch, `Engine.generate`, MP4 write, record), once with
`prefetch_prompts` off and once on, on the same loaded engine (its prompt cache emptied between
runs). The gap of a pair is from the end of job i's last denoising step (its progress callback) to
the start of job i+1's first transformer forward: decode, MP4 write, claim and the text encode
that prefetch takes off this path.

The tiny model's text encoder takes milliseconds. `--encode-delay-s` adds a sleep to each Llama
forward (one per new prompt) to stand in for the real 8B encoder. A sleep holds neither the CPU
nor the GIL, so it models an encode the host waits on while the device works, overlapping the
denoise perfectly: on one GPU the encoder's kernels instead queue between the denoiser's on the
default stream, so there the overlap hides the encode's host-side time (tokenising, launches)
and its GPU time moves into the previous job's denoise rather than vanishing (see README "Speed
presets and benchmark"). `--forward-delay-s` likewise stretches each transformer forward, so that
a denoise lasts long enough to hide the encode, as a real 9 s step does; `--mp4-delay-s` each MP4
write, which at 544x960x97 takes seconds of ffmpeg (a subprocess the worker waits on) and is what a
`--between-jobs` prefetch (text encoders offloaded: never during a denoise) overlaps.
"""

from __future__ import annotations

import argparse
import base64
import io
import statistics
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

PROMPTS = [
    "a red kite over a beach",
    "a boat on a calm lake at dawn",
    "a fox running through fresh snow",
    "a city street in the rain at night",
    "a hot air balloon over green hills",
    "a lighthouse in a storm",
    "a cat asleep on a windowsill",
    "a train crossing a stone bridge",
]


def png_data_uri(width: int = 96, height: int = 72) -> str:
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (width, height), (0, 128, 128)).save(buffer, "PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


IMAGE = png_data_uri()


class Timeline:
    """Per job: when its first transformer forward started and its last denoising step ended."""

    def __init__(self) -> None:
        self.current: int | None = None
        self.first_forward: dict[int, float] = {}
        self.last_step: dict[int, float] = {}
        self.text_encode_s: dict[int, float] = {}
        self.denoise_s: dict[int, float] = {}

    def gaps(self) -> list[float]:
        jobs = sorted(self.last_step)
        return [self.first_forward[b] - self.last_step[a] for a, b in zip(jobs, jobs[1:], strict=False)]


def instrument(engine: Any, timeline: Timeline, *, encode_delay_s: float, forward_delay_s: float) -> None:
    """Wrap the engine's generate (job boundaries, step ends), its transformer (first forward) and
    its Llama encoder (the stand-in delay)."""
    pipe = engine.pipe
    transformer_forward = pipe.transformer.forward
    llama_forward = pipe.text_encoder.forward
    generate = engine.generate
    jobs = iter(range(10**9))

    def timed_forward(*args: Any, **kwargs: Any) -> Any:
        job = timeline.current
        if job is not None and job not in timeline.first_forward:
            timeline.first_forward[job] = time.perf_counter()
        if forward_delay_s:
            time.sleep(forward_delay_s)
        return transformer_forward(*args, **kwargs)

    def slow_encode(*args: Any, **kwargs: Any) -> Any:
        if encode_delay_s:
            time.sleep(encode_delay_s)
        return llama_forward(*args, **kwargs)

    def timed_generate(request: Any, *, on_progress: Any = None, should_cancel: Any = None) -> Any:
        job = timeline.current = next(jobs)

        def progress(p: Any) -> None:
            if p.step == p.total:
                timeline.last_step[job] = time.perf_counter()
            if on_progress is not None:
                on_progress(p)

        result = generate(request, on_progress=progress, should_cancel=should_cancel)
        timeline.text_encode_s[job] = result.timings["text_encode_s"]
        timeline.denoise_s[job] = result.timings["denoise_s"]
        return result

    pipe.transformer.forward = timed_forward
    pipe.text_encoder.forward = slow_encode
    engine.generate = timed_generate


def run_queue(engine: Any, args: argparse.Namespace, *, prefetch: bool) -> Timeline:
    """Queue `args.jobs` jobs, run them through a real worker loop, return what was seen."""
    import skyreels_local.worker.main as worker_main
    from skyreels_local.config import Settings
    from skyreels_local.jobs import TERMINAL_STATUSES, Database
    from skyreels_local.params import GenerationParams
    from skyreels_local.paths import DataPaths

    engine.prompts.clear()
    timeline = Timeline()
    instrument(engine, timeline, encode_delay_s=args.encode_delay_s, forward_delay_s=args.forward_delay_s)
    with tempfile.TemporaryDirectory() as folder:
        data_dir = Path(folder)
        settings = Settings(
            model=args.model, data_dir=data_dir, safety_checker="off", prefetch_prompts=prefetch
        )
        db = Database(DataPaths(data_dir).create().database)
        ids = []
        for index in range(args.jobs):
            params = GenerationParams(
                prompt=f"{PROMPTS[index % len(PROMPTS)]} (take {index})",
                image=IMAGE,
                seed=index,
                num_inference_steps=args.steps,
                num_frames=args.frames,
            )
            job = db.predictions.create(
                id=uuid.uuid4().hex, model="m", input={}, params=params.model_dump(mode="json"),
                seed=index, base_url="x",
            )  # fmt: skip
            ids.append(job.id)
        worker_main.build_engine = lambda _settings, _device: engine  # the loaded one, every run
        worker = worker_main.GpuWorker(settings, worker_id="gap", device=args.device, db=db)
        if args.mp4_delay_s:
            write_output = worker.write_output

            def slow_write(result: Any, job_id: str) -> str:
                time.sleep(args.mp4_delay_s)  # ffmpeg is a subprocess: the worker only waits
                return write_output(result, job_id)

            worker.write_output = slow_write
        thread = threading.Thread(target=worker.run, daemon=True)
        thread.start()
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            if all(db.predictions.get(i).status in TERMINAL_STATUSES for i in ids):
                break
            time.sleep(0.05)
        worker.stop()
        thread.join(60)
        statuses = {db.predictions.get(i).status.value for i in ids}
        assert statuses == {"completed"}, statuses
    # Undo the wrappers (instance attributes shadowing the class's methods).
    for owner in (engine.pipe.transformer, engine.pipe.text_encoder):
        vars(owner).pop("forward", None)
    vars(engine).pop("generate", None)
    return timeline


def mean(values: list[float]) -> float:
    return statistics.fmean(values) if values else float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="tiny-random")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--jobs", type=int, default=6)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--frames", type=int, default=9)
    parser.add_argument(
        "--encode-delay-s", type=float, default=0.5, help="sleep per Llama forward (8B stand-in)"
    )
    parser.add_argument("--forward-delay-s", type=float, default=0.1, help="sleep per transformer forward")
    parser.add_argument(
        "--mp4-delay-s", type=float, default=0.0, help="sleep per MP4 write (full-size stand-in)"
    )
    parser.add_argument("--rounds", type=int, default=2, help="off/on runs, alternated")
    parser.add_argument(
        "--between-jobs", action="store_true", help="text encoders 'offloaded': prefetch only between jobs"
    )
    args = parser.parse_args()

    from skyreels_local.engine.loader import load_engine

    engine = load_engine(args.model, device=args.device)
    engine.warm_up()  # as a worker does before its first job
    if args.between_jobs:
        # As under the 48gb profile: encoders moved onto the device per encode (here cpu -> cpu),
        # so a prefetch may not meet a denoise and waits for the job's GPU work to end.
        from skyreels_local.engine.prompts import OffloadedTextEncoders

        engine.prompts.residency = OffloadedTextEncoders(engine.device, engine.device)
    print(
        f"model {args.model} on {args.device}, {args.jobs} jobs x {args.steps} steps, {args.frames} frames; "
        f"encode stand-in +{args.encode_delay_s:.2f} s per prompt, +{args.forward_delay_s:.2f} s per forward, "
        f"+{args.mp4_delay_s:.2f} s per MP4 write; "
        f"prefetch mode when on: {'during-denoise' if engine.prompt_prefetch_overlaps_denoise else 'between-jobs'}"
    )
    seen: dict[bool, list[Timeline]] = {False: [], True: []}
    for _ in range(args.rounds):
        for prefetch in (False, True):
            seen[prefetch].append(run_queue(engine, args, prefetch=prefetch))
    rows = {}
    for prefetch, timelines in seen.items():
        rows[prefetch] = {
            "gap": mean([g for t in timelines for g in t.gaps()]),
            # Jobs after the first: the first job's prompt is never prefetched (nothing ran before it).
            "encode": mean([s for t in timelines for j, s in t.text_encode_s.items() if j > 0]),
            "denoise": mean([s for t in timelines for s in t.denoise_s.values()]),
            "pairs": sum(len(t.gaps()) for t in timelines),
        }
    print(f"{'prefetch':<9} {'pairs':>5} {'mean gap s':>11} {'text encode s':>14} {'denoise s':>10}")
    for prefetch in (False, True):
        row = rows[prefetch]
        print(
            f"{'on' if prefetch else 'off':<9} {row['pairs']:>5} {row['gap']:>11.3f} "
            f"{row['encode']:>14.3f} {row['denoise']:>10.3f}"
        )
    off, on = rows[False]["gap"], rows[True]["gap"]
    print(f"gap on/off: {on / off:.3f}x ({off - on:+.3f} s per job)")


if __name__ == "__main__":
    main()
