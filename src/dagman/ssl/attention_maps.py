"""What a pretrained network attends to and masks, on one CT (``dagman attention``).

The CT is prepared exactly as ``dagman data prepare`` prepares the cache (resample to the run's
``data.spacing_mm``, body crop, HU window -> [0, 1]), centre-cropped to the run's crop size (padded with 0
where smaller), and put through one call of ``SSLMethod.forward`` itself (the crop as both views; seeded, the
networks in eval mode, the run's centres and queues), so the pictures are what training computes::

    teacher drop mask (random, r_t) -> teacher(dropped view) -> SA importance map S
        -> student mask (the run's generator: attention hint / high / low, random, blockwise)
        -> student(masked view) -> AMIP reconstruction

Pictures are slices through the crop centre (axial, coronal, sagittal; radiological convention).
:func:`attention_maps` writes them and ``attention.json`` and returns :class:`AttentionMaps`.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

__all__ = ["AttentionMaps", "attention_maps", "centre_crop"]

TOP_TOKENS = 10


@dataclass
class AttentionMaps:
    """What :func:`attention_maps` wrote: ``report`` (the content of ``attention.json``), the ``out`` folder
    (``overview.png`` and 5 single-panel figures beside it) and whether the method drew a teacher drop mask
    (``teacher_dropped``; ``mask.teacher_drop_ratio`` > 0)."""

    report: dict
    out: Path
    teacher_dropped: bool

    def summary_lines(self) -> list[str]:
        """What ``dagman attention`` prints: one line with the mask fractions, S entropy and the reconstruction
        L1 beside the mean-of-visible predictor's."""
        report = self.report
        imp, rec = report["importance"], report["reconstruction"]
        drop_txt = (f"teacher drop {report['teacher_drop']['fraction']:.2f}" if self.teacher_dropped
                    else "no teacher drop")
        s_txt = (f"S entropy {imp['entropy_nats']:.4f}/{imp['entropy_max_nats']:.4f} nats" if imp["available"]
                 else "no S (no SA block)")
        l1_masked, l1_mean = rec.get("l1_masked"), rec.get("mean_predictor_l1")
        rec_txt = ""
        if l1_masked is not None:
            rec_txt = f", masked L1 {l1_masked:.4f}"
            if l1_mean is not None:
                rec_txt += f" vs mean-of-visible predictor {l1_mean:.4f}"
            if l1_mean:
                rec_txt += f" ({l1_masked / l1_mean:.2f}x)"
        return [f"dagman attention: {report['method']} step {report['step']}, {report['mask_units']} mask units; "
                f"student mask {report['student_mask']['fraction']:.2f} ({report['student_mask']['kind']}), "
                f"{drop_txt}, {s_txt}{rec_txt} -> {self.out}/overview.png + 5 figures, attention.json"]


def centre_crop(volume, size: int, pad_value: float = 0.0):
    """The centred ``(size,)*3`` crop of a ``(X, Y, Z)`` array, padded with ``pad_value`` (centred) along
    shorter axes. Returns ``(crop float32, origin (3,) ints)``: crop voxel ``c`` is volume voxel
    ``origin + c`` (``origin`` is negative along padded axes)."""
    import numpy as np

    out = np.full((size,) * 3, pad_value, dtype=np.float32)
    src, dst, origin = [], [], []
    for n in volume.shape:
        o = (n - size) // 2 if n >= size else -((size - n) // 2)
        origin.append(int(o))
        lo, hi = max(o, 0), min(o + size, n)
        src.append(slice(lo, hi))
        dst.append(slice(lo - o, hi - o))
    out[tuple(dst)] = np.asarray(volume[tuple(src)], dtype=np.float32)
    return out, origin


def _entropy(p) -> float:
    import torch

    p = p.double()
    return float(-torch.special.xlogy(p, p).sum())


