"""The transformers adapter on tiny models built from local configs (nothing is downloaded):
transformers' own key mapping, every head family, class names from both configs."""

from __future__ import annotations

import math
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import transformers as T
from conftest import assert_same_tensors, snapshot
from safetensors.torch import load_file

import smartload
from smartload.adapters.transformers import TransformersAdapter
from smartload.cli import main

NAMES = ["cat", "dog", "car", "bus", "tree", "sky", "road", "person", "bike", "boat"]
THREE = ["dog", "unicorn", "boat"]  # checkpoint classes 1 and 9, and a new one
VIT = dict(
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=2,
    intermediate_size=64,
    image_size=32,
    patch_size=8,
)
TEXT = dict(
    vocab_size=64,
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=2,
    intermediate_size=64,
    max_position_embeddings=32,
)
DETR = dict(
    use_timm_backbone=False,
    use_pretrained_backbone=False,
    d_model=32,
    encoder_layers=1,
    decoder_layers=2,
    encoder_attention_heads=2,
    decoder_attention_heads=2,
    encoder_ffn_dim=32,
    decoder_ffn_dim=32,
    num_queries=5,
)
RT_DETR = dict(
    encoder_hidden_dim=32,
    encoder_in_channels=[16, 32, 32],
    d_model=32,
    encoder_layers=1,
    decoder_layers=2,
    encoder_ffn_dim=32,
    decoder_ffn_dim=32,
    num_queries=5,
    num_denoising=4,
    encoder_attention_heads=2,
    decoder_attention_heads=2,
    decoder_in_channels=[32, 32, 32],
)


def labels(names: list[str]) -> dict[str, Any]:
    return {"id2label": dict(enumerate(names)), "label2id": {n: i for i, n in enumerate(names)}}


def resnet() -> T.ResNetConfig:
    """A two-stage ResNet backbone (the DETR family's), built here: nothing downloaded."""
    return T.ResNetConfig(
        embedding_size=16,
        hidden_sizes=[16, 32],
        depths=[1, 1],
        layer_type="basic",
        out_features=["stage1", "stage2"],
    )


def swin() -> T.SwinConfig:
    return T.SwinConfig(
        image_size=32,
        patch_size=4,
        embed_dim=16,
        depths=[1, 1, 1, 1],
        num_heads=[1, 1, 2, 2],
        window_size=2,
        out_features=["stage1", "stage2", "stage3", "stage4"],
    )


def hgnet() -> T.HGNetV2Config:
    return T.HGNetV2Config(
        stem_channels=[3, 8, 8],
        stage_in_channels=[8, 16, 32],
        stage_mid_channels=[8, 16, 16],
        stage_out_channels=[16, 32, 32],
        stage_num_blocks=[1, 1, 1],
        stage_downsample=[False, True, True],
        stage_light_block=[False, False, True],
        stage_kernel_size=[3, 3, 5],
        stage_numb_of_layers=[1, 1, 1],
        out_features=["stage1", "stage2", "stage3"],
        hidden_sizes=[16, 32, 32],
        embedding_size=8,
        depths=[1, 1, 1],
    )


def rt_backbone() -> T.RTDetrResNetConfig:
    return T.RTDetrResNetConfig(
        embedding_size=16,
        hidden_sizes=[16, 32, 32],
        depths=[1, 1, 1],
        layer_type="basic",
        out_features=["stage1", "stage2", "stage3"],
    )


Build = Callable[[dict[str, Any]], torch.nn.Module]

