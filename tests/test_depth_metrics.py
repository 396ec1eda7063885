"""Accuracy by depth (aot.metrics): per-position figures summarized per depth bucket, the same
figures as the whole-text summary, and accuracy gates held in every bucket."""

from __future__ import annotations

import torch

from aot.metrics import Gates, by_depth, check_gates, compare_rows, row_metrics, summarize


def rows(n: int, flip_from: int | None = None):
    g = torch.Generator().manual_seed(0)
    ref = torch.randn(n, 50, generator=g)
    got = ref + 0.01 * torch.randn(n, 50, generator=g)
    if flip_from is not None:  # past this depth the bundle predicts something else
        got[flip_from:] = torch.randn(n - flip_from, 50, generator=g)
    target = torch.randint(0, 50, (n,), generator=g)
    return ref, got, target


def test_chunked_rows_summarize_as_the_whole():
    ref, got, target = rows(3000)
    whole = compare_rows(ref, got, target)
    parts = [row_metrics(ref[i : i + 128], got[i : i + 128], target[i : i + 128]) for i in range(0, 3000, 128)]
    merged = {k: torch.cat([p[k] for p in parts]) for k in parts[0]}
    chunked = summarize(merged)
    assert chunked["positions"] == whole["positions"] == 3000
    for k in ("ppl_reference", "ppl_bundle", "top1_agreement", "max_abs_logit_error"):
        assert abs(chunked[k] - whole[k]) < 1e-3


def test_buckets_cover_the_text():
    ref, got, target = rows(5000)
    b = by_depth(row_metrics(ref, got, target))
    assert [x["depth"] for x in b] == ["0-1K", "1K-4K", "4K-16K"]
    assert [x["positions"] for x in b] == [1024, 3072, 904] and b[-1]["to"] == 5000
    assert by_depth(row_metrics(*rows(500)))[0]["positions"] == 500


def test_gates_hold_in_every_bucket():
    ref, got, target = rows(5000, flip_from=4096)  # right to 4K, wrong past it
    m = row_metrics(ref, got, target)
    accuracy = {**summarize(m), "by_depth": by_depth(m)}
    assert accuracy["top1_agreement"] > 0.8  # the whole text hides the deep bucket
    gates = {g["name"]: g for g in check_gates(Gates(min_top1=0.8), accuracy, None)}
    assert gates["min_top1"]["ok"] and gates["min_top1@0-1K"]["ok"] and gates["min_top1@1K-4K"]["ok"]
    assert not gates["min_top1@4K-16K"]["ok"]
    short = {**summarize(row_metrics(*rows(500))), "by_depth": by_depth(row_metrics(*rows(500)))}
    assert [g["name"] for g in check_gates(Gates(min_top1=0.8), short, None)] == ["reference_matches", "min_top1"]
