"""Time and peak memory of the fused query-slice capture against eager output_attentions.

Each mode runs in its own subprocess so that peak RSS (CPU) or peak CUDA memory is
measured for that mode alone. The model is a random-weight Qwen2-VL of a sizable
configuration (by default 8 layers of the Qwen2-VL-2B text width) on 672 px images.

    python benchmarks/capture_vs_eager.py [--layers 8] [--hidden 1536] [--image 672] [--batch 2]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time


def run_mode(mode: str, args: argparse.Namespace) -> dict:
    import numpy as np
    import torch
    from PIL import Image

    from mechhi.models.qwen2_vl import Qwen2VLAdapter
    from mechhi.trace import AttentionTracer

    torch.manual_seed(0)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    heads = args.hidden // 128
    model, processor = Qwen2VLAdapter.build_tiny(
        words=["red", "circle"], layers=args.layers, heads=heads, kv_heads=max(1, heads // 6), head_dim=128,
        vision_depth=2, vision_width=256, max_pixels=args.image**2,
    )
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    model = model.to(device=device, dtype=dtype).eval()
    adapter = Qwen2VLAdapter(model.config, processor)
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 255, (args.image, args.image, 3), dtype=np.uint8))
              for _ in range(args.batch)]
    batch = adapter.prepare(images, ["a red circle"] * args.batch)
    seq = batch.inputs["input_ids"].shape[1]
    tracer = AttentionTracer(model, adapter)

    def once():
        if mode == "fused":
            return tracer.trace(batch)
        model.set_attn_implementation("eager")
        moved = batch.to(device, dtype)
        with torch.no_grad():
            out = model(**moved.inputs, output_attentions=True)
        return [a.float().cpu() for a in out.attentions]

    once()  # warm-up
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        once()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    peak = (torch.cuda.max_memory_allocated() if device == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    return {"mode": mode, "device": device, "seq_len": seq, "seconds": min(times),
            "peak_mib": peak / 2**20, "peak_kind": "cuda allocated" if device == "cuda" else "process max RSS"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=1536)
    parser.add_argument("--image", type=int, default=672)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--mode", choices=["fused", "eager"])
    args = parser.parse_args()
    if args.mode:
        print(json.dumps(run_mode(args.mode, args)))
        return
    results = []
    for mode in ("fused", "eager"):
        cmd = [sys.executable, __file__, "--mode", mode] + [
            f"--{k}={v}" for k, v in vars(args).items() if k != "mode" and v is not None]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
        results.append(json.loads(out))
    config = {k: v for k, v in vars(args).items() if k != "mode"}
    print(f"config: {config}, sequence length {results[0]['seq_len']}, device {results[0]['device']}")
    for r in results:
        print(f"{r['mode']:>6}: {r['seconds']:.3f} s per batch, peak {r['peak_mib']:.0f} MiB ({r['peak_kind']})")
    fused, eager = results
    print(f"eager / fused: time x{eager['seconds'] / fused['seconds']:.2f}, memory x{eager['peak_mib'] / fused['peak_mib']:.2f}")


if __name__ == "__main__":
    main()