# family → (builder given the label keywords, its heads: name → extra rows ("no object" last))
FAMILIES: dict[str, tuple[Build, dict[str, int]]] = {
    "vit": (lambda L: T.ViTForImageClassification(T.ViTConfig(**VIT, **L)), {"classifier": 0}),
    "deit": (
        lambda L: T.DeiTForImageClassificationWithTeacher(T.DeiTConfig(**VIT, **L)),
        {"cls_classifier": 0, "distillation_classifier": 0},
    ),
    "levit": (
        lambda L: T.LevitForImageClassificationWithTeacher(
            T.LevitConfig(
                image_size=32,
                patch_size=16,
                hidden_sizes=[16, 32, 48],
                num_attention_heads=[1, 2, 3],
                depths=[1, 1, 1],
                key_dim=[8, 8, 8],
                **L,
            )
        ),
        {"classifier.linear": 0, "classifier_distill.linear": 0},
    ),
    "beit": (lambda L: T.BeitForImageClassification(T.BeitConfig(**VIT, **L)), {"classifier": 0}),
    "dinov2-swiglu": (
        lambda L: T.Dinov2ForImageClassification(T.Dinov2Config(**VIT, use_swiglu_ffn=True, **L)),
        {"classifier": 0},
    ),
    "resnet": (
        lambda L: T.ResNetForImageClassification(
            T.ResNetConfig(embedding_size=16, hidden_sizes=[16, 32], depths=[1, 1], **L)
        ),
        {"classifier.1": 0},
    ),
    "convnext": (
        lambda L: T.ConvNextForImageClassification(
            T.ConvNextConfig(hidden_sizes=[16, 32], depths=[1, 1], num_stages=2, **L)
        ),
        {"classifier": 0},
    ),
    "swin": (
        lambda L: T.SwinForImageClassification(
            T.SwinConfig(
                image_size=32,
                patch_size=4,
                embed_dim=16,
                depths=[1, 1],
                num_heads=[1, 2],
                window_size=2,
                **L,
            )
        ),
        {"classifier": 0},
    ),
    "efficientnet": (
        lambda L: T.EfficientNetForImageClassification(
            T.EfficientNetConfig(
                image_size=32, width_coefficient=0.1, depth_coefficient=0.1, hidden_dim=64, **L
            )
        ),
        {"classifier": 0},
    ),
    "detr": (
        lambda L: T.DetrForObjectDetection(T.DetrConfig(backbone_config=resnet(), **DETR, **L)),
        {"class_labels_classifier": 1},
    ),
    "yolos": (
        lambda L: T.YolosForObjectDetection(
            T.YolosConfig(**{**VIT, "image_size": [32, 32]}, num_detection_tokens=5, **L)
        ),
        {"class_labels_classifier.layers.2": 1},
    ),
    "conditional-detr": (
        lambda L: T.ConditionalDetrForObjectDetection(
            T.ConditionalDetrConfig(backbone_config=resnet(), **DETR, **L)
        ),
        {"class_labels_classifier": 0},
    ),
    "deformable-detr": (
        lambda L: T.DeformableDetrForObjectDetection(
            T.DeformableDetrConfig(
                backbone_config=resnet(),
                **DETR,
                num_feature_levels=2,
                encoder_n_points=2,
                decoder_n_points=2,
                **L,
            )
        ),
        {"class_embed.0": 0, "class_embed.1": 0},
    ),
    "deformable-detr-two-stage": (
        lambda L: T.DeformableDetrForObjectDetection(
            T.DeformableDetrConfig(
                backbone_config=resnet(),
                **DETR,
                num_feature_levels=2,
                encoder_n_points=2,
                decoder_n_points=2,
                with_box_refine=True,
                two_stage=True,
                **L,
            )
        ),
        {f"{p}class_embed.{i}": 0 for p in ("", "model.decoder.") for i in range(3)},
    ),
    "rt-detr": (
        lambda L: T.RTDetrForObjectDetection(
            T.RTDetrConfig(backbone_config=rt_backbone(), **RT_DETR, **L)
        ),
        {
            "model.denoising_class_embed": 1,
            "model.enc_score_head": 0,
            "model.decoder.class_embed.0": 0,
            "model.decoder.class_embed.1": 0,
        },
    ),
    "rt-detr-v2": (
        lambda L: T.RTDetrV2ForObjectDetection(
            T.RTDetrV2Config(backbone_config=rt_backbone(), **RT_DETR, **L)
        ),
        {
            "model.denoising_class_embed": 1,
            "model.enc_score_head": 0,
            **{f"{p}class_embed.{i}": 0 for p in ("", "model.decoder.") for i in range(2)},
        },
    ),
    "d-fine": (
        lambda L: T.DFineForObjectDetection(T.DFineConfig(backbone_config=hgnet(), **RT_DETR, **L)),
        {
            "model.denoising_class_embed": 1,
            "model.enc_score_head": 0,
            **{f"{p}class_embed.{i}": 0 for p in ("", "model.decoder.") for i in range(2)},
        },
    ),
    "mask2former": (
        lambda L: T.Mask2FormerForUniversalSegmentation(
            T.Mask2FormerConfig(
                backbone_config=swin(),
                feature_size=32,
                mask_feature_size=32,
                hidden_dim=32,
                encoder_feedforward_dim=32,
                dim_feedforward=32,
                decoder_layers=2,
                encoder_layers=1,
                num_attention_heads=2,
                num_queries=5,
                **L,
            )
        ),
        {"class_predictor": 1},
    ),
    "maskformer": (
        lambda L: T.MaskFormerForInstanceSegmentation(
            T.MaskFormerConfig(
                backbone_config=swin(),
                decoder_config=T.DetrConfig(
                    d_model=32,
                    decoder_layers=1,
                    decoder_attention_heads=2,
                    decoder_ffn_dim=32,
                    encoder_layers=1,
                    use_timm_backbone=False,
                    use_pretrained_backbone=False,
                ),
                fpn_feature_size=32,
                mask_feature_size=32,
                num_queries=5,
                **L,
            )
        ),
        {"class_predictor": 1},
    ),
    "segformer": (
        lambda L: T.SegformerForSemanticSegmentation(
            T.SegformerConfig(
                num_encoder_blocks=2,
                depths=[1, 1],
                sr_ratios=[2, 1],
                hidden_sizes=[16, 32],
                num_attention_heads=[1, 2],
                decoder_hidden_size=32,
                patch_sizes=[7, 3],
                strides=[4, 2],
                mlp_ratios=[2, 2],
                **L,
            )
        ),
        {"decode_head.classifier": 0},
    ),
    "upernet": (
        lambda L: T.UperNetForSemanticSegmentation(
            T.UperNetConfig(
                backbone_config=T.ConvNextConfig(
                    hidden_sizes=[16, 32],
                    depths=[1, 1],
                    num_stages=2,
                    out_features=["stage1", "stage2"],
                ),
                hidden_size=16,
                auxiliary_in_channels=32,
                auxiliary_channels=16,
                pool_scales=[1, 2],
                **L,
            )
        ),
        {"decode_head.classifier": 0, "auxiliary_head.classifier": 0},
    ),
    "dpt": (
        lambda L: T.DPTForSemanticSegmentation(
            T.DPTConfig(
                **VIT,
                backbone_out_indices=[0, 1, 1, 1],
                neck_hidden_sizes=[16, 16, 16, 16],
                fusion_hidden_size=16,
                **L,
            )
        ),
        {"head.head.4": 0, "auxiliary_head.head.4": 0},
    ),
    "bert-sequence": (
        lambda L: T.BertForSequenceClassification(T.BertConfig(**TEXT, **L)),
        {"classifier": 0},
    ),
    "bert-token": (
        lambda L: T.BertForTokenClassification(T.BertConfig(**TEXT, **L)),
        {"classifier": 0},
    ),
    "llama-sequence": (
        lambda L: T.LlamaForSequenceClassification(
            T.LlamaConfig(**TEXT, num_key_value_heads=1, pad_token_id=0, **L)
        ),
        {"score": 0},
    ),
}


