"""A group of N processes that generates one video together (`--gpus-per-video N`).

The process that calls `launch_group` is rank 0 (a worker, or the `generate` CLI): it starts
ranks 1..N-1 as child processes (`python -m skyreels_local.worker.group`), and all N join one
torch.distributed process group (NCCL on CUDA, one GPU per rank; gloo on a CPU). Each rank
loads the model and installs its part of the split (engine/parallel.py); rank 0 alone claims
jobs, reports progress and writes the video (every rank decodes a share of its VAE tiles).

Jobs reach the other ranks through the group's TCP key-value store, not through a collective,
so an idle group waits for its next job as long as it likes without tripping the process-group
timeout. Inside a job every rank runs the same `Engine.generate`; the cancel check is a
broadcast of rank 0's decision, so all ranks stop at the same step.

Faults end the whole group, never part of it: a rank that exits makes rank 0 kill the others and
exit (the supervisor then re-queues the job and restarts the group, as for a one-process
worker); rank 0 dying takes the others with it (parent-death signal); a rank stuck in a
collective is ended by the process-group timeout (`--group-timeout-s`) or, failing that, by the
supervisor's job timeout.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import logging
import os
import pickle
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

from ..config import Settings
from ..errors import GenerationCancelled, SkyreelsError

log = logging.getLogger("skyreels_local.worker.group")

HOST = "127.0.0.1"
WATCH_S = 0.5  # how often rank 0 checks that the other ranks live
JOB_POLL_S = 0.05  # how often an idle rank looks for the next job in the store
STOP_GRACE_S = 10.0
LOST_GROUP_EXIT = 71  # rank 0's exit code when another rank died
LOST_RANK_WAIT_S = 3.0  # after a failed collective, how long to look for a rank that exited


def group_device(device: str | None, rank: int) -> str:
    """The torch device of `rank`: GPU `rank` of the group's visible GPUs, or the CPU."""
    import torch

    kind = torch.device(device).type if device else ("cuda" if torch.cuda.is_available() else "cpu")
    return f"cuda:{rank}" if kind == "cuda" else "cpu"


def _init_process_group(store: Any, rank: int, world: int, device: str, timeout_s: float) -> None:
    import torch
    import torch.distributed as dist

    timeout = datetime.timedelta(seconds=timeout_s)
    if device.startswith("cuda"):
        if torch.cuda.device_count() < world:
            raise SkyreelsError(
                f"--gpus-per-video {world} needs {world} visible GPUs, found {torch.cuda.device_count()}"
            )
        torch.cuda.set_device(torch.device(device))
        backend = "nccl"
    else:
        # N processes share the cores: one thread pool each would oversubscribe them.
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
        backend = "gloo"
    dist.init_process_group(
        backend, store=dist.PrefixStore("pg/", store), rank=rank, world_size=world, timeout=timeout
    )


def _load_rank(settings: Settings, device: str) -> Any:
    """Load the engine on this rank and join the split; then warm up together (a collective)."""
    from ..engine.parallel import ParallelContext, choose_split, setup_parallel
    from .loading import load_configured_engine

    engine = load_configured_engine(settings, device)
    split = choose_split(
        settings.gpus_per_video,
        heads=engine.pipe.transformer.config.num_attention_heads,
        ulysses=settings.ulysses,
        cfg_parallel=settings.cfg_parallel,
    )
    setup_parallel(engine, ParallelContext(split, device))
    return engine


def _collective_cancel(engine: Any, should_cancel: Callable[[], bool] | None) -> Callable[[], bool]:
    """Rank 0's cancel decision on every rank (each rank calls it at the same points)."""
    context = engine.parallel
    if context.is_leader:
        return lambda: context.agree(bool(should_cancel and should_cancel()))
    return lambda: context.agree(False)


def _die_with_parent() -> None:
    if sys.platform.startswith("linux"):
        try:
            import ctypes

            ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        except Exception:
            pass


