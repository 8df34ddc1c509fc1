"""The detectron2 adapter and trainer hook on real detectron2 models (model-zoo configs, CPU)."""

from __future__ import annotations

import json
import logging
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

import smartload

d2 = pytest.importorskip("detectron2")
from detectron2 import model_zoo  # noqa: E402
from detectron2.config import get_cfg  # noqa: E402
from detectron2.data import DatasetCatalog, MetadataCatalog  # noqa: E402
from detectron2.engine import DefaultTrainer  # noqa: E402
from detectron2.modeling import build_model  # noqa: E402
from detectron2.structures import BoxMode  # noqa: E402

from smartload.adapters.detectron2 import SmartDetectionCheckpointer, SmartLoadHook  # noqa: E402

FASTER = "COCO-Detection/faster_rcnn_R_50_FPN_1x.yaml"
MASK = "COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_1x.yaml"
RETINA = "COCO-Detection/retinanet_R_50_FPN_1x.yaml"
CASCADE = "Misc/cascade_mask_rcnn_R_50_FPN_1x.yaml"
PANOPTIC = "COCO-PanopticSegmentation/panoptic_fpn_R_50_1x.yaml"
KEYPOINT = "COCO-Keypoints/keypoint_rcnn_R_50_FPN_1x.yaml"
PERSON_CAR_DOG = [0, 2, 16]  # their COCO indices


def make_cfg(config: str, num_classes: int | None = None):  # type: ignore[no-untyped-def]
    cfg = get_cfg()
    cfg.merge_from_file(model_zoo.get_config_file(config))
    cfg.MODEL.DEVICE = "cpu"
    cfg.MODEL.WEIGHTS = ""
    if num_classes is not None:
        cfg.MODEL.ROI_HEADS.NUM_CLASSES = num_classes
        cfg.MODEL.RETINANET.NUM_CLASSES = num_classes
    return cfg


