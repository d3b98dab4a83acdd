"""cluster.yaml is a valid Ray cluster-launcher config (Ray's own schema, after Ray's own defaults) with a
CPU head, an autoscaling GPU worker group and setup commands that install raysparse."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def cluster() -> dict:
    return yaml.safe_load((ROOT / "cluster.yaml").read_text())


def test_cluster_yaml_passes_rays_schema_after_rays_defaults(cluster):
    from ray.autoscaler._private.util import prepare_config, validate_config

    prepared = prepare_config(cluster)     # what `ray up` does before it validates
    validate_config(prepared)              # jsonschema against ray/autoscaler/ray-schema.json


def test_schema_check_catches_a_broken_config(cluster):
    import jsonschema
    from ray.autoscaler._private.util import prepare_config, validate_config

    broken = dict(cluster, available_node_types={**cluster["available_node_types"],
                                                 "worker.gpu": {**cluster["available_node_types"]["worker.gpu"],
                                                                "min_workers": "zero"}})
    with pytest.raises(jsonschema.ValidationError):
        validate_config(prepare_config(broken))


def test_cpu_head_and_autoscaling_gpu_workers(cluster):
    types = cluster["available_node_types"]
    head = types[cluster["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0
    gpu_groups = [t for name, t in types.items() if name != cluster["head_node_type"] and t["resources"].get("GPU", 0) >= 1]
    assert len(gpu_groups) == 1
    group = gpu_groups[0]
    assert group["min_workers"] == 0 < group["max_workers"] <= cluster["max_workers"]
    assert group["node_config"]["InstanceType"].startswith(("g", "p"))     # AWS GPU instance families


def test_setup_commands_install_raysparse_and_matching_ray(cluster):
    import ray

    commands = "\n".join(cluster["setup_commands"])
    assert "pip install -q -e ~/raysparse" in commands
    assert cluster["file_mounts"]["~/raysparse"] == "."
    assert f"ray[default,train,tune,serve]=={ray.__version__}" in commands
    head_start = " ".join(cluster["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head_start and "--autoscaling-config" in head_start


def test_preflight_counts_gpus_the_autoscaler_may_add(cluster, tmp_path):
    """On the head of a `ray up` cluster the launcher config lies at ~/ray_bootstrap_config.yaml; with no GPU
    node up yet, the GPU check must still pass (the autoscaler adds nodes when workers ask for GPUs)."""
    from raysparse.preflight import launcher_max_resources

    path = tmp_path / "ray_bootstrap_config.yaml"
    path.write_text(yaml.safe_dump(cluster))
    assert launcher_max_resources(str(path)) == {"CPU": 8 + 4 * 8, "GPU": 4}
    assert launcher_max_resources(str(tmp_path / "absent.yaml")) == {}