class GroupEngine:
    """Rank 0's view of the group, with the Engine interface a worker or the CLI uses."""

    def __init__(
        self,
        engine: Any,
        store: Any,
        followers: list[subprocess.Popen],
        *,
        on_group_lost: Callable[[str], None],
        restart_on_fault: bool,
    ) -> None:
        self.engine = engine
        self.spec = engine.spec
        self.profile = engine.profile
        self.preset_info = engine.preset_info
        self.parallel = engine.parallel
        self.store = store
        self.followers = followers
        self.restart_on_fault = restart_on_fault
        self._on_group_lost = on_group_lost
        self._seq = 0
        self._closing = threading.Event()
        self._lock = threading.Lock()
        threading.Thread(target=self._watch, name="group-watch", daemon=True).start()

    @property
    def preset(self) -> str:
        return self.engine.preset

    @property
    def split(self) -> Any:
        return self.parallel.split

    @property
    def device(self) -> Any:
        """Rank 0's device: where the safety checker runs (only rank 0 gets the frames and checks)."""
        return self.engine.device

    @property
    def keep_latents(self) -> bool:
        return self.engine.keep_latents

    @keep_latents.setter
    def keep_latents(self, value: bool) -> None:
        self.engine.keep_latents = value

    def generate(self, request: Any, *, on_progress=None, should_cancel=None) -> Any:
        from ..engine.request import GenerationRequest

        with self._lock:
            # Draw a random seed here, once, so that every rank reports the same one.
            params = request.params.with_drawn_seed()
            request = GenerationRequest(request.image, params=params)
            self._post(("generate", params.model_dump(mode="json"), request.image))
            try:
                return self.engine.generate(
                    request,
                    on_progress=on_progress,
                    should_cancel=_collective_cancel(self.engine, should_cancel),
                )
            except (GenerationCancelled, SkyreelsError):
                raise  # every rank raised the same at the same point: the group is intact
            except Exception:
                lost = self._dead_rank(wait_s=LOST_RANK_WAIT_S)
                if lost is not None:
                    # A rank died (gloo/NCCL report the broken connection before its exit shows):
                    # end the whole group now, without recording the job, which the supervisor
                    # then re-queues like any job whose worker died.
                    self._lose_group(lost)
                # Our own failure: the other ranks may be stuck in a collective. The job is
                # recorded as failed, then the group restarts (SIGTERM stops the worker after it).
                self._fault()
                raise

    def warm_up(self) -> float:
        with self._lock:
            self._post(("warm_up",))
            return self.engine.warm_up()

    def _post(self, message: tuple) -> None:
        key = f"job/{self._seq}"
        self.store.set(key, pickle.dumps(message))
        if self._seq:
            # Every rank read the previous message before joining this one's collectives.
            self.store.delete_key(f"job/{self._seq - 1}")
        self._seq += 1

    def _fault(self) -> None:
        log.error("a collective failed mid-job: the group stops and is restarted")
        self._closing.set()
        for process in self.followers:
            process.kill()
        if self.restart_on_fault:
            os.kill(os.getpid(), signal.SIGTERM)

    def _dead_rank(self, wait_s: float = 0.0) -> str | None:
        """Which rank has exited, if any (waiting up to `wait_s` for an exit to show)."""
        deadline = time.monotonic() + wait_s
        while True:
            for rank, process in enumerate(self.followers, start=1):
                code = process.poll()
                if code is not None:
                    return f"rank {rank} of the group exited with code {code}"
            if time.monotonic() >= deadline:
                return None
            time.sleep(0.05)

    def _lose_group(self, reason: str) -> None:
        if self._closing.is_set():
            return
        self._closing.set()
        for process in self.followers:
            process.kill()
        self._on_group_lost(reason)

    def _watch(self) -> None:
        while not self._closing.wait(WATCH_S):
            lost = self._dead_rank()
            if lost is not None:
                self._lose_group(lost)
                return

    def close(self) -> None:
        """Stop the other ranks and leave the process group."""
        import torch.distributed as dist

        if self._closing.is_set() and not any(p.poll() is None for p in self.followers):
            self._destroy()
            return
        self._closing.set()
        with contextlib.suppress(Exception):
            self._post(("stop",))
        deadline = time.monotonic() + STOP_GRACE_S
        for process in self.followers:
            try:
                process.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        if dist.is_initialized():
            self._destroy()

    def _destroy(self) -> None:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()


