"""The built-in example: fine-tuning set-up for a 10-class ResNet-18 from a 1000-class checkpoint.

The checkpoint is written the way a timm-style training script writes one (weights, EMA weights,
epoch, an argparse.Namespace), which ``torch.load(weights_only=True)`` refuses to read.
"""

from __future__ import annotations

import argparse
import logging
import os
import subprocess
import sys
import tempfile

import torch
import torchvision

import smartload


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "resnet18_in1k_ep90.pth.tar")
        pretrained = torchvision.models.resnet18(weights=None)
        torch.save(
            {
                "state_dict": pretrained.state_dict(),
                "state_dict_ema": pretrained.state_dict(),
                "epoch": 90,
                "arch": "resnet18",
                "args": argparse.Namespace(lr=0.1, epochs=90, model="resnet18"),
            },
            path,
        )
        print("$ smartload inspect resnet18_in1k_ep90.pth.tar", flush=True)
        subprocess.run([sys.executable, "-m", "smartload", "inspect", path], check=True)

        print("\n$ smartload.load(resnet18(num_classes=10), checkpoint, num_classes=10)")
        model = torchvision.models.resnet18(weights=None, num_classes=10)
        report = smartload.load(
            model, path, num_classes=10, report_path=os.path.join(tmp, "smartload_report.json")
        )
        print(report)
        same = torch.equal(model.layer4[1].conv2.weight, pretrained.layer4[1].conv2.weight)
        print(
            f"\nbackbone weights equal to the checkpoint's: {same}; head shape: "
            f"{tuple(model.fc.weight.shape)}"
        )


if __name__ == "__main__":
    main()