def attention_maps(checkpoint: str | os.PathLike, image: str | os.PathLike, out: str | os.PathLike, *,
                   crop_size: int | None = None, seed: int = 0, progress: bool = True) -> AttentionMaps:
    """The attention pictures of the run ``checkpoint`` (run folder or checkpoint ``.pt``) on the CT ``image``
    into ``out``: ``overview.png`` (every panel), ``ct.png``, ``importance.png``, ``student_mask.png``,
    ``teacher_drop.png``, ``reconstruction.png`` and ``attention.json`` (module docstring). ``crop_size``: the
    centre-crop edge in voxels (default: the run's ``data.crop_size``); ``seed``: the random masks;
    ``progress``: a bar on stderr. Raises a one-line :class:`~dagman.errors.DagmanError` for a bad run, image
    or crop size."""
    import numpy as np
    import torch
    import torch.nn.functional as F
    from tqdm import tqdm

    from dagman.data.cache import atomic_write_json
    from dagman.data.io import read_ct
    from dagman.data.prepare import make_settings, prepare_volume
    from dagman.models.swin import upsample_mask
    from dagman.report.plots import VolumeLayer, slice_grid_figure
    from dagman.ssl.masking import attention_mask_counts, random_mask_count
    from dagman.ssl.method import SSLMethod
    from dagman.ssl.monitor import mean_predictor_l1
    from dagman.train.runs import build_networks, check_crop_size, default_device, load_pretrained

    bar = tqdm(total=5, desc="attention", unit="part", disable=None if progress else True)
    pre = load_pretrained(checkpoint)
    cfg = pre.cfg
    size = check_crop_size(cfg, crop_size if crop_size is not None else cfg.data.crop_size)
    out = Path(out)

    # 1. the CT, prepared like the cache, centre-cropped
    volume = read_ct(image)
    settings = make_settings(cfg.data.spacing_mm, tuple(cfg.data.hu_window), min_size=0)
    prepared, affine, _ = prepare_volume(volume, settings)
    crop, origin = centre_crop(prepared, size)
    bar.update(1)

    # 2. networks and one step of SSLMethod.forward itself (the crop as both views, seeded, eval mode, with the
    # run's loss state): the pictures are the masks and the reconstruction training computes
    device = default_device()
    nets = build_networks(pre, ("teacher", "student"), device)
    teacher, student = nets["teacher"], nets["student"]
    method = SSLMethod(cfg).to(device)
    if isinstance(pre.state.get("method"), dict):
        method.load_state_dict(pre.state["method"], strict=False)
    x = torch.from_numpy(crop)[None, None].to(device)
    grid = method.unit_grid(tuple(x.shape[2:]))
    n_units = math.prod(grid)
    generator = torch.Generator().manual_seed(int(seed))
    has_sa = teacher.sa is not None
    values = SimpleNamespace(teacher_temp=cfg.loss.teacher_temp_end, patch_teacher_temp=cfg.loss.patch_teacher_temp_end)
    with torch.no_grad():
        step = method(student, teacher, x, x, values, generator)
    s_mask = step.masks["student"][:1]
    drop = step.masks["teacher_drop"][:1] if step.masks["teacher_drop"] is not None else None
    scores = step.masks["importance"]
    if scores is None and has_sa:  # a random-mask method with an SA block: S of the teacher's (dropped) view
        with torch.no_grad():
            scores = teacher(x, mask=drop, heads=False).importance
    scores = scores[:1].float() if scores is not None else None
    reconstruction = step.reconstruction[:1] if step.reconstruction is not None else None
    bar.update(2)

    # 3. voxel maps on the crop
    vox = tuple(x.shape[2:])
    s_vox = upsample_mask(s_mask, vox)[0].cpu().numpy()
    drop_vox = upsample_mask(drop, vox)[0].cpu().numpy() if drop is not None else np.zeros(vox, dtype=bool)
    heat = None
    if scores is not None:
        heat = F.interpolate(scores.view(1, 1, *grid), size=vox, mode="nearest")[0, 0].cpu().numpy()
    recon, l1_masked, l1_mean = None, None, None
    if reconstruction is not None:
        pred = reconstruction[0, 0].float().cpu().numpy()
        recon = np.where(s_vox, pred, crop)
        if s_vox.any():
            l1_masked = float(np.abs(pred - crop)[s_vox].mean())
            l1_mean = mean_predictor_l1(crop, s_vox)

    # 4. figures
    method = cfg.method
    no_sa = f"S unavailable: {method} has no SA block" if not has_sa else None
    ct_layer = VolumeLayer("CT (prepared crop)", crop)
    imp_layer = VolumeLayer("teacher SA importance S", crop, heat, "heat", note=no_sa, overlay_label="S per token")
    s_note = None if s_mask.any() else f"empty student mask ({cfg.mask.student} drew none)"
    stu_layer = VolumeLayer(f"student mask ({cfg.mask.student})", crop, s_vox, "mask", note=s_note)
    drop_note = None if drop is not None else f"no teacher noise ({method}: mask.teacher_drop_ratio=0)"
    drop_layer = VolumeLayer("teacher drop mask", crop, drop_vox if drop is not None else None, "mask", note=drop_note)
    rec_note = None if recon is not None else f"no AMIP reconstruction head ({method})"
    rec_layer = VolumeLayer("reconstruction", recon if recon is not None else crop,
                            note=rec_note)
    centre = [s // 2 for s in vox]
    title = f"{method}/{cfg.size}, step {pre.step} - {Path(image).name}"
    if l1_masked is not None:
        title += f" - masked L1 {l1_masked:.4f}" + (f" vs mean predictor {l1_mean:.4f}" if l1_mean is not None else "")
    files = {
        "overview": slice_grid_figure([ct_layer, imp_layer, stu_layer, drop_layer, rec_layer], centre,
                                      out / "overview.png", title),
        "ct": slice_grid_figure([ct_layer], centre, out / "ct.png", title),
        "importance": slice_grid_figure([imp_layer], centre, out / "importance.png", title),
        "student_mask": slice_grid_figure([stu_layer], centre, out / "student_mask.png", title),
        "teacher_drop": slice_grid_figure([drop_layer], centre, out / "teacher_drop.png", title),
        "reconstruction": slice_grid_figure([rec_layer], centre, out / "reconstruction.png", title),
    }
    bar.update(1)

    # 5. numbers
    m = cfg.mask
    if m.student == "attention_hint":
        top, _, hints = attention_mask_counts(n_units, m.ratio, m.hint_fraction)
        expected = (top - hints) / n_units
    elif m.student in ("attention_high", "attention_low"):
        expected = attention_mask_counts(n_units, m.ratio)[0] / n_units
    elif m.student == "random":
        expected = random_mask_count(n_units, m.ratio) / n_units
    else:
        expected = None  # blockwise: a random fraction (possibly none)
    unit_vox = [v // g for v, g in zip(vox, grid)]
    report = {
        "checkpoint": str(pre.path),
        "step": pre.step,
        "method": method,
        "size": cfg.size,
        "image": str(image),
        "seed": int(seed),
        "prepared_shape": [int(s) for s in prepared.shape],
        "spacing_mm": float(cfg.data.spacing_mm),
        "hu_window": [float(v) for v in cfg.data.hu_window],
        "crop_size": size,
        "crop_origin": origin,
        "unit_grid": list(grid),
        "mask_units": n_units,
        "unit_voxels": unit_vox,
        "student_mask": {
            "kind": m.student,
            "masked_units": int(s_mask.sum()),
            "fraction": float(s_mask.float().mean()),
            "expected_fraction": expected,
        },
        "teacher_drop": {
            "ratio": float(m.teacher_drop_ratio),
            "dropped_units": int(drop.sum()) if drop is not None else 0,
            "fraction": float(drop.float().mean()) if drop is not None else 0.0,
        },
        "importance": {"available": has_sa},
        "reconstruction": {"available": recon is not None},
        "files": {k: str(v) for k, v in files.items()},
    }
    if has_sa:
        flat = scores[0].cpu()
        order = torch.argsort(flat, descending=True, stable=True)[:TOP_TOKENS]
        top_tokens = []
        for idx in order.tolist():
            g = np.unravel_index(idx, grid)
            centre_crop_vox = [(int(i) + 0.5) * u for i, u in zip(g, unit_vox)]
            world = affine @ np.array([o + c for o, c in zip(origin, centre_crop_vox)] + [1.0])
            top_tokens.append({"index": int(idx), "grid": [int(i) for i in g], "score": float(flat[idx]),
                               "centre_voxel_in_crop": centre_crop_vox,
                               "centre_ras_mm": [round(float(v), 2) for v in world[:3]],
                               "masked_for_student": bool(s_mask.view(-1)[idx])})
        report["importance"].update({
            "view": "clean" if (cfg.mask.attention_view == "clean" and drop is not None) else
                    ("dropped" if drop is not None else "clean (no teacher noise)"),
            "entropy_nats": _entropy(flat),
            "entropy_max_nats": math.log(n_units),
            "max": float(flat.max()),
            "mass_masked_for_student": float(flat[s_mask.view(-1).cpu()].sum()),
            "top_tokens": top_tokens,
        })
    else:
        report["importance"]["reason"] = f"method {method} has no semantic-attention block (sa.enabled=false)"
    if recon is not None:
        report["reconstruction"]["l1_masked"] = l1_masked
        report["reconstruction"]["mean_predictor_l1"] = l1_mean
        report["reconstruction"]["ratio_to_mean_predictor"] = (l1_masked / l1_mean if l1_masked is not None and l1_mean
                                                               else None)
    else:
        report["reconstruction"]["reason"] = f"method {method} has no AMIP head (loss.amip=false)"
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "attention.json", report)
    bar.update(1)
    bar.close()
    return AttentionMaps(report=report, out=out, teacher_dropped=drop is not None)