def _exit_group(reason: str) -> None:
    log.error("%s: ending the whole group (the supervisor re-queues its job and restarts it)", reason)
    os._exit(LOST_GROUP_EXIT)


def launch_group(
    settings: Settings,
    device: str | None,
    *,
    restart_on_fault: bool = False,
    on_group_lost: Callable[[str], None] = _exit_group,
) -> GroupEngine:
    """Start ranks 1..N-1, join the group as rank 0, load and warm up: an engine for N devices."""
    import torch.distributed as dist

    world = settings.gpus_per_video
    store = dist.TCPStore(
        HOST, 0, world, is_master=True, timeout=datetime.timedelta(seconds=settings.group_timeout_s),
        wait_for_workers=False,
    )  # fmt: skip
    config_json = settings.model_dump_json(exclude={"api_keys", "webhook_secret"})
    followers = []
    for rank in range(1, world):
        command = [
            sys.executable, "-m", "skyreels_local.worker.group",
            "--rank", str(rank), "--port", str(store.port),
            "--device", device or "", "--config-json", config_json,
        ]  # fmt: skip
        followers.append(subprocess.Popen(command, env={**os.environ, "PYTHONUNBUFFERED": "1"}))
    try:
        rank_device = group_device(device, 0)
        _init_process_group(store, 0, world, rank_device, settings.group_timeout_s)
        engine = _load_rank(settings, rank_device)
    except BaseException:
        for process in followers:
            process.kill()
        raise
    group = GroupEngine(
        engine, store, followers, on_group_lost=on_group_lost, restart_on_fault=restart_on_fault
    )
    warm_s = group.warm_up()
    log.info("group ready (%s), warmed up in %.1fs", group.split.describe(), warm_s)
    return group


def follower_main(rank: int, port: int, device: str, settings: Settings) -> int:
    """Ranks 1..N-1: join, load, then run every job rank 0 posts until told to stop."""
    import torch.distributed as dist
    from PIL import Image  # noqa: F401 - unpickling the job's image needs PIL

    from ..engine.request import GenerationRequest
    from ..params import GenerationParams

    world = settings.gpus_per_video
    store = dist.TCPStore(
        HOST, port, world, is_master=False, timeout=datetime.timedelta(seconds=settings.group_timeout_s)
    )
    rank_device = group_device(device or None, rank)
    _init_process_group(store, rank, world, rank_device, settings.group_timeout_s)
    engine = _load_rank(settings, rank_device)
    seq = 0
    while True:
        key = f"job/{seq}"
        while not store.check([key]):
            time.sleep(JOB_POLL_S)
        message = pickle.loads(store.get(key))
        seq += 1
        kind = message[0]
        if kind == "stop":
            dist.destroy_process_group()
            return 0
        if kind == "warm_up":
            engine.warm_up()
            continue
        _, params_json, image = message
        request = GenerationRequest(image, params=GenerationParams.model_validate(params_json))
        try:
            engine.generate(request, should_cancel=_collective_cancel(engine, None))
        except (GenerationCancelled, SkyreelsError) as exc:
            log.info("rank %d: job ended on every rank: %s", rank, exc)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m skyreels_local.worker.group")
    parser.add_argument("--rank", type=int, required=True)
    parser.add_argument("--port", type=int, required=True, help="rank 0's TCP store port on 127.0.0.1")
    parser.add_argument("--device", default="")
    parser.add_argument("--config-json", required=True)
    parser.add_argument("--log-level", default="INFO")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=args.log_level,
        format=f"%(asctime)s %(levelname)s rank[{args.rank}] %(name)s: %(message)s",
        stream=sys.stderr,
    )
    _die_with_parent()
    signal.signal(signal.SIGTERM, lambda *_: os._exit(0))  # rank 0 owns the job; nothing to hand back
    return follower_main(args.rank, args.port, args.device, Settings(**json.loads(args.config_json)))


if __name__ == "__main__":
    raise SystemExit(main())
