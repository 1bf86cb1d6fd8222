#!/usr/bin/env python3
"""PyTorch side of `scripts/bench_data.sh`: DINOv2's multi-crop augmentation (DataAugmentationDINO:
2 global + N local RandomResizedCrop, flip, colour jitter, grayscale, Gaussian blur, solarize,
ImageNet normalisation) with torchvision on PIL images, fed by a DataLoader with `--workers`
processes, as DINOv2 trains. Prints one JSON line (samples/s = source images per second)."""
import argparse, json, time

import numpy as np
import torch
from PIL import Image, ImageFilter, ImageOps
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms as T


class GaussianBlur(T.RandomApply):  # dinov2/data/transforms.py
    def __init__(self, p, radius_min=0.1, radius_max=2.0):
        super().__init__([T.GaussianBlur(kernel_size=9, sigma=(radius_min, radius_max))], p=p)


def dino_augmentation(global_size, local_size, n_local):  # dinov2/data/augmentations.py
    flip_jitter = T.Compose([
        T.RandomHorizontalFlip(p=0.5),
        T.RandomApply([T.ColorJitter(0.4, 0.4, 0.2, 0.1)], p=0.8),
        T.RandomGrayscale(p=0.2),
    ])
    norm = T.Compose([T.ToTensor(), T.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))])
    g_crop = T.RandomResizedCrop(global_size, scale=(0.32, 1.0), interpolation=T.InterpolationMode.BICUBIC)
    l_crop = T.RandomResizedCrop(local_size, scale=(0.05, 0.32), interpolation=T.InterpolationMode.BICUBIC)
    g1 = T.Compose([g_crop, flip_jitter, GaussianBlur(1.0), norm])
    g2 = T.Compose([g_crop, flip_jitter, GaussianBlur(0.1), T.RandomSolarize(128, p=0.2), norm])
    loc = T.Compose([l_crop, flip_jitter, GaussianBlur(0.5), norm])
    return lambda img: ([g1(img), g2(img)], [loc(img) for _ in range(n_local)])


class Images(Dataset):
    def __init__(self, n, size, aug):
        rng = np.random.default_rng(0)
        base = rng.integers(0, 256, (8, size, size, 3), dtype=np.uint8)
        self.images, self.n, self.aug = [Image.fromarray(b) for b in base], n, aug

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return self.aug(self.images[i % len(self.images)])


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--images", type=int, default=256)
    ap.add_argument("--size", type=int, default=256, help="source image side")
    ap.add_argument("--global-size", type=int, default=224)
    ap.add_argument("--local-size", type=int, default=96)
    ap.add_argument("--n-local", type=int, default=8)
    ap.add_argument("--workers", type=int, default=2)
    a = ap.parse_args()
    torch.set_num_threads(1)
    ds = Images(a.images, a.size, dino_augmentation(a.global_size, a.local_size, a.n_local))
    loader = DataLoader(ds, batch_size=16, num_workers=a.workers, collate_fn=lambda b: b, persistent_workers=False)
    t0 = time.perf_counter()
    n = sum(len(batch) for batch in loader)
    dt = time.perf_counter() - t0
    print(json.dumps(dict(impl="torchvision", workers=a.workers, images=n, size=a.size, global_size=a.global_size,
                          local_size=a.local_size, n_local=a.n_local, samples_per_s=round(n / dt, 2),
                          wall_s=round(dt, 2), torch=torch.__version__)))


if __name__ == "__main__":
    main()