def build(family: str, names: list[str] | None = None, seed: int = 0, **kw: Any) -> Any:
    torch.manual_seed(seed)
    return FAMILIES[family][0]({**(labels(names) if names else {}), **kw})


class Saved:
    """``save_pretrained`` folders of 10-class models, made once per family for the module, and
    what ``from_pretrained`` makes of each."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.made: dict[str, tuple[Path, dict[str, torch.Tensor]]] = {}

    def __call__(self, family: str) -> tuple[Path, dict[str, torch.Tensor]]:
        if family not in self.made:
            folder = self.root / family
            build(family, NAMES).save_pretrained(folder)
            loaded = build(family, NAMES, seed=5)
            reference = type(loaded).from_pretrained(folder)
            self.made[family] = folder, snapshot(reference)
        return self.made[family]


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> Saved:
    return Saved(tmp_path_factory.mktemp("hf"))


def weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(folder / "model.safetensors")


@pytest.mark.parametrize("family", FAMILIES)
def test_save_pretrained_round_trip_is_complete_and_bit_exact_with_from_pretrained(
    family: str, saved: Saved
) -> None:
    """Every key is copied (transformers' renaming, splits and ties), 100 % reused, nothing
    unused, and the model equals what from_pretrained makes of the folder."""
    folder, reference = saved(family)
    model = build(family, NAMES, seed=1)
    report = smartload.load(model, folder)
    summary = report.summary
    assert report.adapter == "transformers"
    assert summary["copy"] == len(report.entries) == len(model.state_dict())
    assert summary["reused_params"] == summary["model_params"]
    assert (summary["slice"], summary["reinit-normal"], summary["skip"]) == (0, 0, 0)
    assert report.unused == () and report.heads == () and report.notes == ()
    assert_same_tensors(model.state_dict(), reference)


@pytest.mark.parametrize("family", FAMILIES)
def test_ten_labels_into_three_by_name_with_no_arguments(family: str, saved: Saved) -> None:
    """config.json's id2label and model.config.id2label give the class map: every head keeps
    the rows of "dog" and "boat" exactly, "no object" (or the padding row) stays last, and the
    new class starts as the model's own init starts its heads (the freshly built model's spread
    and constant bias)."""
    folder, _ = saved(family)
    file = weights(folder)
    model = build(family, THREE, seed=2)
    rules = {r.name: r for r in TransformersAdapter().head_rules(model)}
    for name, rule in rules.items():  # the fresh model's heads: the spread and bias of its init
        layer = model.get_submodule(name)
        assert 0.7 < float(layer.weight.detach().std()) / rule.std < 1.3, name
        bias = getattr(layer, "bias", None)
        if bias is not None and bool((bias == bias[0]).all()):
            assert float(bias[0].detach()) == pytest.approx(rule.bias, abs=1e-6), name
    report = smartload.load(model, folder)
    heads = FAMILIES[family][1]
    assert {h.name: (h.old_classes, h.new_classes) for h in report.heads} == dict.fromkeys(
        heads, (10, 3)
    )
    assert {(h.class_map, h.unmatched) for h in report.heads} == {((1, None, 9), ("unicorn",))}
    assert report.notes[:2] == (
        f"class names of the checkpoint (10) from {folder}/config.json's id2label",
        "class names of the model (3) from model.config.id2label: the rows of the classes the "
        "checkpoint names too are kept, by name",
    )
    state = model.state_dict()
    sliced = [e for e in report.entries if e.action == "slice"]
    assert {e.head for e in sliced} == set(heads)
    for entry in sliced:
        extra = heads[entry.head or ""]
        old, new = file[entry.source or ""], state[entry.key]
        assert entry.model_shape[0] == 3 + extra and entry.ckpt_shape == tuple(old.shape)
        kept = [(0, 1), (2, 9)] + ([(3, 10)] if extra else [])  # (new row, checkpoint row)
        for row, source in kept:
            assert torch.equal(new[row], old[source]), (entry.key, row)
        if entry.key.endswith("bias"):
            assert torch.equal(new[1], torch.full_like(new[1], rules[entry.head or ""].bias))
    others = [e for e in report.entries if e.action != "slice"]
    assert all(e.action == "copy" or e.key.endswith("criterion.empty_weight") for e in others)
    assert report.unused == ()


def test_new_rows_start_as_each_models_init_weights() -> None:
    """Per family, the std and bias of new rows are those of the model's own _init_weights: the
    config's initializer_range (init_std for DETR), torch's Linear init for ResNet, xavier and the
    focal prior -log((1 - p) / p), p = 1 / (K + 1), for RT-DETR's score heads; a freshly built
    model's head holds values of that spread and that bias."""
    expected = {
        "vit": {"classifier": (0.02, 0.0)},
        "detr": {"class_labels_classifier": (0.02, 0.0)},
        "resnet": {"classifier.1": (1 / math.sqrt(3 * 32), 0.0)},
        "rt-detr": {
            "model.denoising_class_embed": (math.sqrt(2 / (32 + 4)), -math.log(3)),
            "model.enc_score_head": (math.sqrt(2 / (32 + 3)), -math.log(3)),
            "model.decoder.class_embed.0": (math.sqrt(2 / (32 + 3)), -math.log(3)),
            "model.decoder.class_embed.1": (math.sqrt(2 / (32 + 3)), -math.log(3)),
        },
    }
    for family, heads in expected.items():
        model = build(family, THREE, seed=3)
        rules = {r.name: r for r in TransformersAdapter().head_rules(model)}
        assert list(rules) == list(heads)
        for name, (std, bias) in heads.items():
            assert (rules[name].std, rules[name].bias) == pytest.approx((std, bias)), name
        for name, rule in rules.items():
            layer = model.get_submodule(name)
            assert 0.7 < float(layer.weight.detach().std()) / rule.std < 1.3, (family, name)
            if getattr(layer, "bias", None) is not None and family != "resnet":  # uniform there
                assert torch.equal(layer.bias, torch.full_like(layer.bias, rule.bias))


