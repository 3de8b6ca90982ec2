"""Several GPUs per video: the communication model on paper, and a measurement where one can run.

    python scripts/parallel_scaling.py                      # the model: bytes, link times, speedups
    python scripts/parallel_scaling.py --measure 1 2 4 \\
        --model tiny-random --device cpu --steps 4          # measured: s/step and end to end per N

The model (PROJECTED) takes the measured one-GPU figures of README "Speed presets" (H200, exact
preset: 9.14 s per step of two forwards, VAE decode 8.0 s) and adds, per rank and step, the bytes
our implementation moves (engine/parallel.py): per attention layer four all-to-alls of the video
activation (Q, K, V in, output back), the text output's all-gather over heads, the gather of
`proj_out` and, with CFG-parallel, one all-gather of the velocity. No overlap of communication
and compute is assumed (the all-to-alls are synchronous), so the projection is conservative.
The VAE decode is split over the group (engine/parallel_decode.py): the one-GPU decode's 9
temporal chunks (untiled on an H200) are shared by the same largest-first assignment, so a
rank's decode time is its share of the chunks' output frames, plus sending the decoded frames
to rank 0 over the link; rank 0's decode alone (the path before the split) is shown beside it.

--measure (MEASURED) runs real groups (worker/group.py) on this machine and prints what it saw;
N = 1 is timed twice, plain engine and a group of one, which is the parallel path's own overhead.
"""

from __future__ import annotations

import argparse
import heapq
import json
import sys
import time

# SkyReels V1 at 544x960, 97 frames (PERFORMANCE.md): 25 x 68 x 120 latent, patch 1x2x2.
TOKENS = 25 * 34 * 60  # 51,000 video tokens
TEXT_TOKENS = 256  # the longest prompt; most are far shorter
HIDDEN = 3072  # 24 heads x 128
HEADS = 24
BLOCKS = 60  # 20 dual-stream + 40 single-stream
LATENT_ELEMENTS = 16 * 25 * 68 * 120  # the velocity the CFG halves exchange
PATCH_OUT = 16 * 1 * 2 * 2  # proj_out features per token (out channels x patch)
BF16 = 2
STEPS = 30
LATENT_FRAMES = 25
VIDEO_BYTES = 97 * 544 * 960 * 3 * BF16  # the decoded clip, 16-bit, gathered on rank 0
# diffusers' framewise decode: chunks of 4+1 latent frames at a stride of 3 (16+1 / 12 frames).
CHUNK_LATENT, CHUNK_STRIDE, TEMPORAL_RATIO = 4, 3, 4

# MEASURED on one H200 (README "Speed presets and benchmark", 2026-11-26).
STEP_S_ONE_GPU = 9.14  # exact preset, two forwards
DECODE_S = 8.0  # VAE decode of the whole clip on one GPU
TEXT_S = 1.0  # text encoding once per prompt (an assumption: not measured at full size)

# Link bandwidth per GPU per direction, GB/s (1e9 bytes).
LINKS = {
    "NVLink (H100/H200 SXM)": 450.0,
    "PCIe 5 x16 (L40S/H100 PCIe class)": 50.0,
    "PCIe 4 x16 (4090/A6000 class)": 25.0,
}
LINK_EFFICIENCY = 0.7  # achieved all-to-all bandwidth vs the link's peak (assumption)


def splits(n: int) -> tuple[int, int]:
    """The automatic split (engine/parallel.choose_split): CFG x2 when even, Ulysses for the rest."""
    cfg = 2 if n % 2 == 0 else 1
    return cfg, n // cfg


def bytes_per_step(n: int) -> dict[str, float]:
    """Bytes one rank sends per denoising step, by collective."""
    cfg, u = splits(n)
    forwards = 2 // cfg  # forwards per rank per step
    share = (u - 1) / u  # of each all-to-all, the part that leaves the rank
    activation = TOKENS * HIDDEN * BF16
    per = {
        "all-to-all (Q, K, V, out) x60 layers": forwards * BLOCKS * 4 * activation / u * share,
        "text all-gather x60 layers": forwards * BLOCKS * TEXT_TOKENS * HIDDEN * BF16 / u * (u - 1),
        "proj_out all-gather": forwards * TOKENS * PATCH_OUT * BF16 / u * (u - 1),
        "CFG velocity all-gather": LATENT_ELEMENTS * BF16 if cfg == 2 else 0.0,
    }
    if u == 1:
        per = {k: (v if k.startswith("CFG") else 0.0) for k, v in per.items()}
    return per


def decode_chunk_frames() -> list[int]:
    """Output frames each decoder call makes (the untiled plan: one call per temporal chunk)."""
    chunks = [(i, min(i + CHUNK_LATENT + 1, LATENT_FRAMES)) for i in range(0, LATENT_FRAMES, CHUNK_STRIDE)]
    return [(stop - start - 1) * TEMPORAL_RATIO + 1 for start, stop in chunks]


def decode_share(n: int) -> float:
    """The busiest rank's share of the decode work under engine/parallel_decode.assign_units."""
    costs = decode_chunk_frames()
    loads = [(0, rank) for rank in range(n)]
    for cost in sorted(costs, reverse=True):
        load, rank = heapq.heappop(loads)
        heapq.heappush(loads, (load + cost, rank))
    return max(load for load, _ in loads) / sum(costs)


