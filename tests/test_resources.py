"""Fitting stage resources to the cluster: share CPUs and memory, never invent or oversubscribe GPUs."""

from __future__ import annotations

import pytest
import ray

from augpipe.pipeline.config import load_recipe
from augpipe.pipeline.plan import build_plan
from augpipe.pipeline.ray_cluster import fit_resources


def stages(profile: str, sets: tuple[str, ...] = ()):
    return build_plan(
        load_recipe("back-captioning", profile=profile, sets=list(sets)), check_models=False
    ).stages


def test_a_small_machine_shares_cpus_and_memory(monkeypatch):
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 2.0, "memory": 8 * 2**30})
    fitted = fit_resources(stages("gpu"))
    assert sum(r.cpus for r in fitted.values()) <= 1.5 + 1e-9
    assert sum(r.memory_gb for r in fitted.values()) * 2**30 <= 0.8 * 8 * 2**30 + 1
    assert all(r.gpus == 0 for r in fitted.values()), "no GPU in the cluster: everything runs on CPU"


def test_gpu_shares_are_kept_when_they_fit(monkeypatch):
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 16.0, "GPU": 1.0, "memory": 100 * 2**30})
    plan_stages = stages("gpu")
    fitted = fit_resources(plan_stages)
    assert {name: r.gpus for name, r in fitted.items() if r.gpus} == {
        s.name: s.effective_resources().gpus for s in plan_stages if s.effective_resources().gpus
    }
    assert sum(r.gpus for r in fitted.values()) <= 1.0


def test_oversubscribed_gpus_fail_with_the_numbers(monkeypatch):
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 16.0, "GPU": 1.0, "memory": 100 * 2**30})
    with pytest.raises(RuntimeError, match=r"ask for 1\.5 GPUs .*generate_image 0\.5 x2.*cluster has 1"):
        fit_resources(stages("gpu", ("generate_image.concurrency=2",)))


def test_device_cuda_without_a_gpu_fails(monkeypatch):
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 4.0, "memory": 16 * 2**30})
    with pytest.raises(RuntimeError, match="caption has device: cuda"):
        fit_resources(stages("gpu", ("caption.device=cuda",)))
