"""Stream a ResNet-18 trunk over a large synthetic image; print exactness and memory figures.

    python examples/stream_resnet.py --size 2048 --tile 1024

1. Exactness: float64, streamed vs whole image, on an image that needs several tiles.
2. Memory: one streamed training step (forward + backward) of the float32 trunk on a
   ``size x size`` image, peak process memory measured, next to the predicted whole-image need.
"""

from __future__ import annotations

import argparse
import logging
import resource
import time

import torch
from torch import nn
from torchvision import models

from lightstream import StreamingCNN


def resnet18_trunk() -> nn.Sequential:
    """torchvision ResNet-18 without global pooling and classifier (random weights, frozen BN)."""
    return nn.Sequential(*list(models.resnet18(weights=None).children())[:-2]).eval()


def exactness() -> None:
    trunk = resnet18_trunk().double()
    image = torch.randn(1, 3, 640, 608, dtype=torch.float64)
    scnn = StreamingCNN(trunk, tile_size=528, saliency=True)
    leaf = image.clone().requires_grad_()
    reference = trunk(leaf)
    grad = torch.randn_like(reference)
    reference.backward(grad)
    expected = {n: p.grad.clone() for n, p in trunk.named_parameters()}
    trunk.zero_grad(set_to_none=True)
    fmap = scnn(image)
    scnn.backward(image, grad)

    def rel(a: torch.Tensor, b: torch.Tensor) -> float:
        return ((a - b).norm() / b.norm()).item()

    worst = max(rel(p.grad, expected[n]) for n, p in trunk.named_parameters())
    print(f"exactness (float64, {len(scnn.plan(image.shape))} tiles of 528 px on 640x608):")
    print(f"  feature map       rel. error {rel(fmap, reference.detach()):.1e}")
    print(f"  worst param grad  rel. error {worst:.1e}  ({len(expected)} parameters)")
    print(f"  image gradient    rel. error {rel(scnn.saliency_map, leaf.grad):.1e}")


def memory(size: int, tile: int) -> None:
    trunk = resnet18_trunk()
    scnn = StreamingCNN(trunk, tile_size=tile)
    image = torch.randn(1, 3, size, size)
    plan = scnn.plan(image.shape)
    estimate = scnn.estimate(image.shape)
    start = time.perf_counter()
    fmap = scnn(image).requires_grad_()
    fmap.square().mean().backward()
    scnn.backward(image, fmap.grad)
    elapsed = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print(f"memory (float32, {size}x{size} image, tile {tile}: {len(plan)} tiles, "
          f"recompute factor {plan.recompute_factor:.2f}):")
    print(f"  streamed step     {elapsed:.1f} s, peak RSS {peak:.2f} GiB "
          f"(image itself {image.numel() * 4 / 2**30:.2f} GiB)")
    print(f"  whole image needs ~{estimate.whole_image_bytes / 2**30:.1f} GiB of activations (predicted)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=2048, help="image side in pixels")
    parser.add_argument("--tile", type=int, default=1024, help="tile side in pixels")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.manual_seed(0)
    exactness()
    memory(args.size, args.tile)


if __name__ == "__main__":
    main()