def test_text_classification_keeps_rows_by_label_name(tmp_path: Path) -> None:
    """Sequence (classifier, score) and token classification: rows follow the names, in any
    order, with no arguments."""
    sentiment = ["negative", "neutral", "positive"]
    for family, names, wanted in (
        ("bert-sequence", sentiment, ["positive", "negative"]),
        ("llama-sequence", sentiment, ["positive", "negative"]),
        ("bert-token", ["O", "B-PER", "I-PER", "B-LOC", "I-LOC"], ["O", "B-LOC", "I-LOC"]),
    ):
        folder = tmp_path / family
        build(family, names).save_pretrained(folder)
        model = build(family, wanted, seed=1)
        report = smartload.load(model, folder)
        rows = [names.index(n) for n in wanted]
        name = next(iter(FAMILIES[family][1]))
        assert [(h.name, h.class_map) for h in report.heads] == [(name, tuple(rows))]
        for key, value in weights(folder).items():
            if key.startswith(f"{name}."):
                assert torch.equal(model.state_dict()[key], value[rows]), key
        assert report.summary["reused_params"] == report.summary["model_params"]


def test_same_names_in_another_order_are_reordered(saved: Saved) -> None:
    """Equal class counts are no reason to copy: the rows follow the names."""
    folder, _ = saved("vit")
    model = build("vit", NAMES[::-1], seed=1)
    report = smartload.load(model, folder)
    assert sorted(e.key for e in report.entries if e.action == "slice") == [
        "classifier.bias",
        "classifier.weight",
    ]
    assert torch.equal(model.classifier.weight, weights(folder)["classifier.weight"].flip(0))


