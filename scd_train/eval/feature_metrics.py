"""LPIPS and FVD, whose feature networks are read from local files only (nothing is downloaded).

LPIPS uses torchmetrics' implementation with a randomly initialised backbone whose weights are
then loaded from the file given: torchvision's state dict for the chosen backbone (for 'alex',
``alexnet-owt-7be5be79.pth``; a file holding only the ``features.*`` entries also works). The
linear calibration layers are the LPIPS v0.1 weights that torchmetrics ships. Frames smaller than
64 pixels are enlarged by pixel repetition first (the backbones need room for their strides).

FVD uses an I3D feature network saved as TorchScript with the StyleGAN-V calling convention
``net(videos, rescale=False, resize=True, return_features=True)`` on (B, 3, T, H, W) videos in
[-1, 1]; the Frechet distance is computed with ``scipy.linalg.sqrtm`` as in the reference
evaluation.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from scd_train.errors import InputError, MissingInput

LPIPS_BACKBONES = {"alex": "alexnet", "vgg": "vgg16", "squeeze": "squeezenet1_1"}
LPIPS_MIN_SIDE = 64


def require_file(path: str | Path, what: str) -> Path:
    path = Path(path)
    if not path.is_file():
        raise MissingInput(f"{what} not found: {path} does not exist or is not a file")
    return path


class LPIPS:
    """Per-frame LPIPS distances for (N, 3, H, W) frames in [0, 1].

    ``official_range=True`` reproduces the reference evaluation's call, which passes [0, 1]
    frames to a network that expects [-1, 1] (no ``normalize``); the default rescales correctly.
    """

    def __init__(self, backbone_path: str | Path, net: str = "alex", official_range: bool = False,
                 device: torch.device | str = "cpu") -> None:
        from torchmetrics.functional.image.lpips import _NoTrainLpips

        if net not in LPIPS_BACKBONES:
            raise InputError(f"LPIPS net={net!r}: expected one of {sorted(LPIPS_BACKBONES)}")
        path = require_file(backbone_path, f"LPIPS backbone weights ({LPIPS_BACKBONES[net]} state dict)")
        self.model = _NoTrainLpips(pretrained=True, net=net, pnet_rand=True)
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # pickle and zip errors of a file that is not a state dict
            raise InputError(f"{path} is not a torchvision state dict ({type(exc).__name__}: "
                             f"{str(exc).splitlines()[0][:200]})") from None
        if not isinstance(state, dict):
            raise InputError(f"{path} holds a {type(state).__name__}, not a torchvision state dict")
        _load_backbone(self.model.net, state, path)
        self.model.to(device)
        self.official_range = official_range
        self.device = torch.device(device)

    @torch.no_grad()
    def __call__(self, prediction: Tensor, target: Tensor, chunk: int = 64) -> Tensor:
        out = []
        for start in range(0, prediction.shape[0], chunk):
            p = _enlarge_small(prediction[start:start + chunk].to(self.device, torch.float32))
            t = _enlarge_small(target[start:start + chunk].to(self.device, torch.float32))
            out.append(self.model(p, t, normalize=not self.official_range).flatten().cpu())
        return torch.cat(out)


def _enlarge_small(frames: Tensor) -> Tensor:
    """Frames under LPIPS_MIN_SIDE pixels repeated by an integer factor: the backbones' strides and
    pooling leave no feature map for very small frames. Larger frames pass unchanged."""
    side = min(frames.shape[-2:])
    if side >= LPIPS_MIN_SIDE:
        return frames
    factor = -(-LPIPS_MIN_SIDE // side)
    return torch.nn.functional.interpolate(frames, scale_factor=factor, mode="nearest")


def _load_backbone(net: torch.nn.Module, state: dict[str, Tensor], path: Path) -> None:
    """torchmetrics splits the torchvision ``features`` stack into slices that keep the original
    indices, so ``sliceK.<i>.weight`` is ``features.<i>.weight`` of the torchvision file."""
    wanted = {}
    for name in net.state_dict():
        _, index, param = name.split(".", 2)
        wanted[name] = f"features.{index}.{param}"
    missing = [src for src in wanted.values() if src not in state]
    if missing:
        raise InputError(f"{path} lacks LPIPS backbone entries {missing[:4]}; expected a torchvision state dict "
                       f"with 'features.*' keys")
    net.load_state_dict({dst: state[src] for dst, src in wanted.items()})


class VideoFeatures:
    """Clip-level features for FVD from a TorchScript I3D-style network."""

    def __init__(self, detector_path: str | Path, device: torch.device | str = "cpu") -> None:
        path = require_file(detector_path, "FVD feature network (TorchScript I3D)")
        with warnings.catch_warnings():
            # the reference I3D is distributed as TorchScript, whatever torch thinks of the format
            warnings.simplefilter("ignore", FutureWarning)
            try:
                self.net = torch.jit.load(str(path), map_location=device).eval()
            except RuntimeError as exc:  # not a TorchScript archive
                raise InputError(f"{path} is not a TorchScript feature network ({str(exc).splitlines()[0][:200]})"
                                 ) from None
        self.device = torch.device(device)

    @torch.no_grad()
    def __call__(self, videos: Tensor) -> Tensor:
        """(B, D) float64 features of (B, T, 3, H, W) videos in [0, 1]."""
        x = (videos.to(self.device, torch.float32) * 2.0 - 1.0).permute(0, 2, 1, 3, 4).contiguous()
        feats = self.net(x, rescale=False, resize=True, return_features=True)
        return feats.double().cpu()


def frechet_distance(features_a: Tensor, features_b: Tensor) -> float:
    """Frechet distance between Gaussians fitted to two (N, D) feature sets."""
    from scipy import linalg

    a, b = features_a.double().numpy(), features_b.double().numpy()
    if a.shape[0] < 2 or b.shape[0] < 2:
        raise ValueError(f"FVD needs at least 2 videos per set, got {a.shape[0]} and {b.shape[0]}")
    mu_a, mu_b = a.mean(axis=0), b.mean(axis=0)
    cov_a, cov_b = np.atleast_2d(np.cov(a, rowvar=False)), np.atleast_2d(np.cov(b, rowvar=False))
    covmean = linalg.sqrtm(cov_a @ cov_b)
    if not np.isfinite(covmean).all():
        # singular products (fewer videos than feature dims) need a small ridge to have a root
        ridge = np.eye(cov_a.shape[0]) * 1e-6
        covmean = linalg.sqrtm((cov_a + ridge) @ (cov_b + ridge))
    covmean = np.real(covmean)
    diff = mu_a - mu_b
    return float(diff @ diff + np.trace(cov_a) + np.trace(cov_b) - 2.0 * np.trace(covmean))