def split_decode_s(n: int, bandwidth_gb_s: float) -> float:
    gather_s = VIDEO_BYTES * (n - 1) / n / (bandwidth_gb_s * 1e9 * LINK_EFFICIENCY)
    return DECODE_S * decode_share(n) + gather_s


def projected(n: int, bandwidth_gb_s: float, *, split_decode: bool) -> dict[str, float]:
    comm_s = sum(bytes_per_step(n).values()) / (bandwidth_gb_s * 1e9 * LINK_EFFICIENCY)
    step_s = STEP_S_ONE_GPU / n + comm_s
    decode_s = split_decode_s(n, bandwidth_gb_s) if split_decode else DECODE_S
    total = TEXT_S + STEPS * step_s + decode_s
    one = TEXT_S + STEPS * STEP_S_ONE_GPU + DECODE_S
    return {
        "comm_s_per_step": comm_s,
        "s_per_step": step_s,
        "decode_s": decode_s,
        "end_to_end_s": total,
        "speedup": one / total,
    }


def print_model() -> None:
    print("PROJECTED (comm model on paper; GPU figures not run in this session)")
    print(f"544x960x97: {TOKENS} video tokens, activation {TOKENS * HIDDEN * BF16 / 1e6:.0f} MB (bf16)")
    print(
        f"one GPU (measured, H200 exact): {STEP_S_ONE_GPU} s/step, decode {DECODE_S} s, text {TEXT_S} s (assumed)"
    )
    print()
    print("| N | split | GB sent per rank per step | " + " | ".join(f"comm s/step {k}" for k in LINKS) + " |")
    print("|---|---|---|" + "---|" * len(LINKS))
    for n in (2, 4, 8):
        cfg, u = splits(n)
        total = sum(bytes_per_step(n).values())
        times = [f"{total / (bw * 1e9 * LINK_EFFICIENCY):.3f}" for bw in LINKS.values()]
        print(f"| {n} | CFG x{cfg} . Ulysses x{u} | {total / 1e9:.2f} | " + " | ".join(times) + " |")
    print()
    print(
        "| N | link | s/step | decode s, split (as built) | end to end s | speedup "
        "| end to end s, decode on rank 0 only | speedup |"
    )
    print("|---|---|---|---|---|---|---|---|")
    one = TEXT_S + STEPS * STEP_S_ONE_GPU + DECODE_S
    print(f"| 1 | - | {STEP_S_ONE_GPU:.2f} | {DECODE_S:.2f} | {one:.0f} | 1.00 | {one:.0f} | 1.00 |")
    for n in (2, 4, 8):
        for link, bw in LINKS.items():
            a = projected(n, bw, split_decode=False)
            b = projected(n, bw, split_decode=True)
            print(
                f"| {n} | {link} | {b['s_per_step']:.2f} | {b['decode_s']:.2f} | {b['end_to_end_s']:.0f} "
                f"| {b['speedup']:.2f} | {a['end_to_end_s']:.0f} | {a['speedup']:.2f} |"
            )


def measure(worlds: list[int], model: str, device: str, steps: int) -> list[dict]:
    from PIL import Image

    from skyreels_local.config import Settings
    from skyreels_local.engine.loader import load_engine
    from skyreels_local.engine.request import GenerationRequest
    from skyreels_local.worker.group import launch_group

    def request(engine):
        width, height = engine.spec.geometry.sizes["16:9"]
        image = Image.new("RGB", (width, height), (120, 90, 60))
        return GenerationRequest(image=image, prompt="a measured clip", seed=1, num_inference_steps=steps)

    def timed(engine, label: str, n: int) -> dict:
        engine.generate(request(engine))  # one untimed run: caches, allocator
        result = engine.generate(request(engine))
        t = result.timings
        row = {
            "label": label,
            "n": n,
            "s_per_step": t["denoise_s"] / steps,
            "end_to_end_s": t["total_s"],
            "decode_s": t["decode_s"],
        }
        print("MEASURED", json.dumps(row), flush=True)
        return row

    rows = []
    for n in worlds:
        if n == 1:
            plain = load_engine(model, device=device, preset="exact")
            rows.append(timed(plain, "plain engine", 1))
            del plain
        settings = Settings(model=model, device=device, gpus_per_video=n)
        group = launch_group(settings, device, on_group_lost=lambda reason: sys.exit(reason))
        try:
            rows.append(timed(group, f"group ({group.split.describe()})", n))
        finally:
            group.close()
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--measure", type=int, nargs="*", help="group sizes to run here, e.g. 1 2 4")
    parser.add_argument("--model", default="tiny-random")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--out", help="write the measured rows as JSON here")
    args = parser.parse_args(argv)
    print_model()
    if args.measure:
        started = time.perf_counter()
        rows = measure(args.measure, args.model, args.device, args.steps)
        base = next((r for r in rows if r["label"] == "plain engine"), None)
        print(
            f"\nMEASURED on {args.device}, model {args.model}, {args.steps} steps ({time.perf_counter() - started:.0f} s)"
        )
        print("| what | N | s/step | end to end s | speedup vs plain N=1 |")
        print("|---|---|---|---|---|")
        for r in rows:
            speedup = f"{base['end_to_end_s'] / r['end_to_end_s']:.2f}" if base else "-"
            print(
                f"| {r['label']} | {r['n']} | {r['s_per_step']:.4f} | {r['end_to_end_s']:.3f} | {speedup} |"
            )
        if args.out:
            with open(args.out, "w") as f:
                json.dump(rows, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