def test_generic_label_names_fall_back_to_position(tmp_path: Path, saved: Saved) -> None:
    """LABEL_0, LABEL_1 ... on either side are no names: no class map is derived, and a head of
    another class count is re-initialised, as without the adapter; no names are reported."""
    generic = tmp_path / "generic"
    build("vit", num_labels=10).save_pretrained(generic)
    named, _ = saved("vit")
    for folder, model in ((generic, build("vit", THREE)), (named, build("vit", num_labels=3))):
        report = smartload.load(model, folder)
        assert [(h.name, h.class_map) for h in report.heads] == [("classifier", None)]
        assert {e.reason for e in report.entries if e.action == "reinit-normal"} == {
            "head classifier: 10 → 3 classes, no class map"
        }
        assert report.notes == ()


def test_given_names_or_class_map_complete_the_defaults(saved: Saved) -> None:
    """target_classes or a class map by name, with the checkpoint's names from config.json."""
    folder, _ = saved("vit")
    file = weights(folder)["classifier.weight"]
    model = build("vit", num_labels=2)
    smartload.load(model, folder, target_classes=["boat", "cat"])
    assert torch.equal(model.classifier.weight, file[[9, 0]])
    model = build("vit", num_labels=3, seed=1)
    report = smartload.load(model, folder, class_map=["bus", None, "dog"])
    assert torch.equal(model.classifier.weight[[0, 2]], file[[3, 1]])
    assert report.notes == (
        f"class names of the checkpoint (10) from {folder}/config.json's id2label",
    )


