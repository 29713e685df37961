"""Where the warp-specialised attention candidates go wrong on the GPU (the H200 sweep at adcb399 found NaN in
every one: benchmarks/results/sweeps/attention-ws-h200.json). Per config: NaN count split by the row's half
of its 128-row tile (a producer / two-consumer kernel gives each consumer warp group 64 rows), and the error of
the finite outputs against the fp64 reference.

    python benchmarks/attention_ws_probe.py
"""
from __future__ import annotations

import torch

from kernopt.kernels.flash_attention import config_str, flash_attention, flash_attention_ref


def main() -> None:
    torch.manual_seed(0)
    base = {"BLOCK_M": 128, "BLOCK_N": 64, "num_warps": 4, "TMA": True, "DEVICE_TMA": True}
    configs = [
        {"BLOCK_M": 64, "BLOCK_N": 64, "num_warps": 4, "num_stages": 3, "TMA": True, "DEVICE_TMA": True},
        {"BLOCK_M": 128, "BLOCK_N": 64, "num_warps": 4, "num_stages": 2, "TMA": True, "DEVICE_TMA": True},
        dict(base, num_stages=2, WARP_SPEC=True),
        dict(base, num_stages=3, WARP_SPEC=True),
    ]
    for B, H, S, causal in ((1, 2, 1024, False), (1, 2, 1024, True), (2, 4, 256, False)):
        q, k, v = (torch.randn(B, H, S, 128, device="cuda", dtype=torch.bfloat16) for _ in range(3))
        ref = flash_attention_ref(q.double(), k.double(), v.double(), causal=causal)
        for cfg in configs:
            out = torch.full_like(q, float("nan"))
            try:
                flash_attention(q, k, v, causal=causal, config=cfg, out=out)
                torch.cuda.synchronize()
            except Exception as e:
                print(f"B{B} H{H} S{S} causal={int(causal)} [{config_str(cfg)}] raised {type(e).__name__}: {e}")
                continue
            nan = torch.isnan(out).any(-1)  # [B, H, S]
            rows = torch.arange(S, device="cuda") % 128
            lo, hi = int(nan[..., rows < 64].sum()), int(nan[..., rows >= 64].sum())
            fin = ~torch.isnan(out)
            err = (out.double() - ref).abs()[fin].max().item() if fin.any() else float("nan")
            first = nan.nonzero()[:3].tolist()
            print(f"B{B} H{H} S{S} causal={int(causal)} [{config_str(cfg)}] NaN rows: {lo} in tile rows 0-63, "
                  f"{hi} in 64-127 of {B * H * S}; first {first}; max err of finite {err:.3g}")


if __name__ == "__main__":
    main()
