"""Plain-loop transcriptions of the official evaluators: the references of tests and benchmarks.

Written for readability against the official code, not for speed; gcm_core.metrics must give
the same numbers.
"""
from __future__ import annotations

import numpy as np


def loop_tiou(a, b):
    """tIoU; 0 for two zero-length segments at one point (0/0: gcm_core.metrics' rule, see its docstring)."""
    a, b = sorted(a), sorted(b)
    inter = max(0.0, min(a[1], b[1]) - max(a[0], b[0]))
    union = max(a[1], b[1]) - min(a[0], b[0])
    return inter / union if union > 0 else 0.0


def loop_activitynet_ap(gt, det, thr, num_classes):
    """The official eval_detection.py loop, detection by detection (stable sorts, first-listed ties).

    ``gt``: (video, label, start, end) rows; ``det``: (video, label, start, end, score) rows with
    start <= end; ``thr``: one threshold or a list. Returns AP per class (NaN without ground
    truth), or [T, C] for a list.
    """
    thresholds = thr if isinstance(thr, (list, tuple)) else [thr]
    gt_by_class = {}
    for k, (v, c, s, e) in enumerate(gt):
        gt_by_class.setdefault(c, {}).setdefault(v, []).append((s, e, k))
    det_by_class = {}
    for d in det:
        det_by_class.setdefault(d[1], []).append(d)
    ap = np.full((len(thresholds), num_classes), np.nan)
    for c, videos in gt_by_class.items():
        npos = sum(len(g) for g in videos.values())
        dets = sorted(det_by_class.get(c, []), key=lambda d: -d[4])  # Python's sort is stable
        for t, threshold in enumerate(thresholds):
            locked = set()
            tp = []
            for v, _, s, e, _ in dets:
                cands = [(loop_tiou((s, e), (gs, ge)), k) for gs, ge, k in videos.get(v, [])]
                cands.sort(key=lambda x: -x[0])  # stable: first-listed ground truth wins ties
                hit = 0
                for iou, k in cands:
                    if iou < threshold:
                        break
                    if k in locked:
                        continue
                    locked.add(k)
                    hit = 1
                    break
                tp.append(hit)
            ap[t, c] = _interpolated_ap(tp, npos)
    return ap if isinstance(thr, (list, tuple)) else ap[0]


def _interpolated_ap(tp, npos):
    if not tp:
        return 0.0
    tp = np.array(tp, dtype=float)
    cum = np.cumsum(tp)
    rec = cum / npos
    prec = cum / np.arange(1, len(tp) + 1)
    mprec = np.concatenate([[0], prec, [0]])
    mrec = np.concatenate([[0], rec, [1]])
    for i in range(len(mprec) - 2, -1, -1):
        mprec[i] = max(mprec[i], mprec[i + 1])
    idx = np.where(mrec[1:] != mrec[:-1])[0] + 1
    return float(np.sum((mrec[idx] - mrec[idx - 1]) * mprec[idx]))


def loop_thumos_ap(gt, det, thr, num_classes, ambiguous):
    """TH14evalDet.m, transcribed: per video, each ground truth takes its best free detection."""
    ap = np.zeros(num_classes)
    for c in range(num_classes):
        rows = []  # (score, is_tp) of the detections that count
        videos = sorted({d[0] for d in det if d[1] == c} | {g[0] for g in gt if g[1] == c})
        for v in videos:
            gts = [(s, e) for gv, l, s, e in gt if gv == v and l == c]
            dets = sorted([d for d in det if d[0] == v and d[1] == c], key=lambda d: -d[4])
            free = [True] * len(dets)
            for gs, ge in gts:
                best, best_k = -1.0, None
                for k, d in enumerate(dets):
                    if free[k]:
                        iou = loop_tiou((gs, ge), (d[2], d[3]))
                        if iou > best:
                            best, best_k = iou, k
                if best_k is not None and best > thr:
                    free[best_k] = False
            for k, d in enumerate(dets):
                amb = any(min(max(d[2], d[3]), ae) - max(min(d[2], d[3]), as_) > 0
                          for av, as_, ae in ambiguous if av == v)
                if not free[k]:
                    rows.append((d[4], d[5], 1))
                elif not amb:
                    rows.append((d[4], d[5], 0))
        rows.sort(key=lambda r: (-r[0], r[1]))  # by score, ties in input order
        npos = sum(1 for g in gt if g[1] == c)
        tp = fp = 0
        total = 0.0
        for _, _, hit in rows:
            tp += hit
            fp += 1 - hit
            if hit:
                total += tp / (tp + fp)
        ap[c] = total / max(npos, 1)
    return ap