def test_config_json_beside_the_weight_file_only_for_hf_file_names(
    tmp_path: Path, saved: Saved
) -> None:
    """folder/model.safetensors reads folder/config.json; another file name in the folder does not."""
    folder, _ = saved("vit")
    report = smartload.load(build("vit", THREE), folder / "model.safetensors")
    assert [h.class_map for h in report.heads] == [(1, None, 9)]
    other = tmp_path / "weights.safetensors"
    other.write_bytes((folder / "model.safetensors").read_bytes())
    (tmp_path / "config.json").write_bytes((folder / "config.json").read_bytes())
    report = smartload.load(build("vit", THREE), other)
    assert [h.class_map for h in report.heads] == [None]


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        (b'{"id2label": ' + b"[" * 100_000, "nested too deeply to be a config"),
        (b'{"id2label": {"0": "cat"', "Expecting ',' delimiter: line 1 column 25 (char 24)"),
        (b'{"id2label": {"0": "\xff"}}', "'utf-8' codec can't decode byte 0xff in position 20"),
        (b'{"id2label": ' + b"1" * 5_000 + b"}", "Exceeds the limit (4300 digits)"),
        (b"[1, 2]", "not a JSON object"),
    ],
)
def test_a_malformed_config_json_is_a_note(
    tmp_path: Path, saved: Saved, text: bytes, problem: str
) -> None:
    """A config.json that json cannot read (nested 100,000 deep, truncated, not UTF-8, an
    integer of 5,000 digits, no object) leaves the class names unknown, said in a note: the
    plan is made as without names, and no error escapes (RecursionError did)."""
    folder, _ = saved("vit")
    (tmp_path / "model.safetensors").write_bytes((folder / "model.safetensors").read_bytes())
    (tmp_path / "config.json").write_bytes(text)
    plan = smartload.diff(build("vit", THREE), tmp_path)
    assert [(h.name, h.class_map) for h in plan.heads] == [("classifier", None)]
    assert len(plan.notes) == 1
    assert plan.notes[0].startswith(f"{tmp_path}/config.json: not read (")
    assert problem in plan.notes[0]
    assert plan.notes[0].endswith("); the checkpoint's class names are unknown")


def test_sharded_folder_and_its_index_file(tmp_path: Path) -> None:
    """save_pretrained(max_shard_size=...) writes shards and an index: the folder and the index
    load alike, with config.json's names."""
    build("vit", NAMES).save_pretrained(tmp_path, max_shard_size="30KB")
    assert len(list(tmp_path.glob("model-*-of-*.safetensors"))) > 1
    for path in (tmp_path, tmp_path / "model.safetensors.index.json"):
        report = smartload.load(build("vit", THREE, seed=1), path)
        assert report.format == "safetensors-sharded"
        assert [h.class_map for h in report.heads] == [(1, None, 9)]
        assert report.summary["copy"] == 38 and report.summary["slice"] == 2


def test_vit_keys_are_renamed_by_transformers_mapping(saved: Saved) -> None:
    """transformers 5's module names fed from the names checkpoints keep; the report names the
    key in the file."""
    folder, _ = saved("vit")
    report = smartload.load(build("vit", NAMES), folder)
    sources = {e.key: e.source for e in report.entries}
    assert sources["vit.layers.0.attention.q_proj.weight"] == (
        "vit.encoder.layer.0.attention.attention.query.weight"
    )
    assert sources["vit.layers.1.mlp.fc2.bias"] == "vit.encoder.layer.1.output.dense.bias"


def test_fused_checkpoint_tensors_are_split_by_transformers_converter(saved: Saved) -> None:
    """DINOv2's SwiGLU weights_in (gate and up stacked) feed gate_proj and up_proj through
    transformers' own Chunk converter, when loading."""
    folder, reference = saved("dinov2-swiglu")
    report = smartload.load(build("dinov2-swiglu", NAMES, seed=1), folder)
    entries = {e.key: e for e in report.entries}
    for part in ("gate_proj", "up_proj"):
        entry = entries[f"dinov2.encoder.layer.0.mlp.{part}.weight"]
        assert (entry.action, entry.source, entry.ckpt_shape, entry.model_shape) == (
            "copy",
            "dinov2.encoder.layer.0.mlp.weights_in.weight",
            (176, 32),
            (88, 32),
        )
        assert entry.transform == (
            "split from dinov2.encoder.layer.0.mlp.weights_in.weight by transformers (Chunk: 2 "
            "tensors)"
        )


