"""Vision tower throughput (tiles/s): the real Llama 4 encoder size and a small one.

Random weights (the speed does not depend on their values), one batch of tiles, forward only
(encoder + pixel shuffle + adapter + projector to the text width), best of N runs.

    python benchmarks/vision_encoder.py [--tiles 2 --repeats 2 --threads 2 --device cpu]

Configs:
    real   VisionConfig() defaults: 336 px tiles, 14 px patches (577 tokens), width 1408,
           34 layers, 16 heads, MLP 5632, adapter 5632 -> 4096 -> 4096, projector -> 5120
    small  336 px tiles, width 256, 4 layers, 4 heads, MLP 1024, adapter 1024 -> 512 -> 512,
           projector -> 512
"""

from __future__ import annotations

import argparse
import time

import torch

from llama4.config import VisionConfig
from llama4.model.vision import VisionTower

CONFIGS = {
    "real": (VisionConfig(), 5120),
    "small": (
        VisionConfig(
            dim=256,
            n_layers=4,
            n_heads=4,
            mlp_hidden_dim=1024,
            adapter_dim=512,
            adapter_out_dim=512,
            vision_output_dim=512,
        ),
        512,
    ),
}


def flops_per_tile(cfg: VisionConfig, text_dim: int) -> float:
    """Matmul FLOPs of one tile (2 per multiply-add)."""
    p, t, d = cfg.patches_per_side**2, cfg.patches_per_side**2 + 1, cfg.dim
    k2 = round(1 / cfg.pixel_shuffle_ratio) ** 2
    per_layer = 2 * t * (4 * d * d + 2 * d * cfg.mlp_hidden_dim) + 2 * 2 * t * t * d  # linears + attention
    adapter = 2 * (p // k2) * (k2 * d * cfg.adapter_dim + cfg.adapter_dim * cfg.adapter_out_dim)
    return (
        2 * p * 3 * cfg.patch_size**2 * d
        + cfg.n_layers * per_layer
        + adapter
        + 2 * (p // k2) * (cfg.adapter_out_dim * text_dim)
    )


def build(cfg: VisionConfig, text_dim: int, dtype: torch.dtype, device: str) -> VisionTower:
    """Build on meta, then allocate and fill with random values (faster than nn.Linear's init)."""
    with torch.device("meta"):
        tower = VisionTower(cfg, text_dim)
    tower = tower.to_empty(device=device).to(dtype)
    with torch.no_grad():
        for name, param in tower.named_parameters():
            if "norm" in name:
                param.fill_(1.0 if name.endswith("weight") else 0.0)
            else:
                param.normal_(0.0, param.shape[-1] ** -0.5)
    return tower.eval()


def bench(name: str, dtype: torch.dtype, tiles: int, repeats: int, device: str) -> None:
    cfg, text_dim = CONFIGS[name]
    tower = build(cfg, text_dim, dtype, device)
    pixels = torch.rand(tiles, 3, cfg.image_size, cfg.image_size, device=device) * 2 - 1
    with torch.inference_mode():
        tower(pixels[:1])  # warm-up
        best = float("inf")
        for _ in range(repeats):
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            out = tower(pixels)
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            best = min(best, time.perf_counter() - t0)
    assert torch.isfinite(out.float()).all()
    params = sum(p.numel() for p in tower.parameters())
    gflops = flops_per_tile(cfg, text_dim) * tiles / best / 1e9
    print(
        f"{name:5s} {str(dtype).removeprefix('torch.'):8s} params {params / 1e6:7.1f}M  {tiles} tiles "
        f"in {best:7.3f} s  ->  {tiles / best:8.3g} tiles/s  ({gflops:6.1f} GFLOP/s, "
        f"{flops_per_tile(cfg, text_dim) / 1e9:.1f} GFLOP/tile)",
        flush=True,
    )
    del tower


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiles", type=int, default=2, help="tiles per forward for the real config")
    ap.add_argument("--small-tiles", type=int, default=17, help="tiles per forward for the small config")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--configs", default="real,small")
    ap.add_argument("--dtypes", default="float32,bfloat16")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, device {args.device}, threads {torch.get_num_threads()}")
    for name in args.configs.split(","):
        for dtype in args.dtypes.split(","):
            tiles = args.tiles if name == "real" else args.small_tiles
            bench(name, getattr(torch, dtype), tiles, args.repeats, args.device)


if __name__ == "__main__":
    main()
