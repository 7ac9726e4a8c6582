"""The input-pipeline benchmark: images/s of decode + augmentation + collation, ours beside
torchvision's standard ImageNet transforms, on the same JPEG files in the same run.

    python -m benchmarks.data                                  # the default matrix, ~5 min here
    python -m benchmarks.data --resolutions 224,160 --workers 1,2 --repeats 2 --out data-cpu
    python -m benchmarks.data_report benchmarks/results/data-cpu.jsonl      # regenerate the report

Pipelines: ``ours`` (app/data with reduced JPEG decoding, the default), ``ours-full``
(``data.reduced_decode=false``: what ours costs decoding every pixel), ``torchvision``
(``ImageFolder`` + ``RandomResizedCrop`` + ``RandomHorizontalFlip`` + ``PILToTensor`` for training,
``Resize(round(r·256/224))`` + ``CenterCrop`` + ``PILToTensor`` for validation, torch's
``DataLoader`` with its defaults). All three decode with the same Pillow/libjpeg and yield uint8
batches, so the difference is what each does per image.

The folder is made at run time from the photographs bundled with installed packages
(benchmarks/photos.py), re-encoded at ImageNet's typical sizes and qualities; no downloads. The
files sit in the page cache (written just before): this measures decoding and augmentation, not
the disk. A case builds its loader, waits for the first batch (worker start-up is not counted),
then times the rest of the epoch; it also counts CPU seconds per image, of this process and of
its worker processes (read from /proc: see ``time_case``). Cases run in interleaved rounds (odd
rounds reversed), so every pipeline sees the machine's busy and quiet moments alike; every row
records the load average.
"""

import argparse
import csv
import gc
import json
import multiprocessing
import os
import resource
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, Iterable, List

import numpy as np
import torch

from . import RESULTS_DIR
from .environment import describe, load_average
from .photos import IMAGENET_MIX, QUALITIES, make_folder, photographs

PIPELINES = ("ours", "ours-full", "torchvision")


def _list(kind=str):
    return lambda text: [kind(v) for v in text.split(",") if v]


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m benchmarks.data", description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--folder",
        help="an ImageNet-style folder to read (default: one made at run time from the bundled photographs)",
    )
    p.add_argument(
        "--images",
        type=int,
        default=160,
        help="images per class per split in the made folder (one class per photograph)",
    )
    p.add_argument("--pipelines", type=_list(), default=list(PIPELINES))
    p.add_argument("--splits", type=_list(), default=["train", "val"])
    p.add_argument(
        "--resolutions",
        type=_list(int),
        default=[224, 160, 128],
        help="224 native B0; 160 the paper's half-resolution B0 (app/resolution.py); 128",
    )
    p.add_argument("--workers", type=_list(int), default=[1, 2])
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--repeats", type=int, default=2, help="interleaved rounds over all cases")
    p.add_argument("--out", default="data-cpu", help="name of the rows/report under benchmarks/results/")
    args = p.parse_args(argv)
    unknown = sorted(set(args.pipelines) - set(PIPELINES))
    if unknown:
        p.error(f"--pipelines: unknown {', '.join(unknown)}; choose from {', '.join(PIPELINES)}")
    if any(r < 32 for r in args.resolutions) or any(w < 0 for w in args.workers) or args.batch < 1:
        p.error("--resolutions >= 32, --workers >= 0 and --batch >= 1")
    return args


def ours_loader(folder: str, split: str, resolution: int, workers: int, batch: int, reduced: bool):
    from app.config import build_config
    from app.data import build_dataset, build_loader
    from app.specs import data_spec

    cfg = build_config(
        None,
        [f"data.dataset={folder}", f"data.workers={workers}", f"data.reduced_decode={str(reduced).lower()}"],
    )
    dataset = build_dataset(cfg, split, resolution)
    loader = build_loader(dataset, batch, train=split == "train", spec=data_spec(cfg), seed=0)
    return (images for images, _ in loader)


def torchvision_loader(folder: str, split: str, resolution: int, workers: int, batch: int):
    from torchvision import datasets, transforms  # (a benchmark peer only)

    if split == "train":
        steps = [transforms.RandomResizedCrop(resolution), transforms.RandomHorizontalFlip()]
    else:
        steps = [transforms.Resize(round(resolution * 256 / 224)), transforms.CenterCrop(resolution)]
    data = datasets.ImageFolder(
        os.path.join(folder, split), transform=transforms.Compose(steps + [transforms.PILToTensor()])
    )
    loader = torch.utils.data.DataLoader(
        data, batch_size=batch, shuffle=split == "train", num_workers=workers, drop_last=split == "train"
    )
    return (images for images, _ in loader)