def test_tied_weights_load_through_the_saved_name_and_stay_tied(saved: Saved) -> None:
    """D-FINE saves model.decoder.class_embed once for both names; both are loaded (sliced)
    through it and stay one parameter. Deformable DETR's shared class_embed likewise."""
    folder, _ = saved("d-fine")
    model = build("d-fine", THREE, seed=1)
    report = smartload.load(model, folder)
    sources = {e.key: e.source for e in report.entries}
    assert sources["class_embed.1.weight"] == "model.decoder.class_embed.1.weight"
    assert model.class_embed[1].weight is model.model.decoder.class_embed[1].weight
    folder, _ = saved("deformable-detr")
    model = build("deformable-detr", THREE, seed=1)
    report = smartload.load(model, folder)
    assert {e.key: e.source for e in report.entries}["class_embed.1.bias"] == "class_embed.0.bias"
    assert model.class_embed[1].bias is model.class_embed[0].bias


def test_tied_word_embeddings_load_through_the_embedding(tmp_path: Path) -> None:
    """A causal LM with tie_word_embeddings: lm_head.weight is not saved; it is loaded through
    model.embed_tokens.weight, 100 % reused, and stays the embedding."""
    config = T.LlamaConfig(**TEXT, num_key_value_heads=1, tie_word_embeddings=True)
    T.LlamaForCausalLM(config).save_pretrained(tmp_path)
    assert "lm_head.weight" not in weights(tmp_path)
    model = T.LlamaForCausalLM(config)
    report = smartload.load(model, tmp_path)
    assert {e.key: e.source for e in report.entries}["lm_head.weight"] == (
        "model.embed_tokens.weight"
    )
    assert report.summary["reused_params"] == report.summary["model_params"]
    assert model.lm_head.weight is model.model.embed_tokens.weight


def test_loss_class_weights_keep_the_models_own(saved: Saved) -> None:
    """Mask2Former's criterion.empty_weight (1 per class, eos_coef last) is the model's own for
    its class count."""
    folder, _ = saved("mask2former")
    model = build("mask2former", THREE, seed=1)
    report = smartload.load(model, folder)
    entry = next(e for e in report.entries if e.key == "criterion.empty_weight")
    assert (entry.action, entry.reason) == (
        "skip",
        "the loss's class weights: kept as the model made them for its 3 classes (1 each, "
        "eos_coef for 'no object')",
    )
    assert model.criterion.empty_weight.tolist() == [1.0, 1.0, 1.0, pytest.approx(0.1)]


def test_weights_transformers_fuses_from_several_tensors_are_refused(tmp_path: Path) -> None:
    """Mixtral's experts (one tensor per expert in the file, stacked in the model): refused,
    naming keys and what to do, and the model is unchanged."""
    config = T.MixtralConfig(
        vocab_size=64,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        intermediate_size=16,
        num_local_experts=2,
        num_experts_per_tok=1,
        max_position_embeddings=32,
        pad_token_id=0,
        num_labels=3,
    )
    T.MixtralForSequenceClassification(config).save_pretrained(tmp_path)
    model = T.MixtralForSequenceClassification(config)
    before = snapshot(model)
    with pytest.raises(smartload.IncompatibleCheckpointError) as caught:
        smartload.load(model, tmp_path)
    assert [m[0] for m in caught.value.mismatches] == [
        "model.layers.0.mlp.experts.gate_up_proj",
        "model.layers.0.mlp.experts.down_proj",
    ]
    message = str(caught.value)
    assert "with Concatenate, MergeModulelist, from checkpoint tensors (model.layers.0." in message
    assert "Nothing was loaded. Load this checkpoint with from_pretrained" in message
    assert_same_tensors(model.state_dict(), before)


