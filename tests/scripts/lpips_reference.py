"""LPIPS-VGG reference for tests/eval_lpips.rs: `python lpips_reference.py OUT_DIR`.

Writes to OUT_DIR:
  vgg16-seeded.pth           the `features.*` part of torchvision's `vgg16(weights=None)` state dict built
                             after `torch.manual_seed(0)` (a seeded random backbone: nothing is downloaded),
                             in the key layout of torchvision's `vgg16-397923af.pth`, zip format
  vgg16-seeded-legacy.pth    the same, in PyTorch's legacy (pre-1.6) format, like `vgg16-397923af.pth` itself
  mixed-legacy.pth, mixed-zip.pth   an OrderedDict of the backbone plus an int64, a half, a transposed view and
                             an offset view sharing the backbone's storages, in both formats
  lpips-model-state.pth      `torch.save(model.state_dict())` of that LPIPS model (zip; net.sliceK.N.*, lin*)
  lpips-reference.safetensors
      in0.<i>, in1.<i>       pair i, [1, 3, H, W] float32 in [-1, 1] (pairs 0-5: 64x64, pairs 6-7: 48x80)
      heads.<k>              lin<k>.model.1.weight of the package's weights/v0.1/vgg.pth, as torch.load reads it
      out.<i>                [1] float32: `lpips.LPIPS(net='vgg', version='0.1')(in0, in1)` of the PyPI
                             package with its shipped v0.1 heads and the seeded backbone, each pair alone
      mixed.<name>           the tensors of mixed-*.pth, contiguous
      out.batch6             [6] float32: the same for pairs 0-5 (64x64) in one batch

Needs torch, torchvision, lpips and safetensors (the project venv).
"""
import collections
import os
import sys
import warnings

import torch
import torchvision
import lpips
from safetensors.torch import save_file

# lpips builds its trunk with torchvision's deprecated `pretrained=` argument.
warnings.filterwarnings("ignore", category=UserWarning)

# lpips.pretrained_networks.vgg16 takes torchvision's features[0:4], [4:9], [9:16], [16:23], [23:30].
SLICES = [(0, 4), (4, 9), (9, 16), (16, 23), (23, 30)]


def seeded_backbone():
    torch.manual_seed(0)
    vgg = torchvision.models.vgg16(weights=None)
    return {k: v.clone() for k, v in vgg.state_dict().items() if k.startswith("features.")}


def smooth(gen, h, w, cells):
    """A smooth random image in [-1, 1]: low-resolution noise upsampled bilinearly, plus a colour ramp."""
    low = torch.rand(1, 3, cells, cells, generator=gen) * 2 - 1
    img = torch.nn.functional.interpolate(low, size=(h, w), mode="bilinear", align_corners=False)
    ramp = torch.linspace(-0.3, 0.3, w).view(1, 1, 1, w) * (torch.rand(1, 3, 1, 1, generator=gen) * 2 - 1)
    return (img + ramp).clamp(-1, 1)


def pairs():
    gen = torch.Generator().manual_seed(1234)
    out = []
    for i in range(8):
        h, w = (64, 64) if i < 6 else (48, 80)
        a = smooth(gen, h, w, 4 + 2 * i)
        kind = i % 4
        if kind == 0:  # similar: small pixel noise
            b = (a + 0.05 * torch.randn(a.shape, generator=gen)).clamp(-1, 1)
        elif kind == 1:  # unrelated
            b = smooth(gen, h, w, 6 + i)
        elif kind == 2:  # similar: blurred
            b = torch.nn.functional.avg_pool2d(a, 3, stride=1, padding=1, count_include_pad=False)
        else:  # colour shift + strong noise
            b = (0.8 * a + 0.1 + 0.3 * torch.randn(a.shape, generator=gen)).clamp(-1, 1)
        out.append((a.contiguous(), b.contiguous()))
    return out


def main():
    if len(sys.argv) != 2:
        sys.exit("usage: lpips_reference.py OUT_DIR")
    out_dir = sys.argv[1]
    os.makedirs(out_dir, exist_ok=True)

    features = seeded_backbone()
    torch.save(features, os.path.join(out_dir, "vgg16-seeded.pth"))
    torch.save(features, os.path.join(out_dir, "vgg16-seeded-legacy.pth"), _use_new_zipfile_serialization=False)

    # pretrained=True loads the package's weights/v0.1/vgg.pth heads; pnet_rand=True builds the trunk with
    # `tv.vgg16(pretrained=False)`, so torchvision downloads nothing.
    model = lpips.LPIPS(net="vgg", version="0.1", pretrained=True, pnet_rand=True, verbose=False)
    mapped = {}
    for s, (lo, hi) in enumerate(SLICES):
        for i in range(lo, hi):
            for p in ("weight", "bias"):
                key = f"features.{i}.{p}"
                if key in features:
                    mapped[f"net.slice{s + 1}.{i}.{p}"] = features[key]
    missing, unexpected = model.load_state_dict(mapped, strict=False)
    assert not unexpected, unexpected
    assert all(k.startswith(("lin", "scaling_layer.")) for k in missing), missing
    assert len(mapped) == 26, len(mapped)
    model.eval()
    torch.save(model.state_dict(), os.path.join(out_dir, "lpips-model-state.pth"))

    tensors = {}
    w0 = features["features.0.weight"]
    mixed = collections.OrderedDict()
    mixed["classifier.steps"] = torch.arange(5, dtype=torch.int64)
    mixed.update(features)
    mixed["extra.half"] = torch.tensor([0.5, -2.0, 3.25], dtype=torch.float16)
    mixed["extra.transposed"] = w0.transpose(0, 1)
    mixed["extra.offset"] = w0.view(-1)[10:20]
    torch.save(mixed, os.path.join(out_dir, "mixed-legacy.pth"), _use_new_zipfile_serialization=False)
    torch.save(mixed, os.path.join(out_dir, "mixed-zip.pth"))
    for k, v in mixed.items():
        tensors[f"mixed.{k}"] = v.contiguous().clone()
    heads_path = os.path.join(os.path.dirname(lpips.__file__), "weights", "v0.1", "vgg.pth")
    heads = torch.load(heads_path, map_location="cpu")
    for k in range(5):
        tensors[f"heads.{k}"] = heads[f"lin{k}.model.1.weight"].contiguous()
        assert torch.equal(model.lins[k].model[1].weight, heads[f"lin{k}.model.1.weight"])
    with torch.no_grad():
        for i, (a, b) in enumerate(pairs()):
            d = model(a, b)  # [1, 1, 1, 1]
            tensors[f"in0.{i}"] = a
            tensors[f"in1.{i}"] = b
            tensors[f"out.{i}"] = d.reshape(1).contiguous()
            print(f"pair {i} {tuple(a.shape[2:])}: lpips {d.item():.6f}")
        a6 = torch.cat([tensors[f"in0.{i}"] for i in range(6)])
        b6 = torch.cat([tensors[f"in1.{i}"] for i in range(6)])
        batch = model(a6, b6)
        tensors["out.batch6"] = batch.reshape(6).contiguous()
    save_file(tensors, os.path.join(out_dir, "lpips-reference.safetensors"))


if __name__ == "__main__":
    main()
