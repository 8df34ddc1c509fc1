"""The README's table of class-count heads, measured: for each framework and model family, a real
model built from the package's own config at two class counts, the first one's weights planned
into the second with and without a class map, and the actions the plan takes on the heads.

    .venv/bin/python scripts/head_table.py          # print the table (about a minute)
    .venv/bin/python scripts/head_table.py --check  # exit 1 when README.md's table differs
"""

from __future__ import annotations

import logging
import os
import sys
import tempfile
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

os.environ.setdefault("YOLO_CONFIG_DIR", tempfile.mkdtemp(prefix="smartload-yolo-"))
os.environ.setdefault("YOLOV5_CONFIG_DIR", tempfile.mkdtemp(prefix="smartload-yolov5-"))
warnings.filterwarnings("ignore")

import torch  # noqa: E402

import smartload  # noqa: E402

README = Path(__file__).resolve().parent.parent / "README.md"
BEGIN, END = "<!-- head-table: scripts/head_table.py -->", "<!-- /head-table -->"


@dataclass(frozen=True)
class Case:
    framework: str
    family: str
    heads: str  # the class-count heads and their rows, said for people
    new_rows: str  # how new rows start
    build: Callable[[int], torch.nn.Module]  # class count → model
    classes: tuple[int, int] = (10, 3)  # checkpoint's, model's (as the framework counts them)
    class_map: tuple[int | None, ...] = (4, None, 0)


def timm_model(name: str) -> Callable[[int], torch.nn.Module]:
    def build(k: int) -> torch.nn.Module:
        import timm

        model: torch.nn.Module = timm.create_model(name, num_classes=k)
        return model

    return build


def d2(config: str) -> Callable[[int], torch.nn.Module]:
    def build(k: int) -> torch.nn.Module:
        from detectron2.config import get_cfg
        from detectron2.model_zoo import get_config_file
        from detectron2.modeling import build_model

        cfg = get_cfg()
        cfg.merge_from_file(get_config_file(config))
        cfg.MODEL.DEVICE = "cpu"
        cfg.MODEL.ROI_HEADS.NUM_CLASSES = cfg.MODEL.RETINANET.NUM_CLASSES = k
        model: torch.nn.Module = build_model(cfg)
        return model

    return build


def tv(name: str) -> Callable[[int], torch.nn.Module]:
    def build(k: int) -> torch.nn.Module:
        import torchvision

        model: torch.nn.Module = torchvision.models.get_model(
            name, weights=None, weights_backbone=None, num_classes=k
        )
        return model

    return build


def yolo(config: str) -> Callable[[int], torch.nn.Module]:
    def build(k: int) -> torch.nn.Module:
        from ultralytics.nn import tasks

        logging.getLogger("ultralytics").setLevel(logging.ERROR)
        made = {
            "detect": tasks.DetectionModel, "segment": tasks.SegmentationModel,
            "pose": tasks.PoseModel, "obb": tasks.OBBModel, "classify": tasks.ClassificationModel,
        }[tasks.guess_model_task(config)]  # fmt: skip
        if "rtdetr" in config:
            made = tasks.RTDETRDetectionModel
        model: torch.nn.Module = made(config, nc=k, verbose=False)
        return model

    return build


def yolov5(config: str) -> Callable[[int], torch.nn.Module]:
    def build(k: int) -> torch.nn.Module:
        from smartload.adapters.yolov5 import build_model

        return build_model(config, k)

    return build


def hf(config: str, cls: str, **tiny: Any) -> Callable[[int], torch.nn.Module]:
    """A transformers model of ``cls`` from ``config`` with a small ``tiny`` configuration."""

    def build(k: int) -> torch.nn.Module:
        import transformers

        made = getattr(transformers, config)(num_labels=k, **tiny)
        return getattr(transformers, cls)(made)

    return build


_HF_VIT = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
               image_size=32, patch_size=8)  # fmt: skip
_HF_TEXT = dict(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                intermediate_size=64, max_position_embeddings=32)  # fmt: skip
_HF_DETR = dict(use_timm_backbone=False, use_pretrained_backbone=False, d_model=32,
                encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
                decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32, num_queries=5,
                backbone_config={"model_type": "resnet", "embedding_size": 8,
                                 "hidden_sizes": [8, 8, 8, 8], "depths": [1, 1, 1, 1],
                                 "out_features": ["stage4"]})  # fmt: skip