def make_model(config: str, num_classes: int | None = None, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build_model(make_cfg(config, num_classes))


@pytest.fixture(scope="module")
def coco_checkpoints(
    tmp_path_factory: pytest.TempPathFactory,
) -> dict[str, tuple[Path, Path, dict]]:
    """An 80-class checkpoint per architecture: detectron2's .pth and a model-zoo .pkl."""
    folder = tmp_path_factory.mktemp("d2")
    out = {}
    for config in (FASTER, MASK, RETINA, CASCADE, PANOPTIC):
        sd = make_model(config, seed=1).state_dict()
        name = config.split("/")[1].removesuffix(".yaml")
        pth = folder / f"{name}.pth"
        torch.save({"model": sd, "iteration": 90000}, pth)
        pkl = folder / f"{name}.pkl"
        zoo = {"model": {k: v.numpy() for k, v in sd.items()}, "__author__": "Detectron2 Model Zoo",
               "matching_heuristics": True}  # fmt: skip
        pkl.write_bytes(pickle.dumps(zoo, protocol=4))
        out[config] = (pth, pkl, sd)
    return out


HEADS = {
    FASTER: {"roi_heads.box_predictor.cls_score", "roi_heads.box_predictor.bbox_pred"},
    MASK: {"roi_heads.box_predictor.cls_score", "roi_heads.box_predictor.bbox_pred",
           "roi_heads.mask_head.predictor"},
    RETINA: {"head.cls_score"},
    CASCADE: {f"roi_heads.box_predictor.{i}.cls_score" for i in range(3)} | {"roi_heads.mask_head.predictor"},
    PANOPTIC: {"roi_heads.box_predictor.cls_score", "roi_heads.box_predictor.bbox_pred",
               "roi_heads.mask_head.predictor"},
}  # fmt: skip


def expected_rows(head: str, old: int, new_map: list[int]) -> list[int]:
    """Checkpoint rows each new row takes, per detectron2's layouts (background last)."""
    if head.endswith("cls_score") and head.startswith("roi_heads"):
        return [*new_map, old]
    if head.endswith("bbox_pred"):
        return [4 * k + j for k in new_map for j in range(4)]
    if head == "head.cls_score":
        return [a * old + k for a in range(9) for k in new_map]
    return list(new_map)


@pytest.mark.parametrize("kind", ["pth", "pkl"])
@pytest.mark.parametrize("config", [FASTER, MASK, RETINA, CASCADE, PANOPTIC])
def test_coco_into_three_classes(config: str, kind: str, coco_checkpoints: dict) -> None:
    """Without a class map every class head is re-initialised as detectron2 does; with one, each
    head keeps exactly the rows of person, car and dog (and the background row)."""
    pth, pkl, sd = coco_checkpoints[config]
    path = pth if kind == "pth" else pkl
    model = make_model(config, 3)
    report = smartload.load(model, path, num_classes=3)
    assert report.adapter == "detectron2"
    assert {h.name for h in report.heads} == HEADS[config]
    reinit = {e.key.rpartition(".")[0] for e in report.entries if e.action == "reinit-normal"}
    assert reinit == HEADS[config]
    got = model.state_dict()
    for key, value in sd.items():
        if key.rpartition(".")[0] not in HEADS[config]:
            assert torch.equal(got[key], value), key
    for head in HEADS[config]:
        bias = got[f"{head}.bias"]
        if head == "head.cls_score":
            assert torch.allclose(bias, torch.full_like(bias, -float(np.log(99))))
        else:
            assert torch.equal(bias, torch.zeros_like(bias))

    model = make_model(config, 3)
    report = smartload.load(model, path, num_classes=3, class_map=PERSON_CAR_DOG)
    got = model.state_dict()
    for head in HEADS[config]:
        rows = expected_rows(head, 80, PERSON_CAR_DOG)
        for p in ("weight", "bias"):
            assert torch.equal(got[f"{head}.{p}"], sd[f"{head}.{p}"][rows]), (head, p)
    assert {e.action for e in report.entries if e.head in HEADS[config]} == {"slice"}
    if config == PANOPTIC:  # stuff classes are another label space: same count, copied
        entry = next(e for e in report.entries if e.key == "sem_seg_head.predictor.weight")
        assert (entry.action, entry.head) == ("copy", "sem_seg_head.predictor")


def test_keypoint_head_is_dim_1_and_its_own_label_space(tmp_path: Path) -> None:
    """17 → 14 keypoints: score_lowres (ConvTranspose2d, dim 1) is re-initialised; the one-class
    box head is copied even with a class map for the (unchanged) person class."""
    sd = make_model(KEYPOINT, seed=1).state_dict()
    path = tmp_path / "kp.pth"
    torch.save({"model": sd}, path)
    cfg = make_cfg(KEYPOINT)
    cfg.MODEL.ROI_KEYPOINT_HEAD.NUM_KEYPOINTS = 14
    model = build_model(cfg)
    report = smartload.load(model, path, num_classes=1)
    entries = {e.key: e for e in report.entries}
    weight = entries["roi_heads.keypoint_head.score_lowres.weight"]
    assert (weight.action, weight.ckpt_shape, weight.model_shape) == (
        "reinit-normal", (512, 17, 4, 4), (512, 14, 4, 4)
    )  # fmt: skip
    assert (
        weight.reason == "head roi_heads.keypoint_head.score_lowres: 17 → 14 classes, no class map"
    )
    assert entries["roi_heads.box_predictor.cls_score.weight"].action == "copy"


def test_caffe2_blobs_pkl_renamed_and_background_moved(tmp_path: Path) -> None:
    """A Detectron1/Caffe2 file: names converted by detectron2's own rules, the background row of
    cls_score moved from first to last, `_momentum` blobs ignored."""
    ref = make_model(FASTER, seed=1).state_dict()
    stem = "backbone.bottom_up.stem.conv1"
    cls = np.random.default_rng(0).standard_normal((81, 1024)).astype(np.float32)
    blobs = {
        "conv1_w": ref[f"{stem}.weight"].numpy(),
        "res_conv1_bn_s": ref[f"{stem}.norm.weight"].numpy() + 1,
        "res_conv1_bn_b": ref[f"{stem}.norm.bias"].numpy() + 2,
        "conv1_w_momentum": np.zeros((64, 3, 7, 7), np.float32),
        "cls_score_w": cls,
        "cls_score_b": np.arange(81, dtype=np.float32),
    }
    path = tmp_path / "R-50-C2.pkl"
    path.write_bytes(pickle.dumps({"blobs": blobs}, protocol=2))
    model = make_model(FASTER, seed=2)
    report = smartload.load(model, path)
    got = model.state_dict()
    assert torch.equal(got[f"{stem}.weight"], ref[f"{stem}.weight"])
    assert torch.equal(got[f"{stem}.norm.weight"], ref[f"{stem}.norm.weight"] + 1)
    assert torch.equal(
        got["roi_heads.box_predictor.cls_score.weight"],
        torch.from_numpy(np.concatenate([cls[1:], cls[:1]])),
    )
    assert got["roi_heads.box_predictor.cls_score.bias"].tolist() == [*range(1, 81), 0]
    sources = {e.key: e.source for e in report.entries if e.action == "copy"}
    assert sources[f"{stem}.weight"] == "conv1_w"
    assert sources["roi_heads.box_predictor.cls_score.weight"] == "cls_score_w"
    assert "conv1_w_momentum" not in report.unused


def test_registered_dataset_names_as_source_classes(coco_checkpoints: dict) -> None:
    pth, _, sd = coco_checkpoints[FASTER]
    model = make_model(FASTER, 2)
    report = smartload.load(
        model,
        pth,
        num_classes=2,
        source_classes="coco_2017_train",
        target_classes=["dog", "person"],
    )
    assert report.heads[0].class_map == (16, 0)
    got = model.state_dict()["roi_heads.box_predictor.cls_score.weight"]
    assert torch.equal(got, sd["roi_heads.box_predictor.cls_score.weight"][[16, 0, 80]])


# --------------------------------------------------------------------------------------------------
# the trainer hook


def _register_dataset(name: str) -> None:
    if name in DatasetCatalog.list():
        return

    def images() -> list[dict]:
        out = []
        for i in range(4):
            out.append({
                "file_name": "", "image_id": i, "height": 64, "width": 80,
                "annotations": [{"bbox": [10, 10, 40, 40], "bbox_mode": BoxMode.XYXY_ABS,
                                 "category_id": i % 3}],
            })  # fmt: skip
        return out

    DatasetCatalog.register(name, images)
    MetadataCatalog.get(name).set(thing_classes=["person", "car", "dog"])


class _Trainer(DefaultTrainer):  # type: ignore[misc]
    """DefaultTrainer with in-memory images (the dataset dicts name no files)."""

    @classmethod
    def build_train_loader(cls, cfg):  # type: ignore[no-untyped-def]
        from detectron2.data import DatasetMapper, build_detection_train_loader

        class Mapper(DatasetMapper):  # type: ignore[misc]
            def __call__(self, record):  # type: ignore[no-untyped-def]
                from detectron2.data import detection_utils

                record = dict(record)
                image = np.random.default_rng(record["image_id"]).integers(
                    0, 255, (64, 80, 3), dtype=np.uint8
                )
                record["image"] = torch.as_tensor(image.transpose(2, 0, 1).copy())
                instances = detection_utils.annotations_to_instances(
                    record.pop("annotations"), (64, 80)
                )
                record["instances"] = instances
                return record

        return build_detection_train_loader(cfg, mapper=Mapper(cfg, is_train=True))


def _trainer_cfg(tmp_path: Path, weights: Path):  # type: ignore[no-untyped-def]
    _register_dataset("smartload_toy_train")
    cfg = make_cfg(FASTER, 3)
    cfg.DATASETS.TRAIN = ("smartload_toy_train",)
    cfg.DATASETS.TEST = ()
    cfg.MODEL.WEIGHTS = str(weights)
    cfg.SOLVER.MAX_ITER = 1
    cfg.SOLVER.BASE_LR = 0.0
    cfg.SOLVER.IMS_PER_BATCH = 2
    cfg.SOLVER.CHECKPOINT_PERIOD = 1
    cfg.DATALOADER.NUM_WORKERS = 0
    cfg.INPUT.MIN_SIZE_TRAIN = (64,)
    cfg.INPUT.MAX_SIZE_TRAIN = 80
    cfg.OUTPUT_DIR = str(tmp_path / "out")
    return cfg


def test_hook_in_a_real_default_trainer(
    tmp_path: Path, coco_checkpoints: dict, caplog: pytest.LogCaptureFixture
) -> None:
    """One line makes DefaultTrainer load COCO weights through smartload: person/car/dog rows
    kept (names from the dataset metadata, COCO assumed for 80 classes and said so), a report in
    OUTPUT_DIR, exactly one load, no "Skip loading parameter" noise; a resumed run loads nothing."""
    pth, _, sd = coco_checkpoints[FASTER]
    cfg = _trainer_cfg(tmp_path, pth)
    trainer = _Trainer(cfg)
    hook = SmartLoadHook()
    trainer.register_hooks([hook])
    with caplog.at_level(logging.INFO):
        trainer.resume_or_load(resume=False)
        trainer.train()
    report_path = Path(cfg.OUTPUT_DIR) / "smartload_report.json"
    report = json.loads(report_path.read_text())
    assert report["heads"][0]["class_map"] == PERSON_CAR_DOG
    assert report["notes"] == [
        "the checkpoint's 80 classes were assumed to be COCO's (coco_2017_train); "
        "pass source_classes= to say otherwise"
    ]
    assert hook.report is trainer.checkpointer.smartload_report
    got = trainer.model.state_dict()
    key = "roi_heads.box_predictor.cls_score.weight"
    assert torch.equal(got[key], sd[key][[0, 2, 16, 80]])  # BASE_LR=0: one real step, no change
    assert torch.equal(
        got["backbone.bottom_up.res2.0.conv1.weight"], sd["backbone.bottom_up.res2.0.conv1.weight"]
    )
    messages = [r.getMessage() for r in caplog.records]
    assert not any("Skip loading parameter" in m for m in messages)
    assert sum(m.startswith("reused ") for m in messages) == 1  # one load, one summary line

    report_path.unlink()
    resumed = _Trainer(cfg)
    resumed.register_hooks([SmartLoadHook()])
    resumed.resume_or_load(resume=True)
    assert resumed.start_iter == 1
    resumed.train()
    assert not report_path.exists()


def test_checkpointer_for_custom_loops(tmp_path: Path, coco_checkpoints: dict) -> None:
    pth, _, sd = coco_checkpoints[RETINA]
    model = make_model(RETINA, 3)
    checkpointer = SmartDetectionCheckpointer(
        model, str(tmp_path), load_keywords={"num_classes": 3, "class_map": PERSON_CAR_DOG}
    )
    checkpointer.load(str(pth))
    assert (tmp_path / "smartload_report.json").exists()
    rows = expected_rows("head.cls_score", 80, PERSON_CAR_DOG)
    assert torch.equal(model.head.cls_score.weight.detach(), sd["head.cls_score.weight"][rows])


def test_two_iterations_train_with_finite_losses(tmp_path: Path, coco_checkpoints: dict) -> None:
    pth, _, _ = coco_checkpoints[FASTER]
    cfg = _trainer_cfg(tmp_path, pth)
    cfg.SOLVER.MAX_ITER = 2
    cfg.SOLVER.BASE_LR = 0.001
    trainer = _Trainer(cfg)
    trainer.register_hooks([SmartLoadHook()])
    trainer.train()  # no resume_or_load: the hook loads before the first step
    losses = [v for v, _ in trainer.storage.history("total_loss").values()]
    assert len(losses) == 2 and all(np.isfinite(losses))
    assert (Path(cfg.OUTPUT_DIR) / "smartload_report.json").exists()


def test_hostile_pkl_refused_by_load_and_hook_while_detectron2_runs_it(
    tmp_path: Path, sentinel: Path, touch: str
) -> None:
    """The model-zoo .pkl path: detectron2's checkpointer unpickles it and runs the payload;
    smartload refuses it through the function and the hook, and nothing runs."""
    from conftest import Payload
    from detectron2.checkpoint import DetectionCheckpointer

    path = tmp_path / "model_final.pkl"
    path.write_bytes(pickle.dumps({"model": {}, "__author__": Payload(touch)}, protocol=2))
    model = make_model(FASTER, 3)
    with pytest.raises(smartload.UnsafeCheckpointError) as caught:
        smartload.load(model, path, num_classes=3)
    assert caught.value.globals == ["posix.system"]
    cfg = _trainer_cfg(tmp_path, path)
    trainer = _Trainer(cfg)
    with pytest.raises(smartload.UnsafeCheckpointError):
        trainer.register_hooks([SmartLoadHook()])
    for hook in trainer._hooks:  # the run never starts: close the writers DefaultTrainer opened
        for writer in getattr(hook, "_writers", ()):
            writer.close()
    assert not sentinel.exists()

    witness = tmp_path / "detectron2_ran_it"
    path.write_bytes(
        pickle.dumps({"model": {}, "__author__": Payload(f"touch {witness}")}, protocol=2)
    )
    DetectionCheckpointer(model).load(str(path))
    assert witness.exists()  # what smartload exists to prevent


# --------------------------------------------------------------------------------------------------
# semantic segmentation and models without a class head

SEMANTIC = "Misc/semantic_R_50_FPN_1x.yaml"
RPN = "COCO-Detection/rpn_R_50_FPN_1x.yaml"
SEM_SEG = "sem_seg_head.predictor"
COCO_STUFF = "coco_2017_train_panoptic_stuffonly"  # "things" at 0, then 53 stuff classes


def make_semantic(num_classes: int | None = None, seed: int = 0) -> torch.nn.Module:
    cfg = make_cfg(SEMANTIC)
    if num_classes is not None:
        cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES = num_classes
    torch.manual_seed(seed)
    return build_model(cfg)


@pytest.fixture(scope="module")
def semantic_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    """A 54-class SemanticSegmentor checkpoint (COCO's stuff-only label set)."""
    sd = make_semantic(seed=1).state_dict()
    path = tmp_path_factory.mktemp("semantic") / "semantic.pth"
    torch.save({"model": sd}, path)
    return path, sd


def test_semantic_segmentor_head_follows_the_class_map(semantic_checkpoint: tuple) -> None:
    """A SemanticSegmentor's predictor is its class head (K rows; the ignore value is no row):
    the class map picks exactly its rows, by index or by stuff_classes name."""
    path, sd = semantic_checkpoint
    model = make_semantic(3)
    report = smartload.load(model, path, num_classes=3, class_map=PERSON_CAR_DOG)
    assert [(h.name, h.old_classes, h.new_classes, h.class_map) for h in report.heads] == [
        (SEM_SEG, 54, 3, (0, 2, 16))
    ]
    entry = next(e for e in report.entries if e.key == f"{SEM_SEG}.weight")
    assert (entry.action, entry.reason) == (
        "slice",
        f"head {SEM_SEG}: 54 → 3 classes, 3 of 3 rows kept by class map",
    )
    got = model.state_dict()
    for p in ("weight", "bias"):
        assert torch.equal(got[f"{SEM_SEG}.{p}"], sd[f"{SEM_SEG}.{p}"][PERSON_CAR_DOG]), p
    for key, value in sd.items():
        if not key.startswith(SEM_SEG):
            assert torch.equal(got[key], value), key

    model = make_semantic(3)
    report = smartload.load(
        model,
        path,
        num_classes=3,
        source_classes=COCO_STUFF,
        target_classes=["things", "sky", "grass"],
    )
    assert report.heads[0].class_map == (0, 40, 46)
    got = model.state_dict()
    assert torch.equal(got[f"{SEM_SEG}.weight"], sd[f"{SEM_SEG}.weight"][[0, 40, 46]])


def test_panoptic_stuff_head_is_its_own_label_space_with_things_first(
    coco_checkpoints: dict,
) -> None:
    """PanopticFPN: the class map is about thing classes; the stuff head counts its stuff classes
    after row 0 ("things", kept): re-initialised when they change, by position under a policy."""
    pth, _, sd = coco_checkpoints[PANOPTIC]
    cfg = make_cfg(PANOPTIC, 3)
    cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES = 5
    report = smartload.load(build_model(cfg), pth, num_classes=3, class_map=PERSON_CAR_DOG)
    entry = next(e for e in report.entries if e.key == f"{SEM_SEG}.weight")
    assert (entry.action, entry.reason) == (
        "reinit-normal",
        f"head {SEM_SEG}: 53 → 4 classes, no class map",
    )
    model = build_model(cfg)
    policy = {f"{SEM_SEG}.*": "slice"}
    report = smartload.load(model, pth, num_classes=3, class_map=PERSON_CAR_DOG, policies=policy)
    entry = next(e for e in report.entries if e.key == f"{SEM_SEG}.weight")
    assert entry.reason.startswith(f"head {SEM_SEG}: 53 → 4 classes, 5 of 5 rows kept")
    assert torch.equal(model.state_dict()[f"{SEM_SEG}.weight"], sd[f"{SEM_SEG}.weight"][:5])


def test_rpn_only_model_says_the_class_map_went_unused() -> None:
    """A ProposalNetwork has no class head: everything is copied and the report says that the
    class map was not used."""
    sd = make_model(RPN, seed=1).state_dict()
    model = make_model(RPN)
    report = smartload.load(model, sd, class_map=PERSON_CAR_DOG)
    assert report.heads == ()
    assert {e.action for e in report.entries} == {"copy"}
    assert (
        "class_map not used: no class head of this model was found by the detectron2 adapter"
        in (report.notes)
    )


def test_hook_keywords_for_semantic_and_rpn_models(semantic_checkpoint: tuple) -> None:
    """The hook gives a SemanticSegmentor its sem-seg class count and stuff_classes names (a
    54-class checkpoint assumed COCO's stuff-only set, and said so); an RPN neither."""
    from smartload.adapters.detectron2 import _load_keywords

    path, sd = semantic_checkpoint
    name = "smartload_toy_stuff_train"
    if name not in DatasetCatalog.list():
        DatasetCatalog.register(name, list)
        MetadataCatalog.get(name).set(stuff_classes=["things", "sky", "grass"])
    cfg = make_cfg(SEMANTIC)
    cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES = 3
    cfg.DATASETS.TRAIN = (name,)
    cfg.MODEL.WEIGHTS = str(path)
    model = build_model(cfg)
    keywords = _load_keywords(cfg, model, {})
    adapter = keywords.pop("adapter")
    assert keywords == {
        "num_classes": 3,
        "target_classes": ["things", "sky", "grass"],
        "source_classes": list(MetadataCatalog.get(COCO_STUFF).stuff_classes),
    }
    assert adapter.notes == (
        f"the checkpoint's 54 classes were assumed to be COCO's ({COCO_STUFF}); "
        "pass source_classes= to say otherwise",
    )
    report = smartload.load(model, path, adapter=adapter, **keywords)
    assert report.heads[0].class_map == (0, 40, 46)

    rpn_cfg = make_cfg(RPN)
    rpn_cfg.DATASETS.TRAIN = (name,)
    assert list(_load_keywords(rpn_cfg, build_model(rpn_cfg), {})) == ["adapter"]


# --------------------------------------------------------------------------------------------------
# detectron2's renaming runs on keys from the file: checked, bounded, and its failures typed

WITHOUT_RENAMING = (
    "adapter=GenericAdapter() (from smartload.adapters) to load it without detectron2's renaming"
)
NOT_PUBLISHED = (
    "Nothing was loaded. The file is not a Detectron1 checkpoint as published: get the weights "
    f"from detectron2's model zoo, or pass {WITHOUT_RENAMING}"
)


def _c2_file(path: Path, blobs: dict[str, np.ndarray]) -> Path:
    path.write_bytes(pickle.dumps({"blobs": blobs}, protocol=2))
    return path


@pytest.fixture(scope="module")
def faster() -> torch.nn.Module:
    """One Faster R-CNN for the refusals below (a refusal leaves it as it was)."""
    return make_model(FASTER, seed=5)


@pytest.mark.parametrize(
    ("blobs", "problem"),
    [
        (
            {"conv1_w": np.ones((64, 3, 7, 7), np.float32), "conv1.w": np.ones(3, np.float32)},
            "tensors 'conv1.w' and 'conv1_w' both become 'stem.conv1.weight' in detectron2's "
            "Caffe2 name conversion",
        ),
        (
            {"cls_score_w": np.array(1.0, np.float32), "cls_score_b": np.ones(81, np.float32)},
            "tensor 'cls_score_w' is 0-d, but detectron2 converts it as a class head (rows per "
            "class)",
        ),
        (
            {"fpn_inner_resX_sum_lateral_w": np.ones(3, np.float32)},
            "detectron2's Caffe2 name conversion fails on tensor 'fpn_inner_resX_sum_lateral_w' "
            "(ValueError: invalid literal for int() with base 10: 'X')",
        ),
    ],
    ids=["duplicate renames", "0-d cls_score_w", "unparsable FPN stage"],
)
def test_caffe2_names_detectron2_fails_on_are_a_format_error(
    tmp_path: Path, faster: torch.nn.Module, blobs: dict[str, np.ndarray], problem: str
) -> None:
    """What detectron2's conversion would raise AssertionError/IndexError/ValueError on is a
    CheckpointFormatError naming the file and the key; the model is unchanged."""
    from conftest import assert_unchanged, snapshot

    path = _c2_file(tmp_path / "c2.pkl", blobs)
    before = snapshot(faster)
    with pytest.raises(smartload.CheckpointFormatError) as caught:
        smartload.load(faster, path)
    assert str(caught.value) == f"{path}: {problem}. {NOT_PUBLISHED}"
    assert_unchanged(faster, before)


def test_a_shape_torch_cannot_hold_is_refused_before_detectron2_sees_it(
    faster: torch.nn.Module,
) -> None:
    """numpy allows an empty (2**63 - 1, 0) array; torch cannot make its rows: typed refusal."""
    from smartload._records import ArrayRecord
    from smartload.adapters.detectron2 import Detectron2Adapter

    huge = ArrayRecord("float32", "<f4", (2**63 - 1, 0), False, b"", 0)
    with pytest.raises(smartload.CheckpointFormatError) as caught:
        Detectron2Adapter().prepare_checkpoint(faster, {"cls_score_w": huge}, {})
    assert str(caught.value) == (
        ": tensor 'cls_score_w' has shape [9223372036854775807, 0], which torch cannot hold. "
        + NOT_PUBLISHED
    )


def test_a_name_that_is_not_a_string_is_refused_before_detectron2_sees_it(
    faster: torch.nn.Module,
) -> None:
    from smartload._records import ArrayRecord
    from smartload.adapters.detectron2 import Detectron2Adapter

    one = ArrayRecord("float32", "<f4", (1,), False, b"\0" * 4, 4)
    with pytest.raises(smartload.CheckpointFormatError) as caught:
        Detectron2Adapter().prepare_checkpoint(faster, {"conv1_w": one, 7: one}, {})
    assert str(caught.value) == f": a tensor's name is a int (7), not a string. {NOT_PUBLISHED}"


def test_a_key_matching_several_model_keys_is_a_format_error(
    tmp_path: Path, faster: torch.nn.Module
) -> None:
    """detectron2's matcher refuses a key that is the suffix of many model keys: typed, named."""
    path = tmp_path / "ambiguous.pkl"
    zoo = {"model": {"weight": np.ones(3, np.float32)}, "__author__": "x",
           "matching_heuristics": True}  # fmt: skip
    path.write_bytes(pickle.dumps(zoo, protocol=2))
    with pytest.raises(smartload.CheckpointFormatError) as caught:
        smartload.load(faster, path)
    assert str(caught.value) == (
        f"{path}: detectron2's name matching refused the checkpoint (Ambiguity found for weight "
        "in checkpoint!It matches at least two keys in the model "
        "(backbone.bottom_up.res2.0.conv1.weight and backbone.bottom_up.res2.0.conv1.norm.weight)"
        "). Nothing was loaded. Pass rename={pattern: replacement} to give the keys the model's "
        f"names, or {WITHOUT_RENAMING}"
    )


def test_suffix_keys_still_match_by_detectron2s_heuristics(
    tmp_path: Path, coco_checkpoints: dict[str, tuple[Path, Path, dict[str, torch.Tensor]]]
) -> None:
    """Keys that are a dotted suffix of the model's (an ImageNet backbone: `res2.0.conv1.weight`)
    go to detectron2's matcher and land where it puts them; the others are left as they are."""
    _, _, sd = coco_checkpoints[FASTER]
    prefix = "backbone.bottom_up."
    backbone = {k.removeprefix(prefix): v.numpy() for k, v in sd.items() if k.startswith(prefix)}
    zoo = {"model": {**backbone, "not.in.model": np.ones(2, np.float32)}, "__author__": "x",
           "matching_heuristics": True}  # fmt: skip
    path = tmp_path / "R-50.pkl"
    path.write_bytes(pickle.dumps(zoo, protocol=2))
    model = make_model(FASTER, seed=2)
    report = smartload.load(model, path)
    copied = {e.key: e.source for e in report.entries if e.action == "copy"}
    assert copied == {prefix + k: k for k in backbone}
    assert report.unused == ("not.in.model",)
    got = model.state_dict()
    assert all(torch.equal(got[prefix + k], sd[prefix + k]) for k in backbone)


def test_too_many_or_too_long_keys_are_refused_before_detectron2_sees_them(
    tmp_path: Path, faster: torch.nn.Module
) -> None:
    """Its cost grows with the keys: beyond 10,000 keys or 256 characters, a typed refusal."""
    from smartload.adapters.detectron2 import MAX_KEY_LENGTH, MAX_KEYS

    one = np.ones(1, np.float32)
    path = _c2_file(tmp_path / "many.pkl", {f"k{i}_w": one for i in range(MAX_KEYS + 1)})
    hint = (
        "Nothing was loaded. Published detectron2 and Detectron1 files are far from this; pass "
        f"{WITHOUT_RENAMING}, and rename={{pattern: replacement}} for its names"
    )
    with pytest.raises(smartload.CheckpointFormatError) as caught:
        smartload.load(faster, path)
    assert str(caught.value) == (
        f"{path}: 10001 tensors, more than the 10000 detectron2's name conversion is run on. "
        + hint
    )
    long_key = "res2_" + "x" * MAX_KEY_LENGTH
    path = _c2_file(tmp_path / "long.pkl", {long_key: one})
    with pytest.raises(smartload.CheckpointFormatError) as caught:
        smartload.load(faster, path)
    assert str(caught.value) == (
        f"{path}: tensor name {long_key[:60]!r}... is 261 characters long, more than the 256 "
        f"detectron2's name conversion is run on. {hint}"
    )


def test_keys_at_the_bounds_are_renamed_quickly(tmp_path: Path, faster: torch.nn.Module) -> None:
    """10,000 keys of 250 characters: well under a second of renaming (70,000 took 20 s before
    the matcher was given only the keys that can match)."""
    import time

    one = np.ones(1, np.float32)
    blobs = {f"{i:05d}_" + "res_branch2a_bn_s_" * 13 + "w": one for i in range(10_000)}
    path = _c2_file(tmp_path / "bounds.pkl", blobs)
    start = time.perf_counter()
    report = smartload.load(faster, path)
    assert time.perf_counter() - start < 5
    assert len(report.unused) == 10_000


def test_caffe2_heads_sharing_one_array_share_its_conversion(tmp_path: Path) -> None:
    """2,000 class heads naming one array: its background row is moved once, for all of them,
    and tensors no conversion changes stay unread records."""
    from smartload._plan import open_checkpoint
    from smartload._records import ArrayRecord
    from smartload.adapters.detectron2 import Detectron2Adapter

    rows = np.arange(81 * 4, dtype=np.float32).reshape(81, 4)
    blobs = {f"cls_score_{i}_w": rows for i in range(2000)} | {"conv1_w": rows, "res2_w": rows}
    ckpt = open_checkpoint(_c2_file(tmp_path / "shared.pkl", blobs))
    model = make_model(FASTER)
    prepared = Detectron2Adapter().prepare_checkpoint(model, ckpt.tensors, ckpt.extras)
    assert prepared is not None
    tensors, originals = prepared
    heads = {id(tensors[f"cls_score.{i}.weight"]) for i in range(2000)}
    assert len(heads) == 1
    assert torch.equal(tensors["cls_score.0.weight"], torch.from_numpy(np.roll(rows, -1, 0)))
    by_original = {originals[k]: v for k, v in tensors.items()}
    assert by_original["conv1_w"] is by_original["res2_w"] is ckpt.tensors["conv1_w"]
    assert isinstance(by_original["res2_w"], ArrayRecord)
    assert originals["cls_score.7.weight"] == "cls_score_7_w"


SHARED_RSS = """
import pickle, resource, sys, numpy as np, torch, smartload
from detectron2 import model_zoo
from detectron2.config import get_cfg
from detectron2.modeling import build_model
cfg = get_cfg()
cfg.merge_from_file(model_zoo.get_config_file(sys.argv[2]))
cfg.MODEL.DEVICE = "cpu"
model = build_model(cfg)
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
report = smartload.load(model, sys.argv[1])
grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
print(len(report.unused), grown // 1024)
"""


def test_caffe2_file_sharing_one_array_costs_what_it_stores(tmp_path: Path) -> None:
    """2,000 heads over one 1 MB array (2 GB if converted per key, as before): < 200 MB."""
    import subprocess
    import sys

    big = np.zeros((256, 1024), np.float32)
    path = _c2_file(tmp_path / "shared.pkl", {f"cls_score_{i}_w": big for i in range(2000)})
    done = subprocess.run(
        [sys.executable, "-W", "ignore", "-c", SHARED_RSS, str(path), FASTER],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    unused, grown_mb = map(int, done.stdout.split())
    assert unused == 2000
    assert grown_mb < 200