def test_meta_device_models_follow_smartloads_meta_behaviour(saved: Saved) -> None:
    """from_config on the meta device: every tensor made on the CPU from the checkpoint, equal
    to from_pretrained. Non-persistent buffers (BERT's position_ids) cannot come from a
    checkpoint: refused, naming them; to_empty + initialize_weights first, then it loads."""
    folder, reference = saved("vit")
    with torch.device("meta"):
        model = T.AutoModelForImageClassification.from_config(T.ViTConfig(**VIT, **labels(NAMES)))
    report = smartload.load(model, folder)
    assert report.summary["copy"] == len(reference)
    assert_same_tensors(model.state_dict(), reference)
    folder, reference = saved("bert-sequence")
    with torch.device("meta"):
        model = T.AutoModelForSequenceClassification.from_config(
            T.BertConfig(**TEXT, **labels(NAMES))
        )
    with pytest.raises(smartload.IncompatibleCheckpointError) as caught:
        smartload.load(model, folder)
    assert [m[0] for m in caught.value.mismatches] == [
        "bert.embeddings.position_ids",
        "bert.embeddings.token_type_ids",
    ]
    assert model.bert.embeddings.position_ids.is_meta
    model.to_empty(device="cpu")
    model.initialize_weights()
    smartload.load(model, folder)
    assert_same_tensors(model.state_dict(), reference)


def test_from_pretrained_ignore_mismatched_sizes_drops_rows_smartload_keeps(saved: Saved) -> None:
    """The README's comparison: from_pretrained(num_labels=3, ignore_mismatched_sizes=True)
    re-initialises the whole head; smartload keeps the rows of the classes both name."""
    folder, _ = saved("vit")
    file = weights(folder)["classifier.weight"]
    theirs = T.ViTForImageClassification.from_pretrained(
        folder, ignore_mismatched_sizes=True, **labels(THREE)
    )
    ours = build("vit", THREE, seed=1)
    smartload.load(ours, folder)
    assert not torch.equal(theirs.classifier.weight[[0, 2]], file[[1, 9]])
    assert torch.equal(ours.classifier.weight[[0, 2]], file[[1, 9]])
    assert_same_tensors(
        {k: v for k, v in ours.state_dict().items() if not k.startswith("classifier.")},
        {k: v for k, v in theirs.state_dict().items() if not k.startswith("classifier.")},
    )


def test_cli_diff_builds_hf_models(saved: Saved, capsys: pytest.CaptureFixture[str]) -> None:
    """--model hf:CONFIG_DIR, hf:CLASS:CONFIG_DIR with --num-classes and a class map by name,
    and a class that is not a transformers model."""
    folder, _ = saved("vit")
    three = folder.parent / "vit-three"
    build("vit", THREE).save_pretrained(three)
    assert main(["diff", str(folder), "--model", f"hf:{three}"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[:3] == [
        f"plan for {folder}/model.safetensors (safetensors, state dict: top level, adapter: "
        "transformers)",
        "reused 23,970/24,003 parameters (99.8%) from model.safetensors: 38 copy, 2 slice",
        "head classifier: 10 → 3 classes, 2 taken from the checkpoint; unmatched: unicorn",
    ]
    spec = f"hf:ViTForImageClassification:{folder}"
    argv = [
        "diff",
        str(folder),
        "--model",
        spec,
        "--num-classes",
        "3",
        "--class-map",
        "boat,none,cat",
    ]
    assert main(argv) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[2] == "head classifier: 10 → 3 classes, 2 taken from the checkpoint"
    assert f"note: class names of the checkpoint (10) from {folder}/config.json's id2label" in out
    assert main(["diff", str(folder), "--model", "hf:BertConfig"]) == 2
    assert "'BertConfig' is not a transformers model class" in capsys.readouterr().err
    # a class alone: its default config (ViT-Base), built on the meta device: shapes differ
    assert main(["diff", str(folder), "--model", "hf:ViTForImageClassification"]) == 5
    err = capsys.readouterr().err
    assert "vit.embeddings.cls_token: checkpoint [1, 1, 32] vs model [1, 1, 768]" in err


def test_transformers_is_not_imported_for_other_models() -> None:
    code = (
        "import sys, torch, smartload; "
        "m = torch.nn.Linear(2, 3); smartload.load(m, {'weight': torch.ones(3, 2), 'bias': torch.ones(3)}); "
        "print('transformers' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