CASES = [
    Case("timm", "classifiers (ResNet, ConvNeXt, ViT, ...)", "`pretrained_cfg['classifier']`: K",
         "the head's init std, bias 0", timm_model("resnet18")),
    Case("timm", "distilled (DeiT, LeViT)", "`head`, `head_dist`: K each",
         "the head's init std, bias 0", timm_model("deit_tiny_distilled_patch16_224")),
    Case("detectron2", "Faster / Mask R-CNN", "`cls_score` K+1 (background last, kept); "
         "`bbox_pred` 4K; mask `predictor` K", "std 0.01 / 0.001 / 0.001, bias 0",
         d2("COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_1x.yaml")),
    Case("detectron2", "RetinaNet", "`head.cls_score` A·K, anchor-major",
         "std 0.01, bias at the focal prior", d2("COCO-Detection/retinanet_R_50_FPN_1x.yaml")),
    Case("torchvision", "Faster / Mask R-CNN", "`cls_score` K+1 (background first, kept); "
         "`bbox_pred` 4(K+1); `mask_fcn_logits` K+1", "std 0.01 / 0.001 / 0.001, bias 0",
         tv("maskrcnn_resnet50_fpn"), (11, 4)),
    Case("torchvision", "RetinaNet, FCOS", "`cls_logits` A·(K+1) / K+1, background kept",
         "std 0.01, bias at the focal prior", tv("fcos_resnet50_fpn"), (11, 4)),
    Case("torchvision", "SSD300, SSDlite", "per level `module_list.{i}`: A·(K+1)",
         "the layer's init spread, bias 0", tv("ssdlite320_mobilenet_v3_large"), (11, 4)),
    Case("ultralytics", "YOLOv5u/8/11/12/26 Detect, Segment, Pose, OBB",
         "last conv of each `cv3` (and `one2one_cv3`) branch: K",
         "`Detect.bias_init`: `log(5 / K / (640 / stride)²)`", yolo("yolo12n-pose.yaml")),
    Case("ultralytics", "Classify", "`linear`: K", "default Linear spread, bias 0",
         yolo("yolo11n-cls.yaml")),
    Case("ultralytics", "RT-DETR", "`enc_score_head`, `dec_score_head.{i}`, "
         "`denoising_class_embed`: K (no background)",
         "focal prior `bias_init_with_prob(0.01) / 80 · K`; embedding N(0, 1)",
         yolo("rtdetr-l.yaml")),
    Case("yolov5", "Detect, Segment (anchor heads)",
         "`model.24.m.{i}`: 3 × (5 + K [+ 32]), box, objectness and mask rows kept",
         "`_initialize_biases`: `log(0.6 / (K − 0.99999))`", yolov5("yolov5n.yaml")),
    Case("yolov5", "Classify", "`model.9.linear`: K", "default Linear spread, bias 0",
         yolov5("yolov5n-cls.yaml")),
    Case("transformers", "image classification (ViT, DeiT, Swin, ConvNeXt, ...)",
         "`classifier` (DeiT: `cls_classifier`, `distillation_classifier`): K",
         "`_init_weights`: N(0, `initializer_range`), bias 0",
         hf("ViTConfig", "ViTForImageClassification", **_HF_VIT)),
    Case("transformers", "DETR, YOLOS, Mask2Former", "`class_labels_classifier` (Mask2Former: "
         "`class_predictor`) K+1 "
         "(no object last, kept)", "`_init_weights`: N(0, `init_std`), bias 0",
         hf("DetrConfig", "DetrForObjectDetection", **_HF_DETR)),
    Case("transformers", "text sequence / token classification", "`classifier` or `score`: K",
         "`_init_weights`: N(0, `initializer_range`), bias 0",
         hf("BertConfig", "BertForSequenceClassification", **_HF_TEXT)),
]  # fmt: skip


def measure(case: Case) -> tuple[str, str]:
    """What the plan does to the heads with a class map, and without one."""
    old, new = case.classes
    torch.manual_seed(0)
    checkpoint = case.build(old).state_dict()
    model = case.build(new)
    keyword = {"num_classes": new}
    mapped = smartload.diff(model, checkpoint, class_map=list(case.class_map), **keyword)
    plain = smartload.diff(model, checkpoint, **keyword)
    return _actions(mapped), _actions(plain)


def _actions(plan: Any) -> str:
    heads = [e for e in plan.entries if e.head is not None or e.action != "copy"]
    if not heads:
        return "not supported"
    names = {
        "slice": "slice by class map",
        "reinit-normal": "re-initialise",
        "skip": "keep initialised",
        "copy": "copy",
    }
    seen = sorted({e.action for e in heads}, key=list(names).index)
    if "slice" in seen and not any(h.class_map for h in plan.heads):
        fresh = any(e.rows and None in e.rows for e in heads if e.action == "slice")
        seen[seen.index("slice")] = (
            "re-initialise the class rows, keep the rest" if fresh else "copy"
        )
    return " + ".join(names.get(a, a) for a in seen)


def table() -> str:
    lines = [
        "| framework | family | class-count heads (rows) | with a class map | without one "
        "| new rows start as |",
        "|---|---|---|---|---|---|",
    ]
    for case in CASES:
        mapped, plain = measure(case)
        lines.append(
            f"| {case.framework} | {case.family} | {case.heads} | {mapped} | {plain} "
            f"| {case.new_rows} |"
        )
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    made = table()
    if "--check" not in argv:
        print(made)
        return 0
    text = README.read_text(encoding="utf-8")
    begin, end = text.find(BEGIN), text.find(END)
    if begin < 0 or end < 0:
        print(f"README.md has no {BEGIN} ... {END} block", file=sys.stderr)
        return 1
    shown = text[begin + len(BEGIN) : end].strip()
    if shown != made:
        print("README.md's head table differs from the measured one:\n" + made, file=sys.stderr)
        return 1
    print("README.md's head table matches")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
