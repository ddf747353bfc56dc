"""Headline numbers of the published multi-task tables (Multi-Task-Transformer code), for comparison rows.

Units as printed in the papers: mIoU, maxF and odsF in percent, depth RMSE in metres,
normal errors in degrees. All at full resolution with ImageNet-pretrained backbones:
InvPT (H. Ye, D. Xu, ECCV 2022), TaskPrompter (H. Ye, D. Xu, ICLR 2023; numbers of the
released checkpoint), TaskExpert (H. Ye, D. Xu, ICCV 2023), MTLoRA (A. Agiza et al., CVPR
2024; its normals column is an RMSE, so it is filed under ``normals/rmse``).
"""

from __future__ import annotations

_NYUD = ("semseg/miou", "depth/rmse", "normals/mean", "edge/odsf")
_PASCAL = ("semseg/miou", "human_parts/miou", "saliency/maxf", "normals/mean", "edge/odsf")


def _row(model: str, backbone: str, keys: tuple[str, ...], values: tuple, notes: dict | None = None) -> dict:
    return {
        "model": model,
        "backbone": backbone,
        "values": {k: v for k, v in zip(keys, values, strict=True) if v is not None},
        "notes": notes or {},
    }


_VERIFY = "†"  # not yet checked against the paper

#: dataset key (``nyud`` / ``pascal_context``) → rows
HEADLINES: dict[str, list[dict]] = {
    "nyud": [
        _row("InvPT", "ViT-L", _NYUD, (53.56, 0.5183, 19.04, 78.10)),
        _row("TaskPrompter", "ViT-L", _NYUD, (55.90, 0.5062, 18.58, 77.70)),
        _row("TaskExpert", "ViT-L", _NYUD, (55.35, 0.5157, 18.54, 78.40), {k: _VERIFY for k in _NYUD}),
    ],
    "pascal_context": [
        _row("InvPT", "ViT-L", _PASCAL, (79.03, 67.61, 84.81, 14.15, 73.00)),
        _row("TaskPrompter", "ViT-L", _PASCAL, (80.79, 68.81, 84.26, 13.58, 73.80)),
        _row(
            "TaskExpert", "ViT-L", _PASCAL, (80.64, 69.42, 84.87, 13.56, 73.30), {k: _VERIFY for k in _PASCAL}
        ),
        _row("TaskExpert", "ViT-B", _PASCAL, (78.45, 67.38, 84.96, 13.55, 72.30)),
        _row(
            "MTLoRA r=64",
            "Swin-T",
            ("semseg/miou", "human_parts/miou", "saliency/maxf", "normals/rmse"),
            (67.90, 59.84, 65.40, 16.60),
        ),
    ],
}
