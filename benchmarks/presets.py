"""Named matrices. Every preset runs our variants and the peers under the same settings."""

from typing import Dict

ALL_PEERS = [
    "timm/efficientnet_b0",
    "timm/efficientnet_b0_g16_evos",
    "timm/efficientnet_b2",
    "torchvision/efficientnet_b0",
    "torchvision/resnet50",
]

# Each preset: our-variant axes, peers, shared axes, and the timing method. The CPU presets pin
# one thread: on a shared machine two threads that wait for each other make every row noisy
# (--threads 0 gives torch's default, --threads N any other count).
PRESETS: Dict[str, Dict[str, object]] = {
    # make bench: the whole picture at a small size, interleaved three times: ~1.5 minutes on a
    # 2-core CPU.
    "quick": dict(
        device="cpu",
        models=["b0"],
        groups=[1, 16],
        expands=[6],
        norms=["bn"],
        variants=["g1-e6-bn", "g16-e6-bn", "g16-e6-ln+pn", "g16-e4-gn", "g16-e4-ln+pn"],
        res=["112"],
        batch=[8],
        precisions=["fp32"],
        layouts=["nchw"],
        compile=[False],
        modes=["train", "infer"],
        peers=ALL_PEERS,
        warmup=2,
        steps=3,
        repeats=3,
        threads=1,
    ),
    # The CPU goals: ours vs timm B0 and G16-LN+PN vs G16-BN, interleaved, several repeats.
    "cpu-goals": dict(
        device="cpu",
        models=["b0"],
        groups=[1, 16],
        expands=[6],
        norms=["bn"],
        variants=["g1-e6-bn", "g16-e6-bn", "g16-e6-ln+pn"],
        res=["native"],
        batch=[16],
        precisions=["fp32"],
        layouts=["nchw"],
        compile=[False],
        modes=["train", "infer"],
        peers=["timm/efficientnet_b0", "timm/efficientnet_b0_g16_evos"],
        warmup=2,
        steps=2,
        repeats=6,
        threads=1,
    ),
    # benchmarks/gpu.sh: the full matrix on one GPU (both layouts; the report picks the faster).
    # Each comparison the report makes has both sides: G16 vs G1 at e6 (BN), and LN+PN (and GN)
    # vs BN at G16-e4, the paper's grouped setting.
    "gpu": dict(
        device="cuda",
        models=["b0", "b2", "b4"],
        groups=[1, 16],
        expands=[6],
        norms=["bn"],
        variants=["g1-e6-bn", "g1-e6-gn", "g16-e6-bn", "g16-e4-bn", "g16-e4-ln+pn", "g16-e4-gn"],
        res=["native"],
        batch=[128],
        precisions=["bf16"],
        layouts=["nchw", "channels_last"],
        compile=[False],
        modes=["train", "infer"],
        peers=ALL_PEERS,
        warmup=5,
        steps=20,
        repeats=1,
        threads=0,
    ),
    # Seconds: harness dry runs and tests.
    "tiny": dict(
        device="cpu",
        models=["b0"],
        groups=[1, 16],
        expands=[6],
        norms=["bn"],
        variants=["g1-e6-bn", "g16-e6-ln+pn"],
        res=["32"],
        batch=[2],
        precisions=["fp32"],
        layouts=["nchw"],
        compile=[False],
        modes=["train", "infer"],
        peers=["timm/efficientnet_b0"],
        warmup=1,
        steps=2,
        repeats=1,
        threads=0,
    ),
}