TICK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def own_cpu() -> float:
    """CPU seconds of this process, all its threads."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def workers_cpu() -> Dict[int, float]:
    """CPU seconds so far of each live child process (the loader's workers), from /proc."""
    seconds = {}
    for child in multiprocessing.active_children():
        try:
            with open(f"/proc/{child.pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            seconds[child.pid] = (int(fields[11]) + int(fields[12])) / TICK  # utime, stime
        except (OSError, IndexError, ValueError):
            continue
    return seconds


def time_case(batches: Iterable[torch.Tensor]) -> Dict[str, float]:
    """Wall clock: images and seconds from the first batch's arrival to the last one's. CPU per
    image: the worker processes' whole CPU time (they start with the case and have nothing left
    to do after its last batch) over all the epoch's images, plus this process's CPU time while
    the batches were timed over those batches' images (its one-off set-up is left out); a busy
    shared machine disturbs this far less than the wall clock."""
    iterator = iter(batches)
    first = next(iterator)
    started, cpu_started = time.perf_counter(), own_cpu()
    images, batches_timed, workers = 0, 0, {}
    for images_batch in iterator:
        assert images_batch.dtype == torch.uint8 and images_batch.shape[1:] == first.shape[1:]
        images += images_batch.shape[0]
        batches_timed += 1
        seconds, main_cpu = time.perf_counter() - started, own_cpu() - cpu_started
        workers.update(workers_cpu())  # the last reading of each worker before it ends
    total = images + first.shape[0]
    cpu_ms = 1000 * (sum(workers.values()) / total + main_cpu / images)
    return {
        "images": images,
        "batches": batches_timed,
        "seconds": round(seconds, 4),
        "images_per_s": round(images / seconds, 2),
        "cpu_ms_per_image": round(cpu_ms, 3),
        "worker_processes_seen": len(workers),
    }


def reduction_shares(folder: str, resolution: int, crops: int = 400) -> Dict[str, float]:
    """Which share of training crops (drawn as the loader draws them, from the headers' sizes)
    decode at 1/1, 1/2, 1/4, 1/8 at ``resolution``; the validation reduction per image likewise."""
    from PIL import Image

    from app.data.loader import sample_seed
    from app.data.transforms import random_crop_box, reduction_for, val_resize_size

    files = sorted(Path(folder, "train").glob("*/*.jpg"))
    sizes = []
    for path in files:
        with Image.open(path) as image:
            sizes.append(image.size)
    train = {1: 0, 2: 0, 4: 0, 8: 0}
    val = dict(train)
    for n in range(crops):
        w, h = sizes[n % len(sizes)]
        box = random_crop_box(w, h, (0.08, 1.0), np.random.default_rng(sample_seed(0, 0, n)))
        train[reduction_for((box[2] - box[0], box[3] - box[1]), (resolution, resolution))] += 1
        val[reduction_for((w, h), val_resize_size(w, h, resolution))] += 1
    return {
        **{f"train_1/{k}": round(v / crops, 3) for k, v in train.items()},
        **{f"val_1/{k}": round(v / crops, 3) for k, v in val.items()},
    }


def versions() -> Dict[str, str]:
    import PIL
    from PIL import features

    try:
        import torchvision

        tv = torchvision.__version__
    except ImportError:
        tv = "not installed"
    return {
        "pillow": PIL.__version__,
        "libjpeg_turbo": str(features.version("libjpeg_turbo")),
        "torchvision": tv,
        "numpy": np.__version__,
        "python": sys.version.split()[0],
        "cpus": str(os.cpu_count()),
    }


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    os.makedirs(RESULTS_DIR, exist_ok=True)
    base = os.path.join(RESULTS_DIR, args.out)
    torch.set_num_threads(1)  # the main process only receives batches; workers use one thread each
    with tempfile.TemporaryDirectory(prefix="data-bench-") as tmp:
        folder = args.folder or str(
            make_folder(Path(tmp) / "imagenet-like", args.images, sizes=IMAGENET_MIX, qualities=QUALITIES)
        )
        cases = [
            (p, s, r, w)
            for s in args.splits
            for r in args.resolutions
            for w in args.workers
            for p in args.pipelines
        ]
        fixed = {
            **describe("cpu"),
            **versions(),
            "batch": args.batch,
            "photographs": ",".join(photographs()) if not args.folder else "",
            "folder": "made at run time" if not args.folder else args.folder,
            "command": "python -m benchmarks.data " + " ".join(sys.argv[1:] if argv is None else argv),
        }
        shares = {r: reduction_shares(folder, r) for r in args.resolutions}
        rows: List[Dict[str, object]] = []
        for round_ in range(args.repeats):
            for pipeline, split, resolution, workers in cases if round_ % 2 == 0 else cases[::-1]:
                load_before = load_average()
                if pipeline == "torchvision":
                    batches = torchvision_loader(folder, split, resolution, workers, args.batch)
                else:
                    batches = ours_loader(
                        folder, split, resolution, workers, args.batch, reduced=pipeline == "ours"
                    )
                row = {
                    **fixed,
                    "pipeline": pipeline,
                    "split": split,
                    "resolution": resolution,
                    "workers": workers,
                    "round": round_,
                    **time_case(batches),
                    "load_before": load_before,
                    "load_after": load_average(),
                    **(shares[resolution] if pipeline == "ours" else {}),
                }
                del batches
                gc.collect()  # this case's workers end before the next case starts
                rows.append(row)
                print(
                    f"{pipeline:>11} {split:>5} {resolution:>4} px {workers} worker(s): "
                    f"{row['images_per_s']:8.1f} img/s, {row['cpu_ms_per_image']} CPU ms/image "
                    f"(load {row['load_after']})",
                    flush=True,
                )
    with open(base + ".jsonl", "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    keys = sorted({k for row in rows for k in row})
    with open(base + ".csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=keys)
        writer.writeheader()
        writer.writerows(rows)
    with open(base + ".cmd", "w") as f:
        f.write(fixed["command"] + "\n")
    from .data_report import write_report

    for path in write_report(rows, base):
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
