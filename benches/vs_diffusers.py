"""diffusers' side of the side-by-side speed comparison (docs/benchmarks.md).

SD 1.5's UNet from its published config (benches/configs/sd15-unet.json) with random weights,
one forward of batch 2 at each latent size, f32 on the CPU, every core; prints seconds per
forward (after one warm-up) and, with --tomesd, the same with tomesd's ratio-0.5 patch.
rewire's side of the same forward:

    rewire profile benches/configs/sd15-unet.json --size 64x64 --runs 2

Needs torch and diffusers (and tomesd for --tomesd) from pip; rewire itself never needs Python.
Run from the repository root: python3 benches/vs_diffusers.py --sizes 64,128 --runs 2
"""

import argparse
import json
import os
import time

import torch
from diffusers import UNet2DConditionModel


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="64", help="latent sizes, comma-separated")
    ap.add_argument("--runs", type=int, default=2)
    ap.add_argument("--tomesd", action="store_true")
    a = ap.parse_args()
    torch.set_num_threads(os.cpu_count())
    torch.manual_seed(0)
    cfg = json.load(open("benches/configs/sd15-unet.json"))
    t0 = time.perf_counter()
    unet = UNet2DConditionModel.from_config(cfg).eval()
    print(f"diffusers: UNet built in {time.perf_counter() - t0:.1f} s", flush=True)
    variants = [("baseline", None)]
    if a.tomesd:
        variants.append(("tomesd_r05", 0.5))
    for name, ratio in variants:
        if ratio is not None:
            import tomesd

            tomesd.apply_patch(unet, ratio=ratio)
        for s in (int(x) for x in a.sizes.split(",")):
            x = torch.randn(2, 4, s, s)
            t = torch.tensor(500)
            e = torch.randn(2, 77, 768)
            with torch.no_grad():
                unet(x, t, e)
                times = []
                for _ in range(a.runs):
                    t0 = time.perf_counter()
                    unet(x, t, e)
                    times.append(time.perf_counter() - t0)
            mean = sum(times) / len(times)
            print(f"diffusers {name} {s}x{s} batch 2: {mean:.2f} s per forward {times}", flush=True)


if __name__ == "__main__":
    main()
