#!/usr/bin/env python3
"""The one-stage model of `memory_bench --stage-blocks N`, built with RevLib
(https://github.com/HomebrewML/revlib), for benchmarks/peers/stage_vs_revlib.sh.

Same layers as torchrev's: a 3x3 stem convolution (3 -> 32 channels, no bias),
one reversible stage of N pre-activation basic blocks on 16 + 16 channels
(F and G each BN-ReLU-conv3x3-BN-ReLU-conv3x3), a BN-ReLU-average-pool head and
a linear classifier; channels-last tensors unless --channels-last 0; SGD with momentum, as memory_bench
trains. Prints one line per timed step.
"""
import argparse
import time

import revlib
import torch
from torch import nn


def residual(channels):
    def conv():
        return nn.Conv2d(channels, channels, 3, padding=1, bias=False)

    return nn.Sequential(
        nn.BatchNorm2d(channels), nn.ReLU(), conv(),
        nn.BatchNorm2d(channels), nn.ReLU(), conv())


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--blocks", type=int, default=18)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=3,
                        help="timed steps after one warm-up step "
                             "(0: build the model and exit)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--channels-last", type=int, default=1,
                        help="NHWC tensors (1) or NCHW (0), as memory_bench")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    # RevLib takes one module per half-block: F, G, F, G, ...
    halves = [residual(16) for _ in range(2 * args.blocks)]
    model = nn.Sequential(
        nn.Conv2d(3, 32, 3, padding=1, bias=False),
        revlib.ReversibleSequential(*halves, split_dim=1),
        nn.BatchNorm2d(32), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        nn.Linear(32, 10))
    memory_format = (torch.channels_last if args.channels_last
                     else torch.contiguous_format)
    model = model.to(memory_format=memory_format)
    if args.steps == 0:
        return
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9,
                                weight_decay=2e-4)
    images = torch.randn(args.batch, 3, 32, 32).contiguous(
        memory_format=memory_format)
    labels = torch.randint(10, (args.batch,))

    def step():
        loss = nn.functional.cross_entropy(model(images), labels)
        loss.backward()
        optimizer.step()

    step()  # warm-up: gradients and momentum buffers now exist
    for _ in range(args.steps):
        for p in model.parameters():
            p.grad.zero_()
        start = time.perf_counter()
        step()
        print(f"step_seconds {time.perf_counter() - start:.4f}")


if __name__ == "__main__":
    main()
