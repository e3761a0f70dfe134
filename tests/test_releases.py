"""The release registry holds the published releases."""

from __future__ import annotations

import re

import pytest

from qscope_hf import UnknownReleaseError, find_release, get_release, list_releases

TABLE = {  # backbone: (layers, d_model, {k: d_sae}), as the releases' model cards give them
    "Qwen3-1.7B-Base": (28, 2048, {50: 32768, 100: 32768}),
    "Qwen3-8B-Base": (36, 4096, {50: 65536, 100: 65536}),
    "Qwen3.5-2B-Base": (24, 2048, {50: 32768, 100: 32768}),
    "Qwen3.5-9B-Base": (32, 4096, {50: 65536, 100: 65536}),
    "Qwen3.5-27B": (64, 5120, {50: 81920, 100: 81920}),
    "Qwen3-30B-A3B-Base": (48, 2048, {50: 32768, 100: 131072}),
    "Qwen3.5-35B-A3B-Base": (40, 2048, {50: 32768, 100: 131072}),
}


def test_all_fourteen_releases():
    published = [r for r in list_releases() if r.backbone in TABLE]
    assert len(published) == 14
    for release in published:
        layers, d_model, widths = TABLE[release.backbone]
        assert (release.num_layers, release.d_model, release.d_sae) == (layers, d_model, widths[release.k])
        assert get_release(release.repo_id) is release
        assert release.layer_file(layers - 1) == f"layer{layers - 1}.sae.pt"
    repo_ids = {r.repo_id for r in published}
    assert {"Qwen/SAE-Res-Qwen3-1.7B-Base-W32K-L0_50", "Qwen/SAE-Res-Qwen3.5-27B-W80K-L0_100",
            "Qwen/SAE-Res-Qwen3-30B-A3B-Base-W128K-L0_100"} <= repo_ids


def test_lookup_and_errors():
    release = find_release("Qwen/Qwen3-30B-A3B-Base", k=100)
    assert (release.d_sae, release.family, release.model_id) == (131072, "qwen3_moe", "Qwen/Qwen3-30B-A3B-Base")
    assert find_release("Qwen3.5-2B-Base").family == "qwen3_5"
    with pytest.raises(UnknownReleaseError, match="did you mean Qwen/SAE-Res-Qwen3-1.7B-Base-W32K-L0_50"):
        get_release("Qwen/SAE-Res-Qwen3-1.7B-Base-W32K-L0_5")
    with pytest.raises(UnknownReleaseError, match="no Qwen-Scope release for backbone 'Qwen3-4B'"):
        find_release("Qwen3-4B")
    with pytest.raises(ValueError, match="layer 28 is out of range.*layers 0..27"):
        get_release("Qwen/SAE-Res-Qwen3-1.7B-Base-W32K-L0_100").layer_file(28)


def test_each_repo_id_spells_its_own_shape():
    """The hub names encode width and k (``Qwen/SAE-Res-{backbone}-W{d_sae/1024}K-L0_{k}``): parse them back."""
    pattern = re.compile(r"Qwen/SAE-Res-(?P<backbone>.+)-W(?P<width>\d+)K-L0_(?P<k>\d+)")
    for release in list_releases():
        match = pattern.fullmatch(release.repo_id)
        assert match, release.repo_id
        assert match["backbone"] == release.backbone and int(match["k"]) == release.k
        assert int(match["width"]) * 1024 == release.d_sae
        assert release.d_sae % release.d_model == 0 and release.d_sae // release.d_model in (16, 64)
        assert release.model_id == f"Qwen/{release.backbone}"
        assert find_release(release.backbone, k=release.k, width=release.d_sae) is release
